"""The study's whole table on this machine: each stage's rate measured in one run, then projected
to the study's sizes.

    python benchmarks/study_time.py [--model builtin:base] [--device cpu] [--repeat 1] [--dir DIR]
                                    [--compute-dtype float32] [--precision fp32] [--memory-budget 8]

The study (DESIGN.md, README "The real experiments"): every layer of W2V-Base extracted from
31.4 h of audio (10 h train, 10.7 h dev, 10.7 h test), then 39 probes (13 layers x 3 seeds, the
3x1024 BiLSTM) and 12 fine-tunes (4 re-init sets x 3 seeds), 10 epochs each, the dev split
evaluated after every epoch and the best epoch tested. Target: under 2 h on one H100.

Measured with w2vcache's own functions on the bundled corpus, each split's utterances (3.2 s on
average) joined end to end into utterances as long as LibriSpeech's on average (train 12.7 s, dev
6.9 s, test 7.0 s: MEAN_SECONDS; --no-join keeps them as they are), then repeated --repeat times
under new ids (train 307 s, dev 83 s, test 131 s of speech per repeat). The lengths matter: a
probe's batch holds --batch-frames frames, so 4 times shorter utterances make 4 times more of
them per batch and a quarter of the LSTM's steps one after another, which on a GPU ran the
paper's probe at twice the frames per second that LibriSpeech-long utterances get:
- extraction: `extract()` of every split into a fresh store, until on disk;
- reading a layer: the three splits of layer 8 (the last, in a smaller model), read and
  checksummed as a probe sweep does once per layer;
- a probe: `probe()` on that layer for 2 epochs; its second epoch's training and dev evaluation, and
  the final evaluation (dev and tests, at the best epoch);
- a fine-tune: `finetune()` for 3 epochs, the first 2 with the transformer frozen: epoch 1
  computes the frozen CNN's outputs and keeps them (CNNCache), epoch 2 is a frozen epoch from the
  kept outputs, epoch 3 trains the transformer; each epoch's dev evaluation, the final evaluation,
  and what the run costs besides ("the rest": each epoch's checkpoint saves, loading the model,
  the sweep's checks), counted once per epoch, which errs long.

Projected, per second of audio of each split, linearly: an epoch costs what it costs per second
of train audio, an evaluation per second of the split evaluated. A fine-tune's 10 epochs are the
first run's epoch 1 (the sweep's later runs find the CNN's outputs kept: same CNN weights) and
otherwise epoch 2 (frozen) or epoch 3 (transformer trained). That assumes the study's CNN outputs
stay kept: 7.7 GB for train and dev, so --memory-budget 10 or more. Short runs flatter nothing
but warm-up, which this counts at its full weight in the measured epochs, so the projection errs
long where the bench set is small (a GPU wants --repeat 10 or more to fill its batches).
"""

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile

from w2vcache.audio import SAMPLE_RATE, load_audio
from w2vcache.corpus import build_corpus
from w2vcache.extract import ExtractConfig, extract
from w2vcache.finetune import FinetuneConfig, finetune
from w2vcache.layers import layer_index, layer_name
from w2vcache.probe import SplitFeatures, probe
from w2vcache.store import open_store
from w2vcache.train import TrainConfig

