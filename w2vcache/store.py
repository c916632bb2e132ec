"""The feature store: every layer of W2V for every utterance, in one Zarr v3 hierarchy.

The store receives plain numpy arrays; it knows nothing about models or audio. `extract.py` plans
the splits (ids, transcripts, audio paths, frame counts), calls `FeatureStore.create`, then fills
the blocks `pending_blocks` hands out. Probes read it with `open_store`, from a local directory,
any fsspec URL (s3://, gs://, https://) or a packed .zip (share.py). docs/STORE.md documents the
layout for people who read it with plain `zarr`.

Layout (one split shown; every array's chunks end in a crc32c checksum that zarr checks on read):

    store.zarr/                  root group, attrs["w2vcache"]: layers, dtype, provenance... (last)
      <split>/                   group, attrs: source, n_utterances, n_frames, hours, ...
        ids, texts, paths        (n,) variable-length UTF-8 strings, utterances sorted by length
        lengths                  (n,) int64 frames per utterance
        offsets                  (n+1,) int64 first frame of each utterance; offsets[n] = n_rows
        blocks                   (n_blocks, 2) int64 [first, end) utterance of each block
        done                     (n_blocks,) uint8, chunk 1: block b's features are all written
        <layer>                  (n_rows, dim) float16/float32, chunked (chunk_frames, dim)
      .locks/                    writer lock files, only while someone writes

Blocks are the unit of work, resume and sharding. Each block starts on a chunk boundary of the
frame axis (the frames between one block's last utterance and the next chunk boundary are zero
padding), so no two blocks share a chunk and writers of different blocks never touch the same file.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, ZipStore

from w2vcache.errors import W2VCacheError

FORMAT_VERSION = 1  # bump when the layout changes; readers refuse stores newer than this
META_KEY = "w2vcache"  # root attribute: layers, dtype, splits, provenance; written last at creation
CREATING_KEY = "w2vcache_creating"  # root attribute present while a store is being created

DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "zstd")
# Measured on random-ish float16 features (docs/STORE.md): zstd saves ~5.5% of the bytes and
# halves read throughput, because the mantissa bits of features are noise. Not worth it by default.
DEFAULT_COMPRESSION = "none"
ZSTD_LEVEL = 1  # levels 1 and 3 compress features equally; 1 is faster
CHUNK_BYTES = 4 * 2**20  # target bytes per layer chunk: ~2730 frames (55 s) of a 768-dim float16 layer
# Narrow layers (small models) would otherwise get chunks of many minutes of audio, and every
# split's tail pads to a whole chunk: 4096 frames (82 s at 50 frames/s) bounds that padding.
MAX_CHUNK_FRAMES = 4096
BLOCK_CHUNKS = 32  # a block holds >= 32 chunks of frames, so padding wastes < 1/32 of a layer
INDEX_CHUNK = 2**20  # elements per chunk of the per-utterance arrays (ids, offsets, ...)

INDEX_ARRAYS = ("ids", "texts", "paths", "lengths", "offsets", "blocks", "done")
# Provenance keys that may differ between the runs that create and resume one store.
VOLATILE_PROVENANCE = ("created", "package_versions", "versions", "host", "command")

LOCK_DIR = ".locks"
HTTP_PROTOCOLS = ("http", "https")  # read-only, and no listing: bytes on disk are unknown there
EXISTS_CONCURRENCY = 10  # chunk-existence checks in flight at once (as zarr's async.concurrency)
# The fsspec package each common protocol needs, for the message when it is not installed.
FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp",
                   "https": "aiohttp", "az": "adlfs", "abfs": "adlfs"}
ALL_LOCK = "all"
CREATE_LOCK = "create"
CREATE_WAIT_S = 600  # how long a creator waits for another live creator before giving up
BREAKER_STALE_S = 30  # a stale-lock breaker older than this was killed mid-way (it takes ms)


# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class SplitPlan:
    """What `create` needs to lay out one split: utterances as (id, text, audio path, n_frames)."""

    utterances: list[tuple[str, str, str, int]]
    source: str = ""  # e.g. "LibriSpeech dev-clean at /data/LibriSpeech/dev-clean"
    skipped: list[dict[str, str]] = field(default_factory=list)  # {id, path, reason}


@dataclass(frozen=True)
class Block:
    """A run of consecutive utterances of one split: the unit of writing, resuming and sharding."""

    split: str
    index: int
    start: int  # first utterance (store order)
    stop: int  # one past the last utterance
    frame_offset: int  # first frame on the layer arrays; a multiple of chunk_frames
    ids: tuple[str, ...] = field(repr=False)
    paths: tuple[str, ...] = field(repr=False)  # source audio, for the extractor
    lengths: tuple[int, ...] = field(repr=False)  # frames per utterance

    @property
    def utterances(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def n_frames(self) -> int:
        return sum(self.lengths)


class StoredUtterance(NamedTuple):
    id: str
    text: str
    length: int  # frames


@dataclass(frozen=True)
class SplitStatus:
    n_blocks: int
    blocks_done: int
    n_utterances: int
    utterances_done: int

    @property
    def complete(self) -> bool:
        return self.blocks_done == self.n_blocks


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)  # each names split/array and chunk at fault
    chunks_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


# ----------------------------------------------------------------------------------------------
# Layout helpers


def choose_chunk_frames(layers: Mapping[str, int], dtype: str) -> int:
    """Frames per chunk so that the widest layer's chunk is about CHUNK_BYTES (at most MAX_CHUNK_FRAMES)."""
    bytes_per_frame = max(layers.values()) * np.dtype(dtype).itemsize
    return max(1, min(MAX_CHUNK_FRAMES, CHUNK_BYTES // bytes_per_frame))


def plan_blocks(lengths: Sequence[int], chunk_frames: int, block_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay utterances (already in store order) end to end, cut into blocks aligned to chunks.

    Returns offsets (n+1,) with offsets[n] the padded length of the frame axis, and blocks
    (n_blocks, 2) of [first, end) utterance indices. A block takes utterances until it holds
    block_chunks * chunk_frames frames, then up to one chunk more if that ends it closer to a chunk
    boundary: the padding up to the boundary is the only waste.
    """
    n = len(lengths)
    min_frames = block_chunks * chunk_frames
    blocks = []
    i = 0
    while i < n:
        start, used = i, 0
        while i < n and used < min_frames:
            used += lengths[i]
            i += 1
        best, best_waste = i, -used % chunk_frames
        more = used
        for j in range(i, n):
            more += lengths[j]
            if not best_waste or more > used + chunk_frames:
                break
            if -more % chunk_frames < best_waste:
                best, best_waste = j + 1, -more % chunk_frames
        i = best
        blocks.append((start, i))
    offsets = np.zeros(n + 1, dtype=np.int64)
    frame = 0
    for start, stop in blocks:
        offsets[start:stop] = frame + np.concatenate([[0], np.cumsum(lengths[start:stop - 1])])
        end = frame + sum(lengths[start:stop])
        frame = -(-end // chunk_frames) * chunk_frames
    offsets[n] = frame
    return offsets, np.array(blocks, dtype=np.int64).reshape(-1, 2)


def _layer_codecs(compression: str) -> list:
    if compression == "zstd":
        return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]
    return [Crc32cCodec()]


def _jsonable(value: Any, what: str) -> Any:
    """value after a JSON round trip (tuples become lists), or W2VCacheError if it has none."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise W2VCacheError(f"{what} must be JSON-serialisable: {e}") from None


def _check_name(name: Any, what: str) -> None:
    if (not isinstance(name, str) or not name or "/" in name or name.startswith((".", "__"))
            or name in ("c", "zarr.json")):
        raise W2VCacheError(f"{what} {name!r} is not a valid name (non-empty, no '/', not starting "
                            f"with '.' or '__')")


def _local_root(path: str | os.PathLike) -> Path:
    """The local directory of a store path; writing needs one (locks live on the file system)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise W2VCacheError(f"store {text}: writing needs a local path (writer locks live on the "
                            f"local file system); write locally and copy the finished store")
    return Path(text)


def _store_label(path_or_store: Any) -> str:
    if isinstance(path_or_store, (str, os.PathLike)):
        return os.fspath(path_or_store)
    return str(path_or_store)


# ----------------------------------------------------------------------------------------------
# Locks: <store>/.locks/<name>.lock holding {pid, host, started, pid_start}


def _pid_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux), to tell a reused pid from the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has finished: not alive


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would signal the process on Windows; assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if Path("/proc").is_dir():
        return _pid_start(pid) is not None
    return True


def _holder_alive(holder: dict) -> bool:
    """False only when the holder is provably dead: same host, and its pid gone or reused."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return False
    started = holder.get("pid_start")
    return started is None or started == _pid_start(pid)


def _shard_of_lock(name: str) -> tuple[int, int] | None:
    """ "shard-i-of-n" -> (i, n); None for any other name."""
    match = re.fullmatch(r"shard-(\d+)-of-(\d+)", name)
    return (int(match[1]), int(match[2])) if match and int(match[2]) > 0 else None


def _locks_conflict(a: str, b: str) -> bool:
    """Whether two writer locks may own a common block (other lock names never conflict)."""
    if a == ALL_LOCK or b == ALL_LOCK:
        return all(name == ALL_LOCK or _shard_of_lock(name) for name in (a, b))
    shard_a, shard_b = _shard_of_lock(a), _shard_of_lock(b)
    if shard_a is None or shard_b is None:
        return False
    (i, n), (j, m) = shard_a, shard_b
    # blocks b with b % n == i and b % m == j exist iff i == j (mod gcd(n, m))
    return (i - j) % math.gcd(n, m) == 0


def _lock_name(shard: tuple[int, int] | None) -> str:
    return ALL_LOCK if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


class _Lock:
    """One held lock file; `release` removes it only if it is still ours."""

    def __init__(self, path: Path, content: bytes):
        self.path, self.content = path, content

    def release(self) -> None:
        try:
            if self.path.read_bytes() == self.content:
                self.path.unlink()
        except FileNotFoundError:
            pass
        try:
            self.path.parent.rmdir()  # leave no .locks behind once nobody writes
        except OSError:
            pass


def _read_holder(path: Path) -> tuple[bytes, dict] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        holder = {}
    return raw, holder if isinstance(holder, dict) else {}


def _busy_message(label: str, holder: dict, lock_path: Path) -> str:
    return (f"store {label} is being written by pid {holder.get('pid')} on host "
            f"{holder.get('host')} since {holder.get('started')} (lock {lock_path.name}); wait "
            f"for it to finish, or if that process is dead on another host delete {lock_path}")


def _break_stale(lock_path: Path, seen: bytes) -> None:
    """Remove a stale lock, unless someone replaced it since we read it.

    A second O_EXCL file serialises breakers, so two processes that both saw the same stale lock
    cannot remove each other's fresh lock.
    """
    breaker = lock_path.with_name(lock_path.name + ".breaking")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            if time.time() - breaker.stat().st_mtime > BREAKER_STALE_S:
                breaker.unlink()
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return
    try:
        current = _read_holder(lock_path)
        if current is not None and current[0] == seen:
            lock_path.unlink()
    finally:
        os.close(fd)
        breaker.unlink(missing_ok=True)


def _try_lock(root: Path, name: str, label: str) -> _Lock | dict:
    """Take lock `name` (taking over a stale one); return it, or the live holder's record."""
    lock_dir = root / LOCK_DIR
    lock_path = lock_dir / f"{name}.lock"
    while True:
        content = json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "pid_start": _pid_start(os.getpid()), "lock": name,
        }).encode()
        lock_dir.mkdir(parents=True, exist_ok=True)
        # Write the record first, then link it into place: the link is atomic and fails if the lock
        # exists, so nobody ever reads a half-written lock.
        tmp = lock_dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_bytes(content)
            os.link(tmp, lock_path)
            return _Lock(lock_path, content)
        except FileExistsError:
            pass
        except FileNotFoundError:
            continue  # a releaser removed the empty .locks directory under us
        finally:
            tmp.unlink(missing_ok=True)
        found = _read_holder(lock_path)
        if found is None:
            continue
        raw, holder = found
        if _holder_alive(holder):
            return holder
        _break_stale(lock_path, raw)


def _acquire_writer_lock(root: Path, shard: tuple[int, int] | None, label: str) -> _Lock:
    name = _lock_name(shard)
    got = _try_lock(root, name, label)
    if isinstance(got, dict):
        raise W2VCacheError(_busy_message(label, got, root / LOCK_DIR / f"{name}.lock"))
    for other in sorted((root / LOCK_DIR).glob("*.lock")):
        other_name = other.name[: -len(".lock")]
        if other_name in (name, CREATE_LOCK) or not _locks_conflict(name, other_name):
            continue
        found = _read_holder(other)
        if found is not None and _holder_alive(found[1]):
            got.release()
            raise W2VCacheError(_busy_message(label, found[1], other))
    return got


def _acquire_create_lock(root: Path, label: str) -> _Lock:
    deadline = time.monotonic() + CREATE_WAIT_S
    while True:
        got = _try_lock(root, CREATE_LOCK, label)
        if isinstance(got, _Lock):
            return got
        if time.monotonic() > deadline:
            raise W2VCacheError(_busy_message(label, got, root / LOCK_DIR / f"{CREATE_LOCK}.lock"))
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------
# Creation


def _sorted_plan(split: str, plan: SplitPlan | Sequence) -> SplitPlan:
    """Validate one split's plan and put its utterances in store order (length, then id)."""
    if not isinstance(plan, SplitPlan):
        plan = SplitPlan(utterances=list(plan))
    if not plan.utterances:
        raise W2VCacheError(f"split {split}: no utterances to store")
    rows = []
    for row in plan.utterances:
        try:
            utt_id, text, path, n_frames = row
        except (TypeError, ValueError):
            raise W2VCacheError(f"split {split}: utterance {row!r} is not (id, text, path, n_frames)") from None
        if not isinstance(utt_id, str) or not utt_id:
            raise W2VCacheError(f"split {split}: utterance id {utt_id!r} is not a non-empty string")
        if not isinstance(text, str) or not isinstance(path, (str, os.PathLike)):
            raise W2VCacheError(f"split {split}: utterance {utt_id}: text and path must be strings")
        if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
            raise W2VCacheError(f"split {split}: utterance {utt_id} has {n_frames!r} frames; an "
                                f"utterance needs at least 1 (skip it and list it in skipped)")
        rows.append((utt_id, text, os.fspath(path), int(n_frames)))
    rows.sort(key=lambda r: (r[3], r[0]))
    ids = sorted(r[0] for r in rows)
    for a, b in zip(ids, ids[1:]):
        if a == b:
            raise W2VCacheError(f"split {split}: utterance id {a} appears twice")
    skipped = _jsonable(list(plan.skipped), f"split {split}: skipped")
    return SplitPlan(utterances=rows, source=str(plan.source), skipped=skipped)


def _root_state(root: Path) -> str:
    """'empty', 'initialised', 'half' (our creation was interrupted) or 'foreign'."""
    if not root.exists():
        return "empty"
    if not root.is_dir():
        return "foreign"
    entries = [e for e in root.iterdir() if e.name != LOCK_DIR]
    if not entries:
        return "empty"
    try:
        attrs = json.loads((root / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return "foreign"
    if META_KEY in attrs:
        return "initialised"
    if CREATING_KEY in attrs:
        return "half"
    return "foreign"


def _wipe(root: Path) -> None:
    """Remove a half-created store, its root zarr.json last: a wipe killed midway is still 'half'."""
    for entry in root.iterdir():
        if entry.name in (LOCK_DIR, "zarr.json"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (root / "zarr.json").unlink(missing_ok=True)


def _write_split(group: zarr.Group, split: str, plan: SplitPlan, layers: Mapping[str, int],
                 dtype: str, compression: str, chunk_frames: int, block_chunks: int,
                 frame_rate: float | None) -> None:
    ids, texts, paths, lengths = zip(*plan.utterances)
    lengths = np.array(lengths, dtype=np.int64)
    offsets, blocks = plan_blocks(lengths, chunk_frames, block_chunks)
    n, n_rows = len(ids), int(offsets[-1])
    n_frames = int(lengths.sum())
    g = group.create_group(split, attributes={
        "source": plan.source,
        "n_utterances": n,
        "n_frames": n_frames,
        "n_rows": n_rows,
        "hours": None if not frame_rate else n_frames / frame_rate / 3600,
        "chunk_frames": chunk_frames,
        "block_chunks": block_chunks,
        "n_blocks": len(blocks),
        "complete": False,
        "skipped": plan.skipped,
    })
    text_codecs = [ZstdCodec(level=3), Crc32cCodec()]
    index_codecs = [Crc32cCodec()]
    for name, values in (("ids", ids), ("texts", texts), ("paths", paths)):
        a = g.create_array(name, shape=(n,), dtype=str, chunks=(min(n, INDEX_CHUNK),),
                           compressors=text_codecs)
        a[:] = np.array(values, dtype=object)
    for name, values in (("lengths", lengths), ("offsets", offsets)):
        a = g.create_array(name, shape=values.shape, dtype="int64",
                           chunks=(min(len(values), INDEX_CHUNK),), compressors=index_codecs, filters=None)
        a[:] = values
    a = g.create_array("blocks", shape=blocks.shape, dtype="int64",
                       chunks=(min(len(blocks), INDEX_CHUNK), 2), compressors=index_codecs, filters=None)
    a[:] = blocks
    # One chunk (one file) per block: marking a block done never rewrites another's marker.
    g.create_array("done", shape=(len(blocks),), dtype="uint8", chunks=(1,), fill_value=0,
                   compressors=index_codecs, filters=None)
    for layer, dim in layers.items():
        g.create_array(layer, shape=(n_rows, dim), dtype=dtype, chunks=(chunk_frames, dim),
                       fill_value=0, compressors=_layer_codecs(compression), filters=None,
                       dimension_names=("frame", "feature"))


def _differences(meta: dict, read_split: Callable, asked: dict,
                 plans: Mapping[str, SplitPlan]) -> list[str]:
    """What differs between an existing store and what `create` was asked for."""
    diffs = []
    for key in ("dtype", "compression", "chunk_frames", "block_chunks"):
        if asked[key] is not None and asked[key] != meta.get(key):
            diffs.append(f"{key}: store has {meta.get(key)}, asked for {asked[key]}")
    have_layers, want_layers = meta["layers"], asked["layers"]
    if set(have_layers) != set(want_layers):
        diffs.append(f"layers: store has {list(have_layers)}, asked for {list(want_layers)}")
    else:
        diffs += [f"dim of {k}: store has {have_layers[k]}, asked for {v}"
                  for k, v in want_layers.items() if have_layers[k] != v]
    have_prov = {k: v for k, v in meta["provenance"].items() if k not in VOLATILE_PROVENANCE}
    want_prov = {k: v for k, v in asked["provenance"].items() if k not in VOLATILE_PROVENANCE}
    diffs += [f"provenance {key}: store has {have}, asked for {want}"
              for key, have, want in _dict_diff(have_prov, want_prov)]
    if set(meta["splits"]) != set(plans):
        diffs.append(f"splits: store has {sorted(meta['splits'])}, asked for {sorted(plans)}")
        return diffs
    for split, plan in plans.items():
        have_ids, have_texts, have_lengths = read_split(split)
        want_ids = [u[0] for u in plan.utterances]
        if have_ids != want_ids:
            only_store = sorted(set(have_ids) - set(want_ids))
            only_asked = sorted(set(want_ids) - set(have_ids))
            if only_store or only_asked:
                diffs.append(f"split {split} utterance ids: store has {len(have_ids)}, asked for "
                             f"{len(want_ids)} ({len(only_store)} only in store, e.g. "
                             f"{only_store[:3]}; {len(only_asked)} only asked for, e.g. {only_asked[:3]})")
                continue
        have = dict(zip(have_ids, zip(have_texts, have_lengths)))
        bad_len = [(u[0], have[u[0]][1], u[3]) for u in plan.utterances if have[u[0]][1] != u[3]]
        if bad_len:
            i, h, w = bad_len[0]
            diffs.append(f"split {split}: {len(bad_len)} utterances have other frame counts "
                         f"(e.g. {i}: store has {h}, asked for {w})")
        bad_text = [u[0] for u in plan.utterances if have[u[0]][0] != u[1]]
        if bad_text:
            diffs.append(f"split {split}: {len(bad_text)} transcripts differ (e.g. {bad_text[0]})")
    return diffs


def _dict_diff(have: Any, want: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, stored value, asked value) for each leaf where two JSON values differ."""
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for key in sorted(set(have) | set(want), key=str):
            if have.get(key, _ABSENT) != want.get(key, _ABSENT):
                out += _dict_diff(have.get(key, _ABSENT), want.get(key, _ABSENT), f"{prefix}{key}.")
        return out
    have, want = ("(absent)" if v is _ABSENT else repr(v) for v in (have, want))
    return [(prefix.rstrip("."), have, want)]


_ABSENT = object()


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
        self.done: np.ndarray = done  # bool (n_blocks,)
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
        root = _local_root(path)
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
            if name in INDEX_ARRAYS:
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
                                        + "; ".join(diffs))
            else:
                if state == "half":
                    _wipe(root)
                _create_layout(root, plans, provenance, layers, dtype,
                               compression or DEFAULT_COMPRESSION,
                               chunk_frames or choose_chunk_frames(layers, dtype),
                               block_chunks or BLOCK_CHUNKS)
        finally:
            create_lock.release()
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
    def layers(self) -> dict[str, int]:
        """Layer name -> feature dimension, in extraction order."""
        return dict(self._meta["layers"])

    @property
    def dtype(self) -> str:
        return self._meta["dtype"]

    def split_attrs(self, split: str) -> dict:
        return self._group(split).attrs.asdict()

    def chunk_frames(self, split: str) -> int:
        return int(self.split_attrs(split)["chunk_frames"])

    def utterances(self, split: str) -> list[StoredUtterance]:
        """Every utterance of the split in store order (by length, then id), done or not."""
        index = self._split_index(split)
        return [StoredUtterance(i, t, int(n)) for i, t, n in zip(index.ids, index.texts, index.lengths)]

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
            if name not in INDEX_ARRAYS and name not in self._meta["layers"]:
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
        """array[selection] (into `out` if given), naming the chunk when a checksum fails."""
        array = self._array(split, name)
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
                                f"mismatch or unreadable chunk ({e}); run `w2vcache verify` and "
                                f"re-extract or re-copy the store") from None

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
            index.done = self._read(split, "done").astype(bool)
        return index

    def _block(self, split: str, b: int) -> Block:
        index = self._split_index(split)
        start, stop = (int(x) for x in index.blocks[b])
        return Block(split=split, index=b, start=start, stop=stop,
                     frame_offset=int(index.offsets[start]), ids=tuple(index.ids[start:stop]),
                     paths=tuple(index.paths[start:stop]), lengths=tuple(int(n) for n in index.lengths[start:stop]))

    def _incomplete_message(self, split: str) -> str:
        s = self.status(split)
        return (f"split {split} of store {self.path} is incomplete: {s.n_blocks - s.blocks_done} "
                f"of {s.n_blocks} blocks ({s.n_utterances - s.utterances_done} of {s.n_utterances} "
                f"utterances) are not extracted yet; re-running extract resumes it")

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
        """Features (frames, dim) of one utterance, given by store position or id."""
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
                                        + self._incomplete_message(split))
        features: dict[int, np.ndarray] = {}
        wanted = sorted(set(positions))
        run_start = 0
        for k in range(1, len(wanted) + 1):
            if k < len(wanted) and wanted[k] == wanted[k - 1] + 1 \
                    and index.block_of[wanted[k]] == index.block_of[wanted[k - 1]]:
                continue  # utterances of one block lie end to end: extend the run
            first, last = wanted[run_start], wanted[k - 1]
            lo = int(index.offsets[first])
            frames = self._read(split, layer, slice(lo, int(index.offsets[last] + index.lengths[last])))
            for i in wanted[run_start:k]:
                s = int(index.offsets[i]) - lo
                features[i] = frames[s: s + int(index.lengths[i])]
            run_start = k
        return [features[i] for i in positions]

    def read_layer(self, split: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """All frames of one layer of a complete split, padding removed.

        Returns (frames (sum of lengths, dim), offsets (n+1,)): utterance i (store order, as in
        `utterances`) is frames[offsets[i]:offsets[i+1]].
        """
        array = self._array(split, layer)
        index = self._split_index(split, refresh=True)
        if not index.done.all():
            raise W2VCacheError(self._incomplete_message(split))
        offsets = np.zeros(len(index.ids) + 1, dtype=np.int64)
        np.cumsum(index.lengths, out=offsets[1:])
        frames = np.empty((int(offsets[-1]), array.shape[1]), dtype=array.dtype)
        for start, stop in index.blocks:
            lo = int(index.offsets[start])
            n = int(offsets[stop] - offsets[start])
            self._read(split, layer, slice(lo, lo + n), out=frames[offsets[start]: offsets[stop]])
        return frames, offsets

    # -- writing ------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._lock is None:
            raise W2VCacheError(f"store {self.path} is open read-only (or closed); open it for "
                                f"writing with FeatureStore.create")

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
            for k in range(len(block.ids)):
                writer.append({layer: x[starts[k]: starts[k + 1]] for layer, x in features.items()})

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
        x = _convert_features(frames, (block.n_frames, self.layers[layer]), self.dtype, where)
        chunk = self.chunk_frames(block.split)
        rows = -(-block.n_frames // chunk) * chunk  # up to the chunk boundary where the next block starts
        padded = np.zeros((rows, x.shape[1]), dtype=self.dtype)
        padded[: block.n_frames] = x
        self._array(block.split, layer)[block.frame_offset: block.frame_offset + rows] = padded
        self._layers_written.setdefault((block.split, block.index), set()).add(layer)

    def mark_done(self, block: Block) -> None:
        """Record that every layer of `block` is written (by `write_block`, a BlockWriter, or
        `write_layer` for each layer)."""
        self._check_writable()
        self._check_block(block)
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
        done = self._array(block.split, "done")
        done[block.index] = 1
        index = self._split_index(block.split)
        index.done[block.index] = True
        if all(index.done[b] for b in range(len(index.done)) if self.owns(b)):
            index = self._split_index(block.split, refresh=True)
            if index.done.all():
                # Every writer that finishes re-checks, so the last one to finish sets the flag;
                # rewriting the same attributes concurrently is harmless (atomic, identical).
                self._group(block.split).update_attributes({"complete": True})

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


class BlockWriter:
    """Collects a block's utterances in order and writes each layer in whole chunks.

    Memory is one chunk per layer however long the block is. Use as a context manager: leaving
    the `with` block normally writes the zero-padded last chunk; then call `store.mark_done`.
    """

    def __init__(self, store: FeatureStore, block: Block):
        self.store, self.block = store, block
        self.chunk_frames = store.chunk_frames(block.split)
        self.layers = store.layers
        self._arrays = {name: store._array(block.split, name) for name in self.layers}
        self._buffers = {name: np.zeros((self.chunk_frames, dim), dtype=store.dtype)
                         for name, dim in self.layers.items()}
        self._filled = 0  # frames in the current chunk buffers
        self._chunk_start = block.frame_offset
        self._next = 0  # next utterance, relative to the block
        self._pool = ThreadPoolExecutor(max_workers=min(8, len(self.layers)))
        self._closed = False

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._pool.shutdown()

    def _where(self) -> str:
        b = self.block
        return f"store {self.store.path}: {b.split} block {b.index}"

    def append(self, features: Mapping[str, np.ndarray]) -> None:
        """Add the next utterance: features[layer] is (its n_frames, dim) for every layer."""
        if self._next >= len(self.block.ids):
            raise W2VCacheError(f"{self._where()}: all {len(self.block.ids)} utterances are "
                                f"already written")
        utt_id, length = self.block.ids[self._next], self.block.lengths[self._next]
        missing = [name for name in self.layers if name not in features]
        extra = [name for name in features if name not in self.layers]
        if missing or extra:
            raise W2VCacheError(f"{self._where()}: utterance {utt_id}: features lack layers "
                                f"{missing} / have unknown layers {extra}; the store has {list(self.layers)}")
        # numpy releases the GIL while casting, so layers convert in parallel
        converted = dict(zip(self.layers, self._pool.map(
            lambda name: self._convert(name, utt_id, length, features[name]), self.layers)))
        pos = 0
        while pos < length:
            n = min(length - pos, self.chunk_frames - self._filled)
            for name, x in converted.items():
                self._buffers[name][self._filled: self._filled + n] = x[pos: pos + n]
            self._filled += n
            pos += n
            if self._filled == self.chunk_frames:
                self._flush()
        self._next += 1

    def _convert(self, layer: str, utt_id: str, length: int, x: Any) -> np.ndarray:
        return _convert_features(x, (length, self.layers[layer]), self.store.dtype,
                                 f"{self._where()}: utterance {utt_id}: {layer} features")

    def _flush(self) -> None:
        """Write the current chunk of every layer: whole chunks only, never read back."""
        lo, hi = self._chunk_start, self._chunk_start + self.chunk_frames

        def write(name: str) -> None:
            self._arrays[name][lo:hi] = self._buffers[name]

        list(self._pool.map(write, self.layers))  # layers in parallel; map re-raises errors
        for buffer in self._buffers.values():
            buffer[:] = 0  # what the last chunk's padding must hold
        self._chunk_start, self._filled = hi, 0

    def close(self) -> None:
        if self._closed:
            return
        if self._next != len(self.block.ids):
            self._pool.shutdown()
            raise W2VCacheError(f"{self._where()}: only {self._next} of {len(self.block.ids)} "
                                f"utterances were written; the block stays pending")
        try:
            if self._filled:
                self._flush()
        finally:
            self._pool.shutdown()
        self._closed = True
        self.store._written.add((self.block.split, self.block.index))


def _convert_features(x: Any, shape: tuple[int, int], dtype: str, what: str) -> np.ndarray:
    """x as `dtype`, refusing a wrong shape, NaN/infinity, and values beyond dtype's range."""
    x = np.asarray(x)
    if x.shape != shape:
        raise W2VCacheError(f"{what} have shape {x.shape}, expected {shape} (frames, dim)")
    with np.errstate(over="ignore"):  # overflow is detected below, with a better message
        y = x.astype(dtype, copy=False)
    if not np.isfinite(y).all():
        if not np.isfinite(x).all():
            raise W2VCacheError(f"{what} contain NaN or infinity")
        raise W2VCacheError(f"{what} reach {np.abs(x).max():.4g}, beyond {dtype}'s range; "
                            f"create the store with dtype float32")
    return y


def _check_shard(shard: Any, label: str) -> tuple[int, int] | None:
    if shard is None:
        return None
    try:
        i, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise W2VCacheError(f"store {label}: shard {shard!r} is not (index, count)") from None
    if not (n >= 1 and 0 <= i < n):
        raise W2VCacheError(f"store {label}: shard {i}/{n} is out of range (0 <= index < count)")
    return i, n


def _create_layout(root: Path, plans: Mapping[str, SplitPlan], provenance: dict,
                   layers: dict[str, int], dtype: str, compression: str, chunk_frames: int,
                   block_chunks: int) -> None:
    """Write a new store; the root's META_KEY attribute, written last, marks it complete."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # Not overwrite=True: zarr would delete the whole directory, our .locks included.
    group = zarr.create_group(str(root), zarr_format=3, overwrite=False,
                              attributes={CREATING_KEY: {"pid": os.getpid(), "started": started}})
    frame_rate = provenance.get("frame_rate")
    frame_rate = frame_rate if isinstance(frame_rate, (int, float)) and frame_rate > 0 else None
    for split, plan in plans.items():
        _write_split(group, split, plan, layers, dtype, compression, chunk_frames, block_chunks, frame_rate)
    group.attrs.put({META_KEY: {
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "dtype": dtype,
        "compression": compression,
        "chunk_frames": chunk_frames,
        "block_chunks": block_chunks,
        "splits": list(plans),
        "provenance": provenance,
    }})


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


# ----------------------------------------------------------------------------------------------
# Opening, verify, info


def _protocol(url: str) -> str | None:
    """'s3' for 's3://bucket/x', the first protocol of a chained URL ('zip::https://...'), or None."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)(::|://)", url)
    return match[1].lower() if match and len(match[1]) > 1 else None  # 'C:\\x' is a path


def _reading_store(path: Any, label: str) -> tuple[Any, bool]:
    """A read-only zarr store for `path`, and whether the caller owns it (must close it).

    Local directories open as a read-only LocalStore, a local zip file (a pack) as a ZipStore,
    anything else with a protocol as a read-only FsspecStore; a remote .zip is read in place
    through fsspec's zip file system (the server must answer range requests).
    """
    if not isinstance(path, str):
        return path, False  # a zarr Store (or StorePath) given by the caller
    protocol = _protocol(path)
    if protocol == "file" and "::" not in path:
        path, protocol = path[len("file://"):], None
    if protocol is None:
        local = Path(path)
        if local.is_file():
            if not zipfile.is_zipfile(local):
                raise W2VCacheError(f"{label} is a file but not a zip pack; a store is a directory, "
                                    f"a .zip made by `w2vcache pack`, or a URL")
            return ZipStore(local, mode="r"), True
        if not local.is_dir():
            raise W2VCacheError(f"no store at {label}")
        return LocalStore(local, read_only=True), True
    if path.rstrip("/").lower().endswith(".zip") and "::" not in path:
        path = f"zip::{path.rstrip('/')}"
    try:
        return FsspecStore.from_url(path, read_only=True), True
    except ImportError as e:
        package = FSSPEC_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise W2VCacheError(f"reading {label} needs {package}: pip install {package} ({e})") from None
    except ValueError as e:
        raise W2VCacheError(f"cannot read {label}: {e}") from None
    except Exception as e:
        if _is_access_error(e):
            raise W2VCacheError(f"cannot read {label}: {type(e).__name__}: {e}") from None
        raise


def _is_access_error(e: Exception) -> bool:
    """An error reaching a store (missing file, network, permission), as opposed to a bug."""
    if isinstance(e, (OSError, zipfile.BadZipFile, asyncio.TimeoutError)):
        return True
    try:
        import aiohttp
    except ImportError:
        return False
    return isinstance(e, aiohttp.ClientError)


def _close_store(store: Any) -> None:
    """Release what opening a store took: a zip file's handle (other stores hold nothing)."""
    if isinstance(store, ZipStore) and store._is_open:
        store.close()


def _open_group(path_or_store: Any, label: str) -> tuple[zarr.Group, Any]:
    """The store's root group opened read-only, and the store object to close (or None)."""
    store, owned = _reading_store(path_or_store, label)
    try:
        return zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False), store if owned else None
    except FileNotFoundError:
        error = f"no store at {label} (no zarr v3 group there: {label}/zarr.json is missing)"
    except zipfile.BadZipFile as e:
        error = f"{label} is not a readable zip pack: {e}"
    except ValueError as e:
        error = f"{label} is not a readable zarr v3 store: {e}"
    except Exception as e:
        if not _is_access_error(e):
            raise
        error = f"cannot read {label}: {type(e).__name__}: {e}"
    if owned:
        _close_store(store)
    raise W2VCacheError(error)


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


def verify(path: Any) -> VerifyReport:
    """Read every chunk of every array (zarr checks each chunk's crc32c) and check the layout."""
    report = VerifyReport(path=_store_label(path))
    try:
        store = open_store(path)
    except W2VCacheError as e:
        report.problems.append(str(e))
        return report
    try:
        for split in store.splits:
            _verify_split(store, split, report)
    finally:
        store.close()
    return report


def _verify_split(store: FeatureStore, split: str, report: VerifyReport) -> None:
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
    if not np.isin(done, (0, 1)).all():
        problems.append(f"{split}/done: values other than 0 and 1")
    pending = int((done == 0).sum())
    if pending:
        sizes = blocks[:, 1] - blocks[:, 0]
        problems.append(f"{split}: incomplete: {pending} of {len(blocks)} blocks "
                        f"({int(sizes[done == 0].sum())} of {n} utterances) not extracted yet; "
                        f"re-running extract resumes it")
    n_rows = int(offsets[-1])
    for layer, dim in store.layers.items():
        array = _member(group, split, layer, problems)
        if array is None:
            continue
        if array.shape != (n_rows, dim) or str(array.dtype) != store.dtype or array.chunks != (chunk_frames, dim):
            problems.append(f"{split}/{layer}: shape {array.shape} dtype {array.dtype} chunks "
                            f"{array.chunks}, want ({n_rows}, {dim}) {store.dtype} ({chunk_frames}, {dim})")
            continue
        for b, (start, stop) in enumerate(blocks):
            if done[b]:
                first = int(offsets[start]) // chunk_frames
                last = -(-int(offsets[start] + lengths[start:stop].sum()) // chunk_frames)
                _verify_chunks(array, f"{split}/{layer}", first, last, report)


def _member(group: zarr.Group, split: str, name: str, problems: list[str]) -> zarr.Array | None:
    try:
        return group[name]
    except KeyError:
        problems.append(f"{split}/{name}: array is missing")
    except Exception as e:  # unreadable metadata
        problems.append(f"{split}/{name}: array metadata is unreadable ({e})")
    return None


def _read_chunkwise(array: zarr.Array, name: str, report: VerifyReport) -> np.ndarray | None:
    """The whole array, reporting each chunk that fails; None if any did."""
    n_chunks = array.nchunks if array.ndim else 1
    report.chunks_checked += n_chunks
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


def _verify_chunks(array: zarr.Array, name: str, first: int, last: int, report: VerifyReport) -> None:
    """Chunks first..last-1 (along frames) must exist and decode."""
    step = array.chunks[0]
    keys = [f"{array.store_path.path}/{array.metadata.encode_chunk_key((c, 0))}" for c in range(first, last)]
    for c, exists in zip(range(first, last), _keys_exist(array.store_path.store, keys)):
        if not exists:
            report.problems.append(f"{name} chunk {c}: missing (its block is marked done)")
    report.chunks_checked += last - first
    try:
        array[first * step: last * step]
        return
    except Exception:
        pass
    for c in range(first, last):
        try:
            array[c * step: (c + 1) * step]
        except Exception as e:
            report.problems.append(f"{name} chunk {c}: checksum mismatch or unreadable ({e})")


def _keys_exist(store: Any, keys: list[str]) -> list[bool]:
    """store.exists for each key, many at once: one request per key on a remote store."""
    async def check_all() -> list[bool]:
        limit = asyncio.Semaphore(EXISTS_CONCURRENCY)

        async def check(key: str) -> bool:
            async with limit:
                return await store.exists(key)

        return await asyncio.gather(*(check(key) for key in keys))

    return sync(check_all())


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
    splits = {}
    for split in store.splits:
        attrs = store.split_attrs(split)
        status = store.status(split)
        splits[split] = {
            "utterances": status.n_utterances,
            "frames": attrs.get("n_frames"),
            "hours": attrs.get("hours"),
            "complete": status.complete,
            "blocks": status.n_blocks,
            "blocks_done": status.blocks_done,
            "utterances_done": status.utterances_done,
            "source": attrs.get("source"),
            "skipped": attrs.get("skipped", []),
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
        "provenance": store.provenance,
    }
