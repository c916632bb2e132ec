"""backbone: loading, every-layer forward (batched == alone), weight hashing, block re-initialisation."""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import HubertConfig, HubertForCTC, Wav2Vec2ForCTC, Wav2Vec2Model

from w2vcache.audio import SAMPLE_RATE
from w2vcache import backbone as backbone_module
from w2vcache.backbone import forward_layers, reinit_layers, state_dict_hash
from w2vcache.checkpoints import BUILTIN_MODELS, load_backbone
from w2vcache.errors import W2VCacheError

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO.parent / "shared" / "fixtures" / "real-speech" / "checkpoints"
MIXED_LENGTHS = [12345, 400, 16000, 720, 3201]  # unsorted, incl. a one-frame utterance
ATOL = 1e-4


def waves(lengths, seed=0):
    rs = np.random.RandomState(seed)
    # An offset and an odd scale make input normalisation matter.
    return [(0.1 * rs.randn(n) + 0.02).astype(np.float32) for n in lengths]


def fe_normalize(wave):
    """Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm, written out independently of backbone.py."""
    return (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)


def alone(backbone, wave):
    """[cnn, layer00, ..., layerNN] from the model's own forward on one utterance, batch of one."""
    x = fe_normalize(wave) if backbone.normalize else wave
    x = torch.from_numpy(np.asarray(x, dtype=np.float32))[None]
    with torch.inference_mode():
        out = backbone.model(x, output_hidden_states=True)
        cnn = backbone.model.feature_extractor(x).transpose(1, 2)
    return [cnn[0]] + [h[0] for h in out.hidden_states]


