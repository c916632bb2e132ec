"""Layer x layer similarity of stored features, within one store or between two: linear CKA,
SVCCA or PWCCA.

Linear CKA (Kornblith et al. 2019) of X (n x p) and Y (n x q), the same n frames through two layers,
columns centred:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

It is 1 when Y is X up to a rotation, a uniform scale and a translation, and near 0 for unrelated
features. Between a fine-tuned model's store and its pre-trained model's store (the same
utterances), the diagonal CKA(layer k, layer k) says how much fine-tuning changed each layer
(Pasad et al. 2021); docs/ANALYSES.md says more.

SVCCA (Raghu et al. 2017) cuts each layer to its principal directions holding 99 % of its variance
and averages the canonical correlations of the two; PWCCA (Morcos et al. 2018) weighs each
correlation by how much of the first layer's directions its canonical variate accounts for. Both
come from the same moments as CKA (covariances, cross-covariance), so they stream alike.

The computation streams: a seeded sample of frames is read utterance by utterance and only its
float64 moments are kept (column sums, X^T X per layer, X^T Y per layer pair, each about a fixed
shift per layer so that features far from 0 keep their precision), centred at the end
(X^T Y - n mu_x mu_y^T). Memory is the size of those products, not of the split; when all pairs do
not fit in `memory_budget`, the layers of store A are taken in groups, one pass over the sample
each.
"""

import csv
import io
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import record
from .errors import W2VCacheError
from .figure import can_plot, write_similarity_figure
from .layers import choose_layers
from .report import SIMILARITY_LABELS as LABELS, similarity_of
from .space import unwritable_folder
from .store import FeatureStore, open_store, public_url

MEASURES = ("cka", "svcca", "pwcca")
# similarity.json's name of each measure, and how figures and reports say it.
MEASURE_NAMES = {"cka": "linear_cka", "svcca": "svcca", "pwcca": "pwcca"}
# SVCCA's truncation (Raghu et al. 2017): each layer keeps its leading principal directions that
# explain this share of its variance before the CCA; the noise directions left out would otherwise
# be matched by chance, the more so the closer the width comes to the number of frames.
KEPT_VARIANCE = 0.99
DEFAULT_MAX_FRAMES = 50_000
DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of float64 products held at once
READ_FRAMES = 65_536  # store frames read per step (one layer at a time), bounding the raw read
SAMPLED_ROWS = 2_048  # sampled frames per step: enough for efficient float64 products, ~16 KB per dim
FILES = ("similarity.json", "similarity.csv", "similarity.png")


# ----------------------------------------------------------------------------------------------
# Linear CKA


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two feature matrices over the same n rows (frames), in float64, in memory.

    NaN when either has no variance (CKA is undefined there)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"linear_cka needs two (n, dim) arrays of the same n, got {x.shape} and {y.shape}")
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    if not (_any_variance(x, xc) and _any_variance(y, yc)):
        return float("nan")
    return _cka(yc.T @ xc, xc.T @ xc, yc.T @ yc)


def cka_from_moments(n: int, sum_x: np.ndarray, sum_y: np.ndarray, xty: np.ndarray, xtx: np.ndarray,
                     yty: np.ndarray) -> float:
    """Linear CKA from uncentred float64 moments over n rows: column sums, X^T Y, X^T X, Y^T Y."""
    return from_moments("cka", n, sum_x, sum_y, xty, xtx, yty)


def _cka(cross: np.ndarray, gram_x: np.ndarray, gram_y: np.ndarray) -> float:
    denominator = np.linalg.norm(gram_x) * np.linalg.norm(gram_y)
    if not denominator > 0:
        return float("nan")
    return float(np.linalg.norm(cross) ** 2 / denominator)


# ----------------------------------------------------------------------------------------------
# CCA: SVCCA and PWCCA


def _kept(variances: np.ndarray, kept: float) -> int:
    """How many of the leading directions (variances in decreasing order) explain `kept` of the
    variance; never one of (numerically) no variance, and none when there is no variance."""
    total = variances.clip(min=0).sum()
    if not total > 0:
        return 0
    k = int(np.searchsorted(np.cumsum(variances) / total, kept - 1e-12)) + 1
    return min(k, int((variances > variances[0] * 1e-12).sum()))