HOURS = {"train": 10.0, "dev": 10.7, "test": 10.7}  # the study's splits (LibriSpeech's dev and test: clean + other)
LAYERS, SEEDS, REINITS, EPOCHS, FROZEN = 13, 3, 4, 10, 3
PROBE_LAYER = 8  # the study's best layer; the last one where a model has fewer
TESTS = ("test-clean", "test-other")
# LibriSpeech's mean utterance lengths, seconds: train-clean-100, dev-clean + dev-other,
# test-clean + test-other.
MEAN_SECONDS = {"train": 12.7, "dev": 6.9, "test-clean": 7.0, "test-other": 7.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="each bundled split repeated this many times")
    parser.add_argument("--no-join", action="store_true", help="keep the bundled utterances' own lengths "
                        "(3.2 s on average) rather than joining them to LibriSpeech's")
    parser.add_argument("--dir", help="where the store and runs go (default: a temporary folder)")
    parser.add_argument("--compute-dtype", default="float32", help="extraction's (extract --compute-dtype)")
    parser.add_argument("--precision", default="fp32", help="fine-tuning's (finetune --precision)")
    parser.add_argument("--memory-budget", type=float, default=8.0, help="GB, for the probe's and fine-tune's data")
    args = parser.parse_args()
    budget = int(args.memory_budget * 1e9)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        corpus = build_corpus() if args.no_join else joined(build_corpus(), Path(tmp) / "joined")
        corpus = repeated(corpus, args.repeat, Path(tmp) / "audio")
        seconds = {split: sum(len(load_audio(u.path)) for u in utterances) / SAMPLE_RATE
                   for split, utterances in corpus.splits.items()}
        bench = {"train": seconds["train"], "dev": seconds["dev"], "test": sum(seconds[s] for s in TESTS)}
        scale = {split: HOURS[split] * 3600 / bench[split] for split in HOURS}  # study seconds per bench second
        mean = {split: seconds[split] / len(corpus.splits[split]) for split in seconds}
        print(f"model {args.model}, device {args.device}, bench corpus: "
              + ", ".join(f"{split} {s:.0f} s" for split, s in bench.items()) + f" (bundled x {args.repeat}; "
              + ("utterances as bundled, " if args.no_join else "utterances joined, ")
              + "mean " + ", ".join(f"{split} {m:.1f} s" for split, m in mean.items()) + ")")

        store = str(Path(tmp) / "bench.zarr")
        t = time.perf_counter()
        extract(corpus, ExtractConfig(model=args.model, store=store, device=args.device,
                                      compute_dtype=args.compute_dtype), progress=False)
        extract_s = time.perf_counter() - t

        opened = open_store(store)
        probed = min(PROBE_LAYER, max(i for i in map(layer_index, opened.layers) if i is not None))
        t = time.perf_counter()
        for split in ("train", "dev", *TESTS):
            SplitFeatures(opened, split, layer_name(probed), budget)
        read_s = time.perf_counter() - t

        train = TrainConfig(epochs=2)
        t = time.perf_counter()
        result = probe(store, layers=str(probed), out=str(Path(tmp) / "runs"), train_config=train,
                       memory_budget=budget, device=args.device, progress=False)
        probe_run = run_costs(result.finished[0], time.perf_counter() - t)

        train = TrainConfig(epochs=3)
        t = time.perf_counter()
        result = finetune(corpus, args.model, out=str(Path(tmp) / "runs"), train_config=train,
                          config=FinetuneConfig(freeze_epochs=2, precision=args.precision), device=args.device,
                          progress=False, cnn_memory=budget)
        finetune_run = run_costs(result.finished[0], time.perf_counter() - t)

    audio = sum(bench.values())
    study_audio = sum(HOURS.values()) * 3600
    stages = {"extraction": extract_s / audio * study_audio, "layer reads": LAYERS * read_s / audio * study_audio}
    p = probe_run
    # "rest" holds the per-epoch saves (checkpoint.pt, best.pt) and the run's setting up: counted
    # per epoch, which errs long on the setting up.
    one_probe = (EPOCHS * (p.train[1] * scale["train"] + p.dev[1] * scale["dev"])
                 + p.final * (HOURS["dev"] + HOURS["test"]) * 3600 / (bench["dev"] + bench["test"])
                 + EPOCHS / len(p.train) * max(0.0, p.rest - read_s))  # a sweep reads a layer once: "layer reads"
    stages["probes"] = LAYERS * SEEDS * one_probe
    f = finetune_run
    frozen = f.train[1] * scale["train"] + f.dev[1] * scale["dev"]
    full = f.train[2] * scale["train"] + f.dev[2] * scale["dev"]
    first = f.train[0] * scale["train"] + f.dev[0] * scale["dev"]
    final = f.final * (HOURS["dev"] + HOURS["test"]) * 3600 / (bench["dev"] + bench["test"])
    runs = REINITS * SEEDS
    stages["fine-tunes"] = (first - frozen) + runs * ((FROZEN * frozen) + (EPOCHS - FROZEN) * full + final
                                                     + EPOCHS / len(f.train) * f.rest)

    print("\nmeasured (bench corpus):")
    print(f"  extraction      {extract_s:8.1f} s  ({audio / extract_s:8.1f} s of audio / s)")
    print(f"  layer {probed:<2} read     {read_s:8.1f} s  ({audio / read_s:8.1f} s of audio / s)")
    for name, run in (("probe", probe_run), ("fine-tune", finetune_run)):
        epochs = ", ".join(f"epoch {i + 1} train {tr:.1f} s + dev {dv:.1f} s" for i, (tr, dv) in enumerate(zip(run.train, run.dev)))
        print(f"  {name:<10} {epochs}; final evaluation {run.final:.1f} s; the rest {run.rest:.1f} s")
    print(f"\nprojected: the study's table ({sum(HOURS.values()):.1f} h of audio; {LAYERS * SEEDS} probes, "
          f"{runs} fine-tunes, {EPOCHS} epochs each) on this machine:")
    for name, s in stages.items():
        print(f"  {name:<12} {s / 3600:8.2f} h")
    total = sum(stages.values())
    print(f"  {'total':<12} {total / 3600:8.2f} h  (target on one H100: under 2 h)")