def perturbed(backbone, seed=123):
    """Stand-in for trained weights: every parameter moved off its initial value (LayerNorms off 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return backbone


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- shape of the model --------------------------------------------------------------------------


def test_tiny_geometry_and_layer_names():
    bb = load_backbone("builtin:tiny")
    assert isinstance(bb.model, Wav2Vec2Model) and not bb.model.training
    assert bb.num_layers == 4 and bb.hidden_size == 64
    assert bb.layer_names() == ["layer00", "layer01", "layer02", "layer03", "layer04"]
    assert bb.layer_names(include_cnn=True) == ["cnn", *bb.layer_names()]
    assert bb.frame_rate == SAMPLE_RATE / 320 == 50.0
    assert bb.receptive_field == 400
    assert bb.name == "builtin:tiny" and bb.revision is None and bb.normalize is True


def test_builtin_configs():
    base = BUILTIN_MODELS["builtin:base"]()
    assert (base.hidden_size, base.num_hidden_layers, base.feat_extract_norm) == (768, 12, "group")
    ln = BUILTIN_MODELS["builtin:tiny-ln"]()
    assert ln.feat_extract_norm == "layer" and ln.do_stable_layer_norm
    for make in BUILTIN_MODELS.values():
        config = make()
        assert config.layerdrop == config.mask_time_prob == config.hidden_dropout == 0.0
        assert tuple(config.conv_stride) == (5, 2, 2, 2, 2, 2, 2)


def test_builtin_weights_are_initialised_and_deterministic():
    rng_before = torch.get_rng_state()
    a, b = load_backbone("builtin:tiny"), load_backbone("builtin:tiny")
    assert torch.equal(torch.get_rng_state(), rng_before), "loading must not touch the global RNG"
    assert a.weight_hash() == b.weight_hash()
    state = a.model.state_dict()
    for key, value in state.items():
        assert torch.isfinite(value).all(), key
    # Random where transformers' initializer draws, not zero / uninitialised memory.
    q = state["encoder.layers.0.attention.q_proj.weight"]
    assert 0.015 < q.std() < 0.025  # normal(0, initializer_range=0.02)
    assert state["feature_extractor.conv_layers.0.conv.weight"].std() > 0.1  # kaiming
    assert torch.equal(state["encoder.layers.0.layer_norm.weight"], torch.ones(64))
    assert state["encoder.pos_conv_embed.conv.parametrizations.weight.original1"].abs().sum() > 0


# --- frames ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [400, 401, 720, 16000, 12345])
def test_num_frames_matches_model(num_samples):
    bb = load_backbone("builtin:tiny")
    expected = int(bb.model._get_feat_extract_output_lengths(num_samples))
    assert bb.num_frames(num_samples) == expected
    assert alone(bb, waves([num_samples])[0])[-1].shape[0] == expected
    outputs, frames = forward_layers(bb, waves([num_samples]))
    assert frames == [expected] and outputs[0].shape[1] == expected


def test_too_short_for_one_frame():
    bb = load_backbone("builtin:tiny")
    assert bb.num_frames(399) == int(bb.model._get_feat_extract_output_lengths(399)) == 0
    with pytest.raises(W2VCacheError, match="399 samples"):
        forward_layers(bb, waves([16000, 399]))


# --- forward --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["builtin:tiny", "builtin:tiny-ln"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("as_on_a_gpu", [False, True])
def test_batched_equals_alone(name, normalize, as_on_a_gpu, monkeypatch):
    """as_on_a_gpu: the CNN batched as on a GPU (a group-norm CNN's statistics masked per utterance)."""
    if as_on_a_gpu:
        decide = backbone_module._batches_exactly
        assert decide(load_backbone(name).model, torch.device("cuda")) == (name == "builtin:tiny")
        monkeypatch.setattr(backbone_module, "_batches_exactly", lambda model, device: decide(model, torch.device("cuda")))
    bb = load_backbone(name, normalize=normalize)
    batch = waves(MIXED_LENGTHS)
    outputs, frames = forward_layers(bb, batch, include_cnn=True)
    assert len(outputs) == len(bb.layer_names(include_cnn=True)) == bb.num_layers + 2
    assert frames == [bb.num_frames(n) for n in MIXED_LENGTHS]
    for tensor in outputs:
        assert tensor.shape[:2] == (len(batch), max(frames)) and tensor.dtype == torch.float32
    assert outputs[0].shape[2] == bb.config.conv_dim[-1] and outputs[1].shape[2] == bb.hidden_size
    for i, wave in enumerate(batch):
        reference = alone(bb, wave)
        for layer, got, want in zip(bb.layer_names(include_cnn=True), outputs, reference):
            torch.testing.assert_close(got[i, : frames[i]], want, atol=ATOL, rtol=0, msg=f"{name} {layer} utt {i}")
        if name == "builtin:tiny":  # group norm: its CNN leaves zeros in padding, alone or masked
            assert not outputs[0][i, frames[i]:].any()


def test_batched_group_norm_keeps_float32_statistics_under_float16_autocast(monkeypatch):
    """A 21 s utterance's first layer has more frames than float16 counts (65,504): the batched
    CNN's statistics stay in float32, as autocast keeps GroupNorm's, so it matches the CNN run
    alone to float16's rounding instead of going to infinity."""
    bb = load_backbone("builtin:tiny")
    batch = waves([21 * SAMPLE_RATE, SAMPLE_RATE])
    with torch.autocast("cpu", dtype=torch.float16):
        alone, frames = forward_layers(bb, batch, include_cnn=True)
        decide = backbone_module._batches_exactly
        monkeypatch.setattr(backbone_module, "_batches_exactly", lambda model, device: decide(model, torch.device("cuda")))
        batched, _ = forward_layers(bb, batch, include_cnn=True)
    for layer, got, want in zip(bb.layer_names(include_cnn=True), batched, alone):
        for i, n in enumerate(frames):
            want_i = want[i, :n].float()
            torch.testing.assert_close(got[i, :n].float(), want_i, atol=0.01 * float(want_i.abs().max()), rtol=0,
                                       msg=f"{layer} utt {i}")


def test_stable_layer_norm_last_layer_is_block_output():
    # transformers 5's hidden_states[-1] is the last block's output, before the encoder's final LayerNorm
    # (transformers 4 returned it after); our last layer follows the installed transformers.
    bb = load_backbone("builtin:tiny-ln")
    wave = torch.from_numpy(fe_normalize(waves([4000])[0]))[None]
    with torch.inference_mode():
        out = bb.model(wave, output_hidden_states=True)
    outputs, _ = forward_layers(bb, [wave[0]])
    torch.testing.assert_close(outputs[-1][0], out.hidden_states[-1][0], atol=ATOL, rtol=0)
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state, atol=1e-3)


