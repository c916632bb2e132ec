"""Where W2V comes from: built-in configs with seeded random weights (demos, tests, benchmarks), a
local directory written by `save_pretrained`, a Hugging Face Hub id (the network or the HF cache),
or a `w2vcache finetune` run directory (its best epoch's encoder), each checked to be a W2V-style
encoder and loaded into a `Backbone`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import socket
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, Wav2Vec2Config
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from w2vcache.backbone import Backbone
from w2vcache.errors import W2VCacheError
from w2vcache.runs import BEST, CONFIG, METRICS, read_metrics, read_run

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

# Heads a checkpoint may carry beside the encoder: loading the encoder alone leaves their weights
# out, as intended. A ...ForCTC checkpoint has a CTC head; a ...ForPreTraining one (such as
# facebook/wav2vec2-base) has the quantizer and projections of its contrastive task.
CTC_HEAD_PREFIX = "lm_head."
UNUSED_HEADS = {  # the line said instead of transformers' load report -> the head's weight prefixes
    "a CTC checkpoint; its CTC head ({}) is not used, only its encoder": (CTC_HEAD_PREFIX,),
    "a pre-training checkpoint; its pre-training heads ({}) are not used, only its encoder":
        ("quantizer.", "project_q.", "project_hid."),
}
# The logger transformers' "<Model> LOAD REPORT" (a table of unexpected, missing, mis-shaped keys) goes to.
TRANSFORMERS_LOAD_LOGGER = "transformers.modeling_utils"


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
    elif os.path.isdir(name) and _is_run_dir(name):
        return _load_run(name, device, normalize)
    elif os.path.isdir(name):
        model, checkpoint_normalize = _load_local(name), _read_do_normalize(name)
        name = os.path.abspath(name)
    elif os.path.isfile(name):
        folder = os.path.dirname(os.path.abspath(name))
        raise W2VCacheError(f"--model {name!r} is a file: name the folder that holds the model ({folder!r}: a "
                            "save_pretrained folder, or a fine-tuning run directory), or a Hub id")
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
            "(expected a directory written by save_pretrained or `hf download`, "
            "or a fine-tuning run directory such as RUNS/finetune/reinit-none/seed0)"
        )
    try:
        # local_files_only: a local directory must never trigger a download or even a network request.
        config = _read_config(path, local_files_only=True)
    except (OSError, ValueError, KeyError, _ConfigValidationError) as e:
        raise W2VCacheError(f"cannot read the model config in {path!r}: {_first_line(e)}") from None
    _check_architecture(config, path)
    try:
        model, info = _from_pretrained(path, config, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise W2VCacheError(f"cannot load the model weights in {path!r}: {_first_line(e)}") from None
    _check_loaded(info, path)
    return model


# best.pt holds CTCModel's state dict (finetune.py): the encoder under "w2v.", beside it the CTC
# head and the mask vector fine-tuning made when the model had none, which the store does not need.
RUN_ENCODER_PREFIX = "w2v."
RUN_HEAD_PREFIXES = ("head.", "mask_embedding")


def _is_run_dir(path: str) -> bool:
    """A probe or fine-tuning run directory (docs/RUNS.md): its config.json states the run's kind,
    which a model's config.json never does."""
    try:
        with open(os.path.join(path, CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "kind" in config and "model_type" not in config


def _load_run(path: str, device, normalize: bool | None) -> Backbone:
    """The encoder of a fine-tuning run's best epoch: the base model the run started from (as its
    config.json names it), with the W2V weights of best.pt in place of its own."""
    run = read_run(path)
    if run.kind != "finetune":
        model = (run.config.get("data") or {}).get("model") or {}
        made_with = f" ({model['name']})" if model.get("name") else ""
        raise W2VCacheError(
            f"{path!r} is a {run.kind} run: a probe has no W2V weights of its own; extract with the model "
            f"its store was extracted with{made_with}, or give a fine-tuning run"
        )
    best = os.path.join(path, BEST)
    if not os.path.isfile(best):
        raise W2VCacheError(f"fine-tuning run {path!r} has no {BEST} yet: no epoch of it has finished")
    base = (run.config.get("model") or {}).get("backbone")
    if not isinstance(base, dict) or not base.get("name"):
        raise W2VCacheError(f"fine-tuning run {path!r}: its {CONFIG} does not name the model it fine-tuned")
    if run.status != "finished":  # still usable, but best.pt may yet change
        _say_once(f"{path}: the run is {run.status}; its {BEST} holds its best epoch so far")
    try:
        backbone = load_backbone(base["name"], device=device, revision=base.get("revision"), normalize=normalize)
    except W2VCacheError as e:
        raise W2VCacheError(f"fine-tuning run {path!r}: cannot load the model it fine-tuned ({_first_line(e)})") from None
    _load_encoder_weights(backbone.model, best, base["name"])
    best_epoch = run.best_epoch if run.status == "finished" else _best_so_far(path, run)
    frozen = (run.config.get("model") or {}).get("freeze_epochs")
    if isinstance(best_epoch, int) and isinstance(frozen, int) and best_epoch <= frozen:
        _say_once(f"note: {path}: its best epoch ({best_epoch}) trained the CTC head alone (the encoder was "
                  f"frozen for {frozen}): its encoder is the model it started from")
    # Fine-tuning trained on what this base's normalisation gave it, so that (or the caller's) stays.
    return Backbone(
        model=backbone.model,
        name=os.path.abspath(path),  # like a local model directory: found again from any working directory
        revision=None,
        normalize=backbone.normalize,
        run={
            "path": os.path.abspath(path),
            "experiment": run.experiment,
            "seed": run.seed,
            "reinit": run.reinit,
            "status": run.status,
            "best_epoch": best_epoch,
            # As the run recorded it: the weights fine-tuning started from, after any re-initialisation.
            "base_model": {k: base.get(k) for k in ("name", "revision", "weight_hash")},
        },
    )


def _best_so_far(path: str, run) -> int | None:
    """The epoch an unfinished run's best.pt holds: the best dev rate (the one the run selects by,
    ties going to the other rate, then to the first) in metrics.jsonl, as the training loop chooses.
    The loop saves best.pt just before the epoch's metrics line: a run killed between the two (a
    second's window) holds a best.pt one epoch newer than this."""
    selected = (run.config.get("train") or {}).get("select_by", "wer")
    key, other = f"dev_{selected}_percent", f"dev_{'cer' if selected == 'wer' else 'wer'}_percent"
    epochs = [m for m in read_metrics(Path(path) / METRICS) if isinstance(m.get(key), (int, float))]
    return min(epochs, key=lambda m: (m[key], m.get(other, math.inf), m["epoch"]))["epoch"] if epochs else None


def _load_encoder_weights(model: nn.Module, best: str, base_name: str) -> None:
    """best.pt's encoder weights into `model`, every one of them and nothing else, or a refusal."""
    from w2vcache.train import load_checkpoint  # data only (weights_only=True); never unpickles objects

    try:
        state = load_checkpoint(best)
    except (OSError, EOFError, RuntimeError) as e:
        raise W2VCacheError(f"cannot read {best}: {_first_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise W2VCacheError(f"{best} does not hold model weights (a dict of named tensors)")
    encoder = {k.removeprefix(RUN_ENCODER_PREFIX): v for k, v in state.items() if k.startswith(RUN_ENCODER_PREFIX)}
    other = [k for k in state if not k.startswith((RUN_ENCODER_PREFIX, *RUN_HEAD_PREFIXES))]
    own = model.state_dict()
    missing = sorted(set(own) - set(encoder))
    unexpected = sorted(set(encoder) - set(own)) + sorted(other)
    misshaped = sorted(k for k in set(own) & set(encoder) if own[k].shape != encoder[k].shape)
    if missing or unexpected or misshaped:
        bad = (missing + unexpected + misshaped)[:3]
        raise W2VCacheError(
            f"{best} does not fit the model {base_name!r} it fine-tuned: {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(misshaped)} mis-shaped weights (e.g. {', '.join(bad)})"
        )
    model.load_state_dict(encoder)


def _load_hub(name: str, revision: str | None) -> tuple[nn.Module, str | None, bool | None]:
    # Without a way to the Hub, huggingface_hub retries each request for half a minute before
    # transformers falls back on the cache or gives up: look once, quickly, and go to the cache.
    unreachable = _hub_unreachable()
    local = {"local_files_only": True} if unreachable else {}
    try:
        config = _read_config(name, revision=revision, **local)
        _check_architecture(config, name)
        model, info = _from_pretrained(name, config, revision=revision, **local)
    except W2VCacheError:
        raise
    except (OSError, ValueError, _ConfigValidationError) as e:  # offline, not cached, no such repo/revision
        at = f" at revision {revision!r}" if revision else ""
        why = f"the Hub cannot be reached from here ({unreachable}) and the model is not in the cache" if unreachable \
            else _first_line(e)
        raise W2VCacheError(
            f"could not load model {name!r}{at} from the Hugging Face Hub ({why}). "
            "This machine may have no network access. Download the model where there is network, e.g. "
            f"`hf download {name}` (older: `huggingface-cli download {name}`; then set HF_HUB_OFFLINE=1 here), "
            f"or save it with `AutoModel.from_pretrained('{name}').save_pretrained('DIR')`, "
            "and pass the directory as the model."
        ) from None
    _check_loaded(info, name)
    return model, _hub_commit(name, revision), _read_do_normalize(name, revision=revision, **local)


HUB_TIMEOUT = 5.0  # seconds to wait for a connection to the Hub before using the cache alone


def _hub_unreachable() -> str | None:
    """Why no connection to the Hub opens from here (no name resolution, refused, timed out), or
    None when one does, when offline mode (HF_HUB_OFFLINE) already keeps the libraries off it, or
    when a proxy is set (the libraries go through it; a direct connection says nothing)."""
    from urllib.parse import urlparse
    from urllib.request import getproxies

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or getproxies():
        return None
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT).close()
    except OSError as e:
        return f"{endpoint.hostname}: {e.strerror or e}"
    return None


def _read_config(name: str, **kwargs) -> PretrainedConfig:
    """The model's config, refusing one that needs code from the model's own files or the Hub.

    trust_remote_code=False: transformers' own class for a model type it implements, whatever
    auto_map says, and never its interactive "run the custom code? [y/N]" prompt.
    """
    config_dict, _ = PretrainedConfig.get_config_dict(name, **kwargs)
    model_type = config_dict.get("model_type")
    if config_dict.get("auto_map") and model_type not in CONFIG_MAPPING:
        raise W2VCacheError(
            f"{name!r}: model type {model_type!r} comes with its own code (auto_map in config.json), "
            "which w2vcache never runs; use a model transformers implements (wav2vec2, hubert, wavlm, ...)"
        )
    config = AutoConfig.from_pretrained(name, trust_remote_code=False, **kwargs)
    attention = getattr(config, "_attn_implementation", None)
    if isinstance(attention, str) and "/" in attention:  # a kernel repository on the Hub: code
        raise W2VCacheError(
            f"{name!r}: its config asks for the attention kernel {attention!r} from the Hugging Face Hub, "
            "code that w2vcache does not fetch or run; remove attn_implementation from config.json"
        )
    return config


def _from_pretrained(name: str, config: PretrainedConfig, **kwargs) -> tuple[nn.Module, dict]:
    """AutoModel.from_pretrained as data only (safetensors, or a .bin through torch's weights-only
    loader), with transformers' load report held back when all it says is that the checkpoint's CTC
    head is left out: then one line of ours says so instead. Any other report is shown as it is."""
    held = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    logger = logging.getLogger(TRANSFORMERS_LOAD_LOGGER)
    logger.addFilter(hold)
    info = None
    try:
        model, info = AutoModel.from_pretrained(
            name, config=config, dtype=torch.float32, output_loading_info=True, trust_remote_code=False,
            weights_only=True, **kwargs
        )
    except pickle.UnpicklingError as e:  # torch's weights-only loader refused a .bin checkpoint
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the global it refused
        if not found:  # not a pickle at all, or a cut one (torch's message is advice for pickles)
            raise W2VCacheError(f"{name!r}: cannot read its .bin weights: the file is not a torch weights "
                                "file, or is corrupt or truncated; download or copy it again") from None
        raise W2VCacheError(
            f"{name!r}: its .bin weights hold more than tensors (a pickled {found[1]}), "
            "and unpickling that could run code, so they are refused; use the model's model.safetensors"
        ) from None
    except (SafetensorError, RuntimeError, EOFError) as e:  # a damaged weights file, or another failure
        if isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e):  # not the file's bytes
            raise
        what = (f".safetensors weights: a file is corrupt or truncated ({_first_line(e)})" if isinstance(e, SafetensorError)
                else ".bin weights: the file is empty, corrupt or truncated")
        raise W2VCacheError(f"{name!r}: cannot read its {what}; download or copy it again") from None
    finally:
        logger.removeFilter(hold)
        head_only = _unused_head(info) if info is not None else None
        if not head_only:
            for record in held:
                logger.handle(record)
    if head_only:
        line, prefixes = head_only
        _say_once(f"{name}: " + line.format(", ".join(p + "*" for p in prefixes)))
    return model, info


def _unused_head(info: dict) -> tuple[str, tuple[str, ...]] | None:
    """(line, prefixes) of UNUSED_HEADS when the only weights left out are one known head's; else None."""
    unexpected = info.get("unexpected_keys") or ()
    if not unexpected or info.get("missing_keys") or info.get("mismatched_keys"):
        return None
    for line, prefixes in UNUSED_HEADS.items():
        if all(str(k).startswith(prefixes) for k in unexpected):
            return line, prefixes
    return None


def _check_architecture(config: PretrainedConfig, where: str) -> None:
    """Refuse anything that is not a W2V-style encoder, before any weight is read.

    The skeleton is built on the meta device (no memory, no init) just to look at its submodules:
    forward_layers needs feature_extractor -> feature_projection -> encoder.layers.
    """
    model_type = getattr(config, "model_type", "?")
    try:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config, trust_remote_code=False)
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


def _read_do_normalize(name: str, revision: str | None = None, local_files_only: bool = False) -> bool | None:
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
            local_files_only=local_files_only,
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


_SAID: set[str] = set()


def _say_once(line: str) -> None:
    """A note about a model on stderr, once per process: a fine-tuning sweep loads its model for
    every run, and the note would come again each time."""
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0]
