"""Evaluators for the seed tasks, numerically equal to sentence-transformers' cross-encoder evaluators.

Re-ranking (MRR@k, NDCG@k, MAP), classification (accuracy/F1/AP for one label, F1 for several) and
correlation (Pearson/Spearman). The metric functions are numpy ports of the scikit-learn / scipy
definitions those evaluators call, ties included.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# --- metrics -------------------------------------------------------------------------------------


def mrr_at_k(is_relevant: Sequence[int], scores: np.ndarray, k: int = 10) -> float:
    """1 / rank of the first relevant document within the top k (0 if none), ranked as the reference does."""
    ranking = np.argsort(scores)[::-1]
    for rank, index in enumerate(ranking[:k]):
        if is_relevant[index]:
            return 1.0 / (rank + 1)
    return 0.0


def ndcg_at_k(is_relevant: Sequence[float], scores: np.ndarray, k: int = 10) -> float:
    """NDCG@k with tied scores sharing their positions' discounts (scikit-learn's `ndcg_score`)."""
    gains = np.asarray(is_relevant, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    discount = 1.0 / np.log2(np.arange(len(gains)) + 2)
    discount[k:] = 0.0
    ideal = float(np.sort(gains)[::-1] @ discount)
    if ideal == 0.0:
        return 0.0
    # Each group of equal scores gets its mean gain times the sum of the discounts it occupies.
    _, group, counts = np.unique(-scores, return_inverse=True, return_counts=True)
    mean_gain = np.bincount(group, weights=gains) / counts
    ends = np.cumsum(discount)[np.cumsum(counts) - 1]
    group_discount = np.diff(ends, prepend=0.0)
    return float(mean_gain @ group_discount) / ideal


def average_precision(labels: Sequence[int], scores: np.ndarray) -> float:
    """Area under the precision-recall steps, one step per distinct score (scikit-learn's definition)."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores)
    order = np.argsort(scores, kind="mergesort")[::-1]
    labels, scores = labels[order], scores[order]
    last_of_group = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    true_positives = np.cumsum(labels)[last_of_group]
    precision = true_positives / (last_of_group + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xm, ym = x - x.mean(), y - y.mean()
    r = float((xm / np.linalg.norm(xm)) @ (ym / np.linalg.norm(ym)))
    return max(min(r, 1.0), -1.0)


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties getting the mean of their ranks (scipy's `rankdata`)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    position = np.empty(len(x), dtype=np.int64)
    position[order] = np.arange(len(x))
    sorted_x = x[order]
    new_value = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(new_value)[position]
    bounds = np.r_[np.nonzero(new_value)[0], len(x)]
    return 0.5 * (bounds[group] + bounds[group - 1] + 1)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson's r of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def best_accuracy_and_threshold(scores: np.ndarray, labels: Sequence[int]) -> tuple[float, float]:
    """Best accuracy of `score > threshold` over all thresholds, and that threshold (midpoint between scores)."""
    labels = np.asarray(labels)
    score_dtype = np.result_type(np.asarray(scores).dtype, np.float16)
    rows = sorted(zip(scores, labels, strict=True), key=lambda row: row[0], reverse=True)
    if not rows:
        return 0.0, -1.0
    correct_positives, remaining_negatives = 0, int(np.sum(labels == 0))
    # Start from the threshold that calls every pair negative.
    best, threshold = remaining_negatives / len(labels), np.nextafter(rows[0][0], np.inf, dtype=score_dtype)
    for i, (score, label) in enumerate(rows):
        if label == 1:
            correct_positives += 1
        else:
            remaining_negatives -= 1
        is_last = i == len(rows) - 1
        if not is_last and score == rows[i + 1][0]:
            continue
        accuracy = (correct_positives + remaining_negatives) / len(labels)
        if accuracy > best:
            best, threshold = accuracy, _between(rows, i)
    return best, threshold


def best_f1_and_threshold(scores: np.ndarray, labels: Sequence[int]) -> tuple[float, float, float, float]:
    """(best F1, its precision, its recall, threshold) of `score > threshold` over all thresholds."""
    labels = np.asarray(labels)
    rows = sorted(zip(scores, labels, strict=True), key=lambda row: row[0], reverse=True)
    best = (0, 0, 0)
    threshold = 0
    total_positives = np.sum(labels)
    correct = 0
    for i, (score, label) in enumerate(rows):
        correct += label == 1
        if i < len(rows) - 1 and score == rows[i + 1][0]:
            continue
        if correct > 0:
            precision, recall = correct / (i + 1), correct / total_positives
            f1 = 2 * precision * recall / (precision + recall)
            if f1 > best[0]:
                best, threshold = (f1, precision, recall), _between(rows, i)
    return (*best, threshold)


def _between(rows: list, i: int):
    """Threshold between row i and the next lower score; row i's score if the midpoint rounds onto the next."""
    if i == len(rows) - 1:
        return rows[i][0]
    middle = (rows[i][0] + rows[i + 1][0]) / 2
    return rows[i][0] if middle == rows[i + 1][0] else middle


def f1_scores(labels: Sequence[int], predicted: Sequence[int]) -> dict[str, float]:
    """Macro, micro and support-weighted F1 over the classes seen in labels or predictions."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    classes = np.union1d(labels, predicted)
    tp = np.array([np.sum((labels == c) & (predicted == c)) for c in classes], dtype=np.float64)
    fp = np.array([np.sum((labels != c) & (predicted == c)) for c in classes], dtype=np.float64)
    fn = np.array([np.sum((labels == c) & (predicted != c)) for c in classes], dtype=np.float64)
    per_class = 2 * tp / (2 * tp + fp + fn)  # every class occurs somewhere, so no 0/0
    support = tp + fn
    return {
        "f1_macro": float(per_class.mean()),
        "f1_micro": float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum())),
        "f1_weighted": float(np.average(per_class, weights=support)),
    }


# --- evaluators ----------------------------------------------------------------------------------


def _key(metric: str, name: str) -> str:
    return f"{name}_{metric}" if name else metric


def _prefixed(metrics: dict, name: str) -> dict[str, float]:
    return {_key(metric, name): float(value) for metric, value in metrics.items()}


class RerankingEvaluator:
    """MAP, MRR@k and NDCG@k over samples {"query", "positive": [...], "negative" or "documents": [...]}.

    Like sentence-transformers: every positive is re-ranked with the negatives (or, with "documents"
    and `always_rerank_positives=False`, only those in the list); "documents" adds the base_* metrics
    of their given order.
    """

    def __init__(
        self,
        samples: Sequence[dict],
        at_k: int = 10,
        always_rerank_positives: bool = True,
        name: str = "",
        batch_size: int = 64,
        show_progress_bar: bool = False,
    ):
        self.samples = list(samples)
        self.at_k = at_k
        self.always_rerank_positives = always_rerank_positives
        self.name = name
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar
        self.primary_metric = _key(f"ndcg@{at_k}", name)

    def _ranking_task(self, sample: dict) -> tuple[str, list[str], list[int], tuple | None]:
        """(query, documents to score, relevance, base (mrr, ndcg, ap) or None) for one sample."""
        if "query" not in sample or "positive" not in sample:
            raise ValueError("each re-ranking sample needs 'query' and 'positive'")
        if ("negative" in sample) == ("documents" in sample):
            raise ValueError("each re-ranking sample needs exactly one of 'negative' and 'documents'")
        positive = [sample["positive"]] if isinstance(sample["positive"], str) else list(sample["positive"])
        documents, base = sample.get("documents"), None
        if documents:
            base_relevant = [int(doc in positive) for doc in documents]
            base = (0, 0, 0)
            if sum(base_relevant):
                # Positives missing from the list count as ranked after it.
                base_relevant += [1] * (len(positive) - sum(base_relevant))
                base = self.metrics(base_relevant, np.arange(len(base_relevant), 0, -1))
            if not self.always_rerank_positives:
                return sample["query"], list(documents), [int(doc in positive) for doc in documents], base
            negatives = [doc for doc in documents if doc not in positive]
        else:
            negatives = list(sample.get("negative") or [])
        return sample["query"], positive + negatives, [1] * len(positive) + [0] * len(negatives), base

    def metrics(self, is_relevant: Sequence[int], scores: np.ndarray) -> tuple[float, float, float]:
        """(MRR@k, NDCG@k, AP) of one ranked list."""
        return (
            mrr_at_k(is_relevant, scores, self.at_k),
            ndcg_at_k(is_relevant, scores, self.at_k),
            average_precision(is_relevant, scores),
        )

    def __call__(self, model) -> dict[str, float]:
        """Score every (query, document) pair with `model.predict` and average the per-query metrics."""
        tasks = [self._ranking_task(sample) for sample in self.samples]
        pairs = [(query, doc) for query, docs, relevant, _ in tasks if sum(relevant) for doc in docs]
        scores = (
            np.asarray(
                model.predict(pairs, batch_size=self.batch_size, show_progress_bar=self.show_progress_bar)
            )
            if pairs
            else np.zeros(0)
        )
        per_query, offset = [], 0
        for _, docs, relevant, _ in tasks:
            if not sum(relevant):  # nothing relevant to find: counts as 0
                per_query.append((0.0, 0.0, 0.0))
                continue
            per_query.append(self.metrics(relevant, scores[offset : offset + len(docs)]))
            offset += len(docs)
        mrr, ndcg, ap = (np.mean(column) for column in zip(*per_query, strict=True))
        k = self.at_k
        metrics = {"map": ap, f"mrr@{k}": mrr, f"ndcg@{k}": ndcg}
        base = [b for *_, b in tasks if b is not None]
        if base:
            base_mrr, base_ndcg, base_ap = (np.mean(column) for column in zip(*base, strict=True))
            metrics.update({"base_map": base_ap, f"base_mrr@{k}": base_mrr, f"base_ndcg@{k}": base_ndcg})
        return _prefixed(metrics, self.name)


class _PairsEvaluator:
    """Scores fixed sentence pairs with `model.predict`; subclasses turn the scores into metrics."""

    def __init__(
        self,
        sentence_pairs: Sequence[tuple[str, str]],
        targets: Sequence,
        targets_name: str,
        name: str,
        batch_size: int,
        show_progress_bar: bool,
    ):
        if len(sentence_pairs) != len(targets):
            raise ValueError(f"sentence_pairs and {targets_name} must have the same length")
        self.sentence_pairs = [tuple(p) for p in sentence_pairs]
        self.name = name
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar

    def predict(self, model) -> np.ndarray:
        return model.predict(
            self.sentence_pairs, batch_size=self.batch_size, show_progress_bar=self.show_progress_bar
        )


class ClassificationEvaluator(_PairsEvaluator):
    """One label: best accuracy / F1 over thresholds and average precision; several: F1 and accuracy."""

    def __init__(
        self,
        sentence_pairs: Sequence[tuple[str, str]],
        labels: Sequence[int],
        name: str = "",
        batch_size: int = 32,
        show_progress_bar: bool = False,
    ):
        super().__init__(sentence_pairs, labels, "labels", name, batch_size, show_progress_bar)
        self.labels = np.asarray(labels)
        self.primary_metric = None

    def metrics_from_scores(self, scores: np.ndarray) -> dict[str, float]:
        """The metrics for predicted scores: [N] (one label) or [N, C]."""
        scores = np.asarray(scores)
        if scores.ndim == 1:
            accuracy, accuracy_threshold = best_accuracy_and_threshold(scores, self.labels)
            f1, precision, recall, f1_threshold = best_f1_and_threshold(scores, self.labels)
            metrics = {
                "accuracy": accuracy,
                "accuracy_threshold": accuracy_threshold,
                "f1": f1,
                "f1_threshold": f1_threshold,
                "precision": precision,
                "recall": recall,
                "average_precision": average_precision(self.labels, scores),
            }
            primary = "average_precision"
        else:
            predicted = np.argmax(scores, axis=1)
            metrics = {**f1_scores(self.labels, predicted), "accuracy": np.mean(predicted == self.labels)}
            primary = "f1_macro"
        self.primary_metric = _key(primary, self.name)
        return _prefixed(metrics, self.name)

    def __call__(self, model) -> dict[str, float]:
        """Predict the pairs with `model` and compute the metrics."""
        return self.metrics_from_scores(self.predict(model))


class CorrelationEvaluator(_PairsEvaluator):
    """Pearson and Spearman correlation between predicted scores and gold scores (e.g. STSb)."""

    def __init__(
        self,
        sentence_pairs: Sequence[tuple[str, str]],
        scores: Sequence[float],
        name: str = "",
        batch_size: int = 32,
        show_progress_bar: bool = False,
    ):
        super().__init__(sentence_pairs, scores, "scores", name, batch_size, show_progress_bar)
        self.scores = np.asarray(scores, dtype=np.float64)
        self.primary_metric = _key("spearman", name)

    def __call__(self, model) -> dict[str, float]:
        """Predict the pairs with `model` and correlate with the gold scores."""
        predicted = self.predict(model)
        return _prefixed(
            {"pearson": pearson(self.scores, predicted), "spearman": spearman(self.scores, predicted)},
            self.name,
        )
