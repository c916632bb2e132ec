"""Extraction overhead: extraction time / bare model forward time, on the same audio, in one run.

    python benchmarks/extract_overhead.py [--model builtin:base] [--seconds 120] [--device cpu] [--threads N]
    python benchmarks/extract_overhead.py --stand-in [--seconds 3600] [--dir DIR]

Bare: the plain transformers forward (`model(x, output_hidden_states=True)`) over the same
length-sorted batches, outputs discarded, audio already in memory. Extraction: `w2vcache
extract`'s whole path (audio decoding, exact per-utterance batching, float16 casts, chunked
checksummed writes) into a fresh store. Target ratio: at most 1.10. Also prints bytes on disk
per frame per layer.

--stand-in: the pipeline's own ceiling, on any machine. The model is replaced by an instant
stand-in with the same output shapes (every layer a slice of one random float16 tensor made
beforehand: no compute, and no easier to compress than real features), so extraction is bound by
decoding, copies, checksums and writes alone. Printed beside the raw write speed of the same file
system (a file written in 64 MB pieces and fsync'ed, as dd with fdatasync), measured in the same
run. Target: the pipeline writes at least 80 % of that speed. The store goes under --dir (default:
a temporary folder; name a folder on the disk you care about).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from w2vcache import threads
from w2vcache.audio import SAMPLE_RATE, load_audio
from w2vcache.checkpoints import load_backbone
from w2vcache.batching import length_batches
from w2vcache.corpus import build_corpus
import w2vcache.extract
from w2vcache.extract import ExtractConfig, extract
from w2vcache.store import info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--seconds", type=float, help="audio to use from the bundled corpus (default 120; "
                        "3600 with --stand-in, the corpus repeated under new ids)")
    parser.add_argument("--batch-seconds", type=float, default=64.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: w2vcache's choice, for both sides)")
    parser.add_argument("--stand-in", action="store_true", help="an instant stand-in for the model: the pipeline's ceiling")
    parser.add_argument("--dir", help="where the store is written (default: a temporary folder)")
    args = parser.parse_args()
    if args.stand_in:
        return stand_in(args)
    if args.seconds is None:
        args.seconds = 120.0

    corpus = build_corpus()
    chosen, total = [], 0.0
    for u in sorted(corpus, key=lambda u: u.id):
        if total >= args.seconds:
            break
        chosen.append(u)
        total += len(load_audio(u.path)) / SAMPLE_RATE
    corpus.splits = {"bench": chosen}
    corpus.sources = {"bench": ["bundled corpus, first utterances by id"]}
    backbone = load_backbone(args.model, device=args.device)
    model = backbone.model
    print(f"model {args.model}, {len(chosen)} utterances, {total:.1f} s of audio, device {args.device}, "
          f"torch threads {threads.use(args.threads, model)}")
    waves = sorted((load_audio(u.path) for u in chosen), key=len)
    batches = length_batches([len(w) for w in waves], int(args.batch_seconds * SAMPLE_RATE))

    def bare():
        with torch.inference_mode():
            for b in batches:
                group = waves[b]
                x = torch.zeros(len(group), max(len(w) for w in group))
                for i, w in enumerate(group):
                    x[i, : len(w)] = torch.from_numpy(w)
                model(x.to(args.device), output_hidden_states=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    bare()  # warm-up: allocator, kernels
    t = time.perf_counter()
    bare()
    bare_s = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.zarr"
        config = ExtractConfig(model=args.model, store=str(store), batch_seconds=args.batch_seconds, device=args.device,
                               threads=args.threads)
        t = time.perf_counter()
        extract(corpus, config, progress=False, backbone=backbone)
        extract_s = time.perf_counter() - t
        about = info(store)
        frames = about["splits"]["bench"]["frames"]
        per_layer = sum(about["bytes"]["layers"].values()) / len(about["layers"]) / frames
        chunk = about["splits"]["bench"]["chunk_frames"]
        # A full chunk holds chunk_frames frames plus a 4-byte checksum; a split's last chunk is
        # padded, which small benchmark stores over-weight.
        steady = (chunk * backbone.hidden_size * 2 + 4) / chunk

    print(f"bare forward   {bare_s:8.2f} s  ({total / bare_s:6.1f} s audio / s)")
    print(f"extraction     {extract_s:8.2f} s  ({total / extract_s:6.1f} s audio / s, audio checks and decoding included, model loaded before)")
    print(f"ratio extraction / bare forward: {extract_s / bare_s:.3f}  (target <= 1.10)")
    print(f"bytes on disk per frame per layer: {steady:.1f} in full chunks "
          f"({steady * backbone.frame_rate * 3600 / 1e6:.1f} MB per hour of audio per layer); "
          f"{per_layer:.1f} in this small store, whose last chunk is mostly padding")


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
    """Bytes per second of one file written in `piece`s and fsync'ed: the file system's pace."""
    data = os.urandom(piece)
    path = folder / "raw-write.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // piece):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return nbytes / seconds


def stand_in(args):
    backbone = load_backbone(args.model)  # for its shapes and frame counts only
    corpus, total = bench_corpus(args.seconds or 3600.0)
    names = backbone.layer_names()
    pool = torch.randn(int(args.batch_seconds * backbone.frame_rate) + 1, backbone.hidden_size).half()

    def instant_forward(backbone, waves, include_cnn=False):
        lengths = [backbone.num_frames(len(w)) for w in waves]
        x = pool[: max(lengths)].expand(len(waves), -1, -1)
        return [x] * len(names), lengths

    w2vcache.extract.forward_layers = instant_forward
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        raw = raw_write_speed(tmp)
        config = ExtractConfig(model=args.model, store=str(tmp / "bench.zarr"), batch_seconds=args.batch_seconds,
                               threads=args.threads)
        os.sync()
        t = time.perf_counter()
        extract(corpus, config, progress=False, backbone=backbone)
        os.sync()  # on disk, as the raw write is: the page cache would flatter either side
        seconds = time.perf_counter() - t
        written = sum(f.stat().st_size for f in (tmp / "bench.zarr").rglob("*") if f.is_file())
    print(f"stand-in for {args.model}: {len(names)} layers x {backbone.hidden_size}, "
          f"{len(corpus.splits['bench'])} utterances, {total:.1f} s of audio, {os.cpu_count()} CPUs")
    print(f"raw write speed of the file system   {raw / 1e6:8.1f} MB/s (2 GB, fsync'ed)")
    print(f"pipeline with the stand-in model     {written / seconds / 1e6:8.1f} MB/s "
          f"({written / 1e6:.0f} MB in {seconds:.1f} s = {total / seconds:.0f}x real time; decoding, checks "
          f"and the store's metadata included, fsync'ed)")
    print(f"ratio pipeline / raw write speed: {written / seconds / raw:.3f}  (target >= 0.80)")


if __name__ == "__main__":
    main()
