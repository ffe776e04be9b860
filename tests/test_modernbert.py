"""ModernBERT (gte-reranker-modernbert, Ettin): rotary pre-norm encoder, sliding-window layers, pooled head."""

from __future__ import annotations

import pytest
from checkpoints import build_modernbert
from reference_scores import assert_matches_references, long_range_pairs

from flax_ce.config import ConfigError
from flax_ce.models import config_from_dict

# Layers 0 and 3 global, 1 and 2 within a 16-token window: far shorter than the test pairs (up to 640).
CHECKPOINTS = {
    # gte-reranker-modernbert's head (mean pooling, 1 label), with every optional bias and other activations.
    "mean-1-label-all-biases": dict(
        pooling="mean",
        num_labels=1,
        attention_bias=True,
        mlp_bias=True,
        norm_bias=True,
        classifier_bias=True,
        hidden_activation="gelu_pytorch_tanh",
        classifier_activation="silu",
    ),
    "cls-3-labels": dict(pooling="cls", num_labels=3),
}
PARITY_CASES = [
    name if name.startswith("mean") else pytest.param(name, marks=pytest.mark.slow) for name in CHECKPOINTS
]


@pytest.mark.parametrize("name", PARITY_CASES)
def test_matches_sentence_transformers_and_transformers(name, tmp_path):
    model_dir = build_modernbert(str(tmp_path / name), **CHECKPOINTS[name])
    ce = assert_matches_references(model_dir, long_range_pairs())
    assert ce.config.global_layers == (True, False, False, True)
    assert ce.config.local_attention == 16 and ce.max_length == 640


PUBLISHED_FORM = dict(  # as transformers 4.48-4.5x saved gte-reranker-modernbert-base and Ettin
    model_type="modernbert",
    vocab_size=50368,
    hidden_size=768,
    num_hidden_layers=22,
    num_attention_heads=12,
    intermediate_size=1152,
    global_attn_every_n_layers=3,
    local_attention=128,
    global_rope_theta=160000.0,
    local_rope_theta=10000.0,
    classifier_pooling="mean",
    num_labels=1,
)


def test_both_config_forms_give_the_same_config():
    layer_types = ["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(22)]
    transformers5 = {
        **{
            k: v
            for k, v in PUBLISHED_FORM.items()
            if k not in ("global_attn_every_n_layers", "global_rope_theta", "local_rope_theta")
        },
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": {"rope_theta": 160000.0, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
    }
    old, new = config_from_dict(PUBLISHED_FORM), config_from_dict(transformers5)
    assert old == new
    assert old.global_layers[:4] == (True, False, False, True) and sum(old.global_layers) == 8
    assert (old.global_rope_theta, old.local_rope_theta) == (160000.0, 10000.0)
    assert old.position_limit is None


def test_unsupported_settings_are_listed_at_once():
    raw = {
        **PUBLISHED_FORM,
        "classifier_pooling": "max",
        "layer_types": ["full_attention"] * 3,
        "rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}},
        "hidden_activation": "gelu_unknown",
    }
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw)
    for problem in (
        "classifier_pooling='max'",
        "layer_types must list 22",
        "rope_type='yarn'",
        "gelu_unknown",
    ):
        assert problem in str(error.value)


@pytest.mark.parametrize("length, half, real_lengths", [(200, 8, (200, 150, 3)), (77, 5, (77, 40, 1))])
def test_banded_attention_equals_the_masked_square_on_real_tokens(length, half, real_lengths):
    import jax
    import numpy as np

    from flax_ce.models.modernbert import banded_attention

    rng = np.random.default_rng(0)
    q, k, v = (2 * rng.standard_normal((3, length, 2, 4)).astype(np.float32) for _ in range(3))
    key_mask = np.arange(length)[None, :] < np.array(real_lengths)[:, None]
    positions = np.arange(length)
    mask = key_mask[:, None, None, :] & (np.abs(positions[:, None] - positions[None, :]) <= half)
    full = jax.nn.dot_product_attention(q, k, v, mask=mask)
    band = banded_attention(q, k, v, key_mask, half, scale=0.5)
    assert np.abs(np.asarray(full - band))[key_mask].max() <= 1e-5
