"""What the cache buys, and whether the probe runs at the hardware's pace, in one run.

    python benchmarks/probe_cost.py [--model builtin:base] [--layer 8] [--hidden 1024] [--lstm-layers 3]
                                    [--batch-frames 16000] [--seconds 0] [--threads N]
    python benchmarks/probe_cost.py --data-wait [--batch-frames 2000] [--epochs 3] [--device cuda] ...

Over the bundled train split (all of it unless --seconds cuts it), with the recipe's batches:
- the probe's training epoch from the store, profiled: building batches (data), forward + CTC,
  backward, clipping + Adam;
- the same epoch with a plain `nn.LSTM` of the same size on the same padded batches (the speed of
  torch's own kernel; it lets padding into the backward direction, so it is a yardstick only), and
  on the first batch the probe's CUDA kernel, `nn.LSTM` on packed sequences (the usual exact way);
- the same epoch computed the way toolkits without a cache do it: W2V forward inside every step.

Prints the epoch times and the ratios: ours / plain nn.LSTM (target <= 1.0), cached / on-the-fly
(target <= 0.55), the data-wait share (target < 2 %) and the padded-frame share (target < 5 %).
It also counts the arithmetic: the probe step's floating-point operations per padded frame (the
LSTM's matrix products, forward and backward) and W2V's forward per frame (torch's FLOP counter),
each side's achieved GFLOP/s, and the ratio the cache would give were both run at the same
GFLOP/s: the floor of cached / on-the-fly for a probe that costs what it costs.

--data-wait instead measures where a fast probe waits for its data: a linear probe and a small
BiLSTM (1x128), each trained by the training loop itself (`w2vcache probe`'s) with batches
assembled in the loop (prefetch 0) and ahead by a thread (prefetch 2), and on a GPU also gathered
there from the features copied once (resident, the default there), over --epochs epochs after
a warm-up one; the share is the loop's own record (metrics.jsonl: data_wait_seconds, the time spent
in next() on the epoch's batches, over train_seconds). The bundled train split holds 5 minutes of
speech, so its batches are cut smaller (--batch-frames 2000 unless given) to make more than a
handful per epoch. The first epoch's share is shown apart: nothing is built before it, while each
later epoch's first batches are built during the dev evaluation before it. With --device cuda the
probes train there, the paper's 3x1024 BiLSTM too, and that probe's kernel (each direction of each
layer one call on the padded batch: the CPU's fastest exact way) is timed against nn.LSTM on packed
sequences (cuDNN's exact bidirectional kernel), which may be the faster one on a GPU.
"""

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from w2vcache import threads
from w2vcache.audio import SAMPLE_RATE, load_audio
from w2vcache.backbone import forward_layers
from w2vcache.checkpoints import load_backbone
from w2vcache.corpus import build_corpus
from w2vcache.extract import ExtractConfig, extract
from w2vcache.layers import layer_name
from w2vcache.probe import ProbeConfig, ProbeTask, batches_by_length, probe as train_probes
from w2vcache.store import open_store
from w2vcache.train import TrainConfig, make_optimizer, seed_everything


class ForwardEveryStep:
    """A feature source that runs W2V on the batch's audio instead of reading the store."""

    def __init__(self, cached, backbone, layer_index: int, paths: dict):
        self.backbone, self.layer_index = backbone, layer_index
        self.paths = [paths[i] for i in cached.ids]
        self.ids, self.texts, self.lengths, self.in_memory = cached.ids, cached.texts, cached.lengths, False

    def get(self, indices):
        waves = [load_audio(self.paths[i]) for i in indices]
        outputs, frames = forward_layers(self.backbone, waves)
        layer = outputs[self.layer_index]
        return [layer[b, :n].numpy().astype(np.float16) for b, n in enumerate(frames)]


class PlainLSTM(nn.Module):
    """torch's own bidirectional LSTM on the padded batch, then the probe's output layer."""

    def __init__(self, probe):
        super().__init__()
        self.lstm, self.output = probe.lstm, probe.output

    def forward(self, x, lengths):
        return self.output(self.lstm(x)[0]).log_softmax(-1)


class Kernel(nn.Module):
    """The probe run by one of its two exact LSTM kernels whatever the device ("directions", the
    CPU's, or "packed", CUDA's; Probe.forward picks by device)."""

    def __init__(self, probe, kernel: str):
        super().__init__()
        self.probe, self.kernel = probe, kernel

    def forward(self, x, lengths):
        return self.probe.output(getattr(self.probe, self.kernel)(x, lengths)).log_softmax(-1)


