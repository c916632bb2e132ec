"""What the cache buys: one probe epoch from the store against the same epoch computed the way
toolkits without a cache do it (W2V forward inside every training step), in one run.

    python benchmarks/probe_cost.py [--model builtin:base] [--layer 8] [--hidden 1024] [--seconds 120]

Prints both epoch times and their ratio, the share of step time spent waiting for data (target
under 2 %) and the share of padded frames in the batches (target under 5 %; the LSTM never
computes on them, being fed packed sequences).
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from w2vcache.audio import load_audio
from w2vcache.backbone import SAMPLE_RATE, forward_layers, load_backbone
from w2vcache.corpus import build_corpus
from w2vcache.extract import ExtractConfig, extract
from w2vcache.probe import ProbeConfig, ProbeTask
from w2vcache.store import open_store
from w2vcache.train import TrainConfig, seed_everything, train


class ForwardEveryStep:
    """A feature source that runs W2V on the batch's audio instead of reading the store."""

    def __init__(self, cached, backbone, layer_index: int, paths: dict):
        self.cached, self.backbone, self.layer_index = cached, backbone, layer_index
        self.paths = [paths[i] for i in cached.ids]
        self.ids, self.texts, self.lengths, self.in_memory = cached.ids, cached.texts, cached.lengths, False

    def get(self, indices):
        waves = [load_audio(self.paths[i]) for i in indices]
        outputs, frames = forward_layers(self.backbone, waves)
        layer = outputs[self.layer_index]
        return [layer[b, :n].numpy().astype(np.float16) for b, n in enumerate(frames)]


def epoch(task, out: Path) -> dict:
    train(task, TrainConfig(epochs=1, dev_split="train", test_splits=()), out, {"kind": "benchmark"}, progress=False)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--lstm-layers", type=int, default=3)
    parser.add_argument("--batch-frames", type=int, default=4000)
    parser.add_argument("--seconds", type=float, default=120.0, help="training audio taken from the bundled corpus")
    args = parser.parse_args()

    corpus = build_corpus()
    chosen, total = [], 0.0
    for u in corpus.splits["train"]:
        if total >= args.seconds:
            break
        chosen.append(u)
        total += len(load_audio(u.path)) / SAMPLE_RATE
    corpus.splits, corpus.sources = {"train": chosen}, {"train": ["bundled train, first utterances"]}
    backbone = load_backbone(args.model)
    layer = f"layer{args.layer:02d}"
    print(f"model {args.model}, layer {args.layer}, probe {args.lstm_layers}x{args.hidden} BiLSTM, "
          f"{len(chosen)} utterances, {total:.1f} s of audio")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        extract(corpus, ExtractConfig(model=args.model, store=str(tmp / "s.zarr"), layers=str(args.layer)),
                progress=False, backbone=backbone)
        store = open_store(tmp / "s.zarr")
        config = ProbeConfig(hidden=args.hidden, lstm_layers=args.lstm_layers, batch_frames=args.batch_frames)
        tc = TrainConfig(epochs=1, dev_split="train", test_splits=())

        seed_everything(0)
        cached_task = ProbeTask(store, layer, config, tc)
        cached = epoch(cached_task, tmp / "cached")

        seed_everything(0)
        uncached_task = ProbeTask(store, layer, config, tc)
        paths = {u.id: u.path for u in chosen}
        uncached_task.splits["train"] = ForwardEveryStep(cached_task.splits["train"], backbone, args.layer, paths)
        uncached = epoch(uncached_task, tmp / "uncached")

        batches = cached_task.batches["train"]
        lengths = cached_task.splits["train"].lengths
        padded = sum(max(lengths[b]) * len(b) for b in batches)
        real = int(lengths.sum())

    print(f"probe epoch from the store       {cached['train_seconds']:8.2f} s")
    print(f"same epoch, W2V in every step    {uncached['train_seconds']:8.2f} s")
    print(f"ratio cached / uncached: {cached['train_seconds'] / uncached['train_seconds']:.3f} "
          f"(the cache makes the epoch {uncached['train_seconds'] / cached['train_seconds']:.1f}x faster)")
    print(f"data wait share of step time (cached): {100 * cached['data_wait_seconds'] / cached['train_seconds']:.2f} % (target < 2 %)")
    print(f"padded frames share in batches: {100 * (padded - real) / padded:.2f} % (target < 5 %)")


if __name__ == "__main__":
    main()
