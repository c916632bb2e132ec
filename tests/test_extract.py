"""Extraction end to end: exactness against the model, resume after SIGKILL, shards, refusals."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import write_wave
from w2vcache.audio import load_audio
from w2vcache.backbone import forward_layers
from w2vcache.checkpoints import load_backbone
from w2vcache.cli import main
from w2vcache.corpus import build_corpus
from w2vcache.extract import ExtractConfig, extract, plan_splits, provenance, select_layers
from w2vcache.errors import W2VCacheError
from w2vcache.store import FeatureStore, open_store, verify

# A small corpus from the bundled one: 34 utterances, 80 s of audio, two splits.
SPLITS = ["--split", "dev=dev-clean", "--split", "test=test-other"]
# Tiny chunks and blocks, so that even this corpus spans many blocks (resume, shard units).
LAYOUT = ["--chunk-frames", "64", "--block-chunks", "4", "--batch-seconds", "8"]


def small_corpus():
    return build_corpus(splits=["dev=dev-clean", "test=test-other"])


def run_cli(*args):
    result = CliRunner().invoke(main, list(args))
    return result


def arrays(path) -> dict:
    """Every array of every split, read with plain zarr."""
    root = zarr.open_group(str(path), mode="r")
    out = {}
    for split in root.attrs["w2vcache"]["splits"]:
        for name, array in root[split].arrays():
            out[f"{split}/{name}"] = array[...]
    return out


def assert_same_store(a, b):
    x, y = arrays(a), arrays(b)
    assert x.keys() == y.keys()
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The store an uninterrupted single-worker run makes."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    result = run_cli("extract", "--store", str(path), *SPLITS, *LAYOUT)
    assert result.exit_code == 0, result.output
    return path


def test_select_layers():
    assert select_layers("all", 4) == ["layer00", "layer01", "layer02", "layer03", "layer04"]
    assert select_layers("0,2-3", 4) == ["layer00", "layer02", "layer03"]
    with pytest.raises(W2VCacheError, match="layers '3-5': the model has no layer layer05; it has layer00"):
        select_layers("3-5", 4)
    with pytest.raises(W2VCacheError, match="'x' is neither a layer name nor a number or range"):
        select_layers("x", 4)
    from w2vcache.layers import choose_layers
    with pytest.raises(W2VCacheError, match=r"--layer: layers 'cnn': store s.zarr has no layer cnn \(the CNN encoder's "
                       r"output is stored only by `extract --cnn`\); it has layer00, layer01"):
        choose_layers("cnn", ["layer00", "layer01"], "--layer", "store s.zarr")  # probe --layer cnn


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-ln"])
def test_stored_features_equal_the_model_on_each_utterance_alone(tmp_path, model):
    """Mixed-length batches, group-norm and layer-norm variants: every utterance's stored features
    equal a batch-of-one forward, to float16 rounding in a float16 store and tightly in float32."""
    corpus = small_corpus()
    backbone = load_backbone(model)
    for dtype, atol in (("float32", 2e-5), ("float16", None)):
        path = tmp_path / f"{dtype}.zarr"
        extract(corpus, ExtractConfig(model=model, store=str(path), dtype=dtype, include_cnn=True,
                                      batch_seconds=12, chunk_frames=64, block_chunks=4), progress=False)
        store = open_store(path)
        assert list(store.layers) == ["cnn"] + [f"layer{i:02d}" for i in range(5)]
        for u in corpus.splits["dev"][:8]:
            outputs, frames = forward_layers(backbone, [load_audio(u.path)], include_cnn=True)
            for name, alone in zip(store.layers, outputs):
                alone = alone[0, : frames[0]].numpy()
                stored = store.read("dev", name, u.id)
                assert stored.shape == alone.shape
                if dtype == "float32":
                    np.testing.assert_allclose(stored, alone, atol=atol, rtol=1e-5, err_msg=f"{u.id} {name}")
                else:
                    # float16 rounds to 11 significant bits: relative error at most 2**-11
                    np.testing.assert_allclose(stored.astype(np.float32), alone, rtol=2**-11, atol=1e-5,
                                               err_msg=f"{u.id} {name}")


def test_input_normalisation_is_chosen_shown_and_kept(tmp_path):
    """--no-normalize feeds the waves raw (the default normalises each, as the checkpoint's
    preprocessor asks); info says which, and a resume with the other setting is refused."""
    store = tmp_path / "raw.zarr"
    result = run_cli("extract", "--split", "dev=dev-clean", "--store", str(store), "--no-normalize")
    assert result.exit_code == 0, result.output
    raw, normalised = load_backbone("builtin:tiny", normalize=False), load_backbone("builtin:tiny")
    u = small_corpus().splits["dev"][0]
    stored = open_store(store).read("dev", "layer04", u.id).astype(np.float32)
    for backbone, close in ((raw, True), (normalised, False)):
        outputs, frames = forward_layers(backbone, [load_audio(u.path)])
        alone = outputs[-1][0, : frames[0]].numpy()
        assert np.allclose(stored, alone, rtol=2**-11, atol=1e-5) == close
    assert ", input raw" in run_cli("info", str(store)).output
    again = run_cli("extract", "--split", "dev=dev-clean", "--store", str(store))
    assert again.exit_code == 1 and "normalize" in again.output, again.output


def test_info_verify_and_provenance(reference):
    result = run_cli("info", str(reference), "--json")
    assert result.exit_code == 0, result.output
    import json

    about = json.loads(result.output)
    assert about["splits"]["dev"]["utterances"] == 12 and about["splits"]["dev"]["complete"]
    prov = about["provenance"]
    assert prov["model"]["name"] == "builtin:tiny"
    assert prov["model"]["weight_hash"] == load_backbone("builtin:tiny").weight_hash()
    assert prov["frame_rate"] == 50.0 and prov["sample_rate"] == 16000
    assert len(prov["vocabulary"]) == 30 and prov["versions"]["torch"] == torch.__version__
    table = run_cli("info", str(reference))
    assert "dev" in table.output and "builtin:tiny" in table.output
    ok = run_cli("verify", str(reference))
    assert ok.exit_code == 0 and "OK" in ok.output


def test_verify_names_the_corrupt_chunk(tmp_path, reference):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(reference, copy)
    chunk = copy / "dev" / "layer02" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = run_cli("verify", str(copy))
    assert result.exit_code == 1
    assert "dev/layer02 chunk 3" in result.output
    assert result.output.count("FAIL") == 1


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, reference):
    """Kill a real extraction with SIGKILL at several points (mid-creation, then after 3 and after
    half the blocks are done); re-running finishes the store, recomputing only unfinished blocks, and
    the result equals the uninterrupted store."""
    path = tmp_path / "killed.zarr"
    total_blocks = sum(open_store(reference).status(s).n_blocks for s in ("dev", "test"))
    # The child dies at an exact point: after the first split of a new store is laid out (the root
    # still only says it is being created), or after its N-th mark_done (it only does pending blocks).
    script = textwrap.dedent(f"""
        import os, signal, sys
        import w2vcache.store.creation
        from w2vcache.cli import main
        from w2vcache.store import FeatureStore
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        if sys.argv[1] == "creation":
            write_split = w2vcache.store.creation._write_split
            def dying_write_split(*args):
                write_split(*args)
                die()
            w2vcache.store.creation._write_split = dying_write_split
        else:
            mark_done, calls = FeatureStore.mark_done, []
            def dying_mark_done(self, block):
                mark_done(self, block)
                calls.append(block)
                if len(calls) == int(sys.argv[1]):
                    die()
            FeatureStore.mark_done = dying_mark_done
        main({["extract", "--store", str(path), *SPLITS, *LAYOUT]!r}, standalone_mode=False)
    """)

    def killed_run(when):
        proc = subprocess.Popen([sys.executable, "-c", script, str(when)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err

    killed_run("creation")
    with pytest.raises(W2VCacheError, match="never fully created"):
        open_store(path)
    done = 0
    for target in (3, total_blocks // 2 + 1):  # early, mid-way
        assert done < target < total_blocks
        killed_run(target - done)
        done = target
        assert sum(open_store(path).status(s).blocks_done for s in ("dev", "test")) == done
    finished_before = sum(open_store(path).status(s).blocks_done for s in ("dev", "test"))
    assert finished_before < total_blocks
    result = run_cli("extract", "--store", str(path), *SPLITS, *LAYOUT)
    assert result.exit_code == 0, result.output
    assert f"wrote {total_blocks - finished_before} block(s)" in result.output
    assert_same_store(path, reference)
    assert run_cli("verify", str(path)).exit_code == 0


def test_two_shard_workers_at_once_equal_one_worker(tmp_path, reference):
    path = tmp_path / "sharded.zarr"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "w2vcache", "extract", "--store", str(path), *SPLITS, *LAYOUT, "--shard", f"{i}/2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert_same_store(path, reference)


def test_torchrun_ranks_are_shards(tmp_path, monkeypatch, reference):
    path = tmp_path / "ranks.zarr"
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        result = run_cli("extract", "--store", str(path), *SPLITS, *LAYOUT)
        assert result.exit_code == 0, result.output
    assert_same_store(path, reference)


def test_a_store_named_by_a_file_url_is_written_whole(tmp_path, reference):
    """file:///abs/path.zarr writes the same store as the plain path, its run record included
    (zarr opens file:// through fsspec, which made no folders for the record)."""
    path = tmp_path / "url.zarr"
    result = run_cli("extract", "--store", f"file://{path}", *SPLITS, *LAYOUT)
    assert result.exit_code == 0, result.output
    assert_same_store(path, reference)
    assert [p.name.split("-")[0] for p in (path / "_runs").iterdir() if p.is_dir()] == ["extract"]


def test_a_compressed_store_holds_the_same_features(tmp_path, reference):
    """--compression zstd: the same arrays as the uncompressed store, its chunks zarr's zstd; a
    resume with another compression is refused."""
    path = tmp_path / "zstd.zarr"
    result = run_cli("extract", "--store", path, *SPLITS, *LAYOUT, "--compression", "zstd")
    assert result.exit_code == 0, result.output
    assert_same_store(path, reference)
    layer = zarr.open_group(str(path), mode="r")["dev"]["layer01"]
    assert [type(c).__name__ for c in layer.compressors] == ["ZstdCodec", "Crc32cCodec"]
    assert verify(path).ok
    result = run_cli("extract", "--store", path, *SPLITS, *LAYOUT, "--compression", "none")
    assert result.exit_code == 1 and "compression: store has zstd, asked for none" in result.output, result.output
    assert run_cli("extract", "--store", path, *SPLITS, *LAYOUT).exit_code == 0  # unnamed: the store's


def test_unlabelled_audio_is_extracted_and_read(tmp_path):
    """Transcripts all empty (audio extracted for `similarity`): zarr writes no chunk of them, a
    chunk readers and verify must not take for a lost one."""
    from w2vcache.store import verify

    manifest = tmp_path / "unlabelled.tsv"
    manifest.write_text("".join(f"{u.path}\t\n" for u in small_corpus().splits["dev"][:4]))
    path = tmp_path / "u.zarr"
    result = run_cli("extract", "--store", str(path), "--split", f"dev={manifest}", "--layers", "0")
    assert result.exit_code == 0, result.output
    assert verify(path).ok and [u.text for u in open_store(path).utterances("dev")] == [""] * 4


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "busy.zarr"
    corpus = small_corpus()
    config = ExtractConfig(store=str(path))
    backbone = load_backbone(config.model)
    layers = select_layers("all", backbone.num_layers)
    plans = plan_splits(corpus, backbone, progress=False)
    with FeatureStore.create(path, provenance(backbone, config, layers), plans,
                             {n: backbone.hidden_size for n in layers}):
        result = run_cli("extract", "--store", str(path), *SPLITS)
        assert result.exit_code == 1
        assert f"pid {os.getpid()}" in result.output and "Traceback" not in result.output
    assert run_cli("extract", "--store", str(path), *SPLITS).exit_code == 0  # lock released


def test_other_settings_on_an_existing_store_are_refused(reference):
    for option, named in ((["--dtype", "float32"], "dtype: store has float16, asked for float32"),
                          (["--layers", "0-2"], "layers"),
                          (["--model", "builtin:tiny-ln"], "weight_hash")):
        result = run_cli("extract", "--store", str(reference), *SPLITS, *LAYOUT, *option)
        assert result.exit_code == 1
        assert named in result.output, result.output
        if option[0] == "--dtype":  # one setting, named once: not again as the provenance's copy of it
            assert "differ" not in result.output and "provenance dtype" not in result.output, result.output


def test_bad_audio_stops_with_its_path_or_is_skipped(tmp_path):
    good = [write_wave(tmp_path / f"a{i}.flac", seconds=0.5 + 0.1 * i, seed=i) for i in range(6)]
    long = write_wave(tmp_path / "long.flac", seconds=3.0)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(long.read_bytes()[: long.stat().st_size // 2])
    manifest = tmp_path / "m.tsv"
    manifest.write_text("".join(f"{p.name}\tWORDS {i}\n" for i, p in enumerate(good)) + "cut.flac\tCUT\n")
    store = tmp_path / "s.zarr"
    args = ["extract", "--store", str(store), "--split", f"dev={manifest}", "--chunk-frames", "16", "--block-chunks", "2"]
    result = run_cli(*args)
    assert result.exit_code == 1
    assert "cut.flac" in result.output and "truncated" in result.output and "--skip-bad" in result.output
    result = run_cli(*args, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "skipped 1 utterance(s) of split dev" in result.output and "\n  cut: truncated" in result.output
    info = run_cli("info", str(store))
    assert "cut.flac" in info.output and "truncated" in info.output
    assert [u.id for u in open_store(store).utterances("dev")] == [p.stem for p in good]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (there, the layers' peaks are taken stacked)"))])
@pytest.mark.parametrize("aminmax", ["torch's", "missing"])
def test_float16_overflow_is_named_as_such(tmp_path, monkeypatch, aminmax, device):
    if aminmax == "missing":  # a torch without aminmax for the dtype: the peaks are taken another way
        def refuse(*args, **kwargs):
            raise RuntimeError('"aminmax_cpu" not implemented for \'Half\'')
        monkeypatch.setattr(torch, "aminmax", refuse)
    backbone = load_backbone("builtin:tiny", device=device)
    with torch.no_grad():
        backbone.model.feature_extractor.conv_layers[-1].conv.weight.mul_(1e6)  # CNN outputs far beyond 65504
    with pytest.raises(W2VCacheError, match=r"cnn features reach .* beyond float16's range .* --dtype float32"):
        extract(small_corpus(), ExtractConfig(store=str(tmp_path / "s.zarr"), include_cnn=True, device=device),
                progress=False, backbone=backbone)


def test_torchrun_variables_must_be_integers(monkeypatch):
    from w2vcache.extract import parse_shard

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(W2VCacheError, match="must be integers"):
        parse_shard(None)
    monkeypatch.setenv("RANK", "1")
    assert parse_shard(None) == (1, 2)
    with pytest.raises(W2VCacheError, match="--cnn"):
        select_layers("cnn", 4)


def test_every_bad_file_is_named_in_one_run_and_the_long_list_goes_to_a_file(tmp_path):
    """Twelve bad files among good ones: one run names them all (ten in the message, each on a line
    of its own, and all twelve in a TSV beside the store); nothing is written to the store."""
    good = [write_wave(tmp_path / f"g{i}.flac", seconds=0.5, seed=i) for i in range(3)]
    bad = [write_wave(tmp_path / f"rate{i}.flac", rate=8000, seed=i) for i in range(6)]
    bad += [write_wave(tmp_path / f"stereo{i}.flac", channels=2, seed=i) for i in range(6)]
    manifest = tmp_path / "m.tsv"
    manifest.write_text("".join(f"{p.name}\tWORDS\n" for p in good + bad))
    store = tmp_path / "s.zarr"
    result = run_cli("extract", "--store", str(store), "--split", f"train={manifest}")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "12 of 15 audio files cannot be used:" in result.output
    shown = [line for line in result.output.splitlines() if line.startswith("  ") and ".flac:" in line]
    assert len(shown) == 10
    listing = tmp_path / "s.zarr.bad-audio.tsv"
    assert f"and 2 more; all 12 are listed in {listing}" in result.output
    rows = [line.split("\t") for line in listing.read_text().splitlines()[1:]]
    assert sorted(Path(r[2]).name for r in rows) == sorted(p.name for p in bad)
    assert all("8000 Hz" in r[3] for r in rows if "rate" in r[2]) and all("2 channels" in r[3] for r in rows if "stereo" in r[2])
    assert not store.exists()


def test_skip_bad_also_skips_audio_without_a_transcript(tmp_path):
    from conftest import make_librispeech_split

    tree = make_librispeech_split(tmp_path / "dev-clean", {(84, 121): ["HELLO THERE", "GOOD MORNING", "YES"]})
    orphan = write_wave(tree / "84" / "121" / "84-121-0009.flac", seed=9)
    store = tmp_path / "s.zarr"
    args = ["extract", "--store", str(store), "--split", f"dev={tree}"]
    result = run_cli(*args)
    assert result.exit_code == 1 and "84-121-0009.flac" in result.output and "--skip-bad" in result.output
    result = run_cli(*args, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "84-121-0009: no transcript line" in result.output
    assert [u.id for u in open_store(store).utterances("dev")] == ["84-121-0000", "84-121-0001", "84-121-0002"]
    assert "84-121-0009" in run_cli("info", str(store)).output and str(orphan) in run_cli("info", str(store)).output


def test_real_missing_transcript_is_skipped(shared_fixtures, tmp_path):
    tree = shared_fixtures / "missing-transcript"
    result = run_cli("extract", "--store", str(tmp_path / "s.zarr"), "--librispeech", str(tree), "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "1003-2-0002: no transcript line" in result.output


def test_a_worker_reads_the_audio_where_its_own_corpus_has_it(tmp_path, reference):
    """Shard 0 extracts with the corpus in one place; the corpus moves; shard 1 (or a resume on
    another machine) reads it where its own command says, not at the paths the store recorded."""
    import shutil

    from w2vcache.corpus import DATA_DIR

    first, moved = tmp_path / "here" / "dev-clean", tmp_path / "there" / "dev-clean"
    shutil.copytree(DATA_DIR / "dev-clean", first)
    path = tmp_path / "s.zarr"
    assert run_cli("extract", "--store", str(path), "--split", f"dev={first}", *LAYOUT, "--shard", "0/2").exit_code == 0
    shutil.move(first.parent, moved.parent)
    result = run_cli("extract", "--store", str(path), "--split", f"dev={moved}", *LAYOUT, "--shard", "1/2")
    assert result.exit_code == 0, result.output
    assert open_store(path).status("dev").complete
    ours, ref = arrays(path), arrays(reference)
    for key in ours:
        if not key.endswith("/paths"):
            np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
