"""``advise --calibrate N``: the retention prediction calibrated on a few measured prunings of the
user's own model, on the user's own task where one is given.

The shipped fits transfer across methods of one model, not across models (docs/beyond-the-paper.md
§2b), so for any other model they are only a prior (``selfcal``). Here N of the candidates, spread
over their teacher-forced KL (``selfcal.choose_anchors``), are built and asked a small generative
set with gold answers (the ``Target``: the user's ``generate`` task config, else free-generation
ARC-Easy); the share of the dense model's right answers each keeps updates the prior, and every
candidate is then predicted with an interval. Each measurement is a cell under ``cells`` (dense
first, then one per anchor) so an interrupted calibration resumes; the lost answers of each anchor
are traced (``recovery``) while the model is built anyway.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from prunelens.analyses.cells import CellCache, environment, model_fingerprint
from prunelens.analyses.paired import PairedSetup, paired_questions, paired_target
from prunelens.analyses.predictor import shipped_retention_fits
from prunelens.analyses.recovery import (
    SAMPLES,
    GenItem,
    Target,
    answer,
    calibration_error,
    hits,
    recovery,
)
from prunelens.analyses.selfcal import calibrate, choose_anchors, predict, prior_from_fits, scatter_from_fits
from prunelens.errors import PrunelensError
from prunelens.model.generation import generate_full
from prunelens.model.loading import LoadedModel, cache_dir
from prunelens.model.memory import release_freed_memory
from prunelens.tasks.config import answer_is_right, config_task, generate_turns
from prunelens.tasks.data import sample_indices

BUILTIN_LIMIT = 150
"""Questions of the built-in target asked to the dense model; a small model answers 10–30 % of them
right in free generation, and only those are re-asked of each anchor."""
MIN_RIGHT = 8
"""Fewer right dense answers than this cannot tell one retention from another."""
COVERAGE = 0.8


def builtin_target(lm: LoadedModel, data_dir: str | Path | None, limit: int, seed: int,
                   chat_template: bool = True) -> Target:
    """Free-generation ARC-Easy, asked as ``paired`` asks it (the format the shipped fits were made on)."""
    setup = PairedSetup("arc_easy", "cloze", data_dir or "", limit, seed, 0, 8, chat_template, False)
    target = paired_target(setup, paired_questions("arc_easy", data_dir, limit, seed), lm.tokenizer)
    return replace(target, source="built-in ARC-Easy questions, free generation")


def config_target(path: str | Path, limit: int | None, seed: int, chat_template: bool = True) -> Target:
    """A user's ``generate`` task config as the target: its prompts, shots, extraction and match."""
    task = config_task(path)
    cfg = task.config
    if cfg.kind != "generate":
        raise PrunelensError(f"{path}: a '{cfg.kind}' task config; calibration measures free answers against "
                             "gold ones, so it needs a 'generate' config (prompt and target)")
    rows = cfg.data[1]
    items = tuple(GenItem(i, tuple(generate_turns(cfg, rows[i], i)),
                          functools.partial(answer_is_right, cfg, rows[i], i))
                  for i in sample_indices(len(rows), limit, seed))
    return Target(cfg.name, f"your task config {Path(path).name} (its gold answers, its match)", items,
                  task.max_new_tokens, tuple(cfg.raw.get("until") or ()),
                  chat_template and bool(cfg.raw.get("chat_template", True)),
                  {"config": task.identity(None), "limit": limit, "seed": seed})


def cells_dir(model: str, target: Target, calib: Any) -> Path:
    """Where a calibration's cells live unless ``--cells`` says: under the cache, named by what they
    depend on, so the same command run again resumes without being told."""
    key = json.dumps({"model": model_fingerprint(model), "target": target.identity, "calib": calib}, sort_keys=True,
                     default=str)
    return cache_dir() / "calibration" / hashlib.sha256(key.encode()).hexdigest()[:16]


# --- cost, printed before anything runs ------------------------------------------------------------


def probe(lm: LoadedModel, prompt: Sequence[int], batch: int = 8, tokens: int = 8) -> dict[str, float]:
    """Seconds per decoding step at batch 1 and at ``batch`` on this device, from one short timed run
    of each: what the cost estimate multiplies."""
    out = {}
    for b in (1, batch):
        t = time.perf_counter()
        generate_full(lm, [list(prompt)] * b, tokens, progress=False)
        out[f"step_b{b}"] = (time.perf_counter() - t) / tokens
    return out


