"""verify and info: read every chunk of a store back and check its layout; summarise a store.

`verify` names each problem and the blocks whose chunks fail (the unit `verify --repair` rewrites).
On a local store it also keeps what it found in the root attribute VERIFICATION_KEY: present while
blocks are damaged, or were found damaged and are not rewritten yet (a repair killed midway left
them pending), removed by the first verification that finds none. `info` shows it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, ZipStore

from w2vcache.errors import W2VCacheError

from .featurestore import MAY_BE_ABSENT, FeatureStore, missing_chunks, open_store
from .layout import (
    DONE_WITH_FAILURES,
    FAILED_GROUP,
    FAILED_REASON,
    INDEX_ARRAYS,
    INT8,
    PENDING,
    SCALE_DTYPE,
    SCALE_SUFFIX,
    VERIFICATION_KEY,
)
from .location import _store_label
from .records import latest, run_records

HTTP_PROTOCOLS = ("http", "https")  # read-only, and no listing: bytes on disk are unknown there
RECORDED_PROBLEMS = 20  # problems kept in the verification record: enough to see what broke


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)  # each names split/array and chunk at fault
    chunks_checked: int = 0
    # {split: [block, ...]}: blocks whose chunks fail (checksum, missing, a corrupt done marker),
    # and blocks an earlier verification found damaged that are still pending: what repair rewrites.
    damaged_blocks: dict[str, list[int]] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)  # splits with blocks not done (not damage)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def n_damaged(self) -> int:
        return sum(map(len, self.damaged_blocks.values()))

    @property
    def damage(self) -> list[str]:
        """The problems other than incompleteness: a store being extracted is not broken."""
        notes = tuple(f"{split}: incomplete:" for split in self.incomplete)
        return [p for p in self.problems if not p.startswith(notes)] if notes else list(self.problems)

    def _damaged(self, split: str, block: int) -> None:
        blocks = self.damaged_blocks.setdefault(split, [])
        if block not in blocks:
            blocks.append(block)


def verify(path: Any, record: bool = True) -> VerifyReport:
    """Read every chunk of every array (zarr checks each chunk's crc32c) and check the layout.

    With `record`, a local store keeps the damage found in its root attributes (module docstring)
    where the file system lets us write; elsewhere (URLs, packs) verifying writes nothing.
    """
    report = VerifyReport(path=_store_label(path))
    try:
        store = open_store(path)
    except W2VCacheError as e:
        report.problems.append(str(e))
        return report
    try:
        pending: dict[str, set[int]] = {}
        for split in store.splits:
            _verify_split(store, split, report, pending)
        earlier = store.verification or {}
        for split, blocks in (earlier.get("damaged_blocks") or {}).items():
            for b in blocks:
                if b in pending.get(split, ()):  # found damaged, not rewritten yet
                    report._damaged(split, b)
        report.damaged_blocks = {s: sorted(b) for s, b in report.damaged_blocks.items()}
        if record:
            try:
                record_verification(store, report, earlier or None)
            except OSError:
                pass  # a store we may read but not write: the report says it all
    finally:
        store.close()
    return report


def record_verification(store: FeatureStore, report: VerifyReport, earlier: dict | None) -> None:
    """Keep (or clear) the damage found in a local store's root attributes; elsewhere nothing.

    Only damage is recorded: an incomplete store is being extracted, not broken. A verification
    finding none removes the record, so verifying a store that is fine never writes to it.
    """
    zarr_store = store._root.store_path.store
    if not isinstance(zarr_store, LocalStore) or store._root.store_path.path:
        return
    damage = report.damage
    if not (damage or report.damaged_blocks or earlier):
        return
    root = zarr.open_group(LocalStore(zarr_store.root), mode="r+", zarr_format=3, use_consolidated=False)
    attrs = root.attrs.asdict()
    if not (damage or report.damaged_blocks):
        attrs.pop(VERIFICATION_KEY, None)
    else:
        attrs[VERIFICATION_KEY] = {
            "checked": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "damaged_blocks": report.damaged_blocks,
            "n_problems": len(damage),
            "problems": damage[:RECORDED_PROBLEMS],
        }
    root.attrs.put(attrs)


def _verify_split(store: FeatureStore, split: str, report: VerifyReport, pending: dict[str, set[int]]) -> None:
    problems = report.problems
    try:
        group = store._group(split)
    except Exception as e:
        problems.append(f"{split}: split group is missing or unreadable ({e})")
        return
    values = {}
    for name in INDEX_ARRAYS:
        array = _member(group, split, name, problems)
        if array is None:
            continue
        values[name] = _read_chunkwise(array, f"{split}/{name}", report)
        if name == "done" and values[name] is None and array.chunks == (1,):
            values[name] = _read_markers(array, split, report)
    if any(v is None for v in values.values()) or len(values) < len(INDEX_ARRAYS):
        return  # the layout cannot be checked on unreadable index arrays
    ids, texts, paths = (values[k].tolist() for k in ("ids", "texts", "paths"))
    lengths, offsets, blocks, done = (values[k] for k in ("lengths", "offsets", "blocks", "done"))
    attrs = group.attrs.asdict()
    chunk_frames = attrs.get("chunk_frames")
    n = len(ids)
    layout = []
    if not (len(texts) == len(paths) == len(lengths) == n and offsets.shape == (n + 1,)):
        layout.append(f"{split}: array lengths disagree: ids {n}, texts {len(texts)}, paths "
                      f"{len(paths)}, lengths {len(lengths)}, offsets {len(offsets)} (want n+1)")
    if len(set(ids)) != n:
        layout.append(f"{split}/ids: {n - len(set(ids))} duplicate ids")
    if attrs.get("n_utterances") != n:
        layout.append(f"{split}: attribute n_utterances {attrs.get('n_utterances')} but {n} ids")
    if layout:
        problems += layout
        return
    if (lengths < 1).any():
        problems.append(f"{split}/lengths: {int((lengths < 1).sum())} utterances with no frames")
    if attrs.get("n_frames") != int(lengths.sum()):
        problems.append(f"{split}: attribute n_frames {attrs.get('n_frames')} but lengths sum "
                        f"to {int(lengths.sum())}")
    expect_blocks = blocks.ndim == 2 and len(blocks) and blocks[0, 0] == 0 and blocks[-1, 1] == n \
        and (blocks[1:, 0] == blocks[:-1, 1]).all() and (blocks[:, 1] > blocks[:, 0]).all()
    if not expect_blocks:
        problems.append(f"{split}/blocks: blocks do not cover utterances 0..{n} in order")
        return
    if done.shape != (len(blocks),):
        problems.append(f"{split}/done: shape {done.shape}, want ({len(blocks)},)")
        return
    if not isinstance(chunk_frames, int) or chunk_frames < 1:
        problems.append(f"{split}: attribute chunk_frames {chunk_frames!r} is not a positive integer")
        return
    if offsets[0] != 0:
        problems.append(f"{split}/offsets: starts at {offsets[0]}, not 0")
    for b, (start, stop) in enumerate(blocks):
        if (offsets[start + 1: stop] != offsets[start: stop - 1] + lengths[start: stop - 1]).any():
            problems.append(f"{split}/offsets: utterances of block {b} do not lie end to end")
        end = int(offsets[stop - 1] + lengths[stop - 1])
        if offsets[stop] != -(-end // chunk_frames) * chunk_frames:
            problems.append(f"{split}/offsets: block {b} ends at frame {end}, the next starts at "
                            f"{offsets[stop]}, not at the next chunk boundary ({chunk_frames} frames)")
    order = sorted(range(n), key=lambda i: (lengths[i], ids[i]))
    if order != list(range(n)):
        problems.append(f"{split}: utterances are not in store order (by length, then id)")
    if not np.isin(done, (0, 1, 2)).all():
        problems.append(f"{split}/done: values other than 0, 1 and 2")
    pending[split] = {int(b) for b in np.flatnonzero(done == PENDING)}
    if pending[split]:
        sizes = blocks[:, 1] - blocks[:, 0]
        report.incomplete.append(split)
        problems.append(f"{split}: incomplete: {len(pending[split])} of {len(blocks)} blocks "
                        f"({int(sizes[done == PENDING].sum())} of {n} utterances) not extracted yet; "
                        f"{store.resume_hint()}")
    for b in np.flatnonzero(done == DONE_WITH_FAILURES):
        # Written before the marker: without it, which utterances are not features is unknown.
        start, stop = blocks[b]
        try:
            record = group[f"{FAILED_GROUP}/{b}"].attrs.asdict().get("utterances")
        except Exception:
            record = None
        if not (isinstance(record, list) and record and all(
                isinstance(u, dict) and u.get("id") in ids[start:stop] for u in record)):
            problems.append(f"{split}/{FAILED_GROUP}/{b}: block {b} is marked done with utterances "
                            f"that failed to decode, but their record is missing or invalid")
            report._damaged(split, int(b))
    n_rows = int(offsets[-1])
    for layer, dim in store.layers.items():
        array = _member(group, split, layer, problems)
        if array is None:
            continue
        if array.shape != (n_rows, dim) or str(array.dtype) != store.dtype or array.chunks != (chunk_frames, dim):
            problems.append(f"{split}/{layer}: shape {array.shape} dtype {array.dtype} chunks "
                            f"{array.chunks}, want ({n_rows}, {dim}) {store.dtype} ({chunk_frames}, {dim})")
            continue
        scales = _scale_array(group, split, layer, store.dtype, (n_rows // chunk_frames, dim), problems)
        if scales is False:
            continue
        for b, (start, stop) in enumerate(blocks):
            if done[b]:
                first = int(offsets[start]) // chunk_frames
                last = -(-int(offsets[start] + lengths[start:stop].sum()) // chunk_frames)
                if _read_chunks(array, f"{split}/{layer}", first, last, report) is None:
                    report._damaged(split, b)
                if scales is not None and not _verify_scales(scales, f"{split}/{layer}{SCALE_SUFFIX}",
                                                             first, last, report):
                    report._damaged(split, b)


def _scale_array(group: zarr.Group, split: str, layer: str, dtype: str, shape: tuple[int, int],
                 problems: list[str]) -> zarr.Array | None | bool:
    """An int8 layer's scales (None for a float layer), or False (reported) if they are unusable."""
    if dtype != INT8:
        return None
    name = layer + SCALE_SUFFIX
    array = _member(group, split, name, problems)
    if array is None:
        return False
    if array.shape != shape or str(array.dtype) != SCALE_DTYPE or array.chunks != (1, shape[1]):
        problems.append(f"{split}/{name}: shape {array.shape} dtype {array.dtype} chunks {array.chunks}, "
                        f"want {shape} {SCALE_DTYPE} (1, {shape[1]})")
        return False
    return array


def _verify_scales(array: zarr.Array, name: str, first: int, last: int, report: VerifyReport) -> bool:
    """The scales of chunks first..last-1 exist, decode, and are finite and >= 0."""
    values = _read_chunks(array, name, first, last, report)
    if values is None:
        return False
    bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0)).all(axis=1))
    for c in bad:
        report.problems.append(f"{name} chunk {first + c}: scales that are negative, NaN or infinite")
    return not len(bad)


