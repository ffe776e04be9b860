"""One CrossEncoder shared by threads scores exactly as sequential calls do."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from checkpoints import corpus, sample_pairs

from flax_ce import CrossEncoder


def test_eight_threads_equal_sequential(bert_dir):
    # Very long pairs take the shortening path, which tokenizes without truncation: while another thread
    # tokenizes with truncation, a shared tokenizer's state used to leak between the calls.
    long_text = " ".join(corpus())[:12_000]
    pairs = sample_pairs(96, seed=3)
    for i in range(0, len(pairs), 12):
        pairs[i] = (long_text[i:], long_text[: -i - 1])
    slices = [pairs[i::8] for i in range(8)]
    ce = CrossEncoder(bert_dir, max_length=64)
    sequential = [ce.predict(s, batch_size=4) for s in slices]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            threaded = list(pool.map(lambda s: ce.predict(s, batch_size=4), slices))
            for got, expected in zip(threaded, sequential, strict=True):
                np.testing.assert_array_equal(got, expected)