def probe_step_flops(input_dim: int, hidden: int, lstm_layers: int, symbols: int) -> float:
    """Floating-point operations of one training step per padded frame: each direction of each LSTM
    layer multiplies [input; state] by its (4 hidden) x (input + hidden) weights, the output layer
    its (symbols) x (2 hidden) ones, 2 operations per multiply-add; the backward pass costs twice the
    forward (one product for the input's gradient, one for the weights'). Gate nonlinearities, CTC
    and Adam are left out: a few percent."""
    forward, width = 0, input_dim
    for _ in range(lstm_layers):
        forward += 2 * 2 * 4 * hidden * (width + hidden)
        width = 2 * hidden
    forward += 2 * width * symbols
    return 3.0 * forward


def w2v_forward_flops(model: str, waves) -> tuple[float, int]:
    """W2V's forward FLOPs on `waves` as torch's counter sees them, and the frames they make. On a
    model of its own (the timed one is left as it is): with eager attention, whose products the
    counter sees (it counts CPU's fused attention as none), and without the weight-norm
    parametrisation of the positional convolution, which the counter cannot follow (the products
    are the same)."""
    backbone = load_backbone(model)
    if hasattr(backbone.model, "set_attn_implementation"):
        backbone.model.set_attn_implementation("eager")
    else:  # transformers before set_attn_implementation
        backbone.model.config._attn_implementation = "eager"
    for module in backbone.model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name)
    with FlopCounterMode(display=False) as counter:
        _, frames = forward_layers(backbone, waves)
    return float(counter.get_total_flops()), sum(frames)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """This CPU's float32 rate on one large matrix product, torch's threads as set: the most any
    model here can reach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def epoch(task: ProbeTask, model: nn.Module, order) -> dict:
    """The training loop's step over every batch, each phase timed."""
    optimizer = make_optimizer(model.parameters(), 1e-4)  # the training loop's
    parts = dict(data=0.0, forward=0.0, backward=0.0, optimizer=0.0)
    model.train()
    # On a GPU each phase is timed to its kernels' end, not their launch.
    sync = torch.cuda.synchronize if task.device.type == "cuda" else (lambda: None)
    for indices in order:
        t0 = time.perf_counter()
        batch = task._batch("train", indices)
        sync()
        t1 = time.perf_counter()
        log_probs = model(batch.features, batch.lengths)
        loss = task.ctc(log_probs.transpose(0, 1), batch.targets, batch.lengths, batch.target_lengths)
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t4 = time.perf_counter()
        for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[name] += seconds
    parts["total"] = sum(parts.values())
    return parts


def data_wait(store_path: Path, layer: str, args) -> None:
    """The data-wait share of a linear probe and a small BiLSTM, without and with prefetch: the
    training loop's own figures (metrics.jsonl's data_wait_seconds over train_seconds)."""
    kinds = {"linear": dict(probe="linear"), "bilstm 1x128": dict(probe="bilstm", hidden=128, lstm_layers=1)}
    if args.device != "cpu":  # the paper's probe, too slow for a CPU's few epochs here, fast on a GPU
        kinds["bilstm 3x1024"] = dict(probe="bilstm", hidden=1024, lstm_layers=3)
    # Batches padded on the host in the loop (prefetch 0) and ahead by a thread (2); on a GPU also
    # gathered there from the features copied once (resident, its default where they fit).
    paths = {"0": dict(prefetch=0, resident=False), "2": dict(prefetch=2, resident=False)}
    if args.device != "cpu":
        paths["resident"] = dict(resident=True)
    shares = {}
    print(f"\n{'probe':<14} {'threads':>7} {'batches':>8} {'prefetch':>8} {'epoch s':>8} {'frames/s':>9} "
          f"{'data wait s':>11} {'share':>8} {'1st epoch':>10}")
    for name, options in kinds.items():
        for path, data_options in paths.items():
            config = ProbeConfig(batch_frames=args.batch_frames, **data_options, **options)
            # dev is evaluated on the train split (forward passes over the same batches); as with a
            # real dev split, the next epoch's first batches are built meanwhile.
            train_config = TrainConfig(epochs=args.epochs + 1, dev_split="train", test_splits=())
            # The training loop's note that dev is the training split, known here, would cut the table.
            with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()) as said:
                run = train_probes(str(store_path), layer, "0", out, config, train_config, progress=False,
                                   num_threads=args.threads, device=args.device).finished[0]
                metrics = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
            sys.stderr.write("".join(line for line in said.getvalue().splitlines(keepends=True)
                                     if not line.startswith("note: --dev-split train")))
            first, epochs = metrics[0], metrics[1:]  # the first: warm-up (oneDNN, allocator, page cache)
            train_s, wait = sum(e["train_seconds"] for e in epochs), sum(e["data_wait_seconds"] for e in epochs)
            shares[name, path] = wait / train_s
            batches = epochs[0]["updates"] - first["updates"]  # one update a batch (grad_accum 1)
            fps = sum(e["frames_per_second"] * e["train_seconds"] for e in epochs) / train_s
            print(f"{name:<14} {first['threads']:>7} {batches:>8} {path:>8} {train_s / len(epochs):>8.3f} "
                  f"{fps:>9.0f} {wait / len(epochs):>11.4f} {100 * wait / train_s:>7.2f} % "
                  f"{100 * first['data_wait_seconds'] / first['train_seconds']:>8.2f} %")
    for name in kinds:
        print(f"{name}: data-wait share with prefetch / without: {shares[name, '2'] / shares[name, '0']:.3f} "
              f"({100 * shares[name, '0']:.2f} % -> {100 * shares[name, '2']:.2f} %"
              + (f", resident {100 * shares[name, 'resident']:.2f} %" if "resident" in paths else "") + "; target < 2 %)")
    if args.device != "cpu":
        lstm_kernels(store_path, layer, args)


