"""Prompts: put in front of each pair's first text exactly as sentence-transformers does, saved and loaded back."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from checkpoints import sample_pairs
from support import ROUNDING, TOLERANCE

from flax_ce import CrossEncoder

PROMPTS = {"search": "Represent this search query: ", "empty": ""}
# Long second texts too, so the prompt's tokens take part in longest-first truncation.
PAIRS = sample_pairs(9, seed=21) + [("short query", "word " * 400)]


@pytest.fixture(scope="module")
def models(bert_dir):
    from sentence_transformers import CrossEncoder as ReferenceCrossEncoder

    return (
        CrossEncoder(bert_dir, prompts=PROMPTS),
        ReferenceCrossEncoder(bert_dir, device="cpu", prompts=PROMPTS),
    )


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"prompt_name": "search"}, {"prompt_name": "empty"}, {"prompt": "query: "}],
    ids=["none", "named", "named-empty", "explicit"],
)
def test_prompts_score_like_sentence_transformers(models, kwargs):
    ours, reference = models
    expected = reference.predict(PAIRS, **kwargs)
    assert np.abs(ours.predict(PAIRS, **kwargs) - expected).max() <= TOLERANCE
    ranked = ours.rank("what is a list", [b for _, b in PAIRS], **kwargs)
    assert [r["corpus_id"] for r in ranked] == [
        r["corpus_id"] for r in reference.rank("what is a list", [b for _, b in PAIRS], **kwargs)
    ]


def test_prompt_goes_before_the_first_text(models):
    ours, _ = models
    prompted = ours.predict(PAIRS, prompt="query: ")
    by_hand = ours.predict([("query: " + a, b) for a, b in PAIRS])
    assert np.abs(prompted - by_hand).max() <= ROUNDING
    assert np.abs(prompted - ours.predict(PAIRS)).max() > 1e-3  # it really changes the input


def test_default_prompt_and_explicit_prompt_win(bert_dir, models):
    ours, _ = models
    default = CrossEncoder(bert_dir, prompts=PROMPTS, default_prompt_name="search")
    assert np.abs(default.predict(PAIRS) - ours.predict(PAIRS, prompt_name="search")).max() <= ROUNDING
    # prompt beats prompt_name (sentence-transformers warns and does the same)
    assert (
        np.abs(
            default.predict(PAIRS, prompt="q: ", prompt_name="search") - ours.predict(PAIRS, prompt="q: ")
        ).max()
        <= ROUNDING
    )


def test_unknown_prompt_names_are_errors(bert_dir, models):
    ours, _ = models
    with pytest.raises(
        ValueError, match=r"prompt_name 'other' is not one of the prompts \['empty', 'search'\]"
    ):
        ours.predict(PAIRS, prompt_name="other")
    with pytest.raises(ValueError, match="default_prompt_name 'other' is not one of the prompts"):
        CrossEncoder(bert_dir, prompts=PROMPTS, default_prompt_name="other")
    with pytest.raises(TypeError, match="prompts must be a dict of name -> prompt text, got list"):
        CrossEncoder(bert_dir, prompts=["query: "])
    with pytest.raises(TypeError, match="prompt 'search': expected str, got int"):
        CrossEncoder(bert_dir, prompts={"search": 3})
    with pytest.raises(TypeError, match="prompt: expected str, got bytes"):
        ours.predict(PAIRS, prompt=b"query: ")


def test_prompts_are_saved_and_loaded_back(bert_dir, tmp_path):
    from sentence_transformers import CrossEncoder as ReferenceCrossEncoder

    ce = CrossEncoder(bert_dir, prompts=PROMPTS, default_prompt_name="search")
    out = str(tmp_path / "prompted")
    ce.save_pretrained(out)
    assert json.load(open(os.path.join(out, "config_sentence_transformers.json")))["prompts"] == PROMPTS
    reference = ReferenceCrossEncoder(out, device="cpu")
    assert reference.prompts == PROMPTS and reference.default_prompt_name == "search"
    expected = ce.predict(PAIRS)  # with the default prompt
    assert np.abs(reference.predict(PAIRS) - expected).max() <= TOLERANCE
    reloaded = CrossEncoder(out)
    assert reloaded.prompts == PROMPTS and reloaded.default_prompt_name == "search"
    assert reloaded.activation_fn is ce.activation_fn
    assert np.abs(reloaded.predict(PAIRS) - expected).max() <= 1e-6
    # Prompts given when loading come first; saved ones fill in the other names.
    override = CrossEncoder(out, prompts={"search": "q: "})
    assert override.prompts == {**PROMPTS, "search": "q: "} and override.default_prompt_name == "search"

    # Without prompts the export stays a plain transformers checkpoint.
    CrossEncoder(bert_dir).save_pretrained(tmp_path / "plain")
    assert not os.path.exists(tmp_path / "plain" / "modules.json")