def estimate(speed: dict[str, float], n_candidates: int, n_prompts: int, steps: int, decode_repeats: int,
             n_anchors: int, target: Target | None, samples: int, n_right: int | None = None) -> dict[str, Any]:
    """Forward passes and seconds, roughly: per candidate the signals (dense and pruned, free-running
    and teacher-forced, over the prompts in batches of 8) and the timed decoding (batch 1); the
    dense model asked every target question (unless ``n_right`` says it has been), and per anchor
    the ``n_right`` questions it had right (all of them while unknown) re-asked, with k samples of a
    sixth of them; building a pruning is not counted (seconds for drops, minutes for GPTQ on a large
    model)."""
    b8, b1 = speed["step_b8"], speed["step_b1"]
    batches = math.ceil(n_prompts / 8)
    sig_steps = 3 * steps * batches  # dense + pruned free-running, + the teacher-forced pass
    time_steps = 2 * decode_repeats * steps
    per_cand = sig_steps * b8 + time_steps * b1
    passes = n_candidates * (sig_steps + time_steps)
    cal_s = 0.0
    if target is not None and n_anchors:
        dense = 0 if n_right is not None else math.ceil(len(target.items) / 8) * target.max_new_tokens
        q = math.ceil((len(target.items) if n_right is None else n_right) / 8) * target.max_new_tokens
        steps_cal = dense + n_anchors * q * (1 + samples / 6)
        cal_s, passes = steps_cal * b8, passes + int(steps_cal)
    return {"forward_passes": passes, "seconds": n_candidates * per_cand + cal_s, "per_candidate_s": per_cand,
            "calibration_s": cal_s, "speed": speed}


# --- the anchors -----------------------------------------------------------------------------------


def dense_answers(lm: LoadedModel, target: Target, cache: CellCache, batch_size: int,
                  progress: bool) -> dict[str, Any]:
    if cache.has("dense"):
        return cache.load("dense")
    gens = answer(lm, target, target.items, batch_size=batch_size, progress=progress, desc="calibration: dense")
    cell = {"hits": hits(target.items, gens), "texts": [g.text for g in gens], "ids": [list(g.ids) for g in gens],
            "ece": calibration_error(target, lm, None)}
    cache.save("dense", cell)
    return cell


def anchor_cell(lm: LoadedModel, target: Target, spec: str, mod: Any, dense: dict[str, Any], samples: int,
                seed: int, batch_size: int, progress: bool) -> dict[str, Any]:
    """One anchor measured: its hits on the dense model's right answers, examples of what it said
    instead, where the lost answers went, and its multiple-choice ECE where the target has options."""
    right = [i for i, h in enumerate(dense["hits"]) if h]
    items = [target.items[i] for i in right]
    gens = answer(lm, target, items, mod, batch_size=batch_size, progress=progress, desc=f"calibration: {spec}")
    got = hits(items, gens)
    lost = [j for j, h in enumerate(got) if not h]
    kept = [j for j, h in enumerate(got) if h]
    example = (items[kept[0]], dense["texts"][right[kept[0]]]) if kept else None
    rec = recovery(lm, target, mod, [items[j] for j in lost],
                   {items[j].key: dense["ids"][right[j]] for j in lost}, example, samples, seed=seed,
                   batch_size=batch_size)
    return {"spec": spec, "k": int(sum(got)), "n": len(got), "hits": got, "recovery": rec,
            "ece": calibration_error(target, lm, mod),
            "examples": [{"question": items[j].turns[-1]["content"], "dense": dense["texts"][right[j]],
                          "pruned": gens[j].text} for j in lost[:3]]}