def lstm_kernels(store_path: Path, layer: str, args) -> None:
    """On a GPU: the paper's probe with each of its kernels (each direction of each layer one call
    on the padded batch, the CPU's; nn.LSTM on packed sequences, cuDNN's bidirectional kernel, the
    one Probe takes on CUDA), the same batches, after a warm-up epoch each."""
    config = ProbeConfig(batch_frames=16000)
    seed_everything(0)
    task = ProbeTask(open_store(store_path), layer, config, TrainConfig(dev_split="train", test_splits=()),
                     device=args.device)
    order = task.batches["train"]
    frames = int(task.splits["train"].lengths.sum())
    models = {kernel: Kernel(task.model, kernel) for kernel in ("directions", "packed")}
    print(f"\n3x1024 BiLSTM on {args.device}, {len(order)} batches of <= 16000 padded frames, {frames} frames:")
    seconds = {}
    for name, model in models.items():
        epoch(task, model, order)  # warm-up: cuDNN plans, allocator
        seconds[name] = epoch(task, model, order)["total"]
        print(f"  {name:<10} {seconds[name]:7.3f} s per epoch ({frames / seconds[name]:9.0f} frames/s)")
    print(f"  ratio packed / directions: {seconds['packed'] / seconds['directions']:.3f} "
          "(below 1: the packed kernel, w2vcache's on CUDA, is the faster there)")
    # Evaluation (a dev pass after every epoch, the final tests) runs the recipe's batches too. It
    # keeps no graph, so it could take larger ones; on a GPU where a step of the probe is too small
    # to fill it, that would cut its time nearly by the factor. Measured here before it is chosen.
    lengths = task.splits["train"].lengths
    evaluation = {}
    for batch_frames in (4000, 16000):
        eval_order = batches_by_length(lengths, batch_frames)
        for _ in range(2):  # the first: warm-up
            evaluation[batch_frames] = eval_pass(task, task.model, eval_order)
        print(f"  evaluation, {len(eval_order)} batch(es) of <= {batch_frames} frames: {evaluation[batch_frames]:.3f} s "
              f"({frames / evaluation[batch_frames]:9.0f} frames/s)")
    print(f"  ratio evaluation at 16000 / 4000 frames per batch: {evaluation[16000] / evaluation[4000]:.3f} "
          "(well below 1: evaluating with larger batches than the recipe trains with pays on this device)")


