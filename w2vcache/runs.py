"""Run directories (docs/RUNS.md): where a run lives, the files it holds, the record written when
it starts, what a sweep of runs did, and reading finished, failed and unfinished runs back.

probe.py and finetune.py make the records, train.py writes the files, report.py reads them back
through `find_runs`: the names below are declared here only.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import W2VCacheError
from .layers import WEIGHTED, layer_name

CONFIG = "config.json"  # the RunRecord, with the training config, versions and command line
METRICS = "metrics.jsonl"  # one line per finished epoch
DECODED = "decoded"  # decoded/<split>.tsv: each utterance's transcript and what the best epoch wrote
CHECKPOINT = "checkpoint.pt"  # last finished epoch: model, optimizer, schedule, RNG
BEST = "best.pt"  # weights of the epoch with the lowest dev WER (or CER, with select_by="cer")
RESULT = "result.json"  # written last: its presence marks the run finished
LAYER_WEIGHTS = "layer_weights.json"  # weighted probes: the softmax layer weights after each epoch
KINDS = ("probe", "finetune")
PROBES = ("bilstm", "linear")  # the probe's model: a BiLSTM-CTC, or one linear layer per frame


DATA = "utterances"  # the record's data.utterances: which utterances the run trained and chose on


def data_fingerprint(splits: dict) -> dict:
    """{split: (id, transcript) pairs} -> {split: {"utterances": n, "sha256": ...}}: which
    utterances a run trains on and chooses its epoch by, in a few bytes. A run is then never
    resumed, or counted as done, on another corpus, whatever path or copy its data is read from."""
    fingerprint = {}
    for split, pairs in splits.items():
        pairs = sorted(pairs)
        digest = hashlib.sha256("".join(f"{uid}\t{text}\n" for uid, text in pairs).encode()).hexdigest()
        fingerprint[split] = {"utterances": len(pairs), "sha256": digest[:16]}
    return fingerprint


def finetune_experiment(blocks) -> str:
    """(11, 12) -> "reinit-11-12"; () -> "reinit-none"."""
    return "reinit-" + ("-".join(map(str, blocks)) if blocks else "none")


def probe_experiment(source: str, probe: str = "bilstm") -> str:
    """A probe's experiment name from what it reads ("layer08", "cnn", "weighted") and its model:
    the BiLSTM's is the source itself, a linear probe's is prefixed ("linear-layer08")."""
    return source if probe == "bilstm" else f"{probe}-{source}"


def experiment_name(kind: str, layer: int | None, reinit, probe: str = "bilstm", weighted: bool = False) -> str:
    """The experiment's directory name: a probe's ("layer08", "weighted", "linear-layer08"), a
    fine-tune's re-init set ("reinit-11-12")."""
    if kind == "probe":
        return probe_experiment(WEIGHTED if weighted else layer_name(layer), probe)
    return finetune_experiment(reinit)


def run_dir(out, kind: str, experiment: str, seed: int) -> Path:
    """RUNS/probe/layer08/seed0, RUNS/finetune/reinit-11-12/seed1."""
    return Path(out) / kind / experiment / f"seed{seed}"


@dataclass
class RunRecord:
    """config.json: what the run is (the identity report groups seeds by) and how it was set up.
    train() adds the training config, versions, command line and start time."""

    kind: str  # "probe" or "finetune"
    experiment: str  # "layer08", "cnn", "weighted", "linear-layer08", "reinit-11-12"
    layer: int | None  # probes of a numbered layer; None otherwise (the CNN output, weighted probes)
    reinit: list[int]  # fine-tunes: the blocks re-initialised; [] for probes and the baseline
    seed: int
    model: dict  # the probe's or the head's config (and the backbone's identity)
    data: dict  # the features (store provenance) or the corpus sources
    device: str
    threads: int | None = None  # --threads as asked; None: chosen every epoch
    store: str | None = None  # probes: where the features were read
    world_size: int | None = None  # fine-tunes: torchrun ranks
    probe: str | None = None  # probes: "bilstm" or "linear"
    weighted: bool | None = None  # probes: True for a learnt weighted sum of the layers

    def to_json(self) -> dict:
        """As config.json holds it: the fields that do not apply to this kind are left out."""
        return {k: v for k, v in asdict(self).items() if not (k in _OPTIONAL and v is None)}

    def identity(self) -> dict:
        """The fields result.json repeats, so a result read alone says what it is."""
        keys = ("kind", "experiment", "layer", "reinit", "seed", "probe", "weighted")
        return {k: getattr(self, k) for k in keys if not (k in _OPTIONAL and getattr(self, k) is None)}


_OPTIONAL = ("store", "world_size", "probe", "weighted")  # left out of the JSON where they do not apply

# What a probe's record written before linear and weighted probes existed stands for.
_PROBE_DEFAULTS = {"probe": "bilstm", "weighted": False}


