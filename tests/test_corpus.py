import json
import shutil

import pytest

from conftest import make_librispeech_split, write_wave
from w2vcache.corpus import (
    DATA_DIR,
    build_corpus,
    read_librilight,
    read_manifest,
    read_transcript_tree,
)
from w2vcache.errors import W2VCacheError


@pytest.fixture
def librispeech(tmp_path):
    root = tmp_path / "LibriSpeech"
    make_librispeech_split(root / "dev-clean", {(84, 121): ["HELLO THERE", "GOOD MORNING"], (1272, 135): ["YES"]})
    make_librispeech_split(root / "dev-other", {(116, 288): ["A B", "C D"]})
    make_librispeech_split(root / "test-clean", {(121, 123): ["ONE"]})
    make_librispeech_split(root / "test-other", {(367, 130): ["TWO", "THREE"]})
    return root


def make_librilight(root):
    """The librispeech_finetuning layout: 1h/{0..5}/{clean,other} and 9h/{clean,other}."""
    speaker = 1000
    for part in [f"1h/{i}" for i in range(6)] + ["9h"]:
        for half in ("clean", "other"):
            speaker += 1
            make_librispeech_split(root / part / half, {(speaker, 7): [f"WORDS OF {speaker}"]}, seconds=0.1)
    return root


def test_librispeech_split_reader(librispeech):
    utts = read_transcript_tree(librispeech / "dev-clean", "dev")
    assert [u.id for u in utts] == ["1272-135-0000", "84-121-0000", "84-121-0001"]
    assert utts[1].text == "HELLO THERE" and utts[1].split == "dev"
    assert utts[1].path.endswith("dev-clean/84/121/84-121-0000.flac")


