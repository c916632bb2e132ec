"""The store's format: version and attribute keys, block and chunk geometry, records and names.

Format constants (what a reader checks), how utterances lie on the frame axis (`plan_blocks`,
`choose_chunk_frames`), the layer codecs, the records the store hands out (SplitPlan, Block,
StoredUtterance, SplitStatus), and the checks of layer/split names and writer shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from zarr.codecs import Crc32cCodec, ZstdCodec

from w2vcache.errors import W2VCacheError

FORMAT_VERSION = 1  # bump when the layout changes; readers refuse stores newer than this
META_KEY = "w2vcache"  # root attribute: layers, dtype, splits, provenance; written last at creation
CREATING_KEY = "w2vcache_creating"  # root attribute present while a store is being created
# Root attribute present while the last verification found damaged blocks (`verify` writes and
# clears it on a local store): which blocks `verify --repair` must rewrite, and when it was seen.
VERIFICATION_KEY = "w2vcache_verification"

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
