"""Evaluators: the same numbers as sentence-transformers' cross-encoder evaluators on the same scores."""

from __future__ import annotations

import random

import numpy as np
import pytest
from sentence_transformers.cross_encoder.evaluation import (
    CrossEncoderClassificationEvaluator,
    CrossEncoderCorrelationEvaluator,
    CrossEncoderRerankingEvaluator,
)

from flax_ce.evaluation import (
    ClassificationEvaluator,
    CorrelationEvaluator,
    RerankingEvaluator,
    average_precision,
    ndcg_at_k,
)


class ScoreTable:
    """A stand-in model for both libraries: predict() looks each pair's score up in a table."""

    class _CardData:
        def set_evaluation_metrics(self, *args, **kwargs):
            pass

    def __init__(self, table: dict, num_labels: int = 1):
        self.table = table
        self.num_labels = num_labels
        self.model_card_data = self._CardData()

    def predict(self, pairs, **kwargs):
        return np.array([self.table[tuple(p)] for p in pairs], dtype=np.float32)


def assert_same(ours: dict, reference: dict):
    assert set(reference) <= set(ours)
    for key, value in reference.items():
        assert ours[key] == pytest.approx(float(value), rel=1e-12, abs=1e-12), key


def reranking_samples(seed: int, ties: bool):
    rng = random.Random(seed)
    samples, table = [], {}
    for q in range(25):
        query = f"query {q}"
        docs = [f"doc {q}-{d}" for d in range(rng.randint(1, 14))]
        positives = rng.sample(docs, rng.randint(0, min(3, len(docs))))
        if q % 3 == 0:  # a first-stage ranking that may miss some positives
            listed = [d for d in docs if d not in positives[:1]]
            sample = {"query": query, "positive": positives, "documents": listed}
        else:
            sample = {
                "query": query,
                "positive": positives,
                "negative": [d for d in docs if d not in positives],
            }
        samples.append(sample)
        for doc in docs:
            score = rng.gauss(0, 1)
            table[(query, doc)] = round(score, 1) if ties else score
    return samples, table


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("always_rerank_positives", [True, False])
def test_reranking_matches_sentence_transformers(ties, always_rerank_positives):
    samples, table = reranking_samples(seed=int(ties), ties=ties)
    model = ScoreTable(table)
    kwargs = dict(at_k=10, always_rerank_positives=always_rerank_positives, name="dev")
    reference = CrossEncoderRerankingEvaluator(samples, write_csv=False, **kwargs)(model)
    ours = RerankingEvaluator(samples, **kwargs)(model)
    assert_same(ours, reference)
    assert {"dev_mrr@10", "dev_ndcg@10", "dev_map", "dev_base_mrr@10"} <= set(ours)


def test_metric_functions_match_sklearn_with_ties():
    from sklearn.metrics import average_precision_score, ndcg_score

    rng = np.random.RandomState(0)
    for _ in range(50):
        n = rng.randint(2, 30)
        relevant = rng.randint(0, 2, n)
        relevant[0] = 1
        scores = rng.randint(0, 5, n).astype(np.float32)
        assert average_precision(relevant, scores) == pytest.approx(average_precision_score(relevant, scores))
        assert ndcg_at_k(relevant, scores, 10) == pytest.approx(ndcg_score([relevant], [scores], k=10))


@pytest.mark.parametrize("ties", [False, True])
def test_binary_classification_matches_sentence_transformers(ties):
    rng = np.random.RandomState(1)
    pairs = [(f"a{i}", f"b{i}") for i in range(200)]
    labels = rng.randint(0, 2, len(pairs))
    scores = rng.rand(len(pairs)) + 0.3 * labels
    if ties:
        scores = np.round(scores, 1)
    model = ScoreTable(dict(zip(pairs, scores, strict=True)))
    reference = CrossEncoderClassificationEvaluator(pairs, labels, name="qnli", write_csv=False)(model)
    ours = ClassificationEvaluator(pairs, labels, name="qnli")(model)
    assert_same(ours, reference)
    assert set(reference) == set(ours)


def test_multiclass_classification_matches_sentence_transformers():
    rng = np.random.RandomState(2)
    pairs = [(f"premise {i}", f"hypothesis {i}") for i in range(150)]
    labels = rng.randint(0, 3, len(pairs))
    logits = rng.randn(len(pairs), 3)
    logits[np.arange(len(pairs)), labels] += 0.8
    logits[:, 2] -= 3.0  # class 2 is rarely predicted: per-class F1 differs from accuracy

    class Logits(ScoreTable):
        def predict(self, pairs, **kwargs):
            return np.stack([self.table[tuple(p)] for p in pairs])

    model = Logits(dict(zip(pairs, logits, strict=True)), num_labels=3)
    reference = CrossEncoderClassificationEvaluator(pairs, labels, name="nli", write_csv=False)(model)
    ours = ClassificationEvaluator(pairs, labels, name="nli")(model)
    assert_same(ours, reference)
    assert ours["nli_accuracy"] == pytest.approx(ours["nli_f1_micro"])


@pytest.mark.parametrize("ties", [False, True])
def test_correlation_matches_sentence_transformers(ties):
    rng = np.random.RandomState(3)
    pairs = [(f"s{i}", f"t{i}") for i in range(120)]
    gold = rng.rand(len(pairs)) * 5
    predicted = gold / 5 + 0.3 * rng.rand(len(pairs))
    if ties:
        gold, predicted = np.round(gold), np.round(predicted, 1)
    model = ScoreTable(dict(zip(pairs, predicted, strict=True)))
    reference = CrossEncoderCorrelationEvaluator(pairs, list(gold), name="sts", write_csv=False)(model)
    ours = CorrelationEvaluator(pairs, gold, name="sts")(model)
    assert_same(ours, reference)


def test_evaluators_on_a_cross_encoder_match_sentence_transformers_on_its_model(bert_dir):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from flax_ce import CrossEncoder

    samples, _ = reranking_samples(seed=4, ties=False)
    # sentence-transformers' NDCG (sklearn) refuses a query with a single document.
    samples = [s for s in samples if len(s.get("documents", s["positive"] + s.get("negative", []))) > 1]
    ours = RerankingEvaluator(samples, name="dev")(CrossEncoder(bert_dir, max_length=32))
    reference = CrossEncoderRerankingEvaluator(samples, name="dev", show_progress_bar=False)(
        STCrossEncoder(bert_dir, max_length=32, device="cpu")
    )
    # Both rank by the same scores (within 1e-6), so every ranking metric is the same number.
    for key, value in reference.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-9), key
    assert len(reference) >= 4
