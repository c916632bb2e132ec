"""Several probes on one GPU: does training K at once raise what the GPU gets through? In one run.

    python benchmarks/probe_concurrency.py [--device cuda] [--jobs 1,2,4] [--steps 20] [--batch-frames 16000]

The paper's probe (`Probe`, 3x1024 BiLSTM, the kernel w2vcache trains it with on that device) on
random 768-dim features in batches shaped like LibriSpeech's (utterances of 300-800 frames, about
--batch-frames padded frames each), CTC loss on random transcripts, gradient clipping and the
loop's fused Adam: a training step as `train.py` takes it, data already on the device. A step of
this probe is a few dozen utterances by 1024 units, 600-odd recurrent steps per layer: small
matrix products one after another, which may leave most of a large GPU idle.

Printed: frames per second of one probe alone, then of K probes at once (all K together), each
way of running them side by side:
- processes: K processes (what `w2vcache probe --jobs K`, or K `--shard i/K` jobs, do on one GPU). Without MPS a
  GPU runs one process's kernels at a time, switching between them;
- threads: K threads of one process, each probe on its own CUDA stream, whose kernels may overlap.
Ratio: all K together / one alone (K would be perfect; 1, nothing gained). Then one probe's step
in each precision cuDNN's LSTM can take: float32 (IEEE), TF32 (torch's default for cuDNN), and
bfloat16 autocast, against float32.
"""

import argparse
import contextlib
import os
import threading
import time

import torch
import torch.multiprocessing as mp

from w2vcache import text
from w2vcache.probe import Probe, ProbeConfig
from w2vcache.train import TrainConfig, make_optimizer

DIM = 768


def batch(device, batch_frames: int, seed: int):
    """Random features (B, T, DIM), lengths and CTC targets of one LibriSpeech-like batch."""
    g = torch.Generator().manual_seed(seed)
    longest = int(torch.randint(300, 800, (1,), generator=g))
    count = max(1, batch_frames // longest)
    lengths = torch.randint(longest * 3 // 4, longest + 1, (count,), generator=g)
    lengths[0] = longest
    x = torch.randn(count, longest, DIM, generator=g).to(device)
    target_lengths = lengths // 4  # about a character every four frames
    targets = torch.randint(1, len(text.VOCAB), (int(target_lengths.sum()),), generator=g)
    return x, lengths, targets, target_lengths


class Trainer:
    """One probe, its optimizer and its batches, stepping as the training loop does."""

    def __init__(self, device: str, batch_frames: int, seed: int):
        torch.manual_seed(seed)
        self.model = Probe(DIM, ProbeConfig()).to(device)
        self.optimizer = make_optimizer(self.model.parameters(), TrainConfig.lr)
        self.ctc = torch.nn.CTCLoss(zero_infinity=True)
        self.batches = [batch(device, batch_frames, seed * 1000 + i) for i in range(4)]
        self.frames = 0

    def step(self, i: int, autocast: torch.dtype | None = None) -> None:
        x, lengths, targets, target_lengths = self.batches[i % len(self.batches)]
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            log_probs = self.model(x, lengths)
        loss = self.ctc(log_probs.float().transpose(0, 1), targets, lengths, target_lengths)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), TrainConfig.clip_norm)
        self.optimizer.step()
        self.frames += int(lengths.sum())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def alone(device: str, args) -> float:
    """Frames per second of one probe."""
    trainer = Trainer(device, args.batch_frames, 0)
    for i in range(3):
        trainer.step(i)
    sync(device)
    trainer.frames = 0
    started = time.perf_counter()
    for i in range(args.steps):
        trainer.step(i)
    sync(device)
    return trainer.frames / (time.perf_counter() - started)


def _process(rank: int, device: str, args, barrier, results) -> None:
    trainer = Trainer(device, args.batch_frames, rank)
    for i in range(3):
        trainer.step(i)
    sync(device)
    trainer.frames = 0
    barrier.wait(timeout=600)  # a sibling that died before it (out of memory, say) ends this one too
    started = time.perf_counter()
    for i in range(args.steps):
        trainer.step(i)
    sync(device)
    results[rank] = (trainer.frames, started, time.perf_counter())


