"""The one training loop. Probe and fine-tune differ only in the `Task` they hand it.

Adam, the tri-stage learning-rate schedule (linear warm-up, hold, linear decay to 0) stepped per
update, gradient-norm clipping, validation WER after every epoch, the best-validation weights
tested at the end, a checkpoint after every epoch so a killed run resumes where it stopped, and
the run directory of docs/RUNS.md.
"""

import contextlib
import csv
import functools
import json
import math
import pickle
import random
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import record, threads
from .errors import W2VCacheError
from .evaluate import ErrorRates, error_rates, utterance_rows
from .runs import (BEST, CHECKPOINT, CONFIG, DATA, DECODED, METRICS, RESULT, RunRecord, SweepResult, read_json,
                   read_metrics, upgrade_record)
from .spread import (FINISHED, HELD, Share, check_still_held, claim_run, held_elsewhere, in_job, in_processes,
                     is_finished, still_held, terminate_as_exit, training_under)

_END = object()  # end of an epoch's batches


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-4  # peak learning rate
    warmup_epochs: float = 1.0  # linear warm-up from 0 to lr (at most until the decay starts)
    # Hold until here, then decay linearly to 0 at the end. None: half the epochs, which for the
    # recipe's 10 is 5, the start of epoch 6; shorter runs decay over their second half too.
    decay_from_epoch: float | None = None
    clip_norm: float = 1.0
    grad_accum: int = 1  # batches per update
    seed: int = 0
    dev_split: str = "dev"
    # None: those of the recipe's test splits (RECIPE_TEST_SPLITS) that the data has; see test_splits_for.
    test_splits: tuple[str, ...] | None = None
    # Which dev error rate picks the best epoch. The recipe's is WER; on a few minutes of speech
    # WER stays near 100 % while CER falls, so the demo picks by CER.
    select_by: str = "wer"


RECIPE_TEST_SPLITS = ("test-clean", "test-other")


def test_splits_for(config: TrainConfig, available, where: str | None = None) -> TrainConfig:
    """`config` with its test splits decided: when none were named, the recipe's that `available`
    (the store's or corpus's splits) has. With `where` (what the data is, for a person), says
    on stderr which are tested when some of the recipe's are missing."""
    if where and config.dev_split in (config.test_splits or RECIPE_TEST_SPLITS) and config.dev_split in available:
        print(f"note: --dev-split {config.dev_split} is also tested: the best epoch is chosen on it, so its test "
              "figures are not held out", file=sys.stderr)
    if config.test_splits is not None:
        return config
    present = tuple(s for s in RECIPE_TEST_SPLITS if s in available)
    if where and len(present) < len(RECIPE_TEST_SPLITS):
        missing = [s for s in RECIPE_TEST_SPLITS if s not in available]
        print(f"testing on {', '.join(present) or 'no split'}: {where} has no {' or '.join(missing)} "
              f"(it has {', '.join(available)}; --test-splits names others)", file=sys.stderr)
    return replace(config, test_splits=present)


def check_splits(available, train_split: str, dev_split: str, what: str) -> None:
    """Refuse a train or dev split the data (`what`: "store X", "the corpus") lacks, naming the
    option, before any run directory is made."""
    for option, split in (("--train-split", train_split), ("--dev-split", dev_split)):
        if split not in available:
            raise W2VCacheError(f"{option} {split}: {what} has no split {split!r}; it has "
                                f"{', '.join(available)}: name one with {option}")
    if dev_split == train_split and not in_job():  # the command said it before starting its --jobs
        print(f"note: --dev-split {dev_split} is the training split: the best epoch is chosen on what it "
              "trained on", file=sys.stderr)


class Task(Protocol):
    """What the loop needs from an experiment; batches are opaque to it but for their `.frames`."""

    model: torch.nn.Module

    # The epoch's batches, deterministic given seed and epoch. Each has `.frames`, the real
    # (unpadded) frames it holds, for the frames/s figures. Batches with a `begin()` (probe
    # batches) start being built for the next epoch while dev is evaluated; others (a DataLoader
    # draws its seed from torch's RNG, which the checkpoint must save first) when the epoch starts.
    def train_batches(self, epoch: int) -> list: ...

    def eval_batches(self, split: str) -> Iterable: ...

    def loss(self, batch) -> torch.Tensor: ...  # mean CTC loss of the batch

    def decode(self, batch) -> tuple[list[str], list[str]]: ...  # references, hypotheses

    def start_epoch(self, epoch: int) -> None: ...  # which parameters train this epoch

    # Optional: `no_sync()`, a context in which a batch's gradients are not yet summed over DDP's
    # ranks (the batches of an update but its last, with --grad-accum).

    # Optional: what else the task records after each epoch, {file name: JSON object}. The loop
    # appends each object, with its "epoch", to a JSON list in that file of the run directory
    # (a weighted probe's layer_weights.json), rewritten atomically like a checkpoint.
    def epoch_records(self) -> dict[str, dict]: ...