def test_forward_accepts_tensors_and_rejects_bad_waves():
    bb = load_backbone("builtin:tiny")
    numpy_out, _ = forward_layers(bb, waves([3000]))
    tensor_out, _ = forward_layers(bb, [torch.from_numpy(waves([3000])[0])])
    torch.testing.assert_close(numpy_out[-1], tensor_out[-1])
    with pytest.raises(W2VCacheError, match=r"utterance 1.*\(2, 800\)"):
        forward_layers(bb, [np.zeros(800, np.float32), np.zeros((2, 800), np.float32)])
    with pytest.raises(W2VCacheError, match="int16"):
        forward_layers(bb, [np.zeros(800, np.int16)])
    with pytest.raises(W2VCacheError, match="NaN"):
        forward_layers(bb, [np.full(800, np.nan, np.float32)])


# --- hashing, saving, loading ---------------------------------------------------------------------


def test_weight_hash_save_reload_and_change(tmp_path):
    bb = load_backbone("builtin:tiny")
    bb.model.save_pretrained(tmp_path)
    reloaded = load_backbone(str(tmp_path))
    assert reloaded.name == str(tmp_path) and reloaded.revision is None
    assert reloaded.weight_hash() == bb.weight_hash()
    batch = waves([5000, 1200])
    torch.testing.assert_close(forward_layers(reloaded, batch)[0][-1], forward_layers(bb, batch)[0][-1])
    before = bb.weight_hash()
    with torch.no_grad():
        bb.model.encoder.layers[2].feed_forward.output_dense.weight[0, 0] += 1e-3
    assert bb.weight_hash() != before


def test_ctc_checkpoint_loads_base_model(tmp_path):
    config = BUILTIN_MODELS["builtin:tiny"]()
    config.vocab_size = 32
    torch.manual_seed(1)
    ctc = Wav2Vec2ForCTC(config)
    ctc.save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    assert type(bb.model) is Wav2Vec2Model
    assert bb.weight_hash() == state_dict_hash(ctc.wav2vec2)


def test_hubert_checkpoint_batched_equals_alone(tmp_path):
    config = HubertConfig(**{**BUILTIN_MODELS["builtin:tiny"]().to_diff_dict(), "model_type": "hubert", "vocab_size": 32})
    torch.manual_seed(2)
    HubertForCTC(config).save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    assert bb.config.model_type == "hubert" and bb.num_layers == 4
    batch = waves([2000, 6000])
    outputs, frames = forward_layers(bb, batch, include_cnn=True)
    for i, wave in enumerate(batch):
        for got, want in zip(outputs, alone(bb, wave)):
            torch.testing.assert_close(got[i, : frames[i]], want, atol=ATOL, rtol=0)


def test_preprocessor_config_sets_normalize(tmp_path):
    load_backbone("builtin:tiny").model.save_pretrained(tmp_path)
    assert load_backbone(str(tmp_path)).normalize is True  # no preprocessor_config.json: FE default
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    assert load_backbone(str(tmp_path)).normalize is False
    assert load_backbone(str(tmp_path), normalize=True).normalize is True


def test_describe_is_json():
    bb = load_backbone("builtin:tiny")
    info = json.loads(json.dumps(bb.describe()))
    assert info["name"] == "builtin:tiny" and info["weight_hash"] == bb.weight_hash()
    assert info["model_type"] == "wav2vec2" and info["config"]["hidden_size"] == 64
    assert (info["frame_rate"], info["receptive_field"], info["normalize"]) == (50.0, 400, True)


# --- bad models -----------------------------------------------------------------------------------


def test_not_a_model_directory(tmp_path):
    with pytest.raises(W2VCacheError, match=str(tmp_path)):
        load_backbone(str(tmp_path))
    with pytest.raises(W2VCacheError, match="no-such-dir"):
        load_backbone("./no-such-dir")
    weights = tmp_path / "model.safetensors"  # the weights file inside a model folder, not the folder
    weights.write_bytes(b"")
    with pytest.raises(W2VCacheError, match=f"is a file: name the folder that holds the model \\('{tmp_path}'"):
        load_backbone(str(weights))
    with pytest.raises(W2VCacheError, match="builtin:huge"):
        load_backbone("builtin:huge")
    with pytest.raises(W2VCacheError, match="revision"):
        load_backbone("builtin:tiny", revision="main")


