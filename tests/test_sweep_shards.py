"""A sweep spread over torchrun ranks and --shard jobs: each run trained once, by whoever locks it
first, with the metrics it has when trained alone; live locks skipped, dead ones taken over."""

import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from conftest import run_killed_after_first_checkpoint
from w2vcache.cli import main
from w2vcache.errors import W2VCacheError
from w2vcache.probe import ProbeConfig, probe
from w2vcache.runs import SweepResult, find_runs
from w2vcache.spread import RUN_LOCK, Share, in_processes, rank_device, share_of
from w2vcache.store import locks
from w2vcache.store.locks import LOCK_DIR, SILENT_AFTER_S, try_lock
from w2vcache.train import TrainConfig

RUNS = ["probe/layer00/seed0", "probe/layer00/seed1", "probe/layer01/seed0", "probe/layer01/seed1"]
TINY = ["--layer", "0-1", "--seeds", "0,1", "--epochs", "1", "--hidden", "8", "--lstm-layers", "1", "--threads", "1"]
COMPARED = ("best_epoch", "dev", "test-clean", "test-other")


def tiny_probe(store, out, **kwargs):
    """The sweep of TINY, in this process."""
    return probe(str(store), "0-1", "0,1", out, ProbeConfig(hidden=8, lstm_layers=1), TrainConfig(epochs=1),
                 progress=False, num_threads=1, **kwargs)


@pytest.fixture(scope="module")
def alone(bundled_store, tmp_path_factory):
    """Each run's result.json from one process sweeping them all, one after another."""
    out = tmp_path_factory.mktemp("alone")
    assert tiny_probe(bundled_store, out).finished == [str(out / r) for r in RUNS]
    return {r: json.loads((out / r / "result.json").read_text()) for r in RUNS}


