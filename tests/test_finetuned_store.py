"""Extracting a fine-tuning run's encoder (`extract --model RUNS/finetune/<experiment>/seed0`): the
best epoch's weights, a store that lines up frame by frame with the pre-trained model's, and the
run named in its provenance."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import few_utterance_splits, few_utterances
from w2vcache.audio import load_audio
from w2vcache.backbone import forward_layers, state_dict_hash
from w2vcache.checkpoints import load_backbone
from w2vcache.cli import main
from w2vcache.errors import W2VCacheError
from w2vcache.store import open_store


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A two-epoch fine-tuning run of builtin:tiny on a few bundled utterances, and two stores of
    the same utterances: one of the pre-trained model, one of the run."""
    folder = tmp_path_factory.mktemp("finetuned")
    splits, picks = few_utterance_splits(folder), few_utterances()
    result = cli("finetune", *splits, "--epochs", "2", "--freeze-epochs", "0", "--batch-seconds", "8",
                 "--num-workers", "0", "--lr", "3e-3", "--test-splits", "test-clean", "--out", folder / "runs")
    assert result.exit_code == 0, result.output
    run = folder / "runs" / "finetune" / "reinit-none" / "seed0"
    layout = ["--chunk-frames", "64", "--block-chunks", "2", "--batch-seconds", "8"]
    for model, store in (("builtin:tiny", "pre.zarr"), (run, "tuned.zarr")):
        result = cli("extract", "--model", model, *splits, "--store", folder / store, *layout)
        assert result.exit_code == 0, result.output
    return {"folder": folder, "splits": splits, "layout": layout, "run": run, "picks": picks,
            "pre": folder / "pre.zarr", "tuned": folder / "tuned.zarr"}


def finetuned_encoder(run):
    """The run's best-epoch encoder, built here from best.pt without load_backbone's run support."""
    state = torch.load(run / "best.pt", weights_only=True, map_location="cpu")
    backbone = load_backbone("builtin:tiny")
    backbone.model.load_state_dict({k.removeprefix("w2v."): v for k, v in state.items() if k.startswith("w2v.")})
    return backbone


def test_stored_layers_equal_the_finetuned_encoder(made):
    backbone = finetuned_encoder(made["run"])
    store = open_store(made["tuned"])
    assert store.provenance["model"]["weight_hash"] == state_dict_hash(backbone.model)
    for split, utterances in made["picks"].items():
        for u in utterances:
            outputs, frames = forward_layers(backbone, [load_audio(u.path)])
            for name, alone in zip(store.layers, outputs):
                alone = alone[0, : frames[0]].numpy()
                stored = store.read(split, name, u.id)
                assert stored.shape == alone.shape
                # float16 rounds to 11 significant bits: relative error at most 2**-11
                np.testing.assert_allclose(stored.astype(np.float32), alone, rtol=2**-11, atol=1e-5,
                                           err_msg=f"{split} {u.id} {name}")


def test_the_stores_line_up_frame_by_frame_and_the_features_differ(made):
    pre, tuned = zarr.open_group(str(made["pre"]), mode="r"), zarr.open_group(str(made["tuned"]), mode="r")
    assert pre.attrs["w2vcache"]["splits"] == tuned.attrs["w2vcache"]["splits"]
    assert open_store(made["pre"]).layers == open_store(made["tuned"]).layers
    for split in made["picks"]:
        for name in ("ids", "texts", "lengths", "offsets", "blocks"):
            np.testing.assert_array_equal(pre[split][name][...], tuned[split][name][...], err_msg=f"{split}/{name}")
    a, b = open_store(made["pre"]), open_store(made["tuned"])
    for layer in a.layers:
        for split in made["picks"]:
            for u in made["picks"][split]:
                x, y = a.read(split, layer, u.id), b.read(split, layer, u.id)
                assert x.shape == y.shape
                # Fine-tuning moved every layer: the projection and all blocks trained.
                assert np.abs(x.astype(np.float32) - y.astype(np.float32)).max() > 1e-2, (layer, u.id)


