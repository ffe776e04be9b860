"""The key tables run backwards: flax_ce parameters -> a transformers PyTorch state dict."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from .errors import CheckpointError
from .tables import LAYOUTS, PARAMS, TABLES, KeyTable, Kind, Rule

# Torch modules of `*ForSequenceClassification` that sit beside the base model rather than under its
# prefix (`bert.`, `roberta.`, ...). BERT's pooler is part of `BertModel`, DeBERTa's is not.
HEAD_MODULES = {
    "bert": r"classifier",
    "roberta": r"classifier\..+",
    "electra": r"classifier\..+",
    "deberta": r"classifier|pooler\..+",
    "deberta-v2": r"classifier|pooler\..+",
}
# Every layout change (transpose, conv1d's axis reversal) is its own inverse.
INVERSE_LAYOUTS = LAYOUTS


def _target_pattern(target: str) -> str:
    """`layers.{1}.attention.{2}` -> a regex with one named group (`g1`, `g2`) per placeholder."""
    parts = re.split(r"\{(\d+)\}", target)
    return "".join(rf"(?P<g{part}>[^.]+)" if i % 2 else re.escape(part) for i, part in enumerate(parts))


def _closing_paren(pattern: str, start: int) -> int:
    depth = 0
    i = start
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        depth += {"(": 1, ")": -1}.get(pattern[i], 0)
        if depth == 0:
            return i
        i += 1
    raise ValueError(f"unbalanced parentheses in {pattern!r}")


def _fill_groups(source: str, values: Mapping[int, str]) -> str | None:
    """The literal key a source regex matches when its capturing groups take `values`, or None.

    Only regexes that are literal text plus capturing groups can be filled; a group inside a group
    is filled as part of its outer one.
    """
    out, i, group = [], 0, 0
    while i < len(source):
        char = source[i]
        if char == "\\":
            if source[i + 1] != ".":
                return None
            out.append(".")
            i += 2
        elif char == "(":
            if source[i + 1 : i + 2] == "?":
                return None
            end = _closing_paren(source, i)
            group += 1
            if group not in values:
                return None
            out.append(values[group])
            group += source[i + 1 : end].count("(")  # nested groups are covered by this value
            i = end + 1
        elif char in ".*+?|[]{}^$)":
            return None
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _invert_rule(rule: Rule, path: tuple[str | int, ...]) -> str | None:
    """The torch key (without the base prefix) that `rule` would map onto `path`, if any."""
    dotted = ".".join(str(p) for p in path)
    if rule.kind is Kind.PARAM:
        module, torch_param = dotted, None
    else:
        module, _, flax_param = dotted.rpartition(".")
        by_flax_name = {name: torch_name for torch_name, (name, _) in PARAMS[rule.kind].items()}
        torch_param = by_flax_name.get(flax_param)
        if torch_param is None:
            return None
    match = re.fullmatch(_target_pattern(rule.target), module)
    if match is None:
        return None
    source = _fill_groups(rule.source, {int(k[1:]): v for k, v in match.groupdict().items()})
    if source is None:
        return None
    return source if torch_param is None else f"{source}.{torch_param}"


def torch_key(table: KeyTable, path: tuple[str | int, ...]) -> tuple[str, str]:
    """(torch key without the base prefix, layout) for one flax parameter path.

    Candidates come from inverting each rule; only a key that the forward table maps back onto the
    same path counts, so export and loading cannot disagree.
    """
    found = set()
    for rule in table.rules:
        key = _invert_rule(rule, path)
        if key is None:
            continue
        mapped = table.map_key(key)
        if mapped is not None and mapped[0] == path:
            found.add((key, mapped[1]))
    if len(found) != 1:
        dotted = ".".join(str(p) for p in path)
        reason = "no rule maps back onto it" if not found else f"several keys map onto it: {sorted(found)}"
        raise CheckpointError(f"cannot export parameter {dotted!r}: {reason}")
    return found.pop()


def torch_state_dict(params: Mapping[tuple, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
    """{flax path: array} -> transformers `*ForSequenceClassification` state dict (fp32, torch layouts)."""
    table = TABLES[model_type]
    head = HEAD_MODULES[model_type]
    tensors: dict[str, np.ndarray] = {}
    for path, array in params.items():
        key, layout = torch_key(table, path)
        module = key.rpartition(".")[0]
        full_key = key if re.fullmatch(head, module) else table.prefix + key
        tensors[full_key] = np.ascontiguousarray(INVERSE_LAYOUTS[layout](np.asarray(array, dtype=np.float32)))
    return tensors
