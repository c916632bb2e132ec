"""Sharing a store: subset copies (resumable), packs, HDF5 exports, and reading over http and zip."""

import functools
import importlib.util
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.request
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from w2vcache.cli import main
from w2vcache.corpus import build_corpus
from w2vcache.errors import W2VCacheError
from w2vcache.extract import ExtractConfig, extract
from w2vcache.share import copy_store, export_hdf5, pack_store
from w2vcache.share_cli import copy_command, export_command, pack_command
from w2vcache.store import FORMAT_VERSION, info, open_store, verify

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["layer00", "layer01", "layer02", "layer03", "layer04"]  # the builtin tiny model's


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A complete store of the bundled corpus: 34 utterances, two splits, 16 small blocks."""
    path = tmp_path_factory.mktemp("share") / "features.zarr"
    corpus = build_corpus(splits=["dev=dev-clean", "test=test-other"])
    extract(corpus, ExtractConfig(store=str(path), chunk_frames=64, block_chunks=4), progress=False)
    return path


@pytest.fixture(scope="module")
def pack(source):
    path = source.parent / "features.zip"
    pack_store(source, path, progress=False)
    return path


class QuietHandler(SimpleHTTPRequestHandler):
    """Python's static file server, which answers a range request with the whole file."""

    def log_message(self, *args):
        pass


