"""Frozen-feature probes: a BiLSTM-CTC (or a linear layer with CTC) trained on one cached layer,
or on a learnt weighted sum of all of them, and the layer sweep.

The probe reads features from the store only: W2V is never run. A split's layer is held in
memory as stored (float16: 2.8 GB for W2V-Base over Libri-light's 10 h) and converted per batch;
a layer larger than the memory budget is read from the store batch by batch instead, each batch
being a run of neighbouring utterances (the store keeps them sorted by length), so a read touches
few chunks. A weighted probe reads every numbered layer, the budget covering them all.
A thread assembles the next batches while the model steps (`ProbeConfig.prefetch`), so the loop
never waits on the data path; the batches and their order are those of a loop without it. On a
GPU the features held in memory are copied there once instead (`ProbeConfig.resident`) and each
batch is one gather on the device: a fast probe steps faster than a host thread pads batches.

Kinds of probe:
- "bilstm": the paper's, a bidirectional LSTM and a linear layer to the symbols.
- "linear": one linear layer per frame to the symbols, with CTC: the least a layer must make
  readable; the cheapest, a sweep runs in minutes on a CPU.
- either, on `--layer weighted`: softmax(w)-weighted sum of the layers first, w learnt with the
  probe (SUPERB's weighted-sum featurizer, as in s3prl), each layer optionally layer-normalised.
"""

import functools
import random
import sys
import threading
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import text
from .batching import length_batches
from .errors import W2VCacheError
from .layers import WEIGHTED, choose_layers, layer_index, weighted_layers
from .runs import DATA, LAYER_WEIGHTS, PROBES, RunRecord, SweepResult, data_fingerprint, probe_experiment, run_dir
from .spread import in_job, jobs_here, rank_device, share_of
from .store import open_store, public_url
from .train import TrainConfig, check_config, check_splits, run_settings, seed_everything, sweep, test_splits_for, train

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
    # Batches assembled ahead by a thread while the model steps; 0: in the loop. The batches, their
    # order and so every metric are the same either way, so it is not part of the run's record.
    prefetch: int = 2
    # The features copied to the device once, each batch gathered there (no host work per batch,
    # nothing to prefetch); None: on a GPU, where the splits are in memory and fit a quarter of its
    # free memory. The same batches again, so not recorded either.
    resident: bool | None = None

    def __post_init__(self):
        if self.probe not in PROBES:
            raise W2VCacheError(f"--probe {self.probe!r}: choose {' or '.join(PROBES)}")

    def record(self, weighted: bool) -> dict:
        """config.json's "model": the options this probe uses, and only those (a linear probe has
        no LSTM, so --hidden, --lstm-layers and --dropout are not recorded for it)."""
        used = ("lstm_layers", "hidden", "dropout", "batch_frames") if self.probe == "bilstm" else ("batch_frames",)
        found = {k: getattr(self, k) for k in used}
        return (found | {"layer_norm": self.layer_norm}) if weighted else found


# Probe.packed with dropout hands cuDNN one layer's weights at a time, which it copies into one
# buffer per call (a few MB) and warns about every time.
warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")


