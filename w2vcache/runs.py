"""Run directories (docs/RUNS.md): where a run lives, the files it holds, the record written when
it starts, and what a sweep of runs did.

probe.py and finetune.py make the records, train.py writes the files, report.py reads them back:
the names below are declared here only.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .layers import layer_name

CONFIG = "config.json"  # the RunRecord, with the training config, versions and command line
METRICS = "metrics.jsonl"  # one line per finished epoch
CHECKPOINT = "checkpoint.pt"  # last finished epoch: model, optimizer, schedule, RNG
BEST = "best.pt"  # weights of the epoch with the lowest dev WER (or CER, with select_by="cer")
RESULT = "result.json"  # written last: its presence marks the run finished
KINDS = ("probe", "finetune")


def finetune_experiment(blocks) -> str:
    """(11, 12) -> "reinit-11-12"; () -> "reinit-none"."""
    return "reinit-" + ("-".join(map(str, blocks)) if blocks else "none")


def experiment_name(kind: str, layer: int | None, reinit) -> str:
    """The experiment's directory name: a probe's layer ("layer08"), a fine-tune's re-init set."""
    return layer_name(layer) if kind == "probe" else finetune_experiment(reinit)


def run_dir(out, kind: str, experiment: str, seed: int) -> Path:
    """RUNS/probe/layer08/seed0, RUNS/finetune/reinit-11-12/seed1."""
    return Path(out) / kind / experiment / f"seed{seed}"


@dataclass
class RunRecord:
    """config.json: what the run is (the identity report groups seeds by) and how it was set up.
    train() adds the training config, versions, command line and start time."""

    kind: str  # "probe" or "finetune"
    experiment: str  # "layer08", "cnn", "reinit-11-12"
    layer: int | None  # probes of a numbered layer; None otherwise
    reinit: list[int]  # fine-tunes: the blocks re-initialised; [] for probes and the baseline
    seed: int
    model: dict  # the probe's or the head's config (and the backbone's identity)
    data: dict  # the features (store provenance) or the corpus sources
    device: str
    threads: int | None = None  # --threads as asked; None: chosen every epoch
    store: str | None = None  # probes: where the features were read
    world_size: int | None = None  # fine-tunes: torchrun ranks

    def to_json(self) -> dict:
        """As config.json holds it: the fields that do not apply to this kind are left out."""
        return {k: v for k, v in asdict(self).items() if not (k in ("store", "world_size") and v is None)}

    def identity(self) -> dict:
        """The fields result.json repeats, so a result read alone says what it is."""
        return {k: getattr(self, k) for k in ("kind", "experiment", "layer", "reinit", "seed")}


@dataclass
class SweepResult:
    finished: list[str] = field(default_factory=list)  # run directories trained now
    skipped: list[str] = field(default_factory=list)  # run directories already finished
    seconds: float = 0.0
