"""What an int8 store costs against a float16 one, on the same audio, in one run.

    python benchmarks/int8_store.py [--model builtin:base] [--seconds 120] [--threads N]
                                    [--probe-model builtin:tiny] [--probe-layer 4] [--epochs 10] [--seed 0]

1. --model (768 dims for builtin:base) extracts --seconds of the bundled corpus twice, as float16
   and as int8 (`extract --dtype int8`), each into a fresh store. Printed per layer: bytes on disk
   per row of the frame axis (values, scales, checksums; target at most 800 for dimension 768,
   against 1,536 for float16) and the relative reconstruction error ||x - x'|| / ||x|| of the
   int8 store against the float16 one, for the store's scales (per channel, per chunk of frames)
   and, computed in memory on the same features, for one scale per frame (the alternative). The
   same two errors with one channel made 30x larger than the rest, as the few huge channels of
   trained W2V layers are (random weights have none). Then extraction throughput (int8 / float16)
   and read throughput (`read_layer` of every layer, best of 3; int8 / float16).
2. --probe-model extracts the whole bundled corpus as float16 and as int8, and the same probe
   (BiLSTM, 1 layer of 64 units, --epochs, --seed, best epoch by dev CER) trains on --probe-layer
   of each. Printed: dev CER of each and their difference (target within 1 point).
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from w2vcache.audio import SAMPLE_RATE, audio_info
from w2vcache.corpus import build_corpus
from w2vcache.extract import ExtractConfig, extract
from w2vcache.layers import layer_name
from w2vcache.probe import ProbeConfig, probe
from w2vcache.store import open_store
from w2vcache.store.layout import quantise
from w2vcache.store.verification import _bytes_on_disk
from w2vcache.train import TrainConfig

OUTLIER = 30.0  # one channel this much larger than the rest


def rel_error(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def per_chunk(x: np.ndarray, chunk: int) -> np.ndarray:
    """x quantised and decoded with per-channel scales per chunk of frames (the store's scheme)."""
    rows = -(-len(x) // chunk) * chunk
    padded = np.zeros((rows, x.shape[1]), dtype=np.float32)
    padded[: len(x)] = x
    q, scales = quantise(padded, chunk)
    return (q.astype(np.float32) * np.repeat(scales, chunk, axis=0))[: len(x)]


def per_frame(x: np.ndarray) -> np.ndarray:
    """x quantised and decoded with one scale per frame (max |x| / 127 over its channels)."""
    scale = np.abs(x).max(axis=1, keepdims=True) / 127
    scale[scale == 0] = 1
    return np.clip(np.rint(x / scale), -127, 127) * scale


def first_seconds(corpus, seconds: float):
    chosen, total = [], 0.0
    for u in sorted(corpus, key=lambda u: u.id):
        if total >= seconds:
            break
        chosen.append(u)
        total += audio_info(u.path).num_samples / SAMPLE_RATE
    corpus.splits, corpus.sources = {"bench": chosen}, {"bench": ["bundled corpus"]}
    return corpus, total


def read_seconds(path) -> float:
    store = open_store(path)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for layer in store.layers:
            store.read_layer("bench", layer)
        best = min(best, time.perf_counter() - started)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--seconds", type=float, default=120.0, help="audio of the bundled corpus for part 1")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: w2vcache's choice)")
    parser.add_argument("--probe-model", default="builtin:tiny")
    parser.add_argument("--probe-layer", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, audio = first_seconds(build_corpus(), args.seconds)
        took = {"float16": [], "int8": []}
        for dtype in ("float16", "int8") * 2:  # twice each, best time: the first run also warms up
            path = tmp / f"{dtype}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            started = time.perf_counter()
            extract(corpus, ExtractConfig(model=args.model, store=str(path), dtype=dtype, threads=args.threads),
                    progress=False)
            took[dtype].append(time.perf_counter() - started)
        took = {dtype: min(times) for dtype, times in took.items()}
        f16, i8 = open_store(tmp / "float16.zarr"), open_store(tmp / "int8.zarr")
        rows = f16.split_attrs("bench")["n_rows"]
        frames = f16.split_attrs("bench")["n_frames"]
        chunk = i8.chunk_frames("bench")
        size16, size8 = _bytes_on_disk(f16)["layers"], _bytes_on_disk(i8)["layers"]
        print(f"{args.model}: {audio:.1f} s of the bundled corpus, {frames} frames ({rows} rows with block "
              f"padding), chunks of {chunk} frames")
        print(f"\n{'layer':<8} {'dim':>4} {'B/row f16':>10} {'B/row int8':>10} {'err chunk':>10} {'err frame':>10}"
              f" {'outlier: chunk':>15} {'outlier: frame':>15}")
        errors = []
        for layer, dim in i8.layers.items():
            x = f16.read_layer("bench", layer)[0].astype(np.float32)
            y = i8.read_layer("bench", layer)[0]
            loud = x.copy()
            loud[:, 0] *= OUTLIER
            row = (rel_error(x, y), rel_error(x, per_frame(x)),
                   rel_error(loud, per_chunk(loud, chunk)), rel_error(loud, per_frame(loud)))
            errors.append(row)
            print(f"{layer:<8} {dim:>4} {size16[layer] / rows:>10.1f} {size8[layer] / rows:>10.1f} "
                  + " ".join(f"{100 * e:>{w}.3f}%" for e, w in zip(row, (9, 9, 14, 14))))
        mean = np.mean(errors, axis=0)
        print(f"{'mean':<8} {'':>4} {np.mean([size16[k] for k in size16]) / rows:>10.1f} "
              f"{np.mean([size8[k] for k in size8]) / rows:>10.1f} "
              + " ".join(f"{100 * e:>{w}.3f}%" for e, w in zip(mean, (9, 9, 14, 14))))
        print(f"(errors: int8 against the float16 store; 'chunk': the store's per-channel scales per chunk, "
              f"'frame': one scale per frame; 'outlier': channel 0 made {OUTLIER:.0f}x larger first)")
        print(f"\nextraction (best of 2): float16 {took['float16']:.2f} s, int8 {took['int8']:.2f} s; "
              f"throughput ratio int8 / float16 {took['float16'] / took['int8']:.3f}")
        r16, r8 = read_seconds(tmp / "float16.zarr"), read_seconds(tmp / "int8.zarr")
        decoded = frames * sum(i8.layers.values()) * 4
        print(f"read (read_layer, every layer): float16 {r16:.3f} s, int8 {r8:.3f} s "
              f"({decoded / r8 / 1e9:.2f} GB/s of float32 features); throughput ratio int8 / float16 {r16 / r8:.3f}")

        cers = {}
        corpus = build_corpus()
        for dtype in ("float16", "int8"):
            store = tmp / f"probe-{dtype}.zarr"
            extract(corpus, ExtractConfig(model=args.probe_model, store=str(store), dtype=dtype,
                                          threads=args.threads), progress=False)
            out = tmp / f"runs-{dtype}"
            probe(str(store), str(args.probe_layer), str(args.seed), out,
                  ProbeConfig(hidden=64, lstm_layers=1),
                  TrainConfig(epochs=args.epochs, seed=args.seed, select_by="cer", lr=2e-3),
                  progress=False, num_threads=args.threads)
            result = json.loads((out / "probe" / layer_name(args.probe_layer) / f"seed{args.seed}"
                                 / "result.json").read_text())
            cers[dtype] = result["dev"]["cer_percent"]
        print(f"\nprobe: {args.probe_model} {layer_name(args.probe_layer)}, BiLSTM 1x64, {args.epochs} epochs, "
              f"lr 2e-3, seed {args.seed}, bundled train -> dev, best epoch by dev CER")
        print(f"dev CER float16 {cers['float16']:.2f} %, int8 {cers['int8']:.2f} %; "
              f"difference int8 - float16 {cers['int8'] - cers['float16']:+.2f} points (target within 1)")


if __name__ == "__main__":
    main()
