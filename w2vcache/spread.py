"""Spreading a sweep's runs over torchrun ranks and `--shard I/N` jobs, and the lock per run.

A run is independent training, so spreading a sweep needs no process group: each process takes
its share of the sweep's (experiment, seed) runs from --shard and torchrun's RANK/WORLD_SIZE, and
locks each run directory while it trains it. The lock is the store's (store/locks.py: pid and
process start time, taken over once its holder is dead, as after kill -9), so two jobs whose
shares overlap never train one run at once: the second skips it, saying who holds it, and goes on.

Where a process group *is* initialised (fine-tuning's DDP: every rank trains the same run), the
ranks act as one: rank 0 alone looks at each run and locks it, and tells the others what to do.

`--jobs N` (`in_processes`) trains N runs at once on one machine: N processes each walk the whole
share and take the next run no other holds, so a fast one takes more, and a run is trained as it
would be alone (each is seeded on its own), to the same numbers.
"""

import contextlib
import json
import contextvars
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import W2VCacheError
from .runs import RESULT, SweepResult
from .store.locks import LOCK_DIR, SILENT_AFTER_S, Lock, held_by_another, try_lock

RUN_LOCK = "run"  # RUNS/probe/layer08/seed0/.locks/run.lock while a process trains that run

TAKEN, FINISHED, HELD = "taken", "finished", "held"
FAILED = "failed"  # rank 0 could not claim the run: every rank stops with its message


@dataclass(frozen=True)
class Share:
    """Which runs of a sweep this process takes: run k (in the sweep's order) goes to job
    k % jobs, and within that job to rank (k // jobs) % ranks. Nesting ranks inside jobs (rather
    than one flat index) means every run is taken whatever number of ranks each job has."""

    job: int = 0
    jobs: int = 1
    rank: int = 0
    ranks: int = 1

    def takes(self, k: int) -> bool:
        return k % self.jobs == self.job and (k // self.jobs) % self.ranks == self.rank

    def describe(self) -> str | None:
        """'shard 1/4', 'rank 0/8', 'shard 1/4, rank 0/8'; None for the whole sweep."""
        parts = ([f"shard {self.job}/{self.jobs}"] if self.jobs > 1 else []) + \
                ([f"rank {self.rank}/{self.ranks}"] if self.ranks > 1 else [])
        return ", ".join(parts) or None


def share_of(shard: str | None, ranks: bool = True) -> Share:
    """The share of `--shard I/N` (None: the whole sweep), split further between torchrun's ranks
    when `ranks` and no process group is initialised (an initialised group trains runs together).
    Errors as extract's --shard: `--shard 3/2: needs 0 <= I < N`."""
    job, jobs = parse_shard(shard) if shard is not None else (0, 1)
    rank, world = (0, 1)
    if ranks and not dist.is_initialized():
        rank, world = parse_shard(None) or (0, 1)  # RANK / WORLD_SIZE, checked there
    return Share(job, jobs, rank, world)


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N); with no --shard, torchrun's RANK/WORLD_SIZE make each rank a shard."""
    if spec is None:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            return (int(os.environ["RANK"]), world) if world > 1 and "RANK" in os.environ else None
        except ValueError:
            raise W2VCacheError(
                f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                "torchrun's variables must be integers") from None
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise W2VCacheError(f"--shard {spec!r}: expected I/N, e.g. 0/4 for the first of four workers") from None
    if not (n >= 1 and 0 <= i < n):
        raise W2VCacheError(f"--shard {spec}: needs 0 <= I < N")
    return i, n


def rank_device(device: str) -> str:
    """--device checked (cpu, cuda or cuda:N of this machine) and, as cuda under torchrun, made
    this rank's GPU, cuda:LOCAL_RANK (one device per rank). A named GPU (cuda:1) with several
    ranks would put them all on it, so it is refused."""
    check_device(device)
    if "LOCAL_RANK" not in os.environ:
        return device
    if device == "cuda":
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise W2VCacheError(f"--device {device}: under torchrun give --device cuda; each rank then takes "
                            "its own GPU, cuda:LOCAL_RANK")
    return device


def local_processes() -> int:
    """The processes of this command on this machine, which share its cores and memory:
    torchrun's (LOCAL_WORLD_SIZE) times `--jobs`; 1 for a lone process."""
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return ranks * _jobs


# In a process `in_processes` started: how many of them share this machine's runs (1: none).
_jobs = 1


def jobs_here() -> int:
    """How many processes of this command's --jobs train runs beside this one (1: none)."""
    return _jobs


