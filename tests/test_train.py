import json
import os
import subprocess
import sys

import pytest
import torch

from w2vcache.train import TrainConfig, tri_stage


def test_tri_stage_schedule_at_chosen_updates():
    config = TrainConfig(epochs=10, lr=1e-4, warmup_epochs=1, decay_from_epoch=5)
    per_epoch = 20  # 200 updates in all: warm-up 0-19, hold 20-99, decay 100-199
    expected = {
        0: 1 / 20,  # the first update already moves
        9: 10 / 20,
        19: 1.0,  # the end of epoch 1 reaches the peak
        20: 1.0,
        99: 1.0,  # still holding at the end of epoch 5
        100: 1.0,  # decay starts at the start of epoch 6: (200 - 100) / 100
        150: 0.5,
        199: 1 / 100,  # the last update; the rate reaches 0 at the end
    }
    for update, value in expected.items():
        assert tri_stage(update, per_epoch, config) == pytest.approx(value), update


def test_schedule_drives_the_optimizer():
    from torch.optim.lr_scheduler import LambdaLR

    config = TrainConfig(epochs=4, lr=0.5, warmup_epochs=1, decay_from_epoch=2)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=config.lr)
    sched = LambdaLR(opt, lambda u: tri_stage(u, 2, config))
    used = []
    for _ in range(8):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5, 0.375, 0.25, 0.125])


def test_default_decay_is_the_second_half_and_bad_schedules_are_refused(tmp_path):
    from w2vcache.errors import W2VCacheError
    from w2vcache.train import check_config

    config = TrainConfig(epochs=3)  # decay from 1.5 epochs; warm-up 1 epoch
    assert [tri_stage(u, 2, config) for u in range(6)] == pytest.approx([0.5, 1, 1, 1, 2 / 3, 1 / 3])
    assert [tri_stage(u, 2, TrainConfig(epochs=10)) for u in (9, 10, 19)] == pytest.approx([1, 1, 0.1])
    with pytest.raises(W2VCacheError, match="--decay-from-epoch 12 must lie within the run's 10 epochs"):
        check_config(TrainConfig(epochs=10, decay_from_epoch=12))


class Frames:
    frames = 1  # every batch tells the loop its frames


class OneWeight:
    """A task whose every batch contributes a gradient of exactly 1 to its one weight."""

    def __init__(self, batches):
        self.model = torch.nn.Linear(1, 1, bias=False)
        self.n = batches

    def train_batches(self, epoch):
        return [Frames()] * self.n

    def eval_batches(self, split):
        return [Frames()]

    def loss(self, batch):
        return self.model.weight.sum()

    def decode(self, batch):
        return ["a"], ["a"]

    def start_epoch(self, epoch):
        pass


@pytest.mark.parametrize("batches,accum,expected", [(3, 2, [1.0, 1.0]), (2, 8, [1.0]), (4, 1, [1.0] * 4)])
def test_gradient_accumulation_averages_over_the_batches_of_each_update(tmp_path, monkeypatch, batches, accum, expected):
    from w2vcache.runs import RunRecord
    from w2vcache.train import train

    task, seen = OneWeight(batches), []
    clip = torch.nn.utils.clip_grad_norm_

    def record_then_clip(parameters, max_norm):  # called once per update, just before the step
        seen.append(task.model.weight.grad.item())
        return clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_then_clip)
    record = RunRecord(kind="probe", experiment="layer00", layer=0, reinit=[], seed=0, model={}, data={}, device="cpu")
    train(task, TrainConfig(epochs=1, grad_accum=accum, test_splits=()), tmp_path, record, progress=False)
    assert seen == pytest.approx(expected)


