"""Disk planning: what a store will take, from the audio headers alone, against the space there is.

A full study's store is about a hundred gigabytes; finding out that the disk is full after hours
of extraction costs those hours. The planned store's size is known exactly before any compute:
every utterance's frame count comes from its header, and the store's layout (utterances in
length order, blocks padded to chunk boundaries) fixes every row. Only the index arrays
(ids, transcripts, paths) are estimated, and they are small.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import W2VCacheError
from .store import SplitPlan, local_root, plan_blocks
from .store.layout import BLOCK_CHUNKS, choose_chunk_frames

INDEX_BYTES_PER_UTTERANCE = 256  # ids, transcripts, paths, lengths, offsets: a generous average


@dataclass
class SplitSize:
    utterances: int
    hours: float
    frames: int  # frames of audio; the store's rows add the padding up to chunk boundaries
    rows: int
    bytes: int


@dataclass
class StoreSize:
    """A planned store's size, and what its file system can hold."""

    store: str
    splits: dict[str, SplitSize] = field(default_factory=dict)
    existing: int = 0  # bytes already under the store: a resumed extraction needs only the rest
    free: int | None = None  # free bytes on the store's file system
    # The folder the store is (or will be made) in, when this process may not write there (a
    # read-only mount, another user's folder); None when it may.
    unwritable: str | None = None

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.splits.values())

    @property
    def needed(self) -> int:
        return max(0, self.bytes - self.existing)

    @property
    def fits(self) -> bool:
        return self.free is None or self.needed <= self.free


def plan_size(store: str, plans: dict[str, SplitPlan], layers: dict[str, int], dtype: str, frame_rate: float,
              chunk_frames: int | None = None, block_chunks: int | None = None) -> StoreSize:
    """The size of the store `plans` lay out, with `layers` ({name: dim}) stored as `dtype`."""
    chunk_frames = chunk_frames or choose_chunk_frames(layers, dtype)
    block_chunks = block_chunks or BLOCK_CHUNKS
    row_bytes = sum(layers.values()) * np.dtype(dtype).itemsize
    if dtype == "int8":  # and a float32 scale per channel per chunk
        row_bytes += sum(layers.values()) * np.dtype(np.float32).itemsize / chunk_frames
    size = StoreSize(str(store))
    for split, plan in plans.items():
        lengths = sorted(frames for *_, frames in plan.utterances)  # the store's order: by length
        offsets, _ = plan_blocks(lengths, chunk_frames, block_chunks)
        rows = int(offsets[-1])
        size.splits[split] = SplitSize(
            utterances=len(lengths), hours=sum(lengths) / frame_rate / 3600, frames=sum(lengths), rows=rows,
            bytes=int(rows * row_bytes) + len(lengths) * INDEX_BYTES_PER_UTTERANCE,
        )
    root = local_root(store)
    size.existing = _bytes_under(root)
    size.free = _free_bytes(root)
    size.unwritable = unwritable_folder(store)
    return size


def check_space(size: StoreSize) -> None:
    """Refuse to start an extraction its file system cannot hold."""
    if not size.fits:
        raise W2VCacheError(
            f"store {size.store} needs {human_size(size.needed)} more"
            + (f" (of {human_size(size.bytes)} in all)" if size.existing else "")
            + f", and its file system has {human_size(size.free)} free; make room, choose fewer layers "
            "(--layers) or another disk, or pass --no-space-check to start anyway"
        )


def unwritable_folder(store: str) -> str | None:
    """The folder a local store is (or would be made) in, if this process may not write there (a
    read-only mount, another user's folder); else None."""
    folder = _nearest_folder(local_root(store))
    return str(folder) if folder is not None and not os.access(folder, os.W_OK) else None


def check_writable(store: str) -> None:
    """Refuse, before any work, a store this process cannot write."""
    folder = unwritable_folder(store)
    if folder:
        raise W2VCacheError(f"store {store}: cannot write in {folder} (a read-only file system, or no "
                            "permission), where extraction keeps its locks and features; choose another --store "
                            "(a finished store there is read as it is: info, probe)")


def _bytes_under(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:  # a file another writer just replaced
                pass
    return total


def _free_bytes(root: Path) -> int | None:
    """Free bytes of the file system the store is (or will be) on: its nearest existing folder's."""
    folder = _nearest_folder(root)
    return shutil.disk_usage(folder).free if folder is not None else None


def _nearest_folder(root: Path) -> Path | None:
    """The store's folder, or the nearest existing one above it (where it will be made)."""
    for folder in (root, *root.absolute().parents):
        if folder.exists():
            return folder
    return None


def human_size(n: int | None) -> str:
    """Bytes in decimal units: 1536 -> '1.5 KB'; None (unknown) -> '?'."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
