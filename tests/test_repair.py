"""Repairing a damaged store: exactly the damaged blocks rewritten, from the audio or a copy's
source; the damage shown by info until then; a killed repair resumes; missing inputs refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import write_wave
from w2vcache.cli import main
from w2vcache.corpus import build_corpus
from w2vcache.errors import W2VCacheError
from w2vcache.extract import ExtractConfig, extract
from w2vcache.repair import RepairConfig, repair
from w2vcache.share import copy_store
from w2vcache.store import info, open_store, verify

# The bundled corpus's dev-clean and test-other, in tiny chunks and blocks: 16 blocks in all.
SPLITS = ["dev=dev-clean", "test=test-other"]
LAYOUT = {"chunk_frames": 64, "block_chunks": 4, "batch_seconds": 8}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A sound store, extracted once; tests damage copies of it, never it."""
    path = tmp_path_factory.mktemp("repair") / "ref.zarr"
    extract(build_corpus(splits=SPLITS), ExtractConfig(store=str(path), **LAYOUT), progress=False)
    return path


def arrays(path) -> dict:
    """Every array of every split, read with plain zarr."""
    root = zarr.open_group(str(path), mode="r")
    return {f"{split}/{name}": array[...] for split in root.attrs["w2vcache"]["splits"]
            for name, array in root[split].arrays()}


def assert_same_store(got, want):
    x, y = arrays(got), arrays(want)
    assert x.keys() == y.keys()
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def block_chunks(path, split, b, layer):
    """The chunk files of block b of one layer."""
    store = open_store(path)
    block, chunk = store._block(split, b), store.chunk_frames(split)
    first, last = block.frame_offset // chunk, -(-(block.frame_offset + block.n_frames) // chunk)
    return [Path(path) / split / layer / "c" / str(c) / "0" for c in range(first, last)]


def flip_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def damage(path, split, b, layer="layer02"):
    """Corrupt the last chunk of block b of one layer."""
    flip_byte(block_chunks(path, split, b, layer)[-1])


def files(path):
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def layer_files(path):
    """Every chunk file of the split arrays (no metadata, no run records)."""
    return {k: v for k, v in files(path).items() if "/c/" in k and not k.startswith("_runs")}


# ----------------------------------------------------------------------------------------------