def test_refuses_non_w2v_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    with pytest.raises(W2VCacheError, match="'bert'"):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize(
    "config_text",
    [
        "{not json",
        json.dumps({"model_type": "wav2vec2", "conv_dim": [8, 8], "conv_stride": [5, 2, 2], "conv_kernel": [10, 3, 3]}),
    ],
)
def test_bad_config_json(tmp_path, config_text):
    (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(W2VCacheError, match=str(tmp_path)):
        load_backbone(str(tmp_path))


def test_checkpoint_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    load_backbone("builtin:tiny").model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layers.1.attention.q_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(W2VCacheError, match="encoder.layers.1.attention.q_proj.weight"):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("damage", ["garbage", "cut", "empty"])
def test_a_damaged_weights_file_is_named_in_one_line(tmp_path, fmt, damage):
    from click.testing import CliRunner
    from w2vcache.cli import main

    model = load_backbone("builtin:tiny").model
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if fmt == "bin":
        weights.unlink()
        weights = tmp_path / "pytorch_model.bin"
        torch.save(model.state_dict(), weights)
    data = weights.read_bytes()
    weights.write_bytes({"garbage": b"garbage\n", "cut": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(W2VCacheError, match=rf"^'{tmp_path}': cannot read its .*(corrupt|truncated).*download or copy it again"):
        load_backbone(str(tmp_path))
    result = CliRunner().invoke(main, ["corpus", "--split", "dev=dev-clean", "--model", str(tmp_path)])
    assert result.exit_code == 1 and result.output.startswith(f"Error: '{tmp_path}': cannot read its "), result.output
    assert "Traceback" not in result.output


# --- model directories from elsewhere: data, never code ---------------------------------------------


def model_dir_with_custom_code(path, model_type, marker):
    """A save_pretrained directory whose config.json points (auto_map) at a module of its own, which
    would leave `marker` behind if it were ever imported."""
    load_backbone("builtin:tiny").model.save_pretrained(path)
    (path / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import Wav2Vec2Config as CustomConfig, Wav2Vec2Model as CustomModel\n")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=model_type,
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_custom_code_in_a_model_directory_is_never_run(tmp_path, monkeypatch):
    prompts = []  # transformers would ask "Do you wish to run the custom code? [y/N]"
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    marker = tmp_path / "custom-code-ran"
    known = model_dir_with_custom_code(tmp_path / "known", "wav2vec2", marker)
    bb = load_backbone(str(known))  # a type transformers implements: its own class, auto_map ignored
    assert type(bb.model) is Wav2Vec2Model and bb.weight_hash() == load_backbone("builtin:tiny").weight_hash()
    unknown = model_dir_with_custom_code(tmp_path / "unknown", "my-w2v", marker)
    with pytest.raises(W2VCacheError, match=r"model type 'my-w2v' comes with its own code \(auto_map in "
                                            r"config.json\), which w2vcache never runs"):
        load_backbone(str(unknown))
    assert not marker.exists() and prompts == []


def test_an_attention_kernel_from_the_hub_is_refused(tmp_path):
    load_backbone("builtin:tiny").model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attn_implementation": "someone/flash-kernel"}))
    with pytest.raises(W2VCacheError, match="attention kernel 'someone/flash-kernel' from the Hugging Face Hub"):
        load_backbone(str(tmp_path))


class LeavesAMark:
    """Unpickling this makes a directory: stands in for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (__import__("os").mkdir, (self.path,))


def test_bin_weights_load_as_tensors_only(tmp_path):
    from safetensors.torch import load_file

    reference = load_backbone("builtin:tiny")
    reference.model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert load_backbone(str(tmp_path)).weight_hash() == reference.weight_hash()
    marker = tmp_path / "pickle-ran"
    torch.save({**state, "extra": LeavesAMark(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(W2VCacheError, match=r"its .bin weights hold more than tensors \(a pickled [\w.]*mkdir\)"):
        load_backbone(str(tmp_path))
    assert not marker.exists()


def test_not_batch_exact_encoders_run_alone(tmp_path):
    # data2vec-audio's stacked positional convs let padding leak into real frames; it runs one by one.
    from transformers import Data2VecAudioConfig, Data2VecAudioModel

    tiny = BUILTIN_MODELS["builtin:tiny"]().to_diff_dict()
    keep = ("conv_dim", "conv_kernel", "conv_stride", "hidden_size", "num_attention_heads", "intermediate_size")
    config = Data2VecAudioConfig(**{k: tiny[k] for k in keep}, num_hidden_layers=2, num_conv_pos_embeddings=3)
    torch.manual_seed(3)
    Data2VecAudioModel(config).save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    batch = waves([5000, 900, 2000])
    outputs, frames = forward_layers(bb, batch, include_cnn=True)
    for i, wave in enumerate(batch):
        for got, want in zip(outputs, alone(bb, wave)):
            torch.testing.assert_close(got[i, : frames[i]], want, atol=ATOL, rtol=0)


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import, so set the constant as well as the variable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    # "Fast" means: offline mode is honoured, so not one name lookup or connection is tried (each
    # could wait on a timeout on a machine without network). Record and refuse any attempt.
    attempts = []

    def no_network(what):
        def refuse(*args, **kwargs):
            attempts.append((what, args[:2]))
            raise OSError(f"test: no network ({what})")
        return refuse

    monkeypatch.setattr(socket, "getaddrinfo", no_network("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", no_network("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", no_network("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", no_network("connect_ex"))
    with pytest.raises(W2VCacheError, match="facebook/wav2vec2-base") as error:
        load_backbone("facebook/wav2vec2-base")
    assert attempts == []
    assert "network" in str(error.value) and "download" in str(error.value)


def cached_hub_model(cache, name="someone/tiny-w2v", commit="0123456789abcdef0123456789abcdef01234567"):
    """builtin:tiny saved in a Hugging Face cache folder as if downloaded from the Hub as `name`."""
    repo = cache / ("models--" + name.replace("/", "--"))
    snapshot_dir = repo / "snapshots" / commit
    bb = load_backbone("builtin:tiny")
    bb.model.save_pretrained(snapshot_dir)
    (snapshot_dir / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return bb, commit


def test_an_unreachable_hub_is_found_in_seconds_and_the_cache_used(monkeypatch, tmp_path):
    """Not in offline mode, but no way to the Hub (no name resolution): one quick look, then the
    cache alone, instead of half a minute of retries per file."""
    import huggingface_hub.constants

    from w2vcache import checkpoints

    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    attempts = []

    def no_name(*args, **kwargs):
        attempts.append(args[:2])
        raise socket.gaierror(-2, "Name or service not known")

    for what in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, what, no_name)
    monkeypatch.setattr(socket.socket, "connect", no_name)
    bb, commit = cached_hub_model(tmp_path)
    hub = load_backbone("someone/tiny-w2v")
    assert (hub.revision, hub.normalize, hub.weight_hash()) == (commit, False, bb.weight_hash())
    assert len(attempts) == 1  # the look itself; nothing retried
    with pytest.raises(W2VCacheError, match=r"the Hub cannot be reached from here \(huggingface.co: Name or service "
                       r"not known\) and the model is not in the cache.*download"):
        load_backbone("someone/not-downloaded")
    assert len(attempts) == 2
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the libraries go through it: no look
    assert checkpoints._hub_unreachable() is None and len(attempts) == 2


def test_hub_id_from_cache_records_commit(monkeypatch, tmp_path):
    import huggingface_hub.constants

    bb, commit = cached_hub_model(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # so "someone/tiny-w2v" cannot be a local directory
    hub = load_backbone("someone/tiny-w2v")
    assert (hub.name, hub.revision, hub.normalize) == ("someone/tiny-w2v", commit, False)
    assert hub.weight_hash() == bb.weight_hash()


# --- re-initialisation ----------------------------------------------------------------------------


def block_of(key):
    """1-based transformer block a state_dict key belongs to, or None."""
    parts = key.split(".")
    return int(parts[2]) + 1 if parts[:2] == ["encoder", "layers"] else None


def test_reinit_changes_exactly_the_named_blocks():
    bb = perturbed(load_backbone("builtin:tiny"))
    params_before = {id(p): p.requires_grad for p in bb.model.parameters()}
    before = snapshot(bb.model)
    rng_before = torch.get_rng_state()
    reinit_layers(bb, [2, 4], seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert {id(p): p.requires_grad for p in bb.model.parameters()} == params_before
    after = snapshot(bb.model)
    for key in before:
        if block_of(key) in (2, 4):
            assert not (before[key] == after[key]).any(), f"{key} not (fully) re-initialised"
        else:
            assert torch.equal(before[key], after[key]), f"{key} changed"
    # The model's own initializer: LayerNorm 1/0, zero biases, normal(0, 0.02) weights.
    block = bb.model.encoder.layers[3]
    assert torch.equal(block.final_layer_norm.weight, torch.ones(64))
    assert torch.equal(block.attention.q_proj.bias, torch.zeros(64))
    assert 0.015 < block.feed_forward.intermediate_dense.weight.std() < 0.025


def test_reinit_is_seeded_and_per_block():
    def reinit(layers, seed):
        bb = perturbed(load_backbone("builtin:tiny"))
        reinit_layers(bb, layers, seed)
        return snapshot(bb.model)

    a, b, c, only4 = reinit([2, 4], 0), reinit([2, 4], 0), reinit([2, 4], 1), reinit([4], 0)
    key = "encoder.layers.3.attention.k_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])
    assert torch.equal(a[key], only4[key]), "block 4's fresh weights must not depend on block 2's"


def test_reinit_loaded_checkpoint_and_task_model(tmp_path):
    # from_pretrained flags every loaded tensor _is_hf_initialized, which makes transformers' own init
    # functions skip them: re-initialisation must still happen.
    load_backbone("builtin:tiny").model.save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    before = bb.model.encoder.layers[0].attention.v_proj.weight.clone()
    reinit_layers(bb.model, [1], seed=5)
    assert not (before == bb.model.encoder.layers[0].attention.v_proj.weight).any()

    ctc = Wav2Vec2ForCTC(BUILTIN_MODELS["builtin:tiny"]())
    before = ctc.wav2vec2.encoder.layers[3].attention.v_proj.weight.clone()
    reinit_layers(ctc, [4], seed=5)
    assert not torch.equal(before, ctc.wav2vec2.encoder.layers[3].attention.v_proj.weight)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([5], r"layer 5 does not exist: the model has 4 transformer blocks \(1-4\)"),
        ([0], "layer 0 is not a transformer block"),
        ([-1], "layer -1 is not a transformer block"),
        ([3, 3], "layer 3 is listed twice"),
        (["x"], "'x'"),
    ],
)
def test_reinit_rejects_bad_layers(layers, message):
    bb = load_backbone("builtin:tiny")
    before = bb.weight_hash()
    with pytest.raises(W2VCacheError, match=message):
        reinit_layers(bb, layers, seed=0)
    assert bb.weight_hash() == before


# --- third-party checkpoints (shared fixtures, skipped when absent) -------------------------------


def fixture_checkpoint(name):
    """(model dir, reference json) for a tiny third-party checkpoint in either fixture layout."""
    root = CHECKPOINTS / name
    model_dir = root / "hf_layout" if (root / "hf_layout" / "config.json").exists() else root
    for reference in (root / "reference.json", root / "original" / f"{name}_ref.json"):
        if (model_dir / "config.json").exists() and reference.exists():
            return model_dir, reference
    pytest.skip(f"shared fixture checkpoint {name} not found under {CHECKPOINTS}")


@pytest.mark.parametrize("name", ["tiny_wav2vec2", "tiny_hubert"])
def test_third_party_checkpoint_matches_float64_reference(name):
    model_dir, reference = fixture_checkpoint(name)
    ref = json.loads(reference.read_text())
    clips = [np.asarray(c, dtype=np.float32) for c in ref["clips"]]
    # No preprocessor_config.json: we default to normalising, like Wav2Vec2FeatureExtractor (do_normalize
    # defaults to True). The reference fed the raw clips to the model, so compare with normalize=False.
    # (These are group-norm convs without bias, which cancel most of an input's offset and scale, so the
    # two differ only by ~1e-3, but that is ten times the tolerance.)
    assert load_backbone(str(model_dir)).normalize is True
    for normalize, should_match in ((False, True), (True, False)):
        bb = load_backbone(str(model_dir), normalize=normalize)
        outputs, frames = forward_layers(bb, clips)
        assert frames == [ref["enc_len"]] * len(clips)
        errors = [
            float((outputs[-1][i, : frames[i]].double() - torch.tensor(ref["hidden"][i])).abs().max())
            for i in range(len(clips))
        ]
        assert (max(errors) < ATOL) == should_match, (normalize, errors)