class _RunsCode:
    def __reduce__(self):  # unpickling this would call os.system
        return (__import__("os").system, ("echo pickled code ran",))


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    from w2vcache.errors import W2VCacheError
    from w2vcache.runs import CHECKPOINT, CONFIG, RunRecord
    from w2vcache.train import train

    record = RunRecord(kind="probe", experiment="layer00", layer=0, reinit=[], seed=0, model={}, data={}, device="cpu")
    task, config = OneWeight(2), TrainConfig(epochs=2, test_splits=())
    train(task, config, tmp_path, record, progress=False)  # a real run directory
    (tmp_path / "result.json").unlink()
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    state["epoch"] = 1
    state["extra"] = _RunsCode()  # what a stranger's run directory could hold
    torch.save(state, tmp_path / CHECKPOINT)
    assert (tmp_path / CONFIG).exists()
    with pytest.raises(W2VCacheError, match=r"checkpoint\.pt: holds more than tensors and numbers \(a pickled "
                                            r"(posix|os|nt)\.system\).*refused"):
        train(OneWeight(2), config, tmp_path, record, progress=False)


class Babbler(OneWeight):
    """A task whose decoding inserts words: more edits than reference words, a WER above 100 %."""

    DECODED = {"dev": (["the cat sat", "on the mat"], ["a b c d e f g h the cat sat", "on the mat and the hat"]),
               "test-clean": (["hello world"], ["hello hello hello world wide world"])}

    def eval_batches(self, split):
        return [split]

    def decode(self, batch):
        return self.DECODED[batch]


def _babbler_run(directory, progress=False):
    from w2vcache.runs import RunRecord
    from w2vcache.train import train

    record = RunRecord(kind="probe", experiment="layer00", layer=0, reinit=[], seed=0, model={}, data={}, device="cpu")
    return train(Babbler(2), TrainConfig(epochs=2, test_splits=("test-clean",)), directory, record, progress=progress)


def test_a_wer_above_100_percent_is_written_shown_and_reported_as_such(tmp_path, capsys):
    import jiwer

    from w2vcache.report import write_report
    from w2vcache.runs import run_dir

    runs = tmp_path / "runs"
    directory = run_dir(runs, "probe", "layer00", 0)
    _babbler_run(directory, progress=True)
    wer = {split: 100 * jiwer.wer(refs, hyps) for split, (refs, hyps) in Babbler.DECODED.items()}
    cer = {split: 100 * jiwer.cer(refs, hyps) for split, (refs, hyps) in Babbler.DECODED.items()}
    assert min(wer.values()) > 100

    result = json.loads((directory / "result.json").read_text())
    for split in Babbler.DECODED:
        assert result[split]["wer_percent"] == pytest.approx(wer[split]), split
        assert result[split]["cer_percent"] == pytest.approx(cer[split]), split
        assert "wer" not in result[split] and "cer" not in result[split]
    metrics = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [m["dev_wer_percent"] for m in metrics] == pytest.approx([wer["dev"]] * 2)
    assert [m["dev_cer_percent"] for m in metrics] == pytest.approx([cer["dev"]] * 2)
    assert f"dev WER {wer['dev']:.2f} %, CER {cer['dev']:.2f} %" in capsys.readouterr().out

    written = write_report(runs, figure=False)
    assert (f"| 0 | 0 | {wer['dev']:.2f} (n=1) | {wer['test-clean']:.2f} (n=1) | "
            f"{cer['dev']:.2f} (n=1) | {cer['test-clean']:.2f} (n=1) |") in written["md"].read_text()
    row = json.loads(written["json"].read_text())["rows"][0]
    assert row["wer_percent"]["dev"]["mean"] == pytest.approx(wer["dev"])
    assert row["wer_percent"]["test-clean"]["mean"] == pytest.approx(wer["test-clean"])