def test_reader_errors(tmp_path, librispeech):
    with pytest.raises(W2VCacheError, match="no such directory"):
        read_transcript_tree(tmp_path / "absent", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(W2VCacheError, match=r"empty: no utterances"):
        read_transcript_tree(tmp_path / "empty", "x")
    # an audio file without a transcript line
    write_wave(librispeech / "dev-clean/84/121/84-121-0009.flac")
    with pytest.raises(W2VCacheError, match=r"1 audio file\(s\) have no transcript line: .*84-121-0009\.flac"):
        read_transcript_tree(librispeech / "dev-clean", "dev")
    # a transcript line without audio
    (librispeech / "dev-clean/84/121/84-121-0009.flac").unlink()
    (librispeech / "dev-clean/84/121/84-121-0000.flac").unlink()
    with pytest.raises(W2VCacheError, match=r"1 transcript line\(s\) have no audio file: 84-121-0000"):
        read_transcript_tree(librispeech / "dev-clean", "dev")


def test_missing_transcript_fixture(shared_fixtures):
    with pytest.raises(W2VCacheError, match=r"1003-2-0002\.flac"):
        read_transcript_tree(shared_fixtures / "missing-transcript/LibriSpeech/dev-clean", "dev")


def test_real_librispeech_fixture(shared_fixtures):
    corpus = build_corpus(librispeech=shared_fixtures / "LibriSpeech", splits=["dev=dev-clean", "test=test-clean"])
    assert len(corpus.splits["dev"]) == 11
    first = corpus.splits["dev"][0]
    assert first.id == "1272-128104-0000" and first.text.startswith("MISTER QUILTER")


def test_librilight_subsets(tmp_path):
    root = make_librilight(tmp_path / "librispeech_finetuning")
    ten_min = read_librilight(tmp_path, "10min", "train")  # the folder above works too
    one_h = read_librilight(root, "1h", "train")
    ten_h = read_librilight(root, "10h", "train")
    assert len(ten_min) == 2 and len(one_h) == 12 and len(ten_h) == 14
    assert {u.id for u in ten_min} < {u.id for u in one_h} < {u.id for u in ten_h}
    assert [u.id for u in ten_h] == sorted(u.id for u in ten_h)
    with pytest.raises(W2VCacheError, match="unknown Libri-light set '5h'"):
        read_librilight(root, "5h", "train")
    (root / "9h" / "other").rename(root / "9h" / "gone")
    with pytest.raises(W2VCacheError, match=r"9h/other: missing"):
        read_librilight(root, "10h", "train")


def test_standard_recipe(tmp_path, librispeech):
    light = make_librilight(tmp_path / "ll" / "librispeech_finetuning")
    corpus = build_corpus(librispeech=librispeech, librilight=light)
    assert list(corpus.splits) == ["train", "dev", "test-clean", "test-other"]
    assert len(corpus.splits["train"]) == 14
    assert len(corpus.splits["dev"]) == 5  # dev-clean + dev-other
    assert corpus.sources["dev"] == ["dev-clean", "dev-other"]
    # LibriSpeech alone gives the dev and test splits
    assert list(build_corpus(librispeech=librispeech).splits) == ["dev", "test-clean", "test-other"]


def test_custom_splits_and_their_errors(tmp_path, librispeech):
    corpus = build_corpus(librispeech=librispeech, splits=["a=dev-clean", f"b={librispeech / 'test-other'}"])
    assert list(corpus.splits) == ["a", "b"] and len(corpus.splits["b"]) == 2
    with pytest.raises(W2VCacheError, match="split 'a' is named twice"):
        build_corpus(librispeech=librispeech, splits=["a=dev-clean", "a=dev-other"])
    with pytest.raises(W2VCacheError, match="appears twice"):
        build_corpus(librispeech=librispeech, splits=["a=dev-clean", "b=dev-clean"])
    with pytest.raises(W2VCacheError, match="expected NAME=SOURCE"):
        build_corpus(splits=["dev"])
    with pytest.raises(W2VCacheError, match="'train-clean-100' not found"):
        build_corpus(librispeech=librispeech, splits=["a=train-clean-100"])
    with pytest.raises(W2VCacheError, match="needs --librilight"):
        build_corpus(splits=["t=librilight-1h"])


def test_manifests(tmp_path):
    audio = tmp_path / "audio"
    write_wave(audio / "x.wav")
    write_wave(audio / "y.flac")
    tsv = tmp_path / "m.tsv"
    tsv.write_text("audio/x.wav\tHELLO WORLD\naudio/y.flac\tBYE\tutt-y\n")
    utts = read_manifest(tsv, "dev")
    assert [(u.id, u.text) for u in utts] == [("utt-y", "BYE"), ("x", "HELLO WORLD")]
    assert utts[1].path == str((audio / "x.wav").resolve())
    with_header = tmp_path / "h.tsv"
    with_header.write_text("id\ttext\tpath\nA1\tHI\taudio/x.wav\n")
    assert [(u.id, u.text) for u in read_manifest(with_header, "d")] == [("A1", "HI")]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"audio": "audio/x.wav", "text": "HI", "id": "a"}) + "\n")
    assert read_manifest(jsonl, "d")[0].id == "a"
    # errors: missing audio, duplicate ids, empty, bad line
    bad = tmp_path / "bad.tsv"
    bad.write_text("audio/nope.wav\tHI\n")
    with pytest.raises(W2VCacheError, match=r"bad\.tsv: 1 line\(s\) name audio that does not exist: audio/nope\.wav \(line 1\)"):
        read_manifest(bad, "d")
    dup = tmp_path / "dup.tsv"
    dup.write_text("audio/x.wav\tHI\tsame\naudio/y.flac\tHO\tsame\n")
    with pytest.raises(W2VCacheError, match="duplicate utterance id.*same"):
        read_manifest(dup, "d")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(W2VCacheError, match="lists no utterances"):
        read_manifest(empty, "d")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "HI"}\n')
    with pytest.raises(W2VCacheError, match=r"broken\.jsonl:1: needs \"audio\""):
        read_manifest(broken, "d")
    broken.write_text(json.dumps({"audio": "audio/x.wav", "text": "HI"}) + "\n" + json.dumps({"audio": "audio/x.wav", "text": 5}))
    with pytest.raises(W2VCacheError, match=r"broken\.jsonl:2: text is 5, not a string"):
        read_manifest(broken, "d")
    # a manifest as a split source
    corpus = build_corpus(splits=[f"dev={tsv}"])
    assert len(corpus.splits["dev"]) == 2
    # a link farm: ids from the links' names, audio read through them
    (tmp_path / "farm").mkdir()
    (tmp_path / "farm" / "spk1-utt1.wav").symlink_to(audio / "x.wav")
    farm = tmp_path / "farm.tsv"
    farm.write_text("farm/spk1-utt1.wav\tHI\n")
    [linked] = read_manifest(farm, "d")
    assert (linked.id, linked.path) == ("spk1-utt1", str((audio / "x.wav").resolve()))


