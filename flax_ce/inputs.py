"""User input to predict/rank: validation naming the offending item; pair files (JSONL, one parser of
pair rows for every command); very long texts cut before tokenizing."""

from __future__ import annotations

import gzip
import json
import math
import sys
from collections.abc import Iterator, Sequence

import numpy as np

SINGLE_PAIR_HINT = (
    "a list whose first item is a string is read as one pair; pass a list of (text_a, text_b) pairs"
)
# Keys of a pair row given as an object, in the order they are tried.
PAIR_KEYS = (
    ("query", "document"),
    ("text_a", "text_b"),
    ("premise", "hypothesis"),
    ("sentence1", "sentence2"),
)
# Texts longer than this many characters per token of max_length are checked for shortening.
LONG_TEXT_CHARS_PER_TOKEN = 8
# Pairs whose truncation would combine more overflow windows than this are shortened first.
MAX_WINDOW_PAIRS = 1024


def is_single_pair(inputs) -> bool:
    """sentence-transformers' rule: a list/tuple whose first item is not itself a list/tuple is one pair."""
    if isinstance(inputs, (list, tuple)):
        return len(inputs) > 0 and not isinstance(inputs[0], (list, tuple, np.ndarray))
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in ("U", "O"):
        return inputs.size > 0 and inputs.ndim < 2
    return True


def check_text(text, where: str) -> str:
    """`text` as a str, or a TypeError/ValueError naming `where` (e.g. "pair 3, text 1", "document 7")."""
    if not isinstance(text, str):
        raise TypeError(f"{where}: expected str, got {type(text).__name__} ({text!r:.60})")
    # Lone surrogates (e.g. from a bad decode) cannot be encoded; the tokenizer would fail without saying where.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{where}: not valid Unicode text ({e.reason} {text[e.start]!r} at character {e.start})"
            ) from None
    return str(text)


def check_pair(pair, where: str) -> tuple[str, str]:
    """One (text_a, text_b) pair from a list, tuple or 1-d string array; errors name `where`."""
    if isinstance(pair, np.ndarray) and pair.ndim == 1 and pair.dtype.kind in ("U", "O"):
        pair = pair.tolist()
    if not isinstance(pair, (list, tuple)):
        raise TypeError(f"{where} must be a list or tuple of two strings, got {type(pair).__name__}")
    if len(pair) != 2:
        raise ValueError(f"{where} must have exactly 2 texts, got {len(pair)}")
    return check_text(pair[0], f"{where}, text 0"), check_text(pair[1], f"{where}, text 1")


