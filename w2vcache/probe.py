"""Frozen-feature probes: a BiLSTM-CTC (or a linear layer with CTC) trained on one cached layer,
or on a learnt weighted sum of all of them, and the layer sweep.

The probe reads features from the store only: W2V is never run. A split's layer is held in
memory as stored (float16: 2.8 GB for W2V-Base over Libri-light's 10 h) and converted per batch;
a layer larger than the memory budget is read from the store batch by batch instead, each batch
being a run of neighbouring utterances (the store keeps them sorted by length), so a read touches
few chunks. A weighted probe reads every numbered layer, the budget covering them all.

Kinds of probe:
- "bilstm": the paper's, a bidirectional LSTM and a linear layer to the symbols.
- "linear": one linear layer per frame to the symbols, with CTC: the least a layer must make
  readable; the cheapest, a sweep runs in minutes on a CPU.
- either, on `--layer weighted`: softmax(w)-weighted sum of the layers first, w learnt with the
  probe (SUPERB's weighted-sum featurizer, as in s3prl), each layer optionally layer-normalised.
"""

import functools
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import text
from .batching import length_batches
from .errors import W2VCacheError
from .layers import WEIGHTED, choose_layers, layer_index, weighted_layers
from .runs import LAYER_WEIGHTS, PROBES, RunRecord, SweepResult, probe_experiment, run_dir
from .spread import rank_device, share_of
from .store import open_store
from .train import TrainConfig, seed_everything, sweep, test_splits_for, train

DEFAULT_MEMORY_BUDGET = 8 * 2**30  # bytes of one split's features (all the layers read) kept in memory; more stream
# The LSTM computes on every padded frame, so a batch is also cut where padding would pass this share.
# Neighbours in a large corpus's length order differ by a frame or less and never reach it; on a
# small one (the bundled train split) it turns 2 batches with 14 % padding into a few with under 5 %.
MAX_PADDING = 0.05


@dataclass
class ProbeConfig:
    lstm_layers: int = 3  # bilstm only
    hidden: int = 1024  # per direction; bilstm only
    dropout: float = 0.0  # between LSTM layers and before the output layer; bilstm only
    batch_frames: int = 16000  # padded frames per batch (320 s of audio at 50 frames/s)
    probe: str = "bilstm"  # or "linear"
    layer_norm: bool = False  # weighted probes: layer-normalise each layer before the sum (s3prl's normalize)

    def record(self, weighted: bool) -> dict:
        """config.json's "model": the options this probe uses, and only those (a linear probe has
        no LSTM, so --hidden, --lstm-layers and --dropout are not recorded for it)."""
        used = ("lstm_layers", "hidden", "dropout", "batch_frames") if self.probe == "bilstm" else ("batch_frames",)
        found = {k: getattr(self, k) for k in used}
        return (found | {"layer_norm": self.layer_norm}) if weighted else found


class Probe(nn.Module):
    """Bidirectional LSTM over one layer's frames, a linear layer to the 30 symbols.

    The weights are an `nn.LSTM`'s (so checkpoints are plain LSTM state dicts), but the forward runs
    each direction of each layer as one call on the padded batch, which takes torch's oneDNN LSTM
    kernel on CPU: 5-7x faster than the packed-sequence kernel (`benchmarks/probe_cost.py` times
    both). Padding never reaches a real frame: the forward direction meets it only after an
    utterance's last frame, and the backward direction runs forward over each utterance reversed
    within its own length, so its padding also comes last.
    """

    def __init__(self, input_dim: int, config: ProbeConfig):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, config.hidden, num_layers=config.lstm_layers, bidirectional=True,
                            batch_first=True, dropout=config.dropout if config.lstm_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(2 * config.hidden, len(text.VOCAB))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(batch, frames, dim) padded features -> (batch, frames, symbols) log-probabilities."""
        reverse = _reversal(lengths.to(x.device), x.shape[1])
        for layer in range(self.lstm.num_layers):
            if layer:
                x = nn.functional.dropout(x, self.lstm.dropout, self.training)
            forward = self._direction(x, layer, "")
            backward = _reverse(self._direction(_reverse(x, reverse), layer, "_reverse"), reverse)
            x = torch.cat([forward, backward], dim=-1)
        return self.output(self.dropout(x)).log_softmax(-1)

    def _direction(self, x: torch.Tensor, layer: int, suffix: str) -> torch.Tensor:
        """One direction of one layer, left to right over the padded batch."""
        weights = [getattr(self.lstm, f"{name}_l{layer}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        zeros = x.new_zeros(1, x.shape[0], self.lstm.hidden_size)
        out, _, _ = torch.lstm(x, (zeros, zeros), weights, True, 1, 0.0, self.training, False, True)
        return out


class LinearProbe(nn.Module):
    """One linear layer from a frame's features to the 30 symbols, each frame on its own."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.output = nn.Linear(input_dim, len(text.VOCAB))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(batch, frames, dim) padded features -> (batch, frames, symbols) log-probabilities."""
        return self.output(x).log_softmax(-1)


