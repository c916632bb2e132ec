"""Finished runs -> the seed's table (Markdown, CSV, JSON) and its WER figure (PNG).

`runs.find_runs` reads every run directory under RUNS (docs/RUNS.md), `summarize` groups the finished
ones into experiments and averages over seeds, `write_report` writes the files.

- An experiment is a probe at one layer (BiLSTM or linear), a weighted probe (either kind, on the
  learnt weighted sum of every layer), or a fine-tune with one set of re-initialised blocks
  ("none", "12", "11,12", ...). Rows come in that order: BiLSTM probes by layer (an unnumbered
  layer, the CNN output "cnn", first) and the weighted BiLSTM probe, the same for linear probes,
  then fine-tunes with "none" first and the others by how many blocks they re-initialise, then by
  block number. Two finished runs of one experiment and seed are an error (a copied run would be
  counted twice). Runs written before linear and weighted probes existed are BiLSTM layer probes.
- Each cell is the mean and the sample standard deviation (ddof=1) over the finished seeds that
  report that split. With one seed the standard deviation is None (JSON null, an empty CSV
  cell) and the Markdown cell shows "n=1" without a "±".
- Every split of result.json that has a WER is carried (dev, test-clean, test-other, or any
  other name), in the order dev, test-clean, test-other, then the others alphabetically.
- Fine-tune rows carry, for each WER split, the change of the mean against the mean of the
  fine-tuning baseline (no block re-initialised); None where there is no baseline.
- Failed and unfinished runs are listed, never averaged. Seeds averaged together whose
  config.json differ in train/model/data settings are pointed out in a note; seeds of different
  models (the store's, or the one fine-tuned), or trained on different utterances, are refused:
  their mean means nothing.
- The best layer is the BiLSTM layer probe with the lowest mean dev WER (test-clean where there is
  no dev); the linear probes' best layer is named apart.
- Weighted probes carry their softmax layer weights at the best epoch (layer_weights.json), mean
  and sample standard deviation over seeds.

Units: WER and CER in percent as result.json gives them (21.0 = 21 %; a WER above 100 %, from
insertions, stays above 100), deltas in percentage points. Markdown rounds to two decimals; CSV and
JSON keep them unrounded, under names that say the unit (dev_wer_percent_mean, delta_wer_points).

Similarity results (`w2vcache similarity ... --out RUNS/similarity/<name>`, docs/ANALYSES.md) under
RUNS/similarity/ are read too: the report lists them, tabulates each diagonal (how much each layer
changed, for a fine-tuned store against its pre-trained one) and draws their heatmaps and diagonal
curves in a second figure (report-similarity.png).

The figures are figure.py's.
"""

import csv
import io
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, record
from .errors import W2VCacheError
from .runs import CONFIG, DATA, DECODED, MEASURES, RESULT, STATUSES, Run, experiment_key, experiment_name, find_runs

SPLIT_ORDER = ("dev", "test-clean", "test-other")  # splits shown first; any others follow by name
CONFIG_SECTIONS = ("train", "model", "data")  # compared across the seeds of one experiment
CONFIG_IGNORED = ("seed", "num_workers")  # keys of those sections that may differ between seeds

# The Markdown section of each kind of probe.
PROBE_SECTIONS = {"bilstm": "Probes (frozen W2V layer, BiLSTM-CTC)",
                  "linear": "Linear probes (frozen W2V layer, linear-CTC)"}
PROBE_NAMES = {"bilstm": "BiLSTM", "linear": "linear"}

FORMATS = ("md", "csv", "json")
REPORT_NAME = "report"  # out_dir/report.md, report.csv, report.json, report.png
SIMILARITY_FIGURE = f"{REPORT_NAME}-similarity.png"  # out_dir/report-similarity.png: heatmaps, diagonals
# `w2vcache similarity ... --out RUNS/similarity/<name>` puts its results where the report finds them.
SIMILARITY_DIR = "similarity"
# How a similarity.json's measure is said (similarity.py computes them).
SIMILARITY_LABELS = {"linear_cka": "linear CKA", "svcca": "SVCCA", "pwcca": "PWCCA"}
SIMILARITY_FILE = "similarity.json"
# Said once under the fine-tuning table: what the fine-tunes train, which the table alone does not show.
FROZEN_CNN_NOTE = ("The fine-tunes train the transformer and the CTC head with the CNN feature encoder frozen, "
                   "as fairseq and transformers do when fine-tuning W2V for ASR; `--train-feature-encoder` "
                   "trains it too.")


