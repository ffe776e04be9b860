"""The planner's cost model: shapes merged only where compiling costs more than padding, exactly optimal."""

from __future__ import annotations

import itertools
import types
from collections import Counter

import jax
import numpy as np
import pytest
from checkpoints import sample_pairs
from support import check_plan

from flax_ce import CrossEncoder
from flax_ce.engine import ScoringEngine, _program
from flax_ce.planning import (
    CPU_COMPILE_UNITS,
    DEFAULT_TOKEN_BUDGET,
    ShapeCosts,
    batch_cost,
    bucket_length,
    choose_lengths,
    cpu_compile_units,
    plan_batches,
    plan_cost,
    plan_packed,
    plan_units,
    planned_shapes,
    rows_for_length,
)

# Mostly short pairs and a few long stragglers, as in re-ranking: each straggler bucket would be a shape.
LENGTHS = [int(n) for n in np.random.RandomState(3).randint(20, 140, size=400)] + [290, 350, 420, 470, 512]
COMPILE = 6144.0


def test_free_compilation_pads_least():
    plan = plan_batches(LENGTHS, 512)
    check_plan(plan, LENGTHS)
    for batch in plan:  # every input in its own 32-token bucket, partial batches at the smallest menu size
        assert batch.length == bucket_length(max(LENGTHS[i] for i in batch.indices), 512)
        assert batch.rows == rows_for_length(batch.length, None, 4096) or batch.rows < 2 * len(batch.indices)


def test_paid_compilation_merges_stragglers_into_fewer_shapes():
    costs = ShapeCosts(compile_units=COMPILE)
    finest, merged = plan_batches(LENGTHS, 512), plan_batches(LENGTHS, 512, costs=costs)
    check_plan(merged, LENGTHS)
    shapes = {(b.rows, b.length) for b in merged}
    assert len(shapes) < len({(b.rows, b.length) for b in finest}) - 3
    assert len([b for b in merged if b.length > 256]) == 1  # the five long pairs share one [8, 512] call
    assert plan_cost(merged, costs) < plan_cost(finest, costs)
    for kwargs in ({"batch_size": 7}, {"token_budget": 8192, "multiple": 4}):
        check_plan(plan_batches(LENGTHS, 512, costs=costs, **kwargs), LENGTHS, **kwargs)


def test_known_shapes_are_free():
    finest = plan_batches(LENGTHS, 512)
    known = ShapeCosts(frozenset((b.rows, b.length) for b in finest), COMPILE)
    assert [(b.rows, b.length) for b in plan_batches(LENGTHS, 512, costs=known)] == [
        (b.rows, b.length) for b in finest
    ]


def test_packed_rows_merge_too():
    costs = ShapeCosts(compile_units=COMPILE)
    for kwargs in ({}, {"batch_size": 7}):
        plan = plan_packed(LENGTHS, 512, costs=costs, **kwargs)
        assert sorted(np.concatenate([b.pairs[b.pairs >= 0] for b in plan])) == list(range(len(LENGTHS)))
        for batch in plan:
            for row in batch.pairs:
                assert sum(LENGTHS[i] for i in row[row >= 0]) <= batch.length
        assert len({(b.rows, b.length) for b in plan}) < len(
            {(b.rows, b.length) for b in plan_packed(LENGTHS, 512, **kwargs)}
        )


def brute_force(counts, rows_at, costs):
    """The cheapest grouping of the sorted buckets into runs, by trying every set of cut points."""
    lengths = sorted(counts, reverse=True)
    compiled = {length for _, length in costs.known}

    def group_cost(group):
        count = sum(counts[n] for n in group)
        targets = [group[0]] + [n for n in compiled if n > group[0]]
        return min(costs.group_cost(count, n, rows_at(n), 1) for n in targets)

    best = float("inf")
    for cuts in itertools.product((False, True), repeat=len(lengths) - 1):
        total, start = 0.0, 0
        for end in [i + 1 for i, cut in enumerate(cuts) if cut] + [len(lengths)]:
            total += group_cost(lengths[start:end])
            start = end
        best = min(best, total)
    return best


def test_choose_lengths_is_the_exact_minimum():
    rng = np.random.RandomState(0)

    def rows_at(length):
        return rows_for_length(length, None, 4096)

    for trial in range(40):
        buckets = rng.choice(np.arange(32, 513, 32), size=rng.randint(1, 9), replace=False)
        counts = {int(b): int(rng.randint(1, 40)) for b in buckets}
        # Compiled shapes at some of the call's lengths and at lengths it does not have.
        known = {(rows_at(b), b) for b in np.arange(32, 513, 32) if rng.rand() < 0.2}
        known |= {(int(rng.choice([1, 2, 4])), int(b)) for b in np.arange(32, 513, 32) if rng.rand() < 0.1}
        costs = ShapeCosts(frozenset(known), float(rng.choice([0, 1000, 6144, 50000])))
        padded_to = choose_lengths(counts, rows_at, costs)
        groups = Counter(padded_to.values())
        total = sum(
            costs.group_cost(
                sum(counts[n] for n in counts if padded_to[n] == length), length, rows_at(length), 1
            )
            for length in groups
        )
        assert total <= brute_force(counts, rows_at, costs) + 1e-6, trial
        assert all(padded_to[n] >= n for n in counts)