def principal_cut(cov: np.ndarray, kept: float = KEPT_VARIANCE) -> tuple[np.ndarray, np.ndarray]:
    """The leading eigenvectors (columns) and eigenvalues of a covariance matrix that explain
    `kept` of its variance (SVCCA's cut of one layer)."""
    values, vectors = np.linalg.eigh(cov)
    values, vectors = values[::-1], vectors[:, ::-1]
    k = _kept(values, kept)
    return np.ascontiguousarray(vectors[:, :k]), values[:k].copy()  # not views keeping all p x p alive


def _cca(cross: np.ndarray, cut_x: tuple[np.ndarray, np.ndarray], cut_y: tuple[np.ndarray, np.ndarray],
         weighting: str) -> float:
    """SVCCA ("mean": the mean canonical correlation) or PWCCA ("projection": the correlations
    weighted by how much of X's own directions each canonical variate accounts for, Morcos et al.
    2018) from the centred cross-covariance and each side's principal cut.

    In each side's whitened principal coordinates the canonical correlations are the singular
    values of the cross-covariance; X's canonical variate i projects on X's kept directions by
    sqrt(eigenvalue) times its singular vector's entries, and its PWCCA weight is the sum of the
    absolute projections on X's columns. PWCCA weighs X's side: (X, Y) and (Y, X) differ."""
    (vx, lx), (vy, ly) = cut_x, cut_y
    if not len(lx) or not len(ly):
        return float("nan")
    whitened = (vx.T @ cross @ vy) / np.sqrt(lx)[:, None] / np.sqrt(ly)[None, :]
    u, rho, _ = np.linalg.svd(whitened, full_matrices=False)
    rho = rho.clip(0.0, 1.0)
    if weighting == "mean":
        return float(rho.mean())
    weights = np.abs(vx @ (np.sqrt(lx)[:, None] * u)).sum(axis=0)
    return float((weights * rho).sum() / weights.sum())