class RangeHandler(QuietHandler):
    """Python's static file server, answering `Range: bytes=a-b` as object stores do."""

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not match or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 makes concurrent readers wait for SYN retries
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A reader sent the whole pack where it asked for a part of it hangs up mid-file.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve(directory, handler):
    """http://127.0.0.1:PORT serving directory read-only (GET/HEAD) until the generator is closed."""
    server = Server(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def http_base(source, pack):
    """The directory of the store and its pack, on a server that answers range requests."""
    yield from serve(source.parent, RangeHandler)


@pytest.fixture(scope="module")
def plain_http_base(source, pack):
    """The same directory on a server that ignores range requests."""
    yield from serve(source.parent, QuietHandler)


def snapshot(path):
    """Every file and directory under path (or the file itself) with its bytes and mtime."""
    path = Path(path)
    if path.is_file():
        return {"": (path.stat().st_mtime_ns, path.read_bytes())}
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            out[str(p.relative_to(path))] = (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
    return out


def assert_same_features(got, want, splits, layers, compare=None):
    """Every kept utterance: id, text, length and features of every kept layer (or of `compare`)."""
    got, want = open_store(got), open_store(want)
    assert got.splits == splits and list(got.layers) == layers
    layers = compare or layers
    for split in splits:
        assert got.utterances(split) == want.utterances(split)
        for layer in layers:
            frames, offsets = got.read_layer(split, layer)
            want_frames, want_offsets = want.read_layer(split, layer)
            np.testing.assert_array_equal(offsets, want_offsets)
            np.testing.assert_array_equal(frames, want_frames, err_msg=f"{split}/{layer}")
        ids = [u.id for u in want.utterances(split)]
        picked = [ids[-1], ids[0], ids[len(ids) // 2]]
        for x, y in zip(got.read_batch(split, layers[-1], picked), want.read_batch(split, layers[-1], picked)):
            np.testing.assert_array_equal(x, y)


def make_incomplete(source, path):
    """A copy of the store whose split "test" has block 2 not done (its done marker gone)."""
    shutil.copytree(source, path)
    (path / "test" / "done" / "c" / "2").unlink()
    return path


def doc_snippet(heading):
    doc = (REPO / "docs" / "STORE.md").read_text()
    return re.search(rf"{re.escape(heading)}.*?```python\n(.*?)```", doc, re.S).group(1)


def run_without_w2vcache(snippet, replacements, out, cwd):
    """Run a docs snippet in a fresh Python that never imports w2vcache; it saves x to out."""
    for old, new in replacements.items():
        assert old in snippet, old
        snippet = snippet.replace(old, new)
    script = snippet + f"\nimport sys\nassert 'w2vcache' not in sys.modules\nnp.save({str(out)!r}, x)\n"
    proc = subprocess.run([sys.executable, "-c", "import numpy as np\n" + script],
                          capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return np.load(out)


# -- copy ---------------------------------------------------------------------------------------


def test_copy_of_a_subset_equals_the_source_on_what_it_kept(source, tmp_path):
    dst = tmp_path / "subset.zarr"
    result = copy_store(source, dst, layers="1-2", splits=["dev"], progress=False)
    assert (result.layers, result.splits) == (["layer01", "layer02"], ["dev"])
    assert result.blocks_already_done == 0 and result.blocks_copied == open_store(source).status("dev").n_blocks
    assert_same_features(dst, source, ["dev"], ["layer01", "layer02"])
    report = verify(dst)
    assert report.ok, report.problems

    copy, src = open_store(dst), open_store(source)
    subset = copy.provenance["subset_of"]
    assert subset["source"] == str(source) and subset["copied"]
    assert (subset["source_layers"], subset["source_splits"]) == (LAYERS, ["dev", "test"])
    assert (subset["left_out_layers"], subset["left_out_splits"]) == (["layer00", "layer03", "layer04"], ["test"])
    assert {k: v for k, v in copy.provenance.items() if k != "subset_of"} == src.provenance
    assert copy.split_attrs("dev") == src.split_attrs("dev")  # source, skipped, hours, complete, ...
    runs = sorted(zarr.open_group(str(dst / "_runs"), mode="r").group_keys())
    assert [r.split("-")[0] for r in runs] == ["copy", "extract"]  # provenance travels, and the copy adds its own
    assert not (dst / ".locks").exists()

    # A copy of that copy, killed after its last block but before its record: the run that finds
    # nothing left to copy still records it (the copy record it holds is its source's).
    again = tmp_path / "again.zarr"
    copy_store(dst, again, progress=False)
    own = [r for r in (again / "_runs").glob("copy-*") if json.loads((r / "zarr.json").read_text())
           ["attributes"]["copy"]["destination"] == str(again)]
    assert len(own) == 1
    shutil.rmtree(own[0])
    assert copy_store(dst, again, progress=False).blocks_copied == 0
    assert len(list((again / "_runs").glob("copy-*"))) == 2


def test_killed_copy_resumes_without_redoing_finished_blocks(source, tmp_path):
    """SIGKILL the copy after 3 blocks are done and 2 layers of the 4th written; re-running it
    finishes the copy, leaves the finished blocks' files untouched, and the result verifies."""
    dst = tmp_path / "killed.zarr"
    script = textwrap.dedent(f"""
        import os, signal
        from w2vcache.share import copy_store
        from w2vcache.store import FeatureStore
        write_layer, calls = FeatureStore.write_layer, []
        def dying_write_layer(self, *args):
            write_layer(self, *args)
            calls.append(1)
            if len(calls) == {3 * len(LAYERS) + 2}:
                os.kill(os.getpid(), signal.SIGKILL)
        FeatureStore.write_layer = dying_write_layer
        copy_store({str(source)!r}, {str(dst)!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    assert json.loads((dst / ".locks" / "all.lock").read_text())["pid"] == proc.pid
    partial = open_store(dst)
    assert partial.status("dev").blocks_done == 3
    with pytest.raises(W2VCacheError, match=f"re-running the copy from {source} resumes it"):
        partial.read_layer("dev", LAYERS[0])  # what finishes it is the copy, not an extraction
    done_chunks = {p: (p.stat().st_mtime_ns, p.read_bytes())
                   for b in range(3) for layer in LAYERS
                   for p in _block_chunk_files(dst, partial, "dev", b, layer)}
    assert done_chunks

    result = copy_store(source, dst, progress=False)  # the same copy again
    total = sum(open_store(source).status(s).n_blocks for s in ("dev", "test"))
    assert (result.blocks_already_done, result.blocks_copied) == (3, total - 3)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done_chunks} == done_chunks
    assert verify(dst).ok
    assert_same_features(dst, source, ["dev", "test"], LAYERS)
    assert not (dst / ".locks").exists()


def _block_chunk_files(path, store, split, b, layer):
    block = store._block(split, b)
    chunk = store.chunk_frames(split)
    first, last = block.frame_offset // chunk, -(-(block.frame_offset + block.n_frames) // chunk)
    return [path / split / layer / "c" / str(c) / "0" for c in range(first, last)]


def test_a_different_copy_onto_an_existing_copy_says_what_differs(source, tmp_path):
    dst = tmp_path / "c.zarr"
    copy_store(source, dst, layers="0", splits="test", progress=False)
    differs = r"layers: store has \['layer00'\], asked for \['layer00', 'layer01'\]"  # once: not again as provenance
    with pytest.raises(W2VCacheError, match=rf"already exists with other settings: {differs}; copy to another"):
        copy_store(source, dst, layers="0-1", splits="test", progress=False)


@pytest.mark.parametrize("share", ["copy", "pack", "export"])
def test_incomplete_source_split_is_refused(source, tmp_path, share):
    partial = make_incomplete(source, tmp_path / "partial.zarr")
    out = tmp_path / {"copy": "out.zarr", "pack": "out.zip", "export": "out.h5"}[share]
    do = {"copy": copy_store, "pack": pack_store, "export": export_hdf5}[share]
    with pytest.raises(W2VCacheError) as err:
        do(partial, out, progress=False)
    message = str(err.value)
    assert f"split test of store {partial} is incomplete: 1 of" in message
    assert "re-running the same extract command resumes it" in message and "split test out" in message
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    if share != "pack":  # leaving the incomplete split out works
        do(partial, out, splits="dev", progress=False)


# -- pack ---------------------------------------------------------------------------------------


def test_pack_is_read_in_place_by_every_reader(source, pack):
    with zipfile.ZipFile(pack) as zf:
        members = zf.infolist()
    assert all(m.compress_type == zipfile.ZIP_STORED for m in members)
    names = {m.filename for m in members}
    assert "zarr.json" in names and "dev/layer03/c/0/0" in names and not any(".locks" in n for n in names)
    assert any(n.startswith("_runs/pack-") for n in names) and any(n.startswith("_runs/extract-") for n in names)

    about, original = info(pack), info(source)
    for key in ("format_version", "layers", "dtype", "splits", "provenance"):
        assert about[key] == original[key]
    assert about["bytes"]["total"] == pack.stat().st_size
    assert about["bytes"]["layers"] == original["bytes"]["layers"]
    report = verify(pack)
    assert report.ok and report.chunks_checked == verify(source).chunks_checked
    assert_same_features(pack, source, ["dev", "test"], LAYERS)
    with pytest.raises(W2VCacheError, match="already exists"):
        pack_store(source, pack, progress=False)


@pytest.mark.parametrize("share", ["pack", "export"])
def test_killed_pack_or_export_leaves_nothing_under_the_final_name(source, tmp_path, share):
    final = tmp_path / ("s.zip" if share == "pack" else "s.h5")
    patch = ("import zipfile; original = zipfile.ZipFile.writestr; target = zipfile.ZipFile; name = 'writestr'"
             if share == "pack" else
             "import h5py; original = h5py.Dataset.__setitem__; target = h5py.Dataset; name = '__setitem__'")
    call = "pack_store" if share == "pack" else "export_hdf5"
    script = textwrap.dedent(f"""
        import os, signal
        {patch}
        calls = []
        def dying(*args, **kwargs):
            original(*args, **kwargs)
            calls.append(1)
            if len(calls) == 20:
                os.kill(os.getpid(), signal.SIGKILL)
        setattr(target, name, dying)
        from w2vcache.share import {call}
        {call}({str(source)!r}, {str(final)!r}, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not final.exists()
    assert len(list(tmp_path.glob(f".{final.name}.*.partial"))) == 1
    (pack_store if share == "pack" else export_hdf5)(source, final, progress=False)
    assert final.exists() and not list(tmp_path.glob(f".{final.name}.*.partial"))  # the dead run's file is gone


def test_a_full_disk_is_one_line_and_leaves_what_can_resume(source, tmp_path, monkeypatch):
    """A disk that fills while a store is copied, or while HDF5 writes an export (which reports it
    as a RuntimeError), is one line naming it, never a traceback; the copy resumes afterwards."""
    import w2vcache.share as share_module

    real = share_module._export_split

    def full(*args, **kwargs):
        raise RuntimeError("Can't decrement id ref count (file write failed: time = Thu Nov 27, "
                           "filename = 's.h5', errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(share_module, "_export_split", full)
    result = CliRunner().invoke(export_command, [str(source), str(tmp_path / "s.h5")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "no space left on its disk" in result.output and not list(tmp_path.iterdir())
    monkeypatch.setattr(share_module, "_export_split", real)

    from w2vcache.store.featurestore import FeatureStore

    real_write, calls = FeatureStore.write_layer, []

    def disk_full(self, block, layer, frames):
        calls.append(layer)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(tmp_path / "c.zarr" / "dev" / layer / "c" / "0" / "0"))
        return real_write(self, block, layer, frames)

    monkeypatch.setattr(FeatureStore, "write_layer", disk_full)
    result = CliRunner().invoke(copy_command, [str(source), str(tmp_path / "c.zarr")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "No space left on device: " in result.output and "run the same command again" in result.output
    monkeypatch.setattr(FeatureStore, "write_layer", real_write)
    result = CliRunner().invoke(copy_command, [str(source), str(tmp_path / "c.zarr")])
    assert result.exit_code == 0, result.output
    assert verify(tmp_path / "c.zarr").ok


def test_a_full_disk_outside_chunk_writes_is_one_line(tmp_path, monkeypatch):
    """A full disk while the store is laid out (zarr's own metadata writes): one line, and what to do."""
    from w2vcache.store import featurestore

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "s.zarr" / "dev" / "zarr.json"))

    monkeypatch.setattr(featurestore.FeatureStore, "create", full)
    result = CliRunner().invoke(main, ["extract", "--store", str(tmp_path / "s.zarr"), "--split", "dev=dev-clean"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "No space left on device: " in result.output and "s.zarr/dev/zarr.json" in result.output
    assert "run the same command again" in result.output


# -- HDF5 ---------------------------------------------------------------------------------------


def test_hdf5_export_read_with_plain_h5py_equals_the_store(source, tmp_path):
    h5 = tmp_path / "features.h5"
    result = export_hdf5(source, h5, layers="0,3", splits="test", progress=False)
    assert (result.layers, result.splits, result.left_out) == (
        ["layer00", "layer03"], ["test"], {"layers": ["layer01", "layer02", "layer04"], "splits": ["dev"]})
    out = tmp_path / "h5.npz"
    reader = textwrap.dedent(f"""
        import json, sys
        import h5py, numpy as np
        with h5py.File({str(h5)!r}, "r") as f:
            meta = json.loads(f.attrs["w2vcache"])
            split = f["test"]
            arrays = {{name: split[name].asstr()[:].astype(str) for name in ("ids", "texts", "paths")}}
            arrays.update({{name: split[name][:] for name in ("lengths", "offsets", "layer00", "layer03")}})
            attrs = {{k: (v.item() if hasattr(v, "item") else v) for k, v in split.attrs.items()}}
            arrays["meta"] = np.array(json.dumps({{"meta": meta, "attrs": attrs,
                                                    "provenance": json.loads(f.attrs["provenance"]),
                                                    "chunks": split["layer03"].chunks,
                                                    "fletcher32": split["layer03"].fletcher32}}))
        assert "w2vcache" not in sys.modules
        np.savez({str(out)!r}, **arrays)
    """)
    proc = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    store = open_store(source)
    utts = store.utterances("test")
    assert got["ids"].tolist() == [u.id for u in utts] and got["texts"].tolist() == [u.text for u in utts]
    assert got["paths"].tolist() == store._split_index("test").paths
    np.testing.assert_array_equal(got["lengths"], [u.length for u in utts])
    offsets = got["offsets"]
    assert offsets[0] == 0 and (np.diff(offsets) == got["lengths"]).all()  # unpadded
    for layer in ("layer00", "layer03"):
        assert got[layer].dtype == np.float16 and len(got[layer]) == offsets[-1]
        for i, x in enumerate(store.read_batch("test", layer, range(len(utts)))):
            np.testing.assert_array_equal(got[layer][offsets[i]: offsets[i + 1]], x)
    described = json.loads(str(got["meta"]))
    meta, attrs = described["meta"], described["attrs"]
    assert meta["layers"] == {"layer00": 64, "layer03": 64} and meta["splits"] == ["test"]
    assert meta["provenance"] == described["provenance"]
    assert described["provenance"]["model"] == store.provenance["model"]
    assert described["provenance"]["exported_from"]["left_out_splits"] == ["dev"]
    assert attrs["n_utterances"] == len(utts) and attrs["complete"] and json.loads(attrs["skipped"]) == []
    assert described["fletcher32"] and described["chunks"][1] == 64


def test_docs_h5py_snippet_reads_the_export(source, tmp_path):
    h5 = tmp_path / "features.h5"
    export_hdf5(source, h5, layers="2", progress=False)
    utt = open_store(source).utterances("dev")[5].id
    x = run_without_w2vcache(doc_snippet("### Reading the HDF5 export with h5py"), {
        '"features.h5"': repr(str(h5)), '"layer08"': '"layer02"',
        '"1272-128104-0000"': repr(utt)}, tmp_path / "x.npy", tmp_path)
    np.testing.assert_array_equal(x, open_store(source).read("dev", "layer02", utt))


# -- reading over http, from a pack, read-only ---------------------------------------------------


def test_http_store_info_verify_read_and_copy(source, http_base, tmp_path):
    url = f"{http_base}/features.zarr"
    about = info(url)
    local = info(source)
    for key in ("format_version", "layers", "dtype", "splits", "provenance"):
        assert about[key] == local[key]
    assert about["path"] == url and about["bytes"]["total"] is None  # a web server cannot be listed
    report = verify(url)
    assert report.ok and report.chunks_checked == verify(source).chunks_checked
    assert_same_features(url, source, ["dev", "test"], LAYERS, compare=["layer00", "layer03"])

    copied = tmp_path / "from-http.zarr"
    copy_store(url, copied, layers="4", progress=False)
    assert verify(copied).ok
    assert open_store(copied).provenance["subset_of"]["source"] == url
    assert_same_features(copied, source, ["dev", "test"], ["layer04"])

    with pytest.raises(W2VCacheError, match=f"no store at {http_base}/nothing.zarr"):
        open_store(f"{http_base}/nothing.zarr")


def test_pack_over_http_is_read_in_place(source, http_base):
    url = f"{http_base}/features.zip"
    assert verify(url).ok
    assert info(url)["splits"] == info(source)["splits"]
    assert_same_features(url, source, ["dev", "test"], LAYERS, compare=["layer01", "layer04"])


def test_a_pack_on_a_server_without_range_requests_is_refused_naming_the_ways_out(source, pack, plain_http_base):
    url = f"{plain_http_base}/features.zip"
    asked = urllib.request.Request(url, headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(asked) as response:  # the server sends the whole pack for a part of it
        assert response.status == 200 and len(response.read()) == pack.stat().st_size
    for read in (open_store, info):
        with pytest.raises(W2VCacheError) as error:
            read(url)
        message = str(error.value)
        assert message.startswith(f"cannot read {url}: the web server does not answer range requests")
        assert "serve the store's directory instead" in message
        assert "serve the pack from a server that answers range requests" in message
    result = CliRunner().invoke(main, ["info", url])
    assert result.exit_code == 1 and result.output == f"Error: {message}\n"
    # The first way out, on the same server: the store's directory is read file by file.
    assert info(f"{plain_http_base}/features.zarr")["splits"] == info(source)["splits"]


def _read_in_child(store, queue):
    queue.put([x.tolist() for x in store.read_batch("test", "layer02", [0, 5, 9])])


@pytest.mark.parametrize("where", ["http", "zip"])
def test_a_forked_worker_reads_a_store_opened_before_the_fork(source, pack, http_base, where):
    """As DataLoader workers do: the child reopens the store (its own http session, its own file offset)."""
    store = open_store(f"{http_base}/features.zarr" if where == "http" else pack)
    store.read("test", "layer02", 0)  # the parent's connection or file handle is in use
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(store, queue))
    child.start()
    got = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    for x, y in zip(got, open_store(source).read_batch("test", "layer02", [0, 5, 9])):
        np.testing.assert_array_equal(np.array(x, dtype=np.float16), y)
    store.read("test", "layer02", 9)  # and the parent goes on reading


@pytest.mark.parametrize("where", ["http", "zip"])
def test_docs_plain_zarr_snippets_read_shared_stores(source, pack, http_base, tmp_path, where):
    utt = open_store(source).utterances("test")[7].id
    common = {'root["dev"]': 'root["test"]', '"layer08"': '"layer01"', '"1272-128104-0000"': repr(utt)}
    if where == "http":
        snippet = doc_snippet("### Reading a shared store with plain zarr")
        common['"https://example.org/features.zarr"'] = repr(f"{http_base}/features.zarr")
    else:
        snippet = doc_snippet("A pack needs zarr's `ZipStore`")
        common['"features.zip"'] = repr(str(pack))
    x = run_without_w2vcache(snippet, common, tmp_path / "x.npy", tmp_path)
    np.testing.assert_array_equal(x, open_store(source).read("test", "layer01", utt))


def test_reading_and_sharing_never_modify_the_source(source, pack, tmp_path):
    before = snapshot(source), snapshot(pack)
    for where in (source, f"file://{source}", pack):
        store = open_store(where)
        store.read_layer("dev", "layer00")
        store.read_batch("test", "layer04", [3, 1, 2])
        store.close()
        info(where)
        assert verify(where).ok
    copy_store(source, tmp_path / "c.zarr", layers="0", progress=False)
    copy_store(pack, tmp_path / "from-zip.zarr", splits="dev", progress=False)
    pack_store(source, tmp_path / "p.zip", progress=False)
    export_hdf5(pack, tmp_path / "e.h5", progress=False)
    assert (snapshot(source), snapshot(pack)) == before


def test_pack_members_named_outside_the_store_are_never_written_anywhere(pack, tmp_path):
    """A pack is read in place, never unpacked: members named ../x, /x or ..\\x (another zip tool's
    or a stranger's doing) are not written by reading, copying, exporting or re-packing it, and a new
    pack leaves them out, so that no unzip tool is handed them either."""
    work = tmp_path / "work"
    work.mkdir()
    odd = work / "odd.zip"
    shutil.copy(pack, odd)
    outside = Path("/") / f"w2vcache-test-{os.getpid()}-absolute.txt"
    stray = ["../outside.txt", str(outside), "_runs/../../escape/zarr.json", "..\\backslash.txt"]
    with zipfile.ZipFile(odd, "a") as z:
        for name in stray:
            z.writestr(name, json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    assert verify(odd).ok and info(odd)["splits"] == info(pack)["splits"]
    copy_store(odd, work / "copy.zarr", progress=False)
    export_hdf5(odd, work / "export.h5", progress=False)
    pack_store(odd, work / "again.zip", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["work"] and not outside.exists()
    assert sorted(p.name for p in work.iterdir()) == ["again.zip", "copy.zarr", "export.h5", "odd.zip"]
    with zipfile.ZipFile(work / "again.zip") as z:
        names = z.namelist()
    assert not [n for n in names if n.startswith("/") or ".." in n or "\\" in n], names
    assert verify(work / "again.zip").ok and verify(work / "copy.zarr").ok


def test_newer_format_version_is_refused_everywhere(source, tmp_path):
    future = tmp_path / "future.zarr"
    shutil.copytree(source, future)
    meta_file = future / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["w2vcache"]["format_version"] = FORMAT_VERSION + 1
    meta_file.write_text(json.dumps(meta))
    message = f"has format version {FORMAT_VERSION + 1}; this w2vcache understands up to {FORMAT_VERSION}"
    for read in (open_store, info):
        with pytest.raises(W2VCacheError, match=message):
            read(future)
    assert message in verify(future).problems[0]
    for share, out in ((copy_store, "c.zarr"), (pack_store, "p.zip"), (export_hdf5, "e.h5")):
        with pytest.raises(W2VCacheError, match=message):
            share(future, tmp_path / out, progress=False)


def test_unreadable_locations_are_refused_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("not a store")
    with pytest.raises(W2VCacheError, match="no store at"):
        open_store(tmp_path / "missing.zarr")
    with pytest.raises(W2VCacheError, match="is a file but not a zip pack"):
        open_store(tmp_path / "notes.txt")
    with pytest.raises(W2VCacheError, match="no store at .*missing.zip"):
        info(tmp_path / "missing.zip")
    with pytest.raises(W2VCacheError, match="Protocol not known: nosuch"):
        open_store("nosuch://bucket/features.zarr")
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(W2VCacheError, match="needs s3fs: pip install s3fs"):
            open_store("s3://bucket/features.zarr")


# -- command line ---------------------------------------------------------------------------------


def one_line(result, pattern):
    """The command printed exactly one line, matching pattern in full; returns the match."""
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1, result.stdout
    match = re.fullmatch(pattern, result.stdout.rstrip("\n"))
    assert match, (pattern, result.stdout)
    return match


def test_share_commands_through_the_w2vcache_group(source, tmp_path):
    """copy, pack and export as a user runs them (`w2vcache copy ...`), checked on what they wrote."""
    runner = CliRunner()
    src = open_store(source)
    dst = tmp_path / "dev.zarr"
    args = ["copy", str(source), str(dst), "--layers", "3-4", "--splits", "dev"]
    result = runner.invoke(main, args)
    match = one_line(result, rf"{re.escape(str(dst))}: copied (\d+) block\(s\) of 2 layer\(s\) and 1 split\(s\), "
                             rf"[\d.]+ [KMG]?B of features read from {re.escape(str(source))} in [\d.]+ s; "
                             r"left out: layers layer00, layer01, layer02; splits test")
    assert int(match[1]) == src.status("dev").n_blocks
    report = verify(dst)
    assert report.ok, report.problems
    assert_same_features(dst, source, ["dev"], ["layer03", "layer04"])
    subset = open_store(dst).provenance["subset_of"]
    assert (subset["left_out_layers"], subset["left_out_splits"]) == (["layer00", "layer01", "layer02"], ["test"])
    features = {name: v for name, v in snapshot(dst).items() if name.startswith(("dev/layer03/", "dev/layer04/"))}
    assert any("/c/" in name for name in features)
    again = runner.invoke(main, args)  # the copy is finished: no block is copied (or written) again
    match = one_line(again, rf"{re.escape(str(dst))}: copied 0 block\(s\) \((\d+) already done\) of 2 layer\(s\).*")
    assert int(match[1]) == src.status("dev").n_blocks
    assert {name: v for name, v in snapshot(dst).items() if name in features} == features

    zip_path = tmp_path / "dev.zip"
    result = runner.invoke(main, ["pack", str(dst), str(zip_path)])
    match = one_line(result, rf"{re.escape(str(zip_path))}: packed \d+ files of {re.escape(str(dst))}, "
                             r"[\d.]+ [KMG]?B, (\d+) chunks verified, in [\d.]+ s")
    report = verify(zip_path)
    assert report.ok and int(match[1]) == report.chunks_checked == verify(dst).chunks_checked
    with zipfile.ZipFile(zip_path) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())  # uncompressed, read in place
    assert_same_features(zip_path, dst, ["dev"], ["layer03", "layer04"])

    import h5py

    h5 = tmp_path / "dev.h5"
    result = runner.invoke(main, ["export", str(zip_path), str(h5), "--layers", "layer04"])
    utts = src.utterances("dev")
    match = one_line(result, rf"{re.escape(str(h5))}: (\d+) utterances \((\d+) frames\) of 1 layer\(s\) in 1 "
                             rf"split\(s\) from {re.escape(str(zip_path))}, [\d.]+ [KMG]?B, in [\d.]+ s")
    assert (int(match[1]), int(match[2])) == (len(utts), sum(u.length for u in utts))
    with h5py.File(h5, "r") as f:
        assert list(f) == ["dev"] and "layer03" not in f["dev"]
        offsets, frames = f["dev"]["offsets"][:], f["dev"]["layer04"][:]
        assert f["dev"]["ids"].asstr()[:].tolist() == [u.id for u in utts]
    for i, x in enumerate(src.read_batch("dev", "layer04", range(len(utts)))):
        np.testing.assert_array_equal(frames[offsets[i]: offsets[i + 1]], x)


@pytest.mark.parametrize("entry", ["w2vcache group", "command alone"])
def test_share_mistakes_are_one_line_errors(source, tmp_path, entry):
    """Under `w2vcache` (and run on its own) a user's mistake is exit code 1 and a single
    `Error: ...` line, never a traceback, and nothing is left at the destination."""
    commands = {"copy": copy_command, "pack": pack_command, "export": export_command}
    missing = tmp_path / "nothing.zarr"
    existing = tmp_path / "taken.zip"
    existing.write_bytes(b"mine")
    for args, message in (
        (["copy", str(missing), str(tmp_path / "x.zarr")], f"no store at {missing}"),
        (["pack", str(missing), str(tmp_path / "x.zip")], f"no store at {missing}"),
        (["export", str(missing), str(tmp_path / "x.h5")], f"no store at {missing}"),
        (["copy", str(source), "s3://bucket/copy.zarr"], "must be a local directory"),
        (["copy", str(source), str(tmp_path / "x.zarr"), "--layers", "7-9"],
         "the store has no layer layer07; it has layer00, layer01, layer02, layer03, layer04"),
        (["copy", str(source), str(tmp_path / "x.zarr"), "--splits", "train"], "no split 'train'; it has dev, test"),
        (["pack", str(source), str(existing)], "already exists; remove it, choose another name, or replace it with --overwrite"),
        (["pack", str(source), str(tmp_path / "x.tar")], "must end in .zip"),
        (["copy", str(source), str(source / "inside.zarr")], "is inside the source store; choose a directory outside it"),
    ):
        if entry == "w2vcache group":
            result = CliRunner().invoke(main, args)
        else:
            result = CliRunner().invoke(commands[args[0]], args[1:])
        assert result.exit_code == 1, (args, result.output, result.exception)
        assert isinstance(result.exception, SystemExit), (args, result.exception)  # handled, not raised
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, (args, result.output)
        assert message in result.output, (args, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.zip"] and existing.read_bytes() == b"mine"
    assert not (source / "inside.zarr").exists()


def test_missing_source_store_in_a_real_process(tmp_path):
    """`python -m w2vcache copy` on a store that is not there: stderr is the one line, exit code 1."""
    proc = subprocess.run([sys.executable, "-m", "w2vcache", "copy", "nothing.zarr", "copy.zarr"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "Error: no store at nothing.zarr\n")
    assert list(tmp_path.iterdir()) == []


def test_short_probe_runs_on_a_store_served_over_http(source, http_base, tmp_path):
    """The probe trains straight from the web server, with the same result as from the local store."""
    import torch

    from w2vcache.probe import ProbeConfig, probe
    from w2vcache.train import TrainConfig

    def run(where, out):
        probe(where, "2", "0", out, ProbeConfig(hidden=16, lstm_layers=1, batch_frames=1500),
              TrainConfig(epochs=1, lr=2e-3, dev_split="test", test_splits=()), train_split="dev", progress=False)
        return out / "probe" / "layer02" / "seed0"

    remote = run(f"{http_base}/features.zarr", tmp_path / "remote")
    local = run(str(source), tmp_path / "local")
    result = json.loads((remote / "result.json").read_text())
    assert result["status"] == "finished" and result["test"] == json.loads((local / "result.json").read_text())["test"]
    a, b = torch.load(remote / "best.pt"), torch.load(local / "best.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_verify_of_a_damaged_pack_points_at_the_store_it_came_from(source, tmp_path):
    """A pack is read-only: verify must not suggest `verify --repair PACK`, which refuses."""
    import zipfile

    pack = tmp_path / "damaged.zip"
    pack_store(source, pack, progress=False)
    with zipfile.ZipFile(pack) as z:
        member = z.getinfo("dev/layer01/c/1/0")
    data = bytearray(pack.read_bytes())
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)  # the local header's size
    data[start + 20] ^= 0xFF
    pack.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(pack)])
    assert result.exit_code == 1 and "dev/layer01 chunk 1: checksum mismatch" in result.output
    assert "repair the store it was packed from (`w2vcache verify --repair`), then pack it again" in result.output
    assert "verify --repair " + str(pack) not in result.output
