"""similarity: linear CKA itself, its invariances, the streamed computation against the in-memory
one, two stores of the same utterances (and the refusals of others), the files and the command."""

import json
import struct
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from w2vcache import similarity as sim
from w2vcache.cli import main
from w2vcache.corpus import build_corpus
from w2vcache.errors import W2VCacheError
from w2vcache.extract import ExtractConfig, extract
from w2vcache.figure import similarity_figure_size
from w2vcache.report import read_similarity
from w2vcache.similarity import cca_similarity, cka_from_moments, from_moments, linear_cka, sample_frames, similarity
from w2vcache.store import FeatureStore, open_store

DIM = 8
PROVENANCE = {"model": {"name": "hand-made", "weight_hash": "abc"}, "frame_rate": 50, "created": "today"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The bundled dev-clean utterances through builtin:tiny and through builtin:tiny-ln (other
    random weights), and dev-other through builtin:tiny (other utterances)."""
    root = tmp_path_factory.mktemp("stores")
    paths = {"tiny": root / "tiny.zarr", "tiny-ln": root / "tiny-ln.zarr", "other": root / "other.zarr"}
    dev_clean = build_corpus(splits=["dev=dev-clean"])
    extract(dev_clean, ExtractConfig(store=str(paths["tiny"])), progress=False)
    extract(dev_clean, ExtractConfig(store=str(paths["tiny-ln"]), model="builtin:tiny-ln"), progress=False)
    extract(build_corpus(splits=["dev=dev-other"]), ExtractConfig(store=str(paths["other"])), progress=False)
    return paths


def related_layers(n, seed=0):
    """Three layers of the same n frames: a base, a noisy linear map of it, and independent noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)) * np.exp(rng.standard_normal(DIM))
    return {"layer00": x, "layer01": np.tanh(x @ rng.standard_normal((DIM, DIM))) + 0.3 * rng.standard_normal((n, DIM)),
            "layer02": rng.standard_normal((n, DIM))}


def write_store(path, lengths, transform=lambda name, x: x, failed=(), seed=0, keep=None):
    """A float32 store of split dev written through the FeatureStore API: utterance i has lengths[i]
    frames of `related_layers`, each layer passed through transform(name, x). `failed`: ids whose
    block is marked done with them as failed to decode. `keep`: the layers written (all three)."""
    plan = {"dev": [(f"utt-{i:03d}", f"words {i}", f"/audio/{i}.flac", n) for i, n in enumerate(lengths)]}
    layers = related_layers(int(sum(lengths)), seed)
    layers = {name: transform(name, x) for name, x in layers.items() if keep is None or name in keep}
    with FeatureStore.create(path, PROVENANCE, plan, {name: DIM for name in layers}, "float32",
                             chunk_frames=16, block_chunks=2) as store:
        utts = store.utterances("dev")
        starts = dict(zip((u.id for u in utts), np.concatenate([[0], np.cumsum([u.length for u in utts])])))
        for block in store.pending_blocks("dev"):
            with store.block_writer(block) as writer:
                for utt_id, n in zip(block.ids, block.lengths):
                    writer.append({name: x[starts[utt_id]: starts[utt_id] + n] for name, x in layers.items()})
            store.mark_done(block, [{"id": u, "path": "/x", "reason": "corrupt"} for u in block.ids if u in failed])
    return path


def random_rotation(dim, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def in_memory(path_a, path_b, split, rows):
    """The reference: every frame of every layer in memory, the sampled rows, linear_cka per pair."""
    a, b = open_store(path_a), open_store(path_b)
    xs = [a.read_layer(split, name)[0][rows] for name in a.layers]
    ys = [b.read_layer(split, name)[0][rows] for name in b.layers]
    return np.array([[linear_cka(x, y) for y in ys] for x in xs])


def cli(*args):
    return CliRunner().invoke(main, ["similarity", *map(str, args)])


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------------------------
# Linear CKA itself


def test_cka_is_unchanged_by_rotation_uniform_scale_and_translation():
    layers = related_layers(500)
    x, y = layers["layer00"], layers["layer01"]
    base = linear_cka(x, y)
    assert 0.05 < base < 0.95
    q = random_rotation(DIM, 1)
    assert linear_cka(x @ q * 7.5 + 3.0, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, -0.01 * y @ q) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, x @ q * 2) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-15)
    # Not invariant to a non-uniform scale (what sets linear CKA apart from CCA).
    assert abs(linear_cka(x, y * np.arange(1, DIM + 1)) - base) > 1e-3
    assert np.isnan(linear_cka(x, np.ones((500, 3))))  # no variance: undefined
    # 0.1 is not exact in binary: centring leaves rounding noise, which is no variance either
    assert np.isnan(linear_cka(np.full((500, 5), 0.1), np.full((500, 3), 0.7)))