def test_bundled_mini_corpus():
    corpus = build_corpus()
    assert list(corpus.splits) == ["train", "dev", "test-clean", "test-other"]
    speakers = {name: {u.id.split("-")[0] for u in utts} for name, utts in corpus.splits.items()}
    assert len(set().union(*speakers.values())) >= 8
    test_speakers = speakers["test-clean"] | speakers["test-other"]
    assert not speakers["train"] & test_speakers
    texts = [u.text for u in corpus]
    assert len(set(texts)) == len(texts)  # no sentence repeated
    assert all(u.text == u.text.upper() for u in corpus)
    assert all(u.path.startswith(str(DATA_DIR)) for u in corpus)


def test_a_librispeech_root_is_not_read_as_one_split(librispeech):
    with pytest.raises(W2VCacheError, match=r"is a LibriSpeech root \(dev-clean, dev-other, test-clean.*\): name a split "
                       rf"of it, --librispeech {librispeech} --split dev=dev-clean$"):
        build_corpus(splits=[f"dev={librispeech}"])
    # The folder above LibriSpeech/, which may hold one split only
    with pytest.raises(W2VCacheError, match=r"holds a LibriSpeech root \(LibriSpeech/: dev-clean, "):
        build_corpus(splits=[f"dev={librispeech.parent}"])
    for split in librispeech.iterdir():
        if split.name != "test-other":
            shutil.rmtree(split)
    with pytest.raises(W2VCacheError, match=r"\(LibriSpeech/: test-other\): name a split of it, .* --split dev=test-other$"):
        build_corpus(splits=[f"dev={librispeech.parent}"])
    shutil.rmtree(librispeech / "test-other")
    with pytest.raises(W2VCacheError, match="holds LibriSpeech/ with no split folder in it"):
        build_corpus(splits=[f"dev={librispeech.parent}"])


def test_manifests_with_a_byte_order_mark_and_short_rows(tmp_path):
    write_wave(tmp_path / "x.wav")
    bom = tmp_path / "bom.tsv"
    bom.write_bytes("\ufeffpath\ttext\nx.wav\tHELLO\n".encode("utf-8"))
    assert [(u.id, u.text) for u in read_manifest(bom, "d")] == [("x", "HELLO")]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(("\ufeff" + json.dumps({"audio": "x.wav", "text": "HI"}) + "\n").encode("utf-8"))
    assert read_manifest(jsonl, "d")[0].text == "HI"
    short = tmp_path / "short.tsv"
    short.write_text("id\taudio\ttext\nx\tx.wav\n")
    with pytest.raises(W2VCacheError, match=r"short\.tsv:2: expected"):
        read_manifest(short, "d")


def test_a_manifest_that_is_not_utf8_is_named_with_what_it_is(tmp_path):
    """A spreadsheet's UTF-16 export, a Latin-1 file and an audio file given as a manifest each
    get one line saying so, not a UnicodeDecodeError."""
    write_wave(tmp_path / "x.wav")
    utf16 = tmp_path / "excel.tsv"
    utf16.write_bytes("path\ttext\nx.wav\tHELLO\n".encode("utf-16"))
    with pytest.raises(W2VCacheError, match=r"excel\.tsv: not UTF-8 text \(byte 0xff at offset 0\); it is UTF-16 .*; save it as UTF-8"):
        read_manifest(utf16, "d")
    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes("x.wav\tCAF\u00c9\n".encode("latin-1"))
    with pytest.raises(W2VCacheError, match=r"latin1\.tsv: not UTF-8 text \(byte 0xc9 at offset 9\); save it as UTF-8"):
        read_manifest(latin1, "d")
    with pytest.raises(W2VCacheError, match=r"x\.wav is audio, not a manifest: --split NAME=SOURCE takes a manifest"):
        read_manifest(tmp_path / "x.wav", "d")