def test_resuming_a_run_of_an_earlier_version_rewrites_its_metrics_in_percent(tmp_path):
    """Earlier versions wrote the dev rates of metrics.jsonl as fractions under dev_wer and dev_cer."""
    _babbler_run(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    written = [json.loads(line) for line in metrics.read_text().splitlines()]
    earlier = [{k.removesuffix("_percent"): v / 100 if k.endswith("_percent") else v for k, v in m.items()}
               for m in written]
    assert all("dev_wer" in m and "dev_wer_percent" not in m for m in earlier)
    metrics.write_text("".join(json.dumps(m) + "\n" for m in earlier))
    (tmp_path / "result.json").unlink()  # killed after its last checkpoint: it resumes there
    result = _babbler_run(tmp_path)
    rewritten = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [list(m) for m in rewritten] == [list(m) for m in written]  # the same keys, in the same order
    for again, first in zip(rewritten, written):
        assert again == pytest.approx(first)
    assert result["dev"]["wer_percent"] == pytest.approx(written[0]["dev_wer_percent"])


def test_the_optimizer_is_fused_where_torch_has_the_kernel_and_plain_where_not(monkeypatch):
    from w2vcache.train import load_optimizer, make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2))]
    assert make_optimizer(params, 0.1).defaults["fused"] is True
    real = torch.optim.Adam

    def adam_without_cpu_kernels(parameters, lr, fused=None):  # torch before 2.4 on a CPU
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                               "supported devices: ['cuda', 'xpu', 'privateuseone']")
        return real(parameters, lr=lr)

    fused = make_optimizer(params, 0.1)
    params[0].grad, params[1].grad = torch.ones(3), torch.ones(2)
    fused.step()
    saved = fused.state_dict()
    monkeypatch.setattr(torch.optim, "Adam", adam_without_cpu_kernels)
    plain = make_optimizer((p for p in params), 0.1)  # a generator, as model.parameters() is
    assert not plain.defaults.get("fused") and plain.param_groups[0]["params"] == params
    # A run saved fused, resumed here: its moments and steps restored, its step unfused.
    load_optimizer(plain, saved)
    assert [g["fused"] for g in plain.param_groups] == [False]
    assert torch.equal(plain.state[params[0]]["exp_avg"], fused.state[params[0]]["exp_avg"])
    plain.step()
    assert float(plain.state[params[0]]["step"]) == 2


def test_a_run_saved_unfused_resumes_unfused():
    from w2vcache.train import load_optimizer, make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    old = torch.optim.Adam(params, lr=0.1)
    resumed = make_optimizer(params, 0.1)
    load_optimizer(resumed, old.state_dict())
    assert not resumed.param_groups[0]["fused"]


class CountedBatches:
    """An epoch's batches that count how often they are iterated (a DataLoader starts its worker
    processes each time)."""

    def __init__(self, n):
        self.n, self.iterations = n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        self.iterations += 1
        return iter([Frames()] * self.n)


@pytest.mark.parametrize("progress", [False, True])
def test_each_epochs_batches_are_iterated_once(tmp_path, progress):
    from w2vcache.runs import RunRecord
    from w2vcache.train import train

    task, epochs = OneWeight(3), {}
    task.train_batches = lambda epoch: epochs.setdefault(epoch, CountedBatches(3))
    record = RunRecord(kind="probe", experiment="layer00", layer=0, reinit=[], seed=0, model={}, data={}, device="cpu")
    train(task, TrainConfig(epochs=3, test_splits=()), tmp_path, record, progress=progress)
    assert {e: b.iterations for e, b in epochs.items()} == {0: 1, 1: 1, 2: 1}


NAN_ON_ONE_RANK = '''
import sys, torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from w2vcache.runs import RunRecord
from w2vcache.train import TrainConfig, train

dist.init_process_group("gloo")
rank = dist.get_rank()

class Batch:
    def __init__(self, i):
        self.i, self.frames = i, 10

class Task:
    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.ddp = DistributedDataParallel(self.model)
    def train_batches(self, epoch): return [Batch(i) for i in range(4)]
    def eval_batches(self, split): return [Batch(0)]
    def start_epoch(self, epoch): pass
    def loss(self, batch):
        out = self.ddp(torch.ones(2, 4)).sum()
        return out * float("nan") if batch.i == 1 and rank == 1 else out
    def decode(self, batch): return ["a"], ["a"]

record = RunRecord(kind="finetune", experiment="x", layer=None, reinit=[], seed=0, model={}, data={}, device="cpu", threads=1)
train(Task(), TrainConfig(epochs=1, test_splits=()), sys.argv[1], record, progress=False)
dist.destroy_process_group()  # as finetune() does: gloo's threads left to the exit abort it now and then
'''


