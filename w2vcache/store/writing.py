"""Writing a block's features: `BlockWriter` takes the block's utterances in order, a batch at a
time, and writes every layer in whole chunks, many at once, while the next batch comes in.

Why chunks are not all written through zarr's `array[lo:hi] = x`: zarr 3 encodes every chunk (its
crc32c, and a copy of the chunk to append it) on its one event-loop thread, so every writer of a
process shares one core, about 1 GB/s: below a fast disk, and below what a GPU's forward makes. A
chunk of an uncompressed layer is zarr's BytesCodec output (the rows' little-endian bytes) followed
by their crc32c, so here each chunk is filled in a buffer four bytes longer than its rows, its
checksum computed and written into those bytes in the writing thread, and the whole buffer handed
to the zarr store under the chunk's key: the file zarr would write, with no copy. Zarr reads it and
checks its checksum as any other. Compressed (zstd) and int8 layers go through zarr's array.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.codecs.bytes import Endian
from zarr.core.buffer.cpu import Buffer
from zarr.core.sync import sync
from zarr.storage import LocalStore

from w2vcache.errors import W2VCacheError

from .layout import INT8, SCALE_SUFFIX, Block, quantise

if TYPE_CHECKING:
    from .featurestore import FeatureStore

# Threads that cast, check and copy layers into chunks (numpy releases the GIL while it copies),
# and that write chunks, all layers together. Few: each takes the GIL between its copies, and so
# does the extraction loop's thread between the forward's every kernel launch. On an H100 machine
# (16 cores, local disk) 2 + 2 extracted 1,156 s of audio per second against 921 with 8 + 8 (one
# run each); on 2 cores, with an instant stand-in for the model, 1.93-2.11 s against 1.88-2.21 s
# for 1,200 s of audio (three runs each). A store elsewhere than on a local disk waits on each
# write's round trip: more of them in flight.
CONVERT_THREADS = 2
WRITE_THREADS = 2
REMOTE_WRITE_THREADS = 8
CHUNKS_IN_FLIGHT = 2  # a layer's chunks queued or being written before its next one waits: memory is bounded


def writes_directly(array: zarr.Array) -> bool:
    """Whether `array`'s chunks are its rows' bytes then their crc32c, which `encode_chunk` builds."""
    codecs = array.metadata.codecs
    return (sys.byteorder == "little" and len(codecs) == 2 and isinstance(codecs[0], BytesCodec)
            and codecs[0].endian in (None, Endian.little) and isinstance(codecs[1], Crc32cCodec))


class ChunkBuffer:
    """One chunk of one layer: `rows` (chunk_frames, dim) over the front of `raw`, whose last four
    bytes take the rows' checksum."""

    def __init__(self, chunk_frames: int, dim: int, dtype: np.dtype):
        self.raw = np.empty(chunk_frames * dim * dtype.itemsize + 4, dtype=np.uint8)
        self.rows = self.raw[:-4].view(dtype).reshape(chunk_frames, dim)

    def encoded(self) -> Buffer:
        """The chunk as zarr stores it ([BytesCodec little-endian, Crc32cCodec]), in place."""
        self.raw[-4:] = np.array([google_crc32c.value(self.raw[:-4])], dtype="<u4").view(np.uint8)
        return Buffer.from_array_like(self.raw)


def write_chunk(array: zarr.Array, index: int, chunk: ChunkBuffer) -> None:
    """Write chunk `index` (along the frame axis) of a `writes_directly` array, whole."""
    key = f"{array.store_path.path}/{array.metadata.encode_chunk_key((index, 0))}"
    store = array.store_path.store
    if isinstance(store, LocalStore):  # opened for writing: FeatureStore.block_writer refuses a read-only store
        write_file(store.root / key, chunk.encoded())
    else:
        sync(store.set(key, chunk.encoded()))


def write_file(path: Path, data: Buffer) -> None:
    """Write a chunk's file as zarr's LocalStore does (a temporary file renamed into place: a
    reader never sees half a chunk), but in the calling thread, and starting its write to disk.

    In the calling thread: through the store, every chunk of the process passes one event-loop
    thread and then a pool thread. Started: the kernel writes dirty pages back only once they
    fill a tenth of memory or so, which a store on a large machine may never reach before it ends;
    the disk would idle during the extraction and the whole store be written after it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")  # zarr's own temporary name
    try:
        with open(partial, "wb") as f:
            f.write(data.as_buffer_like())
            if hasattr(os, "posix_fadvise"):  # Linux: starts writing the file's pages back, without waiting
                try:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError:  # a file system that refuses the advice writes the file all the same
                    pass
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class _Layer:
    """A layer's chunk being filled, and its chunks on their way to the store."""

    def __init__(self, array: zarr.Array, scales: zarr.Array | None, dim: int, chunk_frames: int, dtype: np.dtype):
        self.array, self.scales, self.dim = array, scales, dim
        self.direct = scales is None and writes_directly(array)
        self.chunk_frames, self.dtype = chunk_frames, dtype
        self.current = ChunkBuffer(chunk_frames, dim, dtype)
        self.filled = 0
        self.writing: deque[Future] = deque()  # oldest first; each returns its buffer for reuse
        self.spare: list[ChunkBuffer] = []
        # A local store has copied a chunk into its file once set() returns; another store (in
        # memory, say) may keep the buffer itself, which must then never be filled again.
        self.reuse = isinstance(array.store_path.store, LocalStore)


