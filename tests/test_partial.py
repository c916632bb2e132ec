"""A LibriSpeech tree with only some of the recipe's splits: the splits that are there are taken,
one line says how they map and what is missing, and probe and fine-tune test on the test splits
the data has without being told."""

import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import make_librispeech_split
from w2vcache.cli import main
from w2vcache.corpus import DATA_DIR, build_corpus
from w2vcache.errors import W2VCacheError


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def partial_tree(tmp_path_factory):
    """Some of LibriSpeech as downloaded: dev-clean, test-clean and Mini LibriSpeech's train-clean-5
    (the bundled corpus's folders of those names), no dev-other, no test-other."""
    root = tmp_path_factory.mktemp("partial") / "LibriSpeech"
    for source, name in (("dev-clean", "dev-clean"), ("test-clean", "test-clean"), ("train-clean", "train-clean-5")):
        shutil.copytree(DATA_DIR / source, root / name)
    return root


def test_partial_tree_takes_the_splits_that_are_there(partial_tree):
    corpus = build_corpus(librispeech=partial_tree.parent)  # the folder above LibriSpeech/ works too
    assert corpus.sources == {"train": ["train-clean-5"], "dev": ["dev-clean"], "test-clean": ["test-clean"]}
    assert {u.id for u in corpus.splits["dev"]} == {p.name.split(".")[0] for p in (DATA_DIR / "dev-clean").rglob("*.flac")}
    (note,) = corpus.notes
    assert "train = train-clean-5; dev = dev-clean; test-clean = test-clean" in note
    assert "dev-other" in note and "test-other" in note and "--librilight" in note


def test_mini_librispeech_names_and_the_full_recipe(tmp_path):
    make_librispeech_split(tmp_path / "ls" / "dev-clean-2", {(84, 121): ["HELLO THERE"]})
    make_librispeech_split(tmp_path / "ls" / "test-other", {(121, 123): ["ONE"]})
    corpus = build_corpus(librispeech=tmp_path / "ls")
    assert corpus.sources == {"dev": ["dev-clean-2"], "test-other": ["test-other"]}
    assert "not there: Libri-light's 10 h train set (--librilight DIR), dev-other, test-clean" in corpus.notes[0]
    # The whole recipe: nothing reported missing.
    corpus = build_corpus(librispeech=DATA_DIR)
    assert list(corpus.splits) == ["train", "dev", "test-clean", "test-other"]
    assert corpus.sources["dev"] == ["dev-clean", "dev-other"]
    # A named split list is taken as it is, with no note.
    assert build_corpus(librispeech=DATA_DIR, splits=["dev=dev-clean"]).notes == []


def test_a_tree_with_none_of_the_recipe_is_refused_naming_what_it_has(tmp_path):
    (tmp_path / "ls" / "music").mkdir(parents=True)
    with pytest.raises(W2VCacheError, match=r"none of the recipe's LibriSpeech splits is there \(it has: music\)"):
        build_corpus(librispeech=tmp_path / "ls")


def test_real_partial_tree(shared_fixtures):
    corpus = build_corpus(librispeech=shared_fixtures / "LibriSpeech")
    assert list(corpus.splits) == ["train", "dev", "test-clean"]
    assert "not there:" in corpus.notes[0] and "test-other" in corpus.notes[0]


def test_extract_and_probe_a_partial_tree_with_default_test_splits(tmp_path, partial_tree):
    store, runs = tmp_path / "features.zarr", tmp_path / "runs"
    result = cli("corpus", "--librispeech", partial_tree)
    assert result.exit_code == 0, result.output
    assert "not there:" in result.stderr and "test-clean" in result.stdout and "test-other" not in result.stdout
    result = cli("extract", "--librispeech", partial_tree, "--store", store, "--layers", "2")
    assert result.exit_code == 0, result.output
    assert "splits: train = train-clean-5; dev = dev-clean; test-clean = test-clean" in result.stderr
    result = cli("probe", "--store", store, "--layer", "2", "--epochs", "1", "--hidden", "16", "--lstm-layers", "1",
                 "--out", runs)
    assert result.exit_code == 0, result.output
    assert f"testing on test-clean: store {store} has no test-other" in result.stderr
    run = runs / "probe" / "layer02" / "seed0"
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "finished" and "test-clean" in res and "test-other" not in res
    assert json.loads((run / "config.json").read_text())["train"]["test_splits"] == ["test-clean"]
    # Naming a test split the store lacks is still an error that names it.
    result = cli("probe", "--store", store, "--layer", "2", "--epochs", "1", "--test-splits", "test-other",
                 "--out", tmp_path / "other")
    assert result.exit_code == 1 and "test-other" in result.output and "Traceback" not in result.output


def test_finetune_tests_on_the_corpus_test_splits(partial_tree):
    from w2vcache.checkpoints import load_backbone
    from w2vcache.finetune import FinetuneConfig, FinetuneTask
    from w2vcache.train import TrainConfig

    task = FinetuneTask(load_backbone("builtin:tiny"), build_corpus(librispeech=partial_tree),
                        FinetuneConfig(num_workers=0), TrainConfig())
    assert list(task.splits) == ["train", "dev", "test-clean"]
