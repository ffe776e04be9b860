"""The pure scoring function inside a user's own jax.jit, and the load() tuple."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from checkpoints import sample_pairs
from conftest import TOLERANCE
from flax import nnx

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
    graphdef, params = nnx.split(model)

    @jax.jit
    def scores(params, input_ids, attention_mask, token_type_ids):
        return jax.nn.sigmoid(
            flax_ce.score(nnx.merge(graphdef, params), input_ids, attention_mask, token_type_ids)
        )[:, 0]

    ours = scores(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    expected = flax_ce.CrossEncoder(bert_dir, max_length=64).predict(pairs)
    assert np.abs(np.asarray(ours) - expected).max() <= TOLERANCE
    assert config.num_labels == 1 and config.model_type == "bert"

    grads = jax.grad(
        lambda p: scores(p, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).sum()
    )(params)
    assert all(jnp.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_nnx_jit_and_vmap_friendly(bert_dir):
    model, tokenizer, _ = flax_ce.load(bert_dir)
    ids = jnp.array(tokenizer("a question", "an answer", padding="max_length", max_length=32)["input_ids"])[
        None
    ]
    mask = (ids != tokenizer.pad_token_id).astype(jnp.int32)
    logits = nnx.jit(flax_ce.score)(model, ids, mask)
    assert logits.shape == (1, 1) and jnp.isfinite(logits).all()