def w2vcache(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


def took(output: str) -> list[str]:
    """The runs a job's summary says it took."""
    lines = [line for line in output.splitlines() if ": took " in line]
    assert lines, output
    return [name for line in lines
            for name in line.split(": took ")[1].split(";")[0].split(", ") if name != "none"]


def assert_every_run_once_as_alone(out, outputs, alone):
    """Union of what the jobs took is every run, none twice; each trained one epoch, once; each run's
    metrics equal those of the run trained alone; no lock left behind; report reads the union."""
    taken = [name for output in outputs for name in took(output)]
    assert sorted(taken) == RUNS, outputs
    for name in RUNS:
        run = out / name
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 1, name
        result = json.loads((run / "result.json").read_text())
        assert {k: result[k] for k in COMPARED} == {k: alone[name][k] for k in COMPARED}, name
        assert not (run / LOCK_DIR).exists(), name
    assert [r.name for r in find_runs(out) if r.status == "finished"] == RUNS


def test_shares_cover_every_run_once_whatever_the_ranks_of_each_job():
    runs = range(39)  # 13 layers x 3 seeds
    for jobs, ranks in [(1, 1), (1, 8), (3, 1), (2, [1, 3])]:
        per_job = ranks if isinstance(ranks, list) else [ranks] * jobs
        takers = [[Share(j, jobs, r, per_job[j]) for r in range(per_job[j])] for j in range(jobs)]
        for k in runs:
            assert sum(s.takes(k) for job in takers for s in job) == 1, (jobs, ranks, k)


def test_shard_option_errors_are_extracts(monkeypatch, bundled_store, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert share_of(None) == Share()
    assert share_of("1/3") == Share(1, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert share_of("1/3") == Share(1, 3, 1, 2)
    assert share_of("1/3", ranks=False) == Share(1, 3)
    with pytest.raises(W2VCacheError, match=r"^--shard 3/2: needs 0 <= I < N$"):
        share_of("3/2")
    result = CliRunner().invoke(main, ["probe", "--store", str(bundled_store), "--shard", "one/2", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "Error: --shard 'one/2': expected I/N" in result.output
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(W2VCacheError, match="RANK='x'"):
        share_of(None)


def test_torchrun_ranks_share_the_runs_without_a_process_group(bundled_store, tmp_path, alone):
    job = w2vcache("torch.distributed.run", "--nproc_per_node", "2", "-m", "w2vcache", "probe",
                   "--store", str(bundled_store), *TINY, "--out", str(tmp_path), env={"OMP_NUM_THREADS": "1"})
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 0, output
    assert "rank 0/2: took probe/layer00/seed0, probe/layer01/seed0;" in output
    assert "rank 1/2: took probe/layer00/seed1, probe/layer01/seed1;" in output
    assert_every_run_once_as_alone(tmp_path, [output], alone)


def test_two_shard_jobs_started_together_finish_everything_once(bundled_store, tmp_path, alone):
    jobs = [w2vcache("w2vcache", "probe", "--store", str(bundled_store), *TINY, "--shard", shard, "--out", str(tmp_path))
            for shard in ("0/2", "1/2")]
    outputs = [job.communicate(timeout=120)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    assert "shard 0/2: took probe/layer00/seed0, probe/layer01/seed0;" in outputs[0]
    assert_every_run_once_as_alone(tmp_path, outputs, alone)
    again = CliRunner().invoke(main, ["probe", "--store", str(bundled_store), *TINY, "--out", str(tmp_path)])
    assert "0 run(s) trained, 4 already finished" in again.output


def test_a_run_locked_by_a_live_process_is_left_to_it(bundled_store, tmp_path, capsys):
    held = tmp_path / "probe/layer01/seed0"
    lock = try_lock(held, RUN_LOCK)  # this process plays the other job, still alive
    try:
        result = tiny_probe(bundled_store, tmp_path)
    finally:
        lock.release()
    assert result.held == [str(held)]
    assert sorted(result.finished) == sorted(str(tmp_path / r) for r in RUNS if r != "probe/layer01/seed0")
    assert f"{held}: skipped, being trained by pid {os.getpid()}" in capsys.readouterr().out
    assert not (held / "result.json").exists()
    assert result.summary(tmp_path, "probe")[0].startswith("this job: 3 run(s) trained, 0 already finished, "
                                                             "1 being trained by another job,")
    resumed = tiny_probe(bundled_store, tmp_path)  # the holder gone, the run is trained by whoever comes next
    assert (resumed.finished, len(resumed.skipped)) == ([str(held)], 3)


def test_a_lock_left_by_kill_9_is_taken_over_and_the_run_resumed(bundled_store, tmp_path):
    run = tmp_path / "probe/layer00/seed0"
    args = ["probe", "--store", str(bundled_store), "--layer", "0", "--seeds", "0", "--epochs", "2", *TINY[6:]]
    run_killed_after_first_checkpoint([*args, "--out", str(tmp_path)])
    assert (run / LOCK_DIR / f"{RUN_LOCK}.lock").exists() and not (run / "result.json").exists()
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 run(s) trained" in result.output and "being trained" not in result.output
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]  # resumed after epoch 1, not trained anew
    assert not (run / LOCK_DIR).exists()


def test_sigterm_releases_the_run_lock_and_the_run_resumes(bundled_store, tmp_path):
    """A scheduler's time limit or scancel sends SIGTERM: the run's lock goes with the process (a job
    on another host could not tell a dead holder from a live one), and the next command resumes it."""
    run = tmp_path / "probe/layer00/seed0"
    args = ["probe", "--store", str(bundled_store), "--layer", "0", "--seeds", "0", "--epochs", "2", *TINY[6:]]
    run_killed_after_first_checkpoint([*args, "--out", str(tmp_path)], sig=signal.SIGTERM)
    assert (run / "checkpoint.pt").exists() and not (run / "result.json").exists()
    assert not (run / LOCK_DIR / f"{RUN_LOCK}.lock").exists()
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_holder_in_another_pid_namespace_is_never_proved_dead(tmp_path):
    """Containers sharing a hostname do not see each other's pids: a lock whose holder ran in another
    pid namespace is left alone, while the same record from this namespace is taken over."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_DIR / f"{RUN_LOCK}.lock"
    lock.parent.mkdir()
    record = {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
              "pid_start": "1", "lock": RUN_LOCK}
    lock.write_text(json.dumps({**record, "pid_ns": "pid:[1]"}))
    assert try_lock(tmp_path, RUN_LOCK) == {**record, "pid_ns": "pid:[1]"}
    lock.write_text(json.dumps({**record, "pid_ns": os.readlink("/proc/self/ns/pid")}))
    taken = try_lock(tmp_path, RUN_LOCK)
    assert not isinstance(taken, dict)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()


def test_a_lock_from_another_host_is_taken_over_once_it_stops_being_renewed(tmp_path):
    """Another host's pid cannot be checked: its lock is trusted while renewed, taken over after
    SILENT_AFTER_S without renewal (a node lost with its job), and always trusted when written by
    a w2vcache without heartbeats."""
    lock = tmp_path / LOCK_DIR / f"{RUN_LOCK}.lock"
    lock.parent.mkdir()
    record = {"pid": 4242, "host": "another-node", "started": "2026-01-01T00:00:00+00:00", "pid_start": "1",
              "lock": RUN_LOCK, "heartbeat_s": 60.0}

    def written(record, silent_for: float) -> None:
        lock.write_text(json.dumps(record))
        then = lock.stat().st_mtime - silent_for
        os.utime(lock, (then, then))

    written(record, silent_for=SILENT_AFTER_S - 60)
    assert try_lock(tmp_path, RUN_LOCK) == record  # renewed a minute ago, or nearly: alive
    old = {k: v for k, v in record.items() if k != "heartbeat_s"}
    written(old, silent_for=10 * SILENT_AFTER_S)
    assert try_lock(tmp_path, RUN_LOCK) == old  # no heartbeats to miss: trusted, as before
    written(record, silent_for=SILENT_AFTER_S + 60)
    taken = try_lock(tmp_path, RUN_LOCK)
    assert not isinstance(taken, dict)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()
    assert not lock.exists()


def test_a_held_lock_is_renewed_until_released(tmp_path, monkeypatch):
    """Renewed every beat, through a passing file-system error (a network file system's EIO)."""
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    real_utime, failures = os.utime, []

    def utime_failing_once(path, *args):
        if not failures and not args:  # the heartbeat's touch
            failures.append(path)
            raise OSError(5, "Input/output error")
        return real_utime(path, *args)

    monkeypatch.setattr(locks.os, "utime", utime_failing_once)
    held = try_lock(tmp_path, RUN_LOCK)
    assert json.loads(held.path.read_text())["heartbeat_s"] == 0.05
    long_ago = held.path.stat().st_mtime - 3600
    real_utime(held.path, (long_ago, long_ago))
    deadline = time.monotonic() + 5
    while held.path.stat().st_mtime == long_ago and time.monotonic() < deadline:
        time.sleep(0.02)
    assert held.path.stat().st_mtime > long_ago + 3000  # touched again by the holder's thread
    assert failures and not held.lost
    held.release()
    held._beat.join(timeout=2)
    assert not held._beat.is_alive() and not held.path.exists()


@pytest.mark.parametrize("group", [False, True], ids=["alone", "process-group"])
def test_a_run_whose_lock_was_taken_over_is_left_to_its_new_holder(bundled_store, tmp_path, monkeypatch, group):
    """A trainer stopped for longer than SILENT_AFTER_S finds, when it goes on, that a job on
    another host took its run: it stops before writing another epoch, leaving the run to it. Under
    a process group (DDP: rank 0 holds the lock for all ranks), rank 0 tells every rank (here a
    group of one, which goes through the same collective)."""
    import w2vcache.train

    if group:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
        broadcasts = []
        broadcast = dist.broadcast_object_list
        monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: broadcasts.append(list(objects))
                            or broadcast(objects, src=src))

    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.02)
    run = tmp_path / "probe/layer00/seed0"
    lock = run / LOCK_DIR / f"{RUN_LOCK}.lock"
    other = {"pid": 1, "host": "another-node", "started": "2026-01-01T00:00:00+00:00", "heartbeat_s": 60.0}
    save = w2vcache.train._save

    def save_then_lose_the_lock(obj, path):
        save(obj, path)
        if path.name == "checkpoint.pt" and not lock.read_text().startswith('{"pid": 1,'):
            lock.write_text(json.dumps(other))  # the other job's takeover, while this one was stopped
            time.sleep(0.3)  # a few beats: the heartbeat finds the lock is no longer its own

    monkeypatch.setattr(w2vcache.train, "_save", save_then_lose_the_lock)
    try:
        with pytest.raises(W2VCacheError, match=rf"^{re.escape(str(run))}: this process lost its lock .*run\.lock .* another process took it over"):
            probe(str(bundled_store), "0", "0", tmp_path, ProbeConfig(hidden=8, lstm_layers=1, batch_frames=2000),
                  TrainConfig(epochs=3), progress=False)
    finally:
        if group:
            dist.destroy_process_group()
    if group:  # the claim's answer, then "still held" after epoch 1, "lost" after epoch 2
        assert [b[0] for b in broadcasts[1:]] == [False, True]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run / "result.json").exists()
    assert json.loads(lock.read_text()) == other  # the new holder's lock stays


def test_an_initialised_process_group_trains_each_run_together(bundled_store, tmp_path, monkeypatch):
    """A group the caller made (as fine-tuning's DDP does): its ranks do not split the runs, rank 0
    claims each and tells the others (here a group of one)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        result = tiny_probe(bundled_store, tmp_path / "runs")
    finally:
        dist.destroy_process_group()
    assert result.share is None and len(result.finished) == 4


def test_finetune_with_shard_under_torchrun_spreads_runs_instead_of_ddp(tmp_path, monkeypatch):
    """--shard: no process group; rank 1 of 2 takes every second run of the job, alone."""
    from w2vcache.corpus import build_corpus
    from w2vcache.finetune import finetune

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    trained = []
    monkeypatch.setattr("w2vcache.finetune.train", lambda task, tc, directory, *a, **k: trained.append(
        (directory.relative_to(tmp_path).as_posix(), task.world)))
    result = finetune(build_corpus(), reinits=[(), (4,)], seeds=[0, 1], out=tmp_path, shard="0/1", progress=False,
                      train_config=TrainConfig(epochs=1))
    assert not dist.is_initialized()
    assert trained == [("finetune/reinit-none/seed1", 1), ("finetune/reinit-4/seed1", 1)]
    assert (result.share, result.elsewhere) == ("rank 1/2", 2)


def test_torchrun_ranks_take_their_own_gpu_and_a_named_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (rank_device("cuda"), rank_device("cpu")) == ("cuda:1", "cpu")
    with pytest.raises(W2VCacheError, match=r"^--device cuda:0: under torchrun give --device cuda;"):
        rank_device("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU where there is none")
@pytest.mark.parametrize("command", ["probe", "finetune", "extract"])
def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(command, bundled_store, tmp_path):
    from click.testing import CliRunner

    from w2vcache.cli import main

    where = ["--store", str(bundled_store) if command == "probe" else str(tmp_path / "s.zarr")]
    base = [command, *(where if command != "finetune" else []), "--out" if command != "extract" else "--layers",
            str(tmp_path / "runs") if command != "extract" else "0"]
    for device, message in [("cuda", "--device cuda: no CUDA GPU is available here"),
                            ("cuda:1", "--device cuda:1: no CUDA GPU is available here"),
                            ("mps", "--device mps: w2vcache runs on cpu or cuda (cuda:N)"),
                            ("gpu", "--device 'gpu': expected cpu, cuda or cuda:N")]:
        result = CliRunner().invoke(main, [*base, "--device", device])
        assert result.exit_code == 1 and message in result.output, (device, result.output)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "s.zarr").exists()


def test_jobs_train_each_run_once_as_alone_and_leave_another_commands_run_to_it(bundled_store, tmp_path, alone, capfd):
    """`--jobs 2`: two processes take the runs between them; each run trained once, to the numbers
    it gets alone; a run locked by another command is left to it and said once, by the command."""
    held = tmp_path / "probe/layer01/seed1"
    lock = try_lock(held, RUN_LOCK)  # this process plays the other command, still alive
    try:
        result = CliRunner().invoke(main, ["probe", "--store", str(bundled_store), *TINY, "--jobs", "2",
                                           "--out", str(tmp_path)])
    finally:
        lock.release()
    output = result.output + capfd.readouterr().out  # the command's lines, and its processes'
    assert result.exit_code == 0, output
    assert "this job: 3 run(s) trained, 0 already finished, 1 being trained by another job" in output
    assert "held by another job: probe/layer01/seed1" in output and "being trained by pid" not in output
    for name in RUNS[:3]:
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 1, name
        result = json.loads((tmp_path / name / "result.json").read_text())
        assert {k: result[k] for k in COMPARED} == {k: alone[name][k] for k in COMPARED}, name
        assert f"{name.split('/', 1)[1]}: epoch 1/1: loss" in output  # lines name their run
    assert not (held / "result.json").exists() and not any(tmp_path.rglob("run.lock"))
    assert tiny_probe(bundled_store, tmp_path).finished == [str(held)]  # left for whoever comes next


def test_jobs_errors_are_said_once_by_the_command(bundled_store, tmp_path, capfd):
    """A run there that cannot be compared is refused before any process starts; an error inside
    a process's run (a damaged chunk) reaches the command, which says it once."""
    run = tmp_path / "runs/probe/layer00/seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{ not json")
    (run / "checkpoint.pt").write_bytes(b"")
    args = ["probe", *TINY, "--jobs", "2", "--out", str(tmp_path / "runs")]
    refused = CliRunner().invoke(main, [*args, "--store", str(bundled_store)])
    assert refused.exit_code == 1 and refused.output.startswith(f"Error: {run / 'config.json'}: not valid JSON")
    shutil.rmtree(tmp_path / "runs")
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(bundled_store, damaged)
    chunk = next((damaged / "train" / "layer00").rglob("c/*/*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    failed = CliRunner().invoke(main, [*args, "--store", str(damaged)])
    output = failed.output + capfd.readouterr().err
    assert failed.exit_code == 1 and "Traceback" not in output, output
    assert failed.output.count("Error: ") == 1 and "train/layer00 chunk" in failed.output, failed.output


def start_method_sweep() -> SweepResult:
    """A stand-in sweep that says how the process it runs in would start processes of its own."""
    return SweepResult(share=multiprocessing.get_start_method())


def test_a_jobs_process_starts_its_own_processes_as_the_command_would():
    """Fine-tuning's audio loaders are processes: spawned from a spawned job, each would import
    torch again, seconds per epoch (a 2-run sweep took 46 s instead of 9)."""
    assert in_processes(start_method_sweep, 2).share == multiprocessing.get_start_method()


def test_an_error_a_job_cannot_hand_back_as_it_is_reaches_the_command_as_its_words():
    """BadAudioError pickles but cannot be rebuilt from its message alone: it goes as the one-line
    error it is; what cannot be pickled at all goes as its words too."""
    from w2vcache.audio import BadAudioError
    from w2vcache.spread import _portable

    bad = BadAudioError([("dev", "u1", "/a/u1.flac", "truncated")], total=3)
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(bad))
    sent = pickle.loads(pickle.dumps(_portable(bad)))
    assert isinstance(sent, W2VCacheError) and str(sent) == str(bad)
    unpicklable = RuntimeError(lambda: None)
    assert str(pickle.loads(pickle.dumps(_portable(unpicklable)))).startswith("RuntimeError: <function")
    result = SweepResult(finished=["a"])
    assert _portable(result) is result


def test_jobs_under_torchrun_get_the_device_as_asked(bundled_store, tmp_path, monkeypatch):
    """A torchrun rank resolves --device cuda to cuda:LOCAL_RANK; its --jobs must get "cuda" and
    resolve it themselves (given cuda:1 under torchrun, each would refuse it). No GPU is used:
    the jobs are caught as they would start."""
    from w2vcache import finetune as finetune_module
    from w2vcache import train as train_module
    from w2vcache.corpus import build_corpus

    from w2vcache import spread

    monkeypatch.setattr(spread, "check_device", lambda device: None)  # as if it had two GPUs
    started = []
    monkeypatch.setattr(train_module, "in_processes", lambda sweep, jobs: started.append(sweep) or SweepResult())
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # Four runs each: this rank takes two of them, one for each job
    probe(str(bundled_store), "0-3", "0", tmp_path, ProbeConfig(hidden=8, lstm_layers=1), TrainConfig(epochs=1),
          device="cuda", progress=False, jobs=2)
    finetune_module.finetune(build_corpus(), "builtin:tiny", [(), (4,)], [0, 1], tmp_path, device="cuda", shard="0/1",
                             progress=False, jobs=2)
    assert [sweep.keywords.get("device", sweep.args[8]) for sweep in started] == ["cuda", "cuda"]
