"""Finished runs -> the seed's table (Markdown, CSV, JSON) and its WER figure (PNG).

`find_runs` reads every run directory under RUNS (docs/RUNS.md), `summarize` groups the finished
ones into experiments and averages over seeds, `write_report` writes the files.

- An experiment is a probe at one layer, or a fine-tune with one set of re-initialised blocks
  ("none", "12", "11,12", ...). Rows come in that order: probes by layer (an unnumbered layer,
  the CNN output "cnn", first), then fine-tunes with "none" first and the others by how many
  blocks they re-initialise, then by block number. Two finished runs of one experiment and seed
  are an error (a copied run would be counted twice).
- Each cell is the mean and the sample standard deviation (ddof=1) over the finished seeds that
  report that split. With one seed the standard deviation is None (JSON null, an empty CSV
  cell) and the Markdown cell shows "n=1" without a "±".
- Every split of result.json that has a "wer" is carried (dev, test-clean, test-other, or any
  other name), in the order dev, test-clean, test-other, then the others alphabetically.
- Fine-tune rows carry, for each WER split, the change of the mean against the mean of the
  fine-tuning baseline (no block re-initialised); None where there is no baseline.
- Failed and unfinished runs are listed, never averaged. Seeds averaged together whose
  config.json differ in train/model/data settings are pointed out in a note.
- The best layer is the probe with the lowest mean dev WER (test-clean where there is no dev).

Units: Markdown shows WER and CER in percent with two decimals and deltas in percentage points;
CSV and JSON keep the fractions of result.json (0.21 = 21 %), unrounded.

The figure is FIGURE_PANEL_INCHES per panel at FIGURE_DPI: 500 x 400 pixels with one panel
(probes only or fine-tunes only), 1000 x 400 with both.
"""

import csv
import io
import json
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, record
from .errors import W2VCacheError
from .runs import CONFIG, KINDS, METRICS, RESULT, experiment_name

STATUSES = ("finished", "failed", "unfinished")
SPLIT_ORDER = ("dev", "test-clean", "test-other")  # splits shown first; any others follow by name
MEASURES = ("wer", "cer")
CONFIG_SECTIONS = ("train", "model", "data")  # compared across the seeds of one experiment
CONFIG_IGNORED = ("seed", "num_workers")  # keys of those sections that may differ between seeds

FORMATS = ("md", "csv", "json")
REPORT_NAME = "report"  # out_dir/report.md, report.csv, report.json, report.png
FIGURE_PANEL_INCHES = (5.0, 4.0)  # width, height of one panel
FIGURE_DPI = 100  # 5 x 4 inches -> 500 x 400 pixels per panel
_ERROR_SHOWN = 80  # characters of a failed run's error shown in the Markdown


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path  # the run directory
    name: str  # its path relative to RUNS, "probe/layer08/seed0"
    kind: str  # "probe" or "finetune"
    experiment: str  # "layer08", "reinit-11-12"
    layer: int | None  # probes: the layer probed; None for fine-tunes and the CNN output ("cnn")
    reinit: list[int]  # fine-tunes: the blocks re-initialised, [] for the baseline
    seed: int
    status: str  # "finished", "failed" or "unfinished"
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)  # split -> wer, cer
    best_epoch: int | None = None
    error: str | None = None  # failed runs: what stopped them
    epochs_done: int = 0  # lines in metrics.jsonl
    epochs: int | None = None  # epochs planned, where result.json or the config says
    config: dict = field(default_factory=dict, repr=False)  # config.json as written, not reported

    @property
    def key(self) -> tuple:
        """What makes two runs seeds of one experiment."""
        return _experiment_key(self.kind, self.layer, self.reinit, self.experiment)

    @property
    def why_not_included(self) -> str:
        if self.status == "failed":
            error = _error_line(self.error)
            if len(error) > _ERROR_SHOWN:
                error = error[: _ERROR_SHOWN - 3] + "..."
            return f"failed: {error}"
        if self.epochs_done:
            planned = f" of {self.epochs}" if self.epochs else ""
            return f"unfinished, {self.epochs_done}{planned} epochs done"
        return "unfinished"

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "name": self.name, "kind": self.kind, "experiment": self.experiment,
            "layer": self.layer, "reinit": self.reinit, "seed": self.seed, "status": self.status,
            "metrics": self.metrics, "best_epoch": self.best_epoch, "error": self.error,
            "epochs_done": self.epochs_done, "epochs": self.epochs,
        }


