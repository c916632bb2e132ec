"""Load Wav2Vec 2.0 (W2V) and read every layer's hidden states; re-initialise transformer blocks.

Layer naming used everywhere in w2vcache (store, probe, report):

    "cnn"      the CNN feature encoder's output, (T, conv_dim[-1]), before the feature projection
    "layer00"  the transformer input after the positional convolution (hidden_states[0] in transformers)
    "layerNN"  the output of transformer block NN (1-based), as transformers' `output_hidden_states` gives it

Models come from three places: built-in configs with seeded random weights (demos, tests), a local
directory written by `save_pretrained`, or a Hugging Face Hub id (needs the network or the HF cache).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel, Wav2Vec2Config

from w2vcache.audio import SAMPLE_RATE
from w2vcache.errors import W2VCacheError
from w2vcache.layers import layer_name

try:  # transformers 5 configs are strict dataclasses; invalid values raise this (not a ValueError)
    from huggingface_hub.errors import StrictDataclassError as _ConfigValidationError
except ImportError:  # older huggingface_hub
    _ConfigValidationError = ValueError

CNN_LAYER = "cnn"  # name of the optional CNN-output layer
NORM_EPS = 1e-7  # variance floor of Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
BUILTIN_SEED = 0  # torch seed the built-in models' random weights are drawn with
# Input normalisation when a checkpoint has no preprocessor_config.json: Wav2Vec2FeatureExtractor's own
# do_normalize default, which is what transformers' pipeline would do (and what facebook/wav2vec2-base,
# -large-lv60 etc. ship). A bare `Model.save_pretrained` directory has no such file. Note: the float64
# references of the shared tiny fixture checkpoints were computed on *raw* clips, so they match with
# normalize=False (to ~1e-6), not with this default (~1e-3 off: group-norm convs without bias cancel most of
# an input's offset and scale, so normalising changes little for W2V-Base-style models, but not nothing).
DEFAULT_NORMALIZE = True

# Model types whose encoder, given a frame mask, gives every utterance of a padded batch exactly what it
# gives that utterance alone (checked against model(...) per utterance). Other W2V-style encoders run
# one utterance at a time.
BATCH_EXACT_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "unispeech", "unispeech-sat")

# W2V-Base feature-encoder geometry: 7 convolutions, total stride 5*2^6 = 320 samples (20 ms at 16 kHz,
# 50 frames/s) and a receptive field of 400 samples (25 ms).
BASE_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)  # samples / frames of the previous conv
BASE_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)

# We only ever run frozen eval forwards (and fine-tuning builds its own regularisation), so the built-in
# configs switch every stochastic part off; mask_time_prob=0 also means no masked_spec_embed parameter.
NO_DROPOUT = dict(
    hidden_dropout=0.0,
    activation_dropout=0.0,
    attention_dropout=0.0,
    feat_proj_dropout=0.0,
    final_dropout=0.0,
    layerdrop=0.0,
    mask_time_prob=0.0,
    mask_feature_prob=0.0,
)


def _tiny_config(**overrides) -> Wav2Vec2Config:
    """W2V-Base CNN geometry with a tiny transformer: same frame rate as the real model, ~0.2M parameters."""
    kwargs = dict(
        conv_dim=(32,) * len(BASE_CONV_KERNEL),
        conv_kernel=BASE_CONV_KERNEL,
        conv_stride=BASE_CONV_STRIDE,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        **NO_DROPOUT,
    )
    kwargs.update(overrides)
    return Wav2Vec2Config(**kwargs)


def _tiny_ln_config() -> Wav2Vec2Config:
    """The "large"-style variant: LayerNorm in every conv and pre-LN transformer blocks."""
    return _tiny_config(feat_extract_norm="layer", do_stable_layer_norm=True)


def _base_config() -> Wav2Vec2Config:
    """W2V-Base: Wav2Vec2Config's defaults are the base architecture (768 hidden, 12 blocks, group norm)."""
    return Wav2Vec2Config(**NO_DROPOUT)


