"""DeBERTa v1 / v2 / v3: logits equal transformers', configs are validated, published sizes convert, tokenizers load."""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch
import transformers
from checkpoints import (
    CASES,
    LABELS,
    REFERENCE_CLASSES,
    SPECIAL_TOKENS,
    TINY,
    V3,
    reference_model,
    sample_pairs,
    save_checkpoint,
    train_byte_bpe,
    train_sentencepiece,
)
from flax import nnx
from flax_ce.conversion.convert import build_module
from flax_ce.conversion.errors import CheckpointError
from support import TOLERANCE

from flax_ce.config import ConfigError
from flax_ce.models import FAMILIES, config_from_dict, family_of
from flax_ce.models.deberta import DebertaCrossEncoder, log_bucket_positions


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def convert(model: torch.nn.Module, tensors: dict[str, np.ndarray] | None = None) -> DebertaCrossEncoder:
    config = config_from_dict(model.config.to_dict())
    return build_module(
        lambda rngs: DebertaCrossEncoder(config, rngs=rngs),
        state_dict(model) if tensors is None else tensors,
        family_of(config).key_table,
        "test checkpoint",
    )


@functools.cache
def case_models(case: str) -> tuple[torch.nn.Module, DebertaCrossEncoder]:
    """(transformers model, converted flax_ce module) for one case, built once."""
    model_type, overrides, _ = CASES[case]
    model = reference_model(model_type, overrides)
    return model, convert(model)