class Probe(nn.Module):
    """Bidirectional LSTM over one layer's frames, a linear layer to the 30 symbols.

    The weights are an `nn.LSTM`'s (so checkpoints are plain LSTM state dicts), run by one of two
    exact kernels, which give the same outputs and gradients:
    - on CPU, `directions`: each direction of each layer one call on the padded batch, which takes
      torch's oneDNN LSTM kernel, 5-7x faster there than the packed-sequence kernel
      (`benchmarks/probe_cost.py` times both). Padding never reaches a real frame: the forward
      direction meets it only after an utterance's last frame, and the backward direction runs
      forward over each utterance reversed within its own length, so its padding also comes last.
    - on CUDA, `packed`: the `nn.LSTM` itself on packed sequences. cuDNN runs a layer's two
      directions at once, where `directions` runs them one after the other, and a step of this
      probe (a few dozen utterances by 1024) is too small to fill a GPU alone.
    """

    def __init__(self, input_dim: int, config: ProbeConfig):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, config.hidden, num_layers=config.lstm_layers, bidirectional=True,
                            batch_first=True, dropout=config.dropout if config.lstm_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(2 * config.hidden, len(text.VOCAB))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(batch, frames, dim) padded features -> (batch, frames, symbols) log-probabilities."""
        x = self.packed(x, lengths) if x.is_cuda else self.directions(x, lengths)
        return self.output(self.dropout(x)).log_softmax(-1)

    def directions(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The LSTM's outputs (batch, frames, 2 hidden), each direction of each layer one call."""
        reverse = _reversal(lengths.to(x.device), x.shape[1])
        for layer in range(self.lstm.num_layers):
            if layer:
                x = nn.functional.dropout(x, self.lstm.dropout, self.training)
            forward = self._direction(x, layer, "")
            backward = _reverse(self._direction(_reverse(x, reverse), layer, "_reverse"), reverse)
            x = torch.cat([forward, backward], dim=-1)
        return x

    def packed(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The LSTM's outputs (batch, frames, 2 hidden) from nn.LSTM on packed sequences; 0 on padding.

        With dropout between layers in training, the layers run one call each and the dropout is
        torch's own between them: cuDNN's inter-layer dropout draws from a state of its own, which
        no checkpoint holds, so a resumed run would not be the uninterrupted one."""
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        if self.training and self.lstm.dropout and self.lstm.num_layers > 1:
            data, sizes = packed.data, packed.batch_sizes
            zeros = data.new_zeros(2, int(sizes[0]), self.lstm.hidden_size)
            for layer in range(self.lstm.num_layers):
                if layer:
                    data = nn.functional.dropout(data, self.lstm.dropout, True)
                weights = [getattr(self.lstm, f"{name}_l{layer}{suffix}") for suffix in ("", "_reverse")
                           for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                data = torch.lstm(data, sizes, (zeros, zeros), weights, True, 1, 0.0, True, True)[0]
            packed = packed._replace(data=data)
        else:
            packed = self.lstm(packed)[0]
        return pad_packed_sequence(packed, batch_first=True, total_length=x.shape[1])[0]

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
    without_ctc_path: int = 0  # utterances whose transcript needs more frames than they have
    ids: tuple = ()  # the utterances', in order (the decoded transcripts name them)

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
        self._device_frames = None  # on_device's copy
        if self.in_memory:
            self.frames = {}
            for layer in self.layers:  # refuses an incomplete split
                self.frames[layer], self.offsets = store.read_layer(split, layer)
        else:
            status = store.status(split)
            if not status.complete:
                raise W2VCacheError(store.incomplete_message(split))

    def on_device(self, device: torch.device) -> torch.Tensor:
        """The layers in memory, copied once to `device`: (layers, frames + 1, dim), as stored, the
        last frame zeros (what padding gathers). Kept for the next run on the same features."""
        if self._device_frames is None or self._device_frames.device != device:
            self._device_frames = None  # a copy on another device is released before this one is made
            n, dim = self.frames[self.layer].shape
            flat = torch.empty((len(self.layers), n + 1, dim), dtype=_torch_dtype(self.frames[self.layer].dtype),
                               device=device)
            for i, layer in enumerate(self.layers):
                flat[i, :n] = torch.from_numpy(self.frames[layer])
            flat[:, n] = 0
            self._device_frames = flat
        return self._device_frames

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.frames.values()) if self.in_memory else 0

    def has_copy_on(self, device: torch.device) -> bool:
        return self._device_frames is not None and self._device_frames.device == device

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
    if len(layers) == 1:
        raise W2VCacheError(f"store {store.path}: a weighted sum needs two numbered layers or more; it has "
                            f"{', '.join(store.layers)} (--layer {layer_index(layers[0])} probes that one)")
    if len({store.layers[name] for name in layers}) > 1:
        raise W2VCacheError(f"store {store.path}: its layers differ in width "
                            f"({', '.join(f'{n} {store.layers[n]}' for n in layers)}); a weighted sum needs one")
    return layers


class ProbeTask:
    """The probe experiment as the training loop sees it. `layer`: a store layer, or "weighted"."""

    def __init__(self, store, layer: str, config: ProbeConfig, train_config: TrainConfig, train_split: str = "train",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, device: str = "cpu", features=None):
        """`features`: a split's SplitFeatures of this layer by split name, for features already
        read (a sweep's other seeds); None reads them from the store."""
        self.config, self.seed, self.device = config, train_config.seed, torch.device(device)
        self.weighted, self.layers = layer == WEIGHTED, probe_layers(store, layer)
        train_config = test_splits_for(train_config, store.splits)
        features = features or (lambda split: SplitFeatures(store, split, self.layers, memory_budget))
        self.splits = {split: features(split) for split in (train_split, train_config.dev_split, *train_config.test_splits)}
        self.train_split = train_split
        self.batches = {name: batches_by_length(s.lengths, config.batch_frames) for name, s in self.splits.items()}
        # A fast probe on a GPU steps faster than a host thread pads its batches (a linear probe
        # waited 10 % of its epoch on an H100 with prefetch): on the device, a batch is one gather.
        in_memory = all(s.in_memory for s in self.splits.values())
        if config.resident and not in_memory:
            raise W2VCacheError("resident features are the splits held in memory, copied to the device: "
                                "these are read from the store batch by batch (raise the memory budget)")
        self.resident = config.resident
        if self.resident is None:  # a seed after the first finds its layer there already
            needed = sum(s.nbytes() for s in self.splits.values() if not s.has_copy_on(self.device))
            self.resident = in_memory and self.device.type == "cuda" and (needed == 0 or _fits_on_device(self.device, needed))
        self._skeletons: dict[tuple[str, tuple[int, ...]], tuple[Batch, torch.Tensor]] = {}
        dim = store.layers[self.layers[0]]
        model = Probe(dim, config) if config.probe == "bilstm" else LinearProbe(dim)
        if self.weighted:
            model = WeightedProbe(len(self.layers), config.layer_norm, model)
        self.model = model.to(self.device)
        # zero_infinity: an utterance whose transcript is longer than its frames (CTC has no path)
        # adds nothing, instead of making its whole batch's loss infinite.
        self.ctc = nn.CTCLoss(blank=text.BLANK_ID, zero_infinity=True)

    def _batch(self, split: str, indices: list[int]) -> Batch:
        """One batch, assembled and on the device."""
        if self.resident:
            return self._gather(split, self._skeleton(split, indices))
        return self._to_device(self._assemble(split, indices))

    def _skeleton(self, split: str, indices: list[int]) -> tuple[Batch, torch.Tensor]:
        """A resident batch's all but its features, and where on the device its frames are: made
        once, as the batches are the same in every epoch (only their order changes)."""
        key = (split, tuple(indices))
        if key not in self._skeletons:
            source = self.splits[split]
            lengths = source.lengths[indices]
            starts = np.array([source.offsets[source.positions[i]] for i in indices], dtype=np.int64)
            steps = np.arange(int(lengths.max()), dtype=np.int64)
            # Frame t of utterance b, or the zero frame after the last one where b has ended.
            where = np.where(steps < lengths[:, None], starts[:, None] + steps, source.frames[source.layer].shape[0])
            self._skeletons[key] = (self._labels(split, indices), torch.from_numpy(where).to(self.device))
        return self._skeletons[key]

    def _gather(self, split: str, skeleton: tuple[Batch, torch.Tensor]) -> Batch:
        """In the loop's thread: the batch's frames gathered from the device's copy, zeros as padding
        (the values of _assemble's, exactly), then float32."""
        batch, where = skeleton
        flat = self.splits[split].on_device(self.device)
        features = flat.index_select(1, where.view(-1)).view(flat.shape[0], *where.shape, flat.shape[2])
        return replace(batch, features=(features if self.weighted else features[0]).float())

    def _labels(self, split: str, indices: list[int]) -> Batch:
        """A batch without its features (an empty tensor in their place): lengths, targets, texts."""
        source = self.splits[split]
        encoded = [text.encode(source.texts[i]) for i in indices]
        lengths = [int(source.lengths[i]) for i in indices]
        return Batch(
            features=torch.empty(0),
            lengths=torch.tensor(lengths),
            targets=torch.tensor([i for e in encoded for i in e.ids], dtype=torch.long),
            target_lengths=torch.tensor([len(e.ids) for e in encoded]),
            references=[source.texts[i] for i in indices],
            without_ctc_path=sum(text.ctc_frames_needed(e.ids) > n for e, n in zip(encoded, lengths)),
            ids=tuple(source.ids[i] for i in indices),
        )

    def _assemble(self, split: str, indices: list[int]) -> Batch:
        """One batch on the host, as the prefetching thread builds it: padded in numpy (whose copies
        release the GIL, and use none of torch's intra-op threads, which the model steps on).

        For a CUDA device the features stay in the store's dtype (float16: half the bytes to copy)
        in pinned memory, and become float32 on the device; on the CPU they become float32 here.
        Either way the values are the stored ones exactly: float16 -> float32 is exact."""
        source = self.splits[split]
        cuda = self.device.type == "cuda"
        per_layer = [source.get(indices, layer) for layer in self.layers] if self.weighted else [source.get(indices)]
        feats = per_layer[0]
        shape = ((len(per_layer),) if self.weighted else ()) + _padded_shape(feats)
        # Padded straight into the batch's buffer, pinned for a GPU (so that the copy to the device
        # does not block): no second copy of the batch.
        dtype = feats[0].dtype if cuda else np.float32
        features = torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=cuda)
        x = features.numpy()  # filled by numpy, whose copies use none of torch's threads
        for i, layer_feats in enumerate(per_layer):
            _pad(layer_feats, x[i] if self.weighted else x)
        return replace(self._labels(split, indices), features=features)

    def _to_device(self, batch: Batch) -> Batch:
        """In the loop's thread: the copy is queued on its CUDA stream, ahead of the step's kernels."""
        if self.device.type == "cpu":
            return batch
        features = batch.features.to(self.device, non_blocking=True).float()
        return replace(batch, features=features)

    def _batches(self, split: str, order: list[list[int]]) -> "_Lazy":
        if self.resident:  # nothing left to build ahead: each batch's gather is queued by the loop
            makers = [functools.partial(self._skeleton, split, indices) for indices in order]
            return _Lazy(makers, 0, functools.partial(self._gather, split))
        makers = [functools.partial(self._assemble, split, indices) for indices in order]
        return _Lazy(makers, self.config.prefetch, self._to_device)

    def train_batches(self, epoch: int):
        order = list(self.batches[self.train_split])
        random.Random(self.seed * 100_003 + epoch).shuffle(order)  # the same order on a resumed run
        return self._batches(self.train_split, order)

    def eval_batches(self, split: str):
        return iter(self._batches(split, self.batches[split]))

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


def _fits_on_device(device: torch.device, nbytes: int) -> bool:
    """A GPU's copy of the features may take a quarter of its free memory (what torch keeps
    cached but unused counted free), shared with this command's other --jobs: the rest is the
    model's, and that of other probes on the GPU (`--shard`)."""
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return 0 < nbytes <= free // (4 * jobs_here())


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _padded_shape(feats: list[np.ndarray]) -> tuple[int, int, int]:
    return len(feats), max(len(f) for f in feats), feats[0].shape[1]


def _pad(feats: list[np.ndarray], out: np.ndarray) -> None:
    """Utterances into `out` (B, T_max, D), each from its first frame on, zeros after it."""
    for b, f in enumerate(feats):
        out[b, : len(f)] = f
        out[b, len(f):] = 0


class _Lazy:
    """A list of batch makers that builds each batch when iterated (len() known up front, nothing
    built until iterated). With `prefetch` > 0 a thread builds them that many ahead (_Prefetched);
    `finish` (the move to the device) runs in the iterating thread."""

    def __init__(self, makers, prefetch: int = 0, finish=lambda batch: batch):
        self.makers, self.prefetch, self.finish = makers, prefetch, finish
        self._begun: _Prefetched | None = None

    def __len__(self):
        return len(self.makers)

    def begin(self) -> None:
        """Start building the first batches now, before anyone iterates (the training loop calls it
        for the next epoch while dev is evaluated, so that epoch does not open with a wait); the
        next iteration takes them. Without prefetch nothing is built ahead, here either."""
        if self.prefetch > 0 and self._begun is None:
            self._begun = _Prefetched(self.makers, self.prefetch, self.finish)
            self._begun.begin()

    def __iter__(self):
        if self._begun is not None:
            begun, self._begun = self._begun, None
            return begun
        if self.prefetch > 0:
            return _Prefetched(self.makers, self.prefetch, self.finish)
        return (self.finish(make()) for make in self.makers)


PREFETCH_THREAD = "w2vcache-prefetch"
PREFETCH_LINGER = 1.0  # seconds a worker with no place ahead waits for one before it ends


class _Failure:
    """A maker's exception, handed to the iterating thread in place of its batch."""

    def __init__(self, error: BaseException):
        self.error = error


class _Prefetched:
    """Iterates makers' results in their order while a worker thread builds up to `depth` ahead.

    The batches are the makers' own, one worker calls them one at a time in order, so a run
    with prefetch sees exactly the batches and order of one without.

    The worker never waits long on the consumer: when `depth` batches wait unclaimed for
    PREFETCH_LINGER it ends, and the next batch taken starts a new one. A loop that stops taking
    batches (an exception in its step, Ctrl-C, a break) therefore leaves no thread behind a second
    after the batch in the making, even when nobody closes this iterator: a traceback keeps the
    loop's frame, and this iterator, alive. The end of the makers, an error in one, and close()
    also end it (close() waits for it).
    """

    def __init__(self, makers, depth: int, finish):
        self._makers, self._depth, self._finish = makers, depth, finish
        self._ready: dict[int, object] = {}  # built, not yet taken: index -> batch or _Failure
        self._made = 0  # the next index to build
        self._taken = 0  # the next index to hand out
        self._cond = threading.Condition()
        # Started workers not known to have ended: one that has just said it stops may still be
        # on its way out when the next starts, and close() waits for both.
        self._workers: list[threading.Thread] = []
        self._working = self._closed = False
        # Batches handed out, kept so that the worker, not the loop, frees their memory: freeing a
        # large buffer while the worker faults in the next one stalls the loop's thread (measured:
        # half a fast probe's data wait). The loop holds the last one, and may not yet have
        # dropped the one before it.
        self._handed: list = []

    def __iter__(self):
        return self

    def begin(self) -> None:
        """Start the worker before the first batch is asked for."""
        with self._cond:
            self._wake()

    def __next__(self):
        if self._taken >= len(self._makers):
            self.close()
            raise StopIteration
        with self._cond:
            self._wake()
            while self._taken not in self._ready:
                if self._closed and not self._working:
                    raise StopIteration  # closed early: nothing more will come
                self._cond.wait()
            item = self._ready.pop(self._taken)
            self._taken += 1
            self._handed.append(item)
            self._cond.notify_all()  # one more place ahead is free: for a lingering worker,
            self._wake()  # or a new one
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return self._finish(item)

    def _wake(self) -> None:
        """Start a worker if none runs and there is a batch to build (the lock held)."""
        if not self._working and not self._closed and self._room():
            self._working = True
            worker = threading.Thread(target=self._work, name=PREFETCH_THREAD, daemon=True)
            self._workers = [w for w in self._workers if w.is_alive()] + [worker]
            worker.start()

    def _room(self) -> bool:
        return self._made < len(self._makers) and self._made - self._taken < self._depth

    def _work(self) -> None:
        while True:
            with self._cond:
                # Wait a little for the loop to take a batch (a fresh thread per batch costs as much
                # as a fast probe's step); a loop that has stopped taking them loses the thread then.
                if not self._closed and not self._room() and self._made < len(self._makers):
                    self._cond.wait_for(lambda: self._closed or self._room(), PREFETCH_LINGER)
                if self._closed or not self._room():
                    self._working = False
                    return
                index = self._made
                self._made += 1
                stale, self._handed = self._handed[:-2], self._handed[-2:]
            stale.clear()  # their memory freed here, in the worker
            try:
                item = self._makers[index]()
            except BaseException as error:  # re-raised in the iterating thread, where it belongs
                item = _Failure(error)
            with self._cond:
                self._ready[index] = item
                self._cond.notify_all()
                if isinstance(item, _Failure):
                    self._working, self._closed = False, True
                    return

    def close(self) -> None:
        """Stop building and wait for the batch in the making, if any; drop what was built."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()  # a lingering worker ends now
            workers = list(self._workers)
        for worker in workers:
            if worker is not threading.current_thread():
                worker.join()
        with self._cond:
            self._ready.clear()
            self._handed.clear()

    def __del__(self):
        self._closed = True  # a worker still running ends after its batch, or its linger


# ---------------------------------------------------------------------------------------------
# The sweep


def parse_seeds(spec: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise W2VCacheError(f"--seeds {spec!r}: expected integers such as 0,1,2") from None
    if not seeds:
        raise W2VCacheError(f"--seeds {spec!r}: no seed given; expected integers such as 0,1,2")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise W2VCacheError(f"--seeds {spec!r}: seed {', '.join(map(str, twice))} given more than once")
    return seeds


def check_store(store) -> None:
    vocabulary = store.provenance.get("vocabulary")
    if vocabulary is not None and list(vocabulary) != list(text.VOCAB):
        raise W2VCacheError(
            f"store {store.path} was made with another vocabulary ({len(vocabulary)} symbols: "
            f"{''.join(s for s in vocabulary if len(s) == 1)}); this w2vcache uses {len(text.VOCAB)}"
        )


def _check_complete(store, train_split: str, train_config: TrainConfig) -> None:
    """Refuse, before any run, a split the runs read that extraction has not finished; for a test
    split, say how to test on the finished ones meanwhile."""
    tests = train_config.test_splits
    for split in dict.fromkeys((train_split, train_config.dev_split, *tests)):
        if store.status(split, refresh=True).complete:
            continue
        hint = ""
        if split not in (train_split, train_config.dev_split):
            done = [s for s in tests if s != split and store.status(s).complete]
            hint = (f"; or test on the finished one(s) meanwhile: --test-splits {','.join(done)}" if done else
                    "; or test on none meanwhile: --test-splits ''")
        raise W2VCacheError(store.incomplete_message(split) + hint)


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
          num_threads: int | None = None, shard: str | None = None, jobs: int = 1) -> SweepResult:
    """Train a probe on each (layer, seed); runs already finished are skipped, killed ones resume.

    `layers`: see choose_sources ("weighted" for the learnt weighted sum of every numbered layer).
    `num_threads`: torch's CPU threads; None chooses them (threads.py).
    `shard`: "I/N", this job's share of the runs (spread.py); under torchrun each rank takes its
    share of that (or of all), on cuda:LOCAL_RANK with device "cuda". No process group is needed.
    `jobs`: runs trained at once, by that many processes on this machine (spread.in_processes)."""
    if jobs < 1:
        raise W2VCacheError(f"--jobs {jobs}: needs 1 or more")
    share = share_of(shard)
    asked_device, device = device, rank_device(device)  # --jobs get it as asked: each resolves it itself
    store = open_store(store_url)
    check_store(store)
    chosen, seed_list = choose_sources(layers, list(store.layers)), parse_seeds(seeds)
    if config.layer_norm and WEIGHTED not in chosen:
        raise W2VCacheError("--layer-norm normalises the layers of a weighted sum: it goes with --layer weighted")
    train_config = test_splits_for(train_config, store.splits, f"store {store_url}" if progress and not in_job() else None)
    check_splits(store.splits, train_split, train_config.dev_split, f"store {store_url}")
    check_config(train_config)
    _check_complete(store, train_split, train_config)
    if progress and not in_job():  # said once, by the command, not by each of its --jobs
        splits = dict.fromkeys((train_split, train_config.dev_split, *train_config.test_splits))
        for note in text.transcript_notes({s: [u.text for u in store.utterances(s)] for s in splits}):
            print(f"note: {note}", file=sys.stderr)
    trained_on = data_fingerprint({split: [(u.id, u.text) for u, usable in zip(store.utterances(split), store.usable(split))
                                           if usable]
                                   for split in dict.fromkeys((train_split, train_config.dev_split))})
    # The features of the layer being probed, by split: its seeds' runs follow one another in the
    # sweep's order, so each layer is read (and its checksums checked) once, not once per seed.
    held: dict[tuple[str, str], SplitFeatures] = {}

    def features(layer: str, split: str) -> SplitFeatures:
        if (layer, split) not in held:
            if any(source != layer for source, _ in held):
                held.clear()  # the previous layer's, released before the next is read
            held[layer, split] = SplitFeatures(store, split, probe_layers(store, layer), memory_budget)
        return held[layer, split]

    def settings(layer: str, seed: int) -> tuple[RunRecord, TrainConfig]:
        weighted = layer == WEIGHTED
        run_record = RunRecord(
            kind="probe", experiment=probe_experiment(layer, config.probe), layer=layer_index(layer), reinit=[],
            seed=seed, model=config.record(weighted), store=public_url(store_url), device=device, threads=num_threads,
            probe=config.probe, weighted=weighted,
            data={
                "train_split": train_split,
                "layer": layer,
                **({"layers": probe_layers(store, layer)} if weighted else {}),
                "model": store.model,
                "dtype": store.dtype,
                "frame_rate": store.provenance.get("frame_rate"),
                DATA: trained_on,
            },
        )
        return run_record, TrainConfig(**{**asdict(train_config), "seed": seed})

    def start(layer: str, seed: int, directory: Path) -> None:
        run_record, tc = settings(layer, seed)
        seed_everything(seed)
        task = ProbeTask(store, layer, config, tc, train_split, memory_budget, device,
                         features=functools.partial(features, layer))
        if progress:
            print(f"probe {probe_experiment(layer, config.probe)} seed {seed} -> {directory}")
        train(task, tc, directory, run_record, progress=progress, num_threads=num_threads)

    runs = ((run_dir(out, "probe", probe_experiment(layer, config.probe), seed), functools.partial(start, layer, seed),
             lambda layer=layer, seed=seed: run_settings(*settings(layer, seed)))
            for layer in chosen for seed in seed_list)
    return sweep(runs, share, jobs=jobs, job=functools.partial(
        probe, store_url, layers, seeds, out, config, train_config, train_split, memory_budget, asked_device, progress,
        num_threads, shard))
