"""The whole workflow in one call, on a fresh install, with no network: the built-in model over the
bundled corpus -> extract -> probe every layer and their learnt weighted sum -> fine-tune the
baseline and one re-init variant -> extract the fine-tuned baseline -> similarity of its layers
with the pre-trained ones (linear CKA on dev) -> report.

The built-in model's weights are random, so its curve by layer shows the workflow working, not a
finding about W2V: the probes and fine-tunes learn (their CER falls far below 100 %), but every
layer of a random model carries about the same information. The demo's last lines say what each
step reached and how long the whole run took.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from .corpus import build_corpus
from .extract import ExtractConfig, extract
from .figure import NO_MATPLOTLIB, can_plot
from .finetune import FinetuneConfig, finetune
from .probe import ProbeConfig, probe
from .report import SIMILARITY_DIR, best_probe, find_similarities, similarity_text, summarize, write_report
from .runs import find_runs, finetune_experiment, run_dir
from .similarity import similarity
from .threads import available_cores
from .train import TrainConfig

RANDOM_WEIGHTS_NOTE = (
    "Note: the built-in model has random weights: its probes and fine-tunes learn, but every layer of a "
    "random model carries about the same information, so this curve shows the workflow, not a finding "
    "about Wav2Vec 2.0. Run the same steps with --model facebook/wav2vec2-base for real numbers."
)

SIMILARITY_NAME = "finetuned-vs-pretrained"  # runs/similarity/<this>/similarity.json, read by the report


@dataclass
class DemoConfig:
    """Sizes that finish in under 3 minutes on 2 idle CPU cores and visibly learn; the real recipe's
    are in the README. Chosen on the dev split: the probe's dev CER stops improving after about 25
    epochs (it overfits the 96 training utterances); 22 leave room for the weighted probe and the
    similarity steps within 3 minutes, at about 1 to 2 points more of the best probe's dev CER
    (measured before the loop's Adam was fused: 25 epochs 70.0 %, 22: 71.7 %, 20: 72.7 %; 22 now
    give 70.9 %). Fine-tuning the random tiny model needs many small
    updates to leave CTC's all-blank plateau. Every run keeps its epoch of lowest dev CER: on 5
    minutes of training speech WER stays near 100 % long after CER has fallen."""

    model: str = "builtin:tiny"
    probe_epochs: int = 22
    probe_hidden: int = 128
    probe_lstm_layers: int = 1
    probe_batch_frames: int = 600  # small batches: many updates in few epochs
    probe_lr: float = 3e-3
    probe_dropout: float = 0.0  # 0.3 and 0.5 were measured too: no better on dev
    finetune_epochs: int = 16
    finetune_freeze_epochs: int = 1
    finetune_lr: float = 3e-3
    finetune_batch_seconds: float = 8.0
    finetune_reinit: tuple[int, ...] = (4,)  # the built-in tiny model's top block
    seed: int = 0
    # Runs trained at once (`probe --jobs`, `finetune --jobs`): runs this small use one core
    # each; None: two where this process may use two cores or more.
    jobs: int | None = None


def demo(out="demo", config: DemoConfig = DemoConfig(), progress: bool = True, num_threads: int | None = None) -> dict:
    """Run every step into `out`; returns the report's paths, the step timings and what was reached.
    Re-running resumes: finished steps are skipped. `num_threads`: torch's CPU threads (threads.py)."""
    out = Path(out)
    started = time.perf_counter()
    timings = {}
    say = print if progress else (lambda *a, **k: None)

    def step(name, fn):
        say(f"\n== {name}")
        started = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - started
        return result

    corpus = build_corpus()
    store, tuned_store = out / "features.zarr", out / "finetuned.zarr"
    runs = out / "runs"
    baseline = run_dir(runs, "finetune", finetune_experiment(()), config.seed)
    schedule = dict(warmup_epochs=1.0, seed=config.seed, select_by="cer")

    jobs = config.jobs or min(2, available_cores())

    def extract_from(model, into):
        return extract(corpus, ExtractConfig(model=str(model), store=str(into), threads=num_threads),
                       progress=progress)

    step("extract: every layer of the built-in W2V over the bundled corpus", lambda: extract_from(config.model, store))
    # One call trains both: each layer alone, then their learnt weighted sum (the SUPERB protocol).
    step("probe: a BiLSTM-CTC on every layer, and on their learnt weighted sum",
         lambda: probe(str(store), "all,weighted", str(config.seed), runs,
                       ProbeConfig(hidden=config.probe_hidden, lstm_layers=config.probe_lstm_layers,
                                   batch_frames=config.probe_batch_frames, dropout=config.probe_dropout),
                       TrainConfig(epochs=config.probe_epochs, lr=config.probe_lr, **schedule),
                       progress=progress, num_threads=num_threads, jobs=jobs))
    step(f"finetune: baseline and re-initialised block(s) {','.join(map(str, config.finetune_reinit))}",
         lambda: finetune(corpus, config.model, [(), config.finetune_reinit], [config.seed], runs,
                          FinetuneConfig(freeze_epochs=config.finetune_freeze_epochs,
                                         batch_seconds=config.finetune_batch_seconds, num_workers=0),
                          TrainConfig(epochs=config.finetune_epochs, lr=config.finetune_lr, **schedule),
                          progress=progress, num_threads=num_threads, jobs=jobs))
    step("extract: every layer of the fine-tuned baseline", lambda: extract_from(baseline, tuned_store))
    # Under RUNS/similarity/, where `w2vcache report` finds it; the fine-tuned layers are the rows.
    step("similarity: each fine-tuned layer against each pre-trained one (linear CKA, dev)",
         lambda: similarity(str(tuned_store), str(store), split="dev", out=runs / SIMILARITY_DIR / SIMILARITY_NAME,
                            figure=False, progress=progress))  # the report draws it, with the other figures
    paths = step("report", lambda: write_report(runs, runs / "report", figure=can_plot()))
    say("\n" + Path(paths["md"]).read_text())
    say(RANDOM_WEIGHTS_NOTE)
    wall = time.perf_counter() - started
    summary = reached(runs)
    say(f"\ntable:  {paths['md']}\nfigure: {_figure_line(paths)}\n"
        + f"wall time {wall:.0f} s: " + ", ".join(f"{name.split(':')[0]} {seconds:.0f} s" for name, seconds in timings.items()))
    for line in summary["lines"]:
        say(line)
    return {"paths": paths, "timings": timings, "wall_seconds": wall, "reached": summary}


