"""Corpus -> frozen W2V -> feature store, once.

The work is cut into the store's blocks (runs of similar-length utterances whose frames start on a
chunk boundary), so resuming after a kill, sharding over workers and marking progress are all the
store's business; this module only fills blocks. Three stages overlap so the model never waits:
a loader thread decodes the next batches' audio, the main thread runs the model, and a writer
thread casts, cuts and writes the features of the batch before.
"""

import contextlib
import functools
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from . import record, text, threads
from .audio import SAMPLE_RATE, SHOWN_BAD, AudioError, BadAudioError, check_corpus, load_audio
from .backbone import CNN_LAYER, Backbone, forward_layers
from .batching import length_batches
from .checkpoints import load_backbone
from .corpus import Corpus
from .errors import W2VCacheError
from .layers import choose_layers, layer_name
from .space import StoreSize, check_space, check_writable, plan_size
from .spread import parse_shard, rank_device
from .store import FeatureStore, SplitPlan, local_root, open_store
from .store.layout import DTYPES, FAILED_REASON, float_dtype
from .store.records import write_run_record

DEFAULT_STORE = "features.zarr"
# tf32: float32 tensors, with matmuls and convolutions on TF32 tensor cores (CUDA only). float32
# means float32 on a GPU too: cuDNN's TF32 convolutions, on by default, are turned off for it.
COMPUTE_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREFETCH_BATCHES = 2  # batches decoded ahead of the model; more only costs memory
# Files of a batch decoded at once, by threads (libsndfile releases the GIL: 2 threads decode the
# bundled FLAC files 1.66x as fast as one on 2 cores). One thread decodes about 3,000x real time,
# about what a GPU's W2V-Base forward takes in; a few keep decoding well ahead of it.
MAX_DECODERS = 4
IN_FLIGHT = 2  # batches handed to the writing thread and not yet in the store


@dataclass
class ExtractConfig:
    model: str = "builtin:tiny"
    store: str = DEFAULT_STORE
    layers: str = "all"  # "all", or indices and ranges: "0,4-8"
    include_cnn: bool = False  # also store the CNN feature encoder's output as layer "cnn"
    dtype: str = "float16"  # how features are stored: float16, float32 or int8 (quantised from float16)
    batch_seconds: float = 64.0  # padded audio per forward pass
    device: str = "cpu"
    # tf32 (CUDA), float16 / bfloat16 autocast (for GPUs; a CPU runs these two too, mostly slower).
    # Its error against float32 is measured on the run's first batch and recorded (ExtractResult.compute_error).
    compute_dtype: str = "float32"
    shard: str | None = None  # "I/N": this worker fills blocks b with b % N == I
    skip_bad: bool = False  # record unusable audio files in the store and go on
    revision: str | None = None  # hub revision of the model
    # Each utterance to zero mean and unit variance before the model (Wav2Vec2FeatureExtractor's
    # do_normalize); None: as the checkpoint's preprocessor_config.json says, True without one.
    normalize: bool | None = None
    # Layer arrays "none" or "zstd" (level 1); None: an existing store's, else "none". Features'
    # mantissas are noise: zstd saved 5.5 % on random-weight W2V-Base and halves read speed.
    compression: str | None = None
    chunk_frames: int | None = None  # store layout overrides (tests, tuning); None: store default
    block_chunks: int | None = None
    threads: int | None = None  # torch's CPU threads; None: chosen per block (threads.py)
    space_check: bool = True  # refuse to start when the store's file system lacks the space it needs


@dataclass
class ExtractResult:
    store: str
    shard: tuple[int, int] | None
    blocks_written: int
    utterances_written: int
    audio_seconds: float
    seconds: float
    skipped: dict[str, list[dict]] = field(default_factory=dict)
    # With a reduced --compute-dtype: its error against float32 on this run's first batch
    # (measure_compute_error); None in float32, or when the run computed nothing.
    compute_error: dict | None = None
    # Where the time went (fill_blocks' STAGES): the largest names what bounds the run.
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def speed(self) -> float:
        """Audio seconds extracted per second of wall time."""
        return self.audio_seconds / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------------------------------------
# Options


