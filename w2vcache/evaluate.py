"""Word and character error rates, corpus-level, with jiwer.

Corpus-level means total edits over total reference words (characters) of the whole split, the way
WER is published for LibriSpeech — not the mean of per-utterance rates, which over-weights short
utterances.

`ErrorRates` keeps the rates as fractions (0.21), which the training loop compares; everything a
person reads (files, progress lines, tables) takes them in percent from `to_dict`, under names that
say so: a WER of 25.47 is 2547 %, and "wer_percent": 2547.0 cannot be read as 25 %.
"""

from dataclasses import asdict, dataclass

import jiwer

from .text import scoring_form


@dataclass
class ErrorRates:
    wer: float
    cer: float
    words: int  # reference words
    chars: int  # reference characters (spaces included, as jiwer counts them)
    utterances: int
    word_edits: int
    char_edits: int
    # The word edits by kind (an empty reference's words are all insertions).
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def wer_percent(self) -> float:
        return _rate(self.word_edits, self.words, per=100)

    @property
    def cer_percent(self) -> float:
        return _rate(self.char_edits, self.chars, per=100)

    def to_dict(self) -> dict:
        """A split as result.json holds it: the rates in percent, then the counts they come from."""
        counts = {k: v for k, v in asdict(self).items() if k not in ("wer", "cer")}
        return {"wer_percent": self.wer_percent, "cer_percent": self.cer_percent, **counts}


def _rate(edits: int, total: int, per: int = 1) -> float:
    """Edits per `per` reference units. `per * edits / total` rather than `per * (edits / total)`:
    7 edits of 100 words give 7.0 %, not 7.000000000000001. A split whose references are all
    empty is at 0 without edits, at `per` with any."""
    return per * edits / total if total else float(per * (edits > 0))


def _edits(out) -> int:
    return out.substitutions + out.deletions + out.insertions


def error_rates(references: list[str], hypotheses: list[str]) -> ErrorRates:
    """Corpus-level WER and CER of decoded hypotheses (text.greedy_decode's, where "?" is an
    unknown symbol) against references, both in text.scoring_form first."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [scoring_form(r) for r in references]
    hyps = [scoring_form(h, decoded=True) for h in hypotheses]
    # jiwer needs a non-empty reference; an empty one (a silent utterance) costs one insertion
    # per hypothesised word or character.
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    insertions = sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
    substitutions = deletions = 0
    char_edits = sum(len(h) for r, h in zip(refs, hyps) if not r)
    words = sum(len(r.split()) for r, _ in pairs)
    chars = sum(len(r) for r, _ in pairs)
    if pairs:
        r, h = zip(*pairs)
        out = jiwer.process_words(list(r), list(h))
        substitutions, deletions, insertions = out.substitutions, out.deletions, insertions + out.insertions
        char_edits += _edits(jiwer.process_characters(list(r), list(h)))
    word_edits = substitutions + deletions + insertions
    return ErrorRates(
        wer=_rate(word_edits, words),
        cer=_rate(char_edits, chars),
        words=words,
        chars=chars,
        utterances=len(refs),
        word_edits=word_edits,
        char_edits=char_edits,
        substitutions=substitutions,
        deletions=deletions,
        insertions=insertions,
    )


def utterance_rows(ids, references: list[str], hypotheses: list[str]) -> list[dict]:
    """Each utterance's transcript, what was decoded, and its word edits (as error_rates counts
    them) over its reference words: what one WER figure hides. One alignment of the whole split,
    read utterance by utterance."""
    refs = [scoring_form(r) for r in references]
    hyps = [scoring_form(h, decoded=True) for h in hypotheses]
    edits = [len(h.split()) if not r else 0 for r, h in zip(refs, hyps)]  # an empty reference: insertions
    aligned = [k for k, r in enumerate(refs) if r]
    if aligned:
        out = jiwer.process_words([refs[k] for k in aligned], [hyps[k] for k in aligned])
        for k, chunks in zip(aligned, out.alignments):
            edits[k] = sum(max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx)
                           for c in chunks if c.type != "equal")
    return [{"id": uid, "words": len(r.split()), "word_edits": e, "reference": reference, "hypothesis": hypothesis}
            for uid, r, e, reference, hypothesis in zip(ids, refs, edits, references, hypotheses)]
