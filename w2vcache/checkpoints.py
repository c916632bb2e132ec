"""Where W2V comes from: built-in configs with seeded random weights (demos, tests, benchmarks), a
local directory written by `save_pretrained`, or a Hugging Face Hub id (the network or the HF cache),
each checked to be a W2V-style encoder and loaded into a `Backbone`.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, Wav2Vec2Config

from w2vcache.backbone import Backbone
from w2vcache.errors import W2VCacheError

try:  # transformers 5 configs are strict dataclasses; invalid values raise this (not a ValueError)
    from huggingface_hub.errors import StrictDataclassError as _ConfigValidationError
except ImportError:  # older huggingface_hub
    _ConfigValidationError = ValueError

BUILTIN_SEED = 0  # torch seed the built-in models' random weights are drawn with
# Input normalisation when a checkpoint has no preprocessor_config.json: Wav2Vec2FeatureExtractor's own
# do_normalize default, which is what transformers' pipeline would do (and what facebook/wav2vec2-base,
# -large-lv60 etc. ship). A bare `Model.save_pretrained` directory has no such file. Note: the float64
# references of the shared tiny fixture checkpoints were computed on *raw* clips, so they match with
# normalize=False (to ~1e-6), not with this default (~1e-3 off: group-norm convs without bias cancel most of
# an input's offset and scale, so normalising changes little for W2V-Base-style models, but not nothing).
DEFAULT_NORMALIZE = True

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
