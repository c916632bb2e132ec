"""The feature store: layout, writing, resuming, locks, shards, checksums, plain-zarr reading."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

from w2vcache.errors import W2VCacheError
from w2vcache.store import (
    CREATING_KEY,
    FeatureStore,
    SplitPlan,
    info,
    open_store,
    plan_blocks,
    verify,
)

LAYERS = {"layer00": 8, "layer01": 8, "cnn": 6}
CHUNK_FRAMES = 8
BLOCK_CHUNKS = 4  # blocks of >= 32 frames: many blocks from a small corpus
PROVENANCE = {"model": "tiny", "weights_sha256": "abc123", "frame_rate": 50, "created": "today"}
REPO = Path(__file__).resolve().parents[1]


def make_plan(n=40, seed=0):
    rng = np.random.default_rng(seed)
    utts = [(f"utt-{i:03d}", f"words of utterance {i} é", f"/audio/{i}.flac", int(rng.integers(3, 40)))
            for i in range(n)]
    return {"dev": SplitPlan(utts, source="test corpus", skipped=[{"id": "bad", "path": "/x", "reason": "empty"}]),
            "test": utts[:7]}


def features_for(block, seed=1):
    """Deterministic float32 features of a block: what a model would hand the store."""
    rng = np.random.default_rng([seed, block.index, len(block.split)])
    return {name: rng.standard_normal((block.n_frames, dim)).astype(np.float32) * 3
            for name, dim in LAYERS.items()}


def create(path, plan=None, **kwargs):
    kwargs = {"chunk_frames": CHUNK_FRAMES, "block_chunks": BLOCK_CHUNKS, **kwargs}
    layers = kwargs.pop("layers", LAYERS)
    provenance = kwargs.pop("provenance", PROVENANCE)
    return FeatureStore.create(path, provenance, plan or make_plan(), layers, **kwargs)


def fill(store, split, only=None):
    """Write and mark done the pending blocks (those with index in `only`, if given)."""
    written = {}
    for block in store.pending_blocks(split):
        if only is not None and block.index not in only:
            continue
        feats = features_for(block)
        store.write_block(block, feats)
        store.mark_done(block)
        written[block.index] = (block, feats)
    return written


@pytest.fixture
def full_store(tmp_path):
    path = tmp_path / "full.zarr"
    with create(path) as store:
        expected = {split: fill(store, split) for split in store.splits}
    return path, expected


def snapshot(path):
    """Every file and directory under path with its bytes and mtime."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            st = p.stat()
            out[str(p.relative_to(path))] = (st.st_mtime_ns, p.read_bytes() if p.is_file() else None)
    return out


def chunk_file(path, split, array, chunk):
    return Path(path) / split / array / "c" / str(chunk) / "0"


# -- layout -------------------------------------------------------------------------------------


def test_roundtrip_ragged_utterances(full_store):
    path, expected = full_store
    store = open_store(path)
    assert store.splits == ["dev", "test"]
    assert store.layers == LAYERS and store.dtype == "float16"
    assert store.provenance == PROVENANCE
    utts = store.utterances("dev")
    assert [(u.length, u.id) for u in utts] == sorted((u.length, u.id) for u in utts)
    plan = {u[0]: u for u in make_plan()["dev"].utterances}
    assert all(plan[u.id][1] == u.text and plan[u.id][3] == u.length for u in utts)

    for block, feats in expected["dev"].values():
        starts = np.cumsum((0,) + block.lengths)
        for k, utt_id in enumerate(block.ids):
            for layer in LAYERS:
                want = feats[layer][starts[k]: starts[k + 1]].astype(np.float16)
                got = store.read("dev", layer, utt_id)
                assert got.dtype == np.float16
                np.testing.assert_array_equal(got, want)
            assert np.array_equal(store.read("dev", "cnn", block.start + k), store.read("dev", "cnn", utt_id))

    frames, offsets = store.read_layer("dev", "layer01")
    assert len(offsets) == len(utts) + 1 and len(frames) == sum(u.length for u in utts)
    for i in (0, 17, len(utts) - 1):
        np.testing.assert_array_equal(frames[offsets[i]: offsets[i + 1]], store.read("dev", "layer01", i))
    batch = store.read_batch("dev", "layer00", [5, 3, 4, "utt-001", 5])
    for key, got in zip([5, 3, 4, "utt-001", 5], batch):
        np.testing.assert_array_equal(got, store.read("dev", "layer00", key))