@dataclass
class Stat:
    """Mean and sample standard deviation of one measure over the seeds that report it."""

    mean: float
    std: float | None  # None with a single seed
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass
class Row:
    """One experiment, averaged over its finished seeds."""

    kind: str
    experiment: str
    layer: int | None
    reinit: list[int]
    seeds: list[int]  # the finished seeds averaged
    wer_percent: dict[str, Stat]  # split -> stat
    cer_percent: dict[str, Stat]
    # fine-tunes: mean WER - baseline mean WER, in percentage points
    delta_wer_points: dict[str, float | None] = field(default_factory=dict)
    not_included: list[str] = field(default_factory=list)  # names of this experiment's other runs
    probe: str | None = None  # probes: "bilstm" or "linear"
    weighted: bool = False
    layer_weights: dict[str, Stat] | None = None  # weighted probes: layer -> softmax weight at the best epoch

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def key(self) -> tuple:
        return experiment_key(self.kind, self.layer, self.reinit, self.experiment, self.probe, self.weighted)

    @property
    def label(self) -> str:
        """The layer ("8", "cnn" for the CNN output, "weighted") or the re-init set ("none", "11,12")."""
        if self.kind == "probe":
            if self.layer is not None:
                return str(self.layer)
            return "weighted" if self.weighted else self.experiment.removeprefix(f"{self.probe}-")
        return reinit_label(self.reinit)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "probe": self.probe, "experiment": self.experiment, "layer": self.layer,
            "weighted": self.weighted, "reinit": self.reinit, "label": self.label, "n": self.n, "seeds": self.seeds,
            "wer_percent": {s: v.to_dict() for s, v in self.wer_percent.items()},
            "cer_percent": {s: v.to_dict() for s, v in self.cer_percent.items()},
            "delta_wer_points": self.delta_wer_points if self.kind == "finetune" else None,
            "layer_weights": None if self.layer_weights is None else {k: v.to_dict() for k, v in self.layer_weights.items()},
            "not_included": self.not_included,
        }


def reinit_label(reinit) -> str:
    return ",".join(map(str, reinit)) if reinit else "none"


@dataclass
class Similarity:
    """One `w2vcache similarity` result under RUNS/similarity/, as the report uses it."""

    name: str  # its folder relative to RUNS/similarity ("finetuned-vs-pretrained")
    path: Path  # its similarity.json
    split: str
    layers_a: list[str]  # the matrix's rows
    layers_b: list[str]  # its columns
    matrix: list[list[float | None]]  # the measure; None where a layer has no variance
    diagonal: list[float | None] | None  # measure(layer k of A, layer k of B); None within one store
    frames: int
    model_a: str | None
    model_b: str | None  # None: one store against itself
    measure: str = "linear_cka"  # similarity.json's name: linear_cka, svcca, pwcca

    @property
    def label(self) -> str:
        return SIMILARITY_LABELS.get(self.measure, self.measure)

    @property
    def changed_most(self) -> tuple[str, float] | None:
        """The layer least similar to the same layer of the other store: the one fine-tuning changed most."""
        scored = [(v, name) for name, v in zip(self.layers_a, self.diagonal or ()) if v is not None]
        return (min(scored)[1], min(scored)[0]) if scored else None

    @property
    def against(self) -> str:
        return f"{self.model_a} against {self.model_b}" if self.model_b else f"within {self.model_a}"

    def to_dict(self) -> dict:
        most = self.changed_most
        return {"name": self.name, "path": str(self.path), "split": self.split, "frames": self.frames,
                "model_a": self.model_a, "model_b": self.model_b, "layers_a": self.layers_a,
                "layers_b": self.layers_b, "matrix": self.matrix, "diagonal": self.diagonal,
                "measure": self.measure,
                "changed_most": None if most is None else {"layer": most[0], "value": most[1],
                                                           **({"cka": most[1]} if self.measure == "linear_cka" else {})}}


def find_similarities(runs_dir) -> list[Similarity]:
    """Every similarity.json under RUNS/similarity/, at any depth, sorted by folder."""
    root = Path(runs_dir) / SIMILARITY_DIR
    if not root.is_dir():
        return []
    return [read_similarity(path, path.parent.relative_to(root).as_posix())
            for path in sorted(root.rglob(SIMILARITY_FILE))]


def similarity_of(data: dict, path: Path, name: str) -> Similarity:
    """A similarity result as the report sees it, from what similarity.json holds."""
    return Similarity(
        name=name, path=path, split=data["split"], layers_a=list(data["layers_a"]),
        layers_b=list(data["layers_b"]), matrix=data["matrix"], diagonal=data.get("diagonal"),
        frames=data["frames"], model_a=(data.get("store_a") or {}).get("model"),
        model_b=(data.get("store_b") or {}).get("model"), measure=data.get("measure", "linear_cka"))


