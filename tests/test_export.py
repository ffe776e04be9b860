"""Export: sentence-transformers, transformers and flax_ce load a saved CrossEncoder and score as it does."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from checkpoints import (
    CASES,
    TINY,
    build_deberta,
    build_modernbert,
    build_xlm_roberta,
    sample_pairs,
    set_config,
)
from flax import nnx
from flax_ce.conversion.convert import torch_state_dict
from support import TOLERANCE

from flax_ce import CrossEncoder
from flax_ce.activations import SCORE_ACTIVATIONS
from flax_ce.models import FAMILIES, build_model, config_from_dict, family_of

MAX_LENGTH = 64
DEBERTA = {"deberta-v1": "v1", "deberta-v3": "v3", "deberta-v2-conv": "v2-separate-keys-conv-proj"}
# architecture -> activation to save with (None: the checkpoint's default)
ACTIVATIONS = {
    "bert": None,
    "roberta": None,
    "electra": "Tanh",
    "deberta-v1": "Softmax",
    "deberta-v3": None,
    "deberta-v2-conv": "Sigmoid",
    "xlm-roberta": "Tanh",
    "modernbert": None,
}


@pytest.fixture(scope="module")
def source_dirs(family_dirs, bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("deberta")
    built = {name: build_deberta(str(root / name), case, bert_dir) for name, case in DEBERTA.items()}
    built["xlm-roberta"] = build_xlm_roberta(str(root / "xlm-roberta"), positions=130)
    built["modernbert"] = build_modernbert(
        str(root / "modernbert"), pooling="mean", max_length=128, norm_bias=True
    )
    return {**family_dirs, **built}


def perturb(ce: CrossEncoder, seed: int = 0) -> None:
    """Change every weight a little, so the export must come from ce.model, not the source files."""
    rng = np.random.default_rng(seed)
    params = nnx.state(ce.model, nnx.Param)
    noisy = jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape).astype(np.float32), params)
    nnx.update(ce.model, noisy)


def flat_params(ce: CrossEncoder) -> list:
    return [
        (path, np.asarray(var.get_value())) for path, var in nnx.to_flat_state(nnx.state(ce.model, nnx.Param))
    ]


def transformers_logits(path: str, pairs) -> np.ndarray:
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoded = tokenizer(
        [a for a, _ in pairs],
        [b for _, b in pairs],
        padding=True,
        truncation="longest_first",
        max_length=MAX_LENGTH,
        return_tensors="pt",
    )
    with torch.no_grad():
        return model.eval()(**encoded).logits.numpy()


# One of each code path runs by default; the other architectures are marked slow (they run in CI).
ROUND_TRIPS = [
    name if name in ("bert", "roberta", "deberta-v3") else pytest.param(name, marks=pytest.mark.slow)
    for name in ACTIVATIONS
]


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_export_round_trip(name, source_dirs, tmp_path):
    from sentence_transformers import CrossEncoder as ReferenceCrossEncoder

    activation = ACTIVATIONS[name]
    ce = CrossEncoder(
        source_dirs[name], max_length=MAX_LENGTH, activation_fn=activation and f"torch.nn.{activation}"
    )
    perturb(ce)
    out = str(tmp_path / "exported")
    ce.save_pretrained(out)
    pairs = sample_pairs(12, seed=3)
    our_logits = ce.logits(pairs)  # one compiled program per test: the activation is applied here
    ours = np.asarray(ce.activation_fn(our_logits))
    ours = ours[:, 0] if ce.num_labels == 1 else ours

    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert config["id2label"] == {str(i): label for i, label in enumerate(ce.config.labels)}

    reference = ReferenceCrossEncoder(out, device="cpu")
    assert type(reference.activation_fn).__name__ == (activation or type(reference.activation_fn).__name__)
    assert np.abs(reference.predict(pairs, batch_size=16) - ours).max() <= TOLERANCE
    assert np.abs(transformers_logits(out, pairs) - our_logits).max() <= TOLERANCE

    reloaded = CrossEncoder(out)
    assert reloaded.max_length == MAX_LENGTH and reloaded.config == ce.config
    assert reloaded.activation_fn is ce.activation_fn
    for (path, ours), (_, theirs) in zip(flat_params(ce), flat_params(reloaded), strict=True):
        np.testing.assert_array_equal(ours, theirs, err_msg=str(path))


def test_refuses_an_activation_without_a_torch_name(bert_dir, tmp_path):
    ce = CrossEncoder(bert_dir, max_length=MAX_LENGTH, activation_fn=lambda x: 2 * x)
    with pytest.raises(ValueError, match="cannot save activation"):
        ce.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fresh_head_on_a_bare_encoder_exports_as_a_task_checkpoint(bert_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    encoder = tmp_path / "encoder"
    shutil.copytree(bert_dir, encoder)
    weights = load_file(encoder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k.startswith("bert.")}, encoder / "model.safetensors")
    set_config(str(encoder), architectures=["BertModel"])
    ce = CrossEncoder(encoder, max_length=MAX_LENGTH, num_labels=2)
    ce.save_pretrained(tmp_path / "out")
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["num_labels"] == 2 and config["architectures"] == ["BertForSequenceClassification"]
    assert config["sentence_transformers"]["activation_fn"] == "torch.nn.modules.linear.Identity"
    pairs = sample_pairs(4)
    assert np.abs(CrossEncoder(tmp_path / "out").predict(pairs) - ce.predict(pairs)).max() <= 1e-6


def test_saving_over_a_sentence_transformers_directory_replaces_it(bert_dir, tmp_path):
    from sentence_transformers import CrossEncoder as ReferenceCrossEncoder

    st_dir = str(tmp_path / "st")
    ReferenceCrossEncoder(bert_dir, device="cpu").save_pretrained(st_dir)  # modules.json, activation Sigmoid
    torch.save({"stale": torch.zeros(1)}, os.path.join(st_dir, "pytorch_model.bin"))
    ce = CrossEncoder(st_dir, max_length=MAX_LENGTH, activation_fn="torch.nn.Identity")
    perturb(ce)
    ce.save_pretrained(st_dir)  # over the directory it was loaded from
    left = set(os.listdir(st_dir))
    assert not left & {"pytorch_model.bin", "modules.json", "config_sentence_transformers.json"}
    pairs = sample_pairs(6, seed=5)
    reference = ReferenceCrossEncoder(st_dir, device="cpu")
    assert type(reference.activation_fn).__name__ == "Identity"  # not the stale Sigmoid
    assert np.abs(reference.predict(pairs) - ce.predict(pairs)).max() <= TOLERANCE
    assert np.abs(CrossEncoder(st_dir).predict(pairs) - ce.predict(pairs)).max() <= 1e-6


BERT_LIKE = {
    "bert": transformers.BertConfig(),
    "roberta": transformers.RobertaConfig(),
    "electra": transformers.ElectraConfig(embedding_size=16),
    "xlm-roberta": transformers.XLMRobertaConfig(),
    "modernbert": transformers.ModernBertConfig(num_hidden_layers=2, attention_bias=True, pad_token_id=0),
}


@pytest.mark.parametrize("case", list(BERT_LIKE) + list(CASES))
def test_exported_keys_and_shapes_are_transformers_own(case):
    """The reversed key tables produce exactly the state dict transformers builds, for every config variant."""
    small = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    if case in BERT_LIKE:
        hf_config = BERT_LIKE[case].__class__(**{**BERT_LIKE[case].to_dict(), **small, "num_labels": 2})
    else:
        model_type, overrides, _ = CASES[case]
        hf_config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    config = config_from_dict(hf_config.to_dict())
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    params = {
        path: np.zeros(var.get_value().shape, np.float32)
        for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }
    exported = {
        key: value.shape for key, value in torch_state_dict(params, family_of(config).key_table).items()
    }
    with torch.device("meta"):
        reference = transformers.AutoModelForSequenceClassification.from_config(hf_config)
    assert exported == {key: tuple(value.shape) for key, value in reference.state_dict().items()}


def test_activation_names_cover_score_activations():
    from flax_ce.activations import activation_from_name, torch_name

    for fn in SCORE_ACTIVATIONS.values():
        assert activation_from_name(torch_name(fn)) is fn


def test_round_trips_cover_every_registered_family(source_dirs):
    covered = set()
    for name in ACTIVATIONS:
        with open(os.path.join(source_dirs[name], "config.json")) as f:
            covered.add(json.load(f)["model_type"])
    assert covered == set(FAMILIES)
