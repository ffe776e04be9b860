"""Parity check: flax_ce against the PyTorch reference (sentence-transformers), with per-layer localisation."""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_ce.cross_encoder import CrossEncoder
from flax_ce.engine import cast_params
from flax_ce.hub import resolve_model_dir
from flax_ce.inputs import check_positive, normalise_pairs, shorten_long_texts
from flax_ce.models.modular import ModularCrossEncoder

# How closely flax_ce must match the fp32 PyTorch reference (max absolute difference).
# fp32: both sides compute in fp32 and differ only in summation order: ~1e-6 on every test checkpoint
# and on the real MiniLM-L6 encoder, so 1e-4 is a hundredfold margin, still far below any real bug.
# bf16: flax_ce runs with bf16 weights and activations (layer norms in fp32). bf16 keeps 8
# significant bits (unit roundoff u = 2**-8 ~ 3.9e-3) and its error is relative, so the tolerance
# scales with the magnitude of the reference values: 16 u * max(1, max |reference|), 16 u = 2**-4.
# Each post-LN layer renormalises, so the error does not compound with depth; measured on the test
# checkpoints and MiniLM-L6 (96 pairs): max |logit diff| / max(1, max |logit|) = 0.9-2.3e-2 (2-6 u).
# A real bug (a wrong weight, mask or activation) moves logits by a large fraction of their scale.
FP32_TOLERANCE = 1e-4
BF16_RELATIVE_TOLERANCE = 2**-4
DTYPES = ("float32", "bfloat16")
# The reference's pairs per forward when no batch_size is given (the layer-by-layer comparison holds
# every stage of a batch in memory).
REFERENCE_BATCH_SIZE = 16
DEFAULT_N = 32

_LONG_TEXT = " ".join(
    f"Paragraph {i}: the committee reviewed the quarterly figures, noted that revenue grew in every "
    "region except the north, and asked for a revised forecast before the next meeting."
    for i in range(40)
)
# Varied on purpose: short and long (past any max_length, so truncation is exercised), empty,
# unicode and emoji, control characters, numbers, code, and NLI-style premise/hypothesis text.
BUILTIN_QUERIES = (
    "how do I sort a list in python",
    "What is the capital of France?",
    "A man is playing a guitar on stage.",
    "naïve café — 東京 🙂 ünïcödé",
    "symptoms of vitamin D deficiency",
    "tab\tseparated\nand multi-line query",
    "",
    "Explain why " + _LONG_TEXT,
)
BUILTIN_DOCUMENTS = (
    "Use sorted(items) for a new list or items.sort() to sort in place.",
    "Paris is the capital and most populous city of France.",
    "Someone is performing music in front of an audience.",
    "東京は日本の首都です。 Tokyo is the capital of Japan 🗾.",
    "Low vitamin D can cause fatigue, bone pain and muscle weakness.",
    "",
    _LONG_TEXT,
    "def f(x):\n    return x ** 2  # squares its argument",
    "The stock closed at $1,234.56 (+2.5%) on 2024-03-01.",
    "A woman is reading a book in a quiet library.",
    "yes",
    "\x07\x1b[31mcontrol\x00chars\u200b and zero-width\ufeff",
)
DOCS_PER_QUERY = 4