def normalise_pairs(inputs) -> tuple[list[tuple[str, str]], bool]:
    """(pairs, was_single) from one pair, a list of pairs or a 2-d string array; raises on anything else."""
    if inputs is None:
        raise TypeError("inputs must be a pair of strings or a list of pairs, got None")
    if isinstance(inputs, str):
        raise TypeError("inputs must be a pair of strings or a list of pairs, got a single string")
    if isinstance(inputs, np.ndarray):
        if inputs.dtype.kind not in ("U", "O"):
            raise TypeError(f"a numpy array of inputs must hold strings, got dtype {inputs.dtype}")
        if inputs.ndim > 2:
            raise ValueError(f"a numpy array of pairs must have shape [N, 2], got {inputs.shape}")
        inputs = inputs.tolist()
    elif isinstance(inputs, (dict, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a pair of strings or a list of pairs, got {type(inputs).__name__}")
    if is_single_pair(inputs):
        try:
            return [check_pair(inputs, "the pair")], True
        except (TypeError, ValueError) as e:
            looks_like_pairs = isinstance(inputs, (list, tuple)) and (
                len(inputs) != 2 or any(isinstance(t, (list, tuple, np.ndarray)) for t in inputs)
            )
            if looks_like_pairs:
                raise type(e)(f"{e} ({SINGLE_PAIR_HINT})") from None
            raise
    return [check_pair(pair, f"pair {i}") for i, pair in enumerate(inputs)], False


def jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for each non-blank line of a JSONL file: "-" is stdin, ".gz" is gunzipped."""
    if path == "-":
        stream = sys.stdin.buffer
    elif path.endswith(".gz"):
        stream = gzip.open(path, "rb")
    else:
        stream = open(path, "rb")  # noqa: SIM115
    with stream:
        for number, line in enumerate(stream, 1):
            if line.strip():
                yield number, line


def parse_json_line(line: bytes | str, where: str):
    """One JSONL row's value; a ValueError naming `where` if it is not valid UTF-8 JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from e


def read_jsonl(path: str) -> list[tuple[str, object]]:
    """(where, value) for each non-blank line of a JSONL file; `where` names the file and line."""
    return [
        (where, parse_json_line(line, where))
        for where, line in ((f"{path}, line {number}", line) for number, line in jsonl_lines(path))
    ]


def pair_from_row(row, where: str) -> tuple[str, str]:
    """A checked pair from a row: [text_a, text_b] or an object with one of the PAIR_KEYS key pairs."""
    if isinstance(row, dict):
        for a, b in PAIR_KEYS:
            if a in row and b in row:
                row = [row[a], row[b]]
                break
        else:
            names = [f"{a}/{b}" for a, b in PAIR_KEYS]
            raise ValueError(f"{where}: an object needs {', '.join(names[:-1])} or {names[-1]}")
    return check_pair(row, where)


def read_pairs_file(path: str) -> list[list[str]]:
    """The pairs of a JSONL file, each checked; errors name the file and line."""
    return [list(pair_from_row(row, where)) for where, row in read_jsonl(path)]


def check_positive(name: str, value, allow_none: bool = False) -> None:
    """Raise for a non-positive (or non-integer) count such as batch_size or top_k."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def shorten_long_texts(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> list[tuple[str, str]]:
    """`pairs` with very long texts cut to prefixes that truncate to exactly the same tokens.

    A fast tokenizer truncating a pair keeps every overflowing window of both texts and merges them
    pairwise, so its memory grows with the product of their lengths: two 250k-character texts at
    max_length 64 exhaust 20 GB (sentence-transformers dies the same way). Longest-first truncation
    keeps at most the budget (max_length minus special tokens) of each text, and which tokens depends
    only on the first `budget` tokens of each text, whether each text is longer than the budget, and
    which text is longer. A cut at a word boundary past twice the budget keeps all three; each cut is
    checked by tokenizing it, and a pair that cannot be cut safely raises a ValueError naming it.
    """
    if not getattr(tokenizer, "is_fast", False):
        return pairs
    threshold = LONG_TEXT_CHARS_PER_TOKEN * max_length
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    if budget < 1:
        return pairs
    shortened = list(pairs)
    for i, (a, b) in enumerate(pairs):
        if a and b and max(len(a), len(b)) > threshold:
            shortened[i] = _shorten_pair(tokenizer, (a, b), budget, f"pair {i}")
    return shortened


def _tokens(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]], list[int | None]]:
    """Token ids, character offsets and word ids of one text, without special tokens or truncation."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return encoded["input_ids"], encoded["offset_mapping"], encoded.word_ids()


def _word_starts(offsets, words, start: int) -> list[int]:
    """Token indices from `start` on where a word begins after the previous token ends: clean cut points."""
    return [
        i
        for i in range(max(start, 1), len(words))
        if words[i] != words[i - 1] and offsets[i][0] >= offsets[i - 1][1]
    ]


def _shorten_pair(tokenizer, pair: tuple[str, str], budget: int, where: str) -> tuple[str, str]:
    full = [_tokens(tokenizer, text) for text in pair]
    lengths = [len(ids) for ids, _, _ in full]
    # Truncation splits each text into windows of about budget / 2 tokens and pairs all of them up.
    if math.prod(-(-n // max(1, budget // 2)) for n in lengths) <= MAX_WINDOW_PAIRS:
        return pair
    keep = 2 * budget + 2
    long = [n > keep + 16 for n in lengths]

    def cut_at(j: int, target: int) -> str:
        return pair[j][: full[j][1][target][0]]

    def attempt(targets: list[int | None]) -> tuple[str, str] | None:
        """The pair cut before token `targets[j]` (None: not cut), if it truncates like the original."""
        cut = [pair[j] if target is None else cut_at(j, target) for j, target in enumerate(targets)]
        ids = [full[j][0] if targets[j] is None else _tokens(tokenizer, cut[j])[0] for j in (0, 1)]
        same_tokens = all(
            ids[j][:budget] == full[j][0][:budget] and (len(ids[j]) > budget) == (lengths[j] > budget)
            for j in (0, 1)
        )
        same_order = np.sign(len(ids[0]) - len(ids[1])) == np.sign(lengths[0] - lengths[1])
        return (cut[0], cut[1]) if same_tokens and same_order else None

    starts = [_word_starts(full[j][1], full[j][2], keep) if long[j] else [] for j in (0, 1)]
    if lengths[0] == lengths[1]:
        # Equal lengths must stay equal: cut both where each has a word start at the same token.
        for target in sorted(set(starts[0]) & set(starts[1]))[:3]:
            result = attempt([target, target])
            if result is not None:
                return result
    else:
        longer, shorter = (0, 1) if lengths[0] > lengths[1] else (1, 0)
        targets: list[int | None] = [None, None]
        shorter_length = lengths[shorter]
        if starts[shorter]:
            targets[shorter] = starts[shorter][0]
            shorter_length = len(_tokens(tokenizer, cut_at(shorter, targets[shorter]))[0])
        # The longer text stays the longer one: cut it 16 tokens past the shorter one's end.
        later = [i for i in starts[longer] if i >= shorter_length + 16]
        targets[longer] = later[0] if later else None
        result = attempt(targets)
        if result is not None:
            return result
    raise ValueError(
        f"{where}: its texts are very long ({lengths[0]} and {lengths[1]} tokens) and could not be "
        "shortened without changing how they truncate; cut them to a few thousand characters"
    )