def test_provenance_names_the_run(made):
    model = open_store(made["tuned"]).provenance["model"]
    pre = open_store(made["pre"]).provenance["model"]
    result = json.loads((made["run"] / "result.json").read_text())
    config = json.loads((made["run"] / "config.json").read_text())
    assert model["name"] == os.path.abspath(made["run"]) and model["revision"] is None
    assert model["run"] == {
        "path": os.path.abspath(made["run"]), "experiment": "reinit-none", "seed": 0, "reinit": [],
        "status": "finished", "best_epoch": result["best_epoch"],
        "base_model": config["model"]["backbone"],
    }
    assert model["run"]["base_model"]["name"] == "builtin:tiny"
    assert model["weight_hash"] != pre["weight_hash"]
    # Everything but the name, the weights and the run is the base model's own.
    assert {k: v for k, v in model.items() if k not in ("name", "weight_hash", "run")} == \
        {k: v for k, v in pre.items() if k not in ("name", "weight_hash")}
    assert "run" not in pre
    info = cli("info", made["tuned"])
    assert info.exit_code == 0 and f"model      {os.path.abspath(made['run'])}" in info.output


def test_the_run_into_the_pretrained_store_is_refused_and_its_own_store_resumes(made):
    result = cli("extract", "--model", made["run"], *made["splits"], "--store", made["pre"], *made["layout"])
    assert result.exit_code == 1
    assert f"store {made['pre']} already exists with other settings" in result.output
    assert "provenance model.name: store has 'builtin:tiny'" in result.output
    assert "provenance model.weight_hash" in result.output
    again = cli("extract", "--model", made["run"], *made["splits"], "--store", made["tuned"], *made["layout"])
    assert again.exit_code == 0 and "nothing to extract: every block is already in the store" in again.output, again.output


def test_a_probe_run_is_refused_in_one_line(made, tmp_path):
    result = cli("probe", "--store", made["pre"], "--layer", "2", "--epochs", "1", "--lstm-layers", "1",
                 "--hidden", "8", "--test-splits", "test-clean", "--threads", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    probe = tmp_path / "probe" / "layer02" / "seed0"
    with pytest.raises(W2VCacheError) as error:
        load_backbone(str(probe))
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{str(probe)!r} is a probe run") and "(builtin:tiny)" in message
    result = cli("extract", "--model", probe, *made["splits"], "--store", tmp_path / "x.zarr")
    assert result.exit_code == 1 and message in result.output and not (tmp_path / "x.zarr").exists()


def test_runs_without_usable_weights_are_refused(made, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made["run"], run)
    # Killed before its first epoch ended: nothing to extract yet.
    (run / "best.pt").rename(run / "best.pt.away")
    with pytest.raises(W2VCacheError, match=r"fine-tuning run .* has no best.pt yet"):
        load_backbone(str(run))
    (run / "best.pt.away").rename(run / "best.pt")
    # An unfinished run with a best epoch is extracted, and says so, and which epoch best.pt holds.
    best_epoch = json.loads((run / "result.json").read_text())["best_epoch"]
    (run / "result.json").unlink()
    backbone = load_backbone(str(run))
    assert backbone.describe()["run"]["status"] == "unfinished" and backbone.describe()["run"]["best_epoch"] == best_epoch
    assert backbone.weight_hash() == state_dict_hash(finetuned_encoder(made["run"]).model)
    # Weights of another architecture than the base model the config names.
    config = json.loads((run / "config.json").read_text())
    config["model"]["backbone"]["name"] = "builtin:tiny-ln"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(W2VCacheError, match=r"best.pt does not fit the model 'builtin:tiny-ln' it fine-tuned: "
                                            r"\d+ missing, \d+ unexpected"):
        load_backbone(str(run))
    # A revision only applies to Hub ids.
    with pytest.raises(W2VCacheError, match="a revision"):
        load_backbone(str(run), revision="main")


def test_a_run_whose_best_epoch_trained_the_head_alone_says_its_encoder_is_the_base(made, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(made["run"], run)
    best_epoch = json.loads((run / "result.json").read_text())["best_epoch"]
    load_backbone(str(run))
    assert "trained the CTC head alone" not in capsys.readouterr().err  # --freeze-epochs 0
    config = json.loads((run / "config.json").read_text())
    config["model"]["freeze_epochs"] = best_epoch  # as if the encoder had been frozen until then
    (run / "config.json").write_text(json.dumps(config))
    load_backbone(str(run))
    assert (f"its best epoch ({best_epoch}) trained the CTC head alone (the encoder was frozen for {best_epoch}): "
            "its encoder is the model it started from") in capsys.readouterr().err