def builtin_pairs(n: int = DEFAULT_N) -> list[tuple[str, str]]:
    """The first n of a fixed, varied set of pairs; each query gets several documents (for top-1 agreement)."""
    check_positive("n", n)
    pairs = []
    # Each query's documents are consecutive, so the first n pairs hold rankings of several documents.
    for block in range(len(BUILTIN_DOCUMENTS) // DOCS_PER_QUERY):
        for q, query in enumerate(BUILTIN_QUERIES):
            for j in range(DOCS_PER_QUERY):
                document = BUILTIN_DOCUMENTS[(q * 5 + block * DOCS_PER_QUERY + j) % len(BUILTIN_DOCUMENTS)]
                pairs.append((query, document))
    pairs += [(b, a) for a, b in pairs if (b, a) not in pairs]
    if n > len(pairs):
        raise ValueError(f"the built-in set has {len(pairs)} pairs, n={n} asks for more; pass your own pairs")
    return pairs[:n]


def tolerance_for(dtype: str, scale: float) -> float:
    """Allowed max |diff| for values whose reference magnitude reaches `scale` (see FP32_TOLERANCE)."""
    return FP32_TOLERANCE if dtype == "float32" else BF16_RELATIVE_TOLERANCE * max(1.0, scale)


@dataclasses.dataclass
class LayerDiff:
    """|flax_ce - reference| of one stage's hidden states over real (unpadded) tokens."""

    name: str  # "embeddings", "layer 1" .. "layer N", "head" (logits)
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    # Sub-blocks of an encoder layer: the attention block's and the feed-forward block's outputs.
    attention_max_abs_diff: float | None = None
    feed_forward_max_abs_diff: float | None = None


@dataclasses.dataclass
class ParityReport:
    """What `check` measured; `passed`: scores and logits both within `tolerance`."""

    model: str
    model_type: str
    dtype: str
    n_pairs: int
    num_labels: int
    max_length: int
    reference_max_length: int
    tolerance: float
    max_abs_diff: float  # of scores, as predict() returns them (after the activation)
    mean_abs_diff: float
    max_abs_logit_diff: float
    spearman: float | None  # lowest over label columns; None when undefined (n < 2, constant)
    kendall: float | None
    top1_agreement: float | None  # 1-label: share of queries whose best document agrees
    label_agreement: float | None  # multi-label: share of pairs whose predicted label agrees
    passed: bool
    per_layer: list[LayerDiff] | None = None
    first_divergence: str | None = None  # with per_layer, when not passed

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN/inf become None)."""

        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean(dataclasses.asdict(self))


def _reference_class():
    """sentence-transformers' CrossEncoder class; ImportError with the fix when it is not installed."""
    try:
        import torch  # noqa: F401
        from sentence_transformers import CrossEncoder as STCrossEncoder
    except ImportError as e:
        raise ImportError(
            f"the parity check needs the PyTorch reference ({e}); install it with "
            "`pip install torch sentence-transformers transformers`"
        ) from e
    return STCrossEncoder


def _reference(model_dir: str, max_length: int | None):
    """The reference model on CPU; any failure to load it is an OSError naming the directory."""
    reference_class = _reference_class()
    try:
        return reference_class(model_dir, device="cpu", max_length=max_length)
    except Exception as e:  # noqa: BLE001 - any reference failure is a load error for the caller
        raise OSError(
            f"{model_dir}: the PyTorch reference could not load it ({type(e).__name__}: {e})"
        ) from e


def _precision(dtype: str):
    """fp32 matmuls for an fp32 check (XLA may otherwise use fewer passes on accelerators)."""
    return jax.default_matmul_precision("float32") if dtype == "float32" else contextlib.nullcontext()


def _rank_correlations(ours: np.ndarray, theirs: np.ndarray) -> tuple[float | None, float | None]:
    """Spearman and Kendall over pairs; the lowest over label columns; None when undefined (n < 2, constant)."""
    from scipy import stats

    ours, theirs = ours.reshape(len(ours), -1), theirs.reshape(len(theirs), -1)
    spearman, kendall = [], []
    for column in range(ours.shape[1]):
        a, b = ours[:, column], theirs[:, column]
        if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
            return None, None
        spearman.append(float(stats.spearmanr(a, b).statistic))
        kendall.append(float(stats.kendalltau(a, b).statistic))
    return min(spearman), min(kendall)


def _top1_agreement(pairs: Sequence[tuple[str, str]], ours: np.ndarray, theirs: np.ndarray) -> float:
    """Share of queries (pairs grouped by first text, 2+ documents) whose best document is the same."""
    groups: dict[str, list[int]] = {}
    for i, (query, _) in enumerate(pairs):
        groups.setdefault(query, []).append(i)
    rankings = [index for index in groups.values() if len(index) > 1] or [list(range(len(pairs)))]
    agree = [int(np.argmax(ours[index])) == int(np.argmax(theirs[index])) for index in rankings]
    return float(np.mean(agree))


