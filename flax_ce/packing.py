"""Packed scoring's plan: pairs bin-packed side by side into rows of a bucket length, and their arrays.

Unpacked, a batch pads every pair to its 32-token bucket; packed, short pairs share a row (best fit,
longest first), so a batch carries less padding. The shapes stay a fixed set: a row is one of the
unpacked plan's [rows, length] shapes, and the number of pairs a row may hold (its slots) is fixed by the
length, so each [rows, length] still compiles once. The model sees the rows through
`flax_ce.models.packing.Packing`.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from flax_ce.models.packing import Packing

# A row holds at most length // SLOT_TOKENS pairs: the slot count is part of the compiled shape, so it is
# fixed per length. Real pairs are longer than 8 tokens; rows of shorter ones just hold fewer.
SLOT_TOKENS = 8


def slots_for_length(length: int, batch_size: int | None = None) -> int:
    """Pairs a packed row of `length` tokens may hold (at most batch_size, which bounds a whole batch)."""
    slots = max(1, length // SLOT_TOKENS)
    return slots if batch_size is None else min(slots, batch_size)


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One compiled call over packed rows: `pairs[r, s]` is the input in row r, slot s (-1: empty)."""

    pairs: np.ndarray  # [rows, slots] int64
    length: int

    @property
    def rows(self) -> int:
        return self.pairs.shape[0]

    @property
    def slots(self) -> int:
        return self.pairs.shape[1]


def pack_rows(
    lengths: Sequence[int], capacity: Callable[[int], int], max_pairs: Callable[[int], int]
) -> list[tuple[int, list[int]]]:
    """(tokens used, input indices) of each row: longest first, each input into the open row it fills
    best (least room left), else into a new row of `capacity(its length)` tokens. A row of n tokens holds
    at most `max_pairs(n)` inputs."""
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    rows: list[tuple[int, list[int]]] = []  # (capacity, members)
    used: list[int] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row number), sorted: the best fit is a bisection
    shortest = int(
        lengths.min(initial=1)
    )  # rows with less room than this stay closed, keeping the list short
    for i in np.argsort(-lengths, kind="stable"):
        need = int(lengths[i])
        at = bisect.bisect_left(open_rows, (need, -1))
        if at < len(open_rows) and len(rows[open_rows[at][1]][1]) < max_pairs(used[open_rows[at][1]] + need):
            row = open_rows.pop(at)[1]
        else:
            row = len(rows)
            rows.append((capacity(need), []))
            used.append(0)
        rows[row][1].append(int(i))
        used[row] += need
        if rows[row][0] - used[row] >= shortest:
            bisect.insort(open_rows, (rows[row][0] - used[row], row))
    return [(n, members) for n, (_, members) in zip(used, rows, strict=True)]


def packed_arrays(
    ids: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None, batch: PackedBatch, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Packing]:
    """(input_ids, attention_mask, token_type_ids [rows, length], Packing) int32 for one packed batch."""
    shape = (batch.rows, batch.length)
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    mask, token_types, segments, positions = (np.zeros(shape, dtype=np.int32) for _ in range(4))
    starts = np.zeros((batch.rows, batch.slots), dtype=np.int32)
    for row in range(batch.rows):
        start = 0
        for slot in np.flatnonzero(batch.pairs[row] >= 0):
            seq = ids[batch.pairs[row, slot]]
            n = max(len(seq), 1)  # an empty input keeps one (padding) token, so its slot has a first token
            starts[row, slot] = start
            input_ids[row, start : start + len(seq)] = seq
            mask[row, start : start + n] = 1
            segments[row, start : start + n] = slot + 1
            positions[row, start : start + n] = np.arange(n)
            if types is not None:
                token_types[row, start : start + len(seq)] = types[batch.pairs[row, slot]]
            start += n
    return input_ids, mask, token_types, Packing(segments, positions, starts)
