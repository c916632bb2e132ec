"""Thread choice: the cores this process may use, a busy neighbour seen, small models on one thread."""

import os
import subprocess
import sys
import time

import pytest
import torch

from w2vcache import threads

linux_only = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads the Linux run queue in /proc")


def test_a_requested_count_is_used_and_small_models_get_one_thread():
    assert threads.choose(3, parameters=10**9) == 3
    assert threads.choose(None, parameters=threads.SMALL_MODEL - 1) == 1
    before = torch.get_num_threads()
    try:
        assert threads.use(None, torch.nn.Linear(4, 4)) == 1 and torch.get_num_threads() == 1
        assert threads.use(2, torch.nn.Linear(4, 4)) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._cgroup_quota(tmp_path) == 1.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads._cgroup_quota(tmp_path) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is a Linux call")
def test_available_cores_follow_the_affinity_mask():
    one_core = next(iter(os.sched_getaffinity(0)))
    script = (f"import os; os.sched_setaffinity(0, {{{one_core}}}); "
              "from w2vcache import threads; print(threads.available_cores())")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip() == "1"


@linux_only
def test_a_busy_neighbour_takes_a_core_from_large_models():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert threads.busy_elsewhere() >= 1
        assert threads.choose(None, parameters=10**8) <= max(1, threads.available_cores() - 1)
    finally:
        busy.kill()
        busy.wait()


def test_torchrun_ranks_share_the_cores_of_their_machine(monkeypatch):
    """Each of torchrun's 4 local ranks on 16 cores takes 4 threads, whatever its siblings are doing
    (sampled, they would read as busy neighbours); a small model keeps its one; a rank bound to
    cores of its own takes those."""
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 12)  # the 3 siblings' threads
    monkeypatch.setattr(threads, "_pinned", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.choose(None, parameters=10**8) == 4
    assert threads.choose(None, parameters=threads.SMALL_MODEL - 1) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert threads.choose(None, parameters=10**8) == 1
    monkeypatch.setattr(threads, "_pinned", lambda: True)  # the launcher bound it to its 16 cores
    assert threads.choose(None, parameters=10**8) == 4  # its own cores, less what is busy on them
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(threads, "_pinned", lambda: False)
    assert threads.choose(None, parameters=10**8) == 4  # outside torchrun: 16 cores, 12 busy


def test_jobs_share_their_commands_cores_even_within_an_affinity_mask(monkeypatch):
    """`--jobs 4` on 16 cores: 4 threads each, also where a cpuset (Slurm, docker --cpuset-cpus)
    bounds the command, where each would otherwise see its siblings' cores idle at the start."""
    from w2vcache import spread

    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(spread, "_jobs", 4)
    for pinned in (False, True):
        monkeypatch.setattr(threads, "_pinned", lambda: pinned)
        assert threads.choose(None, parameters=10**8) == 4
    monkeypatch.setattr(spread, "_jobs", 1)
    assert threads.choose(None, parameters=10**8) == 16