def test_cka_from_moments_equals_the_centred_computation():
    layers = related_layers(300, seed=3)
    x, y = layers["layer00"] + 100.0, layers["layer01"][:, :5] - 40.0  # far from centred; different widths
    moments = cka_from_moments(len(x), x.sum(0), y.sum(0), x.T @ y, x.T @ x, y.T @ y)
    assert moments == pytest.approx(linear_cka(x, y), abs=1e-10)


def test_sample_is_seeded_and_leaves_out_unusable_utterances():
    lengths = np.array([5, 3, 7, 4])
    usable = np.array([True, False, True, True])
    every = sample_frames(lengths, usable, None, 0)
    assert every.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    some = sample_frames(lengths, usable, 6, seed=1)
    assert len(some) == 6 and set(some) <= set(every) and np.all(np.diff(some) > 0)
    assert sample_frames(lengths, usable, 6, seed=1).tolist() == some.tolist()
    assert sample_frames(lengths, usable, 6, seed=2).tolist() != some.tolist()
    assert sample_frames(lengths, usable, 100, seed=1).tolist() == every.tolist()


# ---------------------------------------------------------------------------------------------
# Stores


def test_a_store_against_itself_is_one_on_the_diagonal_and_symmetric(stores):
    r = similarity(stores["tiny"], progress=False)
    assert r.layers_a == r.layers_b == list(open_store(stores["tiny"]).layers)
    np.testing.assert_allclose(np.diag(r.matrix), 1.0, atol=1e-12)
    np.testing.assert_allclose(r.matrix, r.matrix.T, atol=1e-12)
    assert r.diagonal is None  # within one store the diagonal says nothing
    assert r.frames == r.frames_available == sum(u.length for u in open_store(stores["tiny"]).utterances("dev"))


def test_rotated_and_scaled_features_give_the_same_matrix(tmp_path):
    lengths = [11, 30, 7, 19, 25, 14, 9, 40]
    rotations = {name: random_rotation(DIM, k) * (k + 0.5) for k, name in enumerate(["layer00", "layer01", "layer02"])}
    a = write_store(tmp_path / "a.zarr", lengths)
    b = write_store(tmp_path / "b.zarr", lengths, lambda name, x: x @ rotations[name] - 2.0)
    same = similarity(a, progress=False).matrix
    across = similarity(a, b, progress=False)
    np.testing.assert_allclose(across.matrix, same, atol=1e-6)  # float32 storage of the rotated features
    np.testing.assert_allclose(across.diagonal, 1.0, atol=1e-6)
    # Stores of different layer sets (one extracted with --cnn, say): the layers both have keep
    # their diagonal, found by name.
    fewer = write_store(tmp_path / "fewer.zarr", lengths, lambda name, x: x @ rotations[name] - 2.0,
                        keep=("layer01", "layer02"))
    partial = similarity(a, fewer, progress=False)
    assert partial.layers_b == ["layer01", "layer02"] and partial.diagonal[0] is None
    np.testing.assert_allclose(partial.diagonal[1:], 1.0, atol=1e-6)
    assert same[0, 2] < 0.3 and 0.1 < same[0, 1] < 0.99  # the layers themselves differ


def test_unrelated_random_models_are_well_below_one(stores):
    r = similarity(stores["tiny"], stores["tiny-ln"], progress=False)
    assert r.diagonal == [r.matrix[k, k] for k in range(len(r.layers_a))]
    assert np.all(r.matrix < 0.6) and np.all(r.matrix > 0)