def test_blocks_start_on_chunk_boundaries_and_never_share_a_chunk(full_store):
    path, _ = full_store
    split = zarr.open_group(str(path), mode="r")["dev"]
    offsets, lengths, blocks = split["offsets"][:], split["lengths"][:], split["blocks"][:]
    assert len(blocks) > 5
    chunks_of = []
    for start, stop in blocks:
        assert offsets[start] % CHUNK_FRAMES == 0
        end = offsets[stop - 1] + lengths[stop - 1]
        np.testing.assert_array_equal(offsets[start + 1: stop], (offsets + np.append(lengths, 0))[start: stop - 1])
        chunks_of.append(set(range(offsets[start] // CHUNK_FRAMES, -(-end // CHUNK_FRAMES))))
    for a in range(len(chunks_of)):
        for b in range(a + 1, len(chunks_of)):
            assert not chunks_of[a] & chunks_of[b]
    assert blocks[0, 0] == 0 and blocks[-1, 1] == len(lengths) and (blocks[1:, 0] == blocks[:-1, 1]).all()
    # padding is less than one chunk per block
    assert offsets[-1] - lengths.sum() < len(blocks) * CHUNK_FRAMES
    assert split["layer00"].shape == (offsets[-1], 8) and split["layer00"].chunks == (CHUNK_FRAMES, 8)


def test_plan_blocks_closes_blocks_near_a_chunk_boundary():
    # 12 frames reached after 3 utterances (15 frames, 1 padding); one more gives 16: no padding
    offsets, blocks = plan_blocks([5, 5, 5, 1, 20, 3], chunk_frames=4, block_chunks=3)
    assert blocks.tolist() == [[0, 4], [4, 5], [5, 6]]
    assert offsets.tolist() == [0, 5, 10, 15, 16, 36, 40]


class RecordingStore(WrapperStore):
    """A read-only local store that records every key read."""

    keys: list

    async def get(self, key, prototype=None, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)


def test_reading_one_layer_touches_only_that_layers_chunks(full_store):
    path, _ = full_store
    recorder = RecordingStore(LocalStore(str(path), read_only=True))
    recorder.keys = []
    store = open_store(recorder)
    store.read_layer("dev", "layer01")
    store.read("dev", "layer01", 3)
    chunk_reads = [k for k in recorder.keys if "/c/" in k]
    layer_reads = [k for k in chunk_reads if k.split("/")[1] in LAYERS]
    assert layer_reads and all(k.startswith("dev/layer01/c/") for k in layer_reads)
    assert all(k.split("/")[1] in ("layer01", "ids", "texts", "paths", "lengths", "offsets", "blocks", "done")
               for k in chunk_reads)


# -- partial writes, resume, mismatches ------------------------------------------------------------


def test_partial_store_refuses_pending_blocks_and_resumes(tmp_path):
    path = tmp_path / "s.zarr"
    with create(path) as store:
        n_blocks = len(store.pending_blocks("dev"))
        fill(store, "dev", only={0, 2})
    store = open_store(path)
    status = store.status("dev")
    assert (status.n_blocks, status.blocks_done, status.complete) == (n_blocks, 2, False)
    done_block = store._block("dev", 2)
    store.read("dev", "layer00", done_block.ids[0])  # done blocks read fine
    pending = store._block("dev", 1)
    with pytest.raises(W2VCacheError, match=rf"utterance {pending.ids[0]} of split dev is in block 1, which is not extracted"):
        store.read("dev", "layer00", pending.ids[0])
    with pytest.raises(W2VCacheError, match=rf"{n_blocks - 2} of {n_blocks} blocks .* re-running the same extract command resumes it"):
        store.read_layer("dev", "layer00")
    summary = info(path)["splits"]
    assert summary["dev"]["complete"] is False and summary["dev"]["blocks_done"] == 2
    report = verify(path)
    assert not report.ok and any("dev: incomplete" in p for p in report.problems)

    with create(path) as store:  # same parameters: resume
        assert [b.index for b in store.pending_blocks("dev")] == [b for b in range(n_blocks) if b not in (0, 2)]
        fill(store, "dev")
        fill(store, "test")
    assert verify(path).ok
    assert zarr.open_group(str(path), mode="r")["dev"].attrs["complete"] is True


@pytest.mark.parametrize("change, message", [
    ({"dtype": "float32"}, "dtype: store has float16, asked for float32"),
    ({"layers": {"layer00": 8, "layer01": 8}}, "layers: store has ['layer00', 'layer01', 'cnn'], asked for ['layer00', 'layer01']"),
    ({"layers": {"layer00": 8, "layer01": 16, "cnn": 6}}, "dim of layer01: store has 8, asked for 16"),
    ({"provenance": {**PROVENANCE, "weights_sha256": "fff"}}, "provenance weights_sha256: store has 'abc123', asked for 'fff'"),
    ({"provenance": {**PROVENANCE, "model": {"id": "tiny", "sha": "1"}}}, "provenance model: store has 'tiny', asked for {"),
    ({"provenance": {**PROVENANCE, "frame_rate": None, "revision": "v2"}},
     "2 differ:\n  provenance frame_rate: store has 50, asked for None\n  provenance revision: store has (absent), asked for 'v2'"),
    ({"plan": {"dev": make_plan()["dev"].utterances[:-1], "test": make_plan()["test"]}}, "split dev utterance ids: store has 40, asked for 39"),
])
def test_create_on_a_different_store_says_what_differs(tmp_path, change, message):
    path = tmp_path / "s.zarr"
    create(path).close()
    before = snapshot(path)
    with pytest.raises(W2VCacheError) as err:
        create(path, **change)
    assert message in str(err.value) and str(path) in str(err.value)
    assert snapshot(path) == before


def file_bytes(path):
    """Every file under path with its bytes (no mtimes: what a reader of the store would see)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def test_volatile_provenance_does_not_block_resume(tmp_path):
    """Re-creating with only volatile provenance changed resumes the store: the finished blocks'
    features, done markers and chunk files all survive, and only the unfinished blocks are pending."""
    path = tmp_path / "s.zarr"
    with create(path) as store:
        n_blocks = len(store.pending_blocks("dev"))
        written = fill(store, "dev", only={0, 2})
        fill(store, "test")
    assert n_blocks > 3
    before = file_bytes(path)
    assert any("/layer00/c/" in name for name in before)  # the finished chunks are on disk
    with create(path, provenance={**PROVENANCE, "created": "tomorrow"}) as store:
        assert [b.index for b in store.pending_blocks("dev")] == [b for b in range(n_blocks) if b not in (0, 2)]
        assert store.pending_blocks("test") == []
        assert store.status("dev").blocks_done == 2 and store.status("test").complete
        assert store.provenance == PROVENANCE  # the store keeps its own record
    assert file_bytes(path) == before
    store = open_store(path)
    for block, feats in written.values():
        starts = np.cumsum((0,) + block.lengths)
        for k, utt_id in enumerate(block.ids):
            for layer in LAYERS:
                np.testing.assert_array_equal(store.read("dev", layer, utt_id),
                                              feats[layer][starts[k]: starts[k + 1]].astype(np.float16))


def test_half_created_store_is_recreated_and_refused_by_readers(tmp_path):
    path = tmp_path / "s.zarr"
    group = zarr.create_group(str(path), attributes={CREATING_KEY: {"pid": 1}})
    group.create_group("dev")  # killed before the end of creation
    with pytest.raises(W2VCacheError, match="never fully created"):
        open_store(path)
    with create(path) as store:
        fill(store, "dev")
        fill(store, "test")
    assert verify(path).ok


def test_foreign_directory_and_missing_store_are_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(W2VCacheError, match="exists and is not a w2vcache store"):
        create(tmp_path / "data")
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"
    with pytest.raises(W2VCacheError, match="no store at"):
        open_store(tmp_path / "nothing.zarr")


def test_newer_format_version_is_refused(full_store):
    path, _ = full_store
    root = zarr.open_group(str(path), mode="r+")
    meta = dict(root.attrs["w2vcache"], format_version=99)
    root.attrs["w2vcache"] = meta
    with pytest.raises(W2VCacheError, match="format version 99"):
        open_store(path)


def test_missing_split_and_layer_list_what_exists(full_store):
    store = open_store(full_store[0])
    with pytest.raises(W2VCacheError, match="no split 'train'; it has dev, test"):
        store.read("train", "layer00", 0)
    with pytest.raises(W2VCacheError, match="no layer 'layer07'; it has layer00, layer01, cnn"):
        store.read_layer("dev", "layer07")
    with pytest.raises(W2VCacheError, match="no utterance 'nope'"):
        store.read("dev", "layer00", "nope")


def test_writer_refuses_bad_features(tmp_path):
    with create(tmp_path / "s.zarr") as store:
        block = store.pending_blocks("dev")[0]
        feats = features_for(block)
        with pytest.raises(W2VCacheError, match="beyond float16's range"):
            store.write_block(block, {**feats, "layer01": feats["layer01"] * 1e5})
        for bad in (np.nan, np.inf, -np.inf):  # float16 features, checked by their exponent bits
            half = feats["layer01"].astype(np.float16)
            half[len(half) // 2, 1] = bad
            with pytest.raises(W2VCacheError, match=r"layer01 features contain NaN or infinity"):
                store.write_block(block, {**feats, "layer01": half})
        with pytest.raises(W2VCacheError, match=rf"utterance {block.ids[0]}: cnn features have shape"):
            store.write_block(block, {**feats, "cnn": feats["layer00"]})
        with pytest.raises(W2VCacheError, match="lack layers \\['cnn'\\]"):
            store.write_block(block, {k: v for k, v in feats.items() if k != "cnn"})
        with pytest.raises(W2VCacheError, match="was not written by this writer"):
            store.mark_done(block)
        store.write_block(block, feats)
        store.mark_done(block)
        with pytest.raises(W2VCacheError, match="already done"):
            store.write_block(block, feats)
    with pytest.raises(W2VCacheError, match="read-only"):
        open_store(tmp_path / "s.zarr").mark_done(block)


def test_block_writer_streams_utterances(tmp_path):
    path = tmp_path / "s.zarr"
    with create(path) as store:
        block = store.pending_blocks("dev")[3]
        feats = features_for(block)
        starts = np.cumsum((0,) + block.lengths)
        with store.block_writer(block) as writer:
            for k in range(len(block.ids)):
                writer.append({name: x[starts[k]: starts[k + 1]].astype(np.float16) for name, x in feats.items()})
        store.mark_done(block)
    got = open_store(path).read("dev", "layer01", block.ids[-1])
    np.testing.assert_array_equal(got, feats["layer01"][starts[-2]:].astype(np.float16))


def test_chunks_are_the_files_zarr_itself_writes(full_store, tmp_path):
    """The writer encodes uncompressed chunks itself (bytes, then their crc32c): byte for byte
    what zarr writes for the same rows, with the same array settings."""
    path, _ = full_store
    stored = zarr.open_group(path, mode="r")["dev"]["layer01"]
    plain = zarr.open_group(tmp_path / "plain.zarr", mode="w").create_array(
        "layer01", shape=stored.shape, chunks=stored.chunks, dtype=stored.dtype, fill_value=0,
        compressors=stored.compressors, filters=None)
    plain[:] = stored[:]
    rows = stored.chunks[0]
    for chunk in range(stored.shape[0] // rows):
        assert chunk_file(path, "dev", "layer01", chunk).read_bytes() == \
            (tmp_path / "plain.zarr" / "layer01" / "c" / str(chunk) / "0").read_bytes()


def test_batches_of_any_size_write_the_same_store(tmp_path):
    """Utterances handed over in uneven batches, chunk boundaries falling inside them, make the
    same files as the whole block at once."""
    plan = make_plan()
    with create(tmp_path / "whole.zarr", plan) as whole, create(tmp_path / "batches.zarr", plan) as batches:
        block = max(whole.pending_blocks("dev"), key=lambda b: len(b.ids))
        assert len(block.ids) >= 4 and block.n_frames > 2 * CHUNK_FRAMES
        feats = features_for(block)
        whole.write_block(block, feats)
        whole.mark_done(block)
        starts = np.cumsum((0,) + block.lengths)
        cuts = [0, 1, len(block.ids) // 2, len(block.ids) // 2, len(block.ids)]  # one batch empty
        with batches.block_writer(block) as writer:
            for a, b in zip(cuts, cuts[1:]):
                writer.append_batch({name: [x[starts[k]: starts[k + 1]] for k in range(a, b)]
                                     for name, x in feats.items()})
        batches.mark_done(block)
    assert (snapshot_bytes(tmp_path / "whole.zarr" / "dev" / "layer01")
            == snapshot_bytes(tmp_path / "batches.zarr" / "dev" / "layer01"))


def snapshot_bytes(path):
    return {p.relative_to(path): p.read_bytes() for p in Path(path).rglob("*") if p.is_file()}


def test_a_failed_chunk_write_names_it_and_keeps_what_is_done(tmp_path, monkeypatch):
    """A full disk while a block is written: the error names the layer and chunk, the block stays
    pending, blocks done before are intact, and writing again finishes the store."""
    from w2vcache.store import writing

    path = tmp_path / "s.zarr"
    real, calls = writing.write_chunk, []

    def full_disk(array, index, chunk):
        calls.append(index)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(array, index, chunk)

    with create(path) as store:
        first, second = store.pending_blocks("dev")[:2]
        done = features_for(first)
        store.write_block(first, done)
        store.mark_done(first)
        monkeypatch.setattr(writing, "write_chunk", full_disk)
        calls.clear()
        with pytest.raises(W2VCacheError, match=r"dev block 1: writing (cnn|layer\d\d) chunk \d+ failed: .*No space left"):
            store.write_block(second, features_for(second))
        assert [b.index for b in store.pending_blocks("dev")][:1] == [1]
    monkeypatch.setattr(writing, "write_chunk", real)
    reader = open_store(path)
    starts = np.cumsum((0,) + first.lengths)
    np.testing.assert_array_equal(reader.read("dev", "layer01", first.ids[2]),
                                  done["layer01"][starts[2]:starts[3]].astype(np.float16))
    with pytest.raises(W2VCacheError, match="in block 1, which is not extracted yet"):
        reader.read("dev", "layer01", second.ids[0])
    with create(path) as store:
        fill(store, "dev")
    np.testing.assert_array_equal(open_store(path).read("dev", "layer01", second.ids[0]),
                                  features_for(second)["layer01"][: second.lengths[0]].astype(np.float16))


# -- locks and shards ---------------------------------------------------------------------------


def test_second_writer_is_refused_and_lock_released_on_close(tmp_path):
    path = tmp_path / "s.zarr"
    first = create(path)
    with pytest.raises(W2VCacheError, match=rf"store {re.escape(str(path))} is being written by pid {os.getpid()} on host"):
        create(path)
    with pytest.raises(W2VCacheError, match="being written"):
        create(path, shard=(1, 2))  # a shard conflicts with a whole-store writer
    first.close()
    assert not (path / ".locks").exists()
    with create(path, shard=(0, 2)):
        with create(path, shard=(1, 2)):  # disjoint shards write side by side
            with pytest.raises(W2VCacheError, match="being written"):
                create(path)  # ... and keep a whole-store writer out
            with pytest.raises(W2VCacheError, match="being written"):
                create(path, shard=(2, 4))  # blocks 2, 6, ... belong to shard 0 of 2


def test_killed_writer_leaves_a_stale_lock_that_is_taken_over(tmp_path):
    """kill -9 after writing a block without marking it done: resume redoes only that block."""
    path = tmp_path / "s.zarr"
    create(path).close()
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import create, features_for
        store = create({str(path)!r})
        b0, b1 = store.pending_blocks("dev")[:2]
        store.write_block(b0, features_for(b0)); store.mark_done(b0)
        store.write_block(b1, features_for(b1))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    assert proc.wait() == -9, proc.stderr.read()
    lock = json.loads((path / ".locks" / "all.lock").read_text())
    assert lock["pid"] == proc.pid
    with create(path) as store:
        assert [b.index for b in store.pending_blocks("dev")][:2] == [1, 2]
        assert json.loads((path / ".locks" / "all.lock").read_text())["pid"] == os.getpid()


def test_a_writer_whose_lock_was_taken_over_stops_and_keeps_what_it_finished(tmp_path, monkeypatch):
    """A writer stopped for longer than SILENT_AFTER_S (SIGSTOP, a suspended job) finds, when it
    goes on, that another host took its lock: it refuses to write on, its done blocks kept."""
    from w2vcache.store import locks

    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.02)
    path = tmp_path / "s.zarr"
    store = create(path)
    done = fill(store, "dev", only={0})
    lock = path / ".locks" / "all.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "another-node", "started": "2026-01-01T00:00:00+00:00",
                                "heartbeat_s": 60.0}))  # what the other host's takeover leaves
    deadline = time.monotonic() + 5
    while not store._lock.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    block = store.pending_blocks("dev")[0]
    with pytest.raises(W2VCacheError, match=rf"^store {re.escape(str(path))}: this process lost its lock .*all\.lock .* another process took it over"):
        store.write_block(block, features_for(block))
    store.close()
    assert json.loads(lock.read_text())["host"] == "another-node"  # the new holder's lock is left alone
    assert open_store(path).status("dev").blocks_done == len(done) == 1


def test_shards_own_disjoint_blocks_covering_everything(tmp_path):
    path = tmp_path / "s.zarr"
    owned = []
    for i in range(3):
        with create(path, shard=(i, 3)) as store:
            blocks = store.pending_blocks("dev")
            assert all(b.index % 3 == i for b in blocks)
            owned.append({b.index for b in blocks})
            if i == 0:
                other = open_store(path)._block("dev", 1)
                with pytest.raises(W2VCacheError, match="belongs to shard 1/3"):
                    store.write_block(other, features_for(other))
    n_blocks = open_store(path).status("dev").n_blocks
    assert set.union(*owned) == set(range(n_blocks)) and sum(map(len, owned)) == n_blocks


def test_concurrent_shard_workers_create_and_fill_one_store(tmp_path):
    path = tmp_path / "s.zarr"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import create, fill
        with create({str(path)!r}, shard=(int(sys.argv[1]), 2)) as store:
            for split in store.splits:
                fill(store, split)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    report = verify(path)
    assert report.ok, report.problems
    assert zarr.open_group(str(path), mode="r")["dev"].attrs["complete"] is True


# -- verify, checksums, read-only ----------------------------------------------------------------


def test_verify_names_the_corrupt_chunk_and_reads_refuse_it(full_store):
    path, expected = full_store
    report = verify(path)
    assert report.ok, report.problems
    assert report.chunks_checked > 100

    block, _ = expected["dev"][3]
    chunk = block.frame_offset // CHUNK_FRAMES + 1
    f = chunk_file(path, "dev", "layer01", chunk)
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))

    report = verify(path)
    assert not report.ok
    assert len(report.problems) == 1 and report.problems[0].startswith(f"dev/layer01 chunk {chunk}: checksum mismatch")
    store = open_store(path)
    victim = next(i for i in range(block.start, block.stop)
                  if store._split_index("dev").offsets[i] // CHUNK_FRAMES <= chunk
                  <= (store._split_index("dev").offsets[i] + store._split_index("dev").lengths[i] - 1) // CHUNK_FRAMES)
    with pytest.raises(W2VCacheError, match=f"dev/layer01 chunk {chunk}: checksum mismatch"):
        store.read("dev", "layer01", victim)
    with pytest.raises(W2VCacheError, match=f"dev/layer01 chunk {chunk}"):
        store.read_layer("dev", "layer01")
    store.read("dev", "layer00", victim)  # other layers are intact
    with pytest.raises(ValueError, match="checksum"):  # plain zarr checks too
        zarr.open_group(str(path), mode="r")["dev/layer01"][chunk * CHUNK_FRAMES]


def test_verify_reports_a_missing_chunk_of_a_done_block(full_store):
    path, expected = full_store
    block, _ = expected["dev"][2]
    chunk = block.frame_offset // CHUNK_FRAMES
    chunk_file(path, "dev", "cnn", chunk).unlink()
    assert verify(path).problems == [f"dev/cnn chunk {chunk}: missing (its block is marked done)"]
    # zarr reads a missing chunk as zeros; readers refuse it, naming it, and read the rest
    store = open_store(path)
    with pytest.raises(W2VCacheError, match=rf"dev/cnn chunk {chunk} is missing .*verify --repair"):
        store.read_layer("dev", "cnn")
    with pytest.raises(W2VCacheError, match=rf"dev/cnn chunk {chunk} is missing"):
        store.read("dev", "cnn", block.start)
    store.read_layer("dev", "layer00")


def test_a_missing_chunk_of_the_index_is_named_by_readers_and_verify(full_store):
    """A copy that stopped part-way lost the first chunk of dev's lengths: zeros would make every
    utterance frameless. Opening the split says which chunk is gone; verify lists it, not its symptoms."""
    path, _ = full_store
    (Path(path) / "dev" / "lengths" / "c" / "0").unlink()
    with pytest.raises(W2VCacheError, match=r"dev/lengths chunk 0 is missing .*the store's index is damaged"):
        open_store(path).utterances("dev")
    assert verify(path).problems == ["dev/lengths chunk 0: missing"]
    open_store(path).utterances("test")  # other splits read as before


def test_read_only_use_modifies_nothing(full_store):
    path, _ = full_store
    before = snapshot(path)
    store = open_store(path)
    store.utterances("dev")
    store.read("dev", "layer00", 0)
    store.read_layer("test", "cnn")
    summary = info(path)
    assert verify(path).ok
    assert snapshot(path) == before
    json.dumps(summary)
    assert summary["splits"]["dev"]["skipped"] == [{"id": "bad", "path": "/x", "reason": "empty"}]
    assert summary["splits"]["dev"]["complete"] and summary["splits"]["dev"]["source"] == "test corpus"
    n_rows = zarr.open_group(str(path), mode="r")["dev"].attrs["n_rows"]
    assert summary["bytes"]["layers"]["layer00"] > (n_rows + 7 * 8) * 8 * 2
    assert summary["bytes"]["total"] > sum(summary["bytes"]["layers"].values())


def test_plain_zarr_read_following_docs(full_store, tmp_path):
    """The snippet in docs/STORE.md, run without w2vcache, reads what the store wrote."""
    path, _ = full_store
    doc = (REPO / "docs" / "STORE.md").read_text()
    snippet = re.search(r"## Reading it with plain zarr\s+```python\n(.*?)```", doc, re.S).group(1)
    utt = open_store(path).utterances("dev")[11].id
    snippet = (snippet.replace('"features.zarr"', repr(str(path)))
               .replace('"layer08"', '"layer01"').replace('"1272-128104-0000"', repr(utt)))
    out = tmp_path / "x.npy"
    script = snippet + f"\nimport sys\nassert 'w2vcache' not in sys.modules\nnp.save({str(out)!r}, x)\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out), open_store(path).read("dev", "layer01", utt))


def test_a_store_whose_metadata_names_a_path_outside_it_is_refused(full_store):
    """Split and layer names become paths inside the store; one altered to reach outside it is
    refused on opening, with one line, by every reader."""
    from click.testing import CliRunner

    from w2vcache.cli import main

    path, _ = full_store
    root = zarr.open_group(str(path), mode="r+")
    for what, altered in (("split", {"splits": ["../x", "test"]}), ("layer", {"layers": {"../../y": 8}})):
        meta = dict(root.attrs["w2vcache"])
        root.attrs["w2vcache"] = {**meta, **altered}
        with pytest.raises(W2VCacheError, match=rf"metadata is not as w2vcache writes it: {what} '[./]+[xy]'"):
            open_store(path)
        result = CliRunner().invoke(main, ["info", str(path)])
        assert result.exit_code == 1 and "Traceback" not in result.output and "not a valid name" in result.output
        root.attrs["w2vcache"] = meta
    assert open_store(path).splits == ["dev", "test"]