def in_job() -> bool:
    """Whether this process is one of `--jobs`: it trains runs beside sibling processes, so a run
    another holds is not news, and progress is said in lines that name their run, not in bars."""
    return _jobs > 1


def in_processes(sweep, jobs: int) -> SweepResult:
    """`sweep()` (a probe or fine-tuning sweep, picklable: a functools.partial) run by `jobs`
    processes at once, each taking the next run none of the others holds; their results as one.

    Processes, not threads: each run seeds torch's global generators and sets its thread count,
    which threads would share. Spawned, not forked: a fork would copy zarr's and torch's threads'
    locks mid-use. Ctrl-C reaches them all (one terminal); SIGTERM to this process is passed on,
    so each releases its run's lock."""
    context = multiprocessing.get_context("spawn")
    outcomes = context.SimpleQueue()
    started = time.perf_counter()
    processes = [context.Process(target=_job, args=(jobs, sweep, outcomes), name=f"w2vcache-job{j}")
                 for j in range(jobs)]
    for process in processes:
        process.start()
    try:
        with terminate_as_exit():
            results = _outcomes(processes, outcomes)
    except KeyboardInterrupt:
        _stop(processes, signal.SIGINT, grace=5.0)  # a Ctrl-C at the terminal has reached them too
        raise
    except BaseException:  # SIGTERM (as SystemExit), or an outcome that could not be read
        _stop(processes, signal.SIGTERM, grace=0.0)
        raise
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]  # the same refusal from each process is said once
    if len(results) < jobs:
        codes = ", ".join(str(p.exitcode) for p in processes)
        raise W2VCacheError(f"{jobs - len(results)} of the --jobs {jobs} processes ended without finishing (exit "
                            f"codes {codes}: killed, out of memory, or what they printed above; a Python script "
                            "that starts them needs its work under `if __name__ == \"__main__\":`); what they were "
                            "training resumes when the command is run again")
    finished = {d for r in results for d in r.finished}
    # A run one process found held or finished may be one its sibling trained meanwhile.
    return SweepResult(finished=sorted(finished),
                       skipped=sorted({d for r in results for d in r.skipped} - finished),
                       held=sorted({d for r in results for d in r.held} - finished),
                       seconds=time.perf_counter() - started, share=results[0].share, elsewhere=results[0].elsewhere)


def _outcomes(processes, outcomes) -> list:
    """What the processes hand back, read while they run: a result waiting in the pipe would keep
    its process from ending."""
    results = []
    while True:
        alive = [process.sentinel for process in processes if process.is_alive()]
        while not outcomes.empty():
            results.append(outcomes.get())
        if not alive:
            return results
        multiprocessing.connection.wait(alive, timeout=1.0)


def _stop(processes, sig: int, grace: float) -> None:
    """Stop the processes still running: after `grace` seconds to end by themselves, `sig`, then
    SIGTERM; each releases its run's lock on the way out."""
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, sig)
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.terminate()
            process.join()


def _job(jobs: int, sweep, outcomes) -> None:
    """One of in_processes' processes: its result, or what stopped it, handed back to the command."""
    global _jobs
    _jobs = jobs
    # A spawned process starts its own (fine-tuning's audio loaders) by spawning too, each importing
    # torch anew: seconds per epoch. The platform's way, as in the command's own process.
    multiprocessing.set_start_method(None, force=True)
    try:
        outcome = sweep()
    except BaseException as error:  # SystemExit and Ctrl-C too: the command says it, once
        if not isinstance(error, (W2VCacheError, OSError, KeyboardInterrupt, SystemExit)):
            traceback.print_exc()  # not the user's doing: where it happened, for a bug report
        outcome = error
    outcomes.put(_portable(outcome))


def _portable(outcome):
    """`outcome` as the command's process can read it back: an exception that pickles but cannot
    be rebuilt (its __init__ wants more than its message), or cannot be pickled, goes as its words."""
    try:
        pickle.loads(pickle.dumps(outcome))
        return outcome
    except Exception:
        kind = W2VCacheError if isinstance(outcome, W2VCacheError) else RuntimeError
        return kind(str(outcome) if kind is W2VCacheError else f"{type(outcome).__name__}: {outcome}")


@contextlib.contextmanager
def terminate_as_exit():
    """SIGTERM (a scheduler's time limit, scancel, preemption) ends a process without running its
    `finally` blocks, which would leave a run's lock behind for jobs on other hosts to skip; raised
    as SystemExit instead, the lock is released on the way out. A handler someone else installed
    is left alone, as is a sweep run outside the main thread (signals go to the main thread)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def exit_(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_device(device: str) -> None:
    """A clear refusal of a device w2vcache cannot run on here, before anything is written."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise W2VCacheError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise W2VCacheError(f"--device {device}: w2vcache runs on cpu or cuda (cuda:N)")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise W2VCacheError(f"--device {device}: no CUDA GPU is available here")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise W2VCacheError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0-{torch.cuda.device_count() - 1}")