def cca_similarity(x: np.ndarray, y: np.ndarray, weighting: str = "mean", kept: float = KEPT_VARIANCE) -> float:
    """SVCCA (weighting "mean") or PWCCA ("projection") of two feature matrices over the same n
    rows, in float64, in memory: each side truncated by an SVD of its centred frames to the
    leading directions explaining `kept` of its variance, then the canonical correlations of the
    two orthonormal bases (the singular values of their product)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"cca_similarity needs two (n, dim) arrays of the same n, got {x.shape} and {y.shape}")
    bases = []
    for raw in (x, y):
        z = raw - raw.mean(axis=0)
        if not _any_variance(raw, z):
            return float("nan")
        u, sv, _ = np.linalg.svd(z, full_matrices=False)
        k = _kept(sv**2, kept)
        if not k:
            return float("nan")
        bases.append(u[:, :k])
    a, rho, _ = np.linalg.svd(bases[0].T @ bases[1], full_matrices=False)
    rho = rho.clip(0.0, 1.0)
    if weighting == "mean":
        return float(rho.mean())
    variates = bases[0] @ a  # X's canonical variates, orthonormal
    weights = np.abs(variates.T @ (x - x.mean(axis=0))).sum(axis=1)
    return float((weights * rho).sum() / weights.sum())


def from_moments(measure: str, n: int, sum_x: np.ndarray, sum_y: np.ndarray, xty: np.ndarray, xtx: np.ndarray,
                 yty: np.ndarray, cuts=None) -> float:
    """`measure` (one of MEASURES) of X and Y from their uncentred float64 moments over n rows;
    NaN when either has no variance. `cuts`: for SVCCA and PWCCA, each side's principal_cut of its
    covariance when already known (a layer's serves every pair it is in)."""
    if not (varies(n, sum_x, xtx) and varies(n, sum_y, yty)):
        return float("nan")
    mu_x, mu_y = sum_x / n, sum_y / n
    cross = xty - n * np.outer(mu_x, mu_y)
    if measure == "cka":
        return _cka(cross, centred_gram(n, sum_x, xtx), centred_gram(n, sum_y, yty))
    if cuts is None:
        cuts = principal_cut(centred_gram(n, sum_x, xtx) / n), principal_cut(centred_gram(n, sum_y, yty) / n)
    return _cca(cross / n, *cuts, "mean" if measure == "svcca" else "projection")


def varies(n: int, sums: np.ndarray, gram: np.ndarray) -> bool:
    """Whether the columns vary at all. Centring uncentred moments leaves rounding noise where a
    layer is constant (its values not exact in binary), which CKA would divide by and CCA whiten
    into perfect correlations: variance below 1e-9 of the mean square is taken for none."""
    return _enough_variance(float(np.trace(centred_gram(n, sums, gram))), float(np.trace(gram)))


def _any_variance(raw: np.ndarray, centred: np.ndarray) -> bool:
    """varies() for frames in memory: centring a constant layer leaves the same rounding noise."""
    return _enough_variance(float(np.square(centred).sum()), float(np.square(raw).sum()))


def _enough_variance(centred: float, total: float) -> bool:
    return total > 0 and centred > 1e-9 * total


def centred_gram(n: int, sums: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """X^T X of the centred columns, from the uncentred one and the column sums over n rows."""
    mu = sums / n
    return gram - n * np.outer(mu, mu)


# ----------------------------------------------------------------------------------------------
# The frame sample


def sample_frames(lengths: np.ndarray, usable: np.ndarray, max_frames: int | None, seed: int) -> np.ndarray:
    """Sorted rows of the seeded frame sample, as indices into the utterances laid end to end in
    store order (the rows `FeatureStore.read_layer` returns): `max_frames` drawn uniformly without
    replacement from the frames of usable utterances, or all of them when there are no more.

    It depends only on the lengths, the usable mask and the seed, so two stores of the same
    utterances get the same frames."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    candidates = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in np.flatnonzero(usable)]
                                or [np.zeros(0, dtype=np.int64)])
    if max_frames is None or max_frames >= len(candidates):
        return candidates
    rng = np.random.default_rng(seed)
    return candidates[np.sort(rng.choice(len(candidates), size=max_frames, replace=False))]


# ----------------------------------------------------------------------------------------------
# The analysis


@dataclass
class SimilarityConfig:
    split: str = "dev"
    layers: str = "all"  # chosen in each store alike: all, 0,4-8, cnn,layer08
    measure: str = "cka"
    max_frames: int | None = DEFAULT_MAX_FRAMES  # None: every frame of the split
    seed: int = 0
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes of float64 products held at once


@dataclass
class SimilarityResult:
    measure: str
    split: str
    layers_a: list[str]
    layers_b: list[str]
    matrix: np.ndarray  # (len(layers_a), len(layers_b)); NaN where a layer has no variance
    # Two stores: each layer of A against B's layer of the same name (None where B lacks it).
    # None within one store, or where the two share no layer name.
    diagonal: list[float | None] | None
    frames: int  # frames in the sample
    frames_available: int  # frames of the utterances usable in both stores
    utterances: int  # utterances with at least one sampled frame
    passes: int  # passes over the sample (more than one when the products exceed the budget)
    seconds: float
    record: dict = field(repr=False)  # what similarity.json holds
    files: dict[str, Path | None] = field(default_factory=dict)  # json, csv, png (None: not drawn)
    # SVCCA, PWCCA: directions each layer kept after the cut, {"a": {layer: k}, "b": {...}}
    # (None for CKA; a layer without variance keeps none).
    kept_directions: dict | None = None


def similarity(store_a, store_b=None, split: str = "dev", layers="all", measure: str = "cka",
               max_frames: int | None = DEFAULT_MAX_FRAMES, seed: int = 0, out=None, figure: bool = True,
               memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool = True) -> SimilarityResult:
    """`measure` (cka: linear CKA; svcca; pwcca) between every layer of `store_a` and every layer
    of `store_b` (itself when None) over a seeded sample of the split's frames. With `out`, writes
    similarity.json, .csv and .png there (the figure only where matplotlib is installed: the
    'plots' extra).

    Stores are paths, URLs or open FeatureStores; two stores must hold the same utterances of the
    split with the same frame counts (a fine-tuned model's and its pre-trained model's)."""
    config = SimilarityConfig(split=split, layers=layers, measure=measure, max_frames=max_frames, seed=seed,
                              memory_budget=memory_budget)
    if measure not in MEASURES:
        raise W2VCacheError(f"--measure {measure!r}: choose one of {', '.join(MEASURES)}")
    if max_frames is not None and max_frames < 2:
        raise W2VCacheError(f"--max-frames {max_frames}: {LABELS[MEASURE_NAMES[measure]]} needs at least 2 frames")
    if out is not None and Path(out).exists() and not Path(out).is_dir():  # say so before the work, not after
        raise W2VCacheError(f"{out}: exists and is not a directory")
    if out is not None and (folder := unwritable_folder(str(out))):
        raise W2VCacheError(f"--out {out}: cannot write in {folder} (a read-only file system, or no permission)")
    started = time.perf_counter()
    opened = []
    try:
        a = _open(store_a, opened)
        b = a if store_b is None else _open(store_b, opened)
        names_a = choose_layers(layers, list(a.layers), "--layers", owner=f"store {a.path}")
        names_b = choose_layers(layers, list(b.layers), "--layers", owner=f"store {b.path}")
        positions_b, usable = _common_utterances(a, b, split)
        lengths = np.array([u.length for u in a.utterances(split)], dtype=np.int64)
        rows = sample_frames(lengths, usable, max_frames, seed)
        if len(rows) < 2:
            raise W2VCacheError(f"split {split} of store {a.path}: {len(rows)} usable frame(s); "
                                f"{LABELS[MEASURE_NAMES[measure]]} needs at least 2")
        widest = max(store.layers[name] for store, names in ((a, names_a), (b, names_b)) for name in names)
        chance = (widest / len(rows)) ** 0.5
        if measure != "cka" and progress and chance > 0.2:
            # Canonical correlations of p directions over n frames reach about sqrt(p / n) by chance
            # alone: with n near p every pair of layers looks alike.
            print(f"note: {len(rows)} frames for layers up to {widest} wide: {LABELS[MEASURE_NAMES[measure]]} finds "
                  f"chance correlations of about {min(chance, 1.0):.2f} (sqrt({widest} / {len(rows)}) = {chance:.2f}) "
                  "between unrelated "
                  "layers; more frames (--max-frames) bring them down (docs/ANALYSES.md)", file=sys.stderr)
        matrix, n_utterances, passes, kept = _stream(measure, a, b, split, names_a, names_b, lengths, rows,
                                                     positions_b, memory_budget, progress)
        same = b is a
        # Each layer of A against the layer of B of the same name (None where B lacks it: a store
        # extracted with --cnn against one without still has its blocks' diagonal).
        shared = not same and set(names_a) & set(names_b)
        diagonal = [float(matrix[k, names_b.index(name)]) if name in names_b else None
                    for k, name in enumerate(names_a)] if shared else None
        seconds = time.perf_counter() - started
        result = SimilarityResult(
            measure=MEASURE_NAMES[measure], split=split, layers_a=names_a, layers_b=names_b, matrix=matrix,
            diagonal=diagonal, frames=len(rows), frames_available=int(lengths[usable].sum()),
            utterances=n_utterances, passes=passes, seconds=seconds, record={}, kept_directions=kept)
        result.record = _record(result, config, a, None if same else b)
    finally:
        for store in opened:
            store.close()
    if out is not None:
        write_files(result, out, figure=figure)
    return result


def _open(store, opened: list) -> FeatureStore:
    if isinstance(store, FeatureStore):
        return store
    store = open_store(store)
    opened.append(store)
    return store


def _complete(store: FeatureStore, split: str) -> None:
    if not store.status(split, refresh=True).complete:
        raise W2VCacheError(store.incomplete_message(split))


def _common_utterances(a: FeatureStore, b: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Store B's position of each of store A's utterances, and the mask of those usable in both;
    refuses stores whose utterances or frame counts differ."""
    _complete(a, split)
    if b is a:
        return np.arange(len(a.utterances(split))), a.usable(split)
    _complete(b, split)
    utts_a, utts_b = a.utterances(split), b.utterances(split)
    ids_a, ids_b = [u.id for u in utts_a], [u.id for u in utts_b]
    for (x, ids_x), (y, ids_y) in (((a, ids_a), (b, ids_b)), ((b, ids_b), (a, ids_a))):
        extra = sorted(set(ids_x) - set(ids_y))
        if extra:
            raise W2VCacheError(f"store {x.path} has {len(extra)} utterance(s) of split {split} that store "
                                f"{y.path} lacks (first: {extra[0]}); similarity needs the same utterances in both")
    position_b = {u: i for i, u in enumerate(ids_b)}
    positions_b = np.array([position_b[u] for u in ids_a], dtype=np.int64)
    for u, i in zip(utts_a, positions_b):
        if u.length != utts_b[i].length:
            raise W2VCacheError(f"frame counts differ at utterance {u.id} of split {split}: {u.length} in store "
                                f"{a.path}, {utts_b[i].length} in store {b.path}; the stores' models must "
                                f"have the same frame rate")
    return positions_b, a.usable(split) & b.usable(split)[positions_b]


def _steps(lengths: np.ndarray, rows: np.ndarray) -> list[tuple[list[int], np.ndarray]]:
    """The sample in reading steps of consecutive utterances: (utterance positions, the sampled
    frames within their concatenation). Utterances without a sampled frame are not read."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    owner = np.searchsorted(offsets, rows, side="right") - 1
    read, first = np.unique(owner, return_index=True)  # rows are sorted: each utterance's are together
    steps, utts, local, frames, count = [], [], [], 0, 0
    for i, first, stop in zip(read, first, np.append(first[1:], len(rows))):
        utts.append(int(i))
        local.append(rows[first:stop] - offsets[i] + frames)
        frames += int(lengths[i])
        count += stop - first
        if frames >= READ_FRAMES or count >= SAMPLED_ROWS:
            steps.append((utts, np.concatenate(local)))
            utts, local, frames, count = [], [], 0, 0
    if utts:
        steps.append((utts, np.concatenate(local)))
    return steps


def _sampled(store: FeatureStore, split: str, layer: str, positions: list[int], local: np.ndarray) -> np.ndarray:
    """The sampled frames of one layer over one step's utterances, in float64."""
    return np.concatenate(store.read_batch(split, layer, positions))[local].astype(np.float64)


def _groups(dims_a: list[int], dims_b: list[int], budget: int) -> list[list[int]]:
    """Store A's layers in groups whose products with all of store B's layers fit the budget."""
    per_b = 8 * sum(dims_b)
    groups, current, size = [], [], 0
    for k, p in enumerate(dims_a):
        if current and size + p * per_b > budget:
            groups.append(current)
            current, size = [], 0
        current.append(k)
        size += p * per_b
    groups.append(current)
    return groups


def _stream(measure, a, b, split, names_a, names_b, lengths, rows, positions_b, budget, progress):
    """Accumulate the float64 moments of the sample step by step; `measure` of every pair from them."""
    dims_a = [a.layers[n] for n in names_a]
    dims_b = [b.layers[n] for n in names_b]
    starts_b = np.concatenate([[0], np.cumsum(dims_b)])
    steps = _steps(lengths, rows)
    groups = _groups(dims_a, dims_b, budget)
    n = len(rows)
    sums_a = [np.zeros(p) for p in dims_a]
    grams_a = [np.zeros((p, p)) for p in dims_a]
    same = b is a and names_b == names_a
    # Within one store the layers of B are those of A: their moments are the same arrays.
    sums_b = sums_a if same else [np.zeros(p) for p in dims_b]
    grams_b = grams_a if same else [np.zeros((p, p)) for p in dims_b]
    matrix = np.full((len(names_a), len(names_b)), np.nan)
    utterances = sum(len(u) for u, _ in steps)
    made: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    shifts: dict[tuple[str, int], np.ndarray] = {}

    def sampled(side: str, store: FeatureStore, k: int, name: str, positions, local) -> np.ndarray:
        """A layer's sampled frames less a fixed shift, its first step's mean: moments taken about
        it keep their precision where features sit far from 0, and no measure here sees a shift."""
        x = _sampled(store, split, name, positions, local)
        key = ("a" if same else side, k)
        if key not in shifts:
            shifts[key] = x.mean(axis=0)
        x -= shifts[key]
        return x

    def cut(side: str, k: int):
        """SVCCA/PWCCA: a layer's principal cut (an eigendecomposition), made once, not once per pair."""
        side = "a" if same else side
        if (side, k) not in made:
            sums, grams = (sums_a, grams_a) if side == "a" else (sums_b, grams_b)
            made[side, k] = principal_cut(centred_gram(n, sums[k], grams[k]) / n)
        return made[side, k]

    bar = tqdm(total=utterances * len(groups), desc="similarity", unit="utt", disable=not progress)
    try:
        for g, group in enumerate(groups):
            # Within one store the matrix is symmetric: layer k's products start at B's layer k.
            first = {k: int(starts_b[k]) if same else 0 for k in group}
            cross = [np.zeros((dims_a[k], starts_b[-1] - first[k])) for k in group]
            for positions, local in steps:
                xs = {k: sampled("a", a, k, names_a[k], positions, local)
                      for k in (range(len(names_a)) if g == 0 else group)}
                # Store B's layers side by side, each a view: one product per layer of A with all of them.
                y_all = np.empty((len(local), starts_b[-1]))
                ys = [y_all[:, starts_b[j]:starts_b[j + 1]] for j in range(len(names_b))]
                bpos = [int(positions_b[i]) for i in positions]
                for j, y in enumerate(ys):
                    if same and j < group[0]:
                        continue  # within one store a pass needs B's layers from its own first layer on
                    y[:] = xs[j] if same and j in xs else sampled("b", b, j, names_b[j], bpos, local)
                if g == 0:  # sums and Gram matrices of every layer, in the first pass only
                    for k, x in xs.items():
                        sums_a[k] += x.sum(axis=0)
                        grams_a[k] += x.T @ x
                    for k, y in enumerate(ys if not same else ()):
                        sums_b[k] += y.sum(axis=0)
                        grams_b[k] += y.T @ y
                for c, k in zip(cross, group):
                    c += xs[k].T @ y_all[:, first[k]:]
                bar.update(len(positions))
            for c, k in zip(cross, group):
                for j in range(k if same else 0, len(names_b)):
                    block = c[:, starts_b[j] - first[k]:starts_b[j + 1] - first[k]]
                    cuts = None if measure == "cka" else (cut("a", k), cut("b", j))
                    matrix[k, j] = from_moments(measure, n, sums_a[k], sums_b[j], block, grams_a[k], grams_b[j], cuts)
                    if same:  # PWCCA weighs its first layer's side: the mirror is computed, not copied
                        matrix[j, k] = matrix[k, j] if measure != "pwcca" else from_moments(
                            measure, n, sums_b[j], sums_a[k], block.T, grams_b[j], grams_a[k], cuts[::-1])
    finally:
        bar.close()
    kept = None
    if measure != "cka":
        kept = {side: {name: len(cut(side, k)[1]) if varies(n, sums[k], grams[k]) else 0
                       for k, name in enumerate(names)}
                for side, names, sums, grams in (("a", names_a, sums_a, grams_a), ("b", names_b, sums_b, grams_b))}
    return matrix, utterances, len(groups), kept


def _record(result: SimilarityResult, config: SimilarityConfig, a: FeatureStore, b: FeatureStore | None) -> dict:
    """Everything the run did, as similarity.json holds it."""

    def about(store):
        model = store.model
        return {"path": public_url(store.path), "model": model["name"], "revision": model["revision"],
                "weight_hash": model["weight_hash"], "dtype": store.dtype}

    return {
        "measure": result.measure,
        "kept_variance": None if result.measure == "linear_cka" else KEPT_VARIANCE,  # the CCAs' cut
        "kept_directions": result.kept_directions,
        "split": result.split,
        "layers_a": result.layers_a,
        "layers_b": result.layers_b,
        "matrix": [[_number(v) for v in row] for row in result.matrix],
        "diagonal": None if result.diagonal is None else [None if v is None else _number(v) for v in result.diagonal],
        "frames": result.frames,
        "frames_available": result.frames_available,
        "utterances": result.utterances,
        "seed": config.seed,
        "max_frames": config.max_frames,
        "passes": result.passes,
        "store_a": about(a),
        "store_b": None if b is None else about(b),
        "config": asdict(config),
        "seconds": round(result.seconds, 3),
        "created": record.now(),
        "command": record.command_line(),
        "versions": record.versions(),
    }


def _number(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


# ----------------------------------------------------------------------------------------------
# Files


def write_files(result: SimilarityResult, out, figure: bool = True) -> dict[str, Path | None]:
    """similarity.json, similarity.csv and (with matplotlib) similarity.png under `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise W2VCacheError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path | None] = {"json": out / FILES[0], "csv": out / FILES[1]}
    record.write_json(files["json"], result.record)
    with record.replacing(files["csv"]) as tmp:
        tmp.write_text(render_csv(result))
    if figure:
        files["png"] = write_figure(result, files["json"], out / FILES[2]) if can_plot() else None
    result.files = files
    return files


def render_csv(result: SimilarityResult) -> str:
    """Rows: store A's layers; columns: store B's layers; empty where the measure is undefined."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", *result.layers_b])
    for name, row in zip(result.layers_a, result.matrix):
        writer.writerow([name, *("" if np.isnan(v) else repr(float(v)) for v in row)])
    return buffer.getvalue()


def write_figure(result: SimilarityResult, json_path: Path, path: Path) -> Path:
    """The report's similarity figure of this one result (figure.py): its heatmap and, between two
    stores of the same layers, the same-layer curve."""
    return write_similarity_figure([similarity_of(result.record, json_path, json_path.parent.name)], path)
