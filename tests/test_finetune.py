"""Fine-tuning on the bundled corpus with the built-in model: freeze schedule, re-init, a short run,
and the two-process (gloo) path against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import few_utterance_splits, run_killed_after_first_checkpoint
from w2vcache.audio import audio_info
from w2vcache.backbone import reinit_layers
from w2vcache.checkpoints import load_backbone
from w2vcache.cli import main
from w2vcache.corpus import build_corpus
from w2vcache.errors import W2VCacheError
from w2vcache.finetune import FinetuneConfig, FinetuneTask, parse_reinit
from w2vcache.train import TrainConfig

FAST = dict(batch_seconds=8, num_workers=0)



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Manifests of a few bundled utterances: 6 to train on, 3 to validate, 3 to test."""
    return few_utterance_splits(tmp_path_factory.mktemp("tiny"))


def changed(before, after, prefix=""):
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_freeze_schedule_and_reinit(tiny):
    """Re-init touches exactly the named blocks; frozen epochs move only the head; then the backbone
    moves, the CNN feature encoder only with train_feature_encoder."""
    fresh = load_backbone("builtin:tiny").model.state_dict()
    corpus = build_corpus(splits=[s.split("=", 1)[1] for s in tiny])
    for train_cnn in (False, True):
        backbone = load_backbone("builtin:tiny")
        reinit_layers(backbone, [3, 4], seed=0)
        moved = changed(fresh, backbone.model.state_dict())
        assert moved and all(k.startswith(("encoder.layers.2.", "encoder.layers.3.")) for k in moved)
        task = FinetuneTask(backbone, corpus, FinetuneConfig(freeze_epochs=1, train_feature_encoder=train_cnn, **FAST),
                            TrainConfig(test_splits=("test-clean",)))
        optimizer = torch.optim.Adam(task.model.parameters(), lr=1e-2)

        def one_epoch(epoch):
            task.start_epoch(epoch)
            before = snapshot(task.model)
            for batch in list(task.train_batches(epoch))[:2]:
                task.loss(batch).backward()
                optimizer.step()
                optimizer.zero_grad()
            return changed(before, snapshot(task.model))

        frozen = one_epoch(0)
        assert frozen and all(k.startswith(("head.", "mask_embedding")) for k in frozen)
        thawed = one_epoch(1)
        assert any(k.startswith("w2v.encoder.layers.3.") for k in thawed)
        assert any(k.startswith("w2v.feature_extractor.") for k in thawed) == train_cnn


