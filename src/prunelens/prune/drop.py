"""Inter-layer pruning methods: the drop specs (``attn:4``, ``mlp@3,7``, ``block@14-17``, ``sleb:2``)
and the registered kinds that parse them.

The plan they lead to and its zero-copy view live in ``plan`` (re-exported here), saving and
reloading in ``checkpoint``; which units a count drops is chosen in ``importance``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prunelens.errors import PrunelensError
from prunelens.prune.base import METHODS, Method, Spec, method_name
from prunelens.prune.plan import (  # noqa: F401  (re-exported: a drop's plan and view)
    KINDS,
    LAYER_INDEXING,
    DropPlan,
    SkippedAttention,
    SkippedBlock,
    SkippedMLP,
    install_permanently,
    merge,
    pruned_view,
)


@dataclass(frozen=True)
class DropRequest:
    """One parsed ``--drop`` spec: either explicit layers or a count chosen by importance."""

    kind: str
    count: int | None = None
    layers: tuple[int, ...] | None = None
    #: the importance metric this request is ranked by, over the calibration's (``sleb:N``: ppl)
    metric: str | None = None
    #: the registered method's name when it is not the kind (``sleb``)
    method: str | None = None
    #: never rank the first and last remaining unit (SLEB's reference keeps them)
    keep_ends: bool = False

    def __str__(self) -> str:
        if self.layers is not None:
            return f"{self.method or self.kind}@{','.join(map(str, self.layers))}"
        return f"{self.method or self.kind}:{self.count}"

    def check(self, n_layers: int) -> None:
        """The request fits a model of ``n_layers`` layers (one-line error otherwise)."""
        if self.layers is not None:
            DropPlan(**{self.kind: self.layers}).validate(n_layers)
        elif not 0 <= (self.count or 0) < n_layers:
            raise PrunelensError(f"cannot drop {self.count} {self.kind} units: the model has {n_layers} layers "
                                 f"(need 0 <= N < {n_layers})")


#: one item of a layer list: an index or an inclusive range (``14``, ``14-17``)
LAYER_ITEM = r"\d+(?:-\d+)?"
_SPEC = re.compile(rf"^(attn|mlp|block)(?::(\d+)|@({LAYER_ITEM}(?:,{LAYER_ITEM})*))$")


def _malformed(spec: str) -> PrunelensError:
    return PrunelensError(f"malformed drop spec '{spec}': expected KIND:N or KIND@i,j,... with KIND in "
                          f"{'/'.join(KINDS)} (e.g. attn:4, mlp@3,7, block@14-17), or sleb:N")


def parse_drop(spec: str) -> DropRequest:
    """Parse any registered drop spec: ``attn:4`` (drop the 4 least important), ``mlp@3,7`` (drop
    layers 3 and 7), ``sleb:2``; a one-line error for anything else, weight specs included."""
    name = method_name(spec)
    method = METHODS[name] if name in METHODS else None
    if not isinstance(method, DropKind):
        raise _malformed(spec)
    return method.parse(spec)


def _parse_kind(spec: str) -> DropRequest:
    """``attn:4``, ``mlp@3,7`` or ``block@14-17`` (an inclusive range): one of the plain kinds."""
    m = _SPEC.match(spec.strip().replace(" ", ""))
    if not m:
        raise _malformed(spec)
    kind, count, layers = m.groups()
    if layers is not None:
        idx: tuple[int, ...] = ()
        for item in layers.split(","):
            lo, _, hi = item.partition("-")
            if hi and int(hi) < int(lo):
                raise PrunelensError(f"drop spec '{spec}': range {item} runs backwards")
            idx += tuple(range(int(lo), int(hi or lo) + 1))
        if len(set(idx)) != len(idx):
            raise PrunelensError(f"drop spec '{spec}' repeats a layer index")
        return DropRequest(kind, layers=tuple(sorted(idx)))
    return DropRequest(kind, count=int(count))


@dataclass(frozen=True)
class DropKind(Method):
    """A registered structural kind: its units are whole sublayers (``attn``, ``mlp``) or blocks,
    chosen by count (ranked by importance on calibration text) or by index."""

    def parse(self, spec: str) -> DropRequest:
        return _parse_kind(spec)

    def amount_step(self, amount: str) -> Spec:
        """A sweep amount is a number of units, ranked on the calibration text, or fixed layers
        ``@23-26`` / ``@3;7`` (``;`` because ``,`` separates amounts), so a sweep can hold the
        layers still while something else, such as the calibration of a repair, changes."""
        if amount.startswith("@"):
            return self.step(f"{self.name}@{amount[1:].replace(';', ',')}")
        if not amount.isdigit():
            raise PrunelensError(f"amount '{amount}' for {self.name} drops must be a whole number of layers "
                                 f"or fixed layers such as @23-26")
        return super().amount_step(amount)

    @property
    def unit(self) -> str:
        """The kind of unit it removes (``attn``, ``mlp`` or ``block``)."""
        return self.name


def _kind(name: str, what: str) -> DropKind:
    return DropKind(name, "drop", f"drop {what}: KIND:N least important, KIND@i,j or KIND@i-j", f"{name}:2", True)


# registered lazily by name in ``base.METHODS``
ATTN, MLP, BLOCK = _kind("attn", "attention sublayers"), _kind("mlp", "MLP sublayers"), _kind("block", "whole blocks")


@dataclass(frozen=True)
class SlebKind(DropKind):
    """SLEB (Song et al. 2024): whole blocks removed one at a time, each time the block whose removal
    leaves the lowest perplexity on the calibration text; as in the reference code, the first and
    last remaining blocks are never candidates. ``block:N`` with ``--importance ppl`` (which ranks
    every block), named so that sweeps and ``advise`` can set it beside one-shot cosine."""

    def parse(self, spec: str) -> DropRequest:
        m = re.match(r"^sleb:(\d+)$", spec.strip().replace(" ", ""))
        if not m:
            raise PrunelensError(f"malformed SLEB spec '{spec}': expected sleb:N (N blocks removed by "
                                 "calibration perplexity, e.g. sleb:2)")
        return DropRequest("block", count=int(m.group(1)), metric="ppl", method="sleb", keep_ends=True)

    @property
    def unit(self) -> str:
        return "block"


SLEB = SlebKind("sleb", "drop", "SLEB: N blocks removed one at a time by calibration perplexity", "sleb:2", True)