def upgrade_record(obj: dict) -> dict:
    """config.json or result.json as this version writes it: a probe recorded before the record
    said which probe it was is a BiLSTM on one layer (reading runs back, and resuming them)."""
    if obj.get("kind") != "probe":
        return obj
    return {**obj, **{k: v for k, v in _PROBE_DEFAULTS.items() if obj.get(k) is None}}


@dataclass
class SweepResult:
    finished: list[str] = field(default_factory=list)  # run directories this process took and trained
    skipped: list[str] = field(default_factory=list)  # run directories already finished
    held: list[str] = field(default_factory=list)  # run directories another live process was training
    seconds: float = 0.0
    share: str | None = None  # this process's share ("shard 0/2, rank 1/8"); None: the whole sweep
    elsewhere: int = 0  # runs of the sweep left to other shards or ranks

    def summary(self, out, kind: str) -> list[str]:
        """What the sweep did, for a person: one line, then (a share of a sweep, or runs left to
        other jobs) which runs it took, skipped as finished, left to their holders."""
        first = (f"{len(self.finished)} run(s) trained, {len(self.skipped)} already finished, "
                 + (f"{len(self.held)} being trained by another job, " if self.held else "")
                 + f"in {self.seconds:.1f} s; results under {Path(out) / kind}")
        if not (self.share or self.held):
            return [first]

        def names(dirs):
            return ", ".join(_relative(d, out) for d in dirs) or "none"

        who = self.share or "this job"
        return [f"{who}: {first}",
                f"{who}: took {names(self.finished)}; finished already: {names(self.skipped)}; "
                f"held by another job: {names(self.held)}"
                + (f"; {self.elsewhere} run(s) left to other shards or ranks" if self.elsewhere else "")]


def _relative(directory: str, out) -> str:
    try:
        return Path(directory).relative_to(out).as_posix()
    except ValueError:
        return str(directory)


# ---------------------------------------------------------------------------------------------
# Reading runs back (report.py)

STATUSES = ("finished", "failed", "unfinished")
MEASURES = ("wer_percent", "cer_percent")  # the error rates result.json gives per split
_ERROR_SHOWN = 80  # characters of a failed run's error shown in a table's footnote


def experiment_key(kind: str, layer, reinit, experiment: str, probe: str = "bilstm", weighted: bool = False) -> tuple:
    if kind == "probe":
        # BiLSTM probes, then linear ones; for each, a named, unnumbered layer (the CNN output)
        # before layer 0, the numbered layers, then the weighted probe.
        rank = (PROBES.index(probe) if probe in PROBES else len(PROBES), int(bool(weighted)))
        return (0, *rank, -1, experiment) if layer is None else (0, *rank, layer, "")
    return (1, len(reinit), tuple(reinit))  # "none" first, then by size and block number


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path  # the run directory
    name: str  # its path relative to RUNS, "probe/layer08/seed0"
    kind: str  # "probe" or "finetune"
    experiment: str  # "layer08", "weighted", "linear-layer08", "reinit-11-12"
    layer: int | None  # probes: the layer probed; None for fine-tunes, the CNN output ("cnn"), weighted probes
    reinit: list[int]  # fine-tunes: the blocks re-initialised, [] for the baseline
    seed: int
    status: str  # "finished", "failed" or "unfinished"
    probe: str | None = None  # probes: "bilstm" or "linear"; None for fine-tunes
    weighted: bool = False  # probes of a learnt weighted sum of the layers
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)  # split -> wer_percent, cer_percent
    best_epoch: int | None = None
    error: str | None = None  # failed runs: what stopped them
    epochs_done: int = 0  # lines in metrics.jsonl
    epochs: int | None = None  # epochs planned, where result.json or the config says
    config: dict = field(default_factory=dict, repr=False)  # config.json as written, not reported
    # Weighted probes: layer_weights.json's weights at the best epoch (those of the weights tested).
    layer_weights: dict[str, float] | None = None

    @property
    def key(self) -> tuple:
        """What makes two runs seeds of one experiment."""
        return experiment_key(self.kind, self.layer, self.reinit, self.experiment, self.probe, self.weighted)

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
            "probe": self.probe, "weighted": self.weighted,
            "metrics": self.metrics, "best_epoch": self.best_epoch, "error": self.error,
            "epochs_done": self.epochs_done, "epochs": self.epochs, "layer_weights": self.layer_weights,
        }


def _error_line(error: str | None) -> str:
    """The line of an error message worth a table footnote: the first, or a traceback's last."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if not lines:
        return "no error recorded"
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]



def read_json(path: Path) -> dict:
    """A run's JSON record; an unreadable one is an error naming the file."""
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
    if obj.get("probe") is not None:
        if obj["probe"] not in PROBES:
            raise W2VCacheError(f"{path}: probe {obj['probe']!r} is not one of {', '.join(PROBES)}")
        found["probe"] = obj["probe"]
    if obj.get("weighted") is not None:
        if not isinstance(obj["weighted"], bool):
            raise W2VCacheError(f"{path}: weighted {obj['weighted']!r} is neither true nor false")
        found["weighted"] = obj["weighted"]
    return found


