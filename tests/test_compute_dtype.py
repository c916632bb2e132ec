"""Reduced compute dtypes: extraction measures their error against float32 on its first batch,
records it in the store's run record, and `info` prints it; float32 stores and stores from before
the measurement print as they did."""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from w2vcache.audio import load_audio
from w2vcache.backbone import forward_layers
from w2vcache.checkpoints import load_backbone
from w2vcache.cli import main
from w2vcache.corpus import build_corpus
from w2vcache.extract import relative_errors
from w2vcache.store import info, open_store

SPLIT = ["--split", "dev=dev-clean"]
SMALL_BATCHES = ["--batch-seconds", "8", "--threads", "1"]  # one thread: the test's forward repeats the run's


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def extract_records(path) -> list[dict]:
    runs = zarr.open_group(str(path), mode="r")["_runs"]
    return [group.attrs.asdict() for name, group in runs.groups() if name.startswith("extract-")]


@pytest.fixture(scope="module")
def bf16_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "bf16.zarr"
    result = run_cli("extract", "--store", path, *SPLIT, *SMALL_BATCHES, "--compute-dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    return path


def independent_errors(ids: list[str]) -> dict[str, dict[str, float]]:
    """The batch of `ids` run as extraction runs it, in bfloat16 autocast and in float32, compared in numpy."""
    backbone = load_backbone("builtin:tiny")
    paths = {u.id: u.path for u in build_corpus(splits=["dev=dev-clean"]).splits["dev"]}
    waves = [load_audio(paths[i], backbone.receptive_field) for i in ids]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced, frames = forward_layers(backbone, waves)
        reference, _ = forward_layers(backbone, waves)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for name, a, b in zip(backbone.layer_names(), reduced, reference):
        a = np.concatenate([a[i, :n].double().numpy() for i, n in enumerate(frames)])
        b = np.concatenate([b[i, :n].double().numpy() for i, n in enumerate(frames)])
        per_frame = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
        out[name] = {"rms": np.linalg.norm(a - b) / np.linalg.norm(b), "max": per_frame.max()}
    return out


def test_bfloat16_extraction_records_the_error_of_its_first_batch(bf16_store):
    (record,) = extract_records(bf16_store)
    measured = record["result"]["compute_error"]
    assert measured["dtype"] == "bfloat16" and measured["against"] == "float32"
    on = measured["measured_on"]
    assert on["split"] == "dev" and on["block"] == 0 and on["utterances"] == len(on["ids"]) > 1
    store = open_store(bf16_store)
    assert list(measured["layers"]) == list(store.layers)
    first = [u.id for u in store.utterances("dev")][: len(on["ids"])]
    assert on["ids"] == first  # the store's first batch: its shortest utterances
    expected = independent_errors(on["ids"])
    for layer, errors in measured["layers"].items():
        assert 0 < errors["rms"] <= errors["max"] < 0.05, layer
        assert errors["rms"] == pytest.approx(expected[layer]["rms"], rel=1e-6), layer
        assert errors["max"] == pytest.approx(expected[layer]["max"], rel=1e-6), layer


def test_the_recorded_error_is_the_stored_features_error(bf16_store):
    """The stored (float16) features of the first batch sit at about the recorded distance from
    float32: the record describes the store, not some other computation."""
    store = open_store(bf16_store)
    (record,) = extract_records(bf16_store)
    measured = record["result"]["compute_error"]
    ids = measured["measured_on"]["ids"]
    backbone = load_backbone("builtin:tiny")
    paths = {u.id: u.path for u in build_corpus(splits=["dev=dev-clean"]).splits["dev"]}
    reference, frames = forward_layers(backbone, [load_audio(paths[i], backbone.receptive_field) for i in ids])
    for name, x in zip(backbone.layer_names(), reference):
        stored = np.concatenate([a.astype(np.float64) for a in store.read_batch("dev", name, ids)])
        ref = np.concatenate([x[i, :n].double().numpy() for i, n in enumerate(frames)])
        rms = np.linalg.norm(stored - ref) / np.linalg.norm(ref)
        assert rms == pytest.approx(measured["layers"][name]["rms"], rel=0.1), name


def test_info_prints_the_measured_error(bf16_store):
    shown = run_cli("info", bf16_store)
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.output.splitlines() if line.startswith("precision"))
    assert "computed in bfloat16: relative error vs float32" in line and "per layer" in line
    assert "measured on the first batch (dev, " in line
    about = json.loads(run_cli("info", bf16_store, "--json").output)
    assert about["compute_error"] == extract_records(bf16_store)[0]["result"]["compute_error"]


