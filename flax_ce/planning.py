"""Which compiled calls score a set of inputs: batches of a small, fixed set of [rows, length] shapes.

Inputs are sorted by length and padded to 32-token buckets; a batch fills the token budget (or holds
batch_size inputs). Every shape costs one compilation the first time, which on CPU takes as long as scoring
several thousand tokens, so a call that would need a shape for a handful of inputs (the last, partial
batch of a bucket; a bucket with two long inputs) weighs that against padding them into a shape it has or
needs anyway: `ShapeCosts` prices both in one unit, and `choose_lengths` merges adjacent buckets, or pads
them to a longer compiled length, where that is cheaper. Shapes already compiled cost nothing; the engine
(`ScoringEngine.plan`) lets the padding its calls have paid go toward compiling new ones, so repeated calls
approach the plan that pads least.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Collection, Sequence

import numpy as np

from flax_ce.packing import PackedBatch, pack_rows, slots_for_length

LENGTH_BUCKET = 32
# Batch sizes the planner may choose, in 1.5x steps: a small, fixed menu keeps the set of compiled shapes
# small, and a partial batch pads at most a third of its rows.
BATCH_MENU = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
DEFAULT_TOKEN_BUDGET = 4096  # best of 2048-16384 on 2 CPU cores (benchmarks/results/cpu.md at 26a75b2)
# Packed scoring puts pairs of up to this many tokens side by side in rows of this length (or max_length);
# a longer pair opens a row of its own bucket, which shorter ones fill. On CPU a token costs about the same
# in rows of 32 to 128 tokens and more beyond (attention grows with the row), so 256-token rows, though
# they removed twice the padding, were no faster on the MiniLM workload (benchmarks/bench_packing.py).
PACK_LENGTH = 128
# With packing=None (auto), a call is packed only if that costs at least this share less.
PACKING_MIN_SAVING = 0.05

# The cost model, in units of one token of a short row. A token of a row of `length` costs
# 1 + length / ATTENTION_TOKENS units (attention grows with the row: on 2 CPU cores MiniLM-L6's [8, 512]
# forward costs 1.9x [32, 128]'s per token, benchmarks/results/forward.md); a call costs BATCH_UNITS more.
ATTENTION_TOKENS = 320
BATCH_UNITS = 256
# A new shape's compilation before any is measured: MiniLM-L6 compiles one in 0.5-1.1 s on 2 CPU cores,
# the time of about 6,000 units. Accelerators score tokens hundreds of times faster and compile about as
# slowly. The engine replaces these with its own measurements after its first call.
CPU_COMPILE_UNITS = 6144
ACCELERATOR_COMPILE_UNITS = 2**18
# Other models scale that CPU price (`cpu_compile_units`): a compilation takes longer the more weight
# matrices the program multiplies by (on 2 CPU cores MiniLM-L6 with 38 about 1.2 s, roberta-base with 74
# about 1.5 s, roberta-large with 146 about 2.4 s: in proportion to COMPILE_BASE_MATRICES + matrices), and
# a unit runs longer the more weights a token is multiplied by (MiniLM-L6: REFERENCE_MATRIX_WEIGHTS).
REFERENCE_MATRICES = 38
REFERENCE_MATRIX_WEIGHTS = 10_764_672
COMPILE_BASE_MATRICES = 63


def cpu_compile_units(matrix_sizes: Sequence[int]) -> float:
    """CPU_COMPILE_UNITS for a model whose weight matrices (embedding tables aside) have these sizes:
    MiniLM-L6's price, times its compile time relative to MiniLM-L6's, over its run time per unit relative
    to MiniLM-L6's (never more than MiniLM-L6's). DeBERTa-v3-xsmall (74 matrices, 21.4M weights) gets
    about 4,200, which its own measured compilations confirm (3,300-4,500 on 2 cores)."""
    if not matrix_sizes:
        return float(CPU_COMPILE_UNITS)
    compile_scale = (COMPILE_BASE_MATRICES + len(matrix_sizes)) / (COMPILE_BASE_MATRICES + REFERENCE_MATRICES)
    run_scale = sum(matrix_sizes) / REFERENCE_MATRIX_WEIGHTS
    # Smaller models than MiniLM-L6 keep its price: their time per token is mostly what does not shrink
    # with the weights (attention over the row, normalisation, the call itself).
    return CPU_COMPILE_UNITS * min(1.0, compile_scale / run_scale)


def bucket_length(longest: int, max_length: int) -> int:
    """Padded sequence length: the next multiple of 32, capped at max_length."""
    return min(-(-max(longest, 1) // LENGTH_BUCKET) * LENGTH_BUCKET, max_length)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def batch_cost(rows: int, length: int) -> float:
    """Estimated cost of one call of shape [rows, length], in units (see ATTENTION_TOKENS)."""
    return rows * length * (1 + length / ATTENTION_TOKENS) + BATCH_UNITS


@dataclasses.dataclass(frozen=True)
class ShapeCosts:
    """What shapes cost a plan: `known` [rows, length] shapes are compiled (free), any other costs
    `compile_units` the first time this plan uses it. The default (nothing known, compiling free) gives
    the plan that pads least."""

    known: Collection[tuple[int, int]] = frozenset()
    compile_units: float = 0.0

    def new_shape_cost(self, shape: tuple[int, int], planned: Collection[tuple[int, int]] = ()) -> float:
        """compile_units, or 0 for a shape that is known or already `planned` by this plan."""
        return 0.0 if shape in self.known or shape in planned else self.compile_units

    def tail_rows(self, count: int, full: int, length: int, multiple: int, planned=()) -> int:
        """Rows of a batch holding the last `count` (< full) inputs at `length`: the menu size that is
        cheapest to run and, if new, to compile (the smallest menu size >= count when compiling is free)."""
        sizes = {min(full, _round_up(b, multiple)) for b in BATCH_MENU if b >= count} | {full}
        return min(
            sorted(sizes), key=lambda r: batch_cost(r, length) + self.new_shape_cost((r, length), planned)
        )

    def group_cost(self, count: int, length: int, full: int, multiple: int) -> float:
        """Cost of `count` inputs at `length` in batches of `full` rows, the last one partial."""
        batches, left = divmod(count, full)
        planned = {(full, length)} if batches else set()
        cost = batches * batch_cost(full, length) + (self.new_shape_cost((full, length)) if batches else 0.0)
        if left:
            rows = self.tail_rows(left, full, length, multiple, planned)
            cost += batch_cost(rows, length) + self.new_shape_cost((rows, length), planned)
        return cost


def choose_lengths(
    counts: dict[int, int], rows_at: Callable[[int], int], costs: ShapeCosts, multiple: int = 1
) -> dict[int, int]:
    """The length each bucket's inputs are padded to: runs of adjacent buckets share the longest one's
    shapes, or a longer length with compiled shapes (`costs.known`), where that costs less than their own
    (fewer compilations against more padding).

    counts: inputs per bucket length; rows_at(length): rows of a full batch. An exact minimum over all
    such groupings and lengths (dynamic programming over the sorted buckets, at most max_length / 32 of
    them, each run trying its own length and every longer compiled one). Without the compiled lengths, a
    small call whose buckets have no compiled shape would compile one even beside a compiled longer shape
    that pads it for less than a compilation costs."""
    lengths = sorted(counts, reverse=True)
    compiled = sorted({length for _, length in costs.known})
    best = [0.0] * (len(lengths) + 1)
    group_end = [len(lengths)] * len(lengths)
    group_length = list(lengths)
    for i in range(len(lengths) - 1, -1, -1):
        best[i], count = math.inf, 0
        targets = [lengths[i]] + [length for length in compiled if length > lengths[i]]
        for j in range(i + 1, len(lengths) + 1):
            count += counts[lengths[j - 1]]
            for target in targets:
                cost = costs.group_cost(count, target, rows_at(target), multiple) + best[j]
                if cost < best[i]:
                    best[i], group_end[i], group_length[i] = cost, j, target
    padded_to, i = {}, 0
    while i < len(lengths):
        padded_to.update((length, group_length[i]) for length in lengths[i : group_end[i]])
        i = group_end[i]
    return padded_to


@dataclasses.dataclass(frozen=True)
class Batch:
    """Which inputs go into one compiled call, and its padded shape [rows, length]."""

    indices: np.ndarray
    rows: int
    length: int


def rows_for_length(
    length: int,
    batch_size: int | None,
    token_budget: int,
    multiple: int = 1,
    budget_caps_batch_size: bool = False,
) -> int:
    """Rows of a full batch at `length`: batch_size if given, else the largest menu size within the budget.

    budget_caps_batch_size (the engine sets it on CPU): where batch_size rows of `length` exceed the token
    budget, the budget's rows instead (fewer: batch_size stays "at most that many pairs per forward"). On
    CPU a [24, 512] batch scored slower per pair than three [8, 512] ones (activations out of cache)."""
    fitting = [b for b in BATCH_MENU if b * length <= token_budget] or [1]
    if batch_size is not None and not (budget_caps_batch_size and batch_size * length > token_budget):
        return _round_up(batch_size, multiple)
    rows = fitting[-1] if batch_size is None else min(batch_size, fitting[-1])
    return _round_up(rows, multiple)


def plan_batches(
    lengths: Sequence[int],
    max_length: int,
    *,
    batch_size: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    multiple: int = 1,
    costs: ShapeCosts = ShapeCosts(),
    budget_caps_batch_size: bool = False,
) -> list[Batch]:
    """Longest-first batches over 32-token buckets (merged where `costs` says so); the last, partial
    batch of a length takes the menu size `costs` finds cheapest."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    buckets = np.minimum(-(-np.maximum(lengths[order], 1) // LENGTH_BUCKET) * LENGTH_BUCKET, max_length)

    def rows_at(length: int) -> int:
        return rows_for_length(length, batch_size, token_budget, multiple, budget_caps_batch_size)

    padded_to = choose_lengths(Counter(buckets.tolist()), rows_at, costs, multiple)
    buckets = np.array([padded_to[int(b)] for b in buckets], dtype=np.int64)
    # A run of shorter buckets may be padded to a compiled length beyond a longer run's: order by padded
    # length again (stably, so each length's inputs stay longest first).
    regroup = np.argsort(-buckets, kind="stable")
    order, buckets = order[regroup], buckets[regroup]
    batches, start = [], 0
    while start < len(order):
        length = int(buckets[start])
        full = rows_at(length)
        # Only inputs padded to this length join this batch, so a short tail is not padded to a long one.
        in_bucket = int(np.searchsorted(-buckets[start:], -length, side="right"))
        take = order[start : start + min(full, in_bucket)]
        batches.append(Batch(take, _batch_rows(len(take), full, length, multiple, costs, batches), length))
        start += len(take)
    return batches