def test_repair_rewrites_exactly_the_damaged_blocks(reference, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    # what a repair of blocks dev 1, test 2 and test 4 rewrites: their chunks and done markers
    damaged = {str(f.relative_to(path)) for split, b in (("dev", 1), ("test", 2), ("test", 4))
               for layer in open_store(path).layers for f in block_chunks(path, split, b, layer)}
    damaged |= {"dev/done/c/1", "test/done/c/2", "test/done/c/4"}
    damage(path, "dev", 1)
    damage(path, "test", 2, "layer04")
    flip_byte(path / "test" / "done" / "c" / "4")  # a corrupt done marker: its block counts as damaged
    report = verify(path)
    assert report.damaged_blocks == {"dev": [1], "test": [2, 4]}
    victim = open_store(path)._block("dev", 1).ids[-1]
    with pytest.raises(W2VCacheError, match=rf"run `w2vcache verify --repair {path}`"):
        open_store(path).read("dev", "layer02", victim)

    before = layer_files(path)
    result = repair(path, RepairConfig(progress=False), report=report)
    assert result.ok, result.after.problems
    assert result.rewritten == {"dev": [1], "test": [2, 4]} and result.source == "the audio (builtin:tiny)"
    after = layer_files(path)
    assert {k for k in before if after[k] != before[k]} == damaged  # the rest was not even rewritten
    assert_same_store(path, reference)
    assert open_store(path).verification is None
    assert [name.split("-")[0] for name in sorted(zarr.open_group(str(path / "_runs"), mode="r").group_keys())] \
        == ["extract", "repair"]
    assert not (path / ".locks").exists()


def test_info_shows_a_failed_verification_until_it_is_repaired(reference, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    sound = files(path)
    ok = run_cli("verify", "--repair", path)  # nothing to repair: nothing written
    assert ok.exit_code == 0 and "all intact and complete" in ok.output and "rewritten" not in ok.output
    assert files(path) == sound

    damage(path, "dev", 2)
    failed = run_cli("verify", path)
    assert failed.exit_code == 1 and failed.output.count("FAIL") == 1
    assert f"run `w2vcache verify --repair {path}` to rewrite the 1 damaged block(s)" in failed.output
    about = info(path)
    assert about["verification"]["damaged_blocks"] == {"dev": [2]}
    assert about["splits"]["dev"]["damaged_blocks"] == [2] and about["splits"]["test"]["damaged_blocks"] == []
    table = run_cli("info", path).output
    assert "last verification failed" in table and "1 damaged block(s) (dev 2)" in table
    assert "1 damaged" in next(line for line in table.splitlines() if line.startswith("dev "))
    assert json.loads(run_cli("info", path, "--json").output)["verification"]["n_problems"] == 1

    fixed = run_cli("verify", "--repair", path)
    assert fixed.exit_code == 0, fixed.output
    assert "repairing 1 block(s)" in fixed.output and "1 block(s) rewritten from the audio (builtin:tiny)" in fixed.output
    assert info(path)["verification"] is None
    assert "last verification failed" not in run_cli("info", path).output
    assert_same_store(path, reference)


def killed_repair(path):
    """`w2vcache verify --repair PATH` in a child that SIGKILLs itself right after the first
    block it rewrites is marked done: a kill at a fixed point, however fast the machine."""
    script = textwrap.dedent(f"""
        import os, signal
        from w2vcache.cli import main
        from w2vcache.store import FeatureStore
        mark_done = FeatureStore.mark_done
        def dying_mark_done(self, block):
            mark_done(self, block)
            os.kill(os.getpid(), signal.SIGKILL)
        FeatureStore.mark_done = dying_mark_done
        main(["verify", "--repair", {str(path)!r}], standalone_mode=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err


@pytest.mark.parametrize("resume_with", ["repair", "extract"])
def test_killed_repair_resumes_to_the_same_store(reference, tmp_path, resume_with):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    for split, b in (("dev", 0), ("dev", 3), ("test", 1)):
        damage(path, split, b, "layer00")
    killed_repair(path)
    store = open_store(path)
    pending = {split: [b for b in range(store.status(split).n_blocks) if not store._split_index(split).done[b]]
               for split in store.splits}
    assert pending == {"dev": [3], "test": [1]}  # block dev 0 was rewritten before the kill
    assert not store.split_attrs("dev")["complete"]
    assert info(path)["verification"]["damaged_blocks"] == {"dev": [0, 3], "test": [1]}
    report = verify(path)  # the record keeps what is still to rewrite, now pending
    assert report.damaged_blocks == {"dev": [3], "test": [1]} and report.incomplete == ["dev", "test"]
    assert info(path)["verification"]["damaged_blocks"] == {"dev": [3], "test": [1]}

    if resume_with == "repair":
        result = run_cli("verify", "--repair", path)
        assert result.exit_code == 0, result.output
        assert "repairing 2 block(s) of" in result.output and "OK" in result.output
    else:
        result = run_cli("extract", "--store", path, *[a for s in SPLITS for a in ("--split", s)],
                         "--chunk-frames", 64, "--block-chunks", 4, "--batch-seconds", 8)
        assert result.exit_code == 0 and "wrote 2 block(s)" in result.output, result.output
        assert run_cli("verify", path).exit_code == 0
    assert info(path)["verification"] is None
    assert_same_store(path, reference)
    assert not (path / ".locks").exists()


def test_a_copy_is_repaired_from_its_source(reference, tmp_path):
    source = tmp_path / "source.zarr"
    shutil.copytree(reference, source)
    path = tmp_path / "copy.zarr"
    copy_store(source, path, layers="1-2", splits=["dev"], progress=False)
    damage(path, "dev", 1, "layer01")

    moved = tmp_path / "moved.zarr"
    source.rename(moved)
    before = layer_files(path)
    result = run_cli("verify", "--repair", path)
    assert result.exit_code == 1
    error = result.output.splitlines()[-1]
    assert error.startswith(f"Error: cannot repair {path}: it is a copy of {source}, which cannot be opened")
    assert "--source" in error and "Traceback" not in result.output
    assert layer_files(path) == before and open_store(path).status("dev").complete  # nothing written

    result = run_cli("verify", "--repair", path, "--source", moved)
    assert result.exit_code == 0, result.output
    assert f"rewritten from {moved}" in result.output
    got, want = open_store(path), open_store(moved)
    for layer in ("layer01", "layer02"):
        np.testing.assert_array_equal(got.read_layer("dev", layer)[0], want.read_layer("dev", layer)[0])
    assert verify(path).ok and info(path)["verification"] is None


def test_an_int8_copy_is_repaired_from_its_float16_source(reference, tmp_path):
    """copy --dtype int8 quantises its source; its repair quantises the same source again, so the
    repaired blocks are the bytes the copy first held."""
    path = tmp_path / "int8.zarr"
    copy_store(reference, path, layers="1-2", splits=["dev"], dtype="int8", progress=False)
    before = layer_files(path)
    damage(path, "dev", 1, "layer01")
    assert verify(path).damaged_blocks == {"dev": [1]}
    result = run_cli("verify", "--repair", path)
    assert result.exit_code == 0, result.output
    assert f"rewritten from {reference}" in result.output
    assert {k: v[1] for k, v in layer_files(path).items()} == {k: v[1] for k, v in before.items()}
    assert verify(path).ok and open_store(path).dtype == "int8"


def refused_repair(path, source) -> str:
    """`verify --repair PATH --source SOURCE`, which must refuse, one line and nothing written: its error."""
    before = layer_files(path)
    result = run_cli("verify", "--repair", path, "--source", source)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert layer_files(path) == before
    return result.output.splitlines()[-1]


def test_a_float_store_is_never_rewritten_from_an_int8_copy_of_it(reference, tmp_path):
    """An int8 copy records its source's provenance (float16 features), so only the dtypes tell
    that its quantised values must not become a float16 store's."""
    plain = tmp_path / "plain.zarr"
    copy_store(reference, plain, layers="1-2", splits=["dev"], progress=False)
    small = tmp_path / "int8.zarr"
    copy_store(reference, small, layers="1-2", splits=["dev"], dtype="int8", progress=False)
    damage(plain, "dev", 1, "layer01")
    assert refused_repair(plain, small) == (
        f"Error: cannot repair {plain} from {small}: its dtype is int8; float16 features made from float16 "
        "ones are to be rewritten; nothing was written")
    assert run_cli("verify", "--repair", plain).exit_code == 0  # from its recorded source, the reference
    assert verify(plain).ok


def test_an_int8_copy_refuses_a_source_of_another_float_dtype(reference, tmp_path):
    """The int8 copy was quantised from float16 features; float32 ones (of the same model and audio,
    extracted again) would give other bytes."""
    path = tmp_path / "int8.zarr"
    copy_store(reference, path, layers="1-2", splits=["dev"], dtype="int8", progress=False)
    wide = tmp_path / "float32.zarr"
    extract(build_corpus(splits=SPLITS), ExtractConfig(store=str(wide), dtype="float32", **LAYOUT), progress=False)
    damage(path, "dev", 1, "layer01")
    assert refused_repair(path, wide) == (
        f"Error: cannot repair {path} from {wide}: it holds other features than the copy was made from "
        "(provenance created, dtype differs); nothing was written")


@pytest.fixture
def own_audio_store(tmp_path):
    """A store of six files of our own (so that one can go missing), its block 0 damaged."""
    waves = [write_wave(tmp_path / "audio" / f"a{i}.flac", seconds=0.6 + 0.2 * i, seed=i) for i in range(6)]
    manifest = tmp_path / "audio" / "m.tsv"
    manifest.write_text("".join(f"{p.name}\tWORDS {i}\n" for i, p in enumerate(waves)))
    path = tmp_path / "own.zarr"
    extract(build_corpus(splits=[f"dev={manifest}"]), ExtractConfig(store=str(path), chunk_frames=16, block_chunks=2),
            progress=False)
    assert open_store(path).status("dev").n_blocks > 1
    damage(path, "dev", 0)
    assert verify(path).damaged_blocks == {"dev": [0]}
    return path


def set_model(path, **changes):
    root = zarr.open_group(str(path), mode="r+")
    meta = root.attrs["w2vcache"]
    meta["provenance"]["model"].update(changes)
    root.attrs["w2vcache"] = meta


@pytest.mark.parametrize("missing", ["audio", "model", "other weights"])
def test_missing_audio_or_model_is_a_one_line_error_and_writes_nothing(own_audio_store, missing):
    path = own_audio_store
    gone = open_store(path)._block("dev", 0).paths[0]
    if missing == "audio":
        os.remove(gone)
        expected = f"{gone}: file not found"
    elif missing == "model":
        set_model(path, name=str(path.parent / "no-such-model"))
        expected = "its model"
    else:
        set_model(path, weight_hash="0" * 64)
        expected = "is not the one its features were extracted with (weight_hash: store has '000"
    before = layer_files(path)
    result = run_cli("verify", "--repair", path)
    assert result.exit_code == 1, result.output
    error = result.output.splitlines()[-1]
    assert error.startswith(f"Error: cannot repair {path}") and expected in error, error
    assert "Traceback" not in result.output
    assert layer_files(path) == before  # the damaged block stays marked done, nothing rewritten
    assert open_store(path).status("dev").complete and info(path)["verification"]["damaged_blocks"] == {"dev": [0]}
    assert not (path / ".locks").exists()


def test_damage_outside_any_block_is_named_not_rewritten(reference, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    flip_byte(path / "dev" / "lengths" / "c" / "0")  # the index of every block: no block to rewrite
    before = layer_files(path)
    result = run_cli("verify", "--repair", path)
    assert result.exit_code == 1 and "FAIL dev/lengths chunk 0: checksum mismatch" in result.output
    assert result.output.splitlines()[-1].endswith("none is in a block that --repair can rewrite")
    assert "repairing" not in result.output and layer_files(path) == before
    with pytest.raises(W2VCacheError, match="the store's index is damaged"):
        open_store(path).utterances("dev")


def test_a_damaged_store_this_process_cannot_write_is_sent_to_a_writable_copy(reference, tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    damage(path, "dev", 2)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(path) and mode == os.W_OK
                        else real_access(p, mode))  # a read-only mount, say
    failed = run_cli("verify", path)
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    assert f"; {path} cannot be written here (a read-only file system, or no permission): copy the store's folder " \
           "as it is (cp -r) where you may write and run `w2vcache verify --repair` on the copy" in failed.output
    monkeypatch.undo()
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    assert run_cli("verify", "--repair", copy).exit_code == 0
    assert_same_store(copy, reference)
