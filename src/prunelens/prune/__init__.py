"""Pruning and quantisation methods, each a registered object (``base.METHODS``), and the one recipe
builder every command uses (``recipe``). Layer drops live in ``drop`` (their plan and view in
``plan``, chosen by ``importance``, saved and reloaded by ``checkpoint``), weight methods in
``weights`` (math in ``sparse`` and ``quant``, and the sequential calibration pipeline), OWL's
layer-wise ratios in ``owl``, training-free repairs in ``repair`` (spans in ``repair_spans``, the
fit in ``repair_fit``, the streamed pass in ``repair_stream``)."""

from __future__ import annotations

from prunelens.prune.base import (
    METHODS,
    Composite,
    Method,
    Modification,
    Spec,
    combine,
    method_for,
    methods,
    register,
    view_of,
)

__all__ = ["METHODS", "Composite", "Method", "Modification", "Spec", "combine", "method_for", "methods",
           "register", "view_of"]
