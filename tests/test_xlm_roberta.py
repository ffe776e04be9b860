"""XLM-RoBERTa (bge-reranker): RoBERTa's layout with a Unigram tokenizer and a longer position table."""

from __future__ import annotations

import pytest
from checkpoints import build_xlm_roberta
from reference_scores import assert_matches_references, long_range_pairs

from flax_ce.config import ConfigError
from flax_ce.models import config_from_dict


@pytest.fixture(scope="module")
def xlm_roberta_dir(tmp_path_factory):
    return build_xlm_roberta(str(tmp_path_factory.mktemp("xlm-roberta") / "model"), positions=1026)


def test_matches_sentence_transformers_and_transformers(xlm_roberta_dir):
    ce = assert_matches_references(xlm_roberta_dir, long_range_pairs())
    assert ce.max_length == 1024  # 1,026 positions less RoBERTa's offset (pad_token_id + 1)
    assert ce.config.position_limit == 1024


def test_position_limit_follows_the_offset_rule():
    raw = dict(
        model_type="xlm-roberta",
        vocab_size=250002,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=8194,
        type_vocab_size=1,
    )
    assert config_from_dict(raw).position_limit == 8192  # pad_token_id defaults to 1, as transformers'
    assert config_from_dict({**raw, "pad_token_id": 3}).position_limit == 8190
    with pytest.raises(ConfigError, match="position_embedding_type"):
        config_from_dict({**raw, "position_embedding_type": "relative_key"})
