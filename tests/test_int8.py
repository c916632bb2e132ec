"""int8 stores: the quantisation bound, the size, extraction and its resume, copy --dtype int8,
probe, export, verify, plain-zarr decoding, and the refusal by readers of format version 1."""

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import w2vcache.store.featurestore
from w2vcache.cli import main
from w2vcache.errors import W2VCacheError
from w2vcache.probe import ProbeConfig, probe
from w2vcache.share import copy_store, export_hdf5
from w2vcache.store import FeatureStore, info, open_store, verify
from w2vcache.store.verification import _bytes_on_disk
from w2vcache.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SPLITS = ["--split", "dev=dev-clean", "--split", "test=test-other"]
LAYOUT = ["--chunk-frames", "64", "--block-chunks", "4", "--batch-seconds", "8"]
PROVENANCE = {"model": "m", "frame_rate": 50}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def arrays(path) -> dict:
    """Every array of every split, read with plain zarr."""
    root = zarr.open_group(str(path), mode="r")
    return {f"{split}/{name}": array[...] for split in root.attrs["w2vcache"]["splits"]
            for name, array in root[split].arrays()}


def features(rng, frames, dim):
    """W2V-like: per-channel spread, one channel far larger than the rest, one always zero."""
    x = rng.standard_normal((frames, dim)).astype(np.float32) * np.exp(rng.standard_normal(dim) / 2)
    x[:, 3] *= 40
    x[:, 5] = 0
    return x


def write_store(path, lengths, dim, dtype="int8", seed=0, **layout):
    rng = np.random.default_rng(seed)
    plan = {"dev": [(f"u{i:03d}", "A B", f"/a/{i}.flac", n) for i, n in enumerate(lengths)]}
    x = {f"u{i:03d}": features(rng, n, dim) for i, n in enumerate(lengths)}
    with FeatureStore.create(path, PROVENANCE, plan, {"layer00": dim, "layer01": dim}, dtype, **layout) as store:
        for block in store.pending_blocks("dev"):
            feats = {layer: np.concatenate([x[i] for i in block.ids]) * (k + 1)
                     for k, layer in enumerate(store.layers)}
            if block.index % 2:  # both writers: by utterance and by layer
                store.write_block(block, feats)
            else:
                for layer, f in feats.items():
                    store.write_layer(block, layer, f)
            store.mark_done(block)
    return x


def test_decoded_features_are_within_half_a_step_of_the_written_ones(tmp_path):
    path = tmp_path / "q.zarr"
    x = write_store(path, [int(n) for n in np.random.default_rng(1).integers(5, 60, 30)], 16,
                    chunk_frames=32, block_chunks=2)
    store = open_store(path)
    assert store.dtype == "int8" and store.feature_dtype == "float32"
    root = zarr.open_group(str(path), mode="r")
    q, scale = root["dev/layer01"][...], root["dev/layer01.scale"][...]
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (len(q) // 32, 16)
    assert np.abs(q).max() == 127 and (scale[:, 5] == 0).all()
    for u in store.utterances("dev"):
        i = store.index_of("dev", u.id)
        rows = slice(int(store._split_index("dev").offsets[i]), int(store._split_index("dev").offsets[i]) + u.length)
        step = np.repeat(scale, 32, axis=0)[rows]
        want = x[u.id] * 2
        got = store.read("dev", "layer01", u.id)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, q[rows].astype(np.float32) * step)  # the decoding, exactly
        assert (np.abs(got - want) <= step / 2 * (1 + 1e-6)).all()  # the quantisation bound
        assert (got[:, 5] == 0).all()
    frames, offsets = store.read_layer("dev", "layer00")
    want = np.concatenate([x[u.id] for u in store.utterances("dev")])
    assert frames.dtype == np.float32
    assert np.linalg.norm(frames - want) / np.linalg.norm(want) < 0.01
    assert verify(path).ok


