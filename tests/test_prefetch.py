"""The probe's prefetching data path: the same batches in the same order as without it, the same
run, and no thread left behind at the end of an epoch, on an error or on Ctrl-C."""

import json
import random
import threading
import time

import pytest
import torch
from click.testing import CliRunner

from w2vcache import probe as probe_module
from w2vcache.cli import main
from w2vcache.errors import W2VCacheError
from w2vcache.probe import PREFETCH_THREAD, ProbeConfig, ProbeTask, _Prefetched, probe
from w2vcache.store import open_store
from w2vcache.train import TrainConfig, seed_everything, train
from w2vcache.runs import RunRecord

SMALL = dict(hidden=16, lstm_layers=1, batch_frames=1500)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD]


def no_prefetch_thread_left(timeout: float = 10.0) -> bool:
    """A worker abandoned mid-epoch finishes the batch it is building, then ends by itself."""
    for t in prefetch_threads():
        t.join(timeout)
    return not prefetch_threads()


def task(store, prefetch: int, probe_kind: str = "bilstm", layer: str = "layer02") -> ProbeTask:
    seed_everything(0)
    config = ProbeConfig(**SMALL, probe=probe_kind, prefetch=prefetch)
    return ProbeTask(open_store(store), layer, config, TrainConfig(seed=3))


def same_batch(a, b) -> None:
    assert a.features.dtype == b.features.dtype == torch.float32
    assert torch.equal(a.features, b.features)
    for name in ("lengths", "targets", "target_lengths"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.references == b.references


@pytest.mark.parametrize("layer", ["layer02", "weighted"])
def test_prefetched_batches_equal_the_unprefetched_ones_in_order(bundled_store, layer):
    plain, ahead = task(bundled_store, 0, layer=layer), task(bundled_store, 3, layer=layer)
    for epoch in (0, 1):
        expected, got = list(plain.train_batches(epoch)), list(ahead.train_batches(epoch))
        assert len(expected) == len(got) == len(ahead.train_batches(epoch)) > 2
        for a, b in zip(expected, got):
            same_batch(a, b)
    for split in ("dev", "test-clean"):
        expected, got = list(plain.eval_batches(split)), list(ahead.eval_batches(split))
        assert len(expected) == len(got)
        for a, b in zip(expected, got):
            same_batch(a, b)
    assert no_prefetch_thread_left(timeout=0)  # each epoch's iterator ended its worker


def test_a_run_with_prefetch_equals_one_without(bundled_store, tmp_path, monkeypatch):
    """The default (2 ahead, from Python) and `w2vcache probe --prefetch 0` train the same run."""
    runs, prefetchers = {}, []
    monkeypatch.setattr(probe_module, "_Prefetched",
                        lambda *args: prefetchers.append(args) or _Prefetched(*args))
    for prefetch in (0, 2):
        if prefetch:
            probe(str(bundled_store), layers="2", seeds="0", out=tmp_path / f"p{prefetch}", config=ProbeConfig(**SMALL),
                  train_config=TrainConfig(epochs=2, lr=2e-3), progress=False, num_threads=1)
        else:
            options = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
            result = CliRunner().invoke(main, ["probe", "--store", str(bundled_store), "--layer", "2", "--epochs", "2",
                                               "--lr", "2e-3", "--threads", "1", "--prefetch", "0", *options,
                                               "--out", str(tmp_path / "p0")])
            assert result.exit_code == 0, result.output
            assert prefetchers == []  # every batch was built in the loop
        run = next((tmp_path / f"p{prefetch}").rglob("result.json")).parent
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        runs[prefetch] = (
            [{k: m[k] for k in ("train_loss", "dev_wer_percent", "dev_cer_percent", "updates")} for m in metrics],
            {k: v for k, v in json.loads((run / "result.json").read_text()).items() if k not in ("timings", "finished")},
            torch.load(run / "best.pt"),
        )
    assert prefetchers and all(depth == 2 for _, depth, _ in prefetchers)
    assert runs[0][0] == runs[2][0]
    assert runs[0][1] == runs[2][1]
    assert runs[0][2].keys() == runs[2][2].keys()
    assert all(torch.equal(runs[0][2][k], runs[2][2][k]) for k in runs[0][2])
    assert no_prefetch_thread_left(timeout=0)


def test_order_is_kept_whatever_each_batch_takes_to_build():
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.01) for _ in range(30)]

    def maker(i):
        def make():
            time.sleep(delays[i])
            return i
        return make

    assert list(_Prefetched([maker(i) for i in range(30)], 4, lambda b: b)) == list(range(30))
    assert no_prefetch_thread_left(timeout=0)


def test_a_failing_batch_is_raised_in_the_loop_and_stops_the_thread():
    def make(i):
        if i == 3:
            raise ValueError("batch 3 is broken")
        return i

    got = []
    with pytest.raises(ValueError, match="batch 3 is broken"):
        for batch in _Prefetched([lambda i=i: make(i) for i in range(10)], 2, lambda b: b):
            got.append(batch)
    assert got == [0, 1, 2]
    assert no_prefetch_thread_left(timeout=0)  # the failure ended the worker before it was raised


@pytest.mark.parametrize("error", [RuntimeError("step failed"), KeyboardInterrupt()])
def test_a_loop_stopped_by_an_error_or_ctrl_c_leaves_no_thread(bundled_store, tmp_path, error):
    """The real training loop, its step failing on the second batch: the exception (and its
    traceback, which keeps the loop's iterator alive) reaches the caller, the worker does not."""
    probe_task = task(bundled_store, 2)
    calls = []
    step = probe_task.loss

    def failing_loss(batch):
        calls.append(batch)
        if len(calls) == 2:
            time.sleep(0.2)  # let the worker fill its places ahead: it must end all the same
            raise error
        return step(batch)

    probe_task.loss = failing_loss
    record = RunRecord(kind="probe", experiment="x", layer=2, reinit=[], seed=0, model={}, data={}, store="s",
                       device="cpu", threads=1)
    with pytest.raises(type(error)) as caught:
        train(probe_task, TrainConfig(epochs=1), tmp_path / "run", record, progress=False, num_threads=1)
    assert caught.traceback  # held, with the loop's frame, while the thread is checked
    assert no_prefetch_thread_left()