class RunCosts:
    """A finished run's seconds, from its own records: per epoch, training and dev evaluation; the
    final evaluation; and the rest of `wall` (loading, bookkeeping)."""

    def __init__(self, train, dev, final, rest):
        self.train, self.dev, self.final, self.rest = train, dev, final, rest


def run_costs(run_dir: str, wall: float) -> RunCosts:
    epochs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timings = json.loads((Path(run_dir) / "result.json").read_text())["timings"]
    train = [e["train_seconds"] for e in epochs]
    dev = [e["seconds"] - e["train_seconds"] for e in epochs]
    return RunCosts(train, dev, timings["test_s"], max(0.0, wall - timings["total_s"]))


def joined(corpus, folder: Path):
    """`corpus` with each split's consecutive utterances joined end to end (audio and transcripts)
    into utterances about as long as LibriSpeech's (MEAN_SECONDS), written under `folder`."""
    splits = {}
    for split, utterances in corpus.splits.items():
        waves = [load_audio(u.path) for u in utterances]
        per = max(1, round(MEAN_SECONDS[split] * SAMPLE_RATE / np.mean([len(w) for w in waves])))
        (folder / split).mkdir(parents=True, exist_ok=True)
        splits[split] = []
        for start in range(0, len(utterances), per):
            group = utterances[start: start + per]
            path = folder / split / f"{group[0].id}-joined.wav"
            soundfile.write(path, np.concatenate(waves[start: start + per]), SAMPLE_RATE, subtype="FLOAT")
            splits[split].append(replace(group[0], id=f"{group[0].id}-joined", path=str(path),
                                         text=" ".join(u.text for u in group)))
    corpus.splits = splits
    return corpus


def repeated(corpus, times: int, folder: Path):
    """`corpus` with each split's utterances repeated `times` times under new ids, each copy its own
    file (a link under `folder`): fine-tuning knows a batch by its files, and copies of one batch
    would find each other's kept CNN outputs."""
    if times == 1:
        return corpus

    def copy(u, i):
        link = folder / f"r{i}" / Path(u.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(Path(u.path).resolve())
        return replace(u, id=f"{u.id}-r{i}", path=str(link))

    corpus.splits = {split: [copy(u, i) for i in range(times) for u in utterances]
                     for split, utterances in corpus.splits.items()}
    return corpus


if __name__ == "__main__":
    main()