def read_similarity(path: Path, name: str) -> Similarity:
    """similarity.json as `w2vcache similarity` writes it; an error naming the file otherwise."""
    try:
        return similarity_of(json.loads(path.read_text()), path, name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = f"{type(e).__name__}: {e}"
        raise W2VCacheError(f"{path}: not a similarity result of w2vcache similarity ({why})") from None


# ---------------------------------------------------------------------------------------------
# Averaging


def split_order(names) -> list[str]:
    """dev, test-clean, test-other first, then any other split by name."""
    names = set(names)
    return [s for s in SPLIT_ORDER if s in names] + sorted(names - set(SPLIT_ORDER))


def _comparable(section):
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in CONFIG_IGNORED}
    return section


def _config_differences(runs: list[Run]) -> list[str]:
    """Config entries (section.key) that differ between the seeds of one experiment."""
    differing = []
    for section in CONFIG_SECTIONS:
        values = [_comparable(r.config.get(section)) for r in runs if r.config]
        if len(values) < 2:
            continue
        if section == "data" and not all(isinstance(v, dict) and DATA in v for v in values):
            # A seed recorded before runs named their utterances: nothing to compare (summarize
            # compares those that have them).
            values = [{k: x for k, x in v.items() if k != DATA} if isinstance(v, dict) else v for v in values]
        keys = set().union(*(v.keys() for v in values if isinstance(v, dict)))
        if not all(isinstance(v, dict) for v in values):
            if any(v != values[0] for v in values):
                differing.append(section)
            continue
        for key in sorted(keys):
            first = values[0].get(key)
            if any(v.get(key) != first for v in values[1:]):
                differing.append(f"{section}.{key}")
    return differing


def _model_of(run: Run) -> tuple:
    """The model a run's numbers come from: the store's (probes: its weights, which say it whatever
    path or name it was loaded by) or the one fine-tuned (its name: the weights differ by seed
    where blocks are re-initialised, and a revision may be recorded on one host and not another).
    Returns (what is compared, how it is named)."""
    if run.kind == "probe":
        model = (run.config.get("data") or {}).get("model") or {}
        weights = model.get("weight_hash")
        return (weights, f"{model.get('name')} (weights {str(weights)[:12]})") if weights else (model.get("name"),) * 2
    name = ((run.config.get("model") or {}).get("backbone") or {}).get("name")
    return name, f"{name}"


def _utterances(fingerprint: dict) -> str:
    """A run's data fingerprint for a person: 'train 96 (9f2c...), dev 40 (1ab3...)'."""
    return ", ".join(f"{split} {f['utterances']} ({f['sha256'][:8]})" for split, f in fingerprint.items())


def summarize(runs: list[Run]) -> list[Row]:
    """Group finished runs into experiments and average each measure over seeds.

    Returns the rows in report order. Failed and unfinished runs are not averaged; their names
    are kept in each row's `not_included` (an experiment with no finished run has no row).
    """
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.status not in STATUSES:
            raise ValueError(f"run {run.name}: unknown status {run.status!r}")
        groups.setdefault(run.key, []).append(run)

    rows = []
    for key in sorted(groups):
        members = groups[key]
        finished = [r for r in members if r.status == "finished"]
        if not finished:
            continue
        # Models first: runs of two models in one tree share experiment and seed names.
        models = sorted({(r.seed, _model_of(r)) for r in finished if r.config}, key=lambda m: (m[0], str(m[1])))
        if len({key for _, (key, _) in models}) > 1:
            raise W2VCacheError(
                f"{finished[0].kind} {finished[0].experiment}: its seeds were trained on different models ("
                + "; ".join(f"seed {seed}: {label}" for seed, (_, label) in models)
                + "); a mean over them means nothing: report each model's runs from a runs directory of their own")
        corpora = {r.seed: r.config["data"][DATA] for r in finished if r.config and DATA in (r.config.get("data") or {})}
        if len({json.dumps(fingerprint, sort_keys=True) for fingerprint in corpora.values()}) > 1:
            raise W2VCacheError(
                f"{finished[0].kind} {finished[0].experiment}: its seeds were trained on different utterances ("
                + "; ".join(f"seed {seed}: {_utterances(corpora[seed])}" for seed in sorted(corpora))
                + "); a mean over them means nothing: report each corpus's runs from a runs directory of their own")
        by_seed: dict[int, Run] = {}
        for run in finished:
            if run.seed in by_seed:
                raise W2VCacheError(
                    f"{run.path}: seed {run.seed} of {run.kind} {run.experiment} is also finished in "
                    f"{by_seed[run.seed].path}; move one of them out of the runs directory"
                )
            by_seed[run.seed] = run
        finished = [by_seed[s] for s in sorted(by_seed)]
        splits = split_order(s for r in finished for s in r.metrics)
        stats = {}
        for measure in MEASURES:
            stats[measure] = {}
            for split in splits:
                values = [r.metrics[split][measure] for r in finished
                          if split in r.metrics and r.metrics[split][measure] is not None]
                if values:
                    stats[measure][split] = Stat.of(values)
        first = finished[0]
        names = Counter(r.experiment for r in finished)
        rows.append(Row(
            kind=first.kind,
            experiment=names.most_common(1)[0][0],
            layer=first.layer,
            reinit=first.reinit,
            seeds=sorted(by_seed),
            wer_percent=stats["wer_percent"],
            cer_percent=stats["cer_percent"],
            not_included=[r.name for r in members if r.status != "finished"],
            probe=first.probe,
            weighted=first.weighted,
            layer_weights=_mean_weights(finished) if first.weighted else None,
        ))

    baseline = next((r for r in rows if r.kind == "finetune" and not r.reinit), None)
    for row in rows:
        if row.kind != "finetune":
            continue
        row.delta_wer_points = {
            split: (stat.mean - baseline.wer_percent[split].mean if baseline and split in baseline.wer_percent else None)
            for split, stat in row.wer_percent.items()
        }
    return rows