BUILTIN_MODELS: dict[str, Callable[[], PretrainedConfig]] = {
    "builtin:tiny": _tiny_config,
    "builtin:tiny-ln": _tiny_ln_config,
    "builtin:base": _base_config,
}


@dataclass
class Backbone:
    """A loaded W2V-style encoder and where it came from."""

    model: nn.Module  # the base model (Wav2Vec2Model, HubertModel, ...), eval mode
    name: str  # what the user asked for, or the resolved local directory
    revision: str | None  # hub commit hash when known
    normalize: bool  # per-utterance zero-mean unit-variance input normalisation

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        """Transformer blocks N; hidden-state layers are 0..N."""
        return len(self.model.encoder.layers)

    @property
    def layer_names(self) -> "LayerNames":
        """["layer00", ..., "layerNN"]; call it, `layer_names(include_cnn=True)`, to get "cnn" first."""
        return LayerNames(layer_name(i) for i in range(self.num_layers + 1))

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
        get_lengths = self.model._get_feat_extract_output_lengths
        # The optional adapter shortens the *output* after the encoder; our layers are taken before it.
        kwargs = {"add_adapter": False} if "add_adapter" in inspect.signature(get_lengths).parameters else {}
        return max(0, int(get_lengths(int(num_samples), **kwargs)))

    def weight_hash(self) -> str:
        return state_dict_hash(self.model)

    def describe(self) -> dict:
        """Provenance written next to extracted features."""
        return {
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


class LayerNames(list):
    """A list of layer names that can also be called: `names(include_cnn=True)` puts "cnn" first.

    The API is used both as `backbone.layer_names` and `backbone.layer_names(include_cnn)`; a list
    subclass keeps both spellings working without a second name.
    """

    def __call__(self, include_cnn: bool = False) -> list[str]:
        return ([CNN_LAYER] if include_cnn else []) + list(self)


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


# ---------------------------------------------------------------------------------------------------
# Loading


def load_backbone(
    name: str = "builtin:tiny",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    normalize: bool | None = None,
) -> Backbone:
    """Load a built-in model, a `save_pretrained` directory, or a Hub id, in eval mode on `device`.

    `normalize` overrides the checkpoint's preprocessor_config.json `do_normalize` (default True).
    """
    if revision is not None and (name.startswith("builtin:") or os.path.isdir(name)):
        raise W2VCacheError(f"a revision ({revision!r}) only applies to Hub ids, not to {name!r}")
    if name in BUILTIN_MODELS:
        model, checkpoint_normalize = _build_builtin(name), None
    elif name.startswith("builtin:"):
        raise W2VCacheError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    elif os.path.isdir(name):
        model, checkpoint_normalize = _load_local(name), _read_do_normalize(name)
        name = os.path.abspath(name)
    elif _looks_like_path(name):
        raise W2VCacheError(f"model directory {name!r} does not exist")
    else:
        model, revision, checkpoint_normalize = _load_hub(name, revision)
    if normalize is None:
        normalize = DEFAULT_NORMALIZE if checkpoint_normalize is None else checkpoint_normalize
    model.eval()
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as e:  # torch raises AssertionError for "not compiled with CUDA"
        raise W2VCacheError(f"cannot use device {str(device)!r}: {e}") from None
    return Backbone(model=model, name=name, revision=revision, normalize=bool(normalize))


def _build_builtin(name: str) -> nn.Module:
    """Seeded random weights; the fork keeps the caller's global RNG untouched."""
    config = BUILTIN_MODELS[name]()
    # transformers 5 does initialise weights in the constructor (post_init -> init_weights); tests check
    # they are random, non-zero and identical across two builds.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTIN_SEED)
        model = AutoModel.from_config(config)
    return model


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", "\\")) or name.endswith(("/", "\\")) or name.count("/") > 1


def _load_local(path: str) -> nn.Module:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise W2VCacheError(
            f"{path!r} is not a model directory: it has no config.json "
            "(expected a directory written by save_pretrained or `hf download`)"
        )
    try:
        # local_files_only: a local directory must never trigger a download or even a network request.
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, _ConfigValidationError) as e:
        raise W2VCacheError(f"cannot read the model config in {path!r}: {_first_line(e)}") from None
    _check_architecture(config, path)
    try:
        model, info = AutoModel.from_pretrained(
            path, config=config, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise W2VCacheError(f"cannot load the model weights in {path!r}: {_first_line(e)}") from None
    _check_loaded(info, path)
    return model


def _load_hub(name: str, revision: str | None) -> tuple[nn.Module, str | None, bool | None]:
    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
        _check_architecture(config, name)
        model, info = AutoModel.from_pretrained(
            name, config=config, revision=revision, dtype=torch.float32, output_loading_info=True
        )
    except W2VCacheError:
        raise
    except (OSError, ValueError, _ConfigValidationError) as e:  # offline, not cached, no such repo/revision
        at = f" at revision {revision!r}" if revision else ""
        raise W2VCacheError(
            f"could not load model {name!r}{at} from the Hugging Face Hub ({_first_line(e)}). "
            "This machine may have no network access. Download the model where there is network, e.g. "
            f"`hf download {name}` (older: `huggingface-cli download {name}`; then set HF_HUB_OFFLINE=1 here), "
            f"or save it with `AutoModel.from_pretrained('{name}').save_pretrained('DIR')`, "
            "and pass the directory as the model."
        ) from None
    _check_loaded(info, name)
    return model, _hub_commit(name, revision), _read_do_normalize(name, revision=revision)


def _check_architecture(config: PretrainedConfig, where: str) -> None:
    """Refuse anything that is not a W2V-style encoder, before any weight is read.

    The skeleton is built on the meta device (no memory, no init) just to look at its submodules:
    forward_layers needs feature_extractor -> feature_projection -> encoder.layers.
    """
    model_type = getattr(config, "model_type", "?")
    try:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise W2VCacheError(f"{where!r}: model type {model_type!r} cannot be built ({_first_line(e)})") from None
    needed = ("feature_extractor", "feature_projection", "encoder")
    if not all(hasattr(skeleton, part) for part in needed) or not hasattr(skeleton.encoder, "layers"):
        raise W2VCacheError(
            f"{where!r} holds a {model_type!r} model ({type(skeleton).__name__}), which is not a "
            "Wav2Vec 2.0-style encoder (raw audio -> CNN feature encoder -> projection -> transformer); "
            "use wav2vec2, hubert or a similar model"
        )


def _check_loaded(info: dict, where: str) -> None:
    """Missing weights would be silently random: refuse rather than extract garbage.

    Unexpected keys are fine: they are the task head (lm_head of a ...ForCTC checkpoint) we drop.
    """
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = (missing + mismatched)[:5]
        raise W2VCacheError(
            f"the checkpoint {where!r} does not match its config: {len(missing)} missing and "
            f"{len(mismatched)} mis-shaped weights (e.g. {', '.join(bad)})"
        )


def _read_do_normalize(name: str, revision: str | None = None) -> bool | None:
    """`do_normalize` from preprocessor_config.json, or None when the checkpoint has no such file."""
    if os.path.isdir(name):
        path = os.path.join(name, "preprocessor_config.json")
        path = path if os.path.isfile(path) else None
    else:
        from transformers.utils import cached_file

        # Best effort: the model itself loaded, so a failure here means the repo has no such file.
        path = cached_file(
            name,
            "preprocessor_config.json",
            revision=revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    if path is None:
        return None
    try:
        with open(path) as f:
            value = json.load(f).get("do_normalize")
    except (OSError, ValueError) as e:
        raise W2VCacheError(f"cannot read {path!r}: {_first_line(e)}") from None
    return None if value is None else bool(value)


def _hub_commit(name: str, revision: str | None) -> str | None:
    """The commit hash the HF cache resolved `revision` to (snapshots/<commit>/config.json), if known."""
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    try:
        path = cached_file(name, "config.json", revision=revision, local_files_only=True)
    except OSError:
        return revision
    return extract_commit_hash(path, None) or revision


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0]


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
    if len(waves) == 0:
        raise ValueError("forward_layers needs at least one wave")
    param = next(model.parameters())
    tensors = [_as_wave(w, i, param.device, param.dtype) for i, w in enumerate(waves)]
    lengths = [backbone.num_frames(t.shape[0]) for t in tensors]
    for i, (t, n) in enumerate(zip(tensors, lengths)):
        if n < 1:
            raise W2VCacheError(
                f"utterance {i} has {t.shape[0]} samples ({1000 * t.shape[0] / SAMPLE_RATE:.1f} ms); "
                f"{backbone.name} needs at least {backbone.receptive_field} samples "
                f"({1000 * backbone.receptive_field / SAMPLE_RATE:.0f} ms) for one frame"
            )
    if backbone.normalize:
        tensors = [normalize_wave(t) for t in tensors]

    with torch.inference_mode():
        cnn = _cnn_features(model, tensors, lengths)  # (B, T_max, C)
        if model.config.model_type in BATCH_EXACT_MODEL_TYPES:
            layers = _encoder_layers(model, cnn, _frame_mask(lengths, cnn.device))
        else:
            # Unverified encoders (conformer convolutions, data2vec's stacked positional convs) let padding
            # leak into real frames: run them one utterance at a time, which is exact by construction.
            alone = [[h[0] for h in _encoder_layers(model, cnn[i : i + 1, :n], None)] for i, n in enumerate(lengths)]
            layers = [nn.utils.rnn.pad_sequence(list(per_layer), batch_first=True) for per_layer in zip(*alone)]
    outputs = ([cnn] if include_cnn else []) + layers
    return outputs, lengths


def encode(
    backbone: Backbone,
    waves: Sequence[torch.Tensor],
    mask_frames: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The last layer for training: like `forward_layers` (same exact batching, same input
    normalisation) but with gradients, and an optional `mask_frames(hidden, lengths)` applied
    to the transformer input (SpecAugment-style time masking) as W2V fine-tuning does.

    Returns (B, T_max, D) and each utterance's frame count.
    """
    model = backbone.model
    lengths = [backbone.num_frames(w.shape[0]) for w in waves]
    if backbone.normalize:
        waves = [normalize_wave(w) for w in waves]
    cnn = _cnn_features(model, list(waves), lengths)
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


def _as_wave(wave: np.ndarray | torch.Tensor, index: int, device, dtype) -> torch.Tensor:
    t = wave if isinstance(wave, torch.Tensor) else torch.from_numpy(np.asarray(wave))
    if t.dim() != 1:
        raise W2VCacheError(f"utterance {index}: expected mono audio (1-D samples), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise W2VCacheError(f"utterance {index}: expected float samples in [-1, 1], got {t.dtype}")
    if not torch.isfinite(t).all():
        raise W2VCacheError(f"utterance {index}: audio contains NaN or infinite samples")
    return t.to(device=device, dtype=dtype)


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


def _normalises_over_time(feature_extractor: nn.Module) -> bool:
    return any(isinstance(m, (nn.GroupNorm, nn.InstanceNorm1d)) for m in feature_extractor.modules())


def _frame_mask(lengths: list[int], device) -> torch.Tensor:
    frames = torch.arange(max(lengths), device=device)
    return frames[None, :] < torch.tensor(lengths, device=device)[:, None]


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
    _check_block_numbers(layers, len(blocks))
    for number in layers:
        _reinit_block(base, blocks[number - 1], _block_seed(seed, number))


def _base_model(obj: Backbone | nn.Module) -> PreTrainedModel:
    model = obj.model if isinstance(obj, Backbone) else obj
    # A task model (Wav2Vec2ForCTC) holds the encoder in its base model.
    base = getattr(model, "base_model", model)
    if not (isinstance(base, PreTrainedModel) and hasattr(getattr(base, "encoder", None), "layers")):
        raise TypeError(f"reinit_layers needs a Backbone or a W2V-style transformers model, not {type(obj)}")
    return base


def _check_block_numbers(layers: Sequence[int], depth: int) -> None:
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
