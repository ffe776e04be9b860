"""Static shapes: compilations stay inside the planned shape set, none on reuse; warmup; the planner."""

from __future__ import annotations

import numpy as np
from checkpoints import sample_pairs
from support import check_plan, count_compiles

from flax_ce import CrossEncoder
from flax_ce.planning import bucket_length, plan_batches


def test_compiles_once_per_shape(bert_dir):
    pairs = sample_pairs(60, seed=5)
    ce = CrossEncoder(bert_dir, max_length=200)
    lengths = [len(x) for x in ce.tokenize(pairs)["input_ids"]]
    used = {(b.rows, b.length) for b in ce.engine.plan(lengths, 8, ce.token_budget)}
    with count_compiles() as compiles:
        first = ce.predict(pairs, batch_size=8)
    assert used <= ce.planned_shapes(batch_size=8)
    # One program per shape, plus the activation's (eager) operation once per batch row count.
    assert len(used) == ce.engine.compile_count
    assert 1 <= compiles[0] <= len(used) + len({rows for rows, _ in used})
    with count_compiles() as again:
        second = ce.predict(list(reversed(pairs)), batch_size=8)
    assert again[0] == 0
    assert (second[::-1] == first).all()


def test_warmup_compiles_the_plan_ahead(bert_dir):
    ce = CrossEncoder(bert_dir, max_length=64, token_budget=256, packing=False)  # packed: test_packing.py
    compiled = ce.warmup()
    assert compiled == len(ce.planned_shapes()) == ce.engine.compile_count
    with count_compiles() as compiles:
        ce.predict(sample_pairs(40, seed=2))
    assert compiles[0] == 0


def test_bucket_length():
    assert bucket_length(1, 512) == 32
    assert bucket_length(32, 512) == 32
    assert bucket_length(33, 512) == 64
    assert bucket_length(500, 512) == 512
    assert bucket_length(100, 100) == 100


def test_plan_covers_every_input_once_within_budget():
    rng = np.random.RandomState(0)
    lengths = rng.randint(3, 513, size=1000)
    for kwargs in ({"token_budget": 4096}, {"batch_size": 7}, {"token_budget": 8192, "multiple": 4}):
        check_plan(plan_batches(lengths, 512, **kwargs), lengths, **kwargs)
