"""Property-based parity: random pairs score like sentence-transformers, whatever the batch size, order or bucket."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import corpus
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TOLERANCE

from flax_ce import CrossEncoder, score

FAMILIES = ["bert", "roberta", "electra", "deberta-v1", "deberta-v3"]
# JAX compiles per [rows, length]: a fixed batch-size set and a 64-token limit bound the shapes to
# rows {1, 2, 4, 8} x buckets {32, 64} per family.
MAX_LENGTH = 64
BATCH_SIZES = (1, 2, 8)
MAX_PAIRS = 7
INVARIANCE = 1e-5  # same model, same tokens, only the padding and the batch differ

WORDS = sorted({word for sentence in corpus() for word in sentence.split()})
TEXTS = st.one_of(
    # Any code point but lone surrogates (rejected with a ValueError, see test_bad_inputs): unicode,
    # emoji, combining marks, control and zero-width characters.
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
    # Real words, sometimes more than MAX_LENGTH tokens, so longest-first truncation is exercised.
    st.lists(st.sampled_from(WORDS), max_size=80).map(" ".join),
)
PAIRS = st.lists(st.tuples(TEXTS, TEXTS), min_size=1, max_size=MAX_PAIRS)


@pytest.fixture(scope="module")
def models(family_dirs, deberta_dirs):
    """family -> (flax_ce CrossEncoder, sentence-transformers CrossEncoder), loaded on first use."""
    from sentence_transformers import CrossEncoder as STCrossEncoder

    dirs = {**family_dirs, **deberta_dirs}
    loaded = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = (
                CrossEncoder(dirs[family], max_length=MAX_LENGTH),
                STCrossEncoder(dirs[family], device="cpu", max_length=MAX_LENGTH),
            )
        return loaded[family]

    return get


@nnx.jit
def score_padded(model, input_ids, attention_mask, token_type_ids):
    return score(model, input_ids, attention_mask, token_type_ids)


def scores_at_max_length(ce: CrossEncoder, pairs) -> np.ndarray:
    """Scores with every pair padded to MAX_LENGTH in one [MAX_PAIRS + 1, MAX_LENGTH] batch (no bucketing)."""
    tokens = ce.tokenize(pairs)
    shape = (MAX_PAIRS + 1, MAX_LENGTH)
    ids = np.full(shape, ce.tokenizer.pad_token_id or 0, np.int32)
    mask, types = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for row, seq in enumerate(tokens["input_ids"]):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
        if tokens["token_type_ids"] is not None:
            types[row, : len(seq)] = tokens["token_type_ids"][row]
    scores = np.asarray(ce.activation_fn(score_padded(ce.model, ids, mask, types)))[: len(pairs)]
    return scores[:, 0] if ce.num_labels == 1 else scores


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=PAIRS, batch_size=st.sampled_from(BATCH_SIZES), data=st.data())
def test_scores_match_reference_and_are_invariant(models, family, pairs, batch_size, data):
    ours, reference = models(family)
    scores = ours.predict(pairs, batch_size=batch_size)
    expected = reference.predict(pairs, batch_size=8, show_progress_bar=False)
    assert scores.shape == expected.shape
    assert np.isfinite(scores).all()
    assert np.abs(scores - expected).max() <= TOLERANCE

    order = data.draw(st.permutations(range(len(pairs))), label="order")
    other_batch_size = data.draw(st.sampled_from(BATCH_SIZES), label="other batch size")
    shuffled = ours.predict([pairs[i] for i in order], batch_size=other_batch_size)
    assert np.abs(shuffled - scores[order]).max() <= INVARIANCE

    # The bucket a pair is padded to (here the longest one) does not change its score.
    assert np.abs(scores_at_max_length(ours, pairs) - scores).max() <= INVARIANCE
