"""Batches of neighbouring utterances in length order: one rule for extraction, probes and fine-tuning.

Utterances sorted by length and cut into consecutive runs waste little on padding; each caller
says what a batch may hold (frames or samples) and, where padding costs compute, how much of it
may be padding.
"""


def length_batches(lengths, max_size: int, max_padding: float = 1.0) -> list[slice]:
    """Consecutive runs (utterances already sorted by length) whose padded size fits max_size
    (samples or frames, in the unit of `lengths`) and at most `max_padding` of which is padding;
    an utterance longer than max_size goes alone."""
    batches, start, longest, total = [], 0, 0, 0
    for i, n in enumerate(lengths):
        longest_if_added, total_if_added = max(longest, n), total + n
        padded = longest_if_added * (i - start + 1)
        if i > start and (padded > max_size or padded - total_if_added > max_padding * padded):
            batches.append(slice(start, i))
            start, longest_if_added, total_if_added = i, n, n
        longest, total = longest_if_added, total_if_added
    if start < len(lengths):
        batches.append(slice(start, len(lengths)))
    return batches