def test_streamed_equals_in_memory_on_the_same_sampled_frames(stores, monkeypatch):
    # Small reading steps and a budget of one layer per pass: many steps, one pass per layer.
    monkeypatch.setattr(sim, "SAMPLED_ROWS", 150)
    monkeypatch.setattr(sim, "READ_FRAMES", 400)
    a = open_store(stores["tiny"])
    budget = 8 * a.layers["layer00"] * sum(a.layers.values())
    r = similarity(stores["tiny"], stores["tiny-ln"], max_frames=1000, seed=4, memory_budget=budget, progress=False)
    assert r.passes == len(a.layers) and r.frames == 1000
    lengths = np.array([u.length for u in a.utterances("dev")])
    rows = sample_frames(lengths, a.usable("dev"), 1000, 4)
    np.testing.assert_allclose(r.matrix, in_memory(stores["tiny"], stores["tiny-ln"], "dev", rows), rtol=0, atol=1e-10)
    whole = similarity(stores["tiny"], stores["tiny-ln"], max_frames=1000, seed=4, progress=False)
    assert whole.passes == 1
    np.testing.assert_allclose(whole.matrix, r.matrix, rtol=0, atol=1e-12)
    within = similarity(stores["tiny"], max_frames=1000, seed=4, memory_budget=budget, progress=False)
    assert within.passes > 1
    np.testing.assert_allclose(within.matrix, in_memory(stores["tiny"], stores["tiny"], "dev", rows), rtol=0, atol=1e-10)
    other_seed = similarity(stores["tiny"], stores["tiny-ln"], max_frames=1000, seed=5, progress=False)
    assert not np.array_equal(other_seed.matrix, r.matrix)


# ---------------------------------------------------------------------------------------------
# SVCCA and PWCCA


def test_cca_measures_are_canonical_correlations_after_the_99_percent_truncation():
    rng = np.random.default_rng(3)
    # X: 6 strong directions and 4 of noise (well under 1 % of the variance); Y: 3 of X's strong
    # directions plus 3 features of its own, as strong, both rotated.
    strong, weak = rng.standard_normal((4000, 6)) * 10, rng.standard_normal((4000, 4)) * 0.05
    x = np.hstack([strong, weak]) @ random_rotation(10, 1)
    y = np.hstack([strong[:, :3], rng.standard_normal((4000, 3)) * 10]) @ random_rotation(6, 2)
    # X keeps its 6 strong directions, Y all 6: canonical correlations 1, 1, 1 and three near 0
    # (chance correlations of 4,000 frames).
    assert cca_similarity(x, y, "mean") == pytest.approx(0.5, abs=0.03)
    assert cca_similarity(x, x @ random_rotation(10, 5) * 3 + 1, "mean") == pytest.approx(1.0, abs=1e-9)
    # The same strong directions with other noise: the noise is cut before it is compared (uncut,
    # its 4 directions would add 4 correlations near 0: about 0.6).
    renoised = np.hstack([strong, rng.standard_normal((4000, 4)) * 0.05]) @ random_rotation(10, 1)
    assert cca_similarity(x, renoised, "mean") == pytest.approx(1.0, abs=1e-3)
    assert cca_similarity(x, renoised, "mean", kept=1.0) == pytest.approx(0.6, abs=0.03)
    assert cca_similarity(x, y, "mean") == pytest.approx(cca_similarity(y, x, "mean"), abs=1e-12)
    # PWCCA weighs the first argument's side: Y's shared half carries half its variance, so Y
    # against X weighs the correlations of 1 by about half; X against Y weighs by X's directions.
    assert cca_similarity(y, x, "projection") == pytest.approx(0.5, abs=0.05)
    assert cca_similarity(x, y, "projection") != pytest.approx(cca_similarity(y, x, "projection"), abs=1e-3)
    assert np.isnan(cca_similarity(x, np.ones((4000, 3))))  # no variance: undefined
    for weighting in ("mean", "projection"):  # rounding noise left by centring is no variance either
        assert np.isnan(cca_similarity(np.full((4000, 5), 0.1), np.full((4000, 3), 0.7), weighting))