def tri_stage(update: int, updates_per_epoch: int, config: TrainConfig) -> float:
    """Learning rate of update `update` (0-based) as a fraction of the peak.

    Warm-up: (update + 1) / warmup_updates, so the first update already moves and the last
    warm-up update reaches the peak. Hold at 1. Decay: (total - update) / (total - decay_start),
    so the last update of the last epoch uses 1 / decay_updates of the peak and the rate
    reaches 0 exactly at the end.
    """
    decay_start = decay_from(config) * updates_per_epoch
    warmup = min(config.warmup_epochs * updates_per_epoch, decay_start)
    total = config.epochs * updates_per_epoch
    if update < warmup:
        return (update + 1) / warmup
    if update < decay_start or total <= decay_start:
        return 1.0
    return max(0.0, (total - update) / (total - decay_start))


def decay_from(config: TrainConfig) -> float:
    return config.epochs / 2 if config.decay_from_epoch is None else config.decay_from_epoch


def check_config(config: TrainConfig) -> None:
    """Refuse a schedule that would silently not do what its options say."""
    if not 0 <= decay_from(config) <= config.epochs:
        raise W2VCacheError(f"--decay-from-epoch {config.decay_from_epoch:g} must lie within the run's "
                            f"{config.epochs} epochs (or leave it out: half the epochs)")
    if config.select_by not in ("wer", "cer"):
        raise W2VCacheError(f"--select-by {config.select_by!r}: choose wer or cer")
    if config.warmup_epochs < 0:
        raise W2VCacheError(f"--warmup-epochs {config.warmup_epochs} must not be negative")


def make_optimizer(parameters, lr: float) -> torch.optim.Adam:
    """The loop's Adam, fused: one pass over each parameter's values, grads and moments instead of
    several (on 2 CPU cores, the 3x1024 probe's 65 M parameters: 0.06 s a step instead of 0.26 s,
    gradient clipping included; 3 % of a probe epoch). A run started before keeps the unfused Adam
    its checkpoint records, so that it resumes to the numbers it would have reached. Unfused where
    torch has no fused kernel for the parameters' device (CPU before torch 2.4)."""
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(parameters, lr=lr)


