"""The FeatureStore: opened for reading (`open_store`) or writing (`FeatureStore.create`).

Reading utterances and whole layers, handing out pending blocks, writing them (`write_block`,
`write_layer`, `BlockWriter`) and marking them done.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.sync import sync

from w2vcache.errors import W2VCacheError

from .creation import _create_layout, _differences, _differences_text, _jsonable, _root_state, _sorted_plan, _wipe
from .layout import (
    BLOCK_CHUNKS,
    COMPRESSIONS,
    CREATING_KEY,
    DEFAULT_COMPRESSION,
    DONE,
    DONE_WITH_FAILURES,
    DTYPES,
    FAILED_GROUP,
    FORMAT_VERSION,
    INDEX_ARRAYS,
    INT8,
    META_KEY,
    SCALE_SUFFIX,
    SUBSET_KEY,
    VERIFICATION_KEY,
    Block,
    SplitPlan,
    SplitStatus,
    StoredUtterance,
    _check_name,
    _check_shard,
    choose_chunk_frames,
    dequantise,
    feature_dtype,
    quantise,
)
from .locks import _acquire_create_lock, _acquire_writer_lock, _Lock, _lock_name
from .location import _close_store, _open_group, _store_label, local_root
from .writing import BlockWriter, convert_features

# ----------------------------------------------------------------------------------------------
# The store


class _SplitIndex:
    """One split's per-utterance arrays, read once."""

    def __init__(self, ids, texts, paths, lengths, offsets, blocks, done):
        self.ids: list[str] = ids
        self.texts: list[str] = texts
        self.paths: list[str] = paths
        self.lengths: np.ndarray = lengths
        self.offsets: np.ndarray = offsets
        self.blocks: np.ndarray = blocks
        self.done: np.ndarray = done  # bool (n_blocks,): the marker is > 0
        self.state: np.ndarray = done.astype(np.uint8)  # the markers: 0 pending, 1 done, 2 with failures
        self.failures: dict[int, list[dict]] = {}  # block -> its failure record, read when needed
        self.position = {utt_id: i for i, utt_id in enumerate(ids)}
        self.block_of = np.repeat(np.arange(len(blocks)), blocks[:, 1] - blocks[:, 0])