def test_a_loss_not_finite_on_one_rank_is_left_out_on_every_rank(tmp_path):
    """Two gloo ranks; batch 2 of 4 has a NaN loss on rank 1 only. Skipped there alone, rank 1 would
    never join rank 0's gradient all-reduce and both would wait for ever: every rank skips it."""
    script = tmp_path / "nan_on_one_rank.py"
    script.write_text(NAN_ON_ONE_RANK)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["batches_not_finite"] == 1  # one global batch, once
    assert metrics[0]["frames_per_second"] * metrics[0]["train_seconds"] == pytest.approx(2 * 4 * 10)  # both ranks' frames


def test_a_dev_split_that_is_also_tested_is_pointed_out(capsys):
    from w2vcache.train import test_splits_for

    splits = ["train", "dev", "test-clean", "test-other"]
    assert test_splits_for(TrainConfig(dev_split="test-clean"), splits, "store s").test_splits == ("test-clean", "test-other")
    assert "note: --dev-split test-clean is also tested: the best epoch is chosen on it" in capsys.readouterr().err
    test_splits_for(TrainConfig(), splits, "store s")
    test_splits_for(TrainConfig(dev_split="test-clean", test_splits=("test-other",)), splits, "store s")
    assert capsys.readouterr().err == ""


class ScriptedDev(OneWeight):
    """Dev hypotheses scripted per epoch: WER stays 100 % (one word, never right) while CER moves."""

    HYPOTHESES = ["axxx", "abcx", "abxx"]  # CER 75 %, 25 %, 50 % against "abcd"

    def start_epoch(self, epoch):
        self.epoch = epoch

    def decode(self, batch):
        return ["abcd"], [self.HYPOTHESES[self.epoch]]


def test_a_tie_in_the_chosen_rate_goes_to_the_other_one(tmp_path):
    """The first epochs of a fine-tune often share a WER of 100 %: the best epoch is then the one
    with the lowest CER (epoch 2 here), not the first, in the loop and in what an unfinished run's
    best.pt is read to hold."""
    from w2vcache.checkpoints import _best_so_far
    from w2vcache.runs import RunRecord, read_run
    from w2vcache.train import train

    record = RunRecord(kind="finetune", experiment="x", layer=None, reinit=[], seed=0, model={}, data={}, device="cpu")
    result = train(ScriptedDev(2), TrainConfig(epochs=3, test_splits=()), tmp_path, record, progress=False)
    assert result["best_epoch"] == 2 and result["dev"]["wer_percent"] == 100.0
    assert _best_so_far(str(tmp_path), read_run(tmp_path)) == 2


class LaterWorse(ScriptedDev):
    HYPOTHESES = ["abcx", "abxx"]  # CER 25 %, then 50 %: WER 100 % both times


class KilledInEpoch2(LaterWorse):
    def loss(self, batch):
        if self.epoch == 1:
            raise RuntimeError("killed")
        return super().loss(batch)


def test_a_checkpoint_from_before_ties_were_broken_resumes_to_the_same_best(tmp_path):
    """Its best epoch's other rate is read back from metrics.jsonl: a later tie with a worse CER
    does not take best.pt over."""
    from w2vcache.runs import RunRecord
    from w2vcache.train import CHECKPOINT, load_checkpoint, train

    record = RunRecord(kind="finetune", experiment="x", layer=None, reinit=[], seed=0, model={}, data={}, device="cpu")
    config = TrainConfig(epochs=2, test_splits=())
    with pytest.raises(RuntimeError, match="killed"):
        train(KilledInEpoch2(2), config, tmp_path / "old", record, progress=False)
    state = load_checkpoint(tmp_path / "old" / CHECKPOINT)
    assert state["best"].pop("dev_cer") == 0.25
    torch.save(state, tmp_path / "old" / CHECKPOINT)
    assert train(LaterWorse(2), config, tmp_path / "old", record, progress=False)["best_epoch"] == 1
    assert train(LaterWorse(2), config, tmp_path / "new", record, progress=False)["best_epoch"] == 1