def in_processes(k: int, device: str, args) -> float:
    """Frames per second of k probes in k processes, all together (first start to last end)."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier, results = ctx.Barrier(k), manager.dict()
        workers = [ctx.Process(target=_process, args=(rank, device, args, barrier, results)) for rank in range(k)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            if any(w.exitcode for w in workers):  # one failed: the others would wait at the barrier
                barrier.abort()
            time.sleep(0.2)
        if any(w.exitcode for w in workers) or len(results) != k:
            raise SystemExit(f"a worker process failed (exit codes {[w.exitcode for w in workers]})")
        results = dict(results)
    frames = sum(r[0] for r in results.values())
    return frames / (max(r[2] for r in results.values()) - min(r[1] for r in results.values()))


def in_threads(k: int, device: str, args) -> float:
    """Frames per second of k probes in k threads of this process, each on its own CUDA stream."""
    trainers = [Trainer(device, args.batch_frames, rank) for rank in range(k)]
    cuda = device.startswith("cuda")
    streams = [torch.cuda.Stream(device) if cuda else None for _ in range(k)]
    barrier = threading.Barrier(k + 1)

    def run(trainer, stream, steps, wait):
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            if wait:
                barrier.wait()
            for i in range(steps):
                trainer.step(i)
        if cuda:
            stream.synchronize()

    for trainer, stream in zip(trainers, streams):  # warm-up, one at a time
        run(trainer, stream, 3, False)
        trainer.frames = 0
    threads = [threading.Thread(target=run, args=(t, s, args.steps, True)) for t, s in zip(trainers, streams)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return sum(t.frames for t in trainers) / (time.perf_counter() - started)


def precisions(device: str, args) -> dict[str, float]:
    """Seconds per step of one probe in each precision cuDNN's LSTM can take."""
    out = {}
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    for name in ("float32", "tf32", "bfloat16"):
        trainer = Trainer(device, args.batch_frames, 0)
        tf32 = name == "tf32"
        if rnn is not None and hasattr(rnn, "fp32_precision"):
            before = rnn.fp32_precision
            rnn.fp32_precision = "tf32" if tf32 else "ieee"
        else:
            before = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
        try:
            autocast = torch.bfloat16 if name == "bfloat16" else None
            for i in range(3):
                trainer.step(i, autocast)
            sync(device)
            started = time.perf_counter()
            for i in range(args.steps):
                trainer.step(i, autocast)
            sync(device)
            out[name] = (time.perf_counter() - started) / args.steps
        finally:
            if rnn is not None and hasattr(rnn, "fp32_precision"):
                rnn.fp32_precision = before
            else:
                torch.backends.cudnn.allow_tf32 = before
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", default="1,2,4", help="how many probes at once, each figure in turn")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per probe, after 3 warm-up ones")
    parser.add_argument("--batch-frames", type=int, default=ProbeConfig.batch_frames)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no GPU that torch can use")
    jobs = [int(k) for k in args.jobs.split(",")]
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"3x1024 BiLSTM probe on {name}, batches of about {args.batch_frames} "
          f"padded frames, {args.steps} timed steps each, {os.cpu_count()} CPUs")
    one = alone(args.device, args)
    print(f"one probe alone: {one:9.0f} frames/s")
    for k in jobs:
        if k < 2:
            continue
        p = in_processes(k, args.device, args)
        t = in_threads(k, args.device, args)
        print(f"{k} probes at once: processes {p:9.0f} frames/s (ratio {p / one:.2f}), "
              f"threads on their own streams {t:9.0f} frames/s (ratio {t / one:.2f}); {k} would be perfect")
    steps = precisions(args.device, args)
    for name, s in steps.items():
        print(f"one step in {name:<9} {s * 1000:7.1f} ms  (ratio to float32 {s / steps['float32']:.3f})")


if __name__ == "__main__":
    main()
