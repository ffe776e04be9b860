"""The default-activation rule of sentence-transformers, step by step, against the reference."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from checkpoints import sample_pairs, set_config
from support import ROUNDING, TOLERANCE

from flax_ce import CrossEncoder
from flax_ce.activations import HIDDEN_ACTIVATIONS, activation_from_name, torch_name

PAIRS = sample_pairs(6)


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _st_scores(model_dir: str, **kwargs):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    return STCrossEncoder(model_dir, device="cpu", **kwargs).predict(PAIRS)


@pytest.mark.parametrize(
    "setup, expected_name",
    [
        ({}, "Sigmoid"),  # step 4: one label -> Sigmoid
        ({"sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"}, "Identity"),  # step 3
        ({"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Tanh"}}, "Tanh"),  # step 2
        (
            {
                "sentence_transformers": {"activation_fn": "torch.nn.Identity"},
                "sbert_ce_default_activation_function": "torch.nn.modules.activation.Tanh",
            },
            "Identity",
        ),
        ({"sbert_ce_default_activation_function": "os.system"}, "Sigmoid"),  # untrusted -> ignored
    ],
)
def test_config_rules_match_sentence_transformers(bert_dir, tmp_path, setup, expected_name, caplog):
    model_dir = _copy(bert_dir, tmp_path / "m")
    set_config(model_dir, **setup)
    with caplog.at_level(logging.WARNING, logger="flax_ce"):
        ce = CrossEncoder(model_dir)
    assert ce.activation_fn is activation_from_name(f"torch.nn.{expected_name}")
    if "os.system" in json.dumps(setup):
        assert "os.system" in caplog.text
    assert np.abs(ce.predict(PAIRS) - _st_scores(model_dir)).max() <= TOLERANCE


def test_config_sentence_transformers_json_needs_modules_json(bert_dir, tmp_path):
    model_dir = _copy(bert_dir, tmp_path / "m")
    set_config(model_dir, sbert_ce_default_activation_function="torch.nn.modules.activation.Tanh")
    with open(os.path.join(model_dir, "config_sentence_transformers.json"), "w") as f:
        json.dump({"activation_fn": "torch.nn.modules.linear.Identity", "model_type": "CrossEncoder"}, f)
    # sentence-transformers reads config_sentence_transformers.json only for its own saved layout.
    assert CrossEncoder(model_dir).activation_fn is activation_from_name("torch.nn.Tanh")
    assert np.abs(CrossEncoder(model_dir).predict(PAIRS) - _st_scores(model_dir)).max() <= TOLERANCE


def test_sentence_transformers_saved_directory(bert_dir, tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    model_dir = str(tmp_path / "saved")
    STCrossEncoder(bert_dir, device="cpu", max_length=20, activation_fn=__import__("torch").nn.Tanh()).save(
        model_dir
    )
    ce = CrossEncoder(model_dir)
    assert ce.activation_fn is activation_from_name("torch.nn.Tanh")
    assert np.abs(ce.predict(PAIRS) - _st_scores(model_dir)).max() <= TOLERANCE


def test_unsupported_sentence_transformers_stack(bert_dir, tmp_path):
    model_dir = _copy(bert_dir, tmp_path / "m")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    with open(os.path.join(model_dir, "modules.json"), "w") as f:
        json.dump(modules, f)
    with pytest.raises(ValueError, match=r"modules\.json.*Pooling"):
        CrossEncoder(model_dir)


def test_multi_label_defaults_to_identity(roberta_dir):
    ce = CrossEncoder(roberta_dir)
    assert np.abs(ce.predict(PAIRS) - ce.logits(PAIRS)).max() <= ROUNDING


def test_explicit_activation_beats_config(bert_dir, tmp_path):
    import torch

    model_dir = _copy(bert_dir, tmp_path / "m")
    set_config(model_dir, sbert_ce_default_activation_function="torch.nn.modules.linear.Identity")
    reference = _st_scores(model_dir, activation_fn=torch.nn.Tanh())
    assert (
        np.abs(CrossEncoder(model_dir, activation_fn=jax.numpy.tanh).predict(PAIRS) - reference).max()
        <= TOLERANCE
    )
    assert (
        np.abs(CrossEncoder(model_dir, activation_fn="torch.nn.Tanh").predict(PAIRS) - reference).max()
        <= TOLERANCE
    )
    per_call = CrossEncoder(model_dir).predict(PAIRS, activation_fn=jax.nn.sigmoid)
    assert np.abs(per_call - _st_scores(model_dir, activation_fn=torch.nn.Sigmoid())).max() <= TOLERANCE
    legacy = CrossEncoder(model_dir).predict(sentences=PAIRS, activation_fct=jax.nn.sigmoid)
    assert np.array_equal(legacy, per_call)


def test_unsupported_torch_activation_is_named(bert_dir, tmp_path):
    model_dir = _copy(bert_dir, tmp_path / "m")
    set_config(model_dir, sbert_ce_default_activation_function="torch.nn.Hardtanh")
    with pytest.raises(ValueError, match="torch.nn.Hardtanh"):
        CrossEncoder(model_dir)


def test_torch_names_round_trip():
    for name in ("Identity", "Sigmoid", "Tanh", "Softmax"):
        fn = activation_from_name(f"torch.nn.{name}")
        assert activation_from_name(torch_name(fn)) is fn


@pytest.mark.parametrize("name", sorted(HIDDEN_ACTIVATIONS))
def test_hidden_activations_match_transformers(name):
    """Every `hidden_act` we implement against transformers' ACT2FN, values and gradients, over the range
    a layer sees and past GELU's x > 10 branch (fp32; torch in float64 as the truth)."""
    import torch
    from transformers.activations import ACT2FN

    x = np.concatenate([np.linspace(-30, 30, 6001), [9.999999, 10.0, 10.000001, -10.0]]).astype(np.float32)
    fn = HIDDEN_ACTIVATIONS[name]
    ours = np.asarray(jax.jit(fn)(x))
    ours_grad = np.asarray(jax.jit(jax.vmap(jax.grad(fn)))(x))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = ACT2FN[name](xt)
    ref.sum().backward()
    ref, ref_grad = ref.detach().numpy(), xt.grad.numpy()
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=2e-6, err_msg=name)
    np.testing.assert_allclose(ours_grad, ref_grad, rtol=2e-5, atol=2e-5, err_msg=name)
