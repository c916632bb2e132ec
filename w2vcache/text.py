"""The character vocabulary, transcript normalisation, encoding and greedy CTC decoding.

The 30 symbols are those of the Wav2Vec 2.0 LibriSpeech recipes: CTC blank, unknown, the word
separator, the apostrophe and a-z. Transcripts are compared and scored in normalised form
(lower case, single spaces), so WER never depends on how a corpus spells its transcripts.
"""

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

BLANK = "<blank>"
UNK = "<unk>"
WORD_SEP = "|"
VOCAB = (BLANK, UNK, WORD_SEP, "'", *string.ascii_lowercase)
assert len(VOCAB) == 30
BLANK_ID = VOCAB.index(BLANK)
UNK_ID = VOCAB.index(UNK)
SEP_ID = VOCAB.index(WORD_SEP)
SYMBOL_TO_ID = {s: i for i, s in enumerate(VOCAB)}

# How an unknown symbol is written when decoded text is shown: one character, so that a word
# containing it stays one word for WER.
UNK_CHAR = "?"

# Punctuation carries no sound: dropped rather than counted as unknown symbols, so that
# manifests with ordinary written text ("Hello, world.") are usable as they are. Hyphens and
# slashes separate words ("well-known" -> "well known").
_DROPPED = re.compile(r"[.,!?;:\"()\[\]{}«»“”„…]")
_SPACED = re.compile(r"[-–—/_]")
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "`": "'", "´": "'"})


def normalize(text: str) -> str:
    """Lower-case, plain apostrophes, punctuation dropped, accents removed, single spaces."""
    text = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = _SPACED.sub(" ", _DROPPED.sub("", text.lower()))
    return " ".join(text.split())


_LETTERS = frozenset("'" + string.ascii_lowercase)  # the vocabulary's written symbols, but UNK_CHAR
_HELD = "\ue000"  # a private-use character normalize keeps, standing for UNK_CHAR while it runs


def scoring_form(text: str, decoded: bool = False) -> str:
    """Text as it is scored: normalised, every character outside the vocabulary written as
    UNK_CHAR, as the model can only write it. In `decoded` text (a hypothesis) UNK_CHAR is a
    symbol the model wrote, not punctuation: normalize would drop it, so an inserted unknown word
    would cost nothing; it is kept, and costs what any wrong word costs."""
    if decoded:
        text = text.replace(UNK_CHAR, _HELD)
    return "".join(c if c in _LETTERS or c == " " else UNK_CHAR for c in normalize(text))


@dataclass
class Encoded:
    ids: list[int]
    unknown: Counter = field(default_factory=Counter)  # symbol -> count, for the report


def encode(text: str) -> Encoded:
    """Normalise and map to symbol ids; words are joined by the separator symbol."""
    ids, unknown = [], Counter()
    for i, word in enumerate(normalize(text).split(" ")):
        if i:
            ids.append(SEP_ID)
        for c in word:
            if c in SYMBOL_TO_ID:
                ids.append(SYMBOL_TO_ID[c])
            else:
                ids.append(UNK_ID)
                unknown[c] += 1
    if ids == [] or ids == [SEP_ID]:
        return Encoded([], unknown)
    return Encoded(ids, unknown)


def transcript_notes(texts_by_split: dict, shown: int = 8) -> list[str]:
    """What a person should know about the transcripts before training on them: those holding
    symbols outside the vocabulary (read as <unk>: digits, other scripts, symbols), and empty ones
    (they teach the model to write nothing)."""
    unknown, holding, empty = Counter(), Counter(), Counter()
    for split, texts in texts_by_split.items():
        for t in texts:
            encoded = encode(t)
            unknown.update(encoded.unknown)
            holding[split] += bool(encoded.unknown)
            empty[split] += not encoded.ids
    notes = []
    if unknown:
        symbols = ", ".join(f"{s!r} x{n}" for s, n in unknown.most_common(shown))
        more = f" and {len(unknown) - shown} more" if len(unknown) > shown else ""
        where = ", ".join(f"{n} in {split}" for split, n in holding.items() if n)
        notes.append(f"transcripts with symbols outside the {len(VOCAB)}-symbol vocabulary ({where}) read them as "
                     f"{UNK}: {symbols}{more}; spell numbers out, or transliterate, for the model to learn them")
    if sum(empty.values()):
        where = ", ".join(f"{n} in {split}" for split, n in empty.items() if n)
        notes.append(f"empty transcripts ({where}): in training they teach the model to write nothing; in "
                     "evaluation every word written for them counts as an insertion")
    return notes


def ctc_frames_needed(ids) -> int:
    """The fewest frames a CTC alignment of `ids` takes: one per symbol, and a blank between two
    equal neighbours. An utterance with fewer frames has no CTC path (its loss is infinite)."""
    return len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))


def ids_to_text(ids) -> str:
    """Symbol ids (already collapsed) to words separated by single spaces."""
    chars = []
    for i in ids:
        i = int(i)
        if i == BLANK_ID:
            continue
        chars.append(" " if i == SEP_ID else UNK_CHAR if i == UNK_ID else VOCAB[i])
    return " ".join("".join(chars).split())


def ctc_collapse(ids) -> list[int]:
    """Greedy CTC rule: merge runs of the same symbol, then drop blanks."""
    out, prev = [], None
    for i in ids:
        i = int(i)
        if i != prev and i != BLANK_ID:
            out.append(i)
        prev = i
    return out


def greedy_decode(logits, lengths=None) -> list[str]:
    """Best-path decoding of a (batch, frames, symbols) array; `lengths` limits each row."""
    best = logits.argmax(-1)
    texts = []
    for b in range(best.shape[0]):
        row = best[b] if lengths is None else best[b, : int(lengths[b])]
        texts.append(ids_to_text(ctc_collapse(row.tolist())))
    return texts
