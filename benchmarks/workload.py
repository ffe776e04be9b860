"""MS MARCO-like pairs from text that ships with Python (the pydoc topic pages): no download needed."""

from __future__ import annotations

import random
import re


def paragraphs() -> list[str]:
    """Prose paragraphs (>= 30 words) of Python's own reference documentation."""
    import pydoc_data.topics

    found = []
    for page in pydoc_data.topics.topics.values():
        for block in re.split(r"\n\s*\n", page):
            block = " ".join(block.split())
            if len(block.split()) >= 30 and not block.startswith((">>>", "...")):
                found.append(block)
    return sorted(set(found))


def msmarco_like_pairs(n: int, seed: int = 0, long_fraction: float = 0.03) -> list[tuple[str, str]]:
    """(query, passage) pairs: 3-9 word queries; passages of one paragraph (mostly 30-100 words), and a
    `long_fraction` of passages long enough (>= 450 words) to be truncated at 512 tokens."""
    rng = random.Random(seed)
    texts = paragraphs()
    pairs = []
    for _ in range(n):
        source = rng.choice(texts).split()
        start = rng.randrange(max(len(source) - 9, 1))
        query = " ".join(source[start : start + rng.randint(3, 9)])
        if rng.random() < long_fraction:
            passage = []
            while len(passage) < 450:
                passage += rng.choice(texts).split()
            passage = " ".join(passage)
        else:
            passage = rng.choice(texts)
            words = passage.split()
            if len(words) > 100:  # MS MARCO passages are short; cut long paragraphs at a sentence-ish point
                passage = " ".join(words[: rng.randint(50, 100)])
        pairs.append((query, passage))
    return pairs


def long_passage_pairs(n: int, seed: int = 0, words: tuple[int, int] = (150, 420)) -> list[tuple[str, str]]:
    """(query, passage) pairs whose passages join paragraphs to `words` words: the 256-511 token range
    that MS MARCO-like pairs rarely reach."""
    rng = random.Random(seed)
    texts = paragraphs()
    pairs = []
    for _ in range(n):
        target = rng.randint(*words)
        passage = []
        while len(passage) < target:
            passage += rng.choice(texts).split()
        source = rng.choice(texts).split()
        start = rng.randrange(max(len(source) - 9, 1))
        pairs.append((" ".join(source[start : start + rng.randint(3, 9)]), " ".join(passage[:target])))
    return pairs


def ranking_queries(n_queries: int, n_passages: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Queries with candidate passages, the first passage being the one the query was cut from."""
    rng = random.Random(seed)
    texts = paragraphs()
    out = []
    for _ in range(n_queries):
        positive = rng.choice(texts)
        words = positive.split()
        start = rng.randrange(max(len(words) - 8, 1))
        query = " ".join(words[start : start + rng.randint(4, 8)])
        negatives = rng.sample([t for t in texts if t != positive], n_passages - 1)
        out.append((query, [positive, *negatives]))
    return out
