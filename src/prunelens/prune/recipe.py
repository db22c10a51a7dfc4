"""Recipes: the one modification grammar, and the one builder every command, the Python API and
the lm-eval model type use.

A recipe is an ordered list of specs (``attn:4``, ``mlp@3,7``, ``wanda:0.5``, ``sparsegpt:2:4``,
``gptq:w4g128``, ``repair:linear``), written on the command line (repeated flags, or joined by ``+``)
or in a YAML / JSON file (a list of specs, or ``{"recipe": [...]}``), and parsed once when read: a
``Recipe`` holds ``Spec`` objects (method, parsed value, text), so nothing downstream parses a string
again. The composition rule is fixed and documented: **drops first** (all drop specs ranked together,
in order), **then weight methods and repairs in their order**, each calibrated on the model as
modified so far (layers already dropped are neither seen nor touched; a repair fits the drops toward
the dense model). A spec may not appear twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prunelens.data import calibration_ids, read_text_file, read_texts
from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.prune.base import Composite, Modification, Spec, combine, view_of
from prunelens.prune.checkpoint import merged, save_pruned
from prunelens.prune.drop import LAYER_ITEM, DropPlan, DropRequest, parse_drop
from prunelens.prune.importance import METRICS
from prunelens.prune.importance import select_drop as _select_drop
from prunelens.prune.repair import RepairPatch, RepairSpec, fit_repair
from prunelens.prune.repair_check import held_out_check, judge
from prunelens.prune.weights import WeightMethod, WeightPatch, check_skip, parse_weight_method, sparsify

# calibration defaults when none are given: layer ranking needs little text, weight methods more
DROP_CALIB = (8, 128)
WEIGHT_CALIB = (32, 256)


@dataclass(frozen=True)
class Recipe:
    """An ordered list of parsed specs (``Spec``: method, parsed value and text), parsed once when the
    recipe is read; given as strings, they are parsed on construction."""

    steps: tuple[Spec, ...] = ()

    def __post_init__(self) -> None:
        if not all(isinstance(s, Spec) for s in self.steps):
            object.__setattr__(self, "steps", tuple(s if isinstance(s, Spec) else Spec.parse(s) for s in self.steps))

    @classmethod
    def parse(cls, *items: str | Spec | Sequence[str | Spec]) -> Recipe:
        """Specs from strings (each may join several with ``+``), parsed specs (kept as they are) or
        lists of either; a string naming an existing .yaml/.yml/.json file is read as a recipe file."""
        given: list[str | Spec] = []
        for item in items:
            for s in ([item] if isinstance(item, str | Spec) else list(item)):
                if isinstance(s, Spec):
                    given.append(s)
                elif is_recipe_file(s):
                    given.extend(read_recipe_file(s).steps)
                else:
                    given.extend(p.strip() for p in s.split("+") if p.strip())
        steps: list[Spec] = []
        seen: set[str] = set()
        for s in given:
            step = s if isinstance(s, Spec) else Spec.parse(s)  # one-line error for a malformed spec
            key = step.text.replace(" ", "")
            if key in seen:
                raise PrunelensError(f"'{step.text}' appears twice in the recipe")
            seen.add(key)
            steps.append(step)
        return cls(tuple(steps))

    @property
    def specs(self) -> tuple[str, ...]:
        """The specs' texts."""
        return tuple(s.text for s in self.steps)

    @property
    def drops(self) -> list[DropRequest]:
        return [s.value for s in self.steps if s.family == "drop"]

    @property
    def weight_steps(self) -> list[Spec]:
        """The weight methods and repairs, in order."""
        return [s for s in self.steps if s.family != "drop"]

    @property
    def weight_specs(self) -> list[str]:
        return [s.text for s in self.weight_steps]

    def label(self) -> str:
        return "+".join(self.specs) or "dense"

    def check(self, n_layers: int) -> None:
        """The drops fit a model of ``n_layers`` layers (checked before any work or output)."""
        for r in self.drops:
            r.check(n_layers)

    def __bool__(self) -> bool:
        return bool(self.steps)


