"""Sharing a store: copy a subset of it, pack it into one zip, export it to HDF5.

Every function reads its source with `open_store`, so the source may be a local directory, any
fsspec URL (s3://, gs://, https://) or a pack; the source is never modified. Each refuses a source
with an incomplete split (reading one would hand out zeros for the blocks not yet extracted) and
records in the result's provenance where it came from and what was left out.

- `copy_store`: a subset (layers, splits) that is itself a complete store with the same layout,
  every chunk decoded (checksum checked) and re-encoded (checksum recomputed), optionally
  converted from float to int8. It writes through `FeatureStore.create`, so it locks its
  destination and resumes after a kill, block by block.
- `pack_store`: one uncompressed zip holding the store's files as they are (stored members can be
  read in place, also over http with range requests). `open_store("x.zip")` reads it.
- `export_hdf5`: one HDF5 file without block padding, for people who use h5py (an int8 store's
  layers decoded to float16).

Packs and exports are written under a temporary name and renamed when complete, so a killed run
never leaves a half file under the final name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
import uuid
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from . import record
from .errors import W2VCacheError
from .layers import choose_layers
from .store import (
    SCALE_SUFFIX,
    FeatureStore,
    SplitPlan,
    local_root,
    open_store,
    pid_alive,
    public_url,
    url_protocol,
    verify,
)
from .store.layout import SUBSET_KEY, float_dtype
from .store.records import RUNS_GROUP, has_records, run_name, run_records, write_run_record

EXPORT_KEY = "exported_from"  # provenance key of an HDF5 export
HDF5_FORMAT = "w2vcache-hdf5"
HDF5_FORMAT_VERSION = 1
# HDF5 layer chunks of about 1 MiB: h5py's default chunk cache holds one, so reading an
# utterance decodes each chunk once (bigger chunks would be re-read for every utterance).
HDF5_CHUNK_BYTES = 2**20
HDF5_WRITE_CACHE = 64 * 2**20  # chunk cache while exporting: block boundaries fall inside chunks
# Zip member timestamps: fixed, so packing the same store twice gives the same member bytes.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
# Split attributes that describe the Zarr layout (blocks, padding) and mean nothing in HDF5.
LAYOUT_ATTRS = ("n_rows", "chunk_frames", "block_chunks", "n_blocks")


@dataclass
class CopyResult:
    source: str
    destination: str
    layers: list[str]
    splits: list[str]
    left_out_layers: list[str]
    left_out_splits: list[str]
    blocks_copied: int  # this run; blocks a previous (killed) run finished are not redone
    blocks_already_done: int
    bytes_copied: int  # feature bytes decoded and written by this run
    runs_copied: int | None  # the source's run records copied; None where it cannot be listed
    seconds: float


@dataclass
class PackResult:
    source: str
    pack: str
    files: int
    bytes: int  # size of the pack file
    chunks_verified: int
    seconds: float


@dataclass
class ExportResult:
    source: str
    file: str
    layers: list[str]
    splits: list[str]
    utterances: int
    frames: int
    bytes: int  # size of the HDF5 file
    seconds: float
    left_out: dict[str, list[str]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Choosing splits (layers: layers.choose_layers)


def choose_splits(spec: str | Sequence[str] | None, available: Sequence[str], where: str) -> list[str]:
    """'all' | 'dev,test-clean' | ['dev'] -> split names of the store, in store order."""
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        return list(available)
    items = [str(s).strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    for name in items:
        if name not in available:
            raise W2VCacheError(f"{where}: the store has no split {name!r}; it has {', '.join(available)}")
    if not items:
        raise W2VCacheError(f"{where}: splits {spec!r} names no split")
    return [name for name in available if name in items]


def _require_complete(store: FeatureStore, splits: Sequence[str], what: str) -> None:
    """Refuse a split with blocks not extracted yet: reading them would give zeros."""
    for split in splits:
        if not store.status(split, refresh=True).complete:
            leave_out = (f"leave split {split} out (--splits)" if what != "pack" else
                         f"pack a copy that leaves split {split} out (`w2vcache copy --splits`)")
            raise W2VCacheError(f"cannot {what} {store.path}: {store.incomplete_message(split)}, "
                                f"then {what} again; or {leave_out}")


# ----------------------------------------------------------------------------------------------
# Provenance


def _subset_record(store: FeatureStore, layers: list[str], splits: list[str]) -> dict:
    """What a copy or export keeps of its source and what it leaves out."""
    out = {
        "source": public_url(store.path),
        "source_layers": list(store.layers),
        "source_splits": store.splits,
        "layers": layers,
        "splits": splits,
        "left_out_layers": [name for name in store.layers if name not in layers],
        "left_out_splits": [name for name in store.splits if name not in splits],
    }
    earlier = store.provenance.get(SUBSET_KEY)
    if earlier is not None:
        out["source_subset_of"] = earlier  # a copy of a copy: the whole chain
    return out


def converted_from(store: FeatureStore) -> str:
    """The dtype a copy's features were converted from (an int8 copy of a float16 store: float16);
    for any other store, its own dtype."""
    return ((store.provenance.get(SUBSET_KEY) or {}).get("converted") or {}).get("from", store.dtype)


def _copy_runs(source: FeatureStore, destination: Path) -> int | None:
    """Copy the source's run records (_runs/<name> attributes) into a local store: how many, or
    None where the source cannot list them (a plain http server without an index page)."""
    records = run_records(source)
    if records is None:
        return None
    for name, attrs in records.items():
        group = zarr.open_group(str(destination), path=f"{RUNS_GROUP}/{name}", mode="a", zarr_format=3)
        if group.attrs.asdict() != attrs:
            group.attrs.put(attrs)
    return len(records)


# ----------------------------------------------------------------------------------------------
# Copy


def copy_store(src: Any, dst: str | os.PathLike, layers: str | Sequence[str | int] | None = None,
               splits: str | Sequence[str] | None = None, progress: bool = True,
               dtype: str | None = None) -> CopyResult:
    """Copy the chosen layers and splits of `src` (any URL) to a new local store at `dst`.

    The copy has the source's layout (chunk and block sizes, dtype, compression), so its blocks
    are the source's blocks: each is read whole, one layer at a time, and written with fresh
    checksums. Its provenance is the source's plus provenance["subset_of"] (source URL, source
    and kept layers and splits, what was left out, when); the source's run records are copied and
    this copy adds its own. Re-running the same copy after a kill finishes it without redoing
    finished blocks; a different copy onto the same destination is refused, saying what differs.

    `dtype` "int8" converts a float store (each chunk quantised as `extract --dtype int8` does it,
    recorded as subset_of["converted"]); None or the source's dtype copies the values as they are.
    """
    started = time.perf_counter()
    dst_label = os.fspath(dst)
    if url_protocol(dst_label) not in (None, "file"):
        raise W2VCacheError(f"copy destination {dst_label}: must be a local directory (the writer's locks "
                            f"live on the local file system); copy to a local directory, then upload "
                            f"it (e.g. `aws s3 sync`, `gsutil -m rsync -r`)")
    if dst_label.rstrip("/").lower().endswith(".zip"):
        raise W2VCacheError(f"copy destination {dst_label}: a copy is a store directory; to make a "
                            f"zip, copy to a directory and pack it with `w2vcache pack`")
    source = open_store(src)
    try:
        where = f"copy from {source.path}"
        if url_protocol(source.path) in (None, "file"):
            src_dir, dst_dir = local_root(source.path).resolve(), local_root(dst).resolve()
            if dst_dir == src_dir:
                raise W2VCacheError(f"{where}: the destination is the source itself")
            if src_dir in dst_dir.parents:  # the copy would become part of the store it copies
                raise W2VCacheError(f"{where}: the destination {dst_label} is inside the source store; "
                                    "choose a directory outside it")
        keep_layers = choose_layers(layers, list(source.layers), where)
        keep_splits = choose_splits(splits, source.splits, where)
        dtype = _copy_dtype(source, dtype, where)
        _require_complete(source, keep_splits, "copy")
        subset = _subset_record(source, keep_layers, keep_splits)
        if dtype != source.dtype:
            subset["converted"] = {"from": source.dtype, "to": dtype}
        subset["copied"] = _earlier_copy_time(dst, subset) or record.now()
        provenance = {**source.provenance, SUBSET_KEY: subset}
        plans = {split: _plan_of(source, split) for split in keep_splits}
        meta = source._meta
        try:
            out = FeatureStore.create(dst, provenance, plans, {k: source.layers[k] for k in keep_layers},
                                      dtype, compression=meta.get("compression", "none"),
                                      chunk_frames=meta["chunk_frames"], block_chunks=meta["block_chunks"])
        except W2VCacheError as e:
            if "already exists with other settings" not in str(e):
                raise
            after = "\n" if "\n" in str(e) else "; "  # after a list of differences, a line of its own
            raise W2VCacheError(f"{e}{after}copy to another directory, or remove {dst_label} to start "
                                f"this copy anew") from None
        with out:
            pending = {split: out.pending_blocks(split) for split in keep_splits}
            already = sum(out.status(s).n_blocks for s in keep_splits) - sum(map(len, pending.values()))
            copied = _copy_blocks(source, out, pending, progress)
            root = local_root(dst)
            runs = _copy_runs(source, root)
            result = CopyResult(
                source=subset["source"], destination=public_url(dst), layers=keep_layers, splits=keep_splits,
                left_out_layers=subset["left_out_layers"], left_out_splits=subset["left_out_splits"],
                blocks_copied=sum(map(len, pending.values())), blocks_already_done=already,
                bytes_copied=copied, runs_copied=runs, seconds=time.perf_counter() - started)
            _record_copy(root, result)
    finally:
        source.close()
    return result


def _copy_dtype(source: FeatureStore, dtype: str | None, where: str) -> str:
    """The copy's dtype: the source's, or int8 from a float store. Nothing else: int8 values are
    all an int8 store has (widening them gains nothing), and float32 to float16 may overflow."""
    if dtype is None or dtype == source.dtype:
        return source.dtype
    if source.dtype == "int8":
        raise W2VCacheError(f"{where}: --dtype {dtype}: the source is int8, and its values are all it "
                            f"holds; copy it as int8, or extract again with --dtype {dtype}")
    if dtype != "int8":
        raise W2VCacheError(f"{where}: --dtype {dtype}: a copy keeps its source's dtype ({source.dtype}) "
                            f"or converts a float store to int8")
    return dtype


def _record_copy(root: Path, result: CopyResult) -> None:
    """This run's record in <store>/_runs/copy-...; a finished copy run again adds none. (A copy of
    a copy also holds its source's copy records: those record another destination.)"""
    here = Path(root).resolve()
    if not result.blocks_copied and has_records(
            root, "copy", lambda r: Path(str((r.get("copy") or {}).get("destination"))).resolve() == here):
        return
    write_run_record(root, "copy", {"copy": asdict(result)})