def load_optimizer(optimizer: torch.optim.Adam, state: dict) -> None:
    """Restore a checkpoint's optimizer state into make_optimizer's Adam, which way it was fused
    included; a run saved fused and resumed where torch has no fused kernel for the device (a CPU
    before torch 2.4) goes on unfused, where the fused step would fail."""
    optimizer.load_state_dict(state)
    if not optimizer.defaults.get("fused"):
        for group in optimizer.param_groups:
            group["fused"] = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _save(obj, path: Path) -> None:
    """torch.save atomically: a kill mid-write leaves the previous file intact."""
    with record.replacing(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as data only: tensors, numbers, strings, lists and dicts, which is all w2vcache
    saves. Run directories get shared, and unpickling anything else could run code on load."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch names the global it refused
        raise W2VCacheError(
            f"{path}: holds more than tensors and numbers (a pickled {found[1] if found else 'object'}); "
            "w2vcache never writes such a file, and loading it could run code, so it is refused. "
            "Delete the run directory to train the run afresh"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # torn by a crash, or not a checkpoint
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # Without checkpoint.pt a run trains from its start; best.pt alone would not be made again.
        fix = ("delete it to train the run from its start, or" if Path(path).name == CHECKPOINT else "delete")
        raise W2VCacheError(f"{path}: cannot be read ({reason}); {fix} the run directory to train it anew") from None


def _record_epoch(path: Path, entry: dict) -> None:
    """Append an epoch's entry to the JSON list in `path`. Entries of this epoch or later are
    dropped first: a run killed after writing them but before its checkpoint trains that epoch
    again, and its file ends as an uninterrupted run's."""
    entries = json.loads(path.read_text()) if path.exists() else []
    record.write_json(path, [e for e in entries if e["epoch"] < entry["epoch"]] + [entry])


def _read_metrics(run_dir: Path, upto_epoch: int) -> list[dict]:
    return [m for m in read_metrics(run_dir / METRICS) if m["epoch"] <= upto_epoch]


def evaluate(task: Task, split: str, decoded: Path | None = None) -> ErrorRates:
    """The split's error rates; with `decoded`, each utterance's transcript and what was decoded
    written there too (a TSV: id, words, word_edits, reference, hypothesis)."""
    task.model.eval()
    refs, hyps, ids = [], [], []
    with torch.inference_mode():
        for batch in task.eval_batches(split):
            r, h = task.decode(batch)
            refs += r
            hyps += h
            ids += getattr(batch, "ids", ()) or [None] * len(r)
    if decoded is not None:
        rows = utterance_rows(ids, refs, hyps)
        with record.replacing(decoded) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id"], delimiter="\t",
                                    lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return error_rates(refs, hyps)


def sweep(runs, share: Share = Share(), together: bool | None = None, jobs: int = 1, job=None) -> SweepResult:
    """Train this process's share of a sweep's runs that are not finished yet. `runs` yields
    (run directory, start, settings) in the sweep's order; start(directory) trains that run there,
    resuming a killed one; settings() gives the run's `run_settings`, which a finished run's must
    equal to count as done (None: not checked).

    Each run is trained under its lock (spread.py), so jobs with overlapping shares never train
    one run at once: a run another live process holds is left to it with one line saying who,
    not an error. `together`: the ranks of an initialised process group train each run together
    (DDP); default, whether one is initialised.

    `jobs` > 1: the runs there are checked here, once, then `job()` (this sweep's command, picklable,
    with one job) runs in that many processes at once (spread.in_processes), no more than runs are
    left to train."""
    if jobs > 1:
        runs = _check_runs(runs, share)
        jobs = min(jobs, _left_to_train(runs, share))
        if jobs > 1:
            return in_processes(job, jobs)
    together = dist.is_initialized() if together is None else together
    started, result = time.perf_counter(), SweepResult(share=share.describe())
    with terminate_as_exit():
        _sweep(runs, share, together, result)
    result.seconds = time.perf_counter() - started
    return result


def _check_runs(runs, share: Share) -> list:
    """The sweep's runs already there, finished or begun, checked against this command's settings
    before any run trains: a refusal at the sweep's tenth run would come after hours of the first
    nine. Returns the runs, each one's settings() computed once at most."""
    runs = [(directory, start, functools.cache(settings) if settings else None) for directory, start, settings in runs]
    for k, (directory, _, settings) in enumerate(runs):
        directory = Path(directory)
        if share.takes(k) and settings is not None and (directory / CONFIG).exists() and not held_elsewhere(directory):
            if is_finished(directory):
                check_same_settings(directory, settings(), finished=True)
            elif (directory / CHECKPOINT).exists():
                check_same_settings(directory, settings(), finished=False)
    return runs


def _left_to_train(runs, share: Share) -> int:
    """How many of the sweep's runs this share takes that are not finished yet."""
    return sum(share.takes(k) and not is_finished(Path(directory)) for k, (directory, *_) in enumerate(runs))


def _sweep(runs, share: Share, together: bool, result: SweepResult) -> None:
    runs = _check_runs(runs, share)
    for k, (directory, start, settings) in enumerate(runs):
        if not share.takes(k):
            result.elsewhere += 1
            continue
        claim = claim_run(directory, together)
        if claim.state == FINISHED:
            if settings is not None and (Path(directory) / CONFIG).exists():  # other settings: not this run
                check_same_settings(Path(directory), settings(), finished=True)
            result.skipped.append(str(directory))
            continue
        if claim.state == HELD:
            if (not together or dist.get_rank() == 0) and not in_job():  # a sibling's: its own lines say so
                print(claim.message, flush=True)
            result.held.append(str(directory))
            continue
        try:
            with training_under(claim):
                start(directory)
        finally:
            claim.release()  # a run that stopped, for whatever reason, is not held: the next job resumes it
        result.finished.append(str(directory))


def train(task: Task, config: TrainConfig, run_dir, run_record: RunRecord, progress: bool = True,
          num_threads: int | None = None) -> dict:
    """Train `task.model` in `run_dir`, resuming from its checkpoint if one is there.

    `run_record` is written to config.json (with this config, versions and the command line) when
    the run starts, and must match the one already there when it resumes. `num_threads`: torch's
    CPU threads; None chooses them at every epoch (threads.py), and metrics.jsonl records the count.
    """
    check_config(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Under torchrun every rank trains; rank 0 alone writes the run directory.
    distributed = dist.is_initialized()
    writer = not distributed or dist.get_rank() == 0
    record_now = run_settings(run_record, config)
    saved_config = run_dir / CONFIG
    if saved_config.exists() and (run_dir / CHECKPOINT).exists():
        check_same_settings(run_dir, record_now, finished=False)
    elif writer:
        record.write_json(saved_config, dict(record_now, versions=record.versions(),
                                             command=record.command_line(), started=record.now()))
    try:
        return _train(task, config, run_dir, run_record, progress, num_threads, started, distributed, writer)
    except Exception as error:
        # Said in result.json, for report; the run is taken again, from its checkpoint, next time.
        if writer and still_held() and not is_finished(run_dir):  # never over a finished result
            record.write_json(run_dir / RESULT, dict(run_record.identity(), status="failed", error=_failure(error),
                                                     failed=record.now()))
        raise


def _failure(error: Exception) -> str:
    """What stopped a run: a user's error as it was said, anything else with its traceback."""
    if isinstance(error, W2VCacheError):
        return str(error)
    return "".join(traceback.format_exception(error)).strip()


def _train(task: Task, config: TrainConfig, run_dir: Path, run_record: RunRecord, progress: bool,
           num_threads: int | None, started: float, distributed: bool, writer: bool) -> dict:
    model = task.model
    optimizer = make_optimizer(model.parameters(), config.lr)
    updates_per_epoch = math.ceil(len(task.train_batches(0)) / config.grad_accum)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: tri_stage(u, updates_per_epoch, config))
    # The checkpoint keeps the best dev rate as the fraction compared here, under "dev_wer" or
    # "dev_cer"; metrics.jsonl and result.json give it in percent.
    selected = f"dev_{config.select_by}"
    tie_break = "dev_cer" if config.select_by == "wer" else "dev_wer"  # what decides between equal rates
    first_epoch, best = 0, {"epoch": None, selected: math.inf, tie_break: math.inf}
    if (run_dir / CHECKPOINT).exists():
        state = load_checkpoint(run_dir / CHECKPOINT)
        model.load_state_dict(state["model"])
        load_optimizer(optimizer, state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            # As many GPUs' generators as this process sees: a run saved by a rank of 8 may go on on 1.
            for index, rng in enumerate(state["cuda_rng"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, index)
        first_epoch, best = state["epoch"], state["best"]
        if tie_break not in best and best["epoch"] is not None:  # a checkpoint from before ties were broken
            line = next((m for m in _read_metrics(run_dir, first_epoch) if m["epoch"] == best["epoch"]), {})
            value = line.get(f"{tie_break}_percent")
            best[tie_break] = value / 100 if isinstance(value, (int, float)) else math.inf
        if progress and writer and first_epoch < config.epochs:
            tqdm.write(f"resuming {run_dir} after epoch {first_epoch} of {config.epochs} (its checkpoint)")
    if writer:  # drop lines of an epoch whose checkpoint a kill prevented
        metrics = _read_metrics(run_dir, first_epoch)
        (run_dir / METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics))

    upcoming = None  # the next epoch's batches, begun while dev is evaluated
    for epoch in range(first_epoch, config.epochs):
        epoch_started = time.perf_counter()
        epoch_threads = threads.use(num_threads, model)
        task.start_epoch(epoch)
        model.train()
        batches = upcoming if upcoming is not None else task.train_batches(epoch)
        # The bar only counts: tqdm.auto iterates what it wraps once more on its own, which would
        # build a DataLoader's workers twice and take the batches begun for this epoch.
        with tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress or in_job(),
                  leave=False) as bar:
            loss_n, frames, data_wait, skipped, unreachable = 0, 0, 0.0, 0, 0
            # Summed where the loss is, in float64 (what adding Python floats gives), and read once a
            # second for the bar: on a GPU each read waits for every queued kernel.
            loss_total, shown = None, 0.0
            optimizer.zero_grad(set_to_none=True)
            iterator, step = iter(batches), 0
            while True:
                t = time.perf_counter()
                batch = next(iterator, _END)
                data_wait += time.perf_counter() - t
                if batch is _END:
                    break
                # The epoch's last group of batches may be short: average over the batches it has.
                group = min(config.grad_accum, len(batches) - (step // config.grad_accum) * config.grad_accum)
                updates = (step + 1) % config.grad_accum == 0 or step + 1 == len(batches)
                # Under DDP, gradients are summed over ranks once per update, not once per batch.
                with contextlib.nullcontext() if updates else getattr(task, "no_sync", contextlib.nullcontext)():
                    loss = task.loss(batch)
                    if not _finite_everywhere(loss, distributed):
                        skipped += 1  # a NaN or infinite loss: the batch is left out (on every rank)
                        del loss  # its graph would otherwise live on through the next forward
                    else:
                        (loss / group).backward()
                        value = loss.detach().double()
                        loss_total, loss_n = value if loss_total is None else loss_total + value, loss_n + 1
                step += 1
                if step % config.grad_accum == 0 or step == len(batches):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                frames += batch.frames
                unreachable += getattr(batch, "without_ctc_path", 0)
                elapsed = time.perf_counter() - epoch_started
                if progress and elapsed - shown >= 1.0 and loss_total is not None:
                    shown = elapsed
                    bar.set_postfix(loss=f"{float(loss_total) / loss_n:.3f}", fps=f"{frames / elapsed:.0f}", refresh=False)
                bar.update()
        loss_sum = float(loss_total) if loss_total is not None else 0.0  # the epoch's queued work done
        train_seconds = time.perf_counter() - epoch_started
        if distributed:  # the run's figures, not rank 0's share of them (batches are skipped by all ranks at once)
            loss_sum, loss_n, frames, unreachable = _summed_over_ranks(model, loss_sum, loss_n, frames, unreachable)
        upcoming = task.train_batches(epoch + 1) if epoch + 1 < config.epochs else None
        if hasattr(upcoming, "begin"):
            upcoming.begin()
        threads.use(num_threads, model)  # looked at again: a neighbour may have come or gone
        dev = evaluate(task, config.dev_split)
        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(loss_n, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "updates": schedule.last_epoch,
            "dev_wer_percent": dev.wer_percent,
            "dev_cer_percent": dev.cer_percent,
            "seconds": time.perf_counter() - epoch_started,
            "train_seconds": train_seconds,
            "data_wait_seconds": data_wait,
            "frames_per_second": frames / train_seconds if train_seconds else 0.0,
            # CTC finds no path through an utterance whose transcript needs more frames than it has:
            # it adds nothing to the loss (zero_infinity). A NaN or infinite batch loss is left out.
            "utterances_without_ctc_path": unreachable,
            "batches_not_finite": skipped,
            "threads": epoch_threads,
        }
        if unreachable and writer and epoch == first_epoch:
            _say(run_dir, f"note: {unreachable} training utterance(s) have transcripts longer than their frames allow "
                       "(CTC has no path through them): they teach nothing (metrics.jsonl: utterances_without_ctc_path)")
        if progress and writer:
            _say(run_dir, f"epoch {epoch + 1}/{config.epochs}: loss {entry['train_loss']:.3f}, "
                       f"dev WER {dev.wer_percent:.2f} %, CER {dev.cer_percent:.2f} % ({entry['seconds']:.1f} s)")
        check_still_held(run_dir, together=distributed)
        # Ties (a WER stuck at 100 % early on) go to the other rate, then to the earlier epoch.
        rates = (getattr(dev, selected.removeprefix("dev_")), getattr(dev, tie_break.removeprefix("dev_")))
        if best["epoch"] is None or rates < (best[selected], best[tie_break]):
            best = {"epoch": epoch + 1, selected: rates[0], tie_break: rates[1]}
            if writer:
                _save(model.state_dict(), run_dir / BEST)
        if writer:
            with open(run_dir / METRICS, "a") as f:
                f.write(json.dumps(entry) + "\n")
            for name, extra in getattr(task, "epoch_records", dict)().items():
                _record_epoch(run_dir / name, {"epoch": epoch + 1, **extra})
            _save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "schedule": schedule.state_dict(), "torch_rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "best": best},
                  run_dir / CHECKPOINT)
        if distributed:
            dist.barrier()  # the other ranks may read best.pt / checkpoint.pt next

    eval_started = time.perf_counter()
    threads.use(num_threads, model)  # also where every epoch was done before a resume: no epoch chose them
    model.load_state_dict(load_checkpoint(run_dir / BEST))
    result = dict(
        run_record.identity(),
        status="finished",
        best_epoch=best["epoch"],
        epochs=config.epochs,
    )
    for split in (config.dev_split, *(config.test_splits or ())):
        result[split] = evaluate(task, split, run_dir / DECODED / f"{split}.tsv" if writer else None).to_dict()
    result["timings"] = {
        "total_s": sum(m["seconds"] for m in _read_metrics(run_dir, config.epochs)) + time.perf_counter() - eval_started,
        "train_s": sum(m["train_seconds"] for m in _read_metrics(run_dir, config.epochs)),
        "test_s": time.perf_counter() - eval_started,
        "this_session_s": time.perf_counter() - started,
    }
    result["finished"] = record.now()
    check_still_held(run_dir, together=distributed)
    if writer:
        record.write_json(run_dir / RESULT, result)
    if distributed:
        dist.barrier()  # nobody moves on to the next run before this one's result exists
    return result


def _say(run_dir: Path, line: str) -> None:
    """A line of a run's progress; beside other --jobs' runs, it names its run."""
    tqdm.write(f"{run_dir.parent.name}/{run_dir.name}: {line}" if in_job() else line)


def _finite_everywhere(loss: torch.Tensor, distributed: bool) -> bool:
    """Whether the batch's loss is finite on every rank. A rank that left its batch out alone
    would never join the others' gradient all-reduce, and every rank would wait for it for ever."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _summed_over_ranks(model, *values: float) -> list:
    """Each value summed over the process group's ranks (on the model's device: NCCL's tensors
    live on the GPU); the counts come back as ints."""
    totals = torch.tensor(values, dtype=torch.float64, device=next(model.parameters()).device)
    dist.all_reduce(totals)
    return [type(v)(t) for v, t in zip(values, totals.tolist())]


# Parts of the run record that may change between the start of a run and its resumption.
# The store may be read from another place (a copy, a URL) and the run continued on another device.
# (Paths into config.json; fine-tuning's audio-loading processes change nothing a run computes.)
_VOLATILE = ("versions", "command", "started", "store", "device", "threads", "model.num_workers")


# What a finished run's result does not depend on, though a resumed run's would: the number of
# ranks (each rank's share of a batch, and so its random draws, follow from it), the corpus's
# sources as typed (a path given another way, a split added that the run does not read), the test
# splits the data has now (the run tested those it had).
_FINISHED_VOLATILE = ("world_size", "data.sources", "train.test_splits")


def run_settings(run_record: RunRecord, config: TrainConfig) -> dict:
    """What config.json records of a run's settings (train() adds versions, command line, start)."""
    return dict(run_record.to_json(), train=asdict(config))


def check_same_settings(run_dir: Path, now: dict, finished: bool) -> None:
    """The run in `run_dir` (its config.json) has the settings `now`, but for what may change
    (_VOLATILE). Resuming with other settings or other features would silently mix two
    experiments; counting a finished run of other settings as done would report the wrong one."""
    try:
        saved = upgrade_record(read_json(run_dir / CONFIG))
    except W2VCacheError as err:
        raise W2VCacheError(f"{err}: the run there cannot be compared with this one; move {run_dir} aside "
                            "(or delete it) to train the run anew") from None
    # Options added since the run started (select_by) took their defaults then.
    defaults = json.loads(json.dumps(asdict(TrainConfig())))
    saved["train"] = {**defaults, **saved.get("train", {})}
    now = upgrade_record(json.loads(json.dumps(now, default=str)))
    if DATA not in (saved.get("data") or {}):  # recorded before runs named their utterances: not checked
        now.get("data", {}).pop(DATA, None)
    _check_same_run(saved, now, run_dir, finished)


def _check_same_run(saved: dict, now: dict, run_dir: Path, finished: bool = False) -> None:
    diffs = []
    volatile = _VOLATILE + (_FINISHED_VOLATILE if finished else ())

    def walk(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                path = f"{where}.{k}" if where else k
                if path not in volatile:
                    walk(a.get(k), b.get(k), path)
        elif a != b:
            diffs.append(f"{where}: run has {a!r}, now {b!r}")

    walk(saved, now, "")
    if diffs:
        raise W2VCacheError(
            f"{run_dir} holds {'a finished' if finished else 'an unfinished'} run with other settings "
            f"({'; '.join(diffs[:5])}); use another --out or delete that run directory to start afresh"
        )