def _mean_weights(runs: list[Run]) -> dict[str, Stat] | None:
    """Each layer's weight over the seeds that recorded their best epoch's weights."""
    recorded = [r.layer_weights for r in runs if r.layer_weights]
    if not recorded:
        return None
    layers = list(dict.fromkeys(layer for weights in recorded for layer in weights))
    return {layer: Stat.of([w[layer] for w in recorded if layer in w]) for layer in layers}


def notes(runs: list[Run]) -> list[str]:
    """Things a reader of the table should know: seeds of one experiment set up differently."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.status == "finished":
            groups.setdefault(run.key, []).append(run)
    found = []
    for key in sorted(groups):
        members = groups[key]
        first = members[0]
        named = first.kind == "probe" and first.layer is None and not first.weighted  # the CNN output
        label = f"{first.kind} " + (first.experiment if named else experiment_name(
            first.kind, first.layer, first.reinit, first.probe, first.weighted))
        names = sorted({r.experiment for r in members})
        if len(names) > 1:
            found.append(f"{label}: seeds averaged together carry different experiment names ({', '.join(names)})")
        differing = _config_differences(members)
        if differing:
            found.append(f"{label}: seeds averaged together differ in {', '.join(differing)}")
    # Rows side by side in one table should have chosen their best epochs on the same split.
    dev_splits = Counter(((r.config or {}).get("train") or {}).get("dev_split") or "dev"
                         for members in groups.values() for r in members)
    if len(dev_splits) > 1:
        found.append("the runs chose their best epochs on different dev splits (" + ", ".join(
            f"{split}: {n} run(s)" for split, n in sorted(dev_splits.items())) + "): a split one run chose on is "
            "held out for the others, so their numbers there do not compare")
    return found


def not_included(runs: list[Run]) -> list[Run]:
    """The failed and unfinished runs, in the order of the table's rows."""
    return sorted((r for r in runs if r.status != "finished"), key=lambda r: (r.key, r.seed, r.name))


def best_probe(rows: list[Row], measure: str = "wer", probe: str = "bilstm") -> tuple[Row, str] | None:
    """The layer probe (BiLSTM, or linear) row with the lowest mean WER (or CER) on dev (test-clean
    where no such probe reports dev). Weighted probes are not layers: they are left out."""
    probes = [r for r in rows if r.kind == "probe" and r.probe == probe and not r.weighted]
    stats = {id(r): getattr(r, f"{measure}_percent") for r in probes}
    names = split_order(s for r in probes for s in stats[id(r)])
    for split in ("dev", *(s for s in names if s.startswith("dev")), "test-clean", *names):
        scored = [r for r in probes if split in stats[id(r)]]
        if scored:
            return min(scored, key=lambda r: (stats[id(r)][split].mean, r.key)), split
    return None


# ---------------------------------------------------------------------------------------------
# Tables


