"""A file that passes every check before extraction but fails to decode during it (corrupt in its
middle) is skipped and recorded in the store, and the run goes on; readers leave it out."""

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import write_wave
from w2vcache.audio import AudioError, audio_info, check_complete, load_audio
from w2vcache.cli import main
from w2vcache.errors import W2VCacheError
from w2vcache.store import open_store

# Tiny chunks and blocks (several blocks, blocks of more than one utterance), and one utterance per
# forward pass, so that features never depend on a neighbour in the batch.
LAYOUT = ["--chunk-frames", "16", "--block-chunks", "3", "--batch-seconds", "0.02"]
BAD = {"train": "train-bad", "dev": "dev-bad"}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def corrupt_middle(path):
    """Overwrite 2000 bytes from a third of the file: its header and its end still read."""
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start: start + 2000] = b"\xaa" * 2000
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two splits of good files, each with one corrupt-middle file (longer than some good ones, so
    its block holds good utterances too); manifests with and without the bad files."""
    root = tmp_path_factory.mktemp("audio")
    manifests = {}
    for k, split in enumerate(("train", "dev")):
        good = [write_wave(root / f"{split}-{i}.flac", seconds=0.5 + 0.15 * i, seed=10 * k + i) for i in range(7)]
        bad = corrupt_middle(write_wave(root / f"{BAD[split]}.flac", seconds=1.0, seed=10 * k + 9))
        lines = [f"{p.name}\tWORD {'ONE TWO THREE FOUR'[: 3 + i]}\n" for i, p in enumerate(good)]
        for name, extra in (("all", [f"{bad.name}\tBAD WORDS\n"]), ("good", [])):
            manifest = root / f"{split}-{name}.tsv"
            manifest.write_text("".join(lines[:3] + extra + lines[3:]))
            manifests[split, name] = manifest
    return root, manifests


def splits(manifests, which):
    return ["--split", f"train={manifests['train', which]}", "--split", f"dev={manifests['dev', which]}"]


@pytest.fixture(scope="module")
def stores(corpus, tmp_path_factory):
    """(with the bad files, uninterrupted; without them), and the extract command's output."""
    _, manifests = corpus
    out = tmp_path_factory.mktemp("stores")
    made = {}
    for which in ("all", "good"):
        result = run_cli("extract", "--store", out / f"{which}.zarr", *splits(manifests, which), *LAYOUT)
        assert result.exit_code == 0, result.output
        made[which] = (out / f"{which}.zarr", result.output)
    return made


def contents(path) -> dict:
    """Every array of every split (plain zarr) and every failure record on disk."""
    root = zarr.open_group(str(path), mode="r")
    out = {}
    for split in root.attrs["w2vcache"]["splits"]:
        for name, array in root[split].arrays():
            out[f"{split}/{name}"] = array[...]
        for record in sorted((path / split / "failed").glob("*/zarr.json")):
            out[str(record.relative_to(path))] = json.loads(record.read_text())
    return out


def test_the_corrupt_file_passes_the_checks_and_fails_to_decode(corpus):
    root, _ = corpus
    path = root / "train-bad.flac"
    check_complete(path, audio_info(path))
    with pytest.raises(AudioError, match="cannot decode the audio"):
        load_audio(path)


def test_extraction_runs_to_the_end_and_records_the_failure(stores):
    path, output = stores["all"]
    assert "skipped 1 utterance(s) of split train" in output and "skipped 1 utterance(s) of split dev" in output
    assert "train-bad: failed to decode during extraction: cannot decode the audio" in output
    store = open_store(path)
    for split, bad in BAD.items():
        assert store.status(split).complete
        failed = store.failed(split)
        assert [(u["id"], u["path"].rsplit("/", 1)[-1]) for u in failed] == [(bad, f"{bad}.flac")]
        assert failed[0]["reason"].startswith("cannot decode the audio")
        ids = [u.id for u in store.utterances(split)]  # every row laid out, the failed one included
        assert bad in ids and [ids[i] for i in np.flatnonzero(~store.usable(split))] == [bad]
        with pytest.raises(W2VCacheError, match="failed to decode during extraction"):
            store.read(split, "layer02", bad)
        done = zarr.open_group(str(path), mode="r")[split]["done"][:]
        assert sorted(set(done.tolist())) == [1, 2] and (done == 2).sum() == 1


