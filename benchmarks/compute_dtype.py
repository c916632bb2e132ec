"""Which compute dtype to extract with, from measurements: error and speed of each, in one run.

    python benchmarks/compute_dtype.py [--models builtin:tiny,builtin:base] [--seconds 30]
                                       [--batch-seconds 16] [--device cpu|cuda] [--threads N] [--repeats 3]

For each model, the same length-sorted batches of the bundled corpus (the first --seconds of audio)
go through `forward_layers`, extraction's forward, in each compute dtype:
- float32: the reference;
- tf32: float32 with TF32 matmuls and convolutions, as `extract --compute-dtype tf32` runs it (CUDA only:
  on a CPU it is skipped, and said so);
- float16, bfloat16: autocast, as `extract --compute-dtype` runs them.
Error: per layer, against float32 over the real frames (padding left out), "rms" = |error| / |float32|
over all frames and "max" = the worst frame's |error| / |float32| (extract.relative_errors, the
measure `extract` records on its first batch and `info` prints). For scale, the error of storing
float32 features as float16 (`--dtype float16`, the default) is printed too. Speed: the best of
--repeats passes over the batches after a warm-up one, as x real time and against float32.

The recommendation is the fastest dtype whose worst layer stays within --tolerance (rms, default
2 %) of float32 and that runs at least --min-speedup (default 1.1) times float32's speed: a few
percent is within the noise of a shared machine, and buys nothing for its error; float32 otherwise.
"""

import argparse
import time

import torch

from w2vcache import threads
from w2vcache.audio import SAMPLE_RATE, load_audio
from w2vcache.backbone import forward_layers
from w2vcache.batching import length_batches
from w2vcache.checkpoints import load_backbone
from w2vcache.corpus import build_corpus
from w2vcache.extract import frame_errors, tf32, worst_frame

DTYPES = ("float32", "tf32", "float16", "bfloat16")
AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class ErrorSum:
    """Per-layer error against float32, accumulated over batches (the sums relative_errors takes over one)."""

    def __init__(self):
        self.diff2, self.ref2, self.worst = {}, {}, {}

    def add(self, name: str, reduced: torch.Tensor, reference: torch.Tensor, frames: list[int]) -> None:
        diff, norm = frame_errors(reduced, reference, frames)
        self.diff2[name] = self.diff2.get(name, 0.0) + float((diff**2).sum())
        self.ref2[name] = self.ref2.get(name, 0.0) + float((norm**2).sum())
        self.worst[name] = max(self.worst.get(name, 0.0), worst_frame(diff, norm))

    def rms(self) -> dict[str, float]:
        return {name: (self.diff2[name] / self.ref2[name]) ** 0.5 for name in self.diff2}


def run(backbone, batches, dtype: str, device: torch.device):
    """Every batch's layers in `dtype`, and the seconds the pass took."""
    with tf32(dtype == "tf32"):  # float32 means float32 here (cuDNN's default is TF32), TF32 only when asked
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        outputs = []
        for waves in batches:
            with torch.autocast(device.type, dtype=AUTOCAST.get(dtype, torch.float32), enabled=dtype in AUTOCAST):
                outputs.append(forward_layers(backbone, waves))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return outputs, time.perf_counter() - started


def measure(model: str, args) -> dict:
    device = torch.device(args.device)
    backbone = load_backbone(model, device=args.device)
    used = threads.use(args.threads, backbone.model)
    utterances, total = [], 0.0
    for u in sorted(build_corpus(), key=lambda u: u.id):
        if total >= args.seconds:
            break
        wave = load_audio(u.path, backbone.receptive_field)
        utterances.append(wave)
        total += len(wave) / SAMPLE_RATE
    utterances.sort(key=len)
    lengths = [backbone.num_frames(len(w)) for w in utterances]
    max_frames = max(1, int(args.batch_seconds * backbone.frame_rate))
    batches = [utterances[b.start: b.stop] for b in length_batches(lengths, max_frames)]
    names = backbone.layer_names()
    print(f"\n{model} on {args.device} ({used} torch thread(s) on CPU): {len(utterances)} utterances, "
          f"{total:.1f} s of audio in {len(batches)} batches")

    dtypes = [d for d in DTYPES if d != "tf32" or device.type == "cuda"]
    if device.type != "cuda":
        print("tf32: CUDA only (TF32 is a tensor-core format); run with --device cuda to measure it")
    reference, times = None, {}
    figures = {}
    for dtype in dtypes:
        run(backbone, batches[:1], dtype, device)  # warm-up: kernels, allocator
        seconds = []
        for _ in range(args.repeats):
            outputs, s = run(backbone, batches, dtype, device)
            seconds.append(s)
        times[dtype] = min(seconds)
        if dtype == "float32":
            reference = outputs
            storage = ErrorSum()  # float32 features stored as float16: the error every default store has
            for layers, frames in reference:
                for name, x in zip(names, layers):
                    storage.add(name, x.half(), x, frames)
            figures["float16 storage"] = storage
            continue
        errors = ErrorSum()
        for (layers, frames), (ref, _) in zip(outputs, reference):
            for name, x, r in zip(names, layers, ref):
                errors.add(name, x, r, frames)
        figures[dtype] = errors

    print(f"{'compute':<16} {'seconds':>8} {'x real time':>11} {'speed vs fp32':>13} {'rms error by layer':>22} "
          f"{'worst frame':>11}")
    for dtype in ["float32", *figures]:
        speed = "" if dtype not in times else f"{times[dtype]:8.2f} {total / times[dtype]:11.1f} {times['float32'] / times[dtype]:13.2f}"
        if dtype == "float32":
            print(f"{dtype:<16} {speed} {'(reference)':>22}")
            continue
        rms, errors = figures[dtype].rms(), figures[dtype]
        span = f"{100 * min(rms.values()):.3g}-{100 * max(rms.values()):.3g} %"
        print(f"{dtype:<16} {speed or ' ' * 34} {span:>22} {100 * max(errors.worst.values()):>9.3g} %")
    for dtype, errors in figures.items():
        print(f"  {dtype} rms by layer (%): " + " ".join(f"{100 * v:.3g}" for v in errors.rms().values()))

    within = [d for d in figures if d in times and max(figures[d].rms().values()) <= args.tolerance]
    faster = [d for d in within if times["float32"] / times[d] >= args.min_speedup]
    best = min(faster, key=times.get) if faster else "float32"
    why = (f"{times['float32'] / times[best]:.2f}x float32's speed, worst layer {100 * max(figures[best].rms().values()):.2g} % "
           f"from float32" if best != "float32" else f"no reduced dtype within {100 * args.tolerance:g} % rms error runs {args.min_speedup:g}x "
                  f"float32's speed here")
    print(f"recommended for {model} on {args.device}: --compute-dtype {best} ({why})")
    return {"times": times, "rms": {d: e.rms() for d, e in figures.items()}, "recommended": best}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="builtin:tiny,builtin:base")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio from the bundled corpus")
    parser.add_argument("--batch-seconds", type=float, default=16.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: w2vcache's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest rms error of any layer accepted (fraction)")
    parser.add_argument("--min-speedup", type=float, default=1.1, help="speed over float32 a reduced dtype must reach")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU here")
    for model in args.models.split(","):
        measure(model.strip(), args)


if __name__ == "__main__":
    main()