class _Stage:
    """Running max / sum / count of |ours - reference| and max |reference| over real tokens."""

    def __init__(self):
        self.max = 0.0
        self.total = 0.0
        self.count = 0
        self.scale = 0.0

    def add(self, ours, theirs, mask: np.ndarray) -> None:
        theirs = np.asarray(theirs, dtype=np.float32)[mask.astype(bool)]
        diff = np.abs(np.asarray(ours, dtype=np.float32)[mask.astype(bool)] - theirs)
        if diff.size:
            self.max = max(self.max, float(diff.max()))
            self.total += float(diff.sum())
            self.count += diff.size
            self.scale = max(self.scale, float(np.abs(theirs).max()))

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)


# Where each layout keeps its layers and their two residual blocks: (torch layer list under the base
# model, torch attention block, torch feed-forward block, flax attention block, flax feed-forward block).
SUBBLOCK_LAYOUTS = (
    ("encoder.layer", "attention", "output", "attention", "ffn"),  # BERT, RoBERTa, ELECTRA, DeBERTa
    ("layers", "attn", "mlp", "attn", "mlp"),  # ModernBERT (block outputs before the residual add)
)


def _encoder_layers(torch_model) -> tuple[list, tuple[str, ...]] | tuple[None, None]:
    """The reference's encoder layers and the layout naming their blocks, or (None, None) if unknown."""
    for layout in SUBBLOCK_LAYOUTS:
        found = torch_model.base_model
        for name in layout[0].split("."):
            found = getattr(found, name, None)
        if found is not None:
            return found, layout
    return None, None