def test_other_utterances_equal_a_store_without_the_bad_files(stores):
    with_bad, without = open_store(stores["all"][0]), open_store(stores["good"][0])
    for split, bad in BAD.items():
        good = [u.id for u in without.utterances(split)]
        assert sorted(good) == sorted(u.id for u in with_bad.utterances(split) if u.id != bad)
        for layer in with_bad.layers:
            for uid in good:
                np.testing.assert_array_equal(with_bad.read(split, layer, uid), without.read(split, layer, uid),
                                              err_msg=f"{split} {uid} {layer}")


def test_info_lists_it_and_verify_passes(stores):
    path = stores["all"][0]
    table = run_cli("info", path)
    assert table.exit_code == 0, table.output
    assert "skipped    train/train-bad:" in table.output and "failed to decode during extraction" in table.output
    about = json.loads(run_cli("info", path, "--json").output)
    assert [u["id"] for u in about["splits"]["dev"]["failed"]] == ["dev-bad"]
    assert [u["id"] for u in about["splits"]["dev"]["skipped"]] == ["dev-bad"]
    verified = run_cli("verify", path)
    assert verified.exit_code == 0 and "OK" in verified.output, verified.output


def test_verify_wants_the_record_of_a_block_marked_with_failures(stores, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(stores["all"][0], copy)
    shutil.rmtree(next((copy / "dev" / "failed").glob("[0-9]*")))
    result = run_cli("verify", copy)
    assert result.exit_code == 1 and "dev/failed/" in result.output and "record is missing" in result.output


def test_a_probe_leaves_the_failed_utterances_out(stores, tmp_path):
    result = run_cli("probe", "--store", stores["all"][0], "--layer", "2", "--epochs", "1", "--hidden", "16",
                     "--lstm-layers", "1", "--threads", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "probe" / "layer02" / "seed0" / "result.json").read_text())
    assert res["dev"]["utterances"] == 7


