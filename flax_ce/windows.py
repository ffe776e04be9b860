"""Long documents: the second text of a pair cut into windows of its own tokens, each scored with the first.

Every window is fed as the tokenizer's own pair template (`[CLS] q [SEP] w [SEP]` for BERT,
`<s> q </s></s> w </s>` for RoBERTa, DeBERTa's own), so a pair that fits is one window whose tokens are
exactly those of `tokenizer(text_a, text_b)`. Windows are ordinary rows for the scoring engine; their
logits are folded back into one score per pair by `aggregate_windows`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

LONG_DOCUMENT_MODES = ("truncate", "max", "first", "mean")
DEFAULT_DOCUMENT_OVERLAP = 64
TOKENIZE_CHUNK = 64  # pairs tokenized together


def check_long_documents(mode, overlap) -> None:
    """Raise a ValueError naming the allowed values for a bad `long_documents` mode or overlap."""
    if not isinstance(mode, str) or mode not in LONG_DOCUMENT_MODES:
        allowed = ", ".join(repr(m) for m in LONG_DOCUMENT_MODES)
        raise ValueError(f"long_documents must be one of {allowed}; got {mode!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise ValueError(
            f"document_overlap must be an integer >= 0 (and smaller than the room a window leaves for "
            f"the second text); got {overlap!r}"
        )


def window_starts(length: int, room: int, overlap: int) -> list[int]:
    """Start token of each window of `room` tokens over a text of `length` tokens.

    Full windows start at 0, room - overlap, 2 * (room - overlap), ...; when the last of them stops
    short of the end, one more window ends exactly at the end. A text that fits is one window.
    """
    if length <= room:
        return [0]
    step = room - overlap
    starts = list(range(0, length - room + 1, step))
    if starts[-1] + room < length:
        starts.append(length - room)
    return starts


@dataclasses.dataclass(frozen=True)
class PairTemplate:
    """Where a tokenizer puts its special tokens around a pair: ids and token types of each part."""

    prefix: tuple[list[int], list[int]]
    middle: tuple[list[int], list[int]]
    suffix: tuple[list[int], list[int]]
    first_type: int
    second_type: int

    def join(self, first: list[int], second: list[int]) -> tuple[list[int], list[int]]:
        """(input_ids, token_type_ids) of the pair template around two token lists (no special tokens)."""
        ids = self.prefix[0] + first + self.middle[0] + second + self.suffix[0]
        types = (
            self.prefix[1]
            + [self.first_type] * len(first)
            + self.middle[1]
            + [self.second_type] * len(second)
            + self.suffix[1]
        )
        return ids, types


def pair_template(tokenizer) -> PairTemplate:
    """The tokenizer's own pair template, read from how its post-processor encodes a probe pair."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"long_documents needs a fast (tokenizers-backed) tokenizer for character offsets; "
            f"{type(tokenizer).__name__} is not one"
        )
    encoded = tokenizer("a", "b", return_token_type_ids=True, verbose=False)
    ids, types, sequences = encoded["input_ids"], encoded["token_type_ids"], encoded.sequence_ids(0)
    # Special tokens go before the first text, between the texts, or after the second.
    parts: list[tuple[list[int], list[int]]] = [([], []), ([], []), ([], [])]
    texts: list[list[int]] = [[], []]
    text_types: dict[int, int] = {}
    for token, token_type, sequence in zip(ids, types, sequences, strict=True):
        if sequence is None:
            parts[len(text_types)][0].append(token)
            parts[len(text_types)][1].append(token_type)
        else:
            text_types.setdefault(sequence, token_type)
            texts[sequence].append(token)
    template = PairTemplate(*parts, text_types.get(0, 0), text_types.get(1, 0))
    if sorted(text_types) != [0, 1] or template.join(*texts) != (ids, types):
        raise ValueError(f"{type(tokenizer).__name__}: cannot read its pair template from {sequences}")
    return template