class FeatureStore:
    """A feature store opened for reading (`open_store`) or writing (`FeatureStore.create`)."""

    def __init__(self, group: zarr.Group, label: str, *, lock: _Lock | None = None,
                 shard: tuple[int, int] | None = None):
        self._root = group
        self.path = label
        self.read_only = lock is None
        self.shard = shard
        self._lock = lock
        self._meta = self._check_meta(group, label)
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._present: dict[tuple[str, str], set[int]] = {}  # chunks seen to exist (_check_present)
        self._index: dict[str, _SplitIndex] = {}
        self._written: set[tuple[str, int]] = set()
        self._layers_written: dict[tuple[str, int], set[str]] = {}  # by write_layer
        self._owned_store: Any = None  # a store open_store opened (a zip pack's handle), closed by close()
        # How to open the store again in a forked child (a DataLoader worker): the parent's http
        # session belongs to the parent's event loop, and a pack's file offset would be shared.
        self._reopen: Callable[[], tuple[zarr.Group, Any]] | None = None
        self._opened_in = os.getpid()

    # -- opening ------------------------------------------------------------------------------

    @staticmethod
    def _check_meta(group: zarr.Group, label: str) -> dict:
        attrs = group.attrs.asdict()
        meta = attrs.get(META_KEY)
        if not isinstance(meta, dict):
            if CREATING_KEY in attrs:
                raise W2VCacheError(f"store {label} was never fully created (creation was "
                                    f"interrupted); re-run extract to create it again")
            raise W2VCacheError(f"{label} is a zarr group but not a w2vcache store (no "
                                f"'{META_KEY}' attribute)")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise W2VCacheError(f"store {label} has format version {version}; this w2vcache "
                                f"understands up to {FORMAT_VERSION}: upgrade w2vcache")
        # Split and layer names become paths inside the store: one from a store made elsewhere must
        # name a group of this store, as creation requires of its own.
        for what, names in (("split", meta.get("splits")), ("layer", meta.get("layers"))):
            try:
                if not isinstance(names, (list, dict)):
                    raise W2VCacheError(f"{what}s {names!r} are not a list")
                for name in names:
                    _check_name(name, what)
            except W2VCacheError as err:
                raise W2VCacheError(f"store {label}: its metadata is not as w2vcache writes it: {err}") from None
        return meta

    @classmethod
    def create(cls, path: str | os.PathLike, provenance: Mapping[str, Any],
               splits_plan: Mapping[str, SplitPlan | Sequence[tuple[str, str, str, int]]],
               layers: Mapping[str, int], dtype: str = "float16", *,
               shard: tuple[int, int] | None = None, compression: str | None = None,
               chunk_frames: int | None = None, block_chunks: int | None = None) -> FeatureStore:
        """Create the store at `path`, or open it to resume if it exists with the same settings.

        Returns the store open for writing and holding the writer lock for `shard` (None: the whole
        store; (i, n): blocks b with b % n == i). Release it with `close()` or a `with` block.
        compression, chunk_frames and block_chunks default to the existing store's values, or for
        a new store to DEFAULT_COMPRESSION, `choose_chunk_frames` and BLOCK_CHUNKS.
        """
        root = local_root(path)
        label = os.fspath(path)
        if dtype not in DTYPES:
            raise W2VCacheError(f"store {label}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if compression is not None and compression not in COMPRESSIONS:
            raise W2VCacheError(f"store {label}: compression {compression!r} is not one of "
                                f"{', '.join(COMPRESSIONS)}")
        for value, what in ((chunk_frames, "chunk_frames"), (block_chunks, "block_chunks")):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise W2VCacheError(f"store {label}: {what} must be a positive integer, got {value!r}")
        shard = _check_shard(shard, label)
        if not layers:
            raise W2VCacheError(f"store {label}: no layers to store")
        layers = dict(layers)
        for name, dim in layers.items():
            _check_name(name, "layer")
            if name in INDEX_ARRAYS or name == FAILED_GROUP or name.endswith(SCALE_SUFFIX):
                raise W2VCacheError(f"layer name {name!r} is reserved for the store's own arrays")
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
                raise W2VCacheError(f"layer {name}: dimension {dim!r} is not a positive integer")
            layers[name] = int(dim)
        if not splits_plan:
            raise W2VCacheError(f"store {label}: no splits to store")
        for split in splits_plan:
            _check_name(split, "split")
        plans = {split: _sorted_plan(split, plan) for split, plan in splits_plan.items()}
        provenance = _jsonable(dict(provenance), "provenance")
        asked = {"dtype": dtype, "compression": compression, "chunk_frames": chunk_frames,
                 "block_chunks": block_chunks, "layers": layers, "provenance": provenance}

        try:
            root.mkdir(parents=True, exist_ok=True)
            create_lock = _acquire_create_lock(root, label)
        except OSError as e:
            raise W2VCacheError(f"cannot write the store at {label}: {e}") from None
        try:
            state = _root_state(root)
            if state == "foreign":
                raise W2VCacheError(f"{label} exists and is not a w2vcache store; choose another "
                                    f"path or remove it")
            if state == "initialised":
                store = cls(zarr.open_group(str(root), mode="r", zarr_format=3, use_consolidated=False), label)
                diffs = _differences(store._meta, store._plan_view, asked, plans)
                if diffs:
                    raise W2VCacheError(f"store {label} already exists with other settings: "
                                        + _differences_text(diffs))
            else:
                if state == "half":
                    _wipe(root)
                _create_layout(root, plans, provenance, layers, dtype,
                               compression or DEFAULT_COMPRESSION,
                               chunk_frames or choose_chunk_frames(layers, dtype),
                               block_chunks or BLOCK_CHUNKS)
        finally:
            create_lock.release()
        return cls._open_locked(root, label, shard)

    @classmethod
    def open_writer(cls, path: str | os.PathLike, *, shard: tuple[int, int] | None = None) -> FeatureStore:
        """Open an existing, fully created local store for writing, holding the writer lock for
        `shard` (None: the whole store). Repair uses it: it rewrites blocks of a store as it is,
        with no plan to compare."""
        root = local_root(path)
        label = os.fspath(path)
        shard = _check_shard(shard, label)
        state = _root_state(root)
        if state == "empty":
            raise W2VCacheError(f"no store at {label}")
        if state == "half":
            raise W2VCacheError(f"store {label} was never fully created; re-run extract to create it again")
        if state == "foreign":
            raise W2VCacheError(f"{label} is not a w2vcache store")
        return cls._open_locked(root, label, shard)

    @classmethod
    def _open_locked(cls, root: os.PathLike, label: str, shard: tuple[int, int] | None) -> FeatureStore:
        """The store at `root` opened for writing, holding the writer lock for `shard`."""
        try:
            lock = _acquire_writer_lock(root, shard, label)
        except OSError as e:
            raise W2VCacheError(f"cannot lock the store at {label}: {e}") from None
        try:
            return cls(zarr.open_group(str(root), mode="r+", zarr_format=3, use_consolidated=False),
                       label, lock=lock, shard=shard)
        except BaseException:
            lock.release()
            raise

    def _plan_view(self, split: str) -> tuple[list[str], list[str], list[int]]:
        index = self._split_index(split)
        return index.ids, index.texts, index.lengths.tolist()

    def close(self) -> None:
        """Release the writer lock (if any) and a pack's file handle. Reading stays possible."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._owned_store is not None:
            _close_store(self._owned_store)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else f"writing {_lock_name(self.shard)}"
        return f"FeatureStore({self.path!r}, {mode})"

    # -- description --------------------------------------------------------------------------

    @property
    def splits(self) -> list[str]:
        return list(self._meta["splits"])

    @property
    def provenance(self) -> dict:
        return dict(self._meta["provenance"])

    @property
    def model(self) -> dict:
        """The model the features came from: {"name", "revision", "weight_hash"} (None where
        unknown; a store that records a bare name is read as naming the model)."""
        model = self.provenance.get("model")
        model = model if isinstance(model, dict) else {"name": model}
        return {k: model.get(k) for k in ("name", "revision", "weight_hash")}

    @property
    def layers(self) -> dict[str, int]:
        """Layer name -> feature dimension, in extraction order."""
        return dict(self._meta["layers"])

    @property
    def dtype(self) -> str:
        """How layers are stored: float16, float32, or int8 (with per-channel scales per chunk)."""
        return self._meta["dtype"]

    @property
    def feature_dtype(self) -> str:
        """What `read`, `read_batch` and `read_layer` return: the stored dtype, float32 for int8."""
        return feature_dtype(self.dtype)

    @property
    def verification(self) -> dict | None:
        """What the last verification that found damage recorded (`verify` keeps it in the root
        attributes of a local store until a verification finds none): checked, problems,
        damaged_blocks {split: [block, ...]}; None when there is no such record."""
        record = self._root.attrs.asdict().get(VERIFICATION_KEY)
        return record if isinstance(record, dict) else None

    def split_attrs(self, split: str) -> dict:
        return self._group(split).attrs.asdict()

    def chunk_frames(self, split: str) -> int:
        return int(self.split_attrs(split)["chunk_frames"])

    def utterances(self, split: str) -> list[StoredUtterance]:
        """Every utterance of the split in store order (by length, then id), done or not.

        Positions in this list are store positions (as `read`, `read_layer` take them), so it also
        holds the utterances that failed to decode during extraction: `usable` tells them apart.
        """
        index = self._split_index(split)
        return [StoredUtterance(i, t, int(n)) for i, t, n in zip(index.ids, index.texts, index.lengths)]

    def failed(self, split: str, refresh: bool = False) -> list[dict]:
        """The utterances of done blocks that failed to decode during extraction, in store order:
        {id, path, reason}. Their rows hold no features of them (readers leave them out).

        Read from the record of each block marked DONE_WITH_FAILURES, by its fixed path, so it works
        where the store cannot be listed (http)."""
        index = self._split_index(split, refresh=refresh)
        blocks = np.flatnonzero(index.state == DONE_WITH_FAILURES)
        return [dict(u) for b in blocks for u in self._block_failures(split, int(b))]

    def usable(self, split: str) -> np.ndarray:
        """(n,) bool by store position: False for the utterances that failed to decode."""
        index = self._split_index(split)
        mask = np.ones(len(index.ids), dtype=bool)
        for u in self.failed(split):
            mask[index.position[u["id"]]] = False
        return mask

    def failed_in(self, split: str, b: int) -> list[dict]:
        """The utterances of block b that failed to decode ({id, path, reason}); [] for a block
        without failures or not done. What a copy passes to `mark_done` with the block."""
        index = self._split_index(split)
        if not 0 <= b < len(index.blocks):
            raise W2VCacheError(f"store {self.path}: split {split} has {len(index.blocks)} blocks, no block {b}")
        if index.state[b] != DONE_WITH_FAILURES:
            return []
        return [dict(u) for u in self._block_failures(split, b)]

    def _block_failures(self, split: str, b: int) -> list[dict]:
        """The failure record of block b (marked DONE_WITH_FAILURES), checked against the block."""
        index = self._split_index(split)
        if b not in index.failures:
            where = f"store {self.path}: {split}/{FAILED_GROUP}/{b}"
            try:
                record = self._group(split)[f"{FAILED_GROUP}/{b}"].attrs.asdict().get("utterances")
            except W2VCacheError:
                raise
            except Exception as e:
                raise W2VCacheError(f"{where}: the record of the utterances that failed to decode "
                                    f"in block {b} is missing or unreadable ({e}); run "
                                    f"`w2vcache verify --repair {self.path}`") from None
            start, stop = (int(x) for x in index.blocks[b])
            ids = set(index.ids[start:stop])
            if (not isinstance(record, list) or not record
                    or not all(isinstance(u, dict) and u.get("id") in ids for u in record)):
                raise W2VCacheError(f"{where}: the record of the utterances that failed to decode "
                                    f"does not name utterances of block {b}; run "
                                    f"`w2vcache verify --repair {self.path}`")
            index.failures[b] = sorted(record, key=lambda u: index.position[u["id"]])
        return index.failures[b]

    def status(self, split: str, refresh: bool = False) -> SplitStatus:
        index = self._split_index(split, refresh=refresh)
        sizes = index.blocks[:, 1] - index.blocks[:, 0]
        return SplitStatus(n_blocks=len(index.blocks), blocks_done=int(index.done.sum()),
                           n_utterances=len(index.ids), utterances_done=int(sizes[index.done].sum()))

    # -- access helpers -----------------------------------------------------------------------

    def _check_fork(self) -> None:
        if self._opened_in != os.getpid() and self._reopen is not None:
            self._root, self._owned_store = self._reopen()
            self._arrays.clear()
        self._opened_in = os.getpid()

    def _group(self, split: str) -> zarr.Group:
        self._check_fork()
        if split not in self._meta["splits"]:
            raise W2VCacheError(f"store {self.path} has no split {split!r}; it has "
                                f"{', '.join(self._meta['splits'])}")
        return self._root[split]

    def _array(self, split: str, name: str) -> zarr.Array:
        self._check_fork()
        key = (split, name)
        if key not in self._arrays:
            if name not in INDEX_ARRAYS and name not in self._meta["layers"] and not (
                    self.dtype == INT8 and name.removesuffix(SCALE_SUFFIX) in self._meta["layers"]):
                raise W2VCacheError(f"store {self.path} has no layer {name!r}; it has "
                                    f"{', '.join(self._meta['layers'])}")
            group = self._group(split)
            try:
                array = group[name]
            except KeyError:
                raise W2VCacheError(f"store {self.path}: array {split}/{name} is missing") from None
            if not self.read_only:
                # write_empty_chunks is runtime config, not metadata: without it zarr silently skips
                # chunks equal to the fill value, and `verify` could not demand every done chunk.
                array = array.with_config({"write_empty_chunks": True})
            self._arrays[key] = array
        return self._arrays[key]

    def _read(self, split: str, name: str, selection: slice | int = slice(None),
              out: np.ndarray | None = None) -> np.ndarray:
        """array[selection] (into `out` if given), naming the chunk when a checksum fails or
        when it is missing."""
        array = self._array(split, name)
        if name not in MAY_BE_ABSENT:
            self._check_present(split, name, array, selection)
        try:
            if out is None:
                return array[selection]
            array.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out))
            return out
        except W2VCacheError:
            raise
        except Exception as e:
            bad = _find_bad_chunk(array, selection)
            if bad is None:
                raise
            raise W2VCacheError(f"store {self.path}: {split}/{name} chunk {bad}: checksum "
                                f"mismatch or unreadable chunk ({e}); {self._advice(name)}") from None

    def _check_present(self, split: str, name: str, array: zarr.Array, selection: slice | int) -> None:
        """zarr reads a missing chunk as its fill value, zeros, which no checksum covers: a chunk
        lost from a copy would train probes on silence. Each chunk is looked for once (one stat, or
        one request on a remote store), the first time it is read."""
        if array.shape[0] == 0:
            return
        step = array.chunks[0]
        lo, hi, _ = (selection if isinstance(selection, slice) else slice(selection, selection + 1)).indices(array.shape[0])
        if hi <= lo:
            return
        seen = self._present.setdefault((split, name), set())
        wanted = [c for c in range(lo // step, (hi - 1) // step + 1) if c not in seen]
        if not wanted:
            return
        missing = missing_chunks(array, wanted)
        if missing:
            raise W2VCacheError(f"store {self.path}: {split}/{name} chunk {missing[0]} is missing (a copy that "
                                f"stopped part-way, or a deleted file); {self._advice(name)}")
        seen.update(wanted)

    def _advice(self, name: str) -> str:
        """What to do about a damaged chunk of array `name`. Layer chunks and done markers belong
        to one block, which repair writes again; the other index arrays (ids, offsets, ...) span
        every block and cannot be rebuilt so."""
        if name not in INDEX_ARRAYS or name == "done":
            return f"run `w2vcache verify --repair {self.path}` to rewrite the blocks at fault"
        return "the store's index is damaged: extract into a new store, or copy the store again"

    def _read_features(self, split: str, layer: str, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows lo:hi of a layer as floats: as stored, or an int8 layer decoded with its scales."""
        if self.dtype != INT8:
            return self._read(split, layer, slice(lo, hi), out)
        chunk = self.chunk_frames(split)
        q = self._read(split, layer, slice(lo, hi))
        scales = self._read(split, layer + SCALE_SUFFIX, slice(lo // chunk, -(-hi // chunk)))
        return dequantise(q, scales, lo, chunk, out)

    def _split_index(self, split: str, refresh: bool = False) -> _SplitIndex:
        if split not in self._index:
            self._group(split)
            strings = [self._read(split, name).tolist() for name in ("ids", "texts", "paths")]
            self._index[split] = _SplitIndex(
                *strings, self._read(split, "lengths"), self._read(split, "offsets"),
                self._read(split, "blocks"), np.zeros(0, dtype=bool))
            refresh = True
        index = self._index[split]
        if refresh:
            index.state = self._read(split, "done")
            index.done = index.state > 0
            index.failures = {}
        return index

    def _block(self, split: str, b: int) -> Block:
        index = self._split_index(split)
        start, stop = (int(x) for x in index.blocks[b])
        return Block(split=split, index=b, start=start, stop=stop,
                     frame_offset=int(index.offsets[start]), ids=tuple(index.ids[start:stop]),
                     paths=tuple(index.paths[start:stop]), lengths=tuple(int(n) for n in index.lengths[start:stop]))

    def incomplete_message(self, split: str) -> str:
        s = self.status(split)
        return (f"split {split} of store {self.path} is incomplete: {s.n_blocks - s.blocks_done} "
                f"of {s.n_blocks} blocks ({s.n_utterances - s.utterances_done} of {s.n_utterances} "
                f"utterances) are not written yet; {self.resume_hint()}")

    def resume_hint(self) -> str:
        """How this store's unwritten blocks get written: by what made it."""
        subset = self.provenance.get(SUBSET_KEY)
        if isinstance(subset, dict):
            return f"re-running the copy from {subset.get('source')} resumes it"
        return "re-running the same extract command resumes it"

    # -- reading ------------------------------------------------------------------------------

    def index_of(self, split: str, key: int | str) -> int:
        """Store position of an utterance given by position or id."""
        index = self._split_index(split)
        if isinstance(key, str):
            if key not in index.position:
                raise W2VCacheError(f"store {self.path}: split {split} has no utterance {key!r}")
            return index.position[key]
        i = int(key)
        if not 0 <= i < len(index.ids):
            raise W2VCacheError(f"store {self.path}: split {split} has {len(index.ids)} "
                                f"utterances, no index {i}")
        return i

    def read(self, split: str, layer: str, key: int | str) -> np.ndarray:
        """Features (frames, dim) of one utterance, given by store position or id, as
        `feature_dtype` (an int8 store's are decoded)."""
        return self.read_batch(split, layer, [key])[0]

    def read_batch(self, split: str, layer: str, keys: Sequence[int | str]) -> list[np.ndarray]:
        """Features of several utterances; consecutive ones of one block are read in one go."""
        self._array(split, layer)  # refuse an unknown layer before anything else
        index = self._split_index(split)
        positions = [self.index_of(split, k) for k in keys]
        for i in positions:
            b = index.block_of[i]
            if not index.done[b]:
                index = self._split_index(split, refresh=True)  # a writer may have finished it
                if not index.done[b]:
                    raise W2VCacheError(f"store {self.path}: utterance {index.ids[i]} of split "
                                        f"{split} is in block {b}, which is not extracted yet. "
                                        + self.incomplete_message(split))
            if index.state[b] == DONE_WITH_FAILURES:
                for u in self._block_failures(split, int(b)):
                    if u["id"] == index.ids[i]:
                        raise W2VCacheError(f"store {self.path}: utterance {u['id']} of split {split} "
                                            f"failed to decode during extraction ({u.get('reason')}); "
                                            f"the store holds no features of it")
        features: dict[int, np.ndarray] = {}
        wanted = sorted(set(positions))
        run_start = 0
        for k in range(1, len(wanted) + 1):
            if k < len(wanted) and wanted[k] == wanted[k - 1] + 1 \
                    and index.block_of[wanted[k]] == index.block_of[wanted[k - 1]]:
                continue  # utterances of one block lie end to end: extend the run
            first, last = wanted[run_start], wanted[k - 1]
            lo = int(index.offsets[first])
            frames = self._read_features(split, layer, lo, int(index.offsets[last] + index.lengths[last]))
            for i in wanted[run_start:k]:
                s = int(index.offsets[i]) - lo
                features[i] = frames[s: s + int(index.lengths[i])]
            run_start = k
        return [features[i] for i in positions]

    def read_layer(self, split: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """All frames of one layer of a complete split, padding removed, as `feature_dtype`.

        Returns (frames (sum of lengths, dim), offsets (n+1,)): utterance i (store order, as in
        `utterances`) is frames[offsets[i]:offsets[i+1]]. The rows of utterances that failed to
        decode (`failed`, `usable`) are included as stored: they mean nothing.
        """
        array = self._array(split, layer)
        index = self._split_index(split, refresh=True)
        if not index.done.all():
            raise W2VCacheError(self.incomplete_message(split))
        offsets = np.zeros(len(index.ids) + 1, dtype=np.int64)
        np.cumsum(index.lengths, out=offsets[1:])
        frames = np.empty((int(offsets[-1]), array.shape[1]), dtype=self.feature_dtype)
        for start, stop in index.blocks:
            lo = int(index.offsets[start])
            n = int(offsets[stop] - offsets[start])
            self._read_features(split, layer, lo, lo + n, out=frames[offsets[start]: offsets[stop]])
        return frames, offsets

    # -- writing ------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._lock is None:
            raise W2VCacheError(f"store {self.path} is open read-only (or closed); open it for "
                                f"writing with FeatureStore.create")
        self._lock.check_held(f"store {self.path}")

    def owns(self, block_index: int) -> bool:
        return self.shard is None or block_index % self.shard[1] == self.shard[0]

    def pending_blocks(self, split: str, shard: tuple[int, int] | None = None) -> list[Block]:
        """Blocks of `split` not yet done that this writer owns (or that `shard` owns)."""
        shard = _check_shard(shard, self.path) if shard is not None else self.shard
        index = self._split_index(split, refresh=True)
        return [self._block(split, b) for b in range(len(index.blocks))
                if not index.done[b] and (shard is None or b % shard[1] == shard[0])]

    def block_writer(self, block: Block) -> BlockWriter:
        """A writer that takes the block's utterances one at a time, in order."""
        self._check_writable()
        self._check_block(block)
        return BlockWriter(self, block)

    def write_block(self, block: Block, features: Mapping[str, np.ndarray]) -> None:
        """Write a whole block: features[layer] is (block.n_frames, dim), utterances end to end."""
        with self.block_writer(block) as writer:
            for layer, x in features.items():
                if layer in self._meta["layers"] and len(x) != block.n_frames:
                    raise W2VCacheError(f"store {self.path}: {block.split} block {block.index} "
                                        f"has {block.n_frames} frames, {layer} features have {len(x)}")
            starts = np.concatenate([[0], np.cumsum(block.lengths)])
            writer.append_batch({layer: [x[starts[k]: starts[k + 1]] for k in range(len(block.ids))]
                                 for layer, x in features.items()})

    def write_layer(self, block: Block, layer: str, frames: np.ndarray) -> None:
        """Write one layer of a whole block: frames is (block.n_frames, dim), utterances end to end.

        Layer by layer a block needs one layer in memory, not all of them (copying a store does
        this). Every chunk of the block is written whole, padding included; `mark_done` once every
        layer is written.
        """
        self._check_writable()
        self._check_block(block)
        if layer not in self._meta["layers"]:
            raise W2VCacheError(f"store {self.path} has no layer {layer!r}; it has "
                                f"{', '.join(self._meta['layers'])}")
        where = f"store {self.path}: {block.split} block {block.index}: {layer} features"
        x = convert_features(frames, (block.n_frames, self.layers[layer]), self.feature_dtype, where)
        chunk = self.chunk_frames(block.split)
        rows = -(-block.n_frames // chunk) * chunk  # up to the chunk boundary where the next block starts
        padded = np.zeros((rows, x.shape[1]), dtype=self.feature_dtype)
        padded[: block.n_frames] = x
        if self.dtype == INT8:
            self._put_int8(block, layer, *quantise(padded, chunk))
            return
        self._array(block.split, layer)[block.frame_offset: block.frame_offset + rows] = padded
        self._layers_written.setdefault((block.split, block.index), set()).add(layer)

    def _write_int8_layer(self, block: Block, layer: str, q: np.ndarray, scales: np.ndarray) -> None:
        """Write one int8 layer of a whole block as it is: q (the block's rows up to its last chunk
        boundary) and the scales of its chunks. A copy of an int8 store writes its source's so."""
        self._check_writable()
        self._check_block(block)
        chunk = self.chunk_frames(block.split)
        rows = -(-block.n_frames // chunk) * chunk
        if q.shape != (rows, self.layers[layer]) or q.dtype != np.int8 or scales.shape != (rows // chunk, q.shape[1]):
            raise W2VCacheError(f"store {self.path}: {block.split} block {block.index}: {layer} int8 "
                                f"rows {q.shape} {q.dtype} / scales {scales.shape} do not cover the block's chunks")
        self._put_int8(block, layer, q, scales)

    def _put_int8(self, block: Block, layer: str, q: np.ndarray, scales: np.ndarray) -> None:
        """Write a block's int8 rows and their scales, already checked."""
        chunk = self.chunk_frames(block.split)
        first = block.frame_offset // chunk
        # Order does not matter: nothing of the block is read until it is marked done, and a run
        # that resumes it rewrites values and scales alike.
        self._array(block.split, layer + SCALE_SUFFIX)[first: first + len(scales)] = scales
        self._array(block.split, layer)[block.frame_offset: block.frame_offset + len(q)] = q
        self._layers_written.setdefault((block.split, block.index), set()).add(layer)

    def mark_done(self, block: Block, failed: Sequence[Mapping[str, str]] = ()) -> None:
        """Record that every layer of `block` is written (by `write_block`, a BlockWriter, or
        `write_layer` for each layer).

        `failed`: {id, path, reason} of the block's utterances whose audio failed to decode (their
        rows were written with anything of the right length). Their record is written first, at
        <split>/failed/<block>, then the marker says DONE_WITH_FAILURES: a writer killed between
        the two leaves the block pending, never marked with its record missing.
        """
        self._check_writable()
        self._check_block(block)
        failed = [{"id": str(u["id"]), "path": str(u.get("path", "")), "reason": str(u.get("reason", ""))}
                  for u in failed]
        unknown = [u["id"] for u in failed if u["id"] not in block.ids]
        if unknown or len({u["id"] for u in failed}) != len(failed):
            raise W2VCacheError(f"store {self.path}: {block.split} block {block.index}: failures "
                                f"{unknown or 'listed twice'} are not each one utterance of the block")
        key = (block.split, block.index)
        if key not in self._written:
            by_layer = self._layers_written.get(key, set())
            missing = [layer for layer in self._meta["layers"] if layer not in by_layer]
            if not by_layer:
                raise W2VCacheError(f"store {self.path}: {block.split} block {block.index} was not "
                                    f"written by this writer; write it before marking it done")
            if missing:
                raise W2VCacheError(f"store {self.path}: {block.split} block {block.index}: layers "
                                    f"{missing} were not written; write them before marking it done")
        if failed:
            self._group(block.split).create_group(f"{FAILED_GROUP}/{block.index}", overwrite=True,
                                                  attributes={"utterances": failed})
        done = self._array(block.split, "done")
        done[block.index] = DONE_WITH_FAILURES if failed else DONE
        index = self._split_index(block.split)
        index.done[block.index] = True
        index.state[block.index] = DONE_WITH_FAILURES if failed else DONE
        index.failures.pop(block.index, None)
        if all(index.done[b] for b in range(len(index.done)) if self.owns(b)):
            index = self._split_index(block.split, refresh=True)
            if index.done.all():
                # Every writer that finishes re-checks, so the last one to finish sets the flag;
                # rewriting the same attributes concurrently is harmless (atomic, identical).
                self._group(block.split).update_attributes({"complete": True})

    def reopen_blocks(self, split: str, indices: Sequence[int]) -> None:
        """Clear the done markers of blocks `indices` so that they are written again (repair).

        Until a block is marked done again, readers refuse its utterances and a re-run of extract
        (or repair) redoes it, so a writer killed midway leaves it pending, never half-rewritten
        and marked done. A marker whose own chunk is corrupt is simply overwritten. A block's
        failure record is left in place: read only while its marker says DONE_WITH_FAILURES, it is
        replaced if the block fails again and meaningless if it does not.
        """
        self._check_writable()
        done = self._array(split, "done")
        for b in indices:
            if not 0 <= b < done.shape[0]:
                raise W2VCacheError(f"store {self.path}: split {split} has {done.shape[0]} blocks, "
                                    f"no block {b}")
            if not self.owns(b):
                raise W2VCacheError(f"store {self.path}: {split} block {b} belongs to shard "
                                    f"{b % self.shard[1]}/{self.shard[1]}, not to this writer's")
        if not indices:
            return
        # `complete` first: it must never say true while a block is pending.
        self._group(split).update_attributes({"complete": False})
        for b in indices:
            done[b] = 0  # a whole chunk: written without reading the old one
            self._written.discard((split, b))
            self._layers_written.pop((split, b), None)
        if split in self._index:
            self._split_index(split, refresh=True)

    def _check_block(self, block: Block) -> None:
        index = self._split_index(block.split)
        if not 0 <= block.index < len(index.blocks) or tuple(index.blocks[block.index]) != (block.start, block.stop):
            raise W2VCacheError(f"store {self.path}: {block.split} block {block.index} does not "
                                f"belong to this store")
        if not self.owns(block.index):
            raise W2VCacheError(f"store {self.path}: {block.split} block {block.index} belongs to "
                                f"shard {block.index % self.shard[1]}/{self.shard[1]}, not to this "
                                f"writer's shard {self.shard[0]}/{self.shard[1]}")
        if index.done[block.index]:
            raise W2VCacheError(f"store {self.path}: {block.split} block {block.index} is already "
                                f"done; a finished block is never rewritten")


EXISTS_CONCURRENCY = 10  # chunk-existence checks in flight at once (as zarr's async.concurrency)
# Arrays a chunk of which may be absent in a sound store: a block's done marker until the block is
# done, and a chunk of transcripts that are all empty (unlabelled audio), which zarr does not write.
MAY_BE_ABSENT = ("done", "texts")


def missing_chunks(array: zarr.Array, chunks) -> list[int]:
    """Which of `chunks` (indices along the first axis; the arrays here are chunked along it only)
    have no file in the store."""
    chunks = list(chunks)
    extra = (0,) * (array.ndim - 1)
    keys = [f"{array.store_path.path}/{array.metadata.encode_chunk_key((c, *extra))}" for c in chunks]
    return [c for c, exists in zip(chunks, _keys_exist(array.store_path.store, keys)) if not exists]


def _keys_exist(store: Any, keys: list[str]) -> list[bool]:
    """store.exists for each key, many at once: one request per key on a remote store."""
    async def check_all() -> list[bool]:
        limit = asyncio.Semaphore(EXISTS_CONCURRENCY)

        async def check(key: str) -> bool:
            async with limit:
                return await store.exists(key)

        return await asyncio.gather(*(check(key) for key in keys))

    return sync(check_all())


def _find_bad_chunk(array: zarr.Array, selection: slice | int) -> int | None:
    """The first chunk (along axis 0) of `selection` that fails to decode, if any."""
    start, stop, _ = (selection if isinstance(selection, slice)
                      else slice(selection, selection + 1)).indices(array.shape[0])
    step = array.chunks[0]
    for c in range(start // step, -(-stop // step)):
        try:
            array[c * step: (c + 1) * step]
        except Exception:
            return c
    return None


def open_store(path: Any) -> FeatureStore:
    """Open a store read-only: a local path, an fsspec URL, a .zip pack, or any zarr store object.

    URLs: "s3://bucket/features.zarr", "gs://...", "https://host/features.zarr" (read-only),
    "features.zip" or "https://host/features.zip" (a pack, read in place). Credentials come from the
    environment the way the fsspec package of that protocol finds them (s3fs, gcsfs, ...).
    Nothing under the store is ever modified through it. `close()` releases a pack's file handle.
    """
    label = _store_label(path)
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    group, owned = _open_group(path, label)
    try:
        store = FeatureStore(group, label)
    except BaseException:
        _close_store(owned)
        raise
    store._owned_store = owned
    if owned is not None:
        store._reopen = lambda: _open_group(path, label)
    return store
