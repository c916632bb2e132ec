"""How many CPU threads torch uses, chosen so that a run never collapses on a shared machine.

Torch's intra-op threads meet at a barrier at the end of every parallel operation. When another
process holds one of the cores, every barrier waits for a thread the kernel has descheduled, and
work made of many small operations (an LSTM's time steps, a small model's layers) slows down
several times over: on 2 cores beside one busy process a demo-sized probe epoch went from 1.8 s to
7.2 s with two threads, and stayed at 1.9 s with one. So the default is measured, not assumed:

- a small model runs on one thread, which is as fast idle (a second one gains under 10 %) and
  never waits at a barrier;
- a large one (W2V-Base, the paper's 3x1024 probe: 1.8x faster on two cores than on one) uses the
  cores this process may use (affinity and cgroup quota) that no other process is keeping busy,
  looked at again at every epoch and every extraction block, so a neighbour that starts or stops
  mid-run is followed.

Under torchrun, the ranks on one machine share its cores evenly instead (each would otherwise
take every idle core, and the others would read as busy neighbours), unless the launcher bound
each rank to cores of its own.

`--threads N` fixes the count instead.
"""

import math
import os
import time
from pathlib import Path

import torch

from .spread import jobs_here, local_processes

# Models below this many parameters get one thread: measured on 2 cores, a 1x128 BiLSTM probe
# (0.2 M) and builtin:tiny (0.1 M) gain under 10 % from a second thread, W2V-Base (95 M) and the
# 3x1024 probe (60 M) 1.7-1.9x.
SMALL_MODEL = 5_000_000
SAMPLES = 8  # looks at the run queue, SAMPLE_GAP seconds apart, to tell a busy neighbour from a blip
SAMPLE_GAP = 0.002


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota(root="/sys/fs/cgroup") -> float | None:
    """The CPU quota in cores (cgroup v2 cpu.max, or v1 cfs quota/period); None when unlimited."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def busy_elsewhere() -> int:
    """How many cores other processes keep busy: runnable tasks on the machine minus this process's
    own, averaged over a few quick looks (0 where /proc/stat cannot be read)."""
    counts = []
    for _ in range(SAMPLES):
        running = _procs_running()
        if running is None:
            return 0
        counts.append(max(0, running - _own_running()))
        time.sleep(SAMPLE_GAP)
    return int(sum(counts) / len(counts) + 0.5)


def _procs_running() -> int | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _own_running() -> int:
    """This process's threads that are runnable right now (the sampling thread among them)."""
    running = 0
    for task in Path("/proc/self/task").glob("*/stat"):
        try:
            # The state follows the parenthesised thread name, which may itself hold spaces.
            running += task.read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            pass
    return max(running, 1)


def choose(requested: int | None, parameters: int) -> int:
    """`requested` if given; else 1 for a small model, else the idle cores this process may use."""
    if requested:
        return requested
    if parameters < SMALL_MODEL:
        return 1
    siblings = local_processes()
    if siblings > 1 and not _pinned():
        return max(1, available_cores() // siblings)
    if jobs_here() > 1:  # a launcher bound this rank to cores of its own: its --jobs share them
        return max(1, available_cores() // jobs_here())
    return max(1, available_cores() - busy_elsewhere())


def _pinned() -> bool:
    """Whether this process runs on a part of the machine's cores (a launcher bound each rank
    to its own): its cores are then its share already."""
    try:
        return len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return False


def use(requested: int | None, model: torch.nn.Module) -> int:
    """Set torch's thread count for running `model` (see `choose`) and return it. A model on a GPU
    gets one unless asked: the CPU's share is small tensors (lengths, checks), for which a parallel
    region over every core only adds its start-up, and the cores are busy decoding and writing."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    n = choose(requested, sum(p.numel() for p in model.parameters())) if on_cpu or requested else 1
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
