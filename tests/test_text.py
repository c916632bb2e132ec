import numpy as np

from w2vcache import text


def test_vocabulary_is_the_30_symbols_with_blank_first():
    assert len(text.VOCAB) == 30
    assert text.VOCAB[0] == text.BLANK
    assert set(text.VOCAB[4:]) == set("abcdefghijklmnopqrstuvwxyz")
    assert {text.UNK, text.WORD_SEP, "'"} <= set(text.VOCAB)


def test_normalize():
    assert text.normalize("  HELLO   World ") == "hello world"
    assert text.normalize("It’s a well-known café.") == "it's a well known cafe"
    assert text.normalize("Hello, world! (Really?)") == "hello world really"


def test_encode_known_answer():
    enc = text.encode("AB C'")
    a, b, c = (text.SYMBOL_TO_ID[x] for x in "abc")
    assert enc.ids == [a, b, text.SEP_ID, c, text.SYMBOL_TO_ID["'"]]
    assert not enc.unknown


def test_unknown_symbols_are_counted():
    enc = text.encode("room 101 ñ ß")  # ñ folds to n; digits and ß are unknown
    assert enc.unknown == {"1": 2, "0": 1, "ß": 1}
    assert enc.ids.count(text.UNK_ID) == 4
    assert text.ids_to_text(enc.ids) == "room ??? n ?"


def test_transcripts_a_model_cannot_learn_are_pointed_out():
    notes = text.transcript_notes({"train": ["room 101", "北京", "fine", "..."], "dev": ["ok", "I have 3 dogs & 2 cats!"]})
    assert notes == [
        "transcripts with symbols outside the 30-symbol vocabulary (2 in train, 1 in dev) read them as <unk>: "
        "'1' x2, '0' x1, '北' x1, '京' x1, '3' x1, '&' x1, '2' x1; spell numbers out, or transliterate, for the "
        "model to learn them",
        "empty transcripts (1 in train): in training they teach the model to write nothing; in evaluation every "
        "word written for them counts as an insertion"]
    assert text.transcript_notes({"train": ["hello world", "it's"]}) == []


def test_encode_empty():
    assert text.encode("  ...  ").ids == []


def test_ctc_collapse_merges_repeats_then_drops_blanks():
    B = text.BLANK_ID
    h, e, l, o = (text.SYMBOL_TO_ID[x] for x in "helo")
    # "hh e ll <b> l oo" -> h e l l o: the blank keeps the double l apart
    assert text.ctc_collapse([h, h, e, l, l, B, l, o, o]) == [h, e, l, l, o]
    assert text.ctc_collapse([B, B, B]) == []


def test_greedy_decode_known_answer():
    B, S = text.BLANK_ID, text.SEP_ID
    h, i, y, o = (text.SYMBOL_TO_ID[x] for x in "hiyo")
    paths = [
        [h, h, i, B, S, S, y, o, o, B],  # "hi yo"
        [S, h, i, S, S, B, B, B, B, B],  # leading/trailing separators vanish
    ]
    logits = np.full((2, 10, 30), -5.0, dtype=np.float32)
    for b, path in enumerate(paths):
        logits[b, np.arange(10), path] = 5.0
    assert text.greedy_decode(logits) == ["hi yo", "hi"]
    # lengths cut each row before decoding
    assert text.greedy_decode(logits, lengths=[3, 10]) == ["hi", "hi"]


def test_ctc_needs_a_frame_per_symbol_and_a_blank_between_equal_neighbours():
    assert text.ctc_frames_needed(text.encode("ab").ids) == 2
    assert text.ctc_frames_needed(text.encode("aab").ids) == 4  # a, blank, a, b
    assert text.ctc_frames_needed(text.encode("see").ids) == 4
    assert text.ctc_frames_needed([]) == 0
