"""MKL dense layers in CPU scoring programs (flax_ce.cpu_matmul): the same scores as XLA's dot, in use where
asked, never where not, and clear errors when it cannot be had."""

from __future__ import annotations

import platform
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checkpoints import sample_pairs
from flax import nnx
from reference_scores import long_range_pairs, transformers_logits
from support import TOLERANCE

import flax_ce
from flax_ce import CrossEncoder, cpu_matmul

# The test extra installs MKL (pip `mkl`) on x86-64 Linux, where the handler must build and load.
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="MKL wheels are x86-64 Linux only"
)
PAIRS = sample_pairs(24, seed=11) + long_range_pairs(seed=3)


def test_handler_loads():
    assert cpu_matmul.load(), cpu_matmul.reason()


@pytest.mark.parametrize(
    "x_shape, n",
    [((1, 5), 3), ((7, 384), 1152), ((1000, 384), 1536), ((3, 77, 64), 10), ((4096, 1536), 384), ((0, 4), 2)],
)
def test_matmul_matches_float64(x_shape, n):
    """Row counts that do not split evenly over the threads, 3-d inputs, a single row, no rows."""
    assert cpu_matmul.load(), cpu_matmul.reason()
    rng = np.random.default_rng(sum(x_shape) + n)
    x = rng.standard_normal(x_shape, dtype=np.float32)
    w = rng.standard_normal((x_shape[-1], n), dtype=np.float32)
    ours = np.asarray(jax.jit(cpu_matmul.matmul)(x, w))
    expected = x.astype(np.float64) @ w
    assert ours.shape == expected.shape
    # fp32 sums of k products of unit normals: errors grow like sqrt(k) ulps of the result's scale.
    assert np.abs(ours - expected).max(initial=0.0) <= 1e-6 * np.sqrt(x_shape[-1]) * 10


def test_empty_sum_is_zero():
    assert cpu_matmul.load(), cpu_matmul.reason()
    ours = np.asarray(jax.jit(cpu_matmul.matmul)(np.ones((5, 0), np.float32), np.ones((0, 3), np.float32)))
    assert (ours == 0).all()


def test_concurrent_calls_finish():
    """Independent matmuls in one program (XLA may run them at once on its pool) from two Python threads:
    the handler must neither deadlock nor mix up rows."""
    assert cpu_matmul.load(), cpu_matmul.reason()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 256), dtype=np.float32)
    ws = [rng.standard_normal((256, 256), dtype=np.float32) for _ in range(4)]
    program = jax.jit(lambda x, *ws: [cpu_matmul.matmul(x + i, w) for i, w in enumerate(ws)])
    expected = [(x.astype(np.float64) + i) @ w for i, w in enumerate(ws)]
    errors = []

    def run():
        for _ in range(20):
            got = program(x, *ws)
            errors.append(
                max(float(np.abs(np.asarray(g) - e).max()) for g, e in zip(got, expected, strict=True))
            )

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "concurrent MKL matmuls did not finish"
    assert len(errors) == 40 and max(errors) <= 1e-3


def _program_texts(model: CrossEncoder) -> list[str]:
    return [program.as_text() for program in model.engine._programs.values()]


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("family", ["bert", "deberta-v3"])
def test_engine_scores_equal_with_and_without_mkl(family, packing, bert_dir, deberta_dirs, monkeypatch):
    """The engine's programs call MKL under FLAX_CE_CPU_MATMUL=mkl and not under =xla; the logits agree
    with each other and with transformers' (padded rows, truncated pairs, packed rows)."""
    model_dir = bert_dir if family == "bert" else deberta_dirs[family]
    scores = {}
    for mode in ("mkl", "xla"):
        monkeypatch.setenv(cpu_matmul.MODE_ENV, mode)
        model = CrossEncoder(model_dir, max_length=96, packing=packing)
        assert model.engine.cpu_matmul == (mode == "mkl")
        scores[mode] = model.logits(PAIRS, batch_size=16)
        texts = _program_texts(model)
        assert texts and all((cpu_matmul.TARGET in text) == (mode == "mkl") for text in texts)
    assert np.abs(scores["mkl"] - scores["xla"]).max() <= 1e-5
    assert np.abs(scores["mkl"] - transformers_logits(model_dir, PAIRS, 96)).max() <= TOLERANCE


def test_score_uses_mkl_only_under_scope(bert_dir):
    """`flax_ce.score` in a user's own program stays on XLA's dot unless traced under `scope()`."""
    model, tokenizer, _ = flax_ce.load(bert_dir)
    batch = tokenizer(
        [p[0] for p in PAIRS[:8]],
        [p[1] for p in PAIRS[:8]],
        padding="max_length",
        truncation=True,
        max_length=64,
        return_tensors="np",
    )
    args = [jnp.asarray(batch[k], jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")]
    graphdef, state = nnx.split(model)

    def forward():  # a new function each time: JAX would reuse one function's first trace
        return lambda state, *args: flax_ce.score(nnx.merge(graphdef, state), *args)

    plain = jax.jit(forward()).lower(state, *args).compile()
    with cpu_matmul.scope(True):
        fast = jax.jit(forward()).lower(state, *args).compile()
    assert cpu_matmul.TARGET not in plain.as_text() and cpu_matmul.TARGET in fast.as_text()
    assert np.abs(np.asarray(fast(state, *args)) - np.asarray(plain(state, *args))).max() <= 1e-5


def test_mode_is_checked(monkeypatch):
    monkeypatch.setenv(cpu_matmul.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="FLAX_CE_CPU_MATMUL='fastest'"):
        cpu_matmul.wanted()
    monkeypatch.setenv(cpu_matmul.MODE_ENV, "xla")
    assert not cpu_matmul.wanted()


def test_missing_library_named(monkeypatch, tmp_path):
    missing = str(tmp_path / "libmkl_rt.so.2")
    monkeypatch.setenv(cpu_matmul.MKL_ENV, missing)
    with pytest.raises(cpu_matmul.CpuMatmulUnavailable, match=f"FLAX_CE_MKL={missing}: no such file"):
        cpu_matmul.find_mkl()


def test_unavailable_raises_under_mkl_and_falls_back_under_auto(monkeypatch):
    """As if MKL could not be loaded: `mkl` says why, `auto` keeps XLA's dot and the scores."""
    monkeypatch.setattr(cpu_matmul, "_loaded", False)
    monkeypatch.setattr(cpu_matmul, "_reason", "Intel MKL not found: (test)")
    monkeypatch.setattr(cpu_matmul, "intel_cpu", lambda: True)
    monkeypatch.setenv(cpu_matmul.MODE_ENV, "mkl")
    with pytest.raises(cpu_matmul.CpuMatmulUnavailable, match=r"FLAX_CE_CPU_MATMUL=mkl: Intel MKL not found"):
        cpu_matmul.wanted()
    monkeypatch.setenv(cpu_matmul.MODE_ENV, "auto")
    assert not cpu_matmul.wanted()


def test_auto_follows_the_cpu_vendor(monkeypatch):
    """`auto` (the default) uses MKL on Intel CPUs only (measured faster there; AMD keeps XLA's dot)."""
    monkeypatch.delenv(cpu_matmul.MODE_ENV, raising=False)
    monkeypatch.setattr(cpu_matmul, "intel_cpu", lambda: False)
    assert not cpu_matmul.wanted()
    monkeypatch.setattr(cpu_matmul, "intel_cpu", lambda: True)
    assert cpu_matmul.wanted(), cpu_matmul.reason()