def test_stores_without_the_record_print_as_before(bf16_store, tmp_path):
    """A store extracted before the measurement existed (its run record has no compute_error), and
    a float32 store: no precision line, the rest unchanged."""
    old = tmp_path / "old.zarr"
    shutil.copytree(bf16_store, old)
    runs = zarr.open_group(str(old), mode="r+")["_runs"]
    for name, group in runs.groups():
        attrs = group.attrs.asdict()
        del attrs["result"]["compute_error"]
        group.attrs.put(attrs)
    before, now = run_cli("info", bf16_store).output, run_cli("info", old)
    assert now.exit_code == 0, now.output
    assert "precision" not in now.output
    assert [line for line in before.splitlines() if not line.startswith(("precision", "store"))] == \
        [line for line in now.output.splitlines() if not line.startswith("store")]
    assert info(old)["compute_error"] is None
    shutil.rmtree(old / "_runs")  # a store with no run records at all
    assert run_cli("info", old).exit_code == 0 and info(old)["compute_error"] is None

    plain = tmp_path / "f32.zarr"
    assert run_cli("extract", "--store", plain, *SPLIT, *SMALL_BATCHES).exit_code == 0
    assert extract_records(plain)[0]["result"]["compute_error"] is None
    assert "precision" not in run_cli("info", plain).output


def test_relative_errors_leave_padding_out():
    reference = torch.tensor([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [9.0, 9.0]]])  # (B=2, T=2, D=2)
    reduced = reference.clone()
    reduced[0, 0, 0] += 0.5  # frame (0, 0): error 0.5 on a norm of 5
    reduced[1, 1] = 1e6  # padding of utterance 1 (1 frame): ignored
    errors = relative_errors(reduced, reference, [2, 1])
    assert errors["max"] == pytest.approx(0.1)
    assert errors["rms"] == pytest.approx(0.5 / np.sqrt(25 + 1 + 4))


def test_float32_extraction_turns_tf32_off_and_tf32_is_refused_without_cuda(tmp_path, monkeypatch):
    """cuDNN's convolutions run in TF32 by default on a GPU, so "float32" would not be float32 there:
    the forward of a float32 extraction runs with TF32 off (the flags as the model sees them), and
    the flags are as they were afterwards. --compute-dtype tf32 needs CUDA, and says so."""
    import w2vcache.extract as extract_module

    seen, forward = [], extract_module.forward_layers

    def watched(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision))
        return forward(*args, **kwargs)

    monkeypatch.setattr(extract_module, "forward_layers", watched)
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    result = run_cli("extract", "--store", tmp_path / "s.zarr", *SPLIT, *SMALL_BATCHES)
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {("ieee", "ieee")}
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
    refused = run_cli("extract", "--store", tmp_path / "t.zarr", *SPLIT, "--compute-dtype", "tf32")
    assert refused.exit_code == 1
    assert "--compute-dtype tf32: TF32 is a CUDA tensor-core format; on --device cpu choose float32 or bfloat16" in refused.output
    assert not (tmp_path / "t.zarr").exists()


def test_tf32_switch_works_whichever_way_the_flags_were_set():
    """Someone who set one backend's flag through torch's newer API makes reading the older
    allow_tf32 flags raise; the switch uses the newer ones and restores exactly what it found."""
    from w2vcache.extract import tf32

    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cudnn.conv.fp32_precision = "ieee"  # conv and rnn now differ: allow_tf32 raises
        with tf32(True):
            assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (before[0], "ieee")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