def _reference_batch(st, pairs: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
    """The reference tokenizer's int32 arrays for pairs, truncated as sentence-transformers does.

    Padded to a multiple of 32 so the jitted flax_ce side compiles for few shapes.
    """
    encoded = st.tokenizer(
        [a for a, _ in pairs],
        [b for _, b in pairs],
        padding=True,
        pad_to_multiple_of=32 if st.max_length % 32 == 0 else None,
        truncation="longest_first",
        max_length=st.max_length,
        return_tensors="np",
    )
    return {
        k: encoded[k].astype(np.int32)
        for k in ("input_ids", "attention_mask", "token_type_ids")
        if k in encoded
    }


def _reference_scores(st, out, attention_mask: np.ndarray):
    """The reference's scores for one forward of its transformers model: the classifier's logits, or for a
    modular cross-encoder, its later modules run on the last hidden state as sentence-transformers runs them."""
    import torch

    if hasattr(out, "logits"):
        return out.logits
    features = {"token_embeddings": out.last_hidden_state, "attention_mask": torch.as_tensor(attention_mask)}
    for module in list(st)[1:]:
        features = module(features)
    return features["scores"]


def _torch_forward(st, batch: dict[str, np.ndarray], layers: bool):
    """(logits, hidden states, attention-block outputs, feed-forward outputs) from the reference."""
    import torch

    torch_model = st.model
    attention, feed_forward, hooks = [], [], []
    encoder_layers, layout = _encoder_layers(torch_model) if layers else (None, None)
    if encoder_layers is not None:
        for layer in encoder_layers:
            hooks.append(
                getattr(layer, layout[1]).register_forward_hook(
                    lambda module, args, out: attention.append(out[0] if isinstance(out, tuple) else out)
                )
            )
            hooks.append(
                getattr(layer, layout[2]).register_forward_hook(
                    lambda module, args, out: feed_forward.append(out)
                )
            )
    try:
        with torch.inference_mode():
            out = torch_model(
                **{k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()},
                output_hidden_states=layers,
            )
            logits = _reference_scores(st, out, batch["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    hidden = [h.float().numpy() for h in out.hidden_states] if layers else None
    complete = encoder_layers is not None and len(attention) == len(feed_forward) == len(encoder_layers)
    subblocks = (
        ([a.float().numpy() for a in attention], [f.float().numpy() for f in feed_forward])
        if complete
        else (None, None)
    )
    return logits.float().numpy(), hidden, *subblocks


@nnx.jit
def _flax_forward(model: nnx.Module, input_ids, attention_mask, token_type_ids):
    """(logits, hidden states, attention-block outputs, feed-forward outputs) from flax_ce.

    The sub-block lists are None when the model's layers have no blocks named in SUBBLOCK_LAYOUTS.
    """
    # nnx.capture records every submodule's output without changing the model code.
    states, intermediates = nnx.capture(model.encode, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        input_ids, attention_mask, token_type_ids
    )
    # The whole forward's logits: a head may read more than the last hidden states (a pooling mask).
    logits = model(input_ids, attention_mask, token_type_ids)
    recorded = {path: value.get_value() for path, value in intermediates.flat_state()}
    scope = ("encoder",) if isinstance(model, ModularCrossEncoder) else ()
    for *_, attention_name, ffn_name in SUBBLOCK_LAYOUTS:
        layers = range(len(states) - 1)
        attention = [recorded.get((*scope, "layers", i, attention_name, "__call__")) for i in layers]
        feed_forward = [recorded.get((*scope, "layers", i, ffn_name, "__call__")) for i in layers]
        if all(attention) and all(feed_forward):
            return logits, states, [a[0] for a in attention], [f[0] for f in feed_forward]
    return logits, states, None, None


def _compare_forward(ours, st, pairs, batch_size: int, dtype: str, layers: bool):
    """Reference logits [N, C] on its own tokenisation of `pairs`, and with `layers` the per-stage diffs."""
    stages: dict[str, _Stage] = collections.defaultdict(_Stage)
    # The weights in the dtype predict() scores with.
    graphdef, state = nnx.split(ours.model)
    model = nnx.merge(graphdef, cast_params(state, ours.dtype))
    layer_names = [f"layer {i + 1}" for i in range(ours.config.num_hidden_layers)]
    ref_logits = []
    for start in range(0, len(pairs), batch_size):
        batch = _reference_batch(st, pairs[start : start + batch_size])
        logits, hidden, attention, ffn = _torch_forward(st, batch, layers)
        ref_logits.append(logits)
        if not layers:
            continue
        with _precision(dtype):
            # Our model on the reference's token ids, so only the models themselves are compared.
            our_logits, our_hidden, our_attention, our_ffn = _flax_forward(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                batch.get("token_type_ids", np.zeros_like(batch["input_ids"])),
            )
        mask = batch["attention_mask"]
        for name, a, b in zip(["embeddings", *layer_names], our_hidden, hidden, strict=True):
            stages[name].add(a, b, mask)
        if attention is not None and our_attention is not None:
            for i, name in enumerate(layer_names):
                stages[f"{name} attention"].add(our_attention[i], attention[i], mask)
                stages[f"{name} feed-forward"].add(our_ffn[i], ffn[i], mask)
        stages["head"].add(our_logits, logits, np.ones(logits.shape, bool))
    if not layers:
        return np.concatenate(ref_logits), None

    per_layer = []
    for name in ["embeddings", *layer_names, "head"]:
        parts = [stages.get(f"{name} attention"), stages.get(f"{name} feed-forward")]
        scale = max(stage.scale for stage in [stages[name], *parts] if stage is not None)
        per_layer.append(
            LayerDiff(
                name,
                stages[name].max,
                stages[name].mean,
                tolerance_for(dtype, scale),
                *(None if part is None else part.max for part in parts),
            )
        )
    return np.concatenate(ref_logits), per_layer


def _divergence(per_layer: Sequence[LayerDiff]) -> str:
    """The first stage beyond its tolerance, e.g. "embeddings", "layer 3 (attention)", "head"."""
    for layer in per_layer:
        for part, value in (
            ("attention", layer.attention_max_abs_diff),
            ("feed-forward", layer.feed_forward_max_abs_diff),
        ):
            if value is not None and value > layer.tolerance:
                return f"{layer.name} ({part})"
        if layer.max_abs_diff > layer.tolerance:
            return layer.name
    # Every stage agrees on the reference's token ids: the scores differ before or after the model.
    return "none of the model's stages (check max_length, the tokenizer and the score activation)"


def _load_both(model, flax_model, max_length: int | None, dtype: str):
    """(flax_ce CrossEncoder, sentence-transformers reference) for `check`."""
    _reference_class()  # fail early, before loading anything, when the reference is not installed
    model_dir = resolve_model_dir(model)
    if isinstance(flax_model, CrossEncoder):
        ours = flax_model
    else:
        ours = CrossEncoder(
            model_dir if flax_model is None else flax_model,
            max_length=max_length,
            dtype=jnp.float32 if dtype == "float32" else jnp.bfloat16,
        )
    return ours, _reference(model_dir, max_length)


def check(
    model: str | os.PathLike,
    pairs: Sequence[tuple[str, str]] | None = None,
    *,
    n: int | None = None,
    dtype: str = "float32",
    layers: bool = False,
    max_length: int | None = None,
    batch_size: int | None = None,
    flax_model: str | os.PathLike | CrossEncoder | None = None,
) -> ParityReport:
    """Score the same pairs with sentence-transformers (PyTorch, fp32) and flax_ce, and compare.

    `pairs` defaults to `builtin_pairs(n)`; given pairs are cut to the first `n`. `flax_model` replaces
    our side: another directory (e.g. a re-saved copy) or an already loaded `flax_ce.CrossEncoder`.
    With `layers`, hidden states are compared stage by stage to name the first that diverges.
    `batch_size` is the pairs per forward pass on both sides; None: flax_ce plans batches by its token
    budget and the reference runs batches of REFERENCE_BATCH_SIZE.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_positive("n", n, allow_none=True)
    check_positive("batch_size", batch_size, allow_none=True)
    check_positive("max_length", max_length, allow_none=True)
    pairs = builtin_pairs(n or DEFAULT_N) if pairs is None else normalise_pairs(pairs)[0][:n]
    if not pairs:
        raise ValueError("no pairs to compare")
    ours, st = _load_both(model, flax_model, max_length, dtype)
    # The reference tokenizer would need memory ~ the product of two very long texts' lengths; cut
    # them as flax_ce does, to prefixes that truncate to the same tokens.
    reference_pairs = shorten_long_texts(st.tokenizer, pairs, st.max_length)
    reference_batch = batch_size or REFERENCE_BATCH_SIZE

    theirs = np.asarray(
        st.predict(reference_pairs, batch_size=reference_batch, show_progress_bar=False), np.float32
    )
    with _precision(dtype):
        scores = np.asarray(ours.predict(pairs, batch_size=batch_size), np.float32)
        our_logits = ours.logits(pairs, batch_size=batch_size)
    if scores.shape != theirs.shape:
        raise ValueError(f"score shapes differ: flax_ce {scores.shape}, reference {theirs.shape}")
    ref_logits, per_layer = _compare_forward(ours, st, reference_pairs, reference_batch, dtype, layers)
    tolerance = tolerance_for(dtype, float(np.abs(ref_logits).max()))
    diff = np.abs(scores - theirs)
    logit_diff = float(np.abs(our_logits - ref_logits).max())
    passed = bool(diff.max() <= tolerance and logit_diff <= tolerance)
    spearman, kendall = _rank_correlations(scores, theirs)
    multi = scores.ndim == 2
    return ParityReport(
        model=os.fspath(model),
        model_type=ours.config.model_type,
        dtype=dtype,
        n_pairs=len(pairs),
        num_labels=ours.num_labels,
        max_length=ours.max_length,
        reference_max_length=int(st.max_length),
        tolerance=tolerance,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        max_abs_logit_diff=logit_diff,
        spearman=spearman,
        kendall=kendall,
        top1_agreement=None if multi else _top1_agreement(pairs, scores, theirs),
        label_agreement=float(np.mean(scores.argmax(1) == theirs.argmax(1))) if multi else None,
        passed=passed,
        per_layer=per_layer,
        first_divergence=None if per_layer is None or passed else _divergence(per_layer),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`flax-ce parity` options."""
    parser.description = (
        "Compare flax_ce with the PyTorch reference (sentence-transformers) on the same pairs."
    )
    parser.add_argument("model", help="local model directory or Hugging Face hub id")
    parser.add_argument(
        "--pairs",
        metavar="FILE.jsonl",
        help='JSONL: ["a", "b"] or {"query": .., "document": ..} per line; default: a built-in varied set',
    )
    parser.add_argument("--n", type=int, default=None, help=f"use the first N pairs (built-in: {DEFAULT_N})")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="flax_ce compute dtype")
    parser.add_argument("--layers", action="store_true", help="compare hidden states layer by layer")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="pairs per forward pass on both sides "
        f"(default: flax_ce's token budget; the reference {REFERENCE_BATCH_SIZE})",
    )
    parser.add_argument(
        "--flax-model",
        metavar="DIR",
        default=None,
        help="load flax_ce's side from DIR (e.g. a re-saved copy)",
    )


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 within tolerance, 1 not, 2 when the reference is missing (other errors: cli.main)."""
    from flax_ce.inputs import read_pairs_file

    pairs = None
    if args.pairs:
        pairs = [tuple(pair) for pair in read_pairs_file(args.pairs)]
        if not pairs:
            raise ValueError(f"{args.pairs}: no pairs in the file")
    try:
        report = check(
            args.model,
            pairs,
            n=args.n,
            dtype=args.dtype,
            layers=args.layers,
            max_length=args.max_length,
            batch_size=args.batch_size,
            flax_model=args.flax_model,
        )
    except ImportError as e:
        print(f"flax-ce parity: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report))
    return 0 if report.passed else 1


def _number(value: float | None, spec: str = ".2e") -> str:
    return "n/a" if value is None else format(value, spec)


def diverging_stage(first_divergence: str | None) -> str | None:
    """The stage name in a first-divergence text: "layer 12 (attention)" -> "layer 12"."""
    return None if first_divergence is None else first_divergence.partition(" (")[0]


def format_report(report: ParityReport) -> str:
    """A human-readable summary of a ParityReport."""
    lines = [
        f"{report.model} ({report.model_type}, {report.num_labels} label(s)), flax_ce {report.dtype} vs "
        f"PyTorch fp32, {report.n_pairs} pairs, max_length {report.max_length} "
        f"(reference {report.reference_max_length})",
        f"scores: max |diff| {_number(report.max_abs_diff)}, mean {_number(report.mean_abs_diff)}; "
        f"logits: max |diff| {_number(report.max_abs_logit_diff)}; tolerance {report.tolerance:g}",
        f"spearman {_number(report.spearman, '.6f')}, kendall {_number(report.kendall, '.6f')}, "
        + (
            f"predicted-label agreement {_number(report.label_agreement, '.1%')}"
            if report.label_agreement is not None
            else f"top-1 agreement {_number(report.top1_agreement, '.1%')}"
        ),
    ]
    if report.per_layer is not None:
        lines.append("per layer, max |diff| over real tokens (attention / feed-forward sub-blocks):")
        for layer in report.per_layer:
            parts = ""
            if layer.attention_max_abs_diff is not None:
                parts = (
                    f"  (attention {_number(layer.attention_max_abs_diff)}, "
                    f"feed-forward {_number(layer.feed_forward_max_abs_diff)})"
                )
            over = "  > tolerance" if diverging_stage(report.first_divergence) == layer.name else ""
            lines.append(f"  {layer.name:<12} {_number(layer.max_abs_diff)}{parts}{over}")
    lines.append("PASSED" if report.passed else "FAILED")
    if report.first_divergence is not None:
        lines.append(f"first diverging stage: {report.first_divergence}")
    elif not report.passed and report.per_layer is None:
        lines.append("rerun with --layers to locate the first diverging layer")
    return "\n".join(lines)
