import pytest

from w2vcache.evaluate import error_rates


def test_corpus_level_wer_known_answer():
    refs = ["the cat sat on the mat", "hello world"]
    hyps = ["the cat sit on mat", "hello there world"]
    # utterance 1: 1 substitution (sat->sit) + 1 deletion (the) = 2 edits of 6 words
    # utterance 2: 1 insertion (there) = 1 edit of 2 words
    rates = error_rates(refs, hyps)
    assert rates.word_edits == 3 and rates.words == 8
    assert rates.wer == pytest.approx(3 / 8)  # corpus level, not the mean of 2/6 and 1/2
    assert rates.utterances == 2
    assert (rates.substitutions, rates.deletions, rates.insertions) == (1, 1, 1)
    assert error_rates(["", "a b"], ["x y", "a"]).to_dict()["insertions"] == 2  # an empty reference's words


def test_each_utterance_is_kept_with_its_own_edits():
    from w2vcache.evaluate import utterance_rows

    rows = utterance_rows(["u1", "u2"], ["The cat sat on the mat.", "hello world"], ["the cat sit on mat", "hello world"])
    assert rows == [
        {"id": "u1", "words": 6, "word_edits": 2, "reference": "The cat sat on the mat.", "hypothesis": "the cat sit on mat"},
        {"id": "u2", "words": 2, "word_edits": 0, "reference": "hello world", "hypothesis": "hello world"}]


def test_cer_known_answer_and_normalisation():
    # normalisation makes case and punctuation free: "HELLO, World." == "hello world"
    rates = error_rates(["HELLO, World."], ["hello world"])
    assert rates.wer == 0 and rates.cer == 0
    rates = error_rates(["abcd"], ["abxd"])
    assert rates.cer == pytest.approx(1 / 4) and rates.wer == 1.0


def test_empty_reference_counts_insertions():
    rates = error_rates(["", "a b"], ["x y", "a b"])
    assert rates.word_edits == 2 and rates.words == 2 and rates.wer == 1.0


def test_rates_given_to_a_person_are_percent_and_insertions_take_them_above_100():
    import jiwer

    refs, hyps = ["a b", "seven"], ["x a y b z w", "seven"]
    rates = error_rates(refs, hyps).to_dict()
    assert rates["wer_percent"] == pytest.approx(100 * jiwer.wer(refs, hyps)) and rates["wer_percent"] > 100
    assert rates["cer_percent"] == pytest.approx(100 * jiwer.cer(refs, hyps))
    assert rates["wer_percent"] == 100 * rates["word_edits"] / rates["words"]
    assert "wer" not in rates and "cer" not in rates


def test_an_unknown_symbol_the_model_wrote_is_scored_as_a_word():
    import jiwer

    from w2vcache import text

    # The decoder writes an unknown symbol as "?"; an inserted unknown word costs one word.
    a, b, c, sep = (text.SYMBOL_TO_ID[s] for s in ("a", "b", "c", text.WORD_SEP))
    decoded = text.ids_to_text([a, sep, b, sep, text.UNK_ID, sep, c])
    assert decoded == "a b ? c"
    rates = error_rates(["a b c"], [decoded])
    assert rates.word_edits == 1 and rates.wer == pytest.approx(jiwer.wer("a b c", "a b ? c"))
    # In a reference "?" is punctuation; a character outside the vocabulary is what the model
    # can only write as "?", so writing it so is right.
    assert error_rates(["Really?"], ["really"]).wer == 0
    assert error_rates(["room 101"], ["room ???"]).wer == 0 and error_rates(["room 101"], ["room"]).wer == 0.5