@pytest.mark.parametrize("measure,weighting", [("svcca", "mean"), ("pwcca", "projection")])
def test_cca_from_moments_equals_the_computation_on_the_frames(measure, weighting):
    """Eigenvectors of the covariances (what streams) against SVDs of the centred frames."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 12)) @ rng.standard_normal((12, 12)) + 4
    y = x[:, :5] @ rng.standard_normal((5, 9)) + 0.7 * rng.standard_normal((3000, 9))
    moments = from_moments(measure, len(x), x.sum(0), y.sum(0), x.T @ y, x.T @ x, y.T @ y)
    assert moments == pytest.approx(cca_similarity(x, y, weighting), abs=1e-10)


@pytest.mark.parametrize("measure,weighting", [("svcca", "mean"), ("pwcca", "projection")])
def test_streamed_cca_equals_in_memory_on_the_same_sampled_frames(stores, monkeypatch, measure, weighting):
    monkeypatch.setattr(sim, "SAMPLED_ROWS", 150)
    monkeypatch.setattr(sim, "READ_FRAMES", 400)
    a = open_store(stores["tiny"])
    lengths = np.array([u.length for u in a.utterances("dev")])
    rows = sample_frames(lengths, a.usable("dev"), 1000, 4)
    for other in ("tiny-ln", "tiny"):  # two stores, and one store against itself (PWCCA's mirror computed)
        budget = 8 * a.layers["layer00"] * sum(a.layers.values())
        r = similarity(stores["tiny"], None if other == "tiny" else stores[other], measure=measure, max_frames=1000,
                       seed=4, memory_budget=budget, progress=False)
        b = open_store(stores[other])
        xs = [a.read_layer("dev", name)[0][rows] for name in a.layers]
        ys = [b.read_layer("dev", name)[0][rows] for name in b.layers]
        expected = np.array([[cca_similarity(x, y, weighting) for y in ys] for x in xs])
        np.testing.assert_allclose(r.matrix, expected, rtol=0, atol=1e-8)
        assert r.record["measure"] == measure and r.record["kept_variance"] == 0.99
        for side, store in (("a", a), ("b", b)):  # each layer's cut, as the in-memory SVD makes it
            frames = {name: store.read_layer("dev", name)[0][rows].astype(float) for name in store.layers}
            power = {name: np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2 for name, x in frames.items()}
            assert r.record["kept_directions"][side] == {
                name: int(np.searchsorted(np.cumsum(p) / p.sum(), 0.99 - 1e-12)) + 1 for name, p in power.items()}
    np.testing.assert_allclose(np.diag(r.matrix), 1.0, atol=1e-9)


@pytest.mark.parametrize("measure", ["cka", "svcca", "pwcca"])
def test_a_constant_layer_is_undefined_not_perfectly_similar(tmp_path, measure):
    """Centred from streamed moments, a constant layer (0.1 and offsets: not exact in binary)
    leaves rounding noise, which must not pass for variance."""
    constant = (np.float32(0.1) + np.arange(DIM, dtype=np.float32) * np.float32(0.3))
    path = write_store(tmp_path / "c.zarr", [40, 70, 55, 90],
                       lambda name, x: np.broadcast_to(constant, x.shape) if name == "layer02" else x)
    r = similarity(path, measure=measure, progress=False)
    assert np.isnan(r.matrix[2]).all() and np.isnan(r.matrix[:, 2]).all()
    assert np.isfinite(r.matrix[:2, :2]).all()


@pytest.mark.parametrize("measure,weighting", [("cka", None), ("svcca", "mean"), ("pwcca", "projection")])
def test_features_far_from_zero_keep_their_precision(tmp_path, measure, weighting):
    """Moments are taken about a shift: features around 1e4 (W2V has such outlier dimensions)
    give what the in-memory computation gives."""
    path = write_store(tmp_path / "far.zarr", [40, 70, 55, 90], lambda name, x: x + 1e4 if name == "layer00" else x)
    r = similarity(path, measure=measure, progress=False)
    store = open_store(path)
    xs = [store.read_layer("dev", name)[0].astype(float) for name in store.layers]
    pair = (lambda x, y: linear_cka(x, y)) if measure == "cka" else (lambda x, y: cca_similarity(x, y, weighting))
    np.testing.assert_allclose(r.matrix, [[pair(x, y) for y in xs] for x in xs], rtol=0, atol=1e-9)


def test_utterances_that_failed_to_decode_are_left_out(tmp_path):
    lengths = [11, 30, 7, 19, 25, 14, 9, 40]
    a = write_store(tmp_path / "a.zarr", lengths, failed={"utt-003"})
    b = write_store(tmp_path / "b.zarr", lengths, lambda name, x: np.sin(x), failed={"utt-005"})
    r = similarity(a, b, progress=False)
    store = open_store(a)
    usable = store.usable("dev") & open_store(b).usable("dev")
    assert usable.sum() == len(lengths) - 2
    lengths = np.array([u.length for u in store.utterances("dev")])
    assert r.frames == r.frames_available == lengths[usable].sum()
    rows = sample_frames(lengths, usable, None, 0)
    np.testing.assert_allclose(r.matrix, in_memory(a, b, "dev", rows), rtol=0, atol=1e-10)


def test_stores_of_other_utterances_or_frame_counts_are_refused(stores, tmp_path):
    with pytest.raises(W2VCacheError, match=r"has 12 utterance\(s\) of split dev that store .*other.zarr lacks"):
        similarity(stores["tiny"], stores["other"], progress=False)
    a = write_store(tmp_path / "a.zarr", [11, 30, 7, 19])
    b = write_store(tmp_path / "b.zarr", [11, 30, 8, 19])
    with pytest.raises(W2VCacheError, match=r"^frame counts differ at utterance utt-002 of split dev: 7 in store "):
        similarity(a, b, progress=False)
    with pytest.raises(W2VCacheError, match="has no split 'test'"):
        similarity(a, split="test", progress=False)
    with pytest.raises(W2VCacheError, match="has no layer layer09"):
        similarity(a, layers="9", progress=False)
    with pytest.raises(W2VCacheError, match="choose one of cka, svcca, pwcca"):
        similarity(a, measure="cca", progress=False)


# ---------------------------------------------------------------------------------------------
# Files and the command


def test_command_writes_json_csv_and_figure(stores, tmp_path):
    out = tmp_path / "sim"
    result = cli(stores["tiny"], stores["tiny-ln"], "--layers", "1-3", "--max-frames", 800, "--out", out)
    assert result.exit_code == 0, result.output
    assert "linear CKA of 3 x 3 layers" in result.output and "same layer: layer01 0." in result.output
    assert sorted(p.name for p in out.iterdir()) == ["similarity.csv", "similarity.json", "similarity.png"]
    saved = json.loads((out / "similarity.json").read_text())
    assert saved["measure"] == "linear_cka" and saved["split"] == "dev" and saved["frames"] == 800
    assert saved["layers_a"] == saved["layers_b"] == ["layer01", "layer02", "layer03"]
    assert len(saved["matrix"]) == 3 and saved["diagonal"] == [saved["matrix"][k][k] for k in range(3)]
    assert saved["store_a"]["model"] == "builtin:tiny" and saved["store_b"]["model"] == "builtin:tiny-ln"
    assert saved["store_a"]["weight_hash"] != saved["store_b"]["weight_hash"]
    assert {"seed", "max_frames", "passes", "seconds", "versions", "created", "config"} <= set(saved)
    rows = (out / "similarity.csv").read_text().splitlines()
    assert rows[0] == "layer,layer01,layer02,layer03" and len(rows) == 4
    assert float(rows[1].split(",")[1]) == saved["matrix"][0][0]
    drawn = [read_similarity(out / "similarity.json", "sim")]
    assert drawn[0].diagonal is not None  # so the figure has the heatmap and the diagonal's curve
    assert png_size(out / "similarity.png") == similarity_figure_size(drawn)
    pw = cli(stores["tiny"], stores["tiny-ln"], "--layers", "1-3", "--max-frames", 800, "--measure", "pwcca",
             "--out", tmp_path / "pw")
    assert pw.exit_code == 0, pw.output
    assert "PWCCA of 3 x 3 layers" in pw.output
    assert json.loads((tmp_path / "pw/similarity.json").read_text())["measure"] == "pwcca"
    dim = open_store(stores["tiny"]).layers["layer01"]
    few = cli(stores["tiny"], stores["tiny-ln"], "--layers", "1-3", "--max-frames", 2 * dim, "--measure", "svcca",
              "--out", tmp_path / "few")
    assert few.exit_code == 0 and (f"note: {2 * dim} frames for layers up to {dim} wide: SVCCA finds chance "
                                   f"correlations of about 0.71 (sqrt({dim} / {2 * dim}) = 0.71)") in few.output, few.output
    assert "chance" not in cli(stores["tiny"], stores["tiny-ln"], "--layers", "1-3", "--max-frames", 2 * dim,
                               "--out", tmp_path / "cka").output


def test_command_refuses_other_utterances_in_one_line(stores, tmp_path):
    result = cli(stores["tiny"], stores["other"], "--out", tmp_path / "sim")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: store ") and "lacks" in lines[0]
    assert not (tmp_path / "sim").exists()


def test_an_out_folder_it_cannot_write_is_refused_before_the_work(stores, tmp_path, monkeypatch):
    import os

    folder = tmp_path / "shared"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(folder) and mode == os.W_OK
                        else real_access(path, mode))
    monkeypatch.setattr(sim, "sample_frames", lambda *a, **k: pytest.fail("the work began"))
    result = cli(stores["tiny"], "--out", folder / "sim")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: --out {folder / 'sim'}: cannot write in {folder} (a read-only file system" in result.output


def test_without_matplotlib_the_tables_are_written_and_the_figure_is_said_missing(stores, tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    out = tmp_path / "sim"
    result = cli(stores["tiny"], "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["similarity.csv", "similarity.json"]
    assert "figure: not drawn: matplotlib is missing (pip install 'w2vcache[plots]')" in result.output
