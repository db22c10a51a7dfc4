"""The modification-view protocol: how model plumbing runs a model "as modified" without knowing
what pruning is. A modification (built in ``prune/``) is entered as a context manager around any
forward; inside it the model computes as modified, sharing the dense weights. Keeping the protocol
here lets generation, capture and scoring take a modification while ``model/`` imports nothing of
``prune/``."""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Protocol

from prunelens.model.arch import Adapter


class Modification(Protocol):
    #: views are entered in this order (weight patches before module swaps, see ``prune.base.Composite``)
    view_order: ClassVar[int]

    def label(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...
    def validate(self, n_layers: int) -> None: ...
    def view(self, adapter: Adapter) -> contextlib.AbstractContextManager[None]: ...
    def parts(self) -> list[Modification]: ...


def view_of(adapter: Adapter, modification: Modification | None) -> contextlib.AbstractContextManager[None]:
    """The modification's view, or the dense model unchanged when there is none."""
    return modification.view(adapter) if modification is not None else contextlib.nullcontext()
