"""Probes on the bundled corpus's features from the built-in model: training, run records, resume,
the sweep, and every refusal."""

import csv
import json
import shutil
from dataclasses import replace

import jiwer
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import run_killed_after_first_checkpoint
from w2vcache.cli import main
from w2vcache.corpus import build_corpus
from w2vcache.errors import W2VCacheError
from w2vcache.extract import ExtractConfig, extract
from w2vcache.layers import choose_layers, layer_index, layer_name
from w2vcache.probe import Probe, ProbeConfig, ProbeTask, batches_by_length, probe
from w2vcache.store import open_store
from w2vcache.text import normalize
from w2vcache.train import TrainConfig

SMALL = ["--hidden", "32", "--lstm-layers", "1", "--batch-frames", "1500", "--lr", "2e-3"]


@pytest.fixture
def store(bundled_store):
    return bundled_store


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_probe_kernels_equal_a_packed_bidirectional_lstm_and_ignore_padding():
    """The CPU's kernel runs each direction on the padded batch, CUDA's nn.LSTM on packed sequences:
    outputs and gradients of both must equal nn.LSTM on packed sequences of the real frames alone
    (which never sees padding), whatever the padding holds."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    model = Probe(16, ProbeConfig(hidden=8, lstm_layers=3)).double()
    lengths = torch.tensor([11, 7, 3, 9])
    x = torch.randn(4, 11, 16, dtype=torch.float64)
    garbage = x.clone()
    for b, n in enumerate(lengths):
        garbage[b, n:] = 1e3
    mask = torch.arange(11)[None, :] < lengths[:, None]
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    reference = pad_packed_sequence(model.lstm(packed)[0], batch_first=True)[0][mask]
    (grad_reference,) = torch.autograd.grad(reference.sum(), model.lstm.weight_hh_l0_reverse)
    for kernel in (model.directions, model.packed):
        ours = kernel(garbage, lengths)[mask]
        torch.testing.assert_close(ours, reference)
        (grad_ours,) = torch.autograd.grad(ours.sum(), model.lstm.weight_hh_l0_reverse)
        torch.testing.assert_close(grad_ours, grad_reference)
    torch.testing.assert_close(model(garbage, lengths)[mask], model.output(reference).log_softmax(-1))
    assert set(model.state_dict()) == {f"lstm.{k}" for k in model.lstm.state_dict()} | {"output.weight", "output.bias"}


def test_probe_lowers_ctc_loss_and_writes_a_complete_run(store, tmp_path):
    result = cli("probe", "--store", store, "--layer", "3", "--epochs", "4", *SMALL, "--threads", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "probe" / "layer03" / "seed0"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "result.json"}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["train_loss"] < 0.8 * metrics[0]["train_loss"]
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "probe" and config["layer"] == 3 and config["seed"] == 0
    assert config["train"]["epochs"] == 4 and config["model"]["hidden"] == 32 and config["threads"] == 1
    assert all(m["threads"] == 1 and m["frames_per_second"] > 0 for m in metrics)
    assert config["data"]["model"]["name"] == "builtin:tiny" and config["versions"]["torch"] == torch.__version__
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "finished" and 1 <= res["best_epoch"] <= 4
    best = min(metrics, key=lambda m: m["dev_wer_percent"])
    assert res["dev"]["wer_percent"] == pytest.approx(best["dev_wer_percent"])  # the best-dev weights are the ones tested
    for split, words in (("dev", 260), ("test-clean", 205)):
        assert res[split]["words"] == words
    assert res["test-other"]["utterances"] == 22
    # Each split's reported rates are those of best.pt's own greedy decoding of that split, recomputed
    # here with jiwer: corpus-level edits over reference words (characters), in percent. (This tiny
    # run's WER is 100 % on every split, so the edit and character counts are what tell weights apart:
    # best.pt here is epoch 1, which emits some letters; the last epoch's weights emit only blanks.)
    task = ProbeTask(open_store(store), "layer03", ProbeConfig(hidden=32, lstm_layers=1, batch_frames=1500),
                     TrainConfig())
    task.model.load_state_dict(torch.load(run / "best.pt", weights_only=True))
    for split in ("dev", "test-clean", "test-other"):
        refs, hyps = decode_split(task, split)
        assert sorted(refs) == sorted(normalize(u.text) for u in open_store(store).utterances(split))
        words = jiwer.process_words(refs, hyps)
        chars = jiwer.process_characters(refs, hyps)
        word_edits = words.substitutions + words.deletions + words.insertions
        char_edits = chars.substitutions + chars.deletions + chars.insertions
        n_words, n_chars = sum(len(r.split()) for r in refs), sum(len(r) for r in refs)
        assert (res[split]["word_edits"], res[split]["words"]) == (word_edits, n_words), split
        assert (res[split]["char_edits"], res[split]["chars"]) == (char_edits, n_chars), split
        assert res[split]["wer_percent"] == pytest.approx(100 * word_edits / n_words), split
        assert res[split]["cer_percent"] == pytest.approx(100 * char_edits / n_chars), split
        assert (res[split]["substitutions"] + res[split]["deletions"] + res[split]["insertions"]) == word_edits
        # What each utterance was decoded to, by id: the edits add up to the split's.
        with open(run / "decoded" / f"{split}.tsv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert {r["id"]: r["reference"] for r in rows} == {u.id: u.text for u in open_store(store).utterances(split)}
        assert sum(int(r["word_edits"]) for r in rows) == word_edits
        assert sorted(normalize(r["hypothesis"]) for r in rows) == sorted(hyps)


def decode_split(task, split):
    """(normalised references, normalised hypotheses) of the task's model greedily decoding split,
    on one thread like the run (so the arithmetic, and thus every argmax, is the run's)."""
    task.model.eval()
    refs, hyps, threads = [], [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for batch in task.eval_batches(split):
                r, h = task.decode(batch)
                refs += r
                hyps += h
    finally:
        torch.set_num_threads(threads)
    assert refs and all(normalize(r) for r in refs)
    return [normalize(r) for r in refs], [normalize(h) for h in hyps]


def test_reported_wer_is_the_decoded_splits_word_error_rate(store, tmp_path, monkeypatch):
    """With hypotheses that drop exactly the first word of every reference, each split's WER must
    be its utterance count over its word count (e.g. dev: 26 / 260 = 10 %), in percent, of that split."""
    decode = ProbeTask.decode

    def first_word_dropped(self, batch):
        refs, _ = decode(self, batch)
        return refs, [" ".join(normalize(r).split()[1:]) for r in refs]

    monkeypatch.setattr(ProbeTask, "decode", first_word_dropped)
    result = cli("probe", "--store", store, "--layer", "0", "--epochs", "1", *SMALL, "--threads", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "probe" / "layer00" / "seed0" / "result.json").read_text())
    expected = {"dev": (26, 260), "test-clean": (20, 205), "test-other": (22, 225)}
    for split, (utterances, words) in expected.items():
        assert (res[split]["utterances"], res[split]["words"], res[split]["word_edits"]) == (utterances, words, utterances)
        assert res[split]["wer_percent"] == pytest.approx(100 * utterances / words), split
    assert res["dev"]["wer_percent"] == pytest.approx(10.0)


def test_killed_run_resumes_to_the_same_result(store, tmp_path):
    """SIGKILL right after the first epoch's checkpoint is saved; the re-run resumes from it (the
    first epoch is not trained again) and ends with the uninterrupted run's weights and WER."""
    args = ["probe", "--store", str(store), "--layer", "1", "--epochs", "3", *SMALL, "--dropout", "0.2"]
    whole = cli(*args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    killed = tmp_path / "killed"
    metrics = killed / "probe" / "layer01" / "seed0" / "metrics.jsonl"
    run_killed_after_first_checkpoint([*args, "--out", str(killed)])
    assert torch.load(metrics.parent / "checkpoint.pt", weights_only=False)["epoch"] == 1
    first_epoch = metrics.read_text()
    assert [json.loads(line)["epoch"] for line in first_epoch.splitlines()] == [1]
    assert not (metrics.parent / "result.json").exists()
    with open(metrics, "a") as f:  # as if killed while writing epoch 2's line too
        f.write('{"epoch": 2, "train_lo')
    resumed = cli(*args, "--out", killed)
    assert resumed.exit_code == 0, resumed.output
    a = json.loads((tmp_path / "whole/probe/layer01/seed0/result.json").read_text())
    b = json.loads((metrics.parent / "result.json").read_text())
    for key in ("best_epoch", "dev", "test-clean", "test-other"):
        assert a[key] == b[key], key
    wa = torch.load(tmp_path / "whole/probe/layer01/seed0/best.pt")
    wb = torch.load(metrics.parent / "best.pt")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert metrics.read_text().startswith(first_epoch)  # epoch 1 kept as the killed run wrote it (timings too)


def test_sweep_over_layers_and_seeds_skips_finished_runs(store, tmp_path, monkeypatch):
    """Also: the seeds of one layer share the features read for the first, so each split of each
    layer is read once, and a seed trained in the sweep ends as it does trained alone."""
    from w2vcache.store import FeatureStore

    reads, read_layer = [], FeatureStore.read_layer
    monkeypatch.setattr(FeatureStore, "read_layer",
                        lambda self, split, layer: reads.append((layer, split)) or read_layer(self, split, layer))
    args = ["probe", "--store", store, "--layer", "0-1", "--seeds", "0,1", "--epochs", "1", *SMALL]
    first = cli(*args, "--out", tmp_path)
    assert first.exit_code == 0, first.output
    assert "4 run(s) trained, 0 already finished" in first.output
    runs = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("probe/*/*"))
    assert runs == ["probe/layer00/seed0", "probe/layer00/seed1", "probe/layer01/seed0", "probe/layer01/seed1"]
    splits = ["train", "dev", "test-clean", "test-other"]
    assert sorted(reads) == sorted((layer, split) for layer in ("layer00", "layer01") for split in splits)
    again = cli(*args, "--out", tmp_path)
    assert "0 run(s) trained, 4 already finished" in again.output
    narrower = cli(*args, "--test-splits", "test-clean", "--out", tmp_path)  # the runs tested that one too
    assert "0 run(s) trained, 4 already finished" in narrower.output, narrower.output
    changed = cli(*args, "--lr", "1e-2", "--out", tmp_path)  # a finished run of other settings is not done
    assert changed.exit_code == 1
    assert f"{tmp_path / 'probe/layer00/seed0'} holds a finished run with other settings (train.lr: run has 0.002, " \
           "now 0.01)" in changed.output
    alone = cli(*args[:3], "--layer", "1", "--seeds", "1", *args[7:], "--out", tmp_path / "alone")
    assert alone.exit_code == 0, alone.output
    a, b = (torch.load(where / "probe/layer01/seed1/best.pt") for where in (tmp_path, tmp_path / "alone"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    # A sweep whose later run is there with other settings is refused before its first run trains,
    # and settings no run could train with leave no run directory behind.
    later = cli(*args[:3], "--layer", "0-1", "--seeds", "1", *args[7:], "--lr", "1e-2", "--out", tmp_path / "alone")
    assert later.exit_code == 1 and "probe/layer01/seed1 holds a finished run with other settings" in later.output
    assert not (tmp_path / "alone/probe/layer00").exists()
    impossible = cli(*args, "--decay-from-epoch", "50", "--out", tmp_path / "impossible")
    assert impossible.exit_code == 1 and "--decay-from-epoch 50 must lie within" in impossible.output
    assert not (tmp_path / "impossible").exists()


def test_select_by_cer_keeps_the_epoch_of_lowest_dev_cer(store, tmp_path):
    result = cli("probe", "--store", store, "--layer", "2", "--epochs", "5", *SMALL, "--select-by", "cer",
                 "--test-splits", "test-clean", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "probe" / "layer02" / "seed0"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    res = json.loads((run / "result.json").read_text())
    best = min(metrics, key=lambda m: (m["dev_cer_percent"], m["epoch"]))
    assert res["best_epoch"] == best["epoch"] and res["dev"]["cer_percent"] == pytest.approx(best["dev_cer_percent"])
    assert json.loads((run / "config.json").read_text())["train"]["select_by"] == "cer"
    refused = cli("probe", "--store", store, "--select-by", "loss", "--out", tmp_path)
    assert refused.exit_code == 2 and "'loss' is not one of 'wer', 'cer'" in refused.output


def test_layer_lists_and_batches():
    available = [f"layer{i:02d}" for i in range(5)]
    assert choose_layers("all", available, "--layer") == available
    assert choose_layers("1,3-4", available, "--layer") == ["layer01", "layer03", "layer04"]
    with pytest.raises(W2VCacheError, match="layers '8': the store has no layer layer08; it has layer00"):
        choose_layers("8", available, "--layer")
    assert batches_by_length([10, 10, 20, 30], 40) == [[0, 1], [2], [3]]
    assert [layer_index(layer_name(i)) for i in (0, 8, 12, 24)] == [0, 8, 12, 24]
    assert layer_index("cnn") is None and layer_index("layer8x") is None


def test_refusals(store, tmp_path):
    out = ["--out", tmp_path / "runs", "--epochs", "1", *SMALL]
    missing_layer = cli("probe", "--store", store, "--layer", "9", *out)
    assert missing_layer.exit_code == 1 and "no layer layer09" in missing_layer.output
    missing_split = cli("probe", "--store", store, "--layer", "1", "--dev-split", "valid", *out)
    assert missing_split.exit_code == 1 and "valid" in missing_split.output and "dev" in missing_split.output
    no_store = cli("probe", "--store", tmp_path / "nope.zarr", "--layer", "1", *out)
    assert no_store.exit_code == 1 and "nope.zarr" in no_store.output
    for seeds, message in [("", "--seeds '': no seed given"), ("0,1,0", "--seeds '0,1,0': seed 0 given more than once")]:
        refused = cli("probe", "--store", store, "--layer", "1", "--seeds", seeds, *out)
        assert refused.exit_code == 1 and message in refused.output, refused.output
    budget = cli("probe", "--store", store, "--layer", "1", "--memory-budget", "-1", *out)
    assert budget.exit_code == 2 and "-1.0 is not in the range x>=0" in budget.output
    assert not (tmp_path / "runs").exists()

    # another vocabulary
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    root = zarr.open_group(str(other), mode="r+")
    meta = dict(root.attrs["w2vcache"])
    meta["provenance"] = dict(meta["provenance"], vocabulary=["<blank>", "a", "b"])
    root.attrs["w2vcache"] = meta
    vocab = cli("probe", "--store", other, "--layer", "1", *out)
    assert vocab.exit_code == 1 and "another vocabulary" in vocab.output

    # resuming a run on features of another model
    runs = tmp_path / "resume"
    proc_args = ["probe", "--store", store, "--layer", "1", "--out", runs, "--epochs", "2", *SMALL[:-2], "--lr", "2e-3"]
    assert cli(*proc_args).exit_code == 0
    run = runs / "probe/layer01/seed0"
    (run / "result.json").unlink()  # pretend it was killed after epoch 2
    config = json.loads((run / "config.json").read_text())
    del config["train"]["select_by"]  # a run directory written before --select-by existed resumes
    (run / "config.json").write_text(json.dumps(config))
    assert cli(*proc_args).exit_code == 0 and (run / "result.json").exists()
    # ... on the same model's features of other utterances: refused, naming them; finished, not done
    corpus = build_corpus()
    fewer = tmp_path / "fewer.zarr"
    extract(replace(corpus, splits={**corpus.splits, "train": corpus.splits["train"][:40]}), ExtractConfig(store=str(fewer)),
            progress=False)
    other_data = cli(*[fewer if a == store else a for a in proc_args])
    assert other_data.exit_code == 1 and "finished run with other settings (data.utterances.train." in other_data.output
    assert "run has 96, now 40" in other_data.output, other_data.output
    # ... from a copy of its store (another path, the same utterances): done
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    assert "0 run(s) trained, 1 already finished" in cli(*[copy if a == store else a for a in proc_args]).output
    (run / "result.json").unlink()
    # A run recorded before runs named their utterances resumes as before
    config = json.loads((run / "config.json").read_text())
    del config["data"]["utterances"]
    (run / "config.json").write_text(json.dumps(config))
    assert cli(*proc_args).exit_code == 0 and (run / "result.json").exists()
    (run / "result.json").unlink()
    ln_store = tmp_path / "ln.zarr"
    extract(build_corpus(), ExtractConfig(model="builtin:tiny-ln", store=str(ln_store)), progress=False)
    proc_args[2] = ln_store
    mixed = cli(*proc_args)
    assert mixed.exit_code == 1 and "weight_hash" in mixed.output and "unfinished run with other settings" in mixed.output


def test_incomplete_split_is_refused(tmp_path):
    # A store whose dev split is only partly extracted: kill-free, by filling some blocks only.
    from w2vcache.checkpoints import load_backbone
    from w2vcache.extract import fill_blocks, plan_splits, provenance, select_layers
    from w2vcache.store import FeatureStore

    backbone = load_backbone("builtin:tiny")
    config = ExtractConfig(store=str(tmp_path / "partial.zarr"), chunk_frames=64, block_chunks=2)
    layers = select_layers("all", backbone.num_layers)
    corpus = build_corpus()  # a few utterances to train on, and all of dev: several blocks
    corpus.splits = {"train": corpus.splits["train"][:6], "dev": corpus.splits["dev"]}
    plans = plan_splits(corpus, backbone, progress=False)
    with FeatureStore.create(config.store, provenance(backbone, config, layers), plans,
                             {n: backbone.hidden_size for n in layers}, chunk_frames=64, block_chunks=2) as s:
        assert len(s.pending_blocks("dev")) > 1  # so that some are left out
        blocks = [b for split in plans for b in s.pending_blocks(split) if not (split == "dev" and b.index > 0)]
        fill_blocks(s, blocks, backbone, layers, config, progress=False)
    with pytest.raises(W2VCacheError, match=r"split dev of store .* is incomplete: \d+ of \d+ blocks .* are not "
                       r"written yet; re-running the same extract command resumes it$"):
        probe(config.store, "1", "0", tmp_path / "runs", ProbeConfig(hidden=8, lstm_layers=1),
              TrainConfig(epochs=1), progress=False)
    assert not (tmp_path / "runs").exists()  # refused before any run
    # An unfinished test split: the message says how to test on the finished ones meanwhile
    with pytest.raises(W2VCacheError, match=r"split dev of .* resumes it; or test on the finished one\(s\) meanwhile: "
                       r"--test-splits train$"):
        probe(config.store, "1", "0", tmp_path / "runs", ProbeConfig(hidden=8, lstm_layers=1),
              TrainConfig(epochs=1, dev_split="train", test_splits=("dev", "train")), progress=False)


def test_utterances_ctc_cannot_align_are_counted_and_named(store, tmp_path, capsys):
    """A transcript that needs more frames than its utterance has (one per symbol, a blank between
    equal neighbours) has no CTC path: zero_infinity makes its loss 0, so it would pass unseen."""
    from w2vcache.runs import RunRecord
    from w2vcache.train import train

    tc = TrainConfig(epochs=1, test_splits=())
    task = ProbeTask(open_store(store), "layer01", ProbeConfig(hidden=32, lstm_layers=1, batch_frames=1500), tc)
    features = task.splits["train"]
    features.texts[0] = "ab" * int(features.lengths[0])  # twice its frames
    record = RunRecord(kind="probe", experiment="x", layer=1, reinit=[], seed=0, model={}, data={}, store="s",
                       device="cpu", threads=1)
    train(task, tc, tmp_path, record, progress=False, num_threads=1)
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert metrics["utterances_without_ctc_path"] == 1 and metrics["batches_not_finite"] == 0
    assert "note: 1 training utterance(s) have transcripts longer than their frames allow" in capsys.readouterr().out


def test_a_resume_with_every_epoch_done_tests_with_the_threads_asked_for(store, tmp_path, monkeypatch):
    """Killed during its final test, a run resumes straight into testing: that evaluation too runs
    on --threads, not on torch's default (on a busy machine the difference is many times over)."""
    import w2vcache.train

    args = ["probe", "--store", str(store), "--layer", "1", "--epochs", "1", *SMALL, "--out", tmp_path, "--threads", "1"]
    assert cli(*args).exit_code == 0
    (tmp_path / "probe/layer01/seed0/result.json").unlink()  # as if killed while testing
    seen, evaluate = [], w2vcache.train.evaluate
    monkeypatch.setattr(w2vcache.train, "evaluate",
                        lambda task, split, *rest: seen.append(torch.get_num_threads()) or evaluate(task, split, *rest))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        resumed = cli(*args)
    finally:
        torch.set_num_threads(threads)
    assert resumed.exit_code == 0, resumed.output
    assert seen and set(seen) == {1}


def test_a_failed_run_says_why_in_its_result_and_is_taken_again(store, tmp_path, monkeypatch):
    """A run stopped by an error writes result.json with status failed and the error, which
    report lists; the same command again resumes it from its last checkpoint and finishes it as
    an uninterrupted run does."""
    from w2vcache.report import find_runs

    args = ["probe", "--store", str(store), "--layer", "1", "--epochs", "2", *SMALL]
    whole = cli(*args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    calls, loss = [], ProbeTask.loss

    def failing_in_epoch_2(self, batch):
        calls.append(1)
        if len(calls) > len(self.batches["train"]):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return loss(self, batch)

    monkeypatch.setattr(ProbeTask, "loss", failing_in_epoch_2)
    failed = cli(*args, "--out", tmp_path / "failed")
    assert failed.exit_code != 0
    run = tmp_path / "failed/probe/layer01/seed0"
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "failed" and result["seed"] == 0 and result["layer"] == 1
    assert result["error"].endswith("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert find_runs(tmp_path / "failed")[0].status == "failed"
    monkeypatch.setattr(ProbeTask, "loss", loss)
    again = cli(*args, "--out", tmp_path / "failed")
    assert again.exit_code == 0, again.output
    assert "resuming" in again.output and "after epoch 1" in again.output
    a = json.loads((tmp_path / "whole/probe/layer01/seed0/result.json").read_text())
    b = json.loads((run / "result.json").read_text())
    assert b["status"] == "finished" and all(a[k] == b[k] for k in ("best_epoch", "dev", "test-clean", "test-other"))


def test_a_damaged_run_directory_is_named_not_a_traceback(store, tmp_path):
    args = ["probe", "--store", str(store), "--layer", "1", "--epochs", "1", *SMALL, "--out", tmp_path]
    assert cli(*args).exit_code == 0
    run = tmp_path / "probe/layer01/seed0"
    (run / "result.json").unlink()  # unfinished, with its checkpoint
    config = (run / "config.json").read_text()
    (run / "config.json").write_text("")
    damaged = cli(*args)
    assert damaged.exit_code == 1 and "Traceback" not in damaged.output
    assert f"{run / 'config.json'}: not valid JSON" in damaged.output and f"move {run} aside" in damaged.output
    (run / "config.json").write_text(config)
    checkpoint = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(checkpoint[: len(checkpoint) // 2])  # as a crash of the host may leave it
    torn = cli(*args)
    assert torn.exit_code == 1 and f"{run / 'checkpoint.pt'}: cannot be read" in torn.output, torn.output


def test_cudas_kernel_draws_its_dropout_from_torchs_generator():
    """With dropout between layers, the packed kernel (CUDA's) runs its layers one call each with
    torch's dropout between them, not cuDNN's, whose random state no checkpoint holds: the same
    generator state gives the same outputs, and without dropping it is nn.LSTM exactly."""
    torch.manual_seed(0)
    probe = Probe(12, ProbeConfig(hidden=16, lstm_layers=3, dropout=0.3)).train()
    x, lengths = torch.randn(3, 9, 12), torch.tensor([9, 5, 7])
    state = torch.get_rng_state()
    first = probe.packed(x, lengths)
    torch.set_rng_state(state)  # as a resumed run restores it from its checkpoint
    assert torch.equal(probe.packed(x, lengths), first)
    assert first[1, 5:].abs().max() == 0  # padding stays zero
    probe.lstm.dropout = 1e-12  # the per-layer path, dropping nothing: nn.LSTM's own result
    per_layer = probe.packed(x, lengths)
    probe.lstm.dropout = 0.0
    assert torch.equal(per_layer, probe.packed(x, lengths))
