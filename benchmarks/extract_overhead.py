"""Extraction overhead: extraction time / bare model forward time, on the same audio, in one run.

    python benchmarks/extract_overhead.py [--model builtin:base] [--seconds 120] [--device cpu] [--threads N]

Bare: the plain transformers forward (`model(x, output_hidden_states=True)`) over the same
length-sorted batches, outputs discarded, audio already in memory. Extraction: `w2vcache
extract`'s whole path (audio decoding, exact per-utterance batching, float16 casts, chunked
checksummed writes) into a fresh store. Target ratio: at most 1.10. Also prints bytes on disk
per frame per layer.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from w2vcache import threads
from w2vcache.audio import SAMPLE_RATE, load_audio
from w2vcache.checkpoints import load_backbone
from w2vcache.batching import length_batches
from w2vcache.corpus import build_corpus
from w2vcache.extract import ExtractConfig, extract
from w2vcache.store import info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--seconds", type=float, default=120.0, help="audio to use from the bundled corpus")
    parser.add_argument("--batch-seconds", type=float, default=64.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: w2vcache's choice, for both sides)")
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
