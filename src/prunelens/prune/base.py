"""What a pruning method is, and what it makes.

A *method* is one small registered object (``attn``, ``mlp``, ``block``, ``sleb``, ``magnitude``,
``wanda``, ``owl``, ``sparsegpt``, ``rtn``, ``gptq``, ``awq``, ``repair``): its name, family,
one-line help, how it parses its spec (into a ``Spec``), whether it calibrates, and how a sweep
turns an amount into a spec. The CLI help, ``sweep``, ``advise`` and the recipe builder read the
registry (``METHODS``, a ``prunelens.registry.Registry``); a new method is one object plus its math,
added with ``register`` or as a lazy ``"module:attribute"`` entry.

A *modification* is what building a method on a model gives: ``label()``, ``to_dict()``,
``validate(n_layers)`` and ``view(adapter)`` (a context manager inside which the model computes as
modified, sharing the dense weights), plus the hooks that saving and the footprint need, so no
caller switches on the modification's type.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter
from prunelens.model.views import Modification, view_of  # noqa: F401  (re-exported: the protocol lives in model)
from prunelens.prune.plan import DropPlan
from prunelens.registry import Registry, did_you_mean

FAMILIES = ("drop", "prune", "quant", "repair")


@dataclass(frozen=True)
class Method:
    """One registered method. ``parse`` validates a spec (one-line error) and returns its
    parameters; ``amount_step`` maps a sweep amount (``4``, ``0.5``, ``2:4``, ``w4g128``) to a parsed
    spec (``amount_spec`` to its text)."""

    name: str
    family: str
    summary: str
    example: str
    calibrated: bool

    def parse(self, spec: str) -> Any:
        raise NotImplementedError

    def step(self, text: str) -> Spec:
        """``text`` parsed by this method (one-line error when malformed)."""
        return Spec(text, self, self.parse(text))

    def amount_step(self, amount: str) -> Spec:
        """The parsed spec of a sweep amount."""
        return self.step(f"{self.name}:{amount}")

    def amount_spec(self, amount: str) -> str:
        return self.amount_step(amount).text


@dataclass(frozen=True)
class Spec:
    """One parsed step of a recipe: the method it names, what that method's ``parse`` made of it
    (a ``DropRequest``, ``WeightMethod`` or ``RepairSpec``), and its text, kept for labels and JSON.
    Specs compare by their text, as the strings of a recipe did."""

    text: str
    method: Method = field(compare=False, repr=False)
    value: Any = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> Spec:
        """The spec ``text`` names (one-line error for an unknown method or a malformed spec)."""
        return method_for(text).step(text)

    @property
    def family(self) -> str:
        return self.method.family

    def __str__(self) -> str:
        return self.text


#: every method by name, in the order the CLI help and ``advise`` list them. The built-ins are lazy
#: ``"module:attribute"`` entries, so listing names imports nothing and no method module has to be
#: imported here (they import this one); a plug-in adds itself with ``register``.
METHODS: Registry[Method] = Registry("method", lazy={
    "attn": "prunelens.prune.drop:ATTN",
    "mlp": "prunelens.prune.drop:MLP",
    "block": "prunelens.prune.drop:BLOCK",
    "sleb": "prunelens.prune.drop:SLEB",
    "magnitude": "prunelens.prune.weights:MAGNITUDE",
    "wanda": "prunelens.prune.weights:WANDA",
    "sparsegpt": "prunelens.prune.weights:SPARSEGPT",
    "rtn": "prunelens.prune.weights:RTN",
    "gptq": "prunelens.prune.weights:GPTQ",
    "awq": "prunelens.prune.weights:AWQ",
    "owl": "prunelens.prune.owl:OWL",
    "owl-sparsegpt": "prunelens.prune.owl:OWL_SPARSEGPT",
    "repair": "prunelens.prune.repair:REPAIR",
})


def register(method: Method) -> Method:
    """Add a method (a plug-in's); its family must be one of ``FAMILIES``."""
    if method.family not in FAMILIES:
        raise ValueError(f"unknown family {method.family!r}")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS.register(method.name, method)
    return method


def methods(family: str | None = None) -> list[Method]:
    return [m for m in METHODS.values() if family is None or m.family == family]


def method_name(spec: str) -> str:
    """The leading name of a spec: ``attn`` of ``attn:4``, ``attn@3`` (and of a malformed ``attn=4``)."""
    m = re.match(r"\s*([A-Za-z_][\w-]*)", spec)
    return m.group(1) if m else spec.strip()


def method_for(spec: str) -> Method:
    """The registered method a spec names (``attn:4`` → attn), with a one-line error listing
    every method when it names none."""
    name = method_name(spec)
    if name not in METHODS:
        listing = "; ".join(f"{f}: {', '.join(m.name for m in methods(f))}" for f in FAMILIES)
        raise PrunelensError(f"unknown method '{name}' in '{spec.strip()}'{did_you_mean(name, METHODS.names())} "
                             f"({listing})")
    return METHODS[name]


def methods_help() -> str:
    """One line per family, for the CLI help."""
    return "; ".join(f"{f}: " + ", ".join(f"{m.name} ({m.example})" for m in methods(f)) for f in FAMILIES)


class Composite:
    """Several modifications applied together (e.g. layer drops plus weight patches)."""

    view_order: ClassVar[int] = 0

    def __init__(self, parts: Sequence[Modification]):
        self._parts = [q for p in parts for q in p.parts()]

    def parts(self) -> list[Modification]:
        return list(self._parts)

    def label(self) -> str:
        return "+".join(p.label() for p in self._parts) or "dense"

    def validate(self, n_layers: int) -> None:
        for p in self._parts:
            p.validate(n_layers)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label(), "parts": [p.to_dict() for p in self._parts]}
        for p in self._parts:  # layer indices at the top level, as for a plain drop plan
            out.update(getattr(p, "layer_indices", dict)())
        return out

    @contextlib.contextmanager
    def view(self, adapter: Adapter) -> Iterator[None]:
        # Weight patches first: they resolve their layers while every module is still in place;
        # the drop views then swap modules out, and exiting restores modules before weights.
        with contextlib.ExitStack() as stack:
            for p in sorted(self._parts, key=lambda q: q.view_order):
                stack.enter_context(p.view(adapter))
            yield


def combine(parts: Sequence[Modification]) -> Modification:
    """One modification from several; parts that change nothing are left out."""
    kept = [q for p in parts for q in p.parts() if not getattr(q, "empty", False)]
    if not kept:
        return DropPlan()
    return kept[0] if len(kept) == 1 else Composite(kept)
