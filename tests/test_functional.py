"""The pure scoring function inside a user's own jax.jit, and the load() tuple."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from checkpoints import sample_pairs
from flax import nnx
from support import TOLERANCE

import flax_ce


def test_score_inside_user_jit(bert_dir):
    model, tokenizer, config = flax_ce.load(bert_dir)
    pairs = sample_pairs(6)
    batch = tokenizer(
        [a for a, _ in pairs],
        [b for _, b in pairs],
        padding="max_length",
        truncation=True,
        max_length=64,
        return_tensors="np",
    )
    # Parameters apart from the rest of the state (the dropout layers' RNG streams), to differentiate.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def scores(params, input_ids, attention_mask, token_type_ids):
        return jax.nn.sigmoid(
            flax_ce.score(nnx.merge(graphdef, params, rest), input_ids, attention_mask, token_type_ids)
        )[:, 0]

    ours = scores(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    expected = flax_ce.CrossEncoder(bert_dir, max_length=64).predict(pairs)
    assert np.abs(np.asarray(ours) - expected).max() <= TOLERANCE
    assert config.num_labels == 1 and config.model_type == "bert"

    grads = jax.grad(
        lambda p: scores(p, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).sum()
    )(params)
    assert all(jnp.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_nnx_jit_and_vmap(bert_dir):
    model, tokenizer, _ = flax_ce.load(bert_dir)
    pairs = sample_pairs(6, seed=3)
    batch = tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], padding="max_length", max_length=32, truncation=True
    )
    ids, mask, types = (np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    logits = nnx.jit(flax_ce.score)(model, ids, mask, types)
    assert logits.shape == (6, 1)

    # vmap over groups of 2 pairs ([3, 2, 32] inputs) scores exactly what one batch of 6 does.
    graphdef, state = nnx.split(model)
    grouped = jax.vmap(lambda i, m, t: flax_ce.score(nnx.merge(graphdef, state), i, m, t))(
        *(x.reshape(3, 2, 32) for x in (ids, mask, types))
    )
    assert grouped.shape == (3, 2, 1)
    np.testing.assert_allclose(np.asarray(grouped).reshape(6, 1), np.asarray(logits), rtol=0, atol=1e-5)