def _metrics(result: dict, path: Path) -> dict[str, dict[str, float | None]]:
    """Every split of result.json that has a WER: split -> {"wer_percent": ..., "cer_percent": ...}."""
    found = {}
    for split, value in result.items():
        if not isinstance(value, dict):
            continue
        fractions = "wer_percent" not in value and "wer" in value  # an earlier version's result.json
        if not (fractions or "wer_percent" in value):
            continue
        entry = {}
        for measure in MEASURES:
            key = measure.removesuffix("_percent") if fractions else measure
            x = value.get(key)
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or x != x):
                raise W2VCacheError(f"{path}: {split}.{key} is {x!r}, not a number")
            entry[measure] = None if x is None else float(x) * (100 if fractions else 1)
        found[split] = entry
    return found


# Earlier versions wrote the error rates as fractions (0.21 = 21 %) under "wer" and "cer" in
# result.json and "dev_wer" and "dev_cer" in metrics.jsonl. Their run directories are read here
# (and nowhere else) as if written in percent: _metrics above for result.json, this for
# metrics.jsonl, whose lines a resumed run rewrites.
_FRACTION_KEYS = ("dev_wer", "dev_cer")


def metrics_line(line: dict) -> dict:
    """One line of metrics.jsonl, with an earlier version's fractions turned into percent."""
    return {(f"{k}_percent" if k in _FRACTION_KEYS else k): (100 * v if k in _FRACTION_KEYS else v)
            for k, v in line.items()}


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's epochs, in percent (metrics_line). A torn last line (the run was killed
    mid-write) is skipped: that epoch's checkpoint was never saved, so a resume trains it again."""
    if not path.is_file():
        return []
    epochs = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "epoch" in entry:
            epochs.append(metrics_line(entry))
    return epochs


def _layer_weights(path: Path, epoch) -> dict[str, float] | None:
    """layer_weights.json's weights after `epoch`; None where the file or that epoch is missing."""
    if not path.is_file() or not _is_int(epoch):
        return None
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise W2VCacheError(f"{path}: cannot read it: {err}") from None
    if not isinstance(entries, list):
        raise W2VCacheError(f"{path}: expected a JSON list of epochs, found {type(entries).__name__}")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("epoch") == epoch:
            weights = entry.get("weights")
            if not isinstance(weights, dict) or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights.values()):
                raise W2VCacheError(f"{path}: epoch {epoch}'s weights are not a mapping of layer to number")
            return {str(k): float(w) for k, w in weights.items()}
    return None


def read_run(directory, name: str | None = None) -> Run:
    """One run directory (holding config.json and/or result.json) as a `Run`."""
    directory = Path(directory)
    config_path, result_path = directory / CONFIG, directory / RESULT
    config = upgrade_record(read_json(config_path)) if config_path.is_file() else {}
    result = upgrade_record(read_json(result_path)) if result_path.is_file() else None
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
    probe, weighted = ident.get("probe"), ident.get("weighted", False)
    if kind == "probe" and layer is None and not weighted and "experiment" not in ident:
        raise W2VCacheError(f"{where}: a probe run with neither a layer nor an experiment name")
    if kind == "finetune":
        layer, probe, weighted = None, None, False
    elif weighted:
        layer = None

    status, metrics, error = "unfinished", {}, None
    if result is not None:
        status = result.get("status")
        if status not in ("finished", "failed"):
            raise W2VCacheError(f"{result_path}: status {status!r} is neither 'finished' nor 'failed'")
        metrics = _metrics(result, result_path)
        if status == "finished" and not metrics:
            raise W2VCacheError(f"{result_path}: a finished run with no split that has a 'wer_percent'")
        if status == "failed":
            error = str(result.get("error") or "") or None

    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    epochs = (result or {}).get("epochs", train.get("epochs"))
    best_epoch = (result or {}).get("best_epoch")
    weights = _layer_weights(directory / LAYER_WEIGHTS, best_epoch) if weighted and status == "finished" else None
    return Run(
        path=directory,
        name=name if name is not None else directory.name,
        kind=kind,
        experiment=ident.get("experiment") or experiment_name(kind, layer, reinit, probe, weighted),
        layer=layer,
        reinit=reinit,
        seed=ident["seed"],
        status=status,
        probe=probe,
        weighted=weighted,
        metrics=metrics,
        best_epoch=best_epoch if _is_int(best_epoch) else None,
        error=error,
        epochs_done=len(read_metrics(directory / METRICS)),
        epochs=epochs if _is_int(epochs) else None,
        config=config,
        layer_weights=weights,
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
