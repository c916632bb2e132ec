"""Length batching: padded size and padding share bounded, order kept."""

import numpy as np

from w2vcache.batching import length_batches


def test_length_batches_bound_padded_size():
    lengths = [100, 120, 130, 300, 310, 1000]
    batches = length_batches(lengths, 400)
    assert batches == [slice(0, 3), slice(3, 4), slice(4, 5), slice(5, 6)]
    for b in batches[:-1]:
        assert max(lengths[b]) * len(lengths[b.start:b.stop]) <= 400 or b.stop - b.start == 1
    # With a padding limit a batch also closes before its padding passes the share (here 100 and
    # 120 together are 8.3 % padding; 120 and 130 are 3.8 %).
    assert length_batches(lengths, 400, max_padding=0.05) == [slice(0, 1), slice(1, 3), *batches[1:]]
    rng = np.random.default_rng(0)
    many = sorted(rng.integers(50, 500, 2000).tolist())
    for b in length_batches(many, 4000, max_padding=0.05):
        run = many[b]
        padded = max(run) * len(run)
        assert len(run) == 1 or (padded <= 4000 and padded - sum(run) <= 0.05 * padded)
