"""Extraction overhead: extraction time against the slower of the bare model forward and the
pipeline alone, on the same audio, in one run.

    python benchmarks/extract_overhead.py [--model builtin:base] [--seconds 120] [--device cpu] [--threads N] [--dir DIR]
    python benchmarks/extract_overhead.py --stand-in [--seconds 3600] [--dir DIR] [--repeats 2]

The audio is the bundled corpus, repeated under new ids where --seconds asks for more than it holds.

Bare: the plain transformers forward (`model(x, output_hidden_states=True)`) over the same
length-sorted batches, outputs discarded, audio already in memory. Pipeline alone: `w2vcache
extract` with the model replaced by an instant stand-in (below). Extraction: `w2vcache extract`'s
whole path (audio decoding, exact per-utterance batching, float16 casts, chunked checksummed
writes) into a fresh store, until it is on disk. Extraction can go no faster than the slower of
the two others; target: extraction / max(bare forward, pipeline alone) at most 1.10. Also prints
extraction / bare forward, and bytes on disk per frame per layer.

--stand-in: the pipeline's own ceiling, on any machine. The model is replaced by an instant
stand-in with the same output shapes (every layer a view of one random float32 tensor made
beforehand: no compute, and no easier to compress than real features), so extraction is bound by
decoding, copies, checksums and writes alone. Printed beside the raw write speed of the same file
system (a file as large as the store written in 64 MB pieces and fsync'ed, as dd with fdatasync),
measured in the same run, alternated with it (--repeats times, each side's best compared: a shared
disk's speed swings). Target: the pipeline writes at least 80 % of that speed. The stores stay until
the end: it needs (repeats + 1) times the store's size free (about 11 GB for 3600 s of W2V-Base).
The stores go under --dir (default: a temporary folder; name a folder on the disk you care about).
"""

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from w2vcache import threads
from w2vcache.audio import SAMPLE_RATE, load_audio
from w2vcache.checkpoints import load_backbone
from w2vcache.batching import length_batches
from w2vcache.corpus import build_corpus
import w2vcache.extract
from w2vcache.backbone import forward_layers
from w2vcache.extract import ExtractConfig, extract, plan_splits, tf32
from w2vcache.store import writing
from w2vcache.store import info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--seconds", type=float, help="audio to use (default 120; 3600 with --stand-in): the bundled "
                        "corpus, repeated under new ids where it holds less")
    parser.add_argument("--batch-seconds", type=float, default=64.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: w2vcache's choice, for both sides)")
    parser.add_argument("--stand-in", action="store_true", help="an instant stand-in for the model: the pipeline's ceiling")
    parser.add_argument("--dir", help="where the store is written (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=2, help="--stand-in: alternated runs of the raw write and "
                        "the pipeline, each side's best compared")
    parser.add_argument("--variants", action="store_true", help="also time the extraction with more writing "
                        "threads and with a shorter GIL switch interval (what bounds the loop's thread)")
    args = parser.parse_args()
    if args.stand_in:
        return stand_in(args)
    if args.seconds is None:
        args.seconds = 120.0

    corpus, total = bench_corpus(args.seconds)
    chosen = corpus.splits["bench"]
    backbone = load_backbone(args.model, device=args.device)
    model = backbone.model
    print(f"model {args.model}, {len(chosen)} utterances, {total:.1f} s of audio, device {args.device}, "
          f"torch threads {threads.use(args.threads, model)}")
    waves = sorted((load_audio(u.path) for u in chosen), key=len)
    batches = length_batches([len(w) for w in waves], int(args.batch_seconds * SAMPLE_RATE))

    def bare():
        with torch.inference_mode(), tf32(False):  # float32 as extraction's is: no TF32 convolutions
            for b in batches:
                group = waves[b]
                x = torch.zeros(len(group), max(len(w) for w in group))
                for i, w in enumerate(group):
                    x[i, : len(w)] = torch.from_numpy(w)
                model(x.to(args.device), output_hidden_states=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def exact():  # w2vcache's own forward: every utterance exactly as alone, all layers kept on the device
        with tf32(False):
            for b in batches:
                forward_layers(backbone, waves[b])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    timings = {}
    for name, run in (("bare", bare), ("exact", exact)):
        run()  # warm-up: allocator, kernels
        t = time.perf_counter()
        run()
        timings[name] = time.perf_counter() - t
    bare_s, exact_s = timings["bare"], timings["exact"]
    waves.clear()  # the extractions read the files themselves

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = Path(tmp) / "bench.zarr"
        config = ExtractConfig(model=args.model, store=str(store), batch_seconds=args.batch_seconds, device=args.device,
                               threads=args.threads)
        stand_in_forward = instant_forward(backbone, corpus, args.batch_seconds)
        for forward in (stand_in_forward, None):
            warm_up(corpus, config, backbone, forward)
        ceiling_s, _, ceiling_stages = timed_extraction(corpus, replace(config, store=str(Path(tmp) / "stand-in.zarr")), backbone,
                                        forward=stand_in_forward)
        extract_s, written, stages = timed_extraction(corpus, config, backbone)
        variants = run_variants(corpus, config, backbone, Path(tmp)) if args.variants else []
        about = info(store)
        frames = about["splits"]["bench"]["frames"]
        per_layer = sum(about["bytes"]["layers"].values()) / len(about["layers"]) / frames
        chunk = about["splits"]["bench"]["chunk_frames"]
        # A full chunk holds chunk_frames frames plus a 4-byte checksum; a split's last chunk is
        # padded, which small benchmark stores over-weight.
        steady = (chunk * backbone.hidden_size * 2 + 4) / chunk

    print(f"bare forward   {bare_s:8.2f} s  ({total / bare_s:7.1f} s audio / s)")
    print(f"exact forward  {exact_s:8.2f} s  ({total / exact_s:7.1f} s audio / s: w2vcache's forward, each utterance "
          f"exactly as alone, layers left on the device)")
    print(f"pipeline alone {ceiling_s:8.2f} s  ({total / ceiling_s:7.1f} s audio / s: the same extraction with an "
          f"instant stand-in model)")
    print(f"extraction     {extract_s:8.2f} s  ({total / extract_s:7.1f} s audio / s, {written / extract_s / 1e6:.0f} MB/s; "
          f"audio checks and decoding included, model loaded before, fsync'ed)")
    print(f"  where its time went: {stages_line(stages)}")
    print(f"  (pipeline alone: {stages_line(ceiling_stages)})")
    for label, seconds, spent in variants:
        print(f"extraction, {label}: {seconds:.2f} s ({total / seconds:.1f} s audio / s); {stages_line(spent)}")
    print(f"ratio exact forward / bare forward: {exact_s / bare_s:.3f}")
    print(f"ratio extraction / bare forward: {extract_s / bare_s:.3f}")
    print(f"ratio extraction / max(exact forward, pipeline alone): {extract_s / max(exact_s, ceiling_s):.3f}")
    print(f"ratio extraction / max(bare forward, pipeline alone): {extract_s / max(bare_s, ceiling_s):.3f}  "
          f"(target <= 1.10; the slower of the two is {'the model' if bare_s >= ceiling_s else 'the pipeline'})")
    print(f"bytes on disk per frame per layer: {steady:.1f} in full chunks "
          f"({steady * backbone.frame_rate * 3600 / 1e6:.1f} MB per hour of audio per layer); "
          f"{per_layer:.1f} in this small store, whose last chunk is mostly padding")


def run_variants(corpus, config: ExtractConfig, backbone, tmp: Path) -> list[tuple[str, float, dict]]:
    """The same extraction with more of the store's writing threads, with the interpreter switching
    threads ten times as often, and with torch's CPU threads on every core: does the loop's
    thread wait for the GIL, or for OpenMP threads, while the others decode and write?"""
    threads_before, interval_before = (writing.CONVERT_THREADS, writing.WRITE_THREADS), sys.getswitchinterval()
    variants = [("8 convert + 8 write threads", config, lambda: setattr(writing, "CONVERT_THREADS", 8) or
                 setattr(writing, "WRITE_THREADS", 8)),
                ("GIL switch interval 0.5 ms", config, lambda: sys.setswitchinterval(0.0005)),
                (f"torch threads {os.cpu_count()}", replace(config, threads=os.cpu_count()), lambda: None)]
    results = []
    for i, (label, changed, setup) in enumerate(variants):
        setup()
        try:
            where = replace(changed, store=str(tmp / f"variant-{i}.zarr"))
            seconds, _, spent = timed_extraction(corpus, where, backbone)
            results.append((label, seconds, spent))
            shutil.rmtree(where.store)
        finally:
            writing.CONVERT_THREADS, writing.WRITE_THREADS = threads_before
            sys.setswitchinterval(interval_before)
    return results


def warm_up(corpus, config: ExtractConfig, backbone, forward=None) -> None:
    """An extraction of a few utterances beside config.store, so that first-use costs (imports,
    thread pools, CUDA's pinned buffers) fall on no timed run."""
    warm = copy.copy(corpus)
    warm.splits = {split: utterances[:8] for split, utterances in corpus.splits.items()}
    where = Path(config.store).with_name(f"warm-up-{'stand-in' if forward else 'model'}.zarr")
    timed_extraction(warm, replace(config, store=str(where)), backbone, forward=forward)


def timed_extraction(corpus, config: ExtractConfig, backbone, forward=None) -> tuple[float, int, dict]:
    """Seconds to extract `corpus` into config.store, until it is on disk (the page cache would
    flatter it), the bytes written and the run's stage_seconds; `forward` (instant_forward's) in
    place of the model's."""
    model_forward = w2vcache.extract.forward_layers
    if forward is not None:
        w2vcache.extract.forward_layers = forward
    try:
        os.sync()
        t = time.perf_counter()
        result = extract(corpus, config, progress=False, backbone=backbone)
        os.sync()
        seconds = time.perf_counter() - t
    finally:
        w2vcache.extract.forward_layers = model_forward
    return seconds, sum(f.stat().st_size for f in Path(config.store).rglob("*") if f.is_file()), result.stage_seconds


def stages_line(stages: dict) -> str:
    """extract's stage_seconds, largest first: what bounds it."""
    return ", ".join(f"{stage.replace('_', ' ')} {s:.2f} s" for stage, s in sorted(stages.items(), key=lambda i: -i[1]))


def instant_forward(backbone, corpus, batch_seconds: float):
    """forward_layers' stand-in for `corpus`'s batches: every layer a (batch, frames, dim) float32
    view of one random tensor made beforehand on the model's device (no compute, and no easier to
    compress than real features), contiguous as the model's outputs are, so that the device's path
    (casts, copies to pinned memory, events) is the real one. It holds a padded batch, or the
    longest utterance (one longer than a batch is a batch of its own)."""
    longest = max(frames for plan in plan_splits(corpus, backbone, progress=False).values()
                  for _, _, _, frames in plan.utterances)
    names = backbone.layer_names()
    device = next(backbone.model.parameters()).device
    rows = int(max(longest, batch_seconds * backbone.frame_rate)) + 1
    pool = torch.randn(rows, backbone.hidden_size, device=device)

    def forward(backbone, waves, include_cnn=False):
        lengths = [backbone.num_frames(len(w)) for w in waves]
        x = pool[: len(waves) * max(lengths)].view(len(waves), max(lengths), -1)
        return [x] * len(names), lengths

    return forward


def bench_corpus(seconds: float):
    """The bundled corpus's utterances, repeated under new ids until `seconds` of audio."""
    from w2vcache.corpus import Utterance

    corpus, base = build_corpus(), sorted(build_corpus(), key=lambda u: u.id)
    chosen, total, copy = [], 0.0, 0
    lengths = {u.id: len(load_audio(u.path)) / SAMPLE_RATE for u in base}
    while total < seconds:
        for u in base:
            if total >= seconds:
                break
            chosen.append(Utterance(f"{u.id}-r{copy}", u.path, u.text, "bench"))
            total += lengths[u.id]
        copy += 1
    corpus.splits, corpus.sources = {"bench": chosen}, {"bench": ["bundled corpus, repeated"]}
    return corpus, total


def raw_write_speed(folder: Path, nbytes: int = 2 * 2**30, piece: int = 64 * 2**20) -> float:
    """Bytes per second of one file of about `nbytes` written in `piece`s and fsync'ed: the file
    system's pace."""
    data = os.urandom(piece)
    path = folder / "raw-write.bin"
    pieces = max(1, round(nbytes / piece))
    nbytes = pieces * piece
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(pieces):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return nbytes / seconds


def stand_in(args):
    if args.repeats < 1:
        raise SystemExit("--repeats: at least 1")
    # For its shapes and frame counts only; on --device, so that the device's path (casts, copies
    # to pinned memory, events) is taken as a real extraction there takes it.
    backbone = load_backbone(args.model, device=args.device)
    corpus, total = bench_corpus(args.seconds or 3600.0)
    raws, pipelines, stages = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        config = ExtractConfig(model=args.model, store=str(tmp / "bench.zarr"), batch_seconds=args.batch_seconds,
                               threads=args.threads, device=args.device)
        stand_in_forward = instant_forward(backbone, corpus, args.batch_seconds)
        warm_up(corpus, config, backbone, stand_in_forward)
        # Alternated, each side's best kept: a shared disk's speed swings from one minute to the
        # next. The stores stay until the end, so that each write goes where the last raw file was
        # and onto fresh space alike (a virtual disk rewrites space it has allocated much faster).
        # The raw file is as large as the store: a virtual disk's write cache flatters a shorter write.
        for i in range(args.repeats):
            store = replace(config, store=str(tmp / f"bench-{i}.zarr"))
            seconds, written, spent = timed_extraction(corpus, store, backbone, forward=stand_in_forward)
            pipelines.append(written / seconds)
            stages.append(spent)
            raws.append(raw_write_speed(tmp, nbytes=written))
    raw, pipeline = max(raws), max(pipelines)
    print(f"stand-in for {args.model}: {len(backbone.layer_names())} layers x {backbone.hidden_size}, "
          f"{len(corpus.splits['bench'])} utterances, {total:.1f} s of audio, {os.cpu_count()} CPUs")
    print(f"raw write speed of the file system   {raw / 1e6:8.1f} MB/s (as many bytes as the store, fsync'ed; best of "
          f"{', '.join(f'{r / 1e6:.0f}' for r in raws)})")
    print(f"pipeline with the stand-in model     {pipeline / 1e6:8.1f} MB/s ({written / 1e6:.0f} MB = "
          f"{pipeline / written * total:.0f}x real time; best of {', '.join(f'{p / 1e6:.0f}' for p in pipelines)}; "
          f"decoding, checks and the store's metadata included, fsync'ed)")
    print(f"  where its time went (fastest run): {stages_line(stages[pipelines.index(pipeline)])}")
    print(f"ratio pipeline / raw write speed: {pipeline / raw:.3f}  (target >= 0.80)")


if __name__ == "__main__":
    main()
