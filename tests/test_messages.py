"""What a user reads: loading a checkpoint whose head is left out, and refusing a store made otherwise."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Wav2Vec2ForCTC, Wav2Vec2ForPreTraining

from w2vcache.backbone import state_dict_hash
from w2vcache.checkpoints import BUILTIN_MODELS, load_backbone
from w2vcache.corpus import build_corpus
from w2vcache.errors import W2VCacheError
from w2vcache.extract import ExtractConfig, extract
from w2vcache.store.creation import SHOWN_DIFFERENCES


def tiny_config(**overrides):
    config = BUILTIN_MODELS["builtin:tiny"]()
    for key, value in {"vocab_size": 32, **overrides}.items():
        setattr(config, key, value)
    return config


def saved(model_class, directory, seed=1, **overrides):
    torch.manual_seed(seed)
    model = model_class(tiny_config(**overrides))
    model.save_pretrained(directory)
    return model


def lines_of(text, word):
    return [line for line in text.splitlines() if word in line]


def load_reports(caplog):
    """transformers' load reports: logged warnings (its handler writes to the stderr it found at import)."""
    return [r.getMessage() for r in caplog.records if "LOAD REPORT" in r.getMessage()]


# --- loading a checkpoint -------------------------------------------------------------------------


def test_a_ctc_checkpoint_loads_with_one_line_about_its_head(tmp_path, capfd, caplog):
    ctc = saved(Wav2Vec2ForCTC, tmp_path)
    capfd.readouterr()
    bb = load_backbone(str(tmp_path))
    out, err = capfd.readouterr()
    assert bb.weight_hash() == state_dict_hash(ctc.wav2vec2)
    assert load_reports(caplog) == [] and "UNEXPECTED" not in out + err
    assert lines_of(out + err, "lm_head") == [f"{tmp_path}: a CTC checkpoint; its CTC head (lm_head.*) is not "
                                              f"used, only its encoder"]
    load_backbone(str(tmp_path))  # as a fine-tuning sweep does for each run: said once is enough
    assert lines_of("".join(capfd.readouterr()), "lm_head") == []


def test_a_pre_training_checkpoint_loads_with_one_line_about_its_heads(tmp_path, capfd, caplog):
    # facebook/wav2vec2-base is such a checkpoint: a quantizer and projections beside the encoder.
    pre = saved(Wav2Vec2ForPreTraining, tmp_path)
    capfd.readouterr()
    bb = load_backbone(str(tmp_path))
    out, err = capfd.readouterr()
    assert bb.weight_hash() == state_dict_hash(pre.wav2vec2)
    assert load_reports(caplog) == [] and "UNEXPECTED" not in out + err
    assert lines_of(out + err, "quantizer") == [f"{tmp_path}: a pre-training checkpoint; its pre-training heads "
                                                "(quantizer.*, project_q.*, project_hid.*) are not used, only its encoder"]


def test_other_unused_weights_still_get_transformers_load_report(tmp_path, capfd, caplog):
    # A CTC head and a pre-training head together fit neither known checkpoint: transformers'
    # report of what it left out is shown as it is.
    saved(Wav2Vec2ForPreTraining, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = torch.zeros(3, 2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    capfd.readouterr()
    load_backbone(str(tmp_path))
    out, err = capfd.readouterr()
    [report] = load_reports(caplog)
    assert lines_of(report, "quantizer.codevectors") and lines_of(report, "UNEXPECTED")
    assert "not used, only its encoder" not in out + err


def test_missing_weights_show_the_load_report_and_are_refused(tmp_path, capfd, caplog):
    saved(Wav2Vec2ForCTC, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["wav2vec2.encoder.layers.1.attention.q_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    capfd.readouterr()
    with pytest.raises(W2VCacheError, match="encoder.layers.1.attention.q_proj.weight"):
        load_backbone(str(tmp_path))
    out, err = capfd.readouterr()
    [report] = load_reports(caplog)
    assert lines_of(report, "MISSING") and lines_of(report, "lm_head") and "CTC head" not in out + err


# --- refusing a store made with another model -----------------------------------------------------


def test_a_store_of_another_model_is_refused_with_the_first_differences_one_per_line(tmp_path):
    corpus = build_corpus(splits=["dev=dev-clean"])
    store = tmp_path / "features.zarr"
    extract(corpus, ExtractConfig(store=str(store)), progress=False)
    other = tmp_path / "other-model"
    saved(Wav2Vec2ForCTC, other, hidden_size=32, intermediate_size=64)
    with pytest.raises(W2VCacheError) as error:
        extract(corpus, ExtractConfig(model=str(other), store=str(store)), progress=False)
    head, *listed = str(error.value).splitlines()
    count = int(head.removeprefix(f"store {store} already exists with other settings: ").split()[0])
    assert count > SHOWN_DIFFERENCES
    assert head.endswith(f"{count} differ, the first {SHOWN_DIFFERENCES}:")
    assert len(listed) == SHOWN_DIFFERENCES and all(line.startswith("  ") for line in listed)
    names = [line.split(":")[0].strip() for line in listed]
    # The causes come first: the model's name and weights, not the config keys that follow from them.
    assert "provenance model.name" in names and "provenance model.weight_hash" in names
    assert names.index("provenance model.name") < min(
        [i for i, name in enumerate(names) if name.startswith("provenance model.config.")] + [len(names)])
    assert f"asked for '{other}'" in listed[names.index("provenance model.name")]