def select_layers(spec: str, num_layers: int) -> list[str]:
    """'all' | '8' | '0,4-8' -> the model's layer names, validated against its depth."""
    if "cnn" in str(spec).split(","):
        raise W2VCacheError("--layers: the CNN output is stored with --cnn, not as a layer number")
    return choose_layers(spec, [layer_name(i) for i in range(num_layers + 1)], "--layers", "the model")


def _device(config: ExtractConfig) -> str:
    device = rank_device(config.device)
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise W2VCacheError(f"--compute-dtype {config.compute_dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    if config.compute_dtype == "tf32" and not device.startswith("cuda"):
        raise W2VCacheError(f"--compute-dtype tf32: TF32 is a CUDA tensor-core format; on --device {device} "
                            "choose float32 or bfloat16")
    return device


# ---------------------------------------------------------------------------------------------
# Planning: every utterance's frame count, known from the audio header before any compute


def plan_splits(corpus: Corpus, backbone: Backbone, skip_bad: bool = False, progress: bool = True) -> dict[str, SplitPlan]:
    """Per split, (id, transcript, path, frames) of every usable utterance.

    Every file's header is checked (rate, channels, length) and its last samples read (a
    truncated file fails there), so bad files are found before any compute, all of them in one
    pass: they stop the run with a BadAudioError listing each, or with `skip_bad` are left out and
    recorded in the store, with the utterances the corpus left out while reading (no transcript).
    A file whose middle is corrupt is only found when it is decoded: it is skipped then and
    recorded in the store as failed (see _load_batches).
    """
    usable, bad = check_corpus(corpus.splits, backbone.receptive_field, progress)
    plans = {}
    for split, checked in usable.items():
        plan = SplitPlan([], source=", ".join(corpus.sources.get(split, [])))
        plan.skipped += corpus.skipped.get(split, [])
        plan.skipped += [{"id": uid, "path": path, "reason": reason} for s, uid, path, reason in bad if s == split]
        plan.utterances = [(u.id, u.text, u.path, backbone.num_frames(info.num_samples)) for u, info in checked]
        plans[split] = plan
    if bad and not skip_bad:
        raise BadAudioError(bad, len(corpus))
    for split, plan in plans.items():
        if not plan.utterances:
            raise W2VCacheError(f"split {split}: no usable utterances (all {len(plan.skipped)} were skipped)")
    return plans


def provenance(backbone: Backbone, config: ExtractConfig, layers: list[str]) -> dict:
    """What the store's features are: compared field by field when a run resumes a store."""
    return {
        "model": backbone.describe(),
        "layers": layers,
        "sample_rate": SAMPLE_RATE,
        "frame_rate": backbone.frame_rate,
        "dtype": config.dtype,
        "compute_dtype": config.compute_dtype,
        "vocabulary": list(text.VOCAB),
        "versions": record.versions(),
        "created": record.now(),
    }


# ---------------------------------------------------------------------------------------------
# Filling blocks


def _silence(backbone: Backbone, frames: int) -> np.ndarray:
    """Zeros of the length that gives exactly `frames` frames: what stands in for a file that
    fails to decode, so that its block (laid out for that many frames) is written all the same."""
    samples = backbone.receptive_field + (frames - 1) * backbone.total_stride
    assert backbone.num_frames(samples) == frames, (samples, frames)
    return np.zeros(samples, dtype=np.float32)


def _load_batches(blocks, backbone: Backbone, max_frames: int, out: queue.Queue, stop: threading.Event):
    """Loader thread: (block, batch slice, waves, failures) for every batch, in store order; then None.

    Batches are formed from the frame counts the store already holds (a frame is one hop of
    audio), so no audio header is read twice. A file that passed the checks before extraction but
    fails to decode now (corrupt in the middle, or gone) must not stop a long run: it is replaced
    by silence of its planned length and listed in `failures` ({id, path, reason}), which the
    block's done marker records, so readers leave it out."""
    def load(block, i: int):
        try:
            return load_audio(block.paths[i], backbone.receptive_field), None
        except AudioError as err:
            return _silence(backbone, block.lengths[i]), {"id": block.ids[i], "path": block.paths[i], "reason": err.reason}

    try:
        with ThreadPoolExecutor(max_workers=min(MAX_DECODERS, threads.available_cores()),
                                thread_name_prefix="w2vcache-decode") as decoders:
            for block in blocks:
                for batch in length_batches(block.lengths, max_frames):
                    loaded = list(decoders.map(functools.partial(load, block), range(batch.start, batch.stop)))
                    waves, failures = [w for w, _ in loaded], [f for _, f in loaded if f is not None]
                    if not _put(out, (block, batch, waves, failures), stop):
                        return
        _put(out, None, stop)
    except BaseException as err:  # handed to the main thread, which re-raises it
        _put(out, err, stop)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless the main thread has stopped listening (it failed): never block for ever."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


# fill_blocks' record of where its time went, in seconds. The loop's thread waits for decoded
# audio, runs the model (on a GPU: queues its work and the copies back) and waits for the writing
# thread, which waits for the device's copies, then hands the batch to the store (casts, checks,
# copies into chunks, waiting for chunk writes in flight).
STAGES = {
    "waiting_for_audio": "the loop waited for decoded audio",
    "model": "the loop ran the model (on a GPU: queued its work)",
    "copies": "the loop cast the layers and copied them to the host (on a GPU: queued the copies)",
    "waiting_for_writer": "the loop waited for the writing thread",
    "waiting_for_device": "the writing thread waited for the device's results",
    "store": "the writing thread handed features to the store",
}


class _BlockFiller:
    """Writer side: appends each batch's features to its block and marks finished blocks done."""

    def __init__(self, store: FeatureStore, stages: dict[str, float]):
        self.store, self.writer, self.block = store, None, None
        self.failures: list[dict] = []  # the current block's utterances that failed to decode
        self.stages = stages

    def abandon(self):
        """After a failure: stop the unfinished block's writer threads; the block stays pending."""
        if self.writer is not None:
            self.writer.__exit__(W2VCacheError, None, None)

    def add(self, block, batch: slice, features: dict, frames: list[int], ready=None, peaks=None,
            failures=(), slot: "HostSlot | None" = None):
        """`slot`: the host buffer `features` and `peaks` lie in, handed back once they are in the store."""
        t = time.perf_counter()
        try:
            if ready is not None:  # a CUDA event: the host copies of this batch have landed
                ready.synchronize()
            features = {name: x.numpy() for name, x in features.items()}
            t = _lap(self.stages, "waiting_for_device", t)
            self._add(block, batch, features, frames, peaks, failures)
        finally:
            _lap(self.stages, "store", t)
            if slot is not None:
                slot.give_back()

    def _add(self, block, batch: slice, features: dict, frames: list[int], peaks, failures):
        if peaks is not None:
            dtype = float_dtype(self.store.dtype)
            limit = float(np.finfo(dtype).max)
            for name, peak in zip(features, peaks.tolist()):
                if math.isfinite(peak) and peak > limit:
                    raise W2VCacheError(
                        f"{block.split} block {block.index}: {name} features reach {peak:.4g}, beyond "
                        f"{dtype}'s range ({limit:.0f}); extract into a new store with --dtype float32"
                    )
        if block is not self.block:
            self.writer, self.block, self.failures = self.store.block_writer(block), block, []
        # The peaks were checked above: every value is finite and within the store's range.
        self.writer.append_batch({name: [x[b, :n] for b, n in enumerate(frames)] for name, x in features.items()},
                                 checked=peaks is not None and bool(torch.isfinite(peaks).all()))
        self.failures += failures
        if batch.stop == len(block.ids):
            self.writer.close()
            if self.failures:
                self.store.mark_done(block, failed=self.failures)
            else:
                self.store.mark_done(block)
            self.writer = self.block = None


def _lap(stages: dict[str, float], stage: str, since: float) -> float:
    """Add the time since `since` to `stage`; returns now."""
    now = time.perf_counter()
    stages[stage] = stages.get(stage, 0.0) + now - since
    return now


class HostSlot:
    """A host buffer that one batch's layers are copied into, then handed to the writing thread,
    which gives it back once they are in the store: a few of them serve a whole extraction.
    Pinned on a GPU, so that the copies run without blocking the loop. Fresh pinned memory for
    every batch (64 MB for W2V-Base's 13 layers of a 64 s batch) was the suspect when, on an H100,
    the loop spent 7 s of a 13 s extraction with a stand-in model casting and copying."""

    def __init__(self, free: queue.Queue, dtype: torch.dtype, pinned: bool):
        self.free, self.dtype, self.pinned = free, dtype, pinned
        self.values = torch.empty(0, dtype=dtype)
        self.peaks = torch.empty(0, dtype=torch.float32)

    def views(self, shapes: list[torch.Size]) -> list[torch.Tensor]:
        """Views of the buffer of these shapes, end to end; it grows (once, for the longest batch)
        where they need more."""
        need = sum(math.prod(shape) for shape in shapes)
        if self.values.numel() < need:
            self.values = torch.empty(need, dtype=self.dtype, pin_memory=self.pinned)
        out, start = [], 0
        for shape in shapes:
            n = math.prod(shape)
            out.append(self.values[start: start + n].view(shape))
            start += n
        return out

    def peak_view(self, n: int) -> torch.Tensor:
        if self.peaks.numel() < n:
            self.peaks = torch.empty(n, dtype=torch.float32, pin_memory=self.pinned)
        return self.peaks[:n]

    def give_back(self) -> None:
        self.free.put(self)


def host_slots(count: int, dtype: torch.dtype, device: torch.device) -> queue.Queue:
    """`count` HostSlots, in the queue they go back to."""
    free: queue.Queue = queue.Queue()
    for _ in range(count):
        free.put(HostSlot(free, dtype, pinned=device.type == "cuda"))
    return free


def _to_host(outputs: dict[str, torch.Tensor], slot: HostSlot):
    """Cast the layers to the slot's dtype and copy them into it; also each layer's largest
    magnitude before the cast, so that a float16 overflow is named as such rather than as
    infinities. Returns (layers on the host, a CUDA event or None, peaks on the host).

    On a GPU the cast runs there and the copies go to the pinned slot without blocking, so the
    next batch's forward is queued at once; the writing thread waits on the returned event before
    touching the data.
    """
    views = slot.views([t.shape for t in outputs.values()])
    host_peaks = slot.peak_view(len(outputs))
    tensors = list(outputs.values())
    if tensors[0].device.type != "cuda":
        for view, t in zip(views, tensors):
            view.copy_(t)  # cast as it copies
        host_peaks.copy_(torch.stack([_peak(t) for t in tensors]))
        return dict(zip(outputs, views)), None, host_peaks
    # Layers of one shape (all but the CNN's) go stacked: the peaks, the cast and the copy are a
    # call each for them all. A call per layer each waited for the GIL the writing threads share.
    peaks, start = [], 0
    for run in _same_shape_runs(tensors):
        group = torch.stack(run) if len(run) > 1 else run[0][None]
        peaks.append(_peaks(group))
        slot.values[start: start + group.numel()].view(group.shape).copy_(group.to(slot.dtype), non_blocking=True)
        start += group.numel()
    host_peaks.copy_(torch.cat(peaks), non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tensors[0].device))  # the copies' stream: cuda:N's, not the current device's
    return dict(zip(outputs, views)), ready, host_peaks