def test_resumed_and_repeated_extraction_agree_with_an_uninterrupted_one(corpus, stores, tmp_path):
    """Killed after the first block, then after the block with a failure: finishing it gives the
    uninterrupted store, failure records included; a repeated run writes nothing and keeps them."""
    _, manifests = corpus
    path = tmp_path / "killed.zarr"
    args = ["extract", "--store", str(path), *splits(manifests, "all"), *LAYOUT]
    script = textwrap.dedent(f"""
        import os, signal, sys
        from w2vcache.cli import main
        from w2vcache.store import FeatureStore
        mark_done, calls = FeatureStore.mark_done, []
        def dying_mark_done(self, block, failed=()):
            mark_done(self, block, failed)
            calls.append(block)
            if len(calls) == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)
        FeatureStore.mark_done = dying_mark_done
        main({args!r}, standalone_mode=False)
    """)
    reference = open_store(stores["all"][0])
    train_bad = reference._split_index("train").block_of[reference.index_of("train", BAD["train"])]
    assert train_bad > 0  # so that the first kill comes before the failure
    done = 0
    for target in (1, int(train_bad) + 1):
        proc = subprocess.run([sys.executable, "-c", script, str(target - done)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        done = target
        assert open_store(path).status("train").blocks_done == done
    assert [u["id"] for u in open_store(path).failed("train")] == [BAD["train"]]
    resumed = run_cli(*args)
    assert resumed.exit_code == 0, resumed.output
    assert "skipped 1 utterance(s) of split train" in resumed.output  # found by the killed run
    expected, got = contents(stores["all"][0]), contents(path)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    again = run_cli(*args)
    assert again.exit_code == 0 and "nothing to extract: every block is already in the store" in again.output, again.output
    assert "skipped 1 utterance(s) of split dev" in again.output
    assert contents(path).keys() == expected.keys() and open_store(path).failed("dev") == reference.failed("dev")


def test_copy_and_export_keep_the_failure_record(stores, tmp_path):
    import h5py

    path = stores["all"][0]
    copy = tmp_path / "copy.zarr"
    assert run_cli("copy", path, copy).exit_code == 0
    source, copied = open_store(path), open_store(copy)
    for split in BAD:
        assert copied.failed(split) == source.failed(split)
        np.testing.assert_array_equal(copied.usable(split), source.usable(split))
    h5 = tmp_path / "f.h5"
    result = run_cli("export", path, h5)
    assert result.exit_code == 0, result.output
    with h5py.File(h5, "r") as f:
        for split, bad in BAD.items():
            ids = f[split]["ids"].asstr()[:].tolist()
            assert [ids[i] for i in np.flatnonzero(f[split]["usable"][:] == 0)] == [bad]
            assert [u["id"] for u in json.loads(f[split].attrs["failed"])] == [bad]


def test_finetune_checks_every_file_first_and_says_which_one_fails_to_decode(corpus, tmp_path):
    """Fine-tuning refuses files of the wrong format in any split it uses before any run starts,
    all of them named (--skip-bad leaves them out); a file corrupt in its middle, found by a
    DataLoader worker, stops the run with its name, and result.json says the run failed."""
    root, manifests = corpus
    odd = {"8k": write_wave(root / "odd-8k.wav", seconds=0.6, rate=8000),
           "stereo": write_wave(root / "odd-stereo.flac", seconds=0.6, channels=2)}
    test = root / "test-odd.tsv"
    tested = [write_wave(root / f"test-{i}.flac", seconds=0.7, seed=30 + i).name for i in range(3)]
    test.write_text("".join(f"{name}\tWORD\n" for name in tested) + f"{odd['stereo'].name}\tSTEREO\n")
    train = root / "train-odd.tsv"
    train.write_text(manifests["train", "good"].read_text() + f"{odd['8k'].name}\tEIGHT K\n")
    args = ["finetune", "--split", f"train={train}", "--split", f"dev={manifests['dev', 'good']}",
            "--split", f"test-clean={test}", "--epochs", "1", "--batch-seconds", "2", "--num-workers", "2"]
    refused = run_cli(*args, "--out", tmp_path / "odd")
    assert refused.exit_code == 1
    assert f"{odd['8k']}: sample rate is 8000 Hz" in refused.output and f"{odd['stereo']}: has 2 channels" in refused.output
    assert "pass --skip-bad to leave them out of the fine-tuning" in refused.output
    assert not (tmp_path / "odd").exists()
    skipped = run_cli(*args, "--skip-bad", "--out", tmp_path / "odd")
    assert skipped.exit_code == 0, skipped.output
    config = json.loads((tmp_path / "odd/finetune/reinit-none/seed0/config.json").read_text())
    assert config["data"]["skipped"] == {"train": ["odd-8k"], "test-clean": ["odd-stereo"]}

    failed = run_cli("finetune", *splits(manifests, "all"), "--epochs", "1", "--batch-seconds", "2",
                     "--num-workers", "2", "--out", tmp_path / "corrupt")
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    assert f"{root / 'train-bad.flac'}: cannot decode the audio" in failed.output
    result = json.loads((tmp_path / "corrupt/finetune/reinit-none/seed0/result.json").read_text())
    assert result["status"] == "failed" and "train-bad.flac: cannot decode the audio" in result["error"]
    # --skip-bad, as the error suggests, decodes every file first and leaves the corrupt ones out.
    skipped = run_cli("finetune", *splits(manifests, "all"), "--epochs", "1", "--batch-seconds", "2",
                      "--num-workers", "2", "--skip-bad", "--out", tmp_path / "skipped")
    assert skipped.exit_code == 0, skipped.output
    config = json.loads((tmp_path / "skipped/finetune/reinit-none/seed0/config.json").read_text())
    assert config["data"]["skipped"] == {"train": ["train-bad"], "dev": ["dev-bad"]}
