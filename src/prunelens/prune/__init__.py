"""Pruning and quantisation methods, each a registered object (``base``), and the one recipe
builder every command uses (``recipe``). Layer drops live in ``drop`` (chosen by ``importance``),
weight methods in ``weights`` (math in ``sparse`` and ``quant``, and the sequential calibration
pipeline), OWL's layer-wise ratios in ``owl``, training-free repairs in ``repair``."""

from __future__ import annotations

from prunelens.prune.base import (
    REGISTRY,
    Composite,
    Method,
    Modification,
    combine,
    method_for,
    methods,
    register,
    view_of,
)

__all__ = ["REGISTRY", "Composite", "Method", "Modification", "combine", "method_for", "methods", "register",
           "view_of"]
