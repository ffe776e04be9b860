"""sentence-transformers modular cross-encoders (Ettin layout): a plain encoder, then Pooling, Dense, LayerNorm."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from checkpoints import build_modular, sample_pairs
from flax import nnx
from flax_ce.conversion.errors import CheckpointError
from reference_scores import assert_matches_references, long_range_pairs
from support import TOLERANCE
from torch import nn

import flax_ce
from flax_ce import CrossEncoder
from flax_ce.config import ConfigError
from flax_ce.models.modular import DenseSpec, LayerNormSpec, ModularCrossEncoder, PoolingSpec


def st_modules():
    from sentence_transformers.base.modules import Dense
    from sentence_transformers.sentence_transformer.modules import LayerNorm, Pooling

    return Pooling, Dense, LayerNorm


def ettin_head(dim: int) -> list:
    Pooling, Dense, LayerNorm = st_modules()
    return [
        Pooling(dim, pooling_mode="cls"),
        Dense(dim, dim, bias=False, activation_function=nn.GELU()),
        LayerNorm(dim),
        Dense(dim, 1, activation_function=nn.Identity(), module_output_name="scores"),
    ]


def mean_tanh_head(dim: int) -> list:
    Pooling, Dense, _ = st_modules()
    return [
        Pooling(dim, pooling_mode="mean"),
        Dense(dim, 16, bias=True, activation_function=nn.Tanh()),
        Dense(16, 1, activation_function=nn.Identity(), module_output_name="scores"),
    ]


def other_modes_head(dim: int) -> list:
    """Every other pooling mode side by side, and two scores per pair (Identity by default)."""
    Pooling, Dense, _ = st_modules()
    modes = ("max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
    return [
        Pooling(dim, pooling_mode=modes),
        Dense(len(modes) * dim, 2, activation_function=nn.Identity(), module_output_name="scores"),
    ]


@pytest.fixture(scope="module")
def ettin_dir(tmp_path_factory) -> str:
    return build_modular(str(tmp_path_factory.mktemp("modular") / "ettin"), "modernbert", ettin_head)


def test_ettin_layout_matches_sentence_transformers(ettin_dir):
    # ModernBERT with a 16-token local window, pairs of 5 to 640 tokens, batch sizes 1, 7 and 32, predict and rank.
    ce = assert_matches_references(ettin_dir, long_range_pairs(), modular=True)
    assert ce.config.modules == (
        PoolingSpec(32, ("cls",)),
        DenseSpec(32, 32, False, "torch.nn.modules.activation.GELU"),
        LayerNormSpec(32),
        DenseSpec(32, 1, True, "torch.nn.modules.linear.Identity", output_name="scores"),
    )
    assert ce.config.encoder.local_attention == 16 and ce.max_length == 640


@pytest.mark.parametrize("head", [mean_tanh_head, other_modes_head], ids=["mean-tanh", "other-modes"])
def test_bert_encoder_with_other_modules(head, tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    # max_length 64 truncates the long pairs; BertModel's unused pooler is in the weights and ignored.
    model_dir = build_modular(str(tmp_path / "bert"), "bert", head, max_length=64)
    ours, theirs = CrossEncoder(model_dir), STCrossEncoder(model_dir, device="cpu")
    pairs = sample_pairs(12)
    expected = theirs.predict(pairs, batch_size=7)
    assert ours.predict(pairs, batch_size=7).shape == expected.shape
    assert np.abs(ours.predict(pairs, batch_size=7) - expected).max() <= TOLERANCE
    # A BERT encoder packs pairs by default, but Pooling modules read whole rows: modular ones do not pack.
    assert np.abs(ours.predict(pairs) - expected).max() <= TOLERANCE
    with pytest.raises(ValueError, match="modular cross-encoders .* cannot score packed rows"):
        CrossEncoder(model_dir, packing=True)


def edit_json(path: str, change) -> None:
    with open(path) as f:
        content = json.load(f)
    change(content)
    with open(path, "w") as f:
        json.dump(content, f)


def edit_weights(path: str, change) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


REFUSALS = {
    "unknown module type": (
        "modules.json",
        lambda m: m[3].update(type="sentence_transformers.models.Normalize"),
        ConfigError,
        r"modules\.json: module 3 \('3_LayerNorm'\): type 'sentence_transformers\.models\.Normalize' is not supported",
    ),
    "code from the repository": (
        "modules.json",
        lambda m: m[2].update(type="my_reranker.modules.Dense"),
        ConfigError,
        r"module 2 \('2_Dense'\): type 'my_reranker\.modules\.Dense' is not supported",
    ),
    "activation not allow-listed": (
        "2_Dense/config.json",
        lambda c: c.update(activation_function="torch.nn.modules.activation.Hardtanh"),
        ConfigError,
        r"2_Dense/config\.json.*activation_function='torch\.nn\.modules\.activation\.Hardtanh' is not supported",
    ),
    "unknown config key": (
        "4_Dense/config.json",
        lambda c: c.update(scale=2.0),
        ConfigError,
        r"4_Dense/config\.json.*unknown keys \['scale'\]",
    ),
    "pooling mode": (
        "1_Pooling/config.json",
        lambda c: c.update(pooling_mode="attention"),
        ConfigError,
        r"1_Pooling/config\.json.*pooling_mode='attention' is not supported",
    ),
    "widths that do not chain": (
        "4_Dense/config.json",
        lambda c: c.update(in_features=16),
        ConfigError,
        r"4_Dense/config\.json: reads 'sentence_embedding' of width 16, but it is 32 wide",
    ),
    "missing weight": (
        "4_Dense/model.safetensors",
        lambda t: t.pop("linear.bias"),
        CheckpointError,
        r"4_Dense/model\.safetensors.*missing key 'linear\.bias'",
    ),
    "weight of the wrong shape": (
        "2_Dense/model.safetensors",
        lambda t: t.update({"linear.weight": np.zeros((32, 16), np.float32)}),
        CheckpointError,
        r"2_Dense/model\.safetensors.*'linear\.weight' has shape \(32, 16\), but the module's config needs \(32, 32\)",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_module_and_the_problem(case, ettin_dir, tmp_path):
    name, change, error, message = REFUSALS[case]
    model_dir = str(tmp_path / "m")
    shutil.copytree(ettin_dir, model_dir)
    path = os.path.join(model_dir, name)
    (edit_weights if name.endswith(".safetensors") else edit_json)(path, change)
    with pytest.raises(error, match="(?s)" + message):  # the message lists problems on their own lines
        CrossEncoder(model_dir)


def test_pooling_without_the_prompt_refuses_a_prompt(ettin_dir, tmp_path):
    model_dir = str(tmp_path / "m")
    shutil.copytree(ettin_dir, model_dir)
    edit_json(os.path.join(model_dir, "1_Pooling", "config.json"), lambda c: c.update(include_prompt=False))
    with pytest.raises(ValueError, match="include_prompt=false"):
        CrossEncoder(model_dir).predict([("a", "b")], prompt="query: ")


def perturb(ce: CrossEncoder) -> None:
    """Change every weight a little, so an export must come from ce.model, not the source files."""
    rng = np.random.default_rng(0)
    params = nnx.state(ce.model, nnx.Param)
    nnx.update(
        ce.model, jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape).astype(np.float32), params)
    )


def test_save_pretrained_writes_the_modular_layout(ettin_dir, tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    ce = CrossEncoder(ettin_dir, max_length=128)  # saved with the tokenizer, so the reference truncates alike
    perturb(ce)
    saved = str(tmp_path / "saved")
    ce.save_pretrained(saved)
    pairs = sample_pairs(8)
    ours = ce.predict(pairs, batch_size=8)
    assert np.abs(STCrossEncoder(saved, device="cpu").predict(pairs, batch_size=8) - ours).max() <= TOLERANCE
    assert sorted(os.listdir(saved)) == sorted(
        ["1_Pooling", "2_Dense", "3_LayerNorm", "4_Dense", "config.json", "config_sentence_transformers.json"]
        + [
            "model.safetensors",
            "modules.json",
            "sentence_bert_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    model, _, config = flax_ce.load(saved)
    assert isinstance(model, ModularCrossEncoder) and config == ce.config


def test_fine_tuning_trains_the_modules(ettin_dir):
    from flax_ce.training import fit

    ce = CrossEncoder(ettin_dir, max_length=64)
    before = np.asarray(ce.model.modules[4].linear.kernel[...])
    examples = [(a, b, float(i % 2)) for i, (a, b) in enumerate(sample_pairs(8))]
    result = fit(
        ce, examples, epochs=2, batch_size=4, max_steps=3, learning_rate=1e-3, show_progress_bar=False
    )
    assert result.steps == 3 and np.isfinite(result.losses).all()
    assert np.abs(np.asarray(ce.model.modules[4].linear.kernel[...]) - before).max() > 1e-5
    assert np.isfinite(ce.predict(sample_pairs(4))).all()


@pytest.mark.slow
def test_parity_tool_compares_layer_by_layer(ettin_dir):
    from flax_ce.parity import check

    report = check(ettin_dir, n=8, layers=True, batch_size=8)
    assert report.passed and [layer.name for layer in report.per_layer][-1] == "head"