# ---------------------------------------------------------------------------------------------
# Claiming a run


@dataclass
class Claim:
    """What this process does with one run: trains it (TAKEN, holding `lock`), skips it as
    FINISHED (result.json written), or leaves it to the live process that HOLDS its lock."""

    state: str
    message: str | None = None  # HELD: who holds it, as one line
    lock: Lock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# The lock of the run this process is training (set by train.sweep around each run), so that the
# training loop can tell whether it still holds it before it writes an epoch.
_TRAINING_UNDER: contextvars.ContextVar = contextvars.ContextVar("w2vcache_run_lock", default=None)


@contextlib.contextmanager
def training_under(claim: Claim):
    token = _TRAINING_UNDER.set(claim.lock)
    try:
        yield
    finally:
        _TRAINING_UNDER.reset(token)


def check_still_held(directory, together: bool = False) -> None:
    """Refuse to write on in a run whose lock this process has lost (Lock.check_held): another job
    took the run over and is training it. `together`: the ranks of the process group train the run
    (DDP) and rank 0 alone holds its lock, so rank 0 tells every rank whether it still does (all
    ranks must call this at the same point), and all stop together: none is left waiting for the
    others at the next collective."""
    lock = _TRAINING_UNDER.get()
    if together:
        # Decided once, from rank 0's answer: `lost` only ever turns true, and a rank that went on
        # while another stopped would wait for it for ever.
        answer = [lock is not None and lock.lost] if dist.get_rank() == 0 else [None]
        dist.broadcast_object_list(answer, src=0)
        if not answer[0]:
            return
        if lock is not None:
            lock.check_held(str(directory))
        raise W2VCacheError(f"{directory}: rank 0 lost the run's lock (another process took it over); "
                            "every rank stops here without writing to it again")
    if lock is not None:
        lock.check_held(str(directory))


def held_message(directory, holder: dict) -> str:
    lock = Path(directory) / LOCK_DIR / f"{RUN_LOCK}.lock"
    return (f"{directory}: skipped, being trained by pid {holder.get('pid')} on host {holder.get('host')} "
            f"since {holder.get('started')} (a holder on another host that stops renewing the lock is "
            f"taken for dead after {SILENT_AFTER_S / 60:.0f} minutes; or delete {lock})")


def is_finished(directory: Path) -> bool:
    """Whether the run's result.json says it finished. A failed run's says why it stopped, and the
    run is taken again (from its last checkpoint)."""
    try:
        return json.loads((directory / RESULT).read_text()).get("status") != "failed"
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: left alone, as a finished run is (report names the file)


def _claim(directory: Path) -> Claim:
    if is_finished(directory):  # looked at first: a finished run gets no lock folder
        return Claim(FINISHED)
    got = try_lock(directory, RUN_LOCK)
    if isinstance(got, dict):
        return Claim(HELD, held_message(directory, got))
    if is_finished(directory):  # another job finished it between our two looks
        got.release()
        return Claim(FINISHED)
    return Claim(TAKEN, lock=got)


def still_held() -> bool:
    """Whether this process still holds the lock of the run it trains (True outside a sweep)."""
    lock = _TRAINING_UNDER.get()
    return lock is None or lock.still_ours()


def held_elsewhere(directory) -> bool:
    """Whether another live process is training the run in `directory` now."""
    return held_by_another(directory, RUN_LOCK)


def claim_run(directory, together: bool = False) -> Claim:
    """Claim `directory` for this process. `together`: the ranks of the initialised process
    group train it as one (DDP), so rank 0 claims it and every rank follows its answer (all
    ranks must call this for the same runs, in the same order)."""
    directory = Path(directory)
    if not together:
        return _claim(directory)
    claim = None
    if dist.get_rank() == 0:
        try:
            claim = _claim(directory)
        except Exception as error:  # told to every rank, which would otherwise wait for an answer forever
            claim = Claim(FAILED, f"{directory}: cannot lock the run: {error}")
    answer = [(claim.state, claim.message) if claim else None]
    dist.broadcast_object_list(answer, src=0)
    if answer[0][0] == FAILED:
        raise W2VCacheError(answer[0][1])
    return claim or Claim(*answer[0])
