"""No collapse on a shared machine: each workload timed idle, then beside one and two busy processes
that this script starts and stops itself, in one run.

    python benchmarks/shared_cpu.py [--threads N] [--repeats 2]

Workloads, on the bundled corpus:
- probe epoch, demo size: 1x128 BiLSTM on builtin:tiny's layer 2, 600-frame batches, train split;
- probe step, seed size: the paper's 3x1024 BiLSTM on builtin:base's layer 8, one batch of ~2,000 frames;
- fine-tune step, demo size (builtin:tiny, 30 s batch) and seed size (builtin:base, 8 s batch);
- extraction block: builtin:base, every layer, ~40 s of audio into a new store.

Each is timed with w2vcache's default thread choice (`--threads N` fixes it instead) and the
figures are the median of --repeats runs. Prints each slowdown against idle; targets: at most 2.5x
beside one busy process and 4x beside two (a fair share of 2 cores is 2x and 3x).
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from w2vcache import threads
from w2vcache.audio import SAMPLE_RATE, load_audio
from w2vcache.checkpoints import load_backbone
from w2vcache.corpus import build_corpus
from w2vcache.extract import ExtractConfig, extract
from w2vcache.finetune import AudioBatches, FinetuneConfig, FinetuneTask
from w2vcache.probe import ProbeConfig, ProbeTask
from w2vcache.store import open_store
from w2vcache.train import TrainConfig, make_optimizer

BUSY = "while True: pass"


def first_seconds(corpus, seconds: float):
    """The bundled corpus cut to its first `seconds` of training audio."""
    chosen, total = [], 0.0
    for u in corpus.splits["train"]:
        if total >= seconds:
            break
        chosen.append(u)
        total += len(load_audio(u.path)) / SAMPLE_RATE
    corpus.splits, corpus.sources = {"train": chosen}, {"train": ["bundled train, first utterances"]}
    return corpus


def update(model, loss, optimizer) -> None:
    """The training loop's update: backward, clipping, Adam."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def probe_steps(task: ProbeTask, batches, requested):
    """The training loop's step (forward, CTC, backward, clipping, Adam) over `batches`."""
    optimizer = make_optimizer(task.model.parameters(), 1e-4)  # the training loop's

    def run():
        n = threads.use(requested, task.model)
        task.model.train()
        for batch in batches:
            update(task.model, task.loss(batch), optimizer)
        return n
    return run


def finetune_step(model: str, batch_seconds: float, requested):
    backbone = load_backbone(model)
    config = FinetuneConfig(batch_seconds=batch_seconds, num_workers=0)
    task = FinetuneTask(backbone, build_corpus(), config, TrainConfig(test_splits=()))
    task.start_epoch(config.freeze_epochs)  # unfrozen, as after the head-only epochs
    split = task.splits["train"]
    utterances, frames, batches = split.utterances, split.frames, split.batches
    batch = AudioBatches(utterances, frames, [batches[len(batches) // 2]], 0, 1)[0]
    optimizer = make_optimizer(task.model.parameters(), 1e-4)  # the training loop's

    def run():
        n = threads.use(requested, task.model)
        task.model.train()
        update(task.model, task.loss(batch), optimizer)
        return n
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="fix torch's threads (default: w2vcache's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per workload and load (median)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())

    # -- workloads, built once (stores extracted idle)
    tiny_store, base_store = tmp / "tiny.zarr", tmp / "base.zarr"
    extract(build_corpus(), ExtractConfig(model="builtin:tiny", store=str(tiny_store), layers="2"), progress=False)
    base = load_backbone("builtin:base")
    small = first_seconds(build_corpus(), 40.0)
    extract(small, ExtractConfig(model="builtin:base", store=str(base_store), layers="8"), progress=False, backbone=base)

    demo_probe = ProbeTask(open_store(tiny_store), "layer02", ProbeConfig(hidden=128, lstm_layers=1, batch_frames=600),
                           TrainConfig(test_splits=()))
    seed_probe = ProbeTask(open_store(base_store), "layer08", ProbeConfig(batch_frames=2000),
                           TrainConfig(dev_split="train", test_splits=()))
    stores = iter(range(10**6))

    def extraction():
        n = threads.use(args.threads, base.model)
        extract(small, ExtractConfig(model="builtin:base", store=str(tmp / f"x{next(stores)}.zarr"),
                                     threads=args.threads), progress=False, backbone=base)
        return n

    workloads = {
        "probe epoch, demo size (1x128)": probe_steps(demo_probe, list(demo_probe.train_batches(0)), args.threads),
        "probe step, seed size (3x1024)": probe_steps(seed_probe, list(seed_probe.train_batches(0))[:1], args.threads),
        "fine-tune step, builtin:tiny": finetune_step("builtin:tiny", 30.0, args.threads),
        "fine-tune step, builtin:base": finetune_step("builtin:base", 8.0, args.threads),
        "extraction, builtin:base, 40 s": extraction,
    }
    print(f"{threads.available_cores()} cores available; threads: {args.threads or 'w2vcache default'}; "
          f"median of {args.repeats} runs")
    for run in workloads.values():
        run()  # warm-up: allocator, oneDNN primitives, Adam state

    results = {name: {} for name in workloads}
    for busy in (0, 1, 2):
        procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
        try:
            time.sleep(0.5)  # let them reach the run queue
            for name, run in workloads.items():
                times, used = [], None
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    used = run()
                    times.append(time.perf_counter() - t)
                results[name][busy] = (statistics.median(times), used)
        finally:
            for p in procs:
                p.kill()
                p.wait()

    print(f"\n{'workload':34s} {'idle':>12s} {'1 busy':>12s} {'2 busy':>12s} {'ratio 1':>8s} {'ratio 2':>8s}")
    worst = [0.0, 0.0]
    for name, by_load in results.items():
        cells = [f"{s:6.2f}s ({n}t)" for s, n in (by_load[b] for b in (0, 1, 2))]
        r1, r2 = by_load[1][0] / by_load[0][0], by_load[2][0] / by_load[0][0]
        worst = [max(worst[0], r1), max(worst[1], r2)]
        print(f"{name:34s} {cells[0]:>12s} {cells[1]:>12s} {cells[2]:>12s} {r1:8.2f} {r2:8.2f}")
    print(f"\nworst slowdown beside one busy process: {worst[0]:.2f} (target <= 2.5); "
          f"beside two: {worst[1]:.2f} (target <= 4)")


if __name__ == "__main__":
    main()
