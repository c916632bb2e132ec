"""Word and character error rates, corpus-level, with jiwer.

Corpus-level means total edits over total reference words (characters) of the whole split, the way
WER is published for LibriSpeech — not the mean of per-utterance rates, which over-weights short
utterances.
"""

from dataclasses import asdict, dataclass

import jiwer

from .text import normalize


@dataclass
class ErrorRates:
    wer: float
    cer: float
    words: int  # reference words
    chars: int  # reference characters (spaces included, as jiwer counts them)
    utterances: int
    word_edits: int
    char_edits: int

    def to_dict(self) -> dict:
        return asdict(self)


def _edits(out) -> int:
    return out.substitutions + out.deletions + out.insertions


def error_rates(references: list[str], hypotheses: list[str]) -> ErrorRates:
    """Corpus-level WER and CER of hypotheses against references, both normalised first."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    # jiwer needs a non-empty reference; an empty one (a silent utterance) costs one insertion
    # per hypothesised word or character.
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    word_edits = sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
    char_edits = sum(len(h) for r, h in zip(refs, hyps) if not r)
    words = sum(len(r.split()) for r, _ in pairs)
    chars = sum(len(r) for r, _ in pairs)
    if pairs:
        r, h = zip(*pairs)
        word_edits += _edits(jiwer.process_words(list(r), list(h)))
        char_edits += _edits(jiwer.process_characters(list(r), list(h)))
    return ErrorRates(
        wer=word_edits / words if words else float(word_edits > 0),
        cer=char_edits / chars if chars else float(char_edits > 0),
        words=words,
        chars=chars,
        utterances=len(refs),
        word_edits=word_edits,
        char_edits=char_edits,
    )
