"""Property: a mutated config.json or weights file either loads and scores like the reference, or raises
flax_ce's own error naming the file, within a time bound: no hang, no crash, no XLA error."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import struct
import tempfile
import time

import numpy as np
import pytest
from checkpoints import sample_pairs
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flax_ce import CheckpointError, ConfigError, CrossEncoder

MAX_LENGTH = 32
PARITY = 2e-5
TIME_LIMIT = 60.0  # seconds per example: loose enough for a loaded 2-core CI machine, far below a hang
PAIRS = sample_pairs(6)
# The library's own errors; anything else (TypeError, ZeroDivisionError, an XLA error) fails the test.
OWN_ERRORS = (ConfigError, CheckpointError, OSError, ValueError)
SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def examples(default: int) -> int:
    """Example count sized for CI (about 30 s for both tests); FLAX_CE_MUTATION_SCALE=10 searches deeper."""
    return default * int(os.environ.get("FLAX_CE_MUTATION_SCALE", "1"))


class TookTooLong(BaseException):
    """Raised by the alarm; a BaseException, so no `except Exception` in the library can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise TookTooLong(f"more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def reference_logits(model_dir: str) -> np.ndarray | None:
    """transformers' fp32 logits [N, labels] for PAIRS, or None if transformers refuses the checkpoint."""
    import torch
    import transformers

    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001 - any refusal: the caller compares with the unmutated scores
        return None
    batch = tokenizer(
        [a for a, _ in PAIRS], [b for _, b in PAIRS], truncation="longest_first", max_length=MAX_LENGTH,
        padding=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        return model.eval()(**batch).logits.numpy()


@pytest.fixture(scope="module")
def unmutated(bert_dir) -> np.ndarray:
    """The logits [N, 1] of the checkpoint every example mutates."""
    return CrossEncoder(bert_dir, max_length=MAX_LENGTH).logits(PAIRS)


def read_file(model_dir: str, name: str, mode: str = "r"):
    with open(os.path.join(model_dir, name), mode) as f:
        return f.read()


def write_checkpoint(source: str, target: str, config: dict | None = None, weights: bytes | None = None):
    """A copy of `source` in `target` with the given config and weight bytes, other files symlinked."""
    for name in os.listdir(source):
        replaced = {"config.json": config, "model.safetensors": weights}.get(name) is not None
        if not replaced:
            os.symlink(os.path.join(source, name), os.path.join(target, name))
    if config is not None:
        with open(os.path.join(target, "config.json"), "w") as f:
            json.dump(config, f)  # NaN and Infinity as Python's json writes them, which transformers reads
    if weights is not None:
        with open(os.path.join(target, "model.safetensors"), "wb") as f:
            f.write(weights)


def check_loads_with_parity_or_refuses(model_dir: str, unmutated: np.ndarray) -> None:
    """The property; hypothesis' statistics (--hypothesis-show-statistics) count the outcomes."""
    start = time.perf_counter()
    with time_limit(TIME_LIMIT):
        try:
            logits = CrossEncoder(model_dir, max_length=MAX_LENGTH).logits(PAIRS)
        except OWN_ERRORS as e:
            assert model_dir in str(e), f"the error does not name the file: {type(e).__name__}: {e}"
            event(f"refused: {type(e).__name__}")
            return
    assert time.perf_counter() - start < TIME_LIMIT
    reference = reference_logits(model_dir)
    # Where transformers refuses what we accept, nothing we use may have changed.
    expected = unmutated if reference is None else reference
    assert logits.shape == expected.shape and np.isfinite(logits).all()
    assert np.abs(logits - expected).max() <= PARITY
    event("loaded" if reference is not None else "loaded; transformers refuses")


ODD_VALUES = st.one_of(
    st.sampled_from([0, -1, 1, 3, 10**6, 2**31, 10**30, 1e308, -0.5, math.inf, math.nan, 1.5]),
    st.sampled_from(["", "12", "gelu", None, True, False, [], [1, 2], {}, {"0": "x"}]),
    st.integers(min_value=-(2**70), max_value=2**70),
)
CONFIG_EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 10**6), ODD_VALUES),
        st.tuples(st.just("remove"), st.integers(0, 10**6), st.none()),
        st.tuples(st.just("add"), st.text(min_size=1, max_size=12), ODD_VALUES),
    ),
    min_size=1,
    max_size=3,
)


def edit_config(config: dict, edits) -> dict:
    config = dict(config)
    for kind, where, value in edits:
        keys = sorted(config)
        if kind == "add":
            config[where] = value
        elif keys:
            key = keys[where % len(keys)]
            if kind == "set":
                config[key] = value
            else:
                del config[key]
    return config


@settings(SETTINGS, max_examples=examples(25))
@given(edits=CONFIG_EDITS)
def test_mutated_config(bert_dir, unmutated, edits):
    config = json.loads(read_file(bert_dir, "config.json"))
    with tempfile.TemporaryDirectory() as model_dir:
        write_checkpoint(bert_dir, model_dir, config=edit_config(config, edits))
        check_loads_with_parity_or_refuses(model_dir, unmutated)


def header_of(weights: bytes) -> tuple[int, dict]:
    (length,) = struct.unpack("<Q", weights[:8])
    return length, json.loads(weights[8 : 8 + length])


def with_header(weights: bytes, header_text: str) -> bytes:
    length, _ = header_of(weights)
    text = header_text + " " * (-len(header_text) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + weights[8 + length :]


WEIGHT_EDITS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True), st.none()),
    st.tuples(st.just("flip"), st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)),
    # Most flips break the header; one in the metadata leaves the tensors intact: the branch that loads.
    st.tuples(st.just("flip metadata"), st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("duplicate"), st.integers(0, 10**6), st.integers(0, 10**6)),
)


def edit_weights(weights: bytes, edit) -> bytes:
    kind, where, value = edit
    length, header = header_of(weights)
    if kind == "truncate":
        return weights[: int(where * len(weights))]
    if kind.startswith("flip"):  # a byte of the length prefix or of the JSON header, or of its metadata
        start, end = 0, 8 + length
        if kind == "flip metadata":
            start = weights.index(b'"__metadata__"')
            end = weights.index(b"}", start) + 1
        position = start + int(where * (end - start))
        return weights[:position] + bytes([weights[position] ^ value]) + weights[position + 1 :]
    # A name listed twice: with its own entry, or with another tensor's.
    names = sorted(k for k in header if k != "__metadata__")
    name, other = names[where % len(names)], names[value % len(names)]
    text = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(header[other])}" + "}"
    return with_header(weights, text)


@settings(SETTINGS, max_examples=examples(40))
@given(edit=WEIGHT_EDITS)
def test_mutated_weights(bert_dir, unmutated, edit):
    weights = read_file(bert_dir, "model.safetensors", "rb")
    with tempfile.TemporaryDirectory() as model_dir:
        write_checkpoint(bert_dir, model_dir, weights=edit_weights(weights, edit))
        check_loads_with_parity_or_refuses(model_dir, unmutated)


def test_model_type_that_is_not_a_string_is_a_config_error():
    """Found by test_mutated_config: a list model_type crashed with "unhashable type" instead."""
    from flax_ce.config import ConfigError
    from flax_ce.models import config_from_dict

    with pytest.raises(ConfigError, match="model_type"):
        config_from_dict({"model_type": []}, "x/config.json")