class BlockWriter:
    """Collects a block's utterances in order and writes each layer in whole chunks.

    `append_batch` takes consecutive utterances at once (one task per layer: cast, check, copy);
    full chunks are written by other threads while the next batch comes in. Memory is a few chunks
    per layer however long the block is. Use as a context manager: leaving the `with` block
    normally writes the zero-padded last chunk and waits for every write; then call
    `store.mark_done`. An error leaves the block pending: it is never marked done half-written.
    """

    def __init__(self, store: FeatureStore, block: Block):
        self.store, self.block = store, block
        self.chunk_frames = store.chunk_frames(block.split)
        self.layers = store.layers
        dtype = np.dtype(store.feature_dtype)
        self._layers = {
            name: _Layer(store._array(block.split, name),
                         store._array(block.split, name + SCALE_SUFFIX) if store.dtype == INT8 else None,
                         dim, self.chunk_frames, dtype)
            for name, dim in self.layers.items()}
        self._next = 0  # next utterance, relative to the block
        self._frames = 0  # frames of the utterances appended
        self._convert_pool = ThreadPoolExecutor(max_workers=min(CONVERT_THREADS, len(self.layers)),
                                                thread_name_prefix="w2vcache-convert")
        local = all(isinstance(layer.array.store_path.store, LocalStore) for layer in self._layers.values())
        self._write_pool = ThreadPoolExecutor(max_workers=WRITE_THREADS if local else REMOTE_WRITE_THREADS,
                                              thread_name_prefix="w2vcache-write")
        self._closed = self._broken = False

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def _where(self) -> str:
        b = self.block
        return f"store {self.store.path}: {b.split} block {b.index}"

    def append(self, features: Mapping[str, np.ndarray]) -> None:
        """Add the next utterance: features[layer] is (its n_frames, dim) for every layer."""
        self.append_batch({name: [x] for name, x in features.items()})

    def append_batch(self, features: Mapping[str, Sequence[Any]], checked: bool = False) -> None:
        """Add the next utterances: features[layer][k] is (n_frames, dim) of the k-th of them.

        `checked`: the caller has already found every value finite and within the store's dtype
        (extraction does, on the device, before the cast): the store's own pass is skipped."""
        if self._broken or self._closed:
            raise W2VCacheError(f"{self._where()}: this writer {'failed' if self._broken else 'is closed'}; "
                                f"the block stays pending")
        missing = [name for name in self.layers if name not in features]
        extra = [name for name in features if name not in self.layers]
        if missing or extra:
            raise W2VCacheError(f"{self._where()}: utterance {self.block.ids[min(self._next, len(self.block.ids) - 1)]}: "
                                f"features lack layers {missing} / have unknown layers {extra}; "
                                f"the store has {list(self.layers)}")
        count = {len(x) for x in features.values()}
        if len(count) != 1:
            raise W2VCacheError(f"{self._where()}: layers hold different numbers of utterances {sorted(count)}")
        n = count.pop()
        if self._next + n > len(self.block.ids):
            raise W2VCacheError(f"{self._where()}: {n} more utterance(s) given after {self._next}, but the "
                                f"block holds {len(self.block.ids)}")
        # Everything is checked before anything is copied, so a bad utterance leaves the writer
        # as it was; a failure while copying or writing leaves it broken (the block stays pending).
        converted = dict(zip(self.layers, self._convert_pool.map(
            lambda name: [self._convert(name, self._next + k, x, checked) for k, x in enumerate(features[name])],
            self.layers)))
        # Every layer's task ends before this returns, failed or not: none may still be filling
        # (or reading the caller's arrays) while the caller goes on or the writer is abandoned.
        fills = [self._convert_pool.submit(self._fill, name, converted[name]) for name in self.layers]
        wait(fills)
        for fill in fills:
            if fill.exception() is not None:
                self._broken = True
                raise fill.exception()
        self._next += n
        self._frames += sum(int(self.block.lengths[k]) for k in range(self._next - n, self._next))

    def _convert(self, layer: str, k: int, x: Any, checked: bool) -> np.ndarray:
        return convert_features(x, (self.block.lengths[k], self.layers[layer]), self.store.feature_dtype,
                                f"{self._where()}: utterance {self.block.ids[k]}: {layer} features", checked)

    def _fill(self, name: str, utterances: list[np.ndarray]) -> None:
        """Copy one layer's utterances into its chunk, sending each full chunk to be written."""
        layer = self._layers[name]
        chunk = self._chunk_being_filled()
        for x in utterances:
            pos = 0
            while pos < len(x):
                n = min(len(x) - pos, self.chunk_frames - layer.filled)
                layer.current.rows[layer.filled: layer.filled + n] = x[pos: pos + n]
                layer.filled += n
                pos += n
                if layer.filled == self.chunk_frames:
                    self._send(layer, chunk)
                    chunk += 1

    def _chunk_being_filled(self) -> int:
        return (self.block.frame_offset + self._frames) // self.chunk_frames

    def _send(self, layer: _Layer, chunk: int) -> None:
        """Hand the layer's full chunk to a writing thread, and take an empty one; wait first if
        the layer already has CHUNKS_IN_FLIGHT chunks on their way (a write error surfaces here)."""
        while len(layer.writing) >= CHUNKS_IN_FLIGHT:
            done = layer.writing.popleft().result()
            if layer.reuse:
                layer.spare.append(done)
        layer.writing.append(self._write_pool.submit(self._write, layer, chunk, layer.current))
        layer.current = layer.spare.pop() if layer.spare else ChunkBuffer(self.chunk_frames, layer.dim, layer.dtype)
        layer.filled = 0

    def _write(self, layer: _Layer, chunk: int, buffer: ChunkBuffer) -> ChunkBuffer:
        lo, hi = chunk * self.chunk_frames, (chunk + 1) * self.chunk_frames
        try:
            if layer.scales is not None:  # int8: quantised here, with the scales of this chunk
                q, scales = quantise(buffer.rows, self.chunk_frames)
                layer.scales[chunk] = scales[0]
                layer.array[lo:hi] = q
            elif layer.direct:
                write_chunk(layer.array, chunk, buffer)
            else:
                layer.array[lo:hi] = buffer.rows
        except W2VCacheError:
            raise
        except Exception as err:  # a full disk, a lost mount: the block stays pending, the others are kept
            raise W2VCacheError(f"{self._where()}: writing {layer.array.basename} chunk {chunk} failed: {err}; "
                                f"the blocks already done are kept, and running the same command again "
                                f"resumes from this block") from err
        return buffer

    def close(self) -> None:
        """Write every layer's last chunk, zero-padded, and wait until every chunk is written."""
        if self._closed:
            return
        if self._broken:
            self.abandon()
            raise W2VCacheError(f"{self._where()}: a write failed; the block stays pending")
        if self._next != len(self.block.ids):
            self.abandon()
            raise W2VCacheError(f"{self._where()}: only {self._next} of {len(self.block.ids)} "
                                f"utterances were written; the block stays pending")
        try:
            for layer in self._layers.values():
                if layer.filled:
                    layer.current.rows[layer.filled:] = 0  # what the last chunk's padding must hold
                    self._send(layer, self._chunk_being_filled())
            for layer in self._layers.values():
                while layer.writing:
                    layer.writing.popleft().result()
        except BaseException:
            self.abandon()
            raise
        self._shutdown()
        self._closed = True
        self.store._written.add((self.block.split, self.block.index))

    def abandon(self) -> None:
        """After a failure: let the writes in flight end, start no other; the block stays pending."""
        self._broken = True
        for layer in self._layers.values():
            writing = list(layer.writing)
            for future in writing:
                future.cancel()
            wait(writing)
        self._shutdown()

    def _shutdown(self) -> None:
        self._convert_pool.shutdown()
        self._write_pool.shutdown()


def convert_features(x: Any, shape: tuple[int, int], dtype: str, what: str, checked: bool = False) -> np.ndarray:
    """x as `dtype`, refusing a wrong shape, NaN/infinity, and values beyond dtype's range (unless
    `checked`: known finite and within range)."""
    x = np.asarray(x)
    if x.shape != shape:
        raise W2VCacheError(f"{what} have shape {x.shape}, expected {shape} (frames, dim)")
    with np.errstate(over="ignore"):  # overflow is detected below, with a better message
        y = x.astype(dtype, copy=False)
    if not checked and not all_finite(y):
        if not np.isfinite(x).all():
            raise W2VCacheError(f"{what} contain NaN or infinity")
        raise W2VCacheError(f"{what} reach {np.abs(x).max():.4g}, beyond {dtype}'s range; "
                            f"create the store with dtype float32")
    return y


def all_finite(y: np.ndarray) -> bool:
    """No NaN or infinity in y. numpy emulates float16's isfinite (1.4 GB/s on one core, the
    largest cost of writing a store); a float16 is finite unless all its exponent bits are set,
    which integer operations check at 20 GB/s."""
    if y.dtype == np.float16:
        return not ((y.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(y).all())
