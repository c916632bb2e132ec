"""A loaded Wav2Vec 2.0 (W2V): every layer's hidden states, exactly; re-initialised transformer blocks.

Layer naming used everywhere in w2vcache (store, probe, report):

    "cnn"      the CNN feature encoder's output, (T, conv_dim[-1]), before the feature projection
    "layer00"  the transformer input after the positional convolution (hidden_states[0] in transformers)
    "layerNN"  the output of transformer block NN (1-based), as transformers' `output_hidden_states` gives it

checkpoints.py loads one (built-in, local directory or Hub id) into a `Backbone`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from w2vcache.audio import SAMPLE_RATE
from w2vcache.errors import W2VCacheError
from w2vcache.layers import layer_name

CNN_LAYER = "cnn"  # name of the optional CNN-output layer

# WavLM's attention hands torch both a padding mask and its position bias, which torch warns about
# in the middle of the progress bars; the features are what they should be (tests compare them).
warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")
NORM_EPS = 1e-7  # variance floor of Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm

# Model types whose encoder, given a frame mask, gives every utterance of a padded batch exactly what it
# gives that utterance alone (checked against model(...) per utterance). Other W2V-style encoders run
# one utterance at a time.
BATCH_EXACT_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "unispeech", "unispeech-sat")



@dataclass
class Backbone:
    """A loaded W2V-style encoder and where it came from."""

    model: nn.Module  # the base model (Wav2Vec2Model, HubertModel, ...), eval mode
    name: str  # what the user asked for, or the resolved local directory
    revision: str | None  # hub commit hash when known
    normalize: bool  # per-utterance zero-mean unit-variance input normalisation
    run: dict | None = None  # a fine-tuning run's encoder: which run, epoch and base model (describe)
    # num_frames' answers: extraction asks for every utterance of every batch, and the model's
    # formula (tensor operations per CNN layer) is slow for what it does.
    _frames: dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        """Transformer blocks N; hidden-state layers are 0..N."""
        return len(self.model.encoder.layers)

    def layer_names(self, include_cnn: bool = False) -> list[str]:
        """["layer00", ..., "layerNN"], with "cnn" first if `include_cnn`."""
        return [CNN_LAYER] * include_cnn + [layer_name(i) for i in range(self.num_layers + 1)]

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def total_stride(self) -> int:
        """Samples between consecutive frames (320 for W2V)."""
        return int(np.prod(self.config.conv_stride))

    @property
    def frame_rate(self) -> float:
        """Frames per second (50.0 for W2V)."""
        return SAMPLE_RATE / self.total_stride

    @property
    def receptive_field(self) -> int:
        """Samples one frame sees (400 for W2V); shorter audio gives no frame at all."""
        field = 1
        for kernel, stride in reversed(list(zip(self.config.conv_kernel, self.config.conv_stride))):
            field = (field - 1) * stride + kernel
        return field

    def num_frames(self, num_samples: int) -> int:
        """Frames the encoder produces for `num_samples` of audio, by the model's own formula."""
        num_samples = int(num_samples)
        if num_samples not in self._frames:
            get_lengths = self.model._get_feat_extract_output_lengths
            # The optional adapter shortens the *output* after the encoder; our layers are taken before it.
            kwargs = {"add_adapter": False} if "add_adapter" in inspect.signature(get_lengths).parameters else {}
            self._frames[num_samples] = max(0, int(get_lengths(num_samples, **kwargs)))
        return self._frames[num_samples]

    def weight_hash(self) -> str:
        return state_dict_hash(self.model)

    def describe(self) -> dict:
        """Provenance written next to extracted features."""
        described = {
            "name": self.name,
            "revision": self.revision,
            "weight_hash": self.weight_hash(),
            "model_type": self.config.model_type,
            "config": _json_safe(self.config.to_dict()),
            "normalize": self.normalize,
            "sample_rate": SAMPLE_RATE,
            "frame_rate": self.frame_rate,
            "receptive_field": self.receptive_field,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
        }
        if self.run is not None:
            described["run"] = self.run
        return described


def state_dict_hash(module: nn.Module) -> str:
    """sha256 over every state_dict tensor: sorted names, dtype, shape and raw bytes.

    Hashing the bytes (not values printed as text) makes it exact; moving to CPU first makes it the same
    on any device. Parametrised weights (weight norm) hash as their stored original0/original1 tensors.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        # Viewed as bytes so that dtypes numpy lacks (bfloat16) hash too; reshape(-1) handles 0-dim tensors.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _json_safe(value):
    """config.to_dict() may hold tuples, dtypes or other objects json cannot write."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------------