def padded_batch(length: int, vocab: int, type_vocab: int, seed: int = 0):
    """ids, mask, token types [3, length]: one full row and two rows with different padding."""
    rng = np.random.RandomState(seed + length)
    ids = rng.randint(5, vocab, (3, length))
    mask = np.zeros_like(ids)
    for row, real in enumerate((length, max(2, 2 * length // 3), max(2, length // 4))):
        mask[row, :real] = 1
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    if type_vocab > 0:
        types[:, length // 3 :] = 1
        types[mask == 0] = 0
    return ids, mask, types


@nnx.jit
def forward(module: DebertaCrossEncoder, input_ids, attention_mask, token_type_ids):
    """(logits, last hidden state) in one compiled call."""
    last = module.encode(input_ids, attention_mask, token_type_ids)[-1]
    return module.head(last), last


@pytest.mark.parametrize(
    "case, length", [(case, length) for case, (_, _, lengths) in CASES.items() for length in lengths]
)
def test_logits_match_transformers(case, length):
    model, module = case_models(case)
    ids, mask, types = padded_batch(length, model.config.vocab_size, model.config.type_vocab_size)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
            output_hidden_states=True,
        )
    logits, last = forward(module, ids, mask, types)
    logits_diff = np.abs(np.asarray(logits) - out.logits.numpy()).max()
    # Padded positions too: their fully masked attention rows are uniform in both implementations.
    hidden_diff = np.abs(np.asarray(last) - out.hidden_states[-1].numpy()).max()
    print(f"{case} length {length}: max |logits diff| {logits_diff:.2e}, max |hidden diff| {hidden_diff:.2e}")
    assert logits.dtype == np.float32 and logits.shape == (3, 3)
    assert logits_diff <= TOLERANCE
    assert hidden_diff <= TOLERANCE


@pytest.mark.parametrize("buckets, max_position", [(256, 512), (16, 64), (16, 12), (15, 100), (64, 2048)])
def test_log_buckets_match_transformers(buckets, max_position):
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    relative = np.arange(-2 * max_position, 2 * max_position + 1)
    expected = make_log_bucket_position(torch.tensor(relative), buckets, max_position).long().numpy()
    np.testing.assert_array_equal(log_bucket_positions(relative, buckets, max_position), expected)


def test_config_rejects_every_unsupported_setting_at_once():
    raw = {
        "model_type": "deberta-v2",
        **{k: v for k, v in TINY.items() if k not in ("id2label", "label2id")},
        "relative_attention": True,
        "pos_att_type": "c2p|p2x",
        "hidden_act": "swish_v2",
        "pooler_hidden_act": "nope",
        "attention_head_size": 16,
        "pooler_hidden_size": 48,
        "norm_rel_ebd": "layer_norm|batch_norm",
        "position_buckets": 256,
        "conv_kernel_size": 2,
        "conv_groups": 5,
        "conv_act": "unknown_act",
        "problem_type": "multi_label_classification",
    }
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw, "bad/config.json")
    message = str(error.value)
    for expected in (
        "bad/config.json",
        "pos_att_type entries ['p2x']",
        "hidden_act='swish_v2'",
        "pooler_hidden_act='nope'",
        "attention_head_size=16",
        "pooler_hidden_size=48",
        "norm_rel_ebd entries ['batch_norm']",
        "position_buckets=256",
        "conv_kernel_size=2",
        "conv_groups=5",
        "conv_act='unknown_act'",
        "problem_type='multi_label_classification'",
    ):
        assert expected in message
    assert message.count("\n  - ") == 11


def test_config_rejects_v1_talking_head_and_repeated_pos_att_type():
    raw = {"model_type": "deberta", **TINY, "talking_head": True, "pos_att_type": ["c2p", "c2p"]}
    with pytest.raises(ConfigError, match="talking_head=true") as error:
        config_from_dict(raw)
    assert "repeats an entry" in str(error.value)


def test_config_reads_labels_and_v1_ignores_v2_settings():
    # transformers' v1 model never reads position_buckets / share_att_key / conv_*; neither do we.
    raw = {
        "model_type": "deberta",
        **TINY,
        "position_buckets": 1,
        "conv_kernel_size": 2,
        "share_att_key": True,
    }
    config = config_from_dict(raw)
    assert config.labels == ("contradiction", "entailment", "neutral")
    assert config.id2label == LABELS and config.label2id == TINY["label2id"]
    assert (config.position_buckets, config.conv_kernel_size, config.share_att_key) == (-1, 0, False)


PUBLISHED_V3 = dict(
    model_type="deberta-v2",
    vocab_size=128100,
    max_position_embeddings=512,
    relative_attention=True,
    position_buckets=256,
    norm_rel_ebd="layer_norm",
    share_att_key=True,
    pos_att_type="p2c|c2p",
    max_relative_positions=-1,
    position_biased_input=False,
    type_vocab_size=0,
    layer_norm_eps=1e-7,
    hidden_act="gelu",
    pooler_hidden_act="gelu",
    pooler_dropout=0,
    num_labels=3,
    id2label=LABELS,
    label2id=TINY["label2id"],
)
PUBLISHED = {
    "microsoft/deberta-base": dict(
        model_type="deberta",
        vocab_size=50265,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        relative_attention=True,
        max_relative_positions=-1,
        pos_att_type="c2p|p2c",
        position_biased_input=False,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        hidden_act="gelu",
        pooler_hidden_size=768,
        pooler_hidden_act="gelu",
        num_labels=3,
        id2label=LABELS,
        label2id=TINY["label2id"],
    ),
    "microsoft/deberta-v3-xsmall": dict(
        PUBLISHED_V3,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        pooler_hidden_size=384,
    ),
    "microsoft/deberta-v3-small": dict(
        PUBLISHED_V3,
        hidden_size=768,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=3072,
        pooler_hidden_size=768,
    ),
    "microsoft/deberta-v3-base": dict(
        PUBLISHED_V3,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        pooler_hidden_size=768,
    ),
}
LAYOUT_SHAPES = {
    "as_is": lambda shape: shape,
    "transpose": lambda shape: shape[::-1],
    "conv1d": lambda shape: (shape[2], shape[1], shape[0]),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_build_and_match_torch_parameters(name):
    raw = PUBLISHED[name]
    config = config_from_dict(raw, name)
    abstract = nnx.eval_shape(lambda: DebertaCrossEncoder(config, rngs=nnx.Rngs(0)))
    expected = {
        path: var.get_value().shape for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }
    hf_config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = REFERENCE_CLASSES[raw["model_type"]](hf_config)
    # transformers builds no parameter it does not use (position_biased_input=false means no absolute
    # position table), so the counts must agree exactly.
    assert sum(math.prod(s) for s in expected.values()) == sum(p.numel() for p in model.parameters())
    table = FAMILIES[raw["model_type"]].key_table
    filled = {}
    for key, tensor in model.state_dict().items():
        mapped = table.to_flax(key)
        assert mapped is not None, key
        path, layout = mapped
        assert path not in filled, (key, filled.get(path))
        assert expected[path] == LAYOUT_SHAPES[layout](tuple(tensor.shape)), key
        filled[path] = key
    assert set(filled) == set(expected)
    assert config.relative_span == (512 if raw["model_type"] == "deberta" else 256)


def test_conversion_is_strict_but_drops_what_transformers_drops():
    model, _ = case_models("v3")
    tensors = state_dict(model)
    square = np.zeros((32, 32), np.float32)
    dropped = {
        "deberta.embeddings.position_ids": np.arange(64)[None],
        "lm_predictions.lm_head.dense.weight": square,
        "mask_predictions.classifier.weight": square[:1],
    }
    convert(model, {**tensors, **dropped})
    # share_att_key=true: a pos_key_proj has no place in this model, and unknown keys are never dropped.
    unexpected = {
        "deberta.encoder.layer.0.attention.self.pos_key_proj.weight": square,
        "deberta.encoder.mystery": square[0],
    }
    with pytest.raises(CheckpointError) as error:
        convert(model, {**tensors, **unexpected})
    assert "pos_key_proj" in str(error.value) and "mystery" in str(error.value)
    del tensors["deberta.encoder.LayerNorm.weight"]
    with pytest.raises(CheckpointError, match="rel_norm.scale"):
        convert(model, tensors)


def test_unused_position_embeddings_of_published_checkpoints_are_dropped():
    model, _ = case_models("v1")
    tensors = {
        **state_dict(model),
        "deberta.embeddings.position_embeddings.weight": np.zeros((64, 32), np.float32),
    }
    convert(model, tensors)


def test_v1_in_proj_rows_interleave_per_head():
    """The single in_proj keeps torch's row layout [head, (q, k, v), head_dim]; q and v get their biases."""
    model, module = case_models("v1")
    attention = model.deberta.encoder.layer[0].attention.self
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, k, v = attention.transpose_for_scores(attention.in_proj(x)).chunk(3, dim=-1)
        q = q + attention.transpose_for_scores(attention.q_bias[None, None])
        v = v + attention.transpose_for_scores(attention.v_bias[None, None])
    for ours, ref in zip(module.layers[0].attention.project(x.numpy()), (q, k, v), strict=True):
        np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 1, 3).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def tokenizer_sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("deberta_tokenizers")
    train_sentencepiece(str(root / "spm"))
    train_byte_bpe(str(root / "bpe"))
    return {"spm": str(root / "spm"), "bpe": str(root / "bpe")}


@pytest.fixture(scope="module")
def v3_dir(tokenizer_sources, tmp_path_factory) -> str:
    tokenizer = transformers.DebertaV2Tokenizer.from_pretrained(
        tokenizer_sources["spm"], model_max_length=128
    )
    path = str(tmp_path_factory.mktemp("deberta_v3"))
    return save_checkpoint(path, "deberta-v2", tokenizer, {**V3, "position_buckets": 32})


@pytest.fixture(scope="module")
def v1_dir(tokenizer_sources, tmp_path_factory) -> str:
    tokenizer = transformers.DebertaTokenizer.from_pretrained(tokenizer_sources["bpe"], model_max_length=128)
    path = str(tmp_path_factory.mktemp("deberta_v1"))
    overrides = dict(relative_attention=True, pos_att_type="c2p|p2c", position_biased_input=False)
    return save_checkpoint(path, "deberta", tokenizer, overrides)


PAIR = ("Return the absolute value of the argument, which may be an integer or a float.", "What is abs?")


def check_pair_encoding(tokenizer, max_length: int = 16) -> list[int]:
    encoded = tokenizer(*PAIR, truncation="longest_first", max_length=max_length)
    ids = encoded["input_ids"]
    assert len(ids) == max_length
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    return ids


def test_sentencepiece_tokenizer_loads_like_deberta_v3(tokenizer_sources, v3_dir):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(tokenizer_sources["spm"], "spm.model")
    )
    from_spm = transformers.DebertaV2Tokenizer.from_pretrained(tokenizer_sources["spm"])
    saved = transformers.AutoTokenizer.from_pretrained(v3_dir)
    assert isinstance(saved, transformers.DebertaV2Tokenizer)
    assert [from_spm.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert from_spm.tokenize(PAIR[0]) == processor.encode(PAIR[0], out_type=str)
    ids = check_pair_encoding(from_spm)
    assert ids == check_pair_encoding(saved)
    assert ids.count(from_spm.sep_token_id) == 2
    types = from_spm(*PAIR, truncation="longest_first", max_length=16)["token_type_ids"]
    assert types == sorted(types) and types[-1] == 1


def test_byte_bpe_tokenizer_loads_like_deberta_v1(tokenizer_sources, v1_dir):
    from_files = transformers.DebertaTokenizer.from_pretrained(tokenizer_sources["bpe"])
    saved = transformers.AutoTokenizer.from_pretrained(v1_dir)
    assert isinstance(saved, transformers.DebertaTokenizer)
    assert [from_files.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert check_pair_encoding(from_files) == check_pair_encoding(saved)


@pytest.mark.parametrize("which", ["v3", "v1"])
def test_cross_encoder_matches_sentence_transformers(which, request):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from flax_ce import CrossEncoder

    model_dir = request.getfixturevalue(f"{which}_dir")
    pairs = sample_pairs(9)
    for max_length in (None, 20):
        reference = STCrossEncoder(model_dir, device="cpu", max_length=max_length)
        ours = CrossEncoder(model_dir, max_length=max_length)
        assert ours.max_length == reference.max_length
        for softmax in (False, True):
            expected = reference.predict(pairs, batch_size=4, apply_softmax=softmax)
            scores = ours.predict(pairs, batch_size=4, apply_softmax=softmax)
            assert scores.shape == expected.shape == (len(pairs), 3)
            diff = np.abs(scores - expected).max()
            print(f"{which} max_length={max_length} softmax={softmax}: max |diff| {diff:.2e}")
            assert diff <= TOLERANCE


@pytest.mark.parametrize("which", ["v3_dir", "v1_dir"])
def test_mixed_lengths_compile_once_per_bucket(which, request):
    from support import count_compiles

    from flax_ce import CrossEncoder
    from flax_ce.planning import plan_batches

    ce = CrossEncoder(request.getfixturevalue(which))
    pairs = sample_pairs(30, seed=4)
    lengths = [len(x) for x in ce.tokenize(pairs)["input_ids"]]
    shapes = {(b.rows, b.length) for b in plan_batches(lengths, ce.max_length, batch_size=4)}
    assert len({length for _, length in shapes}) > 1  # the pairs really span several buckets
    with count_compiles() as first:
        scores = ce.predict(pairs, batch_size=4)
    assert 1 <= first[0] <= len(shapes)
    with count_compiles() as again:
        assert (ce.predict(pairs, batch_size=4) == scores).all()
    assert again[0] == 0