def test_corpus_command_takes_the_skip_bad_its_error_suggests_and_lists_what_it_left_out(librispeech):
    from click.testing import CliRunner

    from w2vcache.cli import main

    write_wave(librispeech / "dev-clean/84/121/84-121-0009.flac")  # no transcript line
    stopped = CliRunner().invoke(main, ["corpus", "--librispeech", str(librispeech)])
    assert stopped.exit_code == 1 and "pass --skip-bad to leave them out" in stopped.output
    listed = CliRunner().invoke(main, ["corpus", "--librispeech", str(librispeech), "--skip-bad"])
    assert listed.exit_code == 0, listed.output
    assert f"skipped      dev/84-121-0009: {(librispeech / 'dev-clean/84/121/84-121-0009.flac').resolve()}: " \
           "no transcript line" in listed.output


def test_a_split_folder_named_nearly_right_is_said_not_to_be_read(librispeech):
    (librispeech / "test-clean").rename(librispeech / "test_clean")
    corpus = build_corpus(librispeech=librispeech)
    assert "test-clean" not in corpus.splits
    assert corpus.notes[-1].endswith("(not there: Libri-light's 10 h train set (--librilight DIR), test-clean); "
                                     "not read: test_clean (LibriSpeech's split folders are named like test-clean)")


def test_corpus_lists_the_files_extract_would_refuse(tmp_path):
    """`corpus` checks every file as extract does: unusable ones are listed with why and left out
    of the counts, and the listing goes on (an unreadable file used to stop it)."""
    from click.testing import CliRunner

    from w2vcache.cli import main

    good = [write_wave(tmp_path / f"ok-{i}.flac", seconds=0.6, seed=i) for i in range(2)]
    slow = write_wave(tmp_path / "slow.wav", seconds=0.6, rate=8000)
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"not audio at all")
    manifest = tmp_path / "all.tsv"
    manifest.write_text("".join(f"{p.name}\tWORDS\n" for p in (*good, slow, broken)))
    result = CliRunner().invoke(main, ["corpus", "--split", f"train={manifest}"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].split()[:2] == ["train", "2"]
    assert "2 audio file(s) cannot be used" in result.output
    assert f"unusable     train/slow: {slow}: sample rate is 8000 Hz" in result.output
    assert f"unusable     train/broken: {broken}: not a readable audio file" in result.output


def test_corpus_checks_lengths_against_the_model_named(tmp_path):
    """200 samples are too few for W2V's 400-sample receptive field (the default check), enough
    for a model whose CNN sees fewer: `corpus --model` checks as `extract --model` would."""
    from click.testing import CliRunner
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from w2vcache.checkpoints import BUILTIN_MODELS
    from w2vcache.cli import main

    short = write_wave(tmp_path / "short.flac", seconds=200 / 16000)
    manifest = tmp_path / "short.tsv"
    manifest.write_text("short.flac\tWORDS\n")
    result = CliRunner().invoke(main, ["corpus", "--split", f"dev={manifest}"])
    assert "unusable     dev/short" in result.output and "at least 400" in result.output, result.output
    small = {**BUILTIN_MODELS["builtin:tiny"]().to_diff_dict(), "conv_kernel": [10, 3], "conv_stride": [5, 2],
             "conv_dim": [32, 32], "num_feat_extract_layers": 2}
    Wav2Vec2Model(Wav2Vec2Config(**small)).save_pretrained(tmp_path / "small-model")
    result = CliRunner().invoke(main, ["corpus", "--split", f"dev={manifest}", "--model", str(tmp_path / "small-model")])
    assert result.exit_code == 0, result.output
    assert "unusable" not in result.output
    assert [line.split()[:2] for line in result.output.splitlines() if line.startswith("dev ")] == [["dev", "1"]]