# Forward


def normalize_wave(wave: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance, like Wav2Vec2FeatureExtractor: (x - mean) / sqrt(var + 1e-7).

    Computed in float64 so that long utterances' sums do not lose precision.
    """
    x = wave.to(torch.float64)
    return ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + NORM_EPS)).to(wave.dtype)


def forward_layers(
    backbone: Backbone, waves: Sequence[np.ndarray | torch.Tensor], include_cnn: bool = False
) -> tuple[list[torch.Tensor], list[int]]:
    """Every layer's hidden states for a batch of 16 kHz mono waves of any lengths.

    Returns one (B, T_max, D) tensor per name in `backbone.layer_names(include_cnn)`, on the model's
    device and in its dtype, and each utterance's exact frame count. Frames past an utterance's count
    are padding (slice [:n]). Each utterance's features equal the model run on it alone, whatever else
    shares the batch.
    """
    model = backbone.model
    with torch.inference_mode():
        cnn, lengths = cnn_features(backbone, waves)
        if model.config.model_type in BATCH_EXACT_MODEL_TYPES:
            layers = _encoder_layers(model, cnn, _frame_mask(lengths, cnn.device))
        else:
            # Unverified encoders (conformer convolutions, data2vec's stacked positional convs) let padding
            # leak into real frames: run them one utterance at a time, which is exact by construction.
            alone = [[h[0] for h in _encoder_layers(model, cnn[i : i + 1, :n], None)] for i, n in enumerate(lengths)]
            layers = [nn.utils.rnn.pad_sequence(list(per_layer), batch_first=True) for per_layer in zip(*alone)]
    outputs = ([cnn] if include_cnn else []) + layers
    return outputs, lengths


def cnn_features(backbone: Backbone, waves: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The CNN feature encoder's output for a batch of waves (numpy or torch, anywhere), input
    normalised, each utterance as alone: (B, T_max, C) on the model's device, and each utterance's
    frame count. Extraction and fine-tuning both start here."""
    if len(waves) == 0:
        raise ValueError("a batch needs at least one wave")
    model = backbone.model
    param = next(model.parameters())
    tensors = _to_device([_as_wave(w, i) for i, w in enumerate(waves)], param.device, param.dtype)
    lengths = [backbone.num_frames(t.shape[0]) for t in tensors]
    for i, (t, n) in enumerate(zip(tensors, lengths)):
        if n < 1:
            raise W2VCacheError(
                f"utterance {i} has {t.shape[0]} samples ({1000 * t.shape[0] / SAMPLE_RATE:.1f} ms); "
                f"{backbone.name} needs at least {backbone.receptive_field} samples "
                f"({1000 * backbone.receptive_field / SAMPLE_RATE:.0f} ms) for one frame"
            )
    if _batches_exactly(model, param.device):
        return _masked_cnn_features(model, tensors, lengths, backbone.normalize), lengths
    if backbone.normalize:
        tensors = [normalize_wave(t) for t in tensors]
    return _cnn_features(model, tensors, lengths), lengths  # (B, T_max, C)


def encode(
    backbone: Backbone,
    waves: Sequence[torch.Tensor],
    mask_frames: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
    cnn: tuple[torch.Tensor, list[int]] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The last layer for training: like `forward_layers` (same exact batching, same input
    normalisation) but with gradients, and an optional `mask_frames(hidden, lengths)` applied
    to the transformer input (SpecAugment-style time masking) as W2V fine-tuning does.
    `cnn`: the batch's `cnn_features`, when already computed (a frozen CNN's, kept).

    Returns (B, T_max, D) and each utterance's frame count.
    """
    model = backbone.model
    cnn, lengths = cnn if cnn is not None else cnn_features(backbone, waves)
    projected = model.feature_projection(cnn)
    hidden = projected[0] if isinstance(projected, tuple) else projected
    if mask_frames is not None:
        hidden = mask_frames(hidden, lengths)
    mask = _frame_mask(lengths, hidden.device)
    if model.config.model_type in BATCH_EXACT_MODEL_TYPES:
        return model.encoder(hidden, attention_mask=mask).last_hidden_state, lengths
    alone = [model.encoder(hidden[i : i + 1, :n]).last_hidden_state[0] for i, n in enumerate(lengths)]
    return nn.utils.rnn.pad_sequence(alone, batch_first=True), lengths


def _encoder_layers(model: nn.Module, cnn: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Feature projection and transformer on CNN features: [layer00, ..., layerNN], each (B, T, D).

    These are the steps of Wav2Vec2Model.forward / HubertModel.forward after the CNN, minus what only
    matters in training (SpecAugment masking) and the optional adapter, which runs after the encoder
    on its last state only and is not a layer.
    """
    projected = model.feature_projection(cnn)
    # Wav2Vec2 returns (hidden, normed CNN features) for its quantizer; HuBERT returns the tensor.
    hidden = projected[0] if isinstance(projected, tuple) else projected
    with _record_blocks(model.encoder.layers) as layers:
        # With a mask, the encoder zeroes padded frames before its positional convolution, so real frames
        # near the end see the same zeros as the conv's own padding gives a lone utterance.
        model.encoder(hidden, attention_mask=mask)
    return layers


def _as_wave(wave: np.ndarray | torch.Tensor, index: int) -> torch.Tensor:
    """The wave as a 1-D float tensor where it is, refused with a message naming the utterance."""
    t = wave if isinstance(wave, torch.Tensor) else torch.from_numpy(np.asarray(wave))
    if t.dim() != 1:
        raise W2VCacheError(f"utterance {index}: expected mono audio (1-D samples), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise W2VCacheError(f"utterance {index}: expected float samples in [-1, 1], got {t.dtype}")
    # A CPU wave is checked by numpy: torch's check takes an OpenMP pass over every core for each
    # utterance, which stalls when the cores are busy decoding and writing (as they are in extraction).
    finite = (np.isfinite(t.detach().numpy()).all() if t.device.type == "cpu" and t.dtype != torch.bfloat16
              else torch.isfinite(t).all())
    if not finite:
        raise W2VCacheError(f"utterance {index}: audio contains NaN or infinite samples")
    return t


def _to_device(waves: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The waves on `device` in `dtype`. To a GPU, the host waves go in one copy from pinned memory:
    CUDA makes a copy from ordinary (pageable) memory wait for all the device's queued work, so a
    copy per utterance made the loop wait for the device once per utterance."""
    if device.type != "cuda" or not any(w.device.type == "cpu" for w in waves):
        return [w.to(device=device, dtype=dtype) for w in waves]
    host = [w for w in waves if w.device.type == "cpu"]
    staged = torch.empty(sum(len(w) for w in host), dtype=dtype, pin_memory=True)
    start = 0
    for w in host:
        # numpy casts as it copies, on this thread alone (torch's copy would take every core's
        # OpenMP thread for each utterance); torch copies what numpy has no type for (bfloat16).
        if torch.bfloat16 in (w.dtype, dtype):
            staged[start: start + len(w)].copy_(w)
        else:
            staged.numpy()[start: start + len(w)] = w.detach().numpy()
        start += len(w)
    moved = iter(staged.to(device, non_blocking=True).split([len(w) for w in host]))
    return [next(moved) if w.device.type == "cpu" else w.to(device=device, dtype=dtype) for w in waves]


def _cnn_features(model: nn.Module, waves: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """CNN feature-encoder output for each wave, zero-padded to (B, T_max, C)."""
    if _normalises_over_time(model.feature_extractor):
        # GroupNorm (W2V-Base's first conv) normalises each channel over *all* time steps, so zero
        # padding would change every real frame: run each utterance alone, unpadded, and pad after.
        features = [model.feature_extractor(w[None])[0].transpose(0, 1) for w in waves]  # (T_i, C)
        for f, n in zip(features, lengths):
            assert f.shape[0] == n, f"CNN gave {f.shape[0]} frames, the length formula {n}"
        return nn.utils.rnn.pad_sequence(features, batch_first=True)
    # Per-frame norms only (LayerNorm variant): a real frame never sees samples past its utterance's
    # end, so one batched pass over zero-padded audio is exact.
    audio = nn.utils.rnn.pad_sequence(waves, batch_first=True)
    return model.feature_extractor(audio).transpose(1, 2)


def _batches_exactly(model: nn.Module, device: torch.device) -> bool:
    """Whether forward_layers runs the CNN on the whole batch (`_masked_cnn_features`): on a GPU, for
    a CNN whose only norm over time is a per-channel GroupNorm after its first convolution (W2V-Base,
    HuBERT-Base). A GPU runs one utterance's small convolutions far below its pace, one kernel
    launch after another; a CPU computes each alone as fast, and skips the padding."""
    if device.type != "cuda" or model.config.model_type not in BATCH_EXACT_MODEL_TYPES:
        return False
    layers = model.feature_extractor.conv_layers
    norm, conv = getattr(layers[0], "layer_norm", None), getattr(layers[0], "conv", None)
    # What _masked_cnn_features assumes of them: the frame count (len - kernel) // stride + 1,
    # and an affine norm per channel.
    return (isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels and norm.affine
            and isinstance(conv, nn.Conv1d) and conv.padding == (0,) and conv.dilation == (1,)
            and not any(_normalises_over_time(layer) for layer in layers[1:]))


def _masked_cnn_features(model: nn.Module, waves: list[torch.Tensor], lengths: list[int], normalize: bool) -> torch.Tensor:
    """What `_cnn_features` gives (after `normalize_wave` when `normalize`), in one batched pass:
    the input's and the first layer's statistics are taken over each utterance's own samples and
    frames, never its padding. The convolutions are otherwise exact on padded input, as in
    `_cnn_features`' LayerNorm case: a real frame never sees a sample past its utterance's end."""
    first = model.feature_extractor.conv_layers[0]
    kernel, stride = first.conv.kernel_size[0], first.conv.stride[0]
    device = waves[0].device
    samples = ints_on([len(w) for w in waves], device)
    frames = ints_on([(len(w) - kernel) // stride + 1 for w in waves], device)
    audio = nn.utils.rnn.pad_sequence(waves, batch_first=True)  # (B, S)
    if normalize:  # normalize_wave's float64 statistics, per utterance
        real = torch.arange(audio.shape[1], device=device)[None, :] < samples[:, None]
        x, n = audio.double(), samples[:, None].double()
        mean = x.sum(1, keepdim=True) / n
        var = (((x - mean) * real) ** 2).sum(1, keepdim=True) / n
        audio = ((x - mean) / torch.sqrt(var + NORM_EPS)).to(audio.dtype) * real
    # In float32 whatever the autocast, as autocast runs GroupNorm: a float16 frame count is
    # infinite past 65,504 frames (20 s of audio), a bfloat16 one rounded past 256.
    h = first.conv(audio[:, None]).float()  # (B, C, T0)
    real = (torch.arange(h.shape[2], device=device)[None, :] < frames[:, None])[:, None, :]
    count = frames[:, None, None].float()
    norm = first.layer_norm  # GroupNorm with a group per channel: each channel over its utterance's frames
    centred = (h - (h * real).sum(2, keepdim=True) / count) * real
    var = (centred * centred).sum(2, keepdim=True) / count
    h = first.activation(centred * torch.rsqrt(var + norm.eps) * norm.weight[None, :, None] + norm.bias[None, :, None])
    for layer in model.feature_extractor.conv_layers[1:]:
        h = layer(h)
    out = h.transpose(1, 2)  # (B, T_max, C)
    assert out.shape[1] == max(lengths), (out.shape, lengths)
    return out * _frame_mask(lengths, out.device)[:, :, None]  # padding zeros, as pad_sequence leaves


def _normalises_over_time(feature_extractor: nn.Module) -> bool:
    return any(isinstance(m, (nn.GroupNorm, nn.InstanceNorm1d)) for m in feature_extractor.modules())


def _frame_mask(lengths: list[int], device) -> torch.Tensor:
    frames = torch.arange(max(lengths), device=device)
    return frames[None, :] < ints_on(lengths, torch.device(device))[:, None]


def ints_on(values: list[int], device: torch.device) -> torch.Tensor:
    """Host integers as a tensor on `device`; to a GPU from pinned memory, so that the copy waits
    for none of the device's queued work (a copy from pageable memory waits for all of it)."""
    cuda = device.type == "cuda"
    return torch.tensor(values, pin_memory=cuda).to(device, non_blocking=cuda)


@contextlib.contextmanager
def _record_blocks(blocks: nn.ModuleList):
    """Collect [input of block 1, output of block 1, ..., output of block N] during one encoder call.

    transformers 5 no longer builds hidden_states inside the encoder: the top-level model's
    `capture_outputs` decorator records them with hooks on the blocks, so calling `model.encoder`
    directly returns only last_hidden_state. We hook the same places, which gives exactly
    `model(..., output_hidden_states=True).hidden_states`: entry 0 is the first block's input (after
    the positional conv and, in post-LN models, the encoder LayerNorm), entry N the last block's output
    (before the final LayerNorm of pre-LN, "stable layer norm", models).
    """
    recorded: list[torch.Tensor] = []

    def first_input(module, args):
        recorded.append(args[0])

    def block_output(module, args, output):
        recorded.append(output[0] if isinstance(output, tuple) else output)  # some blocks return tuples

    handles = [blocks[0].register_forward_pre_hook(first_input)]
    handles += [block.register_forward_hook(block_output) for block in blocks]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
    if len(recorded) != len(blocks) + 1:  # e.g. LayerDrop skipped a block: only possible in train mode
        raise RuntimeError(f"recorded {len(recorded)} hidden states for {len(blocks)} blocks")


# ---------------------------------------------------------------------------------------------------
# Re-initialisation


def reinit_layers(model_or_backbone: Backbone | nn.Module, layers: Sequence[int], seed: int) -> None:
    """Re-initialise transformer blocks `layers` (1-based) with the model's own initializer.

    Each block's fresh weights depend only on (seed, block number): `--reinit 12` and `--reinit 11,12`
    give block 12 the same weights, on any device. The global RNG is untouched.
    """
    base = _base_model(model_or_backbone)
    blocks = base.encoder.layers
    check_block_numbers(layers, len(blocks))
    for number in layers:
        _reinit_block(base, blocks[number - 1], _block_seed(seed, number))


def _base_model(obj: Backbone | nn.Module) -> PreTrainedModel:
    model = obj.model if isinstance(obj, Backbone) else obj
    # A task model (Wav2Vec2ForCTC) holds the encoder in its base model.
    base = getattr(model, "base_model", model)
    if not (isinstance(base, PreTrainedModel) and hasattr(getattr(base, "encoder", None), "layers")):
        raise TypeError(f"reinit_layers needs a Backbone or a W2V-style transformers model, not {type(obj)}")
    return base


def check_block_numbers(layers: Sequence[int], depth: int) -> None:
    seen = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise W2VCacheError(f"re-init layer {layer!r} is not a block number (1-{depth})")
        if layer < 1:
            raise W2VCacheError(
                f"layer {layer} is not a transformer block: blocks are numbered 1-{depth} "
                "(layer 0, the transformer input, has no weights of its own)"
            )
        if layer > depth:
            raise W2VCacheError(f"layer {layer} does not exist: the model has {depth} transformer blocks (1-{depth})")
        if layer in seen:
            raise W2VCacheError(f"layer {layer} is listed twice in the layers to re-initialise")
        seen.add(layer)


def _block_seed(seed: int, block: int) -> int:
    """A seed per (seed, block), so re-initialising one block never shifts another's random draws."""
    digest = hashlib.sha256(f"w2vcache-reinit:{seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds must fit in a signed 64-bit int


@torch.no_grad()
def _reinit_block(base: PreTrainedModel, block: nn.Module, seed: int) -> None:
    """Initialise a CPU float32 copy of `block` as transformers would, then copy it into place.

    transformers 5 marks every module (and every loaded tensor) `_is_hf_initialized`, and its init
    functions silently skip flagged tensors, so calling `_init_weights` on a loaded model is a no-op.
    We clear the flags on the copy. Drawing on CPU makes the result identical on every device.
    """
    fresh = copy.deepcopy(block).to(device="cpu", dtype=torch.float32)
    for part in [*fresh.modules(), *fresh.parameters(), *fresh.buffers()]:
        if hasattr(part, "_is_hf_initialized"):
            delattr(part, "_is_hf_initialized")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh.apply(base._init_weights)  # children first, like PreTrainedModel.initialize_weights
    for target, source in zip(
        [*block.parameters(), *block.buffers()], [*fresh.parameters(), *fresh.buffers()], strict=True
    ):
        target.copy_(source)  # keeps the Parameter objects (optimizer state, requires_grad) intact