def _same_shape_runs(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    runs: list[list[torch.Tensor]] = []
    for t in tensors:
        if runs and runs[-1][0].shape == t.shape:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def _peaks(stacked: torch.Tensor) -> torch.Tensor:
    """_peak of each of the stacked tensors (along the first dimension), in one pass: for a GPU.
    A CPU reduces along a dimension 15x slower than over a whole tensor (_peak's)."""
    flat = stacked.detach().reshape(len(stacked), -1)
    try:
        lo, hi = torch.aminmax(flat, dim=1)
    except RuntimeError:  # a torch without aminmax for this dtype and device
        return flat.abs().amax(dim=1).float()
    return torch.maximum(-lo, hi).float()


def _peak(t: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in t (NaN if it holds one), as float32: max(-min, max), one pass and
    no temporary (abs().amax() makes one: 10x slower on a CPU)."""
    try:
        lo, hi = torch.aminmax(t.detach())
    except RuntimeError:  # a torch without aminmax for this dtype and device
        return t.detach().abs().amax().float()
    return torch.maximum(-lo, hi).float()


def frame_errors(reduced: torch.Tensor, reference: torch.Tensor, frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per real frame of a padded batch (padding left out), in float64: the norm of the error
    against the reference, and the reference's norm."""
    mask = torch.arange(reference.shape[1], device=reference.device)[None, :] < torch.tensor(frames, device=reference.device)[:, None]
    a, b = reduced[mask].double(), reference[mask].double()
    return (a - b).norm(dim=-1), b.norm(dim=-1)


def worst_frame(diff: torch.Tensor, norm: torch.Tensor) -> float:
    """The largest per-frame relative error. A frame of (near) zero features would divide by
    nothing: its error counts against the typical frame's norm."""
    floor = max(float(norm.mean()) * 1e-6, torch.finfo(torch.float64).tiny)
    return float((diff / norm.clamp_min(floor)).max())


def relative_errors(reduced: torch.Tensor, reference: torch.Tensor, frames: list[int]) -> dict[str, float]:
    """One layer's error against float32 over the batch's real frames: "rms", the error's norm
    over the reference's norm (all frames together), and "max", the worst frame's. Fractions."""
    diff, norm = frame_errors(reduced, reference, frames)
    return {"rms": float(diff.norm() / norm.norm().clamp_min(torch.finfo(torch.float64).tiny)), "max": worst_frame(diff, norm)}


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls and cuDNN convolutions on or off inside the block (cuDNN's are on by default on
    Ampere and later, so "float32" is not float32 there unless turned off). Through the per-backend
    precision flags where torch has them (2.9 and later): once anyone has set those, reading the
    older allow_tf32 flags raises."""
    if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):
        backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
        before = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            for b, value in zip(backends, before):
                b.fp32_precision = value
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def measure_compute_error(backbone: Backbone, waves, reduced: dict[str, torch.Tensor], frames: list[int],
                          include_cnn: bool, compute_dtype: str, where: dict) -> dict:
    """What a reduced compute dtype costs in accuracy, measured where it is used: the batch just
    computed, run again in float32 (one extra forward, once per run), each stored layer compared.
    Recorded in the run's record and shown by `info`, so a store says how far it is from float32."""
    with tf32(False):  # TF32 would put an error of float16's own order into the reference
        reference, _ = forward_layers(backbone, waves, include_cnn=include_cnn)
    names = backbone.layer_names(include_cnn=include_cnn)
    return {
        "dtype": compute_dtype,
        "against": "float32",
        "measured_on": {**where, "utterances": len(frames), "frames": int(sum(frames))},
        "layers": {name: relative_errors(x, reference[names.index(name)], frames) for name, x in reduced.items()},
    }


def fill_blocks(store: FeatureStore, blocks, backbone: Backbone, layers: list[str], config: ExtractConfig,
                progress: bool = True, measured: dict | None = None,
                stages: dict[str, float] | None = None) -> tuple[int, int, float]:
    """Run the model over `blocks` and write them; returns (blocks, utterances, audio seconds).

    `measured`: with a reduced compute dtype, filled with measure_compute_error's record of the
    first batch. `stages`: filled with the seconds spent in each of STAGES."""
    stages = {} if stages is None else stages
    stages.update({stage: 0.0 for stage in STAGES})
    include_cnn = CNN_LAYER in layers
    names = backbone.layer_names(include_cnn=include_cnn)
    keep = [names.index(name) for name in layers]
    # An int8 store gets float16, quantised by the writer per chunk (its scales span batches).
    store_dtype = getattr(torch, float_dtype(config.dtype))
    compute = COMPUTE_DTYPES[config.compute_dtype]
    device = next(backbone.model.parameters()).device
    max_frames = max(1, int(config.batch_seconds * backbone.frame_rate))
    # Counted in frames (exact integers), shown in hours of audio.
    bar = tqdm(total=sum(n for b in blocks for n in b.lengths), desc="extracting", unit="h audio",
               unit_scale=1 / (backbone.frame_rate * 3600), disable=not progress,
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} h audio [{elapsed}<{remaining}{postfix}]")
    loaded: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    # A slot for each batch the writing thread may hold (IN_FLIGHT) and the one being copied.
    slots = host_slots(IN_FLIGHT + 1, store_dtype, device)
    stop = threading.Event()
    loader = threading.Thread(target=_load_batches, args=(blocks, backbone, max_frames, loaded, stop),
                              daemon=True)
    filler, pending, current_block, used_threads = _BlockFiller(store, stages), [], None, None
    started, seconds_done, utterances = time.perf_counter(), 0.0, 0
    loader.start()
    try:
        with ThreadPoolExecutor(max_workers=1) as writer:
            while True:
                t = time.perf_counter()
                item = loaded.get()
                t = _lap(stages, "waiting_for_audio", t)
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                block, batch, waves, failures = item
                if block is not current_block:  # a neighbour may have started or stopped since the last one
                    current_block, used_threads = block, threads.use(config.threads, backbone.model)
                    t = time.perf_counter()
                with tf32(config.compute_dtype == "tf32"), \
                        torch.autocast(device.type, dtype=compute, enabled=compute is not torch.float32):
                    outputs, frames = forward_layers(backbone, waves, include_cnn=include_cnn)
                kept = {layers[k]: outputs[i] for k, i in enumerate(keep)}
                if measured is not None and config.compute_dtype != "float32" and not measured:
                    measured.update(measure_compute_error(backbone, waves, kept, frames, include_cnn, config.compute_dtype,
                                                          {"split": block.split, "block": block.index,
                                                           "ids": list(block.ids[batch.start:batch.stop])}))
                t = _lap(stages, "model", t)
                slot = slots.get_nowait()  # never empty: the writing thread holds at most IN_FLIGHT
                features, ready, peaks = _to_host(kept, slot)
                t = _lap(stages, "copies", t)
                pending.append(writer.submit(filler.add, block, batch, features, frames, ready, peaks, failures, slot))
                # Bounded memory, and a write error surfaces promptly.
                while len(pending) > IN_FLIGHT:
                    pending.pop(0).result()
                _lap(stages, "waiting_for_writer", t)
                seconds_done += sum(len(w) for w in waves) / SAMPLE_RATE
                utterances += len(waves)
                bar.update(sum(frames))
                bar.set_postfix_str(f"{seconds_done / (time.perf_counter() - started):.1f}x real time, "
                                    f"{used_threads} thread{'s' if used_threads > 1 else ''}")
            t = time.perf_counter()
            for future in pending:
                future.result()
            _lap(stages, "waiting_for_writer", t)
    except BaseException:
        filler.abandon()
        raise
    finally:
        stop.set()
        bar.close()
    return len(blocks), utterances, seconds_done


@dataclass
class _Prepared:
    """What an extraction knows before it writes: the model, the layers and every split's plan."""

    device: str
    shard: tuple[int, int] | None
    backbone: Backbone
    layers: list[str]
    dims: dict[str, int]  # layer -> feature dimension
    plans: dict[str, SplitPlan]


def _prepare(corpus: Corpus, config: ExtractConfig, progress: bool, backbone: Backbone | None) -> _Prepared:
    device = _device(config)
    shard = parse_shard(config.shard)
    if config.dtype not in DTYPES:
        raise W2VCacheError(f"--dtype {config.dtype!r}: choose one of {', '.join(DTYPES)}")
    if backbone is None:
        backbone = load_backbone(config.model, device=device, revision=config.revision, normalize=config.normalize)
    elif config.normalize is not None and config.normalize != backbone.normalize:
        backbone = replace(backbone, normalize=config.normalize)
    layers = select_layers(config.layers, backbone.num_layers)
    if config.include_cnn:
        layers = [CNN_LAYER, *layers]
    try:
        plans = plan_splits(corpus, backbone, config.skip_bad, progress)
    except BadAudioError as err:
        if len(err.bad) <= SHOWN_BAD:
            raise
        store = local_root(config.store)
        raise err.write_listing(store.with_name(store.name + ".bad-audio.tsv")) from None
    dims = {name: backbone.config.conv_dim[-1] if name == CNN_LAYER else backbone.hidden_size for name in layers}
    return _Prepared(device, shard, backbone, layers, dims, plans)


def _size(prepared: _Prepared, config: ExtractConfig) -> StoreSize:
    size = plan_size(config.store, prepared.plans, prepared.dims, config.dtype, prepared.backbone.frame_rate,
                     config.chunk_frames, config.block_chunks)
    # What a store already there has done needs no more room: counted as done by its own record,
    # not by its bytes on disk, which the planned size (an estimate) can exceed by its index.
    done = _done_shares(config.store, prepared.plans)
    planned_done = sum(split.bytes * done.get(name, 0.0) for name, split in size.splits.items())
    size.existing = max(size.existing, int(planned_done))
    return size


def _done_shares(store: str, plans: dict) -> dict[str, float]:
    """Of each planned split a store already at `store` holds, the share of utterances done; {} if
    there is none (or none that opens: extract's own checks say why)."""
    if not local_root(store).exists():
        return {}
    try:
        opened = open_store(store)
    except Exception:
        return {}
    try:
        shares = {}
        for split in plans:
            if split in opened.splits:
                status = opened.status(split)
                shares[split] = status.utterances_done / status.n_utterances if status.n_utterances else 1.0
        return shares
    finally:
        opened.close()


def plan_store(corpus: Corpus, config: ExtractConfig = ExtractConfig(), progress: bool = True,
               backbone: Backbone | None = None) -> StoreSize:
    """What extracting `corpus` with `config` would write, and the space there is for it, from the
    audio headers alone (`extract --dry-run`): nothing is written."""
    return _size(_prepare(corpus, config, progress, backbone), config)


def extract(corpus: Corpus, config: ExtractConfig = ExtractConfig(), progress: bool = True,
            backbone: Backbone | None = None) -> ExtractResult:
    """Fill (or resume) the store at config.store with every chosen layer of every utterance.

    `backbone`: an already loaded config.model (a notebook extracting several corpora loads it once).
    Refuses to start when the store's file system has less free space than the store still needs,
    unless `config.space_check` is off.
    """
    started = time.perf_counter()
    try:
        check_writable(config.store)
    except W2VCacheError as error:
        if _complete(config.store):  # a finished store on a read-only mount, extracted again by mistake
            raise W2VCacheError(f"{error}; the store there is complete, every block written: "
                                f"`w2vcache info {config.store}` shows what it holds") from None
        raise
    prepared = _prepare(corpus, config, progress, backbone)
    if config.space_check:
        check_space(_size(prepared, config))
    device, shard, backbone, layers, dims, plans = (
        prepared.device, prepared.shard, prepared.backbone, prepared.layers, prepared.dims, prepared.plans)
    with FeatureStore.create(
        config.store,
        provenance(backbone, config, layers),
        plans,
        layers=dims,
        dtype=config.dtype,
        shard=shard,
        compression=config.compression,
        chunk_frames=config.chunk_frames,
        block_chunks=config.block_chunks,
    ) as store:
        # Audio is read where this run's corpus has it, not at the paths the store recorded: a
        # worker resuming on another machine may mount the corpus elsewhere, and a store made by
        # someone else never points this run at files its maker chose.
        where = {split: {u[0]: u[2] for u in plan.utterances} for split, plan in plans.items()}
        blocks = [replace(b, paths=tuple(where[split][i] for i in b.ids))
                  for split in plans for b in store.pending_blocks(split)]
        measured, stages = {}, {}
        n_blocks, n_utts, audio_seconds = fill_blocks(store, blocks, backbone, layers, config, progress, measured,
                                                      stages)
        # From the store, not this run: a resumed or repeated run reports what earlier runs found.
        for split, plan in plans.items():
            plan.skipped += [{**u, "reason": f"{FAILED_REASON}: {u['reason']}"}
                             for u in store.failed(split, refresh=True)]
    result = ExtractResult(
        store=str(config.store),
        shard=shard,
        blocks_written=n_blocks,
        utterances_written=n_utts,
        audio_seconds=audio_seconds,
        seconds=time.perf_counter() - started,
        skipped={split: plan.skipped for split, plan in plans.items() if plan.skipped},
        compute_error=measured or None,
        stage_seconds={stage: round(s, 3) for stage, s in stages.items()},
    )
    _write_run_record(config, device, result)
    return result


def _complete(store_url: str) -> bool:
    """Whether a store is there with every block of every split written."""
    try:
        store = open_store(store_url)
    except W2VCacheError:
        return False
    return bool(store.splits) and all(store.status(split).complete for split in store.splits)


def _write_run_record(config: ExtractConfig, device: str, result: ExtractResult) -> None:
    """The run's record in the store (store/records.py): what ran, where, and how fast."""
    write_run_record(config.store, "extract", {
        "config": asdict(config),
        "device": device,
        "torch_threads": torch.get_num_threads(),  # the last block's (config.threads: as asked)
        "result": asdict(result) | {"audio_seconds_per_second": result.speed},
    })