def test_batch_cost_grows_with_rows_and_length():
    assert batch_cost(8, 512) > batch_cost(32, 128) > batch_cost(16, 128)


def encoder_matrices(layers: int, hidden: int, intermediate: int, labels: int = 1) -> list[int]:
    """Weight matrix sizes of a BERT-like cross-encoder: per layer q, k, v, output and two feed-forward,
    then the pooler and the classifier."""
    layer = [hidden * hidden] * 4 + [hidden * intermediate] * 2
    return layer * layers + [hidden * hidden, hidden * labels]


def test_compile_price_before_measuring_follows_the_model_size():
    minilm = encoder_matrices(6, 384, 1536)
    assert cpu_compile_units(minilm) == CPU_COMPILE_UNITS  # the model the default was measured on
    # DeBERTa-v3-xsmall's encoder (twice MiniLM-L6's layers): its own compilations measured 3,300-4,500
    # units on 2 cores.
    deberta_xsmall = cpu_compile_units(encoder_matrices(12, 384, 1536))
    assert 3300 < deberta_xsmall < 4500
    base, large = (
        cpu_compile_units(encoder_matrices(12, 768, 3072)),
        cpu_compile_units(encoder_matrices(24, 1024, 4096)),
    )
    assert large < base < deberta_xsmall
    assert cpu_compile_units(encoder_matrices(2, 128, 512)) == CPU_COMPILE_UNITS  # smaller: not above
    assert cpu_compile_units([]) == CPU_COMPILE_UNITS


def test_engine_prices_compilation_of_a_model_it_has_not_measured_by_its_size():
    """The engine counts the model's weight matrices, embedding tables left out, before its first call."""
    from flax import nnx

    from flax_ce.models.bert import BertCrossEncoder, config_from_dict

    raw = {
        "model_type": "bert",
        "vocab_size": 3000,
        "hidden_size": 512,
        "num_hidden_layers": 6,
        "num_labels": 1,
    }
    raw.update(num_attention_heads=8, intermediate_size=2048, max_position_embeddings=128, type_vocab_size=2)
    model = BertCrossEncoder(config_from_dict(raw), rngs=nnx.Rngs(0))
    engine = ScoringEngine(pad_id=0, max_length=128)
    assert engine.compile_units() == CPU_COMPILE_UNITS
    engine.weights(model)
    assert engine.compile_units() == cpu_compile_units(encoder_matrices(6, 512, 2048)) < CPU_COMPILE_UNITS


def test_engine_prices_compilation_from_its_own_measurements(bert_dir):
    ce = CrossEncoder(bert_dir, max_length=128)
    assert ce.engine.compile_units() == CPU_COMPILE_UNITS  # nothing measured yet
    pairs = sample_pairs(30, seed=1)
    jax.config.update("jax_enable_compilation_cache", False)  # real compiles, not the session cache's loads
    try:
        first = ce.predict(pairs)
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    assert ce.engine.xla_compiles == ce.engine.compile_count
    measured = ce.engine.compile_units()
    assert measured > 0 and measured != CPU_COMPILE_UNITS
    programs = ce.engine.compile_count
    np.testing.assert_array_equal(ce.predict(pairs), first)  # the same plan: nothing new to compile
    assert ce.engine.compile_count == programs


def test_cache_loads_do_not_price_compilation(bert_dir):
    warm = CrossEncoder(bert_dir, max_length=96, token_budget=640)
    pairs = sample_pairs(30, seed=4)
    warm.predict(pairs)  # fills the session's persistent cache with these programs
    ce = CrossEncoder(bert_dir, max_length=96, token_budget=640)
    ce.predict(pairs)
    assert ce.engine.xla_compiles == 0 < ce.engine.compile_count  # all loaded from the cache
    assert ce.engine.compile_units() == CPU_COMPILE_UNITS  # a load says nothing about compiling


def test_repeated_calls_approach_the_plan_that_pads_least(bert_dir, monkeypatch):
    ce = CrossEncoder(bert_dir, max_length=256, packing=False)
    monkeypatch.setattr(ce.engine, "compile_units", lambda: COMPILE)
    pairs = sample_pairs(40, seed=6)
    lengths = [len(ids) for ids in ce.tokenize(pairs)["input_ids"]]
    least = plan_batches(lengths, 256)
    first = ce.engine.plan(lengths, None, ce.token_budget)
    assert len({(b.rows, b.length) for b in first}) < len({(b.rows, b.length) for b in least})  # pads first
    scores = ce.predict(pairs)
    programs = ce.engine.compile_count
    # Calls pad more than the least plan would until that padding has paid for compiling the programs
    # that end it: here 4 programs in call 9 and 2 in call 46. The last 13 units of padding a call would
    # take some 960 calls to pay for the 2 programs that end them. Other shapes, the same scores.
    for _ in range(50):
        np.testing.assert_allclose(ce.predict(pairs), scores, atol=1e-6)
    assert ce.engine.compile_count > programs
    gap = plan_units(ce.engine.plan(lengths, None, ce.token_budget)) - plan_units(least)
    assert 0 <= gap < 0.05 * (plan_units(first) - plan_units(least))