def dense_first(lm: LoadedModel, target: Target, cells: Path, identity: dict[str, Any], batch_size: int = 8,
                progress: bool = True) -> tuple[CellCache, dict[str, Any]]:
    """The cells opened and the dense model's answers (measured or resumed), before any candidate is
    built: a target the dense model cannot do is refused before the hour of work, not after."""
    cache = CellCache(cells, "manifest.json", "calibration", identity).open(schema="prunelens.calibration/1")
    dense = dense_answers(lm, target, cache, batch_size, progress)
    n_right = int(sum(dense["hits"]))
    if n_right < MIN_RIGHT:
        raise PrunelensError(f"the dense model answers only {n_right} of {len(target.items)} calibration questions "
                             f"({target.name}) right; at least {MIN_RIGHT} are needed: raise --limit or give a "
                             "task it can do")
    return cache, dense


def calibrated(lm: LoadedModel, rows: list[dict[str, Any]], target: Target | None, n_anchors: int,
               opened: tuple[CellCache, dict[str, Any]] | None, build_mod: Callable[[str], Any],
               samples: int = SAMPLES, seed: int = 0, batch_size: int = 8, progress: bool = True,
               say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the anchors (resuming from the cells ``dense_first`` opened), calibrate, and put a
    ``retention`` on every row (anchors also carry what was measured). Returns the calibration's
    record for the result. With no anchors nothing is measured: the prior alone, its interval as
    wide as the models disagree."""
    fits = {k: v for k, v in shipped_retention_fits().items() if k not in (lm.info.get("preset"), lm.info.get("name"))}
    if not n_anchors or target is None or opened is None:
        return _finish(rows, calibrate([], *prior_from_fits(fits), COVERAGE, scatter_from_fits(fits)), [], fits,
                       {"target": None, "source": "no measurement", "asked": 0, "dense_right": 0,
                        "cells": None, "dense_ece": None})
    cache, dense = opened
    n_right = int(sum(dense["hits"]))
    pool = [i for i, r in enumerate(rows) if not r.get("external")]
    picks = [pool[j] for j in choose_anchors([math.log(max(rows[i]["signals"]["tf_kl"], 1e-6)) for i in pool],
                                              n_anchors)]
    if say is not None:
        say("calibration anchors: " + ", ".join(f"{rows[i]['spec']} (tf KL {rows[i]['signals']['tf_kl']:.3g})"
                                                for i in picks)
            + f" — the (j+½)/{n_anchors} quantiles of the {len(pool)} candidates' KL")
    anchors = []
    for i in picks:
        spec = rows[i]["spec"]
        if not cache.has(f"anchor-{spec}"):
            mod = build_mod(spec)
            cache.save(f"anchor-{spec}", anchor_cell(lm, target, spec, mod, dense, samples, seed, batch_size, progress))
            del mod
            release_freed_memory()
        anchors.append({**cache.load(f"anchor-{spec}"), "tf_kl": rows[i]["signals"]["tf_kl"]})
    return _finish(rows, calibrate(anchors, *prior_from_fits(fits), COVERAGE, scatter_from_fits(fits)), anchors, fits,
                   {"target": target.name, "source": target.source, "asked": len(target.items),
                    "dense_right": n_right, "cells": str(cache.out), "dense_ece": dense.get("ece")})


def _finish(rows: list[dict[str, Any]], cal: dict[str, Any], anchors: list[dict[str, Any]],
            fits: dict[str, Any], about: dict[str, Any]) -> dict[str, Any]:
    measured = {a["spec"]: a for a in anchors}
    for r in rows:
        p = predict(cal, r["signals"]["tf_kl"])
        r["retention"] = {"predicted": p["predicted"], "low": p["low"], "high": p["high"],
                          "outside": p["outside"], "outside_fitted_range": p["outside"] > 0}
        if r["spec"] in measured:
            a = measured[r["spec"]]
            r["retention"].update(measured=a["k"] / a["n"], k=a["k"], n=a["n"])
    return {**about, "model": cal["model"], "weights": cal["weights"], "coverage": COVERAGE, "fit": cal,
            "prior_from": sorted(fits),
            "anchors": [{k: a[k] for k in ("spec", "tf_kl", "k", "n", "recovery", "ece", "examples")} for a in anchors]}


def identity_of(model: str, target: Target, calib: Any, samples: int, seed: int) -> dict[str, Any]:
    return {"model": model_fingerprint(model), "target": target.identity, "target_name": target.name,
            "calib": calib, "samples": samples, "seed": seed, "environment": environment()}