def test_a_768_dim_layer_takes_at_most_800_bytes_per_frame(tmp_path):
    """On disk, values, scales and checksums of a dim-768 layer, per frame, against float16's 1536."""
    lengths = [2730] * 4  # whole chunks of the default layout: no padding in the figure
    sizes = {}
    for dtype in ("int8", "float16"):
        write_store(tmp_path / f"{dtype}.zarr", lengths, 768, dtype)
        store = open_store(tmp_path / f"{dtype}.zarr")
        assert store.chunk_frames("dev") == 2730  # int8 keeps float16's layout
        sizes[dtype] = {k: v / sum(lengths) for k, v in _bytes_on_disk(store)["layers"].items()}
    for layer in ("layer00", "layer01"):
        assert sizes["int8"][layer] <= 800 and sizes["float16"][layer] >= 1536
    assert info(tmp_path / "int8.zarr")["dtype"] == "int8"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A float16 and an int8 extraction of the same audio by uninterrupted runs."""
    out = {}
    for dtype in ("float16", "int8"):
        path = tmp_path_factory.mktemp(dtype) / f"{dtype}.zarr"
        result = cli("extract", "--store", path, *SPLITS, *LAYOUT, "--dtype", dtype)
        assert result.exit_code == 0, result.output
        out[dtype] = path
    return out


def test_extraction_is_the_quantised_float16_store(stores):
    f16, i8 = open_store(stores["float16"]), open_store(stores["int8"])
    assert i8.dtype == "int8" and i8._meta["format_version"] == 2 and f16._meta["format_version"] == 1
    for split in ("dev", "test"):
        for layer in i8.layers:
            x, _ = f16.read_layer(split, layer)
            y, _ = i8.read_layer(split, layer)
            x = x.astype(np.float32)
            assert np.linalg.norm(x - y) / np.linalg.norm(x) < 0.01, layer
    assert verify(stores["int8"]).ok


def test_copy_to_int8_equals_extracting_int8(stores, tmp_path):
    path = tmp_path / "copy.zarr"
    result = cli("copy", stores["float16"], path, "--dtype", "int8")
    assert result.exit_code == 0, result.output
    x, y = arrays(path), arrays(stores["int8"])
    assert x.keys() == y.keys()
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    copy = open_store(path)
    assert copy.dtype == "int8"
    assert copy.provenance["subset_of"]["converted"] == {"from": "float16", "to": "int8"}
    assert verify(path).ok
    # A copy of an int8 store keeps its values and scales as they are.
    again = tmp_path / "again.zarr"
    copy_store(path, again, layers="1-2", progress=False)
    for key, value in arrays(again).items():
        np.testing.assert_array_equal(value, x[key], err_msg=key)


def test_copy_refuses_other_conversions(stores, tmp_path):
    with pytest.raises(W2VCacheError, match="the source is int8"):
        copy_store(stores["int8"], tmp_path / "a.zarr", dtype="float16", progress=False)
    with pytest.raises(W2VCacheError, match="keeps its source's dtype"):
        copy_store(stores["float16"], tmp_path / "b.zarr", dtype="float32", progress=False)


def test_resume_after_sigkill_equals_uninterrupted(stores, tmp_path):
    path = tmp_path / "killed.zarr"
    script = textwrap.dedent(f"""
        import os, signal
        from w2vcache.cli import main
        from w2vcache.store import FeatureStore
        mark_done, calls = FeatureStore.mark_done, []
        def dying_mark_done(self, block, failed=()):
            mark_done(self, block, failed)
            calls.append(block)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        FeatureStore.mark_done = dying_mark_done
        main({["extract", "--store", str(path), *SPLITS, *LAYOUT, "--dtype", "int8"]!r}, standalone_mode=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sum(open_store(path).status(s).blocks_done for s in ("dev", "test")) == 3
    result = cli("extract", "--store", path, *SPLITS, *LAYOUT, "--dtype", "int8")
    assert result.exit_code == 0, result.output
    x, y = arrays(path), arrays(stores["int8"])
    assert x.keys() == y.keys()
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_probe_trains_on_an_int8_store(stores, tmp_path):
    result = probe(str(stores["int8"]), "2", "0", tmp_path / "runs",
                   ProbeConfig(hidden=8, lstm_layers=1, batch_frames=1500),
                   TrainConfig(epochs=1, dev_split="test", test_splits=()), train_split="dev", progress=False)
    run = tmp_path / "runs" / "probe" / "layer02" / "seed0"
    assert json.loads((run / "result.json").read_text())["status"] == "finished", result
    assert json.loads((run / "config.json").read_text())["data"]["dtype"] == "int8"


def test_similarity_reads_int8_as_the_features_it_encodes(stores):
    """Layer by layer, an int8 store is the float16 one up to its rounding: CKA of each layer with
    its float16 self is 1 to within that rounding, and the whole matrix matches float16's own."""
    from w2vcache.similarity import similarity

    across = similarity(stores["int8"], stores["float16"], split="dev", progress=False)
    assert min(across.diagonal) > 0.999
    own = similarity(stores["float16"], split="dev", progress=False)
    np.testing.assert_allclose(across.matrix, own.matrix, atol=2e-3)


def test_export_decodes_to_float16(stores, tmp_path):
    out = tmp_path / "x.h5"
    export_hdf5(stores["int8"], out, layers="3", progress=False)
    store = open_store(stores["int8"])
    frames, _ = store.read_layer("dev", "layer03")
    with h5py.File(out, "r") as f:
        meta = json.loads(f.attrs["w2vcache"])
        assert meta["dtype"] == "float16"
        assert meta["provenance"]["exported_from"]["decoded"] == {"from": "int8", "to": "float16"}
        np.testing.assert_array_equal(f["dev/layer03"][...], frames.astype(np.float16))


def test_export_refuses_values_float16_cannot_hold(tmp_path):
    """An int8 store of float32 features may hold values past float16's 65504: the export names the
    split and layer instead of writing infinities, and leaves no file behind."""
    path = tmp_path / "big.zarr"
    write_store(path, [40, 30], 8)
    root = zarr.open_group(str(path), mode="r+")
    root["dev/layer01.scale"][...] = root["dev/layer01.scale"][...] * 1e4  # values up to about 1e6
    out = tmp_path / "big.h5"
    result = cli("export", path, out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines()[-1].startswith(f"Error: cannot export {path}: dev layer01 holds values beyond "
                                                     "float16's range")
    assert not out.exists()


def test_verify_names_a_corrupt_scale_chunk(stores, tmp_path):
    path = tmp_path / "bad.zarr"
    copy_store(stores["int8"], path, layers="1", splits="dev", progress=False)
    chunk = path / "dev" / "layer01.scale" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify(path)
    assert not report.ok and any("dev/layer01.scale chunk 2: checksum" in p for p in report.problems)
    assert report.damaged_blocks == {"dev": [0]}
    with pytest.raises(W2VCacheError, match="layer01.scale chunk 2"):
        open_store(path).read_layer("dev", "layer01")


def test_plain_zarr_snippet_decodes_an_int8_store(stores, tmp_path):
    """The int8 lines in docs/STORE.md, run without w2vcache, give what `read` gives."""
    doc = (REPO / "docs" / "STORE.md").read_text()
    snippet = re.search(r"### Reading an int8 store with plain zarr.*?```python\n(.*?)```", doc, re.S).group(1)
    store = open_store(stores["int8"])
    utt = store.utterances("dev")[7].id
    snippet = (snippet.replace('"features.zarr"', repr(str(stores["int8"])))
               .replace("layer08", "layer02").replace('"1272-128104-0000"', repr(utt)))
    out = tmp_path / "x.npy"
    script = snippet + f"\nimport sys\nassert 'w2vcache' not in sys.modules\nnp.save({str(out)!r}, x)\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out), store.read("dev", "layer02", utt))


def test_a_reader_of_format_1_refuses_an_int8_store(stores, monkeypatch):
    """Readers before int8 know format 1 only: they refuse the store instead of reading integers."""
    monkeypatch.setattr(w2vcache.store.featurestore, "FORMAT_VERSION", 1)
    open_store(stores["float16"]).close()
    with pytest.raises(W2VCacheError, match="format version 2; .* up to 1: upgrade w2vcache"):
        open_store(stores["int8"])


def test_a_channel_of_negative_zeros_scales_by_positive_zero():
    from w2vcache.store.layout import quantise

    x = np.ones((8, 3), dtype=np.float16)
    x[:, 1] = -0.0
    q, scales = quantise(x, 4)
    assert (scales[:, 1] == 0).all() and not np.signbit(scales).any()
    assert (q[:, 1] == 0).all() and (q[:, 0] == 127).all()