@pytest.mark.parametrize("packing", [False, True])
def test_repeated_calls_compile_only_what_their_padding_paid_for(packing, monkeypatch):
    """Ski rental: over repeated calls, the programs compiled after the first never cost more than the
    padding that the calls paid beyond the least plan, plus what each compiling call would have paid
    without its new programs (the last call's padding: the calls repeat). Lowering every program's price
    by all the padding paid broke this: 8 programs in the third call here, 15 for 600 MS MARCO-like pairs
    on MiniLM-L6 (a 24-27 s call among 8-11 s ones)."""
    engine = ScoringEngine(pad_id=0, max_length=512, packing=packing)
    # Compiling is only bookkeeping here: the policy decides which programs a call asks for.
    monkeypatch.setattr(engine, "_lower", lambda state, *key: types.SimpleNamespace(compile=lambda: None))
    least = plan_units((plan_packed if packing else plan_batches)(LENGTHS, 512))
    compiled, gaps, covered = [], [], 0.0
    for call in range(40):
        plan = engine.plan_call(LENGTHS, None, DEFAULT_TOKEN_BUDGET)
        before = engine.compile_count
        engine.compile_programs(None, [_program(batch) for batch in plan])
        compiled.append(engine.compile_count - before)
        if call and compiled[-1]:
            covered += gaps[-1]
            spent = sum(compiled[1:]) * engine.compile_units()
            assert spent <= sum(gaps) + covered + 1e-6, (compiled, gaps)
        gaps.append(plan_units(plan) - least)
    assert compiled[0] and sum(compiled[1:]), compiled  # the first call pads, later ones compile
    assert gaps[-1] < 0.1 * gaps[0], gaps  # most of that padding ends


def test_a_call_pads_to_a_longer_compiled_shape_rather_than_compile_its_own():
    """Free shapes at lengths the call's buckets do not have count too: one short pair beside a compiled
    [1, 512] costs its padding, not a compilation; inputs padded past a longer run's length still form
    batches of one length each, longest first, holding every input once."""
    costs = ShapeCosts(frozenset({(8, 416), (1, 512)}), COMPILE)
    lengths = [400] * 8 + [20]
    plan = plan_batches(lengths, 512, costs=costs)
    assert sorted((b.rows, b.length) for b in plan) == [(1, 512), (8, 416)]
    assert sorted(np.concatenate([b.indices for b in plan]).tolist()) == list(range(len(lengths)))
    assert all(lengths[i] <= b.length for b in plan for i in b.indices)
    packed = plan_packed(lengths, 512, costs=costs)
    assert sorted((b.rows, b.length) for b in packed) == [(1, 512), (8, 416)]
    # Compiling free (the plan that pads least): the short pair gets its own shape.
    assert (1, 32) in {(b.rows, b.length) for b in plan_batches(lengths, 512)}


def test_small_calls_use_a_compiled_longer_program(monkeypatch):
    engine = ScoringEngine(pad_id=0, max_length=512, packing=False)
    monkeypatch.setattr(engine, "_lower", lambda state, *key: types.SimpleNamespace(compile=lambda: None))
    shapes = []
    for lengths in ([450], [300], [200], [40]):
        plan = engine.plan_call(lengths, None, DEFAULT_TOKEN_BUDGET)
        engine.compile_programs(None, [_program(batch) for batch in plan])
        shapes += [(b.rows, b.length) for b in plan]
    assert engine.compile_count == 1 and shapes == [(1, 480)] * 4


def test_budget_caps_batch_size_only_where_it_is_exceeded():
    """On CPU (the engine's setting) batch_size=32 keeps 32 rows up to 128 tokens and takes the budget's rows
    beyond; without the setting (accelerators) batch_size rows at every length."""
    assert [rows_for_length(n, 32, 4096, budget_caps_batch_size=True) for n in (32, 128, 160, 256, 512)] == [
        32,
        32,
        24,
        16,
        8,
    ]
    assert {rows_for_length(n, 32, 4096) for n in (32, 128, 512)} == {32}
    assert rows_for_length(512, 5, 4096, budget_caps_batch_size=True) == 5  # within the budget: as asked
    assert rows_for_length(512, 32, 4096, multiple=3, budget_caps_batch_size=True) == 9
    plan = plan_batches([500] * 20 + [40] * 40, 512, batch_size=32, budget_caps_batch_size=True)
    assert max(b.rows for b in plan if b.length == 512) == 8 and all(len(b.indices) <= 32 for b in plan)
    assert {(8, 512), (32, 32)} <= planned_shapes(512, batch_size=32, budget_caps_batch_size=True)
    assert (32, 512) not in planned_shapes(512, batch_size=32, budget_caps_batch_size=True)