def _error_line(error: str | None) -> str:
    """The line of an error message worth a table footnote: the first, or a traceback's last."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if not lines:
        return "no error recorded"
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


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
    wer: dict[str, Stat]  # split -> stat
    cer: dict[str, Stat]
    delta_wer: dict[str, float | None] = field(default_factory=dict)  # fine-tunes: mean - baseline mean
    not_included: list[str] = field(default_factory=list)  # names of this experiment's other runs

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def key(self) -> tuple:
        return _experiment_key(self.kind, self.layer, self.reinit, self.experiment)

    @property
    def label(self) -> str:
        """The layer ("8", or "cnn" for the CNN output) or the re-init set ("none", "11,12")."""
        if self.kind == "probe":
            return self.experiment if self.layer is None else str(self.layer)
        return reinit_label(self.reinit)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "experiment": self.experiment, "layer": self.layer, "reinit": self.reinit,
            "label": self.label, "n": self.n, "seeds": self.seeds,
            "wer": {s: v.to_dict() for s, v in self.wer.items()},
            "cer": {s: v.to_dict() for s, v in self.cer.items()},
            "delta_wer": self.delta_wer if self.kind == "finetune" else None,
            "not_included": self.not_included,
        }


def reinit_label(reinit) -> str:
    return ",".join(map(str, reinit)) if reinit else "none"


def _experiment_key(kind: str, layer, reinit, experiment: str) -> tuple:
    if kind == "probe":  # a probe of a named, unnumbered layer (the CNN output) comes before layer 0
        return (0, -1, experiment) if layer is None else (0, layer, "")
    return (1, len(reinit), tuple(reinit))  # "none" first, then by size and block number


# ---------------------------------------------------------------------------------------------
# Reading runs


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise W2VCacheError(f"{path}: cannot read it: {err}") from None
    except json.JSONDecodeError as err:
        raise W2VCacheError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise W2VCacheError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _identity(obj: dict, path: Path) -> dict:
    """kind, experiment, layer, reinit, seed as one JSON file states them (those present)."""
    found = {}
    if "kind" in obj:
        if obj["kind"] not in KINDS:
            raise W2VCacheError(f"{path}: kind {obj['kind']!r} is not one of {', '.join(KINDS)}")
        found["kind"] = obj["kind"]
    if obj.get("experiment") is not None:
        found["experiment"] = str(obj["experiment"])
    if obj.get("layer") is not None:
        if not _is_int(obj["layer"]):
            raise W2VCacheError(f"{path}: layer {obj['layer']!r} is not a whole number")
        found["layer"] = obj["layer"]
    if "reinit" in obj:
        reinit = obj["reinit"] or []
        if not isinstance(reinit, list) or not all(_is_int(b) for b in reinit):
            raise W2VCacheError(f"{path}: reinit {obj['reinit']!r} is not a list of block numbers")
        found["reinit"] = sorted(set(reinit))
    if "seed" in obj:
        if not _is_int(obj["seed"]):
            raise W2VCacheError(f"{path}: seed {obj['seed']!r} is not a whole number")
        found["seed"] = obj["seed"]
    return found


def _metrics(result: dict, path: Path) -> dict[str, dict[str, float | None]]:
    """Every split of result.json that has a "wer": split -> {"wer": ..., "cer": ...}."""
    found = {}
    for split, value in result.items():
        if not (isinstance(value, dict) and "wer" in value):
            continue
        entry = {}
        for measure in MEASURES:
            x = value.get(measure)
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or x != x):
                raise W2VCacheError(f"{path}: {split}.{measure} is {x!r}, not a number")
            entry[measure] = None if x is None else float(x)
        found[split] = entry
    return found


def _epochs_logged(path: Path) -> int:
    """Finished epochs in metrics.jsonl; a torn last line (the run was killed mid-write) is skipped."""
    if not path.is_file():
        return 0
    count = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            count += isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            pass
    return count


def read_run(directory, name: str | None = None) -> Run:
    """One run directory (holding config.json and/or result.json) as a `Run`."""
    directory = Path(directory)
    config_path, result_path = directory / CONFIG, directory / RESULT
    config = _read_json(config_path) if config_path.is_file() else {}
    result = _read_json(result_path) if result_path.is_file() else None
    if not config and result is None:
        raise W2VCacheError(f"{directory}: not a run directory (no {CONFIG} or {RESULT})")

    ident = _identity(config, config_path)
    if result is not None:
        stated = _identity(result, result_path)
        for key in stated.keys() & ident.keys():
            if stated[key] != ident[key]:
                raise W2VCacheError(
                    f"{directory}: {RESULT} says {key} {stated[key]!r} but {CONFIG} says {ident[key]!r}"
                )
        ident.update(stated)
    where = result_path if result is not None else config_path
    if "kind" not in ident:
        raise W2VCacheError(f"{where}: no kind (probe or finetune)")
    if "seed" not in ident:
        raise W2VCacheError(f"{where}: no seed")
    kind, layer, reinit = ident["kind"], ident.get("layer"), ident.get("reinit", [])
    if kind == "probe" and layer is None and "experiment" not in ident:
        raise W2VCacheError(f"{where}: a probe run with neither a layer nor an experiment name")
    if kind == "finetune":
        layer = None

    status, metrics, error = "unfinished", {}, None
    if result is not None:
        status = result.get("status")
        if status not in ("finished", "failed"):
            raise W2VCacheError(f"{result_path}: status {status!r} is neither 'finished' nor 'failed'")
        metrics = _metrics(result, result_path)
        if status == "finished" and not metrics:
            raise W2VCacheError(f"{result_path}: a finished run with no split that has a 'wer'")
        if status == "failed":
            error = str(result.get("error") or "") or None

    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    epochs = (result or {}).get("epochs", train.get("epochs"))
    best_epoch = (result or {}).get("best_epoch")
    return Run(
        path=directory,
        name=name if name is not None else directory.name,
        kind=kind,
        experiment=ident.get("experiment") or experiment_name(kind, layer, reinit),
        layer=layer,
        reinit=reinit,
        seed=ident["seed"],
        status=status,
        metrics=metrics,
        best_epoch=best_epoch if _is_int(best_epoch) else None,
        error=error,
        epochs_done=_epochs_logged(directory / METRICS),
        epochs=epochs if _is_int(epochs) else None,
        config=config,
    )


def find_runs(runs_dir) -> list[Run]:
    """Every run directory under RUNS, at any depth, sorted by its path relative to RUNS.

    A run directory holds config.json and/or result.json; the report never looks inside one for
    further runs. Hidden folders are skipped; symbolic links to folders are followed once.
    """
    root = Path(runs_dir)
    if not root.exists():
        raise W2VCacheError(f"{root}: no such directory")
    if not root.is_dir():
        raise W2VCacheError(f"{root}: not a directory")
    runs, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirnames[:] = []
            continue
        seen.add(real)
        if CONFIG in filenames or RESULT in filenames:
            directory = Path(dirpath)
            runs.append(read_run(directory, directory.relative_to(root).as_posix()))
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(runs, key=lambda r: r.name)


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
            wer=stats["wer"],
            cer=stats["cer"],
            not_included=[r.name for r in members if r.status != "finished"],
        ))

    baseline = next((r for r in rows if r.kind == "finetune" and not r.reinit), None)
    for row in rows:
        if row.kind != "finetune":
            continue
        row.delta_wer = {
            split: (stat.mean - baseline.wer[split].mean if baseline and split in baseline.wer else None)
            for split, stat in row.wer.items()
        }
    return rows


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
        label = f"{first.kind} " + (first.experiment if first.kind == "probe" and first.layer is None
                                    else experiment_name(first.kind, first.layer, first.reinit))
        names = sorted({r.experiment for r in members})
        if len(names) > 1:
            found.append(f"{label}: seeds averaged together carry different experiment names ({', '.join(names)})")
        differing = _config_differences(members)
        if differing:
            found.append(f"{label}: seeds averaged together differ in {', '.join(differing)}")
    return found


def not_included(runs: list[Run]) -> list[Run]:
    """The failed and unfinished runs, in the order of the table's rows."""
    return sorted((r for r in runs if r.status != "finished"), key=lambda r: (r.key, r.seed, r.name))


