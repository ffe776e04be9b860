"""Published rerankers' config.json files build a flax_ce model with transformers' parameters, key for key.

The dicts are the published config.json files as written from knowledge of the hub (the hub is not
reachable from the tests); the comment above each names what it carries.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from flax import nnx

from flax_ce.models import build_model, config_from_dict, family_of

ONE_LABEL = dict(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
XLM_R = dict(
    architectures=["XLMRobertaForSequenceClassification"],
    model_type="xlm-roberta",
    vocab_size=250002,
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    hidden_act="gelu",
    layer_norm_eps=1e-05,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    classifier_dropout=None,
    position_embedding_type="absolute",
    initializer_range=0.02,
    output_past=True,
    use_cache=True,
    **ONE_LABEL,
)
PUBLISHED = {
    # XLM-R base: 250,002-token vocabulary, 514 positions (512 tokens), 768 wide, 12 layers, 12 heads.
    "BAAI/bge-reranker-base": dict(
        XLM_R,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
    ),
    # XLM-R large (BGE-M3): 8,194 positions (8,192 tokens), 1024 wide, 24 layers, 16 heads.
    "BAAI/bge-reranker-v2-m3": dict(
        XLM_R,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=8194,
    ),
    # ModernBERT base as transformers 4.48 saved it: 50,368 vocabulary, 768 wide, 22 layers (global
    # attention every 3rd), 12 heads, GeGLU 1152, 8,192 positions, 128-token local window, no biases.
    # The pooling does not change the parameter count.
    "Alibaba-NLP/gte-reranker-modernbert-base": dict(
        architectures=["ModernBertForSequenceClassification"],
        model_type="modernbert",
        vocab_size=50368,
        hidden_size=768,
        intermediate_size=1152,
        num_hidden_layers=22,
        num_attention_heads=12,
        hidden_activation="gelu",
        max_position_embeddings=8192,
        global_attn_every_n_layers=3,
        local_attention=128,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        norm_eps=1e-05,
        norm_bias=False,
        attention_bias=False,
        mlp_bias=False,
        decoder_bias=True,
        classifier_bias=False,
        classifier_activation="gelu",
        classifier_pooling="mean",
        classifier_dropout=0.0,
        attention_dropout=0.0,
        embedding_dropout=0.0,
        mlp_dropout=0.0,
        pad_token_id=50283,
        bos_token_id=50281,
        cls_token_id=50281,
        eos_token_id=50282,
        sep_token_id=50282,
        initializer_range=0.02,
        initializer_cutoff_factor=2.0,
        deterministic_flash_attn=False,
        reference_compile=True,
        sparse_prediction=False,
        sparse_pred_ignore_index=-100,
        **ONE_LABEL,
    ),
    # DeBERTa-v3 base: 128,100 vocabulary, 768 wide, 12 layers, 256 position buckets, shared keys,
    # p2c|c2p, no absolute positions or token types.
    "mixedbread-ai/mxbai-rerank-base-v1": dict(
        architectures=["DebertaV2ForSequenceClassification"],
        model_type="deberta-v2",
        vocab_size=128100,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        layer_norm_eps=1e-07,
        max_position_embeddings=512,
        max_relative_positions=-1,
        position_buckets=256,
        relative_attention=True,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        pad_token_id=0,
        pooler_dropout=0,
        pooler_hidden_act="gelu",
        pooler_hidden_size=768,
        initializer_range=0.02,
        **ONE_LABEL,
    ),
}
LAYOUT_SHAPES = {"as_is": lambda shape: shape, "transpose": lambda shape: shape[::-1]}
POSITION_LIMITS = {
    "BAAI/bge-reranker-base": 512,
    "BAAI/bge-reranker-v2-m3": 8192,
    "Alibaba-NLP/gte-reranker-modernbert-base": None,  # rotary: no table to run off
    "mixedbread-ai/mxbai-rerank-base-v1": None,  # relative positions only
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_builds_transformers_parameters(name):
    raw = PUBLISHED[name]
    config = config_from_dict(raw, name)
    assert config.position_limit == POSITION_LIMITS[name] and config.num_labels == 1
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    ours = {path: var.get_value().shape for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    hf_config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        reference = transformers.AutoModelForSequenceClassification.from_config(hf_config)
    assert type(reference).__name__ == raw["architectures"][0]
    assert sum(math.prod(s) for s in ours.values()) == sum(p.numel() for p in reference.parameters())
    table = family_of(config).key_table
    filled = {}
    for key, tensor in reference.state_dict().items():
        mapped = table.to_flax(key)
        assert mapped is not None, key
        path, layout = mapped
        assert path not in filled and ours[path] == LAYOUT_SHAPES[layout](tuple(tensor.shape)), key
        filled[path] = key
    assert set(filled) == set(ours)
