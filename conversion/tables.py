"""Declarative key tables: which torch module of a published checkpoint fills which flax_ce module."""

from __future__ import annotations

import dataclasses
import enum
import re

import numpy as np


class Kind(enum.Enum):
    """What a torch module is; it decides how its `.weight`/`.bias` become Flax parameters."""

    LINEAR = "linear"  # weight [out, in] -> kernel [in, out]
    NORM = "norm"  # weight -> scale
    EMBED = "embed"  # weight -> embedding
    CONV1D = "conv1d"  # weight [out, in/groups, k] -> kernel [k, in/groups, out]
    PARAM = "param"  # a bare parameter, copied as is


# torch parameter name -> (flax parameter name, layout change) for each kind.
PARAMS: dict[Kind, dict[str, tuple[str, str]]] = {
    Kind.LINEAR: {"weight": ("kernel", "transpose"), "bias": ("bias", "as_is")},
    Kind.NORM: {"weight": ("scale", "as_is"), "bias": ("bias", "as_is")},
    Kind.EMBED: {"weight": ("embedding", "as_is")},
    Kind.CONV1D: {"weight": ("kernel", "conv1d"), "bias": ("bias", "as_is")},
}

LAYOUTS = {
    "as_is": lambda a: a,
    "transpose": lambda a: np.ascontiguousarray(a.T),
    "conv1d": lambda a: np.ascontiguousarray(np.transpose(a, (2, 1, 0))),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Torch module path (regex, full match) -> flax module path; `{1}` etc. are the regex groups."""

    source: str
    target: str
    kind: Kind


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """A family's rules, the base-model prefix to strip, and the keys the reference ignores."""

    prefix: str
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()

    def map_key(self, key: str) -> tuple[tuple[str | int, ...], str] | None:
        """Flax parameter path and layout for one normalised torch key, or None if no rule matches."""
        key = key.removeprefix(self.prefix)
        for rule in self.rules:
            if rule.kind is Kind.PARAM:
                match, param = re.fullmatch(rule.source, key), None
            else:
                module, _, param = key.rpartition(".")
                match = re.fullmatch(rule.source, module)
            if match is None:
                continue
            target = rule.target.format(None, *match.groups())
            if rule.kind is Kind.PARAM:
                return _path(target), "as_is"
            if param not in PARAMS[rule.kind]:
                return None
            name, layout = PARAMS[rule.kind][param]
            return _path(f"{target}.{name}"), layout
        return None

    def ignored(self, key: str) -> bool:
        """True for keys the reference model also drops (buffers, LM heads, unused poolers)."""
        return any(re.fullmatch(pattern, key.removeprefix(self.prefix)) for pattern in self.ignore)


def _path(dotted: str) -> tuple[str | int, ...]:
    return tuple(int(part) if part.isdigit() else part for part in dotted.split("."))


def normalise_key(key: str) -> str:
    """Legacy TF-era LayerNorm names (`gamma`/`beta`) as transformers renames them on load."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


L = r"encoder\.layer\.(\d+)"
BERT_ENCODER = (
    Rule(r"embeddings\.word_embeddings", "embeddings.word", Kind.EMBED),
    Rule(r"embeddings\.position_embeddings", "embeddings.position", Kind.EMBED),
    Rule(r"embeddings\.token_type_embeddings", "embeddings.token_type", Kind.EMBED),
    Rule(r"embeddings\.LayerNorm", "embeddings.norm", Kind.NORM),
    Rule(rf"{L}\.attention\.self\.(query|key|value)", "layers.{1}.attention.{2}", Kind.LINEAR),
    Rule(rf"{L}\.attention\.output\.dense", "layers.{1}.attention.output.dense", Kind.LINEAR),
    Rule(rf"{L}\.attention\.output\.LayerNorm", "layers.{1}.attention.output.norm", Kind.NORM),
    Rule(rf"{L}\.intermediate\.dense", "layers.{1}.ffn.intermediate", Kind.LINEAR),
    Rule(rf"{L}\.output\.dense", "layers.{1}.ffn.output.dense", Kind.LINEAR),
    Rule(rf"{L}\.output\.LayerNorm", "layers.{1}.ffn.output.norm", Kind.NORM),
)
DENSE_OUT_PROJ_HEAD = (
    Rule(r"classifier\.dense", "head.dense", Kind.LINEAR),
    Rule(r"classifier\.out_proj", "head.out_proj", Kind.LINEAR),
)
BUFFERS = (r"embeddings\.position_ids", r"embeddings\.token_type_ids")

TABLES: dict[str, KeyTable] = {
    "bert": KeyTable(
        prefix="bert.",
        rules=BERT_ENCODER
        + (
            Rule(r"pooler\.dense", "head.dense", Kind.LINEAR),
            Rule(r"classifier", "head.out_proj", Kind.LINEAR),
        ),
        ignore=BUFFERS + (r"cls\..*",),
    ),
    "roberta": KeyTable(
        prefix="roberta.",
        rules=BERT_ENCODER + DENSE_OUT_PROJ_HEAD,
        ignore=BUFFERS + (r"pooler\..*", r"lm_head\..*"),
    ),
    "electra": KeyTable(
        prefix="electra.",
        rules=BERT_ENCODER
        + DENSE_OUT_PROJ_HEAD
        + (Rule(r"embeddings_project", "embeddings.projection", Kind.LINEAR),),
        ignore=BUFFERS + (r"discriminator_predictions\..*", r"generator_.*"),
    ),
}

# DeBERTa v1 and v2/v3 share embeddings, output blocks, feed-forward and the ContextPooler head.
DEBERTA_SHARED = (
    Rule(r"embeddings\.word_embeddings", "embeddings.word", Kind.EMBED),
    Rule(r"embeddings\.position_embeddings", "embeddings.position", Kind.EMBED),
    Rule(r"embeddings\.token_type_embeddings", "embeddings.token_type", Kind.EMBED),
    Rule(r"embeddings\.embed_proj", "embeddings.projection", Kind.LINEAR),
    Rule(r"embeddings\.LayerNorm", "embeddings.norm", Kind.NORM),
    Rule(r"encoder\.rel_embeddings", "rel_embeddings", Kind.EMBED),
    Rule(rf"{L}\.attention\.output\.dense", "layers.{1}.attention.output.dense", Kind.LINEAR),
    Rule(rf"{L}\.attention\.output\.LayerNorm", "layers.{1}.attention.output.norm", Kind.NORM),
    Rule(rf"{L}\.intermediate\.dense", "layers.{1}.ffn.intermediate", Kind.LINEAR),
    Rule(rf"{L}\.output\.dense", "layers.{1}.ffn.output.dense", Kind.LINEAR),
    Rule(rf"{L}\.output\.LayerNorm", "layers.{1}.ffn.output.norm", Kind.NORM),
    Rule(r"pooler\.dense", "head.dense", Kind.LINEAR),
    Rule(r"classifier", "head.out_proj", Kind.LINEAR),
)
# The published checkpoints keep `embeddings.position_embeddings` even when position_biased_input is
# false; transformers drops it then (`_keys_to_ignore_on_load_unexpected`), as it drops MLM heads.
DEBERTA_IGNORE = (
    r"embeddings\.position_ids",
    r"embeddings\.position_embeddings\.weight",
    r"lm_predictions\..*",
    r"mask_predictions\..*",
    r"cls\..*",
)
TABLES["deberta"] = KeyTable(
    prefix="deberta.",
    rules=DEBERTA_SHARED
    + (
        Rule(rf"{L}\.attention\.self\.in_proj", "layers.{1}.attention.in_proj", Kind.LINEAR),
        Rule(rf"{L}\.attention\.self\.(q_bias|v_bias)", "layers.{1}.attention.{2}", Kind.PARAM),
        Rule(rf"{L}\.attention\.self\.pos_proj", "layers.{1}.attention.pos_key_proj", Kind.LINEAR),
        Rule(rf"{L}\.attention\.self\.pos_q_proj", "layers.{1}.attention.pos_query_proj", Kind.LINEAR),
    ),
    ignore=DEBERTA_IGNORE,
)
TABLES["deberta-v2"] = KeyTable(
    prefix="deberta.",
    rules=DEBERTA_SHARED
    + (
        Rule(rf"{L}\.attention\.self\.(query|key|value)_proj", "layers.{1}.attention.{2}", Kind.LINEAR),
        Rule(rf"{L}\.attention\.self\.(pos_(key|query)_proj)", "layers.{1}.attention.{2}", Kind.LINEAR),
        Rule(r"encoder\.LayerNorm", "rel_norm", Kind.NORM),
        Rule(r"encoder\.conv\.conv", "conv.conv", Kind.CONV1D),
        Rule(r"encoder\.conv\.LayerNorm", "conv.norm", Kind.NORM),
    ),
    ignore=DEBERTA_IGNORE,
)
