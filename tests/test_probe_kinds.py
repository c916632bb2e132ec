"""Linear probes and weighted probes on the bundled corpus's features from the built-in model:
the models, their runs and records, layer_weights.json across a kill, and the report of them."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import run_killed_after_first_checkpoint
from test_report import markdown_tables
from w2vcache.cli import main
from w2vcache.errors import W2VCacheError
from w2vcache.layers import weighted_layers
from w2vcache.probe import LinearProbe, ProbeConfig, ProbeTask
from w2vcache.report import write_report
from w2vcache.runs import find_runs
from w2vcache.store import open_store
from w2vcache.train import TrainConfig

TINY = ["--hidden", "16", "--lstm-layers", "1", "--batch-frames", "1500", "--lr", "2e-3", "--threads", "1"]
LINEAR = ["--probe", "linear", "--batch-frames", "1500", "--lr", "5e-3", "--threads", "1"]
LAYERS = [f"layer{i:02d}" for i in range(5)]  # the built-in model's numbered layers


@pytest.fixture
def store(bundled_store):
    return bundled_store


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def read(path):
    return json.loads(path.read_text())


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_linear_probe_is_one_linear_layer_per_frame():
    torch.manual_seed(0)
    model = LinearProbe(16)
    x = torch.randn(3, 7, 16)
    out = model(x, torch.tensor([7, 5, 2]))
    w, b = model.output.weight, model.output.bias
    torch.testing.assert_close(out, torch.log_softmax(x @ w.T + b, dim=-1))
    assert out.shape == (3, 7, 30) and set(model.state_dict()) == {"output.weight", "output.bias"}
    # Each frame on its own: changing one frame changes that frame's output only.
    y = x.clone()
    y[1, 3] += 1.0
    changed = (model(y, torch.tensor([7, 5, 2])) != out).any(-1)
    assert changed.nonzero().tolist() == [[1, 3]]


def test_weighted_layers_leave_the_cnn_output_out():
    assert weighted_layers(["cnn", "layer00", "layer01", "layer12"]) == ["layer00", "layer01", "layer12"]


@pytest.mark.parametrize("layer_norm", [False, True])
def test_weighted_sum_is_the_softmax_combination_of_the_stored_layers(store, layer_norm):
    """The model's mix of a batch equals sum_l softmax(w)_l * layer_l, worked out here from the
    store's own frames (layer-normalised by hand with --layer-norm), held in memory or streamed."""
    opened = open_store(store)
    config = ProbeConfig(hidden=16, lstm_layers=1, batch_frames=1500, layer_norm=layer_norm)
    tasks = [ProbeTask(opened, "weighted", config, TrainConfig(), memory_budget=budget) for budget in (2**40, 0)]
    assert [t.splits["dev"].in_memory for t in tasks] == [True, False]
    assert tasks[0].layers == LAYERS
    w = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5])
    share = np.exp(w.numpy()) / np.exp(w.numpy()).sum()
    indices = tasks[0].batches["dev"][1]
    positions = [int(tasks[0].splits["dev"].positions[i]) for i in indices]
    stored = {layer: opened.read_batch("dev", layer, positions) for layer in LAYERS}
    for task in tasks:
        with torch.no_grad():
            task.model.mix.weights.copy_(w)
        weights = task.layer_weights()
        assert list(weights) == LAYERS and sum(weights.values()) == pytest.approx(1.0)
        assert list(weights.values()) == pytest.approx(share.tolist())
        batch = task._batch("dev", indices)
        assert batch.features.shape[0] == len(LAYERS)
        mixed = task.model.mix(batch.features)
        for b, n in enumerate(batch.lengths.tolist()):
            expected = np.zeros_like(stored["layer00"][b], dtype=np.float64)
            for share_l, layer in zip(share, LAYERS):
                x = stored[layer][b].astype(np.float64)
                if layer_norm:
                    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
                expected += share_l * x
            np.testing.assert_allclose(mixed[b, :n].detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_linear_probe_trains_and_records_only_what_it_uses(store, tmp_path):
    result = cli("probe", "--store", store, "--layer", "3", "--epochs", "4", *LINEAR, "--hidden", "64",
                 "--out", tmp_path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "probe" / "linear-layer03" / "seed0"
    lines = metrics(run)
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert lines[-1]["train_loss"] < 0.8 * lines[0]["train_loss"]
    config = read(run / "config.json")
    assert (config["kind"], config["experiment"], config["layer"], config["probe"], config["weighted"]) == (
        "probe", "linear-layer03", 3, "linear", False)
    assert config["model"] == {"batch_frames": 1500}  # --hidden, --lstm-layers, --dropout: not used, not recorded
    res = read(run / "result.json")
    assert (res["probe"], res["weighted"], res["status"]) == ("linear", False, "finished")
    assert set(torch.load(run / "best.pt", weights_only=True)) == {"output.weight", "output.bias"}
    assert not (run / "layer_weights.json").exists()


def test_weighted_run_killed_and_resumed_gives_the_same_weights_and_result(store, tmp_path):
    """layer_weights.json holds one softmax per finished epoch; a run SIGKILLed right after its
    first checkpoint and run again ends with the uninterrupted run's file, weights and result."""
    args = ["probe", "--store", str(store), "--layer", "weighted", "--layer-norm", "--epochs", "3", *TINY]
    whole = cli(*args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    run = tmp_path / "whole" / "probe" / "weighted" / "seed0"
    config = read(run / "config.json")
    assert (config["experiment"], config["layer"], config["probe"], config["weighted"]) == ("weighted", None, "bilstm", True)
    assert config["model"]["layer_norm"] is True and config["data"]["layers"] == LAYERS
    entries = read(run / "layer_weights.json")
    assert [e["epoch"] for e in entries] == [1, 2, 3]
    for entry in entries:
        assert list(entry["weights"]) == LAYERS and sum(entry["weights"].values()) == pytest.approx(1.0)
    assert entries[0]["weights"] != entries[-1]["weights"]  # the weights learn
    best = torch.load(run / "best.pt", weights_only=True)
    best_epoch = read(run / "result.json")["best_epoch"]
    softmax = best["mix.weights"].softmax(0).tolist()
    assert list(entries[best_epoch - 1]["weights"].values()) == softmax  # the tested weights' entry

    killed = tmp_path / "killed"
    resumed_run = killed / "probe" / "weighted" / "seed0"
    run_killed_after_first_checkpoint([*args, "--out", str(killed)])
    assert [e["epoch"] for e in read(resumed_run / "layer_weights.json")] == [1]
    assert not (resumed_run / "result.json").exists()
    resumed = cli(*args, "--out", killed)
    assert resumed.exit_code == 0, resumed.output
    assert read(resumed_run / "layer_weights.json") == entries
    a, b = read(run / "result.json"), read(resumed_run / "result.json")
    for key in ("best_epoch", "dev", "test-clean", "test-other", "probe", "weighted", "layer"):
        assert a[key] == b[key], key


def test_cli_sweep_names_and_refusals(store, tmp_path):
    result = cli("probe", "--store", store, "--layer", "1,weighted", "--epochs", "1", *LINEAR, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "2 run(s) trained" in result.output
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("probe/*/*")) == [
        "probe/linear-layer01/seed0", "probe/linear-weighted/seed0"]
    config = read(tmp_path / "probe/linear-weighted/seed0/config.json")
    assert config["model"] == {"batch_frames": 1500, "layer_norm": False} and config["weighted"] is True
    assert set(torch.load(tmp_path / "probe/linear-weighted/seed0/best.pt", weights_only=True)) == {
        "mix.weights", "head.output.weight", "head.output.bias"}

    no_weighted = cli("probe", "--store", store, "--layer", "1", "--layer-norm", "--epochs", "1", *LINEAR,
                      "--out", tmp_path / "x")
    assert no_weighted.exit_code == 1 and "--layer-norm" in no_weighted.output and "weighted" in no_weighted.output
    bad_kind = cli("probe", "--store", store, "--probe", "mlp", "--out", tmp_path / "x")
    assert bad_kind.exit_code == 2 and "'mlp' is not one of 'bilstm', 'linear'" in bad_kind.output
    bad_layer = cli("probe", "--store", store, "--layer", "weighted,9", "--out", tmp_path / "x")
    assert bad_layer.exit_code == 1 and "no layer layer09" in bad_layer.output
    # From Python, the config itself refuses an unknown kind, before a store is opened.
    with pytest.raises(W2VCacheError, match=r"^--probe 'mlp': choose bilstm or linear$"):
        ProbeConfig(probe="mlp")


def test_report_shows_linear_and_weighted_probes_from_their_runs(store, tmp_path):
    """Every number of the new rows and of the weights table is the runs' own (result.json,
    layer_weights.json at the best epoch), formatted as the report formats one seed."""
    runs = tmp_path / "runs"
    for extra in (["--probe", "bilstm", *TINY], LINEAR):
        result = cli("probe", "--store", store, "--layer", "2,weighted", "--epochs", "2", *extra, "--out", runs)
        assert result.exit_code == 0, result.output
    written = write_report(runs)
    text = written["md"].read_text()
    tables = markdown_tables(text)
    assert list(tables) == ["Probes (frozen W2V layer, BiLSTM-CTC)", "Linear probes (frozen W2V layer, linear-CTC)",
                            "Layer weights of the weighted probes (softmax, at the best epoch)",
                            "One dev utterance, decoded"]
    assert [line for line in tables["One dev utterance, decoded"]] == [
        "BiLSTM 2", "BiLSTM weighted", "linear 2", "linear weighted"]
    for heading, prefix in (("Probes (frozen W2V layer, BiLSTM-CTC)", ""),
                            ("Linear probes (frozen W2V layer, linear-CTC)", "linear-")):
        table = tables[heading]
        assert list(table) == ["2", "weighted"]
        for label, experiment in (("2", "layer02"), ("weighted", "weighted")):
            res = read(runs / "probe" / f"{prefix}{experiment}" / "seed0" / "result.json")
            for split in ("dev", "test-clean", "test-other"):
                assert table[label][f"{split} WER"] == f"{res[split]['wer_percent']:.2f} (n=1)"
                assert table[label][f"{split} CER"] == f"{res[split]['cer_percent']:.2f} (n=1)"
    weights = tables["Layer weights of the weighted probes (softmax, at the best epoch)"]
    assert list(weights) == LAYERS
    for column, experiment in (("BiLSTM weighted", "weighted"), ("linear weighted", "linear-weighted")):
        run = runs / "probe" / experiment / "seed0"
        best = read(run / "result.json")["best_epoch"]
        at_best = next(e["weights"] for e in read(run / "layer_weights.json") if e["epoch"] == best)
        for layer in LAYERS:
            assert weights[layer][column] == f"{at_best[layer]:.3f} (n=1)"

    report = read(written["json"])
    rows = {(r["probe"], r["label"]): r for r in report["rows"]}
    assert list(rows) == [("bilstm", "2"), ("bilstm", "weighted"), ("linear", "2"), ("linear", "weighted")]
    assert report["best_layer"]["experiment"] == "layer02"
    assert report["best_linear_layer"]["experiment"] == "linear-layer02"
    weighted = rows[("linear", "weighted")]
    assert weighted["weighted"] is True and weighted["layer"] is None
    assert sum(w["mean"] for w in weighted["layer_weights"].values()) == pytest.approx(1.0)
    res = read(runs / "probe/linear-weighted/seed0/result.json")
    assert weighted["wer_percent"]["dev"]["mean"] == res["dev"]["wer_percent"]
    csv_text = written["csv"].read_text().splitlines()
    assert csv_text[0].startswith("kind,probe,experiment,layer,weighted,") and "weight_layer04_mean" in csv_text[0]
    assert [line.split(",")[:5] for line in csv_text[1:]] == [
        ["probe", "bilstm", "layer02", "2", "false"], ["probe", "bilstm", "weighted", "", "true"],
        ["probe", "linear", "linear-layer02", "2", "false"], ["probe", "linear", "linear-weighted", "", "true"]]
    found = {r.name: r for r in find_runs(runs)}
    assert found["probe/weighted/seed0"].layer_weights is not None
    assert (found["probe/linear-layer02/seed0"].probe, found["probe/layer02/seed0"].probe) == ("linear", "bilstm")


def test_a_weighted_sum_of_one_layer_is_refused():
    from types import SimpleNamespace

    from w2vcache.probe import probe_layers

    one = SimpleNamespace(path="one.zarr", layers={"cnn": 512, "layer02": 64})  # what probe_layers reads of a store
    with pytest.raises(W2VCacheError, match=r"^store one.zarr: a weighted sum needs two numbered layers or more; it "
                       r"has cnn, layer02 \(--layer 2 probes that one\)$"):
        probe_layers(one, "weighted")
