"""The store's format: version and attribute keys, block and chunk geometry, records and names.

Format constants (what a reader checks), how utterances lie on the frame axis (`plan_blocks`,
`choose_chunk_frames`), the layer codecs, int8 layers and their scales (`quantise`,
`dequantise`), the records the store hands out (SplitPlan, Block, StoredUtterance, SplitStatus),
and the checks of layer/split names and writer shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from zarr.codecs import Crc32cCodec, ZstdCodec

from w2vcache.errors import W2VCacheError

FORMAT_VERSION = 2  # bump when the layout changes; readers refuse stores newer than this
# Float stores keep version 1, which readers since the first know; an int8 store is version 2, so a
# reader that would take its integers for features refuses it instead ("upgrade w2vcache").
FLOAT_FORMAT_VERSION = 1
META_KEY = "w2vcache"  # root attribute: layers, dtype, splits, provenance; written last at creation
CREATING_KEY = "w2vcache_creating"  # root attribute present while a store is being created
# Root attribute present while the last verification found damaged blocks (`verify` writes and
# clears it on a local store): which blocks `verify --repair` must rewrite, and when it was seen.
VERIFICATION_KEY = "w2vcache_verification"
SUBSET_KEY = "subset_of"  # provenance key of a copy: where it came from and what it left out

DTYPES = ("float16", "float32", "int8")
# An int8 layer holds round(x / scale), scale = max |x| / 127 per channel over each chunk of frames,
# in the float32 array <layer>.scale (n_chunks, dim), chunk (1, dim): chunk c's scales are written
# with chunk c, by the same writer. Per-channel scales, not one per frame: W2V layers have a few
# channels far larger than the rest, which a frame's one scale would impose on every channel
# (measured in benchmarks/int8_store.py). Reads decode it to FLOAT_OF_INT8: float32, what consumers
# compute in, exact to scale / 2, and decoded 4x faster than to float16 (numpy's float16 casts are slow).
INT8 = "int8"
INT8_MAX = 127  # symmetric: -127..127, so that 0 is exact and the scale is max / 127
SCALE_SUFFIX = ".scale"
SCALE_DTYPE = "float32"
FLOAT_OF_INT8 = "float32"
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
# Values of a block's done marker. A file that fails to decode midway through extraction keeps its
# rows (laid out at creation) but they hold no features of it: its block is marked DONE_WITH_FAILURES
# once the record <split>/FAILED_GROUP/<block> (attrs["utterances"]: [{id, path, reason}]) exists.
PENDING, DONE, DONE_WITH_FAILURES = 0, 1, 2
FAILED_GROUP = "failed"
FAILED_REASON = "failed to decode during extraction"  # how lists of skipped utterances name them


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


# ----------------------------------------------------------------------------------------------
# Layout helpers


def choose_chunk_frames(layers: Mapping[str, int], dtype: str) -> int:
    """Frames per chunk so that the widest layer's chunk is about CHUNK_BYTES (at most MAX_CHUNK_FRAMES);
    an int8 store's are a float16 store's (float_dtype)."""
    bytes_per_frame = max(layers.values()) * np.dtype(float_dtype(dtype)).itemsize
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


def float_dtype(dtype: str) -> str:
    """The float type a store of `dtype` is made from: its own; for int8, float16. An int8 store is
    the float16 one quantised: the same chunks (so its scales cover a float16 store's chunks), the
    same floats handed to the writer, and so `copy --dtype int8` of a float16 store equals
    extracting int8; an export decodes it to the float16 a plain reader expects."""
    return "float16" if dtype == INT8 else dtype


def feature_dtype(dtype: str) -> str:
    """What reading a layer of a store of `dtype` returns: int8 decodes to float32."""
    return FLOAT_OF_INT8 if dtype == INT8 else dtype


def format_version(dtype: str) -> int:
    return FORMAT_VERSION if dtype == INT8 else FLOAT_FORMAT_VERSION


def quantise(x: np.ndarray, chunk_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole chunks of frames (rows a multiple of chunk_frames, dim) -> (int8 values, float32 scales
    (rows // chunk_frames, dim)): x = q * scale up to scale / 2 per element.

    A channel that is all zero in a chunk gets scale 0 (decodes to 0). Values must be finite
    (the writers refuse NaN and infinity before this)."""
    rows, dim = x.shape
    assert rows % chunk_frames == 0, (rows, chunk_frames)
    chunks = x.reshape(rows // chunk_frames, chunk_frames, dim)
    # max |x| as max(max x, -min x), and the rounding in place: no full-size temporary but q (the
    # writer's hot path; the values are the same as abs().max() and rint()'s).
    peaks = np.abs(np.maximum(chunks.max(axis=1), -chunks.min(axis=1)))  # abs: a column of -0.0 scales by 0.0
    scales = (peaks.astype(np.float32) / np.float32(INT8_MAX)).astype(np.float32)
    divisor = np.where(scales > 0, scales, np.float32(1))[:, None, :]
    q = np.divide(chunks, divisor, dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, -INT8_MAX, INT8_MAX, out=q)  # rounding of max / scale can pass 127 by an ulp
    return q.astype(np.int8).reshape(rows, dim), scales


def dequantise(q: np.ndarray, scales: np.ndarray, first_row: int, chunk_frames: int,
               out: np.ndarray | None = None) -> np.ndarray:
    """Rows first_row.. of an int8 layer (q) as FLOAT_OF_INT8, given the scales of the chunks they
    lie in (scales[0] is chunk first_row // chunk_frames's)."""
    if out is None:
        out = np.empty(q.shape, dtype=FLOAT_OF_INT8)
    c0 = first_row // chunk_frames
    row = 0
    while row < len(q):
        c = (first_row + row) // chunk_frames
        end = min(len(q), (c + 1) * chunk_frames - first_row)
        np.multiply(q[row:end], scales[c - c0], out=out[row:end], dtype=np.float32)
        row = end
    return out


def _layer_codecs(compression: str) -> list:
    if compression == "zstd":
        return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]
    return [Crc32cCodec()]


def _check_name(name: Any, what: str) -> None:
    if (not isinstance(name, str) or not name or "/" in name or name.startswith((".", "__"))
            or name in ("c", "zarr.json")):
        raise W2VCacheError(f"{what} {name!r} is not a valid name (non-empty, no '/', not starting "
                            f"with '.' or '__')")


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