def _earlier_copy_time(dst: Any, subset: dict) -> str | None:
    """When an interrupted run of this same copy started, so that resuming it keeps that record."""
    try:
        existing = open_store(dst)
    except W2VCacheError:
        return None
    try:
        earlier = existing.provenance.get(SUBSET_KEY)
    finally:
        existing.close()
    if isinstance(earlier, dict) and {k: v for k, v in earlier.items() if k != "copied"} == subset:
        return earlier.get("copied")
    return None


def _plan_of(store: FeatureStore, split: str) -> SplitPlan:
    """The split as `FeatureStore.create` takes it: the same utterances give the same blocks."""
    attrs = store.split_attrs(split)
    index = store._split_index(split)
    utterances = list(zip(index.ids, index.texts, index.paths, (int(n) for n in index.lengths)))
    return SplitPlan(utterances, source=attrs.get("source", ""), skipped=attrs.get("skipped", []))


def _copy_blocks(source: FeatureStore, out: FeatureStore, pending: dict, progress: bool) -> int:
    """Copy every pending block, layer by layer, reading the next layer while writing this one.

    Values go as they are (an int8 store's with its scales), or a float source's are quantised by
    `write_layer` when the copy is int8."""
    itemsize = np.dtype(source.dtype).itemsize
    raw_int8 = source.dtype == out.dtype == "int8"
    jobs = [(block, layer) for split in pending for block in pending[split] for layer in out.layers]
    total = sum(block.n_frames * out.layers[layer] * itemsize for block, layer in jobs)
    bar = tqdm(total=total, desc="copying", unit="B", unit_scale=True, disable=not progress)

    def read(block, layer) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        lo = int(source._split_index(block.split).offsets[block.start])
        if lo != block.frame_offset:  # same plan, same layout: anything else is a bug
            raise RuntimeError(f"{block.split} block {block.index}: source rows start at {lo}, "
                               f"copy's at {block.frame_offset}")
        if raw_int8:  # the block's whole chunks, padding included, and their scales
            chunk = source.chunk_frames(block.split)
            n_chunks = -(-block.n_frames // chunk)
            return (source._read(block.split, layer, slice(lo, lo + n_chunks * chunk)),
                    source._read(block.split, layer + SCALE_SUFFIX, slice(lo // chunk, lo // chunk + n_chunks)))
        return source._read(block.split, layer, slice(lo, lo + block.n_frames))

    try:
        with ThreadPoolExecutor(max_workers=1) as reader:
            ahead = reader.submit(read, *jobs[0]) if jobs else None
            for k, (block, layer) in enumerate(jobs):
                frames = ahead.result()
                if k + 1 < len(jobs):
                    ahead = reader.submit(read, *jobs[k + 1])
                if raw_int8:
                    out._write_int8_layer(block, layer, *frames)
                else:
                    out.write_layer(block, layer, frames)
                if layer == list(out.layers)[-1]:
                    # A source block with utterances that failed to decode keeps its record in the copy.
                    out.mark_done(block, failed=source.failed_in(block.split, block.index))
                bar.update(block.n_frames * out.layers[layer] * itemsize)
    finally:
        bar.close()
    return total


# ----------------------------------------------------------------------------------------------
# Temporary files: written under a hidden name, renamed into place when complete


def _partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")


def _remove_dead_partials(final: Path) -> None:
    """Temporary files that killed runs left beside `final` (same host, process gone)."""
    host = socket.gethostname()
    for path in final.parent.glob(f".{final.name}.*.partial"):
        match = re.fullmatch(rf"\.{re.escape(final.name)}\.(.+)\.(\d+)\.[0-9a-f]+\.partial", path.name)
        if match and match[1] == host and not pid_alive(int(match[2])):
            path.unlink(missing_ok=True)


def _output_file(path: str | os.PathLike, suffixes: tuple[str, ...], what: str, overwrite: bool) -> Path:
    label = os.fspath(path)
    if url_protocol(label) not in (None, "file"):
        raise W2VCacheError(f"{what} {label}: must be a local file; write it locally, then upload it")
    final = Path(label[len("file://"):] if label.startswith("file://") else label)
    if not final.name.lower().endswith(suffixes):
        raise W2VCacheError(f"{what} {label}: the name must end in {' or '.join(suffixes)}")
    if final.exists() and not overwrite:
        raise W2VCacheError(f"{what} {label} already exists; remove it, choose another name, or replace it with --overwrite")
    if not final.parent.is_dir():
        raise W2VCacheError(f"{what} {label}: directory {final.parent} does not exist")
    _remove_dead_partials(final)
    return final


# ----------------------------------------------------------------------------------------------
# Pack


def pack_store(store: Any, file_zip: str | os.PathLike, progress: bool = True, overwrite: bool = False) -> PackResult:
    """Pack a complete store (any URL) into one uncompressed zip that `open_store` reads in place.

    Members are the store's files as they are (ZIP_STORED: features do not compress, and a stored
    member can be read at its offset without unpacking), plus a run record of the packing under
    _runs/. The zip is verified (every chunk's checksum and the layout) before it is renamed into
    place, so `file_zip` is either absent or a complete, verified pack.
    """
    started = time.perf_counter()
    final = _output_file(file_zip, (".zip",), "pack", overwrite)
    source = open_store(store)
    try:
        _require_complete(source, source.splits, "pack")
        keys = _member_keys(source)
        tmp = _partial_path(final)
        try:
            files = _write_zip(source, keys, tmp, progress)
            report = verify(tmp)
            if not report.ok:
                raise W2VCacheError(f"pack {final}: the packed copy of {source.path} does not verify: "
                                    + "; ".join(report.problems[:5]) + "; run `w2vcache verify` on the store")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        source.close()
    return PackResult(source=public_url(source.path), pack=os.fspath(file_zip), files=files,
                      bytes=final.stat().st_size, chunks_verified=report.chunks_checked,
                      seconds=time.perf_counter() - started)


def _member_keys(source: FeatureStore) -> list[str]:
    """Every key of the store to pack: metadata first (root first), then chunks; no lock files."""
    zarr_store, root = source._root.store_path.store, source._root.store_path.path

    async def listing() -> list[str]:
        return [key async for key in zarr_store.list_prefix(f"{root}/" if root else "")]

    try:
        keys = sync(listing())
    except NotImplementedError:
        keys = None
    except Exception as e:  # e.g. a server that cannot be listed
        raise W2VCacheError(f"pack {source.path}: cannot list the store's files ({type(e).__name__}: {e}); "
                            f"pack a local copy (`w2vcache copy`) instead") from None
    if keys is None:
        raise W2VCacheError(f"pack {source.path}: this store cannot be listed; pack a local copy instead")
    prefix = f"{root}/" if root else ""
    keys = [k.removeprefix(prefix) for k in keys]
    keys = [k for k in keys if _packable(k)]
    if "zarr.json" not in keys:
        raise W2VCacheError(f"pack {source.path}: the listing lacks the root zarr.json; pack a local copy instead")
    return sorted(keys, key=lambda k: (not k.endswith("zarr.json"), k.count("/"), k))


def _packable(key: str) -> bool:
    """A plain relative name without hidden parts: not .locks or temporary files, nor a name such as
    ../x, /x or ..\\x that a member of another zip may have (and no zarr key has), which an unzip
    tool could write outside its target."""
    return all(part and not part.startswith(".") and "\\" not in part for part in key.split("/"))


def _write_zip(source: FeatureStore, keys: list[str], tmp: Path, progress: bool) -> int:
    zarr_store, root = source._root.store_path.store, source._root.store_path.path
    prefix = f"{root}/" if root else ""
    local = Path(zarr_store.root) if isinstance(zarr_store, LocalStore) else None
    bar = tqdm(total=len(keys), desc="packing", unit="file", disable=not progress)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key in keys:
                info = zipfile.ZipInfo(key, date_time=ZIP_DATE_TIME)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                if local is not None:
                    data = (local / prefix / key).read_bytes()
                else:
                    buffer = sync(zarr_store.get(prefix + key, default_buffer_prototype()))
                    if buffer is None:
                        raise W2VCacheError(f"pack {source.path}: {key} was listed but cannot be read")
                    data = buffer.to_bytes()
                zf.writestr(info, data)
                bar.update()
            _add_run_record(zf, "_runs/zarr.json" not in keys, {
                "command": record.command_line(), "pack": {"source": public_url(source.path), "files": len(keys)},
                "versions": record.versions(), "finished": record.now()})
    finally:
        bar.close()
    return len(keys)


def _add_run_record(zf: zipfile.ZipFile, with_runs_group: bool, attributes: dict) -> None:
    """A _runs/pack-... group (zarr v3 metadata only) recording the packing inside the pack."""
    def group(attrs: dict) -> bytes:
        return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}, indent=2).encode()

    if with_runs_group:
        zf.writestr(zipfile.ZipInfo(f"{RUNS_GROUP}/zarr.json", date_time=ZIP_DATE_TIME), group({}))
    name = f"{RUNS_GROUP}/{run_name('pack')}/zarr.json"
    zf.writestr(zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME), group(json.loads(json.dumps(attributes, default=str))))


# ----------------------------------------------------------------------------------------------
# HDF5 export


def export_hdf5(store: Any, file_h5: str | os.PathLike, layers: str | Sequence[str | int] | None = None,
                splits: str | Sequence[str] | None = None, progress: bool = True,
                overwrite: bool = False) -> ExportResult:
    """Export the chosen layers and splits of a complete store (any URL) to one HDF5 file.

    Layout (docs/STORE.md): per split a group with ids, texts, paths (variable-length UTF-8),
    lengths, offsets (n+1, into a frame axis WITHOUT block padding: utterance i is
    layer[offsets[i]:offsets[i+1]]) and one (frames, dim) dataset per layer, chunked along frames
    with a fletcher32 checksum. Root attributes "w2vcache" and "provenance" are JSON strings.
    """
    import h5py

    started = time.perf_counter()
    final = _output_file(file_h5, (".h5", ".hdf5"), "HDF5 export", overwrite)
    source = open_store(store)
    try:
        where = f"export of {source.path}"
        keep_layers = choose_layers(layers, list(source.layers), where)
        keep_splits = choose_splits(splits, source.splits, where)
        _require_complete(source, keep_splits, "export")
        subset = {**_subset_record(source, keep_layers, keep_splits), "exported": record.now()}
        provenance = {**source.provenance, EXPORT_KEY: subset}
        dtype = float_dtype(source.dtype)  # int8 decoded: plain h5py readers apply no scales
        if dtype != source.dtype:
            subset["decoded"] = {"from": source.dtype, "to": dtype}
        meta = {"format": HDF5_FORMAT, "format_version": HDF5_FORMAT_VERSION,
                "layers": {k: source.layers[k] for k in keep_layers}, "dtype": dtype,
                "splits": keep_splits, "provenance": provenance}
        itemsize = np.dtype(dtype).itemsize
        total = sum(source.split_attrs(s)["n_frames"] * source.layers[k] * itemsize
                    for s in keep_splits for k in keep_layers)
        tmp = _partial_path(final)
        bar = tqdm(total=total, desc="exporting", unit="B", unit_scale=True, disable=not progress)
        n_utts = n_frames = 0
        try:
            with h5py.File(tmp, "w", rdcc_nbytes=HDF5_WRITE_CACHE) as f:
                f.attrs["w2vcache"] = json.dumps(meta)
                f.attrs["provenance"] = json.dumps(provenance)
                for split in keep_splits:
                    n, frames = _export_split(source, split, keep_layers, f.create_group(split), bar)
                    n_utts, n_frames = n_utts + n, n_frames + frames
            os.replace(tmp, final)
        except (OSError, RuntimeError) as err:
            # HDF5 reports a full disk as a RuntimeError naming the errno; either way the partial
            # file goes, so nothing of the export is kept.
            full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "errno = 28" in str(err)
            if not full:
                raise
            raise W2VCacheError(f"export to {final}: no space left on its disk; the partial file is removed: "
                                f"make room (or choose another disk) and run the export again") from err
        finally:
            bar.close()
            tmp.unlink(missing_ok=True)
    finally:
        source.close()
    return ExportResult(source=subset["source"], file=os.fspath(file_h5), layers=keep_layers,
                        splits=keep_splits, utterances=n_utts, frames=n_frames, bytes=final.stat().st_size,
                        seconds=time.perf_counter() - started,
                        left_out={"layers": subset["left_out_layers"], "splits": subset["left_out_splits"]})


def _export_split(source: FeatureStore, split: str, layers: list[str], group: Any, bar: tqdm) -> tuple[int, int]:
    import h5py

    dtype = float_dtype(source.dtype)
    index = source._split_index(split)
    strings = h5py.string_dtype("utf-8")
    for name, values in (("ids", index.ids), ("texts", index.texts), ("paths", index.paths)):
        group.create_dataset(name, data=np.array(values, dtype=object), dtype=strings)
    offsets = np.zeros(len(index.ids) + 1, dtype=np.int64)
    np.cumsum(index.lengths, out=offsets[1:])
    group.create_dataset("lengths", data=index.lengths.astype(np.int64))
    group.create_dataset("offsets", data=offsets)
    # Utterances that failed to decode during extraction keep their (silence) rows; say which.
    group.create_dataset("usable", data=source.usable(split).astype(np.uint8))
    group.attrs["failed"] = json.dumps(source.failed(split))
    for key, value in source.split_attrs(split).items():
        if key not in LAYOUT_ATTRS:
            group.attrs[key] = _hdf5_attr(value)
    n_frames = int(offsets[-1])
    for layer in layers:
        dim = source.layers[layer]
        rows = max(1, min(n_frames, HDF5_CHUNK_BYTES // (dim * np.dtype(dtype).itemsize)))
        data = group.create_dataset(layer, shape=(n_frames, dim), dtype=dtype, chunks=(rows, dim),
                                    fletcher32=True)
        data.attrs["dimension_names"] = json.dumps(["frame", "feature"])
        for start, stop in index.blocks:  # whole blocks: each a run of whole chunks of the store
            lo = int(index.offsets[start])
            n = int(offsets[stop] - offsets[start])
            frames = source._read_features(split, layer, lo, lo + n).astype(dtype, copy=False)
            if dtype != source.dtype and not np.isfinite(frames).all():  # an int8 copy of a float32 store
                raise W2VCacheError(
                    f"cannot export {source.path}: {split} {layer} holds values beyond float16's range "
                    f"(from utterance {index.ids[start]} on), which the export's float16 cannot hold; "
                    "export the float32 store it was made from")
            data[offsets[start]: offsets[stop]] = frames
            bar.update(n * dim * np.dtype(dtype).itemsize)
    return len(index.ids), n_frames


def _hdf5_attr(value: Any) -> Any:
    """A split attribute as HDF5 holds it: numbers, strings and booleans as they are; null, lists
    and dicts (skipped, an unknown hours) as JSON strings."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)