def best_probe(rows: list[Row]) -> tuple[Row, str] | None:
    """The probe row with the lowest mean WER on dev (test-clean where no probe reports dev)."""
    probes = [r for r in rows if r.kind == "probe"]
    names = split_order(s for r in probes for s in r.wer)
    for split in ("dev", *(s for s in names if s.startswith("dev")), "test-clean", *names):
        scored = [r for r in probes if split in r.wer]
        if scored:
            return min(scored, key=lambda r: (r.wer[split].mean, r.key)), split
    return None


# ---------------------------------------------------------------------------------------------
# Tables


def _percent(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    if stat.std is None:
        return f"{100 * stat.mean:.2f} (n={stat.n})"
    return f"{100 * stat.mean:.2f} ± {100 * stat.std:.2f} (n={stat.n})"


def _points(delta: float | None) -> str:
    if delta is None:
        return "-"
    points = round(100 * delta, 2)
    return f"{points + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0, so no "-0.00"


def _markdown_table(header: list[str], align: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return out


def render_markdown(rows: list[Row], runs: list[Run], runs_dir=None, figure: str | None = None) -> str:
    """The report as Markdown: a probe table, a fine-tune table, what was left out and why."""
    out = [f"# w2vcache report: {runs_dir}" if runs_dir is not None else "# w2vcache report", ""]
    out.append("WER and CER in %: mean ± sample standard deviation over seeds (n = seeds averaged).")

    probes = [r for r in rows if r.kind == "probe"]
    if probes:
        splits = split_order(s for r in probes for s in r.wer)
        cer_splits = split_order(s for r in probes for s in r.cer)
        header = ["layer", "seeds", *(f"{s} WER" for s in splits), *(f"{s} CER" for s in cer_splits)]
        lines = [[r.label, ",".join(map(str, r.seeds)),
                  *(_percent(r.wer.get(s)) for s in splits), *(_percent(r.cer.get(s)) for s in cer_splits)]
                 for r in probes]
        out += ["", "## Probes (frozen W2V layer, BiLSTM-CTC)", ""]
        out += _markdown_table(header, ["---:", "---", *["---:"] * (len(header) - 2)], lines)
        best = best_probe(rows)
        if best:
            row, split = best
            out += ["", f"Best layer: {row.label} (lowest mean {split} WER, {100 * row.wer[split].mean:.2f} %)."]

    tunes = [r for r in rows if r.kind == "finetune"]
    if tunes:
        splits = split_order(s for r in tunes for s in r.wer)
        cer_splits = split_order(s for r in tunes for s in r.cer)
        header = ["re-init", "seeds", *(f"{s} WER" for s in splits), *(f"Δ {s}" for s in splits),
                  *(f"{s} CER" for s in cer_splits)]
        lines = [[r.label, ",".join(map(str, r.seeds)), *(_percent(r.wer.get(s)) for s in splits),
                  *(_points(r.delta_wer.get(s)) for s in splits), *(_percent(r.cer.get(s)) for s in cer_splits)]
                 for r in tunes]
        out += ["", "## Fine-tuning (W2V + CTC head, re-initialised blocks)", ""]
        out += _markdown_table(header, ["---", "---", *["---:"] * (len(header) - 2)], lines)
        if any(not r.reinit for r in tunes):
            out += ["", "Δ: change of the mean WER against re-init none, in percentage points."]
        else:
            out += ["", "Δ: not computed, no fine-tuning baseline (re-init none) has finished."]

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
    return "\n".join(out) + "\n"


def csv_columns(rows: list[Row]) -> list[str]:
    splits = split_order(s for r in rows for s in [*r.wer, *r.cer])
    columns = ["kind", "experiment", "layer", "reinit", "n", "seeds"]
    for split in splits:
        for measure in MEASURES:
            columns += [f"{split}_{measure}_mean", f"{split}_{measure}_std", f"{split}_{measure}_n"]
    columns += [f"{split}_wer_delta" for split in splits]
    return columns


def render_csv(rows: list[Row]) -> str:
    """One line per experiment; fractions as in result.json, empty where there is no value."""
    columns = csv_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        line = {"kind": row.kind, "experiment": row.experiment,
                "layer": "" if row.layer is None else row.layer,
                "reinit": reinit_label(row.reinit) if row.kind == "finetune" else "",
                "n": row.n, "seeds": " ".join(map(str, row.seeds))}
        for measure in MEASURES:
            for split, stat in getattr(row, measure).items():
                line[f"{split}_{measure}_mean"] = repr(stat.mean)
                line[f"{split}_{measure}_std"] = "" if stat.std is None else repr(stat.std)
                line[f"{split}_{measure}_n"] = stat.n
        for split, delta in row.delta_wer.items():
            line[f"{split}_wer_delta"] = "" if delta is None else repr(delta)
        writer.writerow(line)
    return buffer.getvalue()


def report_dict(rows: list[Row], runs: list[Run], runs_dir=None) -> dict:
    """Everything report.json holds: the rows, every run (failed and unfinished too), notes."""
    best = best_probe(rows)
    return {
        "w2vcache": __version__,
        "runs_dir": None if runs_dir is None else str(runs_dir),
        "units": "fractions (0.21 = 21 %); std is the sample standard deviation (ddof=1), null with one seed",
        "splits": split_order(s for r in rows for s in r.wer),
        "best_layer": None if best is None else {"layer": best[0].layer, "experiment": best[0].experiment,
                                                 "by": f"{best[1]} wer"},
        "rows": [r.to_dict() for r in rows],
        "runs": [r.to_dict() for r in runs],
        "not_included": [{"name": r.name, "status": r.status, "why": r.why_not_included}
                         for r in not_included(runs)],
        "notes": notes(runs),
    }


# ---------------------------------------------------------------------------------------------
# Figure


def figure_size(rows: list[Row]) -> tuple[int, int]:
    """The PNG's width and height in pixels: one panel per kind of experiment present."""
    panels = len({r.kind for r in rows}) or 1
    return round(panels * FIGURE_PANEL_INCHES[0] * FIGURE_DPI), round(FIGURE_PANEL_INCHES[1] * FIGURE_DPI)


def _errors(stats: list[Stat]) -> list[float]:
    return [100 * (s.std or 0.0) for s in stats]


def write_figure(rows: list[Row], path) -> Path:
    """WER (%) by probed layer, and by re-initialised blocks, with seed std as error bars."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise W2VCacheError(
            "the figure needs matplotlib: pip install 'w2vcache[plots]', or leave the figure out (--no-figure)"
        ) from None

    probes = [r for r in rows if r.kind == "probe"]
    tunes = [r for r in rows if r.kind == "finetune"]
    panels = [p for p in (probes, tunes) if p] or [[]]
    # Figure + Agg canvas rather than pyplot: no global backend switch, no display, no leaked figures.
    fig = Figure(figsize=(FIGURE_PANEL_INCHES[0] * len(panels), FIGURE_PANEL_INCHES[1]), dpi=FIGURE_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    splits = split_order(s for r in rows for s in r.wer)
    colours = {s: f"C{i}" for i, s in enumerate(splits)}

    ax = iter(axes)
    if probes:
        a = next(ax)
        # Unnumbered layers (the CNN output) sit left of layer 0, in table order.
        unnumbered = [r for r in probes if r.layer is None]
        x = {id(r): (r.layer if r.layer is not None else unnumbered.index(r) - len(unnumbered)) for r in probes}
        for split in splits:
            scored = [r for r in probes if split in r.wer]
            if not scored:
                continue
            a.errorbar([x[id(r)] for r in scored], [100 * r.wer[split].mean for r in scored],
                       yerr=_errors([r.wer[split] for r in scored]), label=split, color=colours[split],
                       linestyle="--" if split.startswith("dev") else "-", marker="o", markersize=3, capsize=3)
        best = best_probe(rows)
        if best:
            row, by = best
            a.axvline(x[id(row)], color="0.5", linestyle=":", linewidth=1)
            a.plot([x[id(row)]], [100 * row.wer[by].mean], marker="*", markersize=12, color="black",
                   linestyle="none", label=f"best: layer {row.label} ({by})")
        a.set_xticks([x[id(r)] for r in probes], [r.label for r in probes])
        a.set_xlabel("layer")
        a.set_ylabel("WER (%)")
        a.set_title("Probe WER by layer")
        a.grid(alpha=0.3)
        a.legend(fontsize="small")
    if tunes:
        a = next(ax)
        shown = [s for s in splits if not s.startswith("dev") and any(s in r.wer for r in tunes)]
        shown = shown or [s for s in splits if any(s in r.wer for r in tunes)]
        width = 0.8 / len(shown)
        for i, split in enumerate(shown):
            xs = [x + (i - (len(shown) - 1) / 2) * width for x in range(len(tunes))]
            stats = [r.wer.get(split) for r in tunes]
            a.bar(xs, [100 * s.mean if s else 0.0 for s in stats], width,
                  yerr=[100 * (s.std or 0.0) if s else 0.0 for s in stats], capsize=3,
                  label=split, color=colours[split])
        a.set_xticks(range(len(tunes)), [r.label for r in tunes])
        a.set_ylim(0, 1.2 * a.get_ylim()[1])  # headroom for the legend above the bars
        a.set_xlabel("re-initialised blocks")
        a.set_ylabel("WER (%)")
        a.set_title("Fine-tuning WER")
        a.grid(axis="y", alpha=0.3)
        a.legend(fontsize="small", loc="upper left", ncols=len(shown))

    with record.replacing(path) as tmp:
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png")  # no bbox_inches="tight": it would change the size
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Writing


def load_report(runs_dir) -> tuple[list[Run], list[Row]]:
    """The runs under RUNS and their rows; an error if nothing there has finished."""
    runs = find_runs(runs_dir)
    if not runs:
        raise W2VCacheError(f"{runs_dir}: no run directories (none holds {CONFIG} or {RESULT})")
    rows = summarize(runs)
    if not rows:
        waiting = "; ".join(f"{r.name} ({r.why_not_included})" for r in runs)
        raise W2VCacheError(f"{runs_dir}: no finished runs yet: {waiting}")
    return runs, rows


def write_report(runs_dir, out_dir=None, formats=FORMATS, figure: bool = True) -> dict[str, Path]:
    """Write the table (report.md / .csv / .json as asked) and the figure (report.png) for RUNS.

    out_dir defaults to RUNS/report. Returns {"md": path, "csv": ..., "json": ..., "png": ...}
    for the files written. An error names RUNS if it holds no run, or no finished run.
    """
    runs, rows = load_report(runs_dir)
    out = Path(out_dir) if out_dir is not None else Path(runs_dir) / REPORT_NAME
    return write_files(runs, rows, out, formats, figure=figure, runs_dir=runs_dir)


def write_files(runs: list[Run], rows: list[Row], out_dir, formats=FORMATS, figure: bool = True,
                runs_dir=None) -> dict[str, Path]:
    """write_report for runs already read (the command line prints the same rows it writes)."""
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise W2VCacheError(f"unknown report format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise W2VCacheError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    written = {}
    if figure:
        written["png"] = write_figure(rows, out / f"{REPORT_NAME}.png")
    if "md" in formats:
        written["md"] = out / f"{REPORT_NAME}.md"
        png = written.get("png")
        with record.replacing(written["md"]) as tmp:
            tmp.write_text(render_markdown(rows, runs, runs_dir, figure=png.name if png else None))
    if "csv" in formats:
        written["csv"] = out / f"{REPORT_NAME}.csv"
        with record.replacing(written["csv"]) as tmp:
            tmp.write_text(render_csv(rows))
    if "json" in formats:
        written["json"] = out / f"{REPORT_NAME}.json"
        record.write_json(written["json"], report_dict(rows, runs, runs_dir))
    return written