def _batch_rows(count: int, full: int, length: int, multiple: int, costs: ShapeCosts, batches: list) -> int:
    """Rows of a batch of `count` inputs at `length`: full, or for a partial batch the menu size `costs`
    finds cheapest (the shapes of `batches`, planned before it, being free)."""
    if count == full:
        return full
    return costs.tail_rows(count, full, length, multiple, {(b.rows, b.length) for b in batches})


def planned_shapes(
    max_length: int,
    *,
    batch_size: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    multiple: int = 1,
    budget_caps_batch_size: bool = False,
) -> set[tuple[int, int]]:
    """Every (rows, length) shape `plan_batches` and `plan_packed` can produce for this setting: the
    compile set."""
    shapes = set()
    lengths = sorted({bucket_length(n, max_length) for n in range(1, max_length + 1)})
    for length in lengths:
        full = rows_for_length(length, batch_size, token_budget, multiple, budget_caps_batch_size)
        shapes.add((full, length))
        shapes.update(
            (min(full, _round_up(b, multiple)), length) for b in BATCH_MENU if _round_up(b, multiple) < full
        )
    return shapes


def plan_packed(
    lengths: Sequence[int],
    max_length: int,
    *,
    batch_size: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    multiple: int = 1,
    pack_length: int = PACK_LENGTH,
    costs: ShapeCosts = ShapeCosts(),
    budget_caps_batch_size: bool = False,
) -> list[PackedBatch]:
    """Packed rows in batches of one length: as many rows as `plan_batches` would give that length (the
    last batch of a length sized by `costs`); with batch_size, also at most batch_size pairs a batch, as
    sentence-transformers' batch_size means.

    Pairs up to pack_length tokens share rows of pack_length, a longer pair opens a row of its bucket
    (flax_ce.packing.pack_rows); each row is then cut to the bucket of the tokens it holds, so a pair that
    found no partner costs what it costs unpacked, and rows of adjacent lengths may share the longer one
    where `costs` finds that cheaper (`choose_lengths`). A row's slots grow with its length, so a row
    always fits a longer one."""
    pack_length = min(pack_length, max_length)

    def capacity(need: int) -> int:
        return bucket_length(need, max_length) if need > pack_length else pack_length

    def max_pairs(used: int) -> int:
        return slots_for_length(bucket_length(used, max_length), batch_size)

    def rows_at(length: int) -> int:
        return rows_for_length(length, batch_size, token_budget, multiple, budget_caps_batch_size)

    packed = pack_rows(lengths, capacity, max_pairs)
    row_lengths = [bucket_length(used, max_length) for used, _ in packed]
    padded_to = choose_lengths(Counter(row_lengths), rows_at, costs, multiple)
    by_length: dict[int, list[list[int]]] = {}
    for length, (_, members) in zip(row_lengths, packed, strict=True):
        by_length.setdefault(padded_to[length], []).append(members)
    batches: list[PackedBatch] = []
    for length in sorted(by_length, reverse=True):
        full = rows_at(length)
        rows_left, start = by_length[length], 0
        while start < len(rows_left):
            end, pairs = start, 0
            while end - start < full and end < len(rows_left):
                if batch_size is not None and pairs + len(rows_left[end]) > batch_size:
                    break
                pairs += len(rows_left[end])
                end += 1
            rows = _batch_rows(end - start, full, length, multiple, costs, batches)
            grid = np.full((rows, slots_for_length(length, batch_size)), -1, dtype=np.int64)
            for r, members in enumerate(rows_left[start:end]):
                grid[r, : len(members)] = members
            batches.append(PackedBatch(grid, length))
            start = end
    return batches


def padded_tokens(plan: list[Batch] | list[PackedBatch]) -> int:
    """Tokens a plan computes, padding included."""
    return sum(batch.rows * batch.length for batch in plan)


def plan_units(plan: list[Batch] | list[PackedBatch]) -> float:
    """Estimated cost of a plan's calls, in units (`batch_cost`), compilation aside."""
    return sum(batch_cost(batch.rows, batch.length) for batch in plan)


def plan_cost(plan: list[Batch] | list[PackedBatch], costs: ShapeCosts) -> float:
    """Estimated cost of a plan: its calls, and each shape it would compile."""
    shapes = {(batch.rows, batch.length) for batch in plan}
    return plan_units(plan) + sum(costs.new_shape_cost(shape) for shape in shapes)