def test_short_run_lowers_loss_and_writes_a_complete_run(tmp_path, tiny):
    out = tmp_path / "runs"
    backbone = load_backbone("builtin:tiny")
    train_frames = sum(backbone.num_frames(audio_info(u.path).num_samples) for u in build_corpus().splits["train"][:6])
    # The two runs side by side (--jobs 2, a process each)
    result = CliRunner().invoke(main, [
        "finetune", *tiny, "--reinit", "none", "--reinit", "4", "--epochs", "3", "--freeze-epochs", "1",
        "--lr", "3e-3", "--batch-seconds", "8", "--num-workers", "1", "--test-splits", "test-clean", "--jobs", "2",
        "--out", str(out)])
    assert result.exit_code == 0 and "2 run(s) trained" in result.output, result.output
    for name in ("reinit-none", "reinit-4"):
        run_dir = out / "finetune" / name / "seed0"
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 3 and metrics[-1]["train_loss"] < metrics[0]["train_loss"]
        # Frames per second count the W2V frames of every training utterance once per epoch.
        for m in metrics:
            assert m["frames_per_second"] * m["train_seconds"] == pytest.approx(train_frames, rel=1e-9)
        res = json.loads((run_dir / "result.json").read_text())
        assert res["kind"] == "finetune" and res["experiment"] == name and res["status"] == "finished"
        assert res["test-clean"]["utterances"] == 3
        decoded = (run_dir / "decoded" / "test-clean.tsv").read_text().splitlines()
        assert decoded[0] == "id\twords\tword_edits\treference\thypothesis" and len(decoded) == 1 + 3
        assert sum(int(line.split("\t")[2]) for line in decoded[1:]) == res["test-clean"]["word_edits"]
        config = json.loads((run_dir / "config.json").read_text())
        assert config["model"]["freeze_epochs"] == 1 and config["model"]["mask_time_prob"] == 0.05
        assert config["model"]["train_feature_encoder"] is False
    assert json.loads((out / "finetune/reinit-4/seed0/config.json").read_text())["reinit"] == [4]
    # ... to the numbers a run gets alone
    alone = tmp_path / "alone"
    result = CliRunner().invoke(main, [
        "finetune", *tiny, "--reinit", "4", "--epochs", "3", "--freeze-epochs", "1", "--lr", "3e-3",
        "--batch-seconds", "8", "--num-workers", "0", "--test-splits", "test-clean", "--out", str(alone)])
    assert result.exit_code == 0, result.output
    beside, by_itself = (json.loads((o / "finetune/reinit-4/seed0/result.json").read_text()) for o in (out, alone))
    assert {k: beside[k] for k in ("best_epoch", "dev", "test-clean")} == \
        {k: by_itself[k] for k in ("best_epoch", "dev", "test-clean")}
    # Finished: the same command skips both runs; other settings are another experiment, refused.
    again = CliRunner().invoke(main, [
        "finetune", *tiny, "--reinit", "none", "--reinit", "4", "--epochs", "3", "--freeze-epochs", "1",
        "--lr", "3e-3", "--batch-seconds", "8", "--num-workers", "0", "--test-splits", "test-clean", "--out", str(out)])
    assert again.exit_code == 0 and "0 run(s) trained, 2 already finished" in again.output, again.output
    other = CliRunner().invoke(main, [
        "finetune", *tiny, "--model", "builtin:tiny-ln", "--epochs", "3", "--freeze-epochs", "1",
        "--lr", "3e-3", "--batch-seconds", "8", "--test-splits", "test-clean", "--out", str(out)])
    assert other.exit_code == 1
    assert f"{out / 'finetune/reinit-none/seed0'} holds a finished run with other settings (model.backbone.name: " \
           "run has 'builtin:tiny', now 'builtin:tiny-ln'" in other.output
    # So is a corpus of other utterances (whatever its sources are called): the run names its own
    fewer = tmp_path / "fewer-train.tsv"
    train = next(option.split("=", 2)[2] for option in tiny if option.startswith("--split=train="))
    fewer.write_text("".join(Path(train).read_text().splitlines(keepends=True)[:4]))
    options = [f"--split=train={fewer}" if option.startswith("--split=train=") else option for option in tiny]
    other_data = CliRunner().invoke(main, [
        "finetune", *options, "--epochs", "3", "--freeze-epochs", "1", "--lr", "3e-3", "--batch-seconds", "8",
        "--num-workers", "0", "--test-splits", "test-clean", "--out", str(out)])
    assert other_data.exit_code == 1 and "data.utterances.train.utterances: run has 6, now 4" in other_data.output, \
        other_data.output


