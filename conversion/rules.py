"""Key rules: templates with named placeholders that map checkpoint keys to flax_ce parameters and back.

A rule pairs a torch module path with a flax_ce module path, e.g.
``encoder.layer.{layer}.attention.self.{proj}`` -> ``layers.{layer}.attention.{proj}``. Both directions
(loading and export) are derived from the same two templates, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping

import numpy as np

from .errors import CheckpointError


class Kind(enum.Enum):
    """What a torch module is; it decides how its `.weight`/`.bias` become Flax parameters."""

    LINEAR = "linear"  # weight [out, in] -> kernel [in, out]
    NORM = "norm"  # weight -> scale
    EMBED = "embed"  # weight -> embedding
    CONV1D = "conv1d"  # weight [out, in/groups, k] -> kernel [k, in/groups, out]
    PARAM = "param"  # a bare parameter: the template names the parameter itself


# torch parameter name -> (flax parameter name, layout change) for each kind.
PARAMS: dict[Kind, dict[str, tuple[str, str]]] = {
    Kind.LINEAR: {"weight": ("kernel", "transpose"), "bias": ("bias", "as_is")},
    Kind.NORM: {"weight": ("scale", "as_is"), "bias": ("bias", "as_is")},
    Kind.EMBED: {"weight": ("embedding", "as_is")},
    Kind.CONV1D: {"weight": ("kernel", "conv1d"), "bias": ("bias", "as_is")},
    Kind.PARAM: {"": ("", "as_is")},
}

# Every layout change is its own inverse (a transpose, conv1d's reversal of axes), so export reuses them.
LAYOUTS = {
    "as_is": lambda a: a,
    "transpose": lambda a: np.ascontiguousarray(a.T),
    "conv1d": lambda a: np.ascontiguousarray(np.transpose(a, (2, 1, 0))),
}

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
LAYER_INDEX = r"\d+"


def _compile(template: str, choices: Mapping[str, tuple[str, ...]]) -> re.Pattern:
    """A full-match regex for `template`: literal text, each `{name}` a named group (digits, or its choices)."""
    parts = _PLACEHOLDER.split(template)
    pattern = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            pattern.append(re.escape(part))
        else:
            values = choices.get(part)
            alternatives = "|".join(map(re.escape, values)) if values else LAYER_INDEX
            pattern.append(f"(?P<{part}>{alternatives})")
    return re.compile("".join(pattern))


@dataclasses.dataclass(frozen=True)
class Rule:
    """A torch module path template and the flax_ce module path it fills.

    Placeholders (`{layer}`) stand for a layer index unless `choices` lists the values one may take;
    both templates must use the same placeholders, which is what makes the rule invertible.
    """

    source: str
    target: str
    kind: Kind
    choices: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        names = set(_PLACEHOLDER.findall(self.source))
        if names != set(_PLACEHOLDER.findall(self.target)):
            raise ValueError(f"rule {self.source!r} -> {self.target!r}: the templates' placeholders differ")
        if not set(self.choices) <= names:
            raise ValueError(
                f"rule {self.source!r}: choices for unknown placeholders {set(self.choices) - names}"
            )
        object.__setattr__(self, "_source", _compile(self.source, self.choices))
        object.__setattr__(self, "_target", _compile(self.target, self.choices))

    def _param_names(self, key: str, pattern: re.Pattern) -> tuple[re.Match | None, str]:
        if self.kind is Kind.PARAM:
            return pattern.fullmatch(key), ""
        module, _, param = key.rpartition(".")
        return pattern.fullmatch(module), param

    def to_flax(self, key: str) -> tuple[str, str] | None:
        """(flax parameter path, layout) for a torch key this rule matches, else None."""
        match, param = self._param_names(key, self._source)
        if match is None or param not in PARAMS[self.kind]:
            return None
        name, layout = PARAMS[self.kind][param]
        target = self.target.format(**match.groupdict())
        return (f"{target}.{name}" if name else target), layout

    def to_torch(self, path: str) -> tuple[str, str] | None:
        """(torch key, layout) for a flax parameter path this rule fills, else None."""
        match, flax_param = self._param_names(path, self._target)
        by_flax_name = {
            name: (torch_name, layout) for torch_name, (name, layout) in PARAMS[self.kind].items()
        }
        if match is None or flax_param not in by_flax_name:
            return None
        torch_param, layout = by_flax_name[flax_param]
        source = self.source.format(**match.groupdict())
        return (f"{source}.{torch_param}" if torch_param else source), layout

    def key_pattern(self) -> str:
        """A regex that fully matches the torch keys this rule reads (its module's parameters)."""
        return self._source.pattern if self.kind is Kind.PARAM else self._source.pattern + r"\.[^.]+"

    def moved_under(self, scope: str) -> Rule:
        """The same rule with its flax_ce path under `scope` (e.g. `encoder.`)."""
        return Rule(self.source, scope + self.target, self.kind, self.choices)


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """A family's rules: `encoder` keys sit under the base-model `prefix` (optional on load, so a bare
    encoder checkpoint loads too), `head` keys beside it; `ignore` lists keys the reference also drops.
    Export writes encoder keys under `prefix`, or bare with `write_prefix=False` (a base model's file)."""

    prefix: str
    encoder: tuple[Rule, ...]
    head: tuple[Rule, ...] = ()
    ignore: tuple[str, ...] = ()
    write_prefix: bool = True

    def to_flax(self, key: str) -> tuple[tuple[str | int, ...], str] | None:
        """Flax parameter path and layout for one normalised torch key, or None if no rule matches."""
        rules = self.encoder if key.startswith(self.prefix) else self.head + self.encoder
        key = key.removeprefix(self.prefix)
        for rule in rules:
            mapped = rule.to_flax(key)
            if mapped is not None:
                return _path(mapped[0]), mapped[1]
        return None

    def to_torch(self, path: tuple[str | int, ...]) -> tuple[str, str]:
        """(full torch key, layout) for one flax parameter path: exactly one rule fills it, and loading that
        key must land on the same path again."""
        dotted = ".".join(str(p) for p in path)
        found = set()
        encoder_prefix = self.prefix if self.write_prefix else ""
        for prefix, rules in ((encoder_prefix, self.encoder), ("", self.head)):
            for rule in rules:
                mapped = rule.to_torch(dotted)
                if mapped is not None and self.to_flax(prefix + mapped[0]) == (path, mapped[1]):
                    found.add((prefix + mapped[0], mapped[1]))
        if len(found) != 1:
            reason = "no rule fills it" if not found else f"several keys fill it: {sorted(found)}"
            raise CheckpointError(f"cannot export parameter {dotted!r}: {reason}")
        return found.pop()

    def ignored(self, key: str) -> bool:
        """True for keys the reference model also drops (buffers, LM heads, unused poolers)."""
        return any(re.fullmatch(pattern, key.removeprefix(self.prefix)) for pattern in self.ignore)

    def headless(self, scope: str, head: tuple[Rule, ...]) -> KeyTable:
        """This table for the family's encoder alone, its parameters under `scope`, followed by other
        modules (`head`): encoder rules that filled the family's own head (BERT's pooler) become ignored
        keys, as a base model's unused pooler is; export writes the encoder keys bare, as the base
        model saves them."""
        kept = tuple(rule.moved_under(scope) for rule in self.encoder if not rule.target.startswith("head."))
        dropped = tuple(rule.key_pattern() for rule in self.encoder if rule.target.startswith("head."))
        return KeyTable(self.prefix, kept, head, self.ignore + dropped, write_prefix=False)


def _path(dotted: str) -> tuple[str | int, ...]:
    return tuple(int(part) if part.isdigit() else part for part in dotted.split("."))


def normalise_key(key: str) -> str:
    """Legacy TF-era LayerNorm names (`gamma`/`beta`) as transformers renames them on load."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key