def split_specs(text: str) -> list[str]:
    """Recipes from a comma-separated list. A layer list's commas stay in its spec: a piece that is
    only a layer number or range (``14``, ``14-17``) belongs to the ``KIND@…`` spec before it, since
    no spec is a bare number (``block@1,2,attn:4`` is two recipes)."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if out and "@" in out[-1].rsplit("+", 1)[-1] and re.fullmatch(LAYER_ITEM, piece.split("+", 1)[0]):
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def is_recipe_file(s: str) -> bool:
    """Whether a recipe string names a recipe file (read for its specs) rather than being specs."""
    return s.lower().endswith((".yaml", ".yml", ".json"))


def read_recipe_file(path: str | Path) -> Recipe:
    """A YAML or JSON recipe: a list of specs, or a mapping with a ``recipe`` list."""
    p = Path(path)
    if not p.is_file():
        raise PrunelensError(f"recipe file '{p}' does not exist")
    try:
        text = read_text_file(p)
        if p.suffix.lower() == ".json":
            obj = json.loads(text)
        else:
            import yaml

            obj = yaml.safe_load(text)
    except PrunelensError:
        raise
    except Exception as e:  # json's ValueError, yaml.YAMLError
        raise PrunelensError(f"recipe file '{p}' is not valid: {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict):
        obj = obj.get("recipe")
    if not isinstance(obj, list) or not obj or not all(isinstance(x, str) for x in obj):
        raise PrunelensError(f"recipe file '{p}' must hold a non-empty list of specs (or {{recipe: [...]}})")
    return Recipe.parse(obj)


@dataclass(frozen=True)
class Calibration:
    """Where calibration text comes from and how much of it each use draws; ``None`` sizes take
    the defaults (8 × 128 tokens to rank layers, 32 × 256 for weight methods)."""

    path: str | Path | None = None
    samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    importance: str = "cosine"
    iterative: bool = False
    skip: tuple[str, ...] = ()
    batch_size: int = 4

    def check(self) -> None:
        """Cheap checks before any model is loaded."""
        if self.importance not in METRICS:
            raise PrunelensError(f"unknown importance metric '{self.importance}'; choose from {', '.join(METRICS)}")
        for v, name in ((self.samples, "--calib-samples"), (self.seq_len, "--calib-len")):
            if v is not None and v < 1:
                raise PrunelensError(f"{name} must be at least 1, got {v}")
        if self.path:
            read_texts(self.path, "calibration")

    def ids(self, lm: LoadedModel, defaults: tuple[int, int]):
        n = defaults[0] if self.samples is None else self.samples
        length = defaults[1] if self.seq_len is None else self.seq_len
        return calibration_ids(lm.tokenizer, self.path, n, length, self.seed), self.record(n, length)

    def record(self, n: int, length: int) -> dict[str, Any]:
        return {"source": str(self.path) if self.path else "built-in", "samples": n, "seq_len": length,
                "seed": self.seed}


def build(lm: LoadedModel, recipe: Recipe | str | Sequence[str], calibration: Calibration | None = None,
          progress: bool = True, inplace: bool = False) -> Modification:
    """Build a recipe on ``lm``: drops first, then each weight method calibrated on the model as
    modified so far. ``inplace`` writes new weights into the model (no dense copy; for saving)."""
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.parse(recipe)
    recipe.check(lm.adapter.n_layers)
    cal = calibration or Calibration()
    if cal.skip and not recipe.weight_steps:
        raise PrunelensError("--prune-skip leaves layers alone from weight methods, and the recipe has none")
    check_skip(lm.adapter, cal.skip)  # before any work: a pattern that matches nothing is a mistake
    parts: list[Modification] = []
    if recipe.drops:
        parts.append(select_drop(lm, *recipe.drops, calibration=cal))
    steps = recipe.weight_steps
    # a repair fits toward the dense model, so the weight methods before it must leave it dense
    last_repair = max((k for k, s in enumerate(steps) if s.family == "repair"), default=-1)
    for k, step in enumerate(steps):
        if step.family == "repair":
            parts.append(repair(lm, combine(parts) if parts else None, step.value, calibration=cal, progress=progress))
            continue
        with view_of(lm.adapter, combine(parts) if parts else None):
            parts.append(prune_weights(lm, step.value, calibration=cal, progress=progress,
                                       inplace=inplace and k > last_repair))
    return combine(parts)


def repair(lm: LoadedModel, modification: Modification | None, spec: str | RepairSpec = "repair:linear",
           calibration: Calibration | None = None, progress: bool = True, **kw: Any) -> RepairPatch:
    """Fit a training-free repair (``"repair:linear"``, ``"repair:cosine"``, ``"repair:scale"``,
    ``"repair:bias"``) of the layer drops in ``modification``, toward the dense model; returns a
    ``RepairPatch`` (use ``combine([modification, patch])``). Keywords override ``calibration``."""
    cal = _calibration(calibration, kw)
    n = WEIGHT_CALIB[0] if cal.samples is None else cal.samples
    # a quarter more windows from the same seeded draw (the first n are the same windows as without
    # them, so the fit is unchanged), on which the fitted repair is checked
    ids, record = replace(cal, samples=n + max(1, n // 4)).ids(lm, WEIGHT_CALIB)
    ids, held_out = ids[:n], ids[n:]
    patch = fit_repair(lm.adapter, modification, spec, ids, batch_size=cal.batch_size, progress=progress)
    patch.report["calibration"] = {**record, "samples": n}
    if modification is not None:
        patch.report["held_out_check"] = check = held_out_check(lm.adapter, modification, patch, held_out,
                                                                cal.batch_size)
        judge(patch.label(), check, patch.spec.strict)
    return patch


def select_drop(lm: LoadedModel, *specs: str | DropRequest, calibration: Calibration | None = None,
                **kw: Any) -> DropPlan:
    """A drop plan from specs such as ``"attn:4"`` (the 4 least important) or ``"mlp@3,7"``.

    Counts are ranked by ``calibration.importance`` ('cosine' = LLM-Drop / ShortGPT block
    influence, 'angular' = Gromov et al., 'kl' = greedy next-token KL) on calibration text.
    Keywords (``metric``, ``iterative``, ``calib``, ``calib_samples``, ``calib_len``, ``seed``,
    ``batch_size``) override fields of ``calibration``, for notebook use.
    """
    cal = _calibration(calibration, kw)
    requests = [parse_drop(s) if isinstance(s, str) else s for s in specs]
    ids, record = cal.ids(lm, DROP_CALIB) if any(r.count for r in requests) else (None, None)
    plan = _select_drop(lm, requests, cal.importance, cal.iterative, ids, cal.batch_size)
    if record is not None:
        plan.info["calibration"] = record
    return plan


def prune_weights(lm: LoadedModel, spec: str | WeightMethod, calibration: Calibration | None = None,
                  inplace: bool = False, progress: bool = True, **kw: Any) -> WeightPatch:
    """Sparsify (``"wanda:0.5"``, ``"sparsegpt:2:4"``, ``"magnitude:0.5"``) or fake-quantise
    (``"gptq:w4g128"``, ``"rtn:w8"``) every decoder linear layer; returns a ``WeightPatch``.
    The model stays dense unless ``inplace``. Keywords override fields of ``calibration``."""
    cal = _calibration(calibration, kw)
    method = spec if isinstance(spec, WeightMethod) else parse_weight_method(spec)
    ids, record = cal.ids(lm, WEIGHT_CALIB) if method.method.calibrated else (None, None)
    patch = sparsify(lm.adapter, method, ids, skip=cal.skip, inplace=inplace, progress=progress)
    if record is not None:
        patch.report["calibration"] = record
    return patch


_KW = {"metric": "importance", "calib": "path", "calib_samples": "samples", "calib_len": "seq_len"}


def _calibration(cal: Calibration | None, kw: dict[str, Any]) -> Calibration:
    fields = {_KW.get(k, k): (tuple(v) if k == "skip" else v) for k, v in kw.items()}
    return replace(cal or Calibration(), **fields)


def save_modified(lm: LoadedModel, modification: Modification, out_dir: str | Path) -> Path:
    """Save any modification (layer drops and/or weight patches) as a plain HF checkpoint."""
    patches = [p for p in modification.parts() if not isinstance(p, DropPlan)]
    extra = {"weights": [p.saved_meta() for p in patches]} if patches else None  # type: ignore[attr-defined]
    with merged(lm.adapter, modification) as plan:
        return save_pruned(lm.adapter, plan, out_dir, lm.tokenizer, extra_meta=extra)


def footprint(lm: LoadedModel, modification: Modification) -> dict[str, float]:
    """What a modification saves, comparable across methods: the share of the decoder's linear
    weights removed (dropped or zeroed beyond the dense model's own zeros) and their bits per weight
    (16 for unquantised weights, as they would be stored in bf16). Idealised: unstructured zeros
    only save memory in a sparse format, N:M ones with hardware support. Each part adds its own
    share on top of what the parts before it removed."""
    share, bits = 0.0, 16.0
    for p in modification.parts():
        share, b = p.footprint(lm.adapter, share)  # type: ignore[attr-defined]
        bits = b if b is not None else bits
    return {"removed_share": share, "bits_per_weight": bits, "memory_vs_bf16": (1 - share) * bits / 16}


__all__ = ["Calibration", "Composite", "Recipe", "Spec", "build", "footprint", "is_recipe_file", "prune_weights",
           "read_recipe_file",
           "repair", "save_modified", "select_drop"]
