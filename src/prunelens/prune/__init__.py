"""Pruning methods, all usable as one *modification* of a dense model.

A modification has ``label()``, ``to_dict()``, ``validate(n_layers)`` and ``view(adapter)`` (a
context manager inside which the model computes as modified, sharing the dense weights):
``drop.DropPlan`` (layer dropping, chosen by ``importance``), ``weights.WeightPatch``
(sparsification and quantisation), and ``Composite`` of several.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ..arch import Adapter
from .drop import DropPlan


class Modification(Protocol):
    def label(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...
    def validate(self, n_layers: int) -> None: ...
    def view(self, adapter: Adapter) -> contextlib.AbstractContextManager[None]: ...


class Composite:
    """Several modifications applied together (e.g. layer drops plus a weight patch)."""

    def __init__(self, parts: Sequence[Modification]):
        self.parts = list(parts)

    def label(self) -> str:
        return "+".join(p.label() for p in self.parts) or "dense"

    def validate(self, n_layers: int) -> None:
        for p in self.parts:
            p.validate(n_layers)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label(), "parts": [p.to_dict() for p in self.parts]}
        for p in self.parts:  # layer indices at the top level, as for a plain DropPlan
            if isinstance(p, DropPlan):
                out.update({k: v for k, v in p.to_dict().items() if k in ("attn", "mlp", "block")})
        return out

    @contextlib.contextmanager
    def view(self, adapter: Adapter) -> Iterator[None]:
        # Weight patches first: they resolve their layers while every module is still in place;
        # the drop views then swap modules out, and exiting restores modules before weights.
        with contextlib.ExitStack() as stack:
            for p in sorted(self.parts, key=lambda q: isinstance(q, DropPlan)):
                stack.enter_context(p.view(adapter))
            yield


def view_of(adapter: Adapter, modification: Modification | None) -> contextlib.AbstractContextManager[None]:
    """The modification's view, or the dense model unchanged when there is none."""
    return modification.view(adapter) if modification is not None else contextlib.nullcontext()


def combine(parts: Sequence[Modification]) -> Modification:
    """One modification from several; empty drop plans are left out."""
    kept = [p for p in parts if not (isinstance(p, DropPlan) and p.empty)]
    if not kept:
        return DropPlan()
    return kept[0] if len(kept) == 1 else Composite(kept)