def eval_pass(task: ProbeTask, model: nn.Module, order) -> float:
    """Seconds of a forward pass over every batch without a graph, as an evaluation runs it."""
    model.eval()
    sync = torch.cuda.synchronize if task.device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    with torch.inference_mode():
        for indices in order:
            batch = task._batch("train", indices)
            model(batch.features, batch.lengths)
    sync()
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--lstm-layers", type=int, default=3)
    parser.add_argument("--batch-frames", type=int, help="padded frames per batch (16000; --data-wait: 2000)")
    parser.add_argument("--seconds", type=float, default=0, help="cut the train split to this much audio (0: all)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: w2vcache's choice)")
    parser.add_argument("--data-wait", action="store_true",
                        help="measure the data-wait share of fast probes with and without prefetch instead")
    parser.add_argument("--epochs", type=int, default=3, help="--data-wait: epochs measured after a warm-up one")
    parser.add_argument("--device", default="cpu", help="--data-wait: where the probes train (cuda: the paper's "
                        "3x1024 probe too); the profile runs on the CPU only")
    args = parser.parse_args()
    if args.device != "cpu" and not args.data_wait:
        parser.error("--device: only --data-wait runs elsewhere; the profile and its FLOP rates are the CPU's")
    args.batch_frames = args.batch_frames or (2000 if args.data_wait else 16000)

    corpus = build_corpus()
    chosen, total = [], 0.0
    for u in corpus.splits["train"]:
        if args.seconds and total >= args.seconds:
            break
        chosen.append(u)
        total += len(load_audio(u.path)) / SAMPLE_RATE
    corpus.splits, corpus.sources = {"train": chosen}, {"train": ["bundled train"]}
    backbone = load_backbone(args.model, device=args.device)
    layer = layer_name(args.layer)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        extract(corpus, ExtractConfig(model=args.model, store=str(tmp / "s.zarr"), layers=str(args.layer),
                                      threads=args.threads, device=args.device), progress=False, backbone=backbone)
        if args.data_wait:
            print(f"model {args.model}, layer {args.layer}, {len(chosen)} utterances, {total:.1f} s of audio, "
                  f"batches of <= {args.batch_frames} padded frames")
            data_wait(tmp / "s.zarr", layer, args)
            return
        config = ProbeConfig(hidden=args.hidden, lstm_layers=args.lstm_layers, batch_frames=args.batch_frames)
        seed_everything(0)
        task = ProbeTask(open_store(tmp / "s.zarr"), layer, config, TrainConfig(dev_split="train", test_splits=()))
        used = threads.use(args.threads, task.model)
        order = task.batches["train"]
        lengths = task.splits["train"].lengths
        padded = sum(max(lengths[b]) * len(b) for b in order)
        real = int(lengths.sum())
        print(f"model {args.model}, layer {args.layer}, probe {args.lstm_layers}x{args.hidden} BiLSTM, "
              f"{len(chosen)} utterances, {total:.1f} s of audio, {real} frames in {len(order)} batches of "
              f"<= {args.batch_frames} padded frames, {used} torch thread(s)")

        # Warm-up, a whole epoch: oneDNN makes its primitives for each batch shape the first time it
        # meets it (every epoch after the first has the same shapes), and the allocator grows.
        epoch(task, task.model, order)
        ours = epoch(task, task.model, order)
        plain = epoch(task, PlainLSTM(task.model), order)
        # The packed kernel is slow: timed on the first batch only, against ours on the same batch.
        ours_first, packed_first = epoch(task, task.model, order[:1]), epoch(task, Kernel(task.model, "packed"), order[:1])
        cached_source = task.splits["train"]
        task.splits["train"] = ForwardEveryStep(cached_source, backbone, args.layer, {u.id: u.path for u in chosen})
        with torch.no_grad():
            forward_layers(backbone, [load_audio(chosen[0].path)])  # warm-up
        uncached = epoch(task, task.model, order)
        w2v_flops, w2v_frames = w2v_forward_flops(args.model, [load_audio(u.path) for u in chosen[:16]])

    fps = real / ours["total"]
    print(f"\nprobe epoch from the store          {ours['total']:8.2f} s  ({fps:.0f} frames/s)")
    print("  " + ", ".join(f"{k} {100 * v / ours['total']:.1f} %" for k, v in ours.items() if k != "total"))
    print(f"plain nn.LSTM, padded batches       {plain['total']:8.2f} s")
    print(f"first batch: ours {ours_first['total']:.2f} s, nn.LSTM on packed sequences {packed_first['total']:.2f} s")
    print(f"same epoch, W2V in every step       {uncached['total']:8.2f} s  (W2V forward + loading: "
          f"{uncached['data']:.2f} s)")
    print(f"ratio ours / plain nn.LSTM: {ours['total'] / plain['total']:.3f} (target <= 1.0); "
          f"ours / packed: {ours_first['total'] / packed_first['total']:.3f}")
    print(f"ratio cached / on-the-fly: {ours['total'] / uncached['total']:.3f} (target <= 0.55; the cache makes "
          f"the epoch {uncached['total'] / ours['total']:.2f}x faster)")
    print(f"data wait share of the cached epoch: {100 * ours['data'] / ours['total']:.2f} % (target < 2 %)")
    print(f"padded frames share in batches: {100 * (padded - real) / padded:.2f} % (target < 5 %)")

    # The arithmetic: what each side computes, how fast, and the ratio at equal speed.
    probe_flops = probe_step_flops(task.model.lstm.input_size, args.hidden, args.lstm_layers,
                                   task.model.output.out_features) * padded
    forward_flops = w2v_flops / w2v_frames * real
    print(f"\narithmetic: probe step {probe_flops / padded / 1e6:.1f} MFLOP per padded frame, "
          f"W2V forward {w2v_flops / w2v_frames / 1e6:.1f} MFLOP per frame")
    peak = matmul_gflops()
    print(f"achieved: probe {probe_flops / ours['total'] / 1e9:.0f} GFLOP/s, W2V forward (with loading) "
          f"{forward_flops / uncached['data'] / 1e9:.0f} GFLOP/s; one 2048x2048 matrix product "
          f"{peak:.0f} GFLOP/s")
    print(f"cached / on-the-fly at equal GFLOP/s: {probe_flops / (probe_flops + forward_flops):.3f} "
          f"(below it only if the LSTM computes faster per FLOP than W2V's forward)")


if __name__ == "__main__":
    main()