def test_a_loop_that_breaks_early_leaves_no_thread(bundled_store):
    batches = iter(task(bundled_store, 2).train_batches(0))
    next(batches)
    assert no_prefetch_thread_left()  # not closed, not collected: the worker ended by itself
    batches.close()
    with pytest.raises(StopIteration):
        next(batches)


def test_each_epoch_after_the_first_starts_with_batches_built_while_dev_was_evaluated(bundled_store, tmp_path, monkeypatch):
    """The loop begins the next epoch's batches before evaluating dev, and uses those very batches:
    every training batch of the run is built once, none twice."""
    from w2vcache import train as train_module

    probe_task = task(bundled_store, 2)
    built, lock = [], threading.Lock()
    assemble = probe_task._assemble

    def counted(split, indices):
        with lock:
            built.append((split, tuple(indices)))
        return assemble(split, indices)

    probe_task._assemble = counted
    per_epoch = len(probe_task.train_batches(0))
    evaluate, during_dev, epochs = train_module.evaluate, [], 3

    def evaluate_once_begun(task_, split, *rest):
        # After each epoch but the last, wait (a while, at most) for the next epoch's first batches:
        # without the early start they never come.
        before = sum(s == "train" for s, _ in built)
        deadline = time.monotonic() + (10 if len(during_dev) < epochs - 1 else 0.5)
        while time.monotonic() < deadline and sum(s == "train" for s, _ in built) < before + 2:
            time.sleep(0.01)
        during_dev.append(sum(s == "train" for s, _ in built) - before)
        return evaluate(task_, split, *rest)

    monkeypatch.setattr(train_module, "evaluate", evaluate_once_begun)
    record = RunRecord(kind="probe", experiment="x", layer=2, reinit=[], seed=0, model={}, data={}, store="s",
                       device="cpu", threads=1)
    train(probe_task, TrainConfig(epochs=epochs, test_splits=()), tmp_path / "run", record, progress=False, num_threads=1)
    # After epochs 1 and 2 the next epoch's first two batches were built during dev; after the last, none.
    assert during_dev[:epochs] == [2, 2, 0]
    trained = [b for s, b in built if s == "train"]
    assert len(trained) == epochs * per_epoch
    assert trained == [tuple(make.args[1]) for e in range(epochs) for make in probe_task.train_batches(e).makers]
    assert no_prefetch_thread_left()


def resident_task(store, resident: bool, layer: str = "layer02", probe_kind: str = "bilstm") -> ProbeTask:
    seed_everything(0)
    config = ProbeConfig(**SMALL, probe=probe_kind, resident=resident)
    return ProbeTask(open_store(store), layer, config, TrainConfig(seed=3))


@pytest.mark.parametrize("layer", ["layer02", "weighted"])
def test_batches_gathered_from_the_device_copy_equal_the_assembled_ones(bundled_store, layer):
    """On a GPU the features are copied there once and each batch is gathered there (forced on
    the CPU here, which is the same code on another device): the same values, padding included."""
    assembled, gathered = resident_task(bundled_store, False, layer), resident_task(bundled_store, True, layer)
    assert gathered.resident and not assembled.resident
    for epoch in (0, 1):
        expected, got = list(assembled.train_batches(epoch)), list(gathered.train_batches(epoch))
        assert len(expected) == len(got) > 2
        for a, b in zip(expected, got):
            same_batch(a, b)
            assert a.ids == b.ids and a.without_ctc_path == b.without_ctc_path
    for split in ("dev", "test-clean"):
        for a, b in zip(assembled.eval_batches(split), gathered.eval_batches(split), strict=True):
            same_batch(a, b)
    assert no_prefetch_thread_left(timeout=0)  # nothing is built ahead for a resident task


def test_a_run_on_resident_features_equals_one_on_assembled_batches(bundled_store, tmp_path):
    record = RunRecord(kind="probe", experiment="x", layer=2, reinit=[], seed=0, model={}, data={}, store="s",
                       device="cpu", threads=1)
    runs = {}
    for resident in (False, True):
        run = tmp_path / f"resident-{resident}"
        train(resident_task(bundled_store, resident, probe_kind="linear"), TrainConfig(epochs=2, lr=2e-3, seed=3),
              run, record, progress=False, num_threads=1)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        runs[resident] = ([{k: m[k] for k in ("train_loss", "dev_wer_percent", "dev_cer_percent")} for m in metrics],
                          torch.load(run / "best.pt"))
    assert runs[False][0] == runs[True][0]
    assert all(torch.equal(runs[False][1][k], runs[True][1][k]) for k in runs[False][1])


def test_features_stay_on_the_host_on_a_cpu_or_when_streamed(bundled_store):
    assert not resident_task(bundled_store, None).resident  # a CPU: nothing to copy anywhere
    streamed = ProbeTask(open_store(bundled_store), "layer02", ProbeConfig(**SMALL), TrainConfig(), memory_budget=0)
    assert not streamed.resident
    with pytest.raises(W2VCacheError, match="read from the store batch by batch"):
        ProbeTask(open_store(bundled_store), "layer02", ProbeConfig(**SMALL, resident=True), TrainConfig(), memory_budget=0)