def test_reinit_option_errors(tmp_path, tiny):
    assert parse_reinit("none") == () and parse_reinit("10-12") == (10, 11, 12) and parse_reinit("11,12") == (11, 12)
    with pytest.raises(W2VCacheError, match="'x' is not a block number"):
        parse_reinit("x")
    with pytest.raises(W2VCacheError, match=r"--reinit '3-2': the range 3-2 is empty \(write it low-high: 2-3\)"):
        parse_reinit("3-2")  # not the baseline, quietly
    assert parse_reinit("12,11") == parse_reinit("11-12") == parse_reinit("12,11,12") == (11, 12)  # one experiment
    for args, message in [(["--reinit", "4", "--reinit", "4"], "--reinit 4 given more than once"),
                          (["--precision", "bf16"], "--precision bf16: mixed precision runs on a GPU (--device cuda); "
                                                    "on --device cpu use fp32")]:
        refused = CliRunner().invoke(main, ["finetune", *tiny, *args, "--out", str(tmp_path)])
        assert refused.exit_code == 1 and message in refused.output, refused.output
    assert not (tmp_path / "finetune").exists()
    # Refused before the baseline trains (it would otherwise first, for hours), and no directory made
    result = CliRunner().invoke(main, ["finetune", *tiny, "--reinit", "none", "--reinit", "9", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--reinit 9: layer 9 does not exist: the model has 4 transformer blocks" in result.output
    result = CliRunner().invoke(main, ["finetune", *tiny, "--test-splits", "test-nope", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--test-splits test-nope: the corpus has no split 'test-nope'" in result.output
    assert not (tmp_path / "finetune").exists()


def test_two_gloo_processes_match_one_process(tmp_path, tiny):
    """torchrun with two CPU ranks on gloo, dropout and masking off: the same weights as one process
    with the same global batches, two batches to an update (summed over ranks once, with the last)."""
    args = ["finetune", *tiny, "--test-splits", "test-clean",
            "--epochs", "2", "--freeze-epochs", "1", "--lr", "1e-3", "--batch-seconds", "4", "--grad-accum", "2",
            "--num-workers", "0", "--final-dropout", "0", "--mask-time-prob", "0"]
    one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "w2vcache", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one/finetune/reinit-none/seed0/checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two/finetune/reinit-none/seed0/checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    # Summation order differs between one and two processes; Adam's first steps turn the rounding of
    # near-zero gradients into differences of a small fraction of one step (lr 1e-3): measured
    # below 4e-5. A wrongly weighted rank share would move weights by whole steps.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    config = json.loads((tmp_path / "two/finetune/reinit-none/seed0/config.json").read_text())
    assert config["world_size"] == 2


def test_two_gloo_processes_train_a_checkpoint_with_layerdrop_and_its_own_mask_vector(tmp_path, tiny):
    """A checkpoint as the Hub's are: layerdrop on (each rank skips other blocks, whose parameters
    get no gradient there) and a masked_spec_embed, unused with --mask-time-prob 0. DDP refuses a
    step where a parameter it waits for gets no gradient: both ranks must still train to the end."""
    from transformers import Wav2Vec2Model

    from w2vcache.checkpoints import _tiny_config

    torch.manual_seed(0)
    Wav2Vec2Model(_tiny_config(layerdrop=0.5, mask_time_prob=0.05)).save_pretrained(tmp_path / "model")
    args = ["finetune", "--model", str(tmp_path / "model"), *tiny, "--test-splits", "test-clean",
            "--epochs", "1", "--freeze-epochs", "0", "--batch-seconds", "4", "--num-workers", "0",
            "--mask-time-prob", "0", "--out", str(tmp_path / "runs")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "w2vcache", *args], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    metrics = (tmp_path / "runs/finetune/reinit-none/seed0/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1] and json.loads(metrics[0])["updates"] >= 2


def test_killed_finetune_resumes_to_the_same_result(tmp_path, tiny):
    """SIGKILL right after the first epoch's checkpoint is saved, re-run: it resumes from there (the
    first epoch is not trained again) to the same weights and WER as an uninterrupted run, with
    dropout and time masking on (their random draws are restored from the checkpoint)."""
    args = ["finetune", *tiny, "--test-splits", "test-clean", "--epochs", "3", "--freeze-epochs", "1",
            "--lr", "2e-3", "--batch-seconds", "7", "--num-workers", "0", "--mask-time-prob", "0.2"]
    whole = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    run = tmp_path / "killed" / "finetune" / "reinit-none" / "seed0"
    run_killed_after_first_checkpoint([*args, "--out", str(tmp_path / "killed")])
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1
    first_epoch = (run / "metrics.jsonl").read_text()
    assert [json.loads(line)["epoch"] for line in first_epoch.splitlines()] == [1]
    assert not (run / "result.json").exists()
    resumed = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "killed")])
    assert resumed.exit_code == 0, resumed.output
    a = json.loads((tmp_path / "whole/finetune/reinit-none/seed0/result.json").read_text())
    b = json.loads((run / "result.json").read_text())
    for key in ("best_epoch", "dev", "test-clean"):
        assert a[key] == b[key], key
    wa = torch.load(tmp_path / "whole/finetune/reinit-none/seed0/checkpoint.pt", weights_only=False)["model"]
    wb = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert (run / "metrics.jsonl").read_text().startswith(first_epoch)  # epoch 1 not trained again


def test_frozen_epochs_build_no_graph_through_the_backbone(tiny):
    """With masking on and the built-in model (no masked_spec_embed of its own), the head-only
    epochs still train nothing but the head, and autograd records nothing through W2V."""
    corpus = build_corpus(splits=[s.split("=", 1)[1] for s in tiny])
    task = FinetuneTask(load_backbone("builtin:tiny"), corpus, FinetuneConfig(mask_time_prob=0.5, **FAST),
                        TrainConfig(test_splits=("test-clean",)))
    task.start_epoch(0)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    task.model.train()
    waves = [torch.from_numpy(w) for w in next(iter(task.train_batches(0))).waves]
    hidden, _ = __import__("w2vcache.backbone", fromlist=["encode"]).encode(
        task.model.backbone_ref, waves, task.model.mask_frames)
    assert not hidden.requires_grad
    task.start_epoch(3)
    assert "mask_embedding" in {n for n, p in task.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-ln"])
def test_kept_cnn_outputs_give_the_same_run_as_computing_them_in_every_step(tmp_path, tiny, model, monkeypatch):
    """The frozen CNN's outputs, kept per batch, are what it computes again: two runs of a sweep
    (a re-init and a seed), masking and dropout on, the train split also the dev split (kept during
    an evaluation, then trained on), end with the same weights and error rates as without the
    cache, bit for bit; the CNN ran for each batch once. Both CNN kinds: GroupNorm (run per
    utterance) and LayerNorm (one padded pass)."""
    import w2vcache.finetune as finetune_module

    corpus = build_corpus(splits=[s.split("=", 1)[1] for s in tiny])
    calls, compute = [], finetune_module.cnn_features
    for module in (finetune_module, __import__("w2vcache.backbone", fromlist=["encode"])):
        monkeypatch.setattr(module, "cnn_features", lambda *a: calls.append(1) or compute(*a))
    config = FinetuneConfig(freeze_epochs=1, mask_time_prob=0.2, **FAST)
    tc = TrainConfig(epochs=2, lr=2e-3, dev_split="train", test_splits=("test-clean",))
    runs = {}
    for memory in (0, 2**30):
        calls.clear()
        finetune_module.finetune(corpus, model, [(), (4,)], [0], tmp_path / str(memory), config, tc,
                                 progress=False, cnn_memory=memory)
        runs[memory] = len(calls)
    batches = len(FinetuneTask(load_backbone(model), corpus, config, tc).splits["train"].batches)
    test_batches = len(FinetuneTask(load_backbone(model), corpus, config, tc).splits["test-clean"].batches)
    assert runs[2**30] == batches + test_batches  # once each, for both runs and every epoch
    assert runs[0] > 2 * runs[2**30]
    for experiment in ("reinit-none", "reinit-4"):
        a, b = (tmp_path / str(m) / "finetune" / experiment / "seed0" for m in (0, 2**30))
        wa, wb = (torch.load(d / "checkpoint.pt", weights_only=False)["model"] for d in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), experiment
        ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
        assert ra["train"] == rb["train"] and ra["test-clean"] == rb["test-clean"]


def test_cnn_outputs_kept_during_an_evaluation_can_be_trained_on():
    """Kept under inference mode (an evaluation of the split first), a batch's CNN outputs are
    inference tensors, which autograd refuses to save: training on them gets a usable copy."""
    from w2vcache.finetune import CNNCache

    backbone, cache = load_backbone("builtin:tiny"), CNNCache()
    waves = [torch.randn(8000), torch.randn(6000)]
    with torch.inference_mode():
        kept, _ = cache.features(backbone, waves, ("dev", "a", "b"))
    again, lengths = cache.features(backbone, waves, ("dev", "a", "b"))
    assert kept.is_inference() and not again.is_inference() and torch.equal(kept, again)
    weight = torch.ones(again.shape[-1], requires_grad=True)
    (again * weight).sum().backward()
    assert lengths == [backbone.num_frames(8000), backbone.num_frames(6000)] and weight.grad is not None