def _figure_line(paths: dict) -> str:
    figures = [str(paths[k]) for k in ("png", "similarity_png") if paths.get(k)]
    return ", ".join(figures) or NO_MATPLOTLIB


def reached(runs) -> dict:
    """What the demo's steps reached: the best probe chosen on dev alone (by CER, which moves long
    before WER does on a few minutes of speech), each fine-tune, as dev and test error rates; the
    layer fine-tuning changed most (lowest CKA with itself); the weighted probe's heaviest layer."""
    rows = summarize(find_runs(runs))

    def rates(row) -> str:
        return ", ".join(f"{split} CER {row.cer_percent[split].mean:.1f} % / WER {row.wer_percent[split].mean:.1f} %"
                         for split in row.cer_percent)

    best, on = best_probe(rows, "cer") or (None, None)
    lines = [f"reached: best probe layer {best.label} (chosen on {on}): {rates(best)}"] if best else []
    lines += [f"reached: fine-tune re-init {row.label}: {rates(row)}" for row in rows if row.kind == "finetune"]
    changed = next((s.changed_most for s in find_similarities(runs) if s.name == SIMILARITY_NAME), None)
    if changed:
        lines.append(f"reached: fine-tuning changed {changed[0]} most (linear CKA {similarity_text(changed[1])} with the "
                     f"pre-trained {changed[0]}; 1 is unchanged)")
    weighted = next((r for r in rows if r.weighted and r.layer_weights), None)
    top = max(weighted.layer_weights.items(), key=lambda item: item[1].mean) if weighted else None
    if top:
        lines.append(f"reached: weighted probe: {rates(weighted)}; heaviest layer {top[0]} "
                     f"(weight {top[1].mean:.3f}; equal weights would be {1 / len(weighted.layer_weights):.3f})")
    return {"best_probe_layer": best.label if best else None,
            "best_probe_dev_cer_percent": best.cer_percent[on].mean if best else None,
            "changed_most_layer": changed[0] if changed else None,
            "changed_most_cka": changed[1] if changed else None,
            "weighted_top_layer": top[0] if top else None,
            "weighted_top_weight": top[1].mean if top else None,
            "lines": lines}