def _member(group: zarr.Group, split: str, name: str, problems: list[str]) -> zarr.Array | None:
    try:
        return group[name]
    except KeyError:
        problems.append(f"{split}/{name}: array is missing")
    except Exception as e:  # unreadable metadata
        problems.append(f"{split}/{name}: array metadata is unreadable ({e})")
    return None


def _read_chunkwise(array: zarr.Array, name: str, report: VerifyReport) -> np.ndarray | None:
    """The whole array, reporting each chunk that is missing or fails; None if any did (but for
    the arrays whose chunks may be absent, MAY_BE_ABSENT)."""
    n_chunks = array.nchunks if array.ndim else 1
    report.chunks_checked += n_chunks
    if array.ndim and array.shape[0] and name.rsplit("/", 1)[-1] not in MAY_BE_ABSENT:
        missing = missing_chunks(array, range(-(-array.shape[0] // array.chunks[0])))
        for c in missing:
            report.problems.append(f"{name} chunk {c}: missing")
        if missing:
            return None
    try:
        return array[...]
    except Exception:
        pass
    step = array.chunks[0]
    for c in range(-(-array.shape[0] // step)):
        try:
            array[c * step: (c + 1) * step]
        except Exception as e:
            report.problems.append(f"{name} chunk {c}: checksum mismatch or unreadable ({e})")
    return None


def _read_markers(array: zarr.Array, split: str, report: VerifyReport) -> np.ndarray:
    """The done markers one by one (one chunk per block), after reading them whole failed.

    A marker whose chunk fails (already reported) says nothing about its block: the block counts
    as damaged, and as done so that its chunks are checked too.
    """
    done = np.ones(array.shape, dtype=np.uint8)
    for b in range(array.shape[0]):
        try:
            done[b] = array[b]
        except Exception:
            report._damaged(split, b)
    return done


def _read_chunks(array: zarr.Array, name: str, first: int, last: int, report: VerifyReport) -> np.ndarray | None:
    """Chunks first..last-1 (along frames), which must exist and decode; None (reported) if any does not."""
    step = array.chunks[0]
    missing = missing_chunks(array, range(first, last))
    for c in missing:
        report.problems.append(f"{name} chunk {c}: missing (its block is marked done)")
    intact = not missing
    report.chunks_checked += last - first
    try:
        values = array[first * step: last * step]
        return values if intact else None
    except Exception:
        pass
    for c in range(first, last):
        try:
            array[c * step: (c + 1) * step]
        except Exception as e:
            report.problems.append(f"{name} chunk {c}: checksum mismatch or unreadable ({e})")
    return None


def _key_sizes(store: Any) -> dict[str, int] | None:
    """{key: bytes} of every key under the store, listed once; None where it cannot be listed.

    Plain http(s) has no listing (a server's HTML index is not one to rely on): None there.
    """
    if isinstance(store, LocalStore):
        root = Path(store.root)
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    if isinstance(store, ZipStore):
        if not store._is_open:
            store._sync_open()
        return {i.filename: i.compress_size for i in store._zf.infolist() if not i.is_dir()}
    if isinstance(store, FsspecStore):
        protocols = store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,)
        if set(protocols) & set(HTTP_PROTOCOLS):
            return None
        found = sync(store.fs._find(store.path, withdirs=False, detail=True))
        prefix = store.path.rstrip("/") + "/" if store.path.strip("/") else ""
        return {path.removeprefix(prefix): int(entry.get("size") or 0) for path, entry in found.items()}

    async def list_sizes() -> dict[str, int]:
        return {key: await store.getsize(key) async for key in store.list()}

    return sync(list_sizes())


def _bytes_on_disk(store: FeatureStore) -> dict:
    """Stored bytes per layer (all splits) and in total; None for each where they are unknown."""
    zarr_store, root = store._root.store_path.store, store._root.store_path.path
    try:
        sizes = _key_sizes(zarr_store)
    except (NotImplementedError, OSError, TypeError, ValueError):
        sizes = None
    if sizes is None:
        return {"layers": dict.fromkeys(store.layers), "total": None}
    prefix = f"{root}/" if root else ""
    sizes = {k.removeprefix(prefix): n for k, n in sizes.items() if k.startswith(prefix)}
    layers = dict.fromkeys(store.layers, 0)
    for key, n in sizes.items():
        split, _, rest = key.partition("/")
        layer = rest.partition("/")[0]
        if store.dtype == INT8:
            layer = layer.removesuffix(SCALE_SUFFIX)  # an int8 layer's scales count with it
        if split in store.splits and layer in layers:  # <split>/<layer>/zarr.json and its chunks
            layers[layer] += n
    total = sum(sizes.values())
    if isinstance(zarr_store, ZipStore):
        total = os.path.getsize(zarr_store.path)  # the pack file itself, headers included
    return {"layers": layers, "total": total}


def info(path: Any) -> dict:
    """A JSON-safe summary: splits, sizes, completeness, layers, bytes on disk, provenance.

    Bytes on disk are None (unknown) where the store cannot be listed: plain http(s).
    """
    store = open_store(path)
    try:
        return _info(store)
    finally:
        store.close()


def _info(store: FeatureStore) -> dict:
    verification = store.verification
    damaged = (verification or {}).get("damaged_blocks") or {}
    splits = {}
    for split in store.splits:
        attrs = store.split_attrs(split)
        status = store.status(split)
        try:
            failed = store.failed(split)
        except W2VCacheError:
            failed = []  # a damaged record: `verify` names it
        splits[split] = {
            "utterances": status.n_utterances,
            "frames": attrs.get("n_frames"),
            "hours": attrs.get("hours"),
            "complete": status.complete,
            "damaged_blocks": damaged.get(split, []),
            "blocks": status.n_blocks,
            "blocks_done": status.blocks_done,
            "utterances_done": status.utterances_done,
            "source": attrs.get("source"),
            # left out before extraction, and (reason prefixed) failed to decode during it
            "skipped": attrs.get("skipped", []) + [
                {**u, "reason": f"{FAILED_REASON}: {u['reason']}"} for u in failed],
            "failed": failed,  # also among "utterances": their rows hold no features of them
            "chunk_frames": attrs.get("chunk_frames"),
        }
    meta = store._meta
    return {
        "path": store.path,
        "format_version": meta["format_version"],
        "layers": store.layers,
        "dtype": store.dtype,
        "compression": meta.get("compression"),
        "splits": splits,
        "bytes": _bytes_on_disk(store),
        # None, or the last verification's record of damage: checked, damaged_blocks, problems
        "verification": verification,
        "provenance": store.provenance,
        # None, or the reduced compute dtype's measured error (extract.measure_compute_error)
        "compute_error": _compute_error(store),
    }


def _compute_error(store: FeatureStore) -> dict | None:
    """The error against float32 that the latest extraction run in a reduced compute dtype
    measured on its first batch; None for float32 stores, stores from before w2vcache measured it,
    and stores whose records cannot be listed (plain http)."""
    last = latest(run_records(store, "extract"), lambda r: isinstance((r.get("result") or {}).get("compute_error"), dict))
    return last and last["result"]["compute_error"]