@dataclasses.dataclass(frozen=True)
class Windows:
    """The rows to score for a list of pairs: [W] token lists, the pair each belongs to, its span."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    owner: list[int]  # [W] index of the pair a window belongs to (ascending)
    spans: list[tuple[int, int]]  # [W] character span of the window in the pair's second text


def _tokens(tokenizer, texts: Sequence[str], offsets: bool):
    return tokenizer(
        list(texts),
        add_special_tokens=False,
        return_offsets_mapping=offsets,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )


def build_windows(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int, overlap: int) -> Windows:
    """Windows of every pair's second text, each joined to the first text by the pair template.

    A pair that fits in max_length is one window, exactly as `tokenizer(a, b)` encodes it. Otherwise the
    first text is cut to max_length // 2 tokens when longer, and the second is cut into windows of the
    room that leaves (see `window_starts`).
    """
    template = pair_template(tokenizer)
    specials = len(template.prefix[0]) + len(template.middle[0]) + len(template.suffix[0])
    windows = Windows([], [], [], [])
    # Tokenizing with offsets costs far more than the windows keep (~0.5 KiB a token): a chunk at a time.
    for chunk in range(0, len(pairs), TOKENIZE_CHUNK):
        part = pairs[chunk : chunk + TOKENIZE_CHUNK]
        firsts = _tokens(tokenizer, [a for a, _ in part], offsets=False)["input_ids"]
        seconds = _tokens(tokenizer, [b for _, b in part], offsets=True)
        for i, (first, second, offsets) in enumerate(
            zip(firsts, seconds["input_ids"], seconds["offset_mapping"], strict=True), start=chunk
        ):
            if len(first) + len(second) + specials > max_length and len(first) > max_length // 2:
                first = first[: max_length // 2]
            room = max_length - len(first) - specials
            if len(second) > room:
                _check_room(i, room, overlap, max_length, len(first), specials)
            for start in window_starts(len(second), room, overlap):
                end = min(start + room, len(second))
                row_ids, row_types = template.join(first, second[start:end])
                windows.input_ids.append(row_ids)
                windows.token_type_ids.append(row_types)
                windows.owner.append(i)
                windows.spans.append((offsets[start][0], offsets[end - 1][1]) if end > start else (0, 0))
    return windows


def _check_room(pair: int, room: int, overlap: int, max_length: int, first: int, specials: int) -> None:
    where = f"max_length {max_length} - {first} first-text tokens - {specials} special tokens"
    if room < 1:
        raise ValueError(f"pair {pair}: no room for the second text ({where} = {room})")
    if overlap >= room:
        raise ValueError(
            f"pair {pair}: document_overlap={overlap} must be smaller than the room for the second text "
            f"({where} = {room}); use 0 <= document_overlap < {room}"
        )


def activate(activation_fn: Callable, logits: np.ndarray) -> np.ndarray:
    """activation_fn over logits [N, C] as float32 numpy."""
    return np.asarray(activation_fn(jnp.asarray(logits)), dtype=np.float32)


def aggregate_windows(
    logits: np.ndarray, owner: Sequence[int], num_pairs: int, mode: str, activation_fn: Callable
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, C], chosen window [N]) from window logits [W, C].

    1-label models aggregate the activated scores (max, first window or mean); multi-label models
    aggregate the logits per label before the activation. The chosen window is the best one for
    1-label "max" (the first on ties), otherwise the first.
    """
    owner = np.asarray(owner)
    first = np.searchsorted(owner, np.arange(num_pairs))
    counts = np.bincount(owner, minlength=num_pairs)
    values = activate(activation_fn, logits) if logits.shape[1] == 1 else logits
    if mode == "first":
        aggregated, chosen = values[first], first
    elif mode == "mean":
        aggregated, chosen = np.add.reduceat(values, first, axis=0) / counts[:, None], first
    elif mode == "max":
        aggregated = np.maximum.reduceat(values, first, axis=0)
        best = [f + int(np.argmax(values[f : f + c, 0])) for f, c in zip(first, counts, strict=True)]
        chosen = np.asarray(best, dtype=np.int64) if logits.shape[1] == 1 else first
    else:
        raise ValueError(f"long_documents={mode!r} has no windows to aggregate")
    if logits.shape[1] != 1:
        aggregated = activate(activation_fn, aggregated)
    return aggregated.astype(np.float32), chosen
