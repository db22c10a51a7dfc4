"""What a pruning method is, and what it makes.

A *method* is one small registered object (``attn``, ``mlp``, ``block``, ``sleb``, ``magnitude``,
``wanda``, ``owl``, ``sparsegpt``, ``rtn``, ``gptq``, ``awq``, ``repair``): its name, family,
one-line help, how it parses its spec, whether it calibrates, and how a sweep turns an amount into
a spec. The CLI help, ``sweep``, ``advise`` and
the recipe builder read the registry; a new method is one registered object plus its math.

A *modification* is what building a method on a model gives: ``label()``, ``to_dict()``,
``validate(n_layers)`` and ``view(adapter)`` (a context manager inside which the model computes as
modified, sharing the dense weights), plus the hooks that saving and the footprint need, so no
caller switches on the modification's type.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter

FAMILIES = ("drop", "prune", "quant", "repair")


class Modification(Protocol):
    #: views are entered in this order (weight patches before module swaps, see ``Composite``)
    view_order: ClassVar[int]

    def label(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...
    def validate(self, n_layers: int) -> None: ...
    def view(self, adapter: Adapter) -> contextlib.AbstractContextManager[None]: ...
    def parts(self) -> list[Modification]: ...


@dataclass(frozen=True)
class Method:
    """One registered method. ``parse`` validates a spec (one-line error) and returns its
    parameters; ``amount_spec`` maps a sweep amount (``4``, ``0.5``, ``2:4``, ``w4g128``) to a spec."""

    name: str
    family: str
    summary: str
    example: str
    calibrated: bool

    def parse(self, spec: str) -> Any:
        raise NotImplementedError

    def amount_spec(self, amount: str) -> str:
        spec = f"{self.name}:{amount}"
        self.parse(spec)
        return spec


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.family not in FAMILIES:
        raise ValueError(f"unknown family {method.family!r}")
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def _load_builtin_methods() -> None:
    # the built-in methods register themselves when their modules are imported
    from prunelens.prune import drop, owl, repair, weights  # noqa: F401


def methods(family: str | None = None) -> list[Method]:
    _load_builtin_methods()
    return [m for m in REGISTRY.values() if family is None or m.family == family]


def method_name(spec: str) -> str:
    """The leading name of a spec: ``attn`` of ``attn:4``, ``attn@3`` (and of a malformed ``attn=4``)."""
    m = re.match(r"\s*([A-Za-z_][\w-]*)", spec)
    return m.group(1) if m else spec.strip()


def method_for(spec: str) -> Method:
    """The registered method a spec names (``attn:4`` → attn), with a one-line error listing
    every method when it names none."""
    _load_builtin_methods()
    name = method_name(spec)
    if name not in REGISTRY:
        listing = "; ".join(f"{f}: {', '.join(m.name for m in methods(f))}" for f in FAMILIES)
        raise PrunelensError(f"unknown method '{name}' in '{spec.strip()}' ({listing})")
    return REGISTRY[name]


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


def view_of(adapter: Adapter, modification: Modification | None) -> contextlib.AbstractContextManager[None]:
    """The modification's view, or the dense model unchanged when there is none."""
    return modification.view(adapter) if modification is not None else contextlib.nullcontext()


def combine(parts: Sequence[Modification]) -> Modification:
    """One modification from several; parts that change nothing are left out."""
    from prunelens.prune.drop import DropPlan

    kept = [q for p in parts for q in p.parts() if not getattr(q, "empty", False)]
    if not kept:
        return DropPlan()
    return kept[0] if len(kept) == 1 else Composite(kept)