def _percent(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    if stat.std is None:
        return f"{stat.mean:.2f} (n={stat.n})"
    return f"{stat.mean:.2f} ± {stat.std:.2f} (n={stat.n})"


def _points(delta: float | None) -> str:
    if delta is None:
        return "-"
    return f"{round(delta, 2) + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0, so no "-0.00"


def _markdown_table(header: list[str], align: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return out


def render_markdown(rows: list[Row], runs: list[Run], runs_dir=None, figure: str | None = None,
                    similarities: list[Similarity] = (), similarity_figure: str | None = None) -> str:
    """The report as Markdown: a probe table, a fine-tune table, the similarity results, what was
    left out and why. `figure`, `similarity_figure`: the PNGs' names, linked where given."""
    out = [f"# w2vcache report: {runs_dir}" if runs_dir is not None else "# w2vcache report", ""]
    out.append("WER and CER in %: mean ± sample standard deviation over seeds (n = seeds averaged).")

    for kind, heading in PROBE_SECTIONS.items():
        probes = [r for r in rows if r.kind == "probe" and r.probe == kind]
        if not probes:
            continue
        splits = split_order(s for r in probes for s in r.wer_percent)
        cer_splits = split_order(s for r in probes for s in r.cer_percent)
        header = ["layer", "seeds", *(f"{s} WER" for s in splits), *(f"{s} CER" for s in cer_splits)]
        lines = [[r.label, ",".join(map(str, r.seeds)),
                  *(_percent(r.wer_percent.get(s)) for s in splits),
                  *(_percent(r.cer_percent.get(s)) for s in cer_splits)]
                 for r in probes]
        out += ["", f"## {heading}", ""]
        out += _markdown_table(header, ["---:", "---", *["---:"] * (len(header) - 2)], lines)
        best = best_probe(rows, probe=kind)
        if best:
            row, split = best
            which = "Best layer" if kind == "bilstm" else f"Best layer for the {PROBE_NAMES[kind]} probe"
            line = f"{which}: {row.label} (lowest mean {split} WER, {row.wer_percent[split].mean:.2f} %)."
            by_cer = best_probe(rows, "cer", probe=kind)
            if by_cer and by_cer[0] is not row:  # near 100 % WER (little speech) CER tells layers apart
                line += f" By {by_cer[1]} CER: {by_cer[0].label} ({by_cer[0].cer_percent[by_cer[1]].mean:.2f} %)."
            out += ["", line]
        if any(r.weighted for r in probes):
            where = " (its layer weights below)" if any(r.layer_weights for r in probes) else ""
            out += ["", f"weighted: the probe of a learnt softmax-weighted sum of every layer{where}."]
    out += _weights_table(rows)

    tunes = [r for r in rows if r.kind == "finetune"]
    if tunes:
        splits = split_order(s for r in tunes for s in r.wer_percent)
        cer_splits = split_order(s for r in tunes for s in r.cer_percent)
        header = ["re-init", "seeds", *(f"{s} WER" for s in splits), *(f"Δ {s}" for s in splits),
                  *(f"{s} CER" for s in cer_splits)]
        lines = [[r.label, ",".join(map(str, r.seeds)), *(_percent(r.wer_percent.get(s)) for s in splits),
                  *(_points(r.delta_wer_points.get(s)) for s in splits),
                  *(_percent(r.cer_percent.get(s)) for s in cer_splits)]
                 for r in tunes]
        out += ["", "## Fine-tuning (W2V + CTC head, re-initialised blocks)", ""]
        out += _markdown_table(header, ["---", "---", *["---:"] * (len(header) - 2)], lines)
        baseline = next((r for r in tunes if not r.reinit), None)
        if baseline:
            line = "Δ: change of the mean WER against re-init none, in percentage points."
            unpaired = [r.label for r in tunes if r.reinit and r.seeds != baseline.seeds]
            if unpaired:
                line += (f" The seeds of {', '.join(unpaired)} are not the baseline's ({','.join(map(str, baseline.seeds))}):"
                         " their Δ compares means over different seeds.")
            out += ["", line]
        else:
            out += ["", "Δ: not computed, no fine-tuning baseline (re-init none) has finished."]
        out += ["", _feature_encoder_note(runs)]
    out += _decoded_section(decoded_example(rows, runs))
    out += _similarity_section(similarities)

    left_out = not_included(runs)
    if left_out:
        out.append("")
        out += [f"- not included: {r.name} ({r.why_not_included})" for r in left_out]
    extra = notes(runs)
    if extra:
        out.append("")
        out += [f"- note: {n}" for n in extra]
    if figure:
        out += ["", f"![WER by layer and by re-initialised blocks]({figure})"]
    if similarity_figure:
        out += ["", f"![Similarity between layers, and of each layer with itself]({similarity_figure})"]
    return "\n".join(out) + "\n"


def _feature_encoder_note(runs: list[Run]) -> str:
    """FROZEN_CNN_NOTE, naming the fine-tunes (if any) that trained the CNN too."""
    trained = sorted({r.experiment for r in runs
                      if r.kind == "finetune" and r.status == "finished"
                      and (r.config.get("model") or {}).get("train_feature_encoder")})
    if not trained:
        return FROZEN_CNN_NOTE
    return FROZEN_CNN_NOTE + f" These trained it too: {', '.join(trained)}."


def _similarity_section(similarities: list[Similarity]) -> list[str]:
    """Markdown lines: each similarity result in a line, and a table of the diagonals there are."""
    if not similarities:
        return []
    labels = ", ".join(dict.fromkeys(s.label for s in similarities))
    out = ["", f"## Layer similarity ({labels}, `w2vcache similarity`, under {SIMILARITY_DIR}/)", ""]
    out += [f"- {s.name}: {s.label}, {s.against}, split {s.split}, {s.frames} frames, "
            f"{len(s.layers_a)} x {len(s.layers_b)} layers" for s in similarities]
    diagonals = [s for s in similarities if s.diagonal is not None]
    if not diagonals:
        return out
    layers = list(dict.fromkeys(layer for s in diagonals for layer in s.layers_a))
    values = [dict(zip(s.layers_a, s.diagonal)) for s in diagonals]
    lines = [[layer, *("-" if v.get(layer) is None else similarity_text(v[layer]) for v in values)] for layer in layers]
    out += ["", f"{labels} of each layer with the same layer of the other store (1: unchanged; lower: changed more):", ""]
    mixed = len({s.measure for s in diagonals}) > 1  # then each column says its measure
    columns = [f"{s.name} ({s.label})" if mixed else s.name for s in diagonals]
    out += _markdown_table(["layer", *columns], ["---", *["---:"] * len(diagonals)], lines)
    out.append("")
    for s in diagonals:
        most = s.changed_most
        if most:
            out.append(f"Changed most in {s.name}: {most[0]} ({s.label} {similarity_text(most[1])} with itself).")
    return out


def similarity_text(value: float) -> str:
    """A similarity to 3 decimals, or as many more as it takes not to read as 1.000 when below 1
    (a layer fine-tuning barely changed is still told apart from an unchanged one)."""
    for decimals in range(3, 9):
        text = f"{value:.{decimals}f}"
        if value >= 1 or text != f"{1:.{decimals}f}":
            return text
    return text


def decoded_example(rows: list[Row], runs: list[Run]) -> dict | None:
    """One dev utterance as each experiment's lowest finished seed decodes it at its best epoch
    (the runs' decoded/<dev split>.tsv): the utterance of median length among those every such
    run decoded, ties broken by id. None where no run has its decoded transcripts."""
    lowest = {}
    for run in runs:
        if run.status == "finished" and (run.key not in lowest or run.seed < lowest[run.key].seed):
            lowest[run.key] = run
    tables = []
    for row in rows:
        run = lowest.get(row.key)
        if run is None:
            continue
        split = ((run.config or {}).get("train") or {}).get("dev_split") or "dev"
        path = Path(run.path) / DECODED / f"{split}.tsv"
        try:
            with open(path, encoding="utf-8", newline="") as f:
                decoded = {r["id"]: r for r in csv.DictReader(f, delimiter="\t") if r.get("id")}
        except (OSError, KeyError, csv.Error, UnicodeDecodeError):
            continue  # a run from before decoded transcripts were written, or a damaged file
        tables.append((row, run, split, decoded))
    common = set.intersection(*(set(t[3]) for t in tables)) if tables else set()
    if not common:
        return None
    first = tables[0][3]
    words = sorted(int(first[uid]["words"] or 0) for uid in common)
    median = words[(len(words) - 1) // 2]  # the lower median: of two, the shorter reads better
    uid = min(common, key=lambda u: (abs(int(first[u]["words"] or 0) - median), u))
    def label(row: Row) -> str:
        return f"{PROBE_NAMES.get(row.probe, row.probe)} {row.label}" if row.kind == "probe" else f"re-init {row.label}"

    return {
        "split": tables[0][2], "id": uid, "reference": first[uid]["reference"], "words": int(first[uid]["words"] or 0),
        "decoded": [{"experiment": row.experiment, "kind": row.kind, "label": label(row), "seed": run.seed,
                     "word_edits": int(decoded[uid]["word_edits"] or 0), "hypothesis": decoded[uid]["hypothesis"]}
                    for row, run, _, decoded in tables],
    }


def _decoded_section(example: dict | None) -> list[str]:
    """Markdown lines: the example utterance as each experiment decodes it."""
    if example is None:
        return []
    out = ["", f"## One {example['split']} utterance, decoded", "",
           f"Utterance {example['id']} ({example['words']} words), as the lowest seed of each experiment decodes it "
           f"at its best epoch (every utterance: decoded/{example['split']}.tsv in each run).", "",
           f"reference: {example['reference']}", ""]
    lines = [[d["label"], str(d["word_edits"]), _shortened(d["hypothesis"], 3 * len(example["reference"]) + 20)
              .replace("|", "\\|") or "(nothing)"] for d in example["decoded"]]
    return out + _markdown_table(["", "word edits", "decoded"], ["---", "---:", "---"], lines)


def _shortened(text: str, limit: int) -> str:
    """At most `limit` characters: a model that has learnt nothing may emit a symbol at every frame
    (thousands for a few seconds of a high frame rate), which would swamp the table. The whole
    hypothesis stays in the run's decoded TSV and in report.json."""
    return text if len(text) <= limit else f"{text[:limit]} ... ({len(text)} characters)"


def _weights_table(rows: list[Row]) -> list[str]:
    """Markdown lines: each weighted probe's softmax weight per layer at its best epoch (none without one)."""
    weighted = [r for r in rows if r.layer_weights]
    if not weighted:
        return []
    layers = list(dict.fromkeys(layer for r in weighted for layer in r.layer_weights))

    def cell(stat: Stat | None) -> str:
        if stat is None:
            return "-"
        return f"{stat.mean:.3f} (n={stat.n})" if stat.std is None else f"{stat.mean:.3f} ± {stat.std:.3f} (n={stat.n})"

    header = ["layer", *(f"{PROBE_NAMES.get(r.probe, r.probe)} weighted" for r in weighted)]
    lines = [[layer, *(cell(r.layer_weights.get(layer)) for r in weighted)] for layer in layers]
    out = ["", "## Layer weights of the weighted probes (softmax, at the best epoch)", ""]
    out += _markdown_table(header, ["---", *["---:"] * len(weighted)], lines)
    return out + ["", "Each weight is the share of that layer in the sum the probe reads; the weights add up to 1."]


def weight_layers(rows: list[Row]) -> list[str]:
    """The layers weighted probes among `rows` weigh, in their order."""
    return list(dict.fromkeys(layer for r in rows if r.layer_weights for layer in r.layer_weights))


def csv_columns(rows: list[Row]) -> list[str]:
    splits = split_order(s for r in rows for s in [*r.wer_percent, *r.cer_percent])
    columns = ["kind", "probe", "experiment", "layer", "weighted", "reinit", "n", "seeds"]
    for split in splits:
        for measure in MEASURES:
            columns += [f"{split}_{measure}_mean", f"{split}_{measure}_std", f"{split}_{measure}_n"]
    columns += [f"{split}_delta_wer_points" for split in splits]
    for layer in weight_layers(rows):
        columns += [f"weight_{layer}_mean", f"weight_{layer}_std"]
    return columns


def render_csv(rows: list[Row]) -> str:
    """One line per experiment; percent as in result.json, unrounded, empty where there is no value."""
    columns = csv_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        line = {"kind": row.kind, "probe": row.probe or "", "experiment": row.experiment,
                "layer": "" if row.layer is None else row.layer,
                "weighted": str(row.weighted).lower() if row.kind == "probe" else "",
                "reinit": reinit_label(row.reinit) if row.kind == "finetune" else "",
                "n": row.n, "seeds": " ".join(map(str, row.seeds))}
        for layer, stat in (row.layer_weights or {}).items():
            line[f"weight_{layer}_mean"] = repr(stat.mean)
            line[f"weight_{layer}_std"] = "" if stat.std is None else repr(stat.std)
        for measure in MEASURES:
            for split, stat in getattr(row, measure).items():
                line[f"{split}_{measure}_mean"] = repr(stat.mean)
                line[f"{split}_{measure}_std"] = "" if stat.std is None else repr(stat.std)
                line[f"{split}_{measure}_n"] = stat.n
        for split, delta in row.delta_wer_points.items():
            line[f"{split}_delta_wer_points"] = "" if delta is None else repr(delta)
        writer.writerow(line)
    return buffer.getvalue()


def report_dict(rows: list[Row], runs: list[Run], runs_dir=None, similarities: list[Similarity] = ()) -> dict:
    """Everything report.json holds: the rows, every run (failed and unfinished too), notes, the
    similarity results."""
    best, best_linear = best_probe(rows), best_probe(rows, probe="linear")
    return {
        "w2vcache": __version__,
        "runs_dir": None if runs_dir is None else str(runs_dir),
        "units": "wer_percent, cer_percent: percent (21.0 = 21 %; above 100 where insertions outnumber "
                 "the reference words); delta_wer_points: percentage points; std is the sample standard "
                 "deviation (ddof=1), null with one seed",
        "splits": split_order(s for r in rows for s in r.wer_percent),
        "best_layer": None if best is None else {"layer": best[0].layer, "experiment": best[0].experiment,
                                                 "by": f"{best[1]} wer"},
        "best_linear_layer": None if best_linear is None else {
            "layer": best_linear[0].layer, "experiment": best_linear[0].experiment, "by": f"{best_linear[1]} wer"},
        "rows": [r.to_dict() for r in rows],
        "runs": [r.to_dict() for r in runs],
        "not_included": [{"name": r.name, "status": r.status, "why": r.why_not_included}
                         for r in not_included(runs)],
        "notes": notes(runs),
        "similarity": [s.to_dict() for s in similarities],
        "decoded_example": decoded_example(rows, runs),
    }


# ---------------------------------------------------------------------------------------------
# Writing


def load_report(runs_dir) -> tuple[list[Run], list[Row], list[Similarity]]:
    """The runs under RUNS, their rows and the similarity results; an error if nothing there has
    finished, unless RUNS holds similarity results (they make a report on their own)."""
    runs, similarities = find_runs(runs_dir), find_similarities(runs_dir)
    if similarities:
        return runs, summarize(runs), similarities
    if not runs:
        raise W2VCacheError(f"{runs_dir}: no run directories (none holds {CONFIG} or {RESULT})")
    rows = summarize(runs)
    if not rows:
        waiting = "; ".join(f"{r.name} ({r.why_not_included})" for r in runs)
        raise W2VCacheError(f"{runs_dir}: no finished runs yet: {waiting}")
    return runs, rows, similarities


def write_report(runs_dir, out_dir=None, formats=FORMATS, figure: bool = True) -> dict[str, Path]:
    """Write the table (report.md / .csv / .json as asked) and the figures (report.png, and
    report-similarity.png where RUNS/similarity/ holds results) for RUNS.

    out_dir defaults to RUNS/report. Returns {"md": path, "csv": ..., "json": ..., "png": ...,
    "similarity_png": ...} for the files written. An error names RUNS if it holds no run, or no
    finished run, and no similarity result.
    """
    runs, rows, similarities = load_report(runs_dir)
    out = Path(out_dir) if out_dir is not None else Path(runs_dir) / REPORT_NAME
    return write_files(runs, rows, out, formats, figure=figure, runs_dir=runs_dir, similarities=similarities)


def write_files(runs: list[Run], rows: list[Row], out_dir, formats=FORMATS, figure: bool = True,
                runs_dir=None, similarities: list[Similarity] = ()) -> dict[str, Path]:
    """write_report for runs already read (the command line prints the same rows it writes)."""
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise W2VCacheError(f"unknown report format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise W2VCacheError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    written = _write_figures(rows, similarities, out) if figure else {}
    if "md" in formats:
        written["md"] = out / f"{REPORT_NAME}.md"
        png, similarity_png = written.get("png"), written.get("similarity_png")
        with record.replacing(written["md"]) as tmp:
            tmp.write_text(render_markdown(rows, runs, runs_dir, figure=png.name if png else None,
                                           similarities=similarities,
                                           similarity_figure=similarity_png.name if similarity_png else None))
    if "csv" in formats:
        written["csv"] = out / f"{REPORT_NAME}.csv"
        with record.replacing(written["csv"]) as tmp:
            tmp.write_text(render_csv(rows))
    if "json" in formats:
        written["json"] = out / f"{REPORT_NAME}.json"
        record.write_json(written["json"], report_dict(rows, runs, runs_dir, similarities))
    return written


def _write_figures(rows: list[Row], similarities: list[Similarity], out: Path) -> dict[str, Path]:
    """report.png where there are rows, report-similarity.png where there are similarity results."""
    from .figure import write_figure, write_similarity_figure  # matplotlib is optional (the plots extra)

    written = {}
    if rows:
        written["png"] = write_figure(rows, out / f"{REPORT_NAME}.png")
    if similarities:
        written["similarity_png"] = write_similarity_figure(similarities, out / SIMILARITY_FIGURE)
    return written