class LayerMix(nn.Module):
    """softmax(w)-weighted sum over layers, w learnt; with `layer_norm`, each layer is first
    normalised over its features (no affine parameters), so the weights compare layers whose
    scales differ. w starts at 0: every layer weighs the same, as in s3prl's featurizer."""

    def __init__(self, layers: int, layer_norm: bool = False):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(layers))
        self.layer_norm = layer_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(layers, batch, frames, dim) -> (batch, frames, dim)."""
        if self.layer_norm:
            x = nn.functional.layer_norm(x, x.shape[-1:])
        return torch.einsum("l,lbtd->btd", self.weights.softmax(0), x)


class WeightedProbe(nn.Module):
    """A probe (BiLSTM or linear) on the learnt weighted sum of every layer."""

    def __init__(self, layers: int, layer_norm: bool, head: nn.Module):
        super().__init__()
        self.mix, self.head = LayerMix(layers, layer_norm), head

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(layers, batch, frames, dim) padded features -> (batch, frames, symbols) log-probabilities."""
        return self.head(self.mix(x), lengths)


def _reversal(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """Per utterance, the frame index that reverses it within its length; padding stays in place."""
    t = torch.arange(frames, device=lengths.device)
    n = lengths[:, None]
    return torch.where(t < n, n - 1 - t, t)


class _Reverse(torch.autograd.Function):
    """x.gather(1, index) for a reversal index. A reversal is its own inverse, so the gradient is the
    same gather, not gather's general scatter-add (measured: the probe's step 4 % faster)."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        return x.gather(1, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.gather(1, index), None


def _reverse(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _Reverse.apply(x, index[..., None].expand(-1, -1, x.shape[-1]))


@dataclass
class Batch:
    features: torch.Tensor  # (B, T, D) float32; (layers, B, T, D) for a weighted probe
    lengths: torch.Tensor  # (B,)
    targets: torch.Tensor  # (sum of target lengths,)
    target_lengths: torch.Tensor
    references: list[str]

    @property
    def frames(self) -> int:
        return int(self.lengths.sum())


class SplitFeatures:
    """One split's layer, or layers: in memory as stored when they fit the budget together, else
    read batch by batch, layer by layer.

    Utterances that failed to decode during extraction are left out: index i here is the i-th
    usable utterance, at store position positions[i]."""

    def __init__(self, store, split: str, layers: str | list[str], memory_budget: int):
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.store, self.split, self.layer = store, split, self.layers[0]
        utterances = store.utterances(split)  # refuses a missing split, with the list of splits
        for layer in self.layers:
            if layer not in store.layers:
                raise W2VCacheError(f"store {store.path} has no layer {layer}; it has {', '.join(store.layers)}")
        self.positions = np.flatnonzero(store.usable(split))
        self.ids = [utterances[p].id for p in self.positions]
        self.texts = [utterances[p].text for p in self.positions]
        self.lengths = np.array([utterances[p].length for p in self.positions], dtype=np.int64)
        width = sum(store.layers[layer] for layer in self.layers)
        nbytes = sum(u.length for u in utterances) * width * np.dtype(store.feature_dtype).itemsize  # int8 is decoded to float32 on read
        self.in_memory = nbytes <= memory_budget
        if self.in_memory:
            self.frames = {}
            for layer in self.layers:  # refuses an incomplete split
                self.frames[layer], self.offsets = store.read_layer(split, layer)
        else:
            status = store.status(split)
            if not status.complete:
                raise W2VCacheError(
                    f"store {store.path}: split {split} is incomplete ({status.blocks_done}/{status.n_blocks} blocks); "
                    "re-run the same extract command to finish it"
                )

    def get(self, indices: list[int], layer: str | None = None) -> list[np.ndarray]:
        """The utterances' frames of `layer` (the first layer where None), as stored."""
        layer = layer or self.layer
        positions = [int(self.positions[i]) for i in indices]
        if self.in_memory:
            return [self.frames[layer][self.offsets[p]: self.offsets[p + 1]] for p in positions]
        return self.store.read_batch(self.split, layer, positions)


def batches_by_length(lengths, max_frames: int) -> list[list[int]]:
    """Runs of neighbouring utterances (the store sorts them by length) within max_frames padded."""
    return [list(range(b.start, b.stop)) for b in length_batches(lengths, max_frames, MAX_PADDING)]


def probe_layers(store, layer: str) -> list[str]:
    """The store's layers a probe of `layer` reads: that one, or for "weighted" every numbered one."""
    if layer != WEIGHTED:
        return [layer]
    layers = weighted_layers(list(store.layers))
    if not layers:
        raise W2VCacheError(f"store {store.path} has no numbered layer to weigh; it has {', '.join(store.layers)}")
    if len({store.layers[name] for name in layers}) > 1:
        raise W2VCacheError(f"store {store.path}: its layers differ in width "
                            f"({', '.join(f'{n} {store.layers[n]}' for n in layers)}); a weighted sum needs one")
    return layers


class ProbeTask:
    """The probe experiment as the training loop sees it. `layer`: a store layer, or "weighted"."""

    def __init__(self, store, layer: str, config: ProbeConfig, train_config: TrainConfig, train_split: str = "train",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, device: str = "cpu"):
        if config.probe not in PROBES:
            raise W2VCacheError(f"--probe {config.probe!r}: choose {' or '.join(PROBES)}")
        self.config, self.seed, self.device = config, train_config.seed, torch.device(device)
        self.weighted, self.layers = layer == WEIGHTED, probe_layers(store, layer)
        train_config = test_splits_for(train_config, store.splits)
        self.splits = {
            split: SplitFeatures(store, split, self.layers, memory_budget)
            for split in (train_split, train_config.dev_split, *train_config.test_splits)
        }
        self.train_split = train_split
        self.batches = {name: batches_by_length(s.lengths, config.batch_frames) for name, s in self.splits.items()}
        dim = store.layers[self.layers[0]]
        model = Probe(dim, config) if config.probe == "bilstm" else LinearProbe(dim)
        if self.weighted:
            model = WeightedProbe(len(self.layers), config.layer_norm, model)
        self.model = model.to(self.device)
        # zero_infinity: an utterance whose transcript is longer than its frames (CTC has no path)
        # adds nothing, instead of making its whole batch's loss infinite.
        self.ctc = nn.CTCLoss(blank=text.BLANK_ID, zero_infinity=True)
        self.unknown = {}

    def _batch(self, split: str, indices: list[int]) -> Batch:
        source = self.splits[split]
        if self.weighted:
            per_layer = [source.get(indices, layer) for layer in self.layers]
            feats = per_layer[0]
            x = torch.zeros(len(per_layer), len(feats), max(len(f) for f in feats), feats[0].shape[1])
            for i, layer_feats in enumerate(per_layer):
                for b, f in enumerate(layer_feats):
                    x[i, b, : len(f)] = torch.from_numpy(np.asarray(f, dtype=np.float32))
        else:
            feats = source.get(indices)
            x = torch.zeros(len(feats), max(len(f) for f in feats), feats[0].shape[1])
            for b, f in enumerate(feats):
                x[b, : len(f)] = torch.from_numpy(np.asarray(f, dtype=np.float32))
        encoded = [text.encode(source.texts[i]) for i in indices]
        for e in encoded:
            for symbol, count in e.unknown.items():
                self.unknown[symbol] = self.unknown.get(symbol, 0) + count
        return Batch(
            features=x.to(self.device),
            lengths=torch.tensor([len(f) for f in feats]),
            targets=torch.tensor([i for e in encoded for i in e.ids], dtype=torch.long),
            target_lengths=torch.tensor([len(e.ids) for e in encoded]),
            references=[source.texts[i] for i in indices],
        )

    def train_batches(self, epoch: int):
        order = list(self.batches[self.train_split])
        random.Random(self.seed * 100_003 + epoch).shuffle(order)  # the same order on a resumed run
        return _Lazy([lambda idx=idx: self._batch(self.train_split, idx) for idx in order])

    def eval_batches(self, split: str):
        return (self._batch(split, idx) for idx in self.batches[split])

    def start_epoch(self, epoch: int) -> None:
        pass  # the whole probe trains from the first epoch

    def layer_weights(self) -> dict[str, float]:
        """A weighted probe's softmax weights now, by layer name."""
        return dict(zip(self.layers, self.model.mix.weights.detach().softmax(0).tolist()))

    def epoch_records(self) -> dict[str, dict]:
        return {LAYER_WEIGHTS: {"weights": self.layer_weights()}} if self.weighted else {}

    def loss(self, batch: Batch) -> torch.Tensor:
        log_probs = self.model(batch.features, batch.lengths)
        return self.ctc(log_probs.transpose(0, 1), batch.targets, batch.lengths, batch.target_lengths)

    def decode(self, batch: Batch) -> tuple[list[str], list[str]]:
        log_probs = self.model(batch.features, batch.lengths)
        return batch.references, text.greedy_decode(log_probs.cpu(), batch.lengths)


class _Lazy:
    """A list of batch makers that builds each batch when iterated (len() known up front)."""

    def __init__(self, makers):
        self.makers = makers

    def __len__(self):
        return len(self.makers)

    def __iter__(self):
        return (make() for make in self.makers)


# ---------------------------------------------------------------------------------------------
# The sweep


def parse_seeds(spec: str) -> list[int]:
    try:
        return [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise W2VCacheError(f"--seeds {spec!r}: expected integers such as 0,1,2") from None


def check_store(store) -> None:
    vocabulary = store.provenance.get("vocabulary")
    if vocabulary is not None and list(vocabulary) != list(text.VOCAB):
        raise W2VCacheError(
            f"store {store.path} was made with another vocabulary ({len(vocabulary)} symbols: "
            f"{''.join(s for s in vocabulary if len(s) == 1)}); this w2vcache uses {len(text.VOCAB)}"
        )


def choose_sources(spec, available: list[str]) -> list[str]:
    """--layer for probes: choose_layers' syntax, plus "weighted" (alone or in a list, "0-12,weighted")
    for a probe of the layers' learnt weighted sum; the chosen layers first, "weighted" last."""
    items = [str(i).strip() for i in (spec.split(",") if isinstance(spec, str) else spec)]
    rest = [i for i in items if i != WEIGHTED]
    chosen = [] if not rest else choose_layers("all" if rest == ["all"] else rest, available, "--layer")
    return chosen + [WEIGHTED] * (len(rest) < len(items))


def probe(store_url: str, layers: str = "all", seeds="0", out="runs", config: ProbeConfig = ProbeConfig(),
          train_config: TrainConfig = TrainConfig(), train_split: str = "train",
          memory_budget: int = DEFAULT_MEMORY_BUDGET, device: str = "cpu", progress: bool = True,
          num_threads: int | None = None, shard: str | None = None) -> SweepResult:
    """Train a probe on each (layer, seed); runs already finished are skipped, killed ones resume.

    `layers`: see choose_sources ("weighted" for the learnt weighted sum of every numbered layer).
    `num_threads`: torch's CPU threads; None chooses them (threads.py).
    `shard`: "I/N", this job's share of the runs (spread.py); under torchrun each rank takes its
    share of that (or of all), on cuda:LOCAL_RANK with device "cuda". No process group is needed."""
    share = share_of(shard)
    device = rank_device(device)
    if config.probe not in PROBES:
        raise W2VCacheError(f"--probe {config.probe!r}: choose {' or '.join(PROBES)}")
    store = open_store(store_url)
    check_store(store)
    chosen, seed_list = choose_sources(layers, list(store.layers)), parse_seeds(seeds)
    if config.layer_norm and WEIGHTED not in chosen:
        raise W2VCacheError("--layer-norm normalises the layers of a weighted sum: it goes with --layer weighted")
    train_config = test_splits_for(train_config, store.splits, f"store {store_url}" if progress else None)

    def start(layer: str, seed: int, directory: Path) -> None:
        tc = TrainConfig(**{**asdict(train_config), "seed": seed})
        seed_everything(seed)
        task = ProbeTask(store, layer, config, tc, train_split, memory_budget, device)
        weighted = layer == WEIGHTED
        run_record = RunRecord(
            kind="probe", experiment=probe_experiment(layer, config.probe), layer=layer_index(layer), reinit=[],
            seed=seed, model=config.record(weighted), store=str(store_url), device=device, threads=num_threads,
            probe=config.probe, weighted=weighted,
            data={
                "train_split": train_split,
                "layer": layer,
                **({"layers": task.layers} if weighted else {}),
                "model": {k: store.provenance.get("model", {}).get(k) for k in ("name", "revision", "weight_hash")},
                "dtype": store.dtype,
                "frame_rate": store.provenance.get("frame_rate"),
            },
        )
        if progress:
            print(f"probe {probe_experiment(layer, config.probe)} seed {seed} -> {directory}")
        train(task, tc, directory, run_record, progress=progress, num_threads=num_threads)

    runs = ((run_dir(out, "probe", probe_experiment(layer, config.probe), seed), functools.partial(start, layer, seed))
            for layer in chosen for seed in seed_list)
    return sweep(runs, share)
