"""The per-run sections of a trace page: the prompts and both greedy texts, how the modification
chose its layers, and what weight methods did to each module."""

from __future__ import annotations

import json
from typing import Any

from prunelens.render import esc, fmt, num


def _split_common(a: str, b: str) -> int:
    """Length of the shared prefix, backed off to a word start so a split word is shown whole."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    if n < min(len(a), len(b)):
        while n > 0 and a[n - 1].isalnum():
            n -= 1
    return n


def _text_cell(text: str, common: int) -> str:
    """Escaped text; the part after the shared prefix is highlighted."""
    return (f'<td class="text">{esc(text[:common])}'
            + (f'<span class="diff">{esc(text[common:])}</span>' if text[common:] else "") + "</td>")


def prompt_table(result: dict[str, Any]) -> str:
    pp = result.get("per_prompt")
    if not isinstance(pp, list) or not pp:
        return ""
    rows = []
    for i, p in enumerate(pp, 1):
        if not isinstance(p, dict):
            continue
        dense, pruned = str(p.get("dense_text", "")), str(p.get("pruned_text", ""))
        c = _split_common(dense, pruned)
        fd = p.get("first_divergence")
        rows.append(f'<tr><td class="num">{i}</td><td class="text">{esc(p.get("prompt", ""))}</td>'
                    f"{_text_cell(dense, c)}{_text_cell(pruned, c)}"
                    f'<td class="num">{esc("—" if fd is None else fd)}</td></tr>')
    return ('<table class="prompts"><tr><th>#</th><th>prompt</th><th>dense (greedy)</th>'
            "<th>pruned (greedy)</th><th>first divergence</th></tr>" + "".join(rows) + "</table>"
            '<div class="muted">Highlighted: text after the longest common prefix.</div>')


def kv_table(d: dict[str, Any]) -> str:
    rows = []
    for k, v in d.items():
        val = json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)
        rows.append(f'<tr><th>{esc(k)}</th><td class="text">{esc(val)}</td></tr>')
    return f"<table>{''.join(rows)}</table>"


def _layer_key(kv: tuple[str, Any]) -> tuple[bool, int, str]:
    """Numeric layer keys in numeric order (JSON turned them into strings), others after."""
    k = kv[0]
    return (not k.isdigit(), int(k) if k.isdigit() else 0, k)


def _pruning_parts(result: dict[str, Any]) -> list[dict[str, Any]]:
    p = result.get("pruning") or {}
    parts = p.get("parts")
    return [q for q in parts if isinstance(q, dict)] if isinstance(parts, list) else [p]


_WEIGHT_KEYS = ("label", "pattern", "target_sparsity", "zero_frac", "dense_zero_frac",
                "added_frac_of_dense_nonzeros", "nm_violations", "quant", "bits_per_weight", "effective_mb",
                "fp16_mb", "n_modules", "n_weights", "seconds", "calibration", "skip")


def weights_section(result: dict[str, Any]) -> str:
    """Sparsity / quantisation report of weight modifications: overall numbers, then per module."""
    out = []
    for part in _pruning_parts(result):
        if part.get("kind") != "weights":
            continue
        top = {k: part[k] for k in _WEIGHT_KEYS if k in part}
        out.append(kv_table(top))
        layers = part.get("layers")
        if isinstance(layers, list) and layers:
            cols = [c for c in ("module", "numel", "dense_zero_frac", "zero_frac",
                                "added_frac_of_dense_nonzeros", "nm_violations") if c in layers[0]]
            head = "".join(f"<th>{esc(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(
                f"<td>{esc(fmt(r.get(c)) if isinstance(r.get(c), float) else r.get(c))}</td>" for c in cols)
                + "</tr>" for r in layers)
            out.append(f"<details><summary>per module ({len(layers)})</summary><div class=\"scroll\">"
                       f"<table><tr>{head}</tr>{body}</table></div></details>")
    return "".join(out)


def selection_section(result: dict[str, Any]) -> str:
    """Importance metric, order and per-layer scores, dropped layers highlighted."""
    p = result.get("pruning") or {}
    sel = p.get("selection") or next(
        (q.get("selection") for q in _pruning_parts(result) if q.get("selection")), None)
    if not isinstance(sel, dict) or not sel:
        return '<p class="muted">No selection info (layers given explicitly or not recorded).</p>'
    top = {k: v for k, v in sel.items() if k != "scores"}
    parts = [kv_table(top)] if top else []
    scores = sel.get("scores")
    if isinstance(scores, dict):
        for req, info in scores.items():
            if not isinstance(info, dict):
                continue
            kind = str(req).split(":", 1)[0].split("@", 1)[0]
            dropped = {int(i) for i in (p.get(kind) or []) if num(i) is not None}
            head = f"<h4>{esc(req)}</h4>"
            extra = {k: v for k, v in info.items() if k != "scores"}
            if extra:
                pairs = " · ".join(f"{esc(k)}: <b>{esc(v)}</b>" for k, v in extra.items())
                head += f"<div>{pairs}</div>"
            sc = info.get("scores")
            if isinstance(sc, dict) and sc:
                items = sorted(((str(k), num(v)) for k, v in sc.items()), key=_layer_key)
                cls = ['class="num drop"' if k.isdigit() and int(k) in dropped else 'class="num"'
                       for k, _ in items]
                r1 = "".join(f"<td {c}>{esc(k)}</td>" for c, (k, _) in zip(cls, items, strict=True))
                r2 = "".join(f"<td {c}>{esc(fmt(v))}</td>" for c, (_, v) in zip(cls, items, strict=True))
                head += (f'<div class="scroll"><table><tr><th>layer</th>{r1}</tr>'
                         f"<tr><th>score</th>{r2}</tr></table></div>")
            parts.append(head)
    return "".join(parts)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def field_section(result: dict[str, Any]) -> str:
    """The comparison statistics other tools report, per mode, under their names, and KL(base ‖ cand)
    by the base's confidence (exllamav3's buckets: where the KL mass comes from)."""
    comp = result.get("comparison")
    if not isinstance(comp, dict) or not comp:
        return ""
    modes = [m for m in ("teacher_forced", "free_running") if isinstance(comp.get(m), dict)]
    rows = [("KL(p_cand‖p_base), prunelens's kl", "kl"), ("KL(p_base‖p_cand), llama.cpp/exllamav3/mlx-lm", "rkl"),
            *((f"top-{k} agreement (ordered)", f"top{k}_agree") for k in (1, 2, 3, 5, 10)),
            *((f"base's token in candidate's top-{k}", f"label_top{k}") for k in (1, 5, 10))]
    head = "".join(f"<th>{esc(m.replace('_', '-'))}</th>" for m in modes)
    body = "".join(f"<tr><th>{esc(label)}</th>" + "".join(
        f'<td class="num">{esc(fmt(_get(comp, m, key)))} ± {esc(fmt(_get(comp, m, key + "_se"), 2))}</td>'
        for m in modes) + "</tr>" for label, key in rows)
    out = [f"<table><tr><th></th>{head}</tr>{body}</table>"]
    buckets = _get(comp, "teacher_forced", "kl_by_confidence")
    if isinstance(buckets, list) and buckets:
        brow = "".join(
            f'<tr><td class="num">[{esc(fmt(b.get("lo"), 2))}, {esc(fmt(b.get("hi"), 2))})</td>'
            f'<td class="num">{esc(b.get("n"))}</td><td class="num">{esc(fmt(b.get("mean_kl")))}</td>'
            f'<td class="num">{esc(fmt(b.get("kl_share")))}</td></tr>' for b in buckets if isinstance(b, dict))
        out.append("<h3>teacher-forced KL(p_base‖p_cand) by the base's top-token probability</h3>"
                   "<table><tr><th>base top p</th><th>steps</th><th>mean KL</th><th>share of all KL</th></tr>"
                   f"{brow}</table>")
    pp = [p for p in result.get("per_prompt") or [] if isinstance(p, dict) and "fdt" in p]
    if pp:
        fdt = [num(p.get("fdt")) for p in pp]
        sdt = [num(p.get("sdt")) for p in pp]
        out.append(f'<p class="muted">who-what-benchmark on the greedy token ids: mean first divergent token '
                   f"(FDT) {esc(fmt(_mean(fdt)))}, mean share of divergent tokens (SDT) {esc(fmt(_mean(sdt)))}. "
                   "FDT is the 0-based index of the first differing token (prunelens's first divergence step "
                   "minus 1 where the texts share a prefix).</p>")
    return "".join(out)


def _mean(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def verdict_section(result: dict[str, Any]) -> str:
    """The predictor's verdict with its caveats, and where the candidate came from."""
    out = []
    v = result.get("verdict")
    if isinstance(v, dict) and v.get("text"):
        out.append(f'<div class="reading">{esc(v["text"])}.</div>')
    p = result.get("pruning")
    if isinstance(p, dict) and p.get("kind") == "candidate":
        lm = p.get("layer_map") if isinstance(p.get("layer_map"), dict) else {}
        notes = p.get("notes") if isinstance(p.get("notes"), list) else []
        out.append(f'<p class="muted">candidate {esc(p.get("candidate", ""))}: layer correspondence '
                   f'{esc(lm.get("source", "—"))}, base layers without a counterpart '
                   f'{esc(lm.get("dropped", []))}</p>' + "".join(f'<p class="muted">note: {esc(n)}</p>' for n in notes))
    return "".join(out)


def one_sentence(result: dict[str, Any]) -> str:
    """The verdict in one sentence: what the pruning does to generation and to multiple choice."""
    v = result.get("verdict")
    if not isinstance(v, dict) or "risk_multiple_choice" not in v:
        return ""
    name = str((result.get("pruning") or {}).get("label") or "the pruning")
    mc = float(v["risk_multiple_choice"])
    r = v.get("retention")
    if isinstance(r, dict):
        p = float(r["predicted"])
        gen = ("likely holds up in generation" if p >= 0.9 else "loses some generative answers" if p >= 0.7
               else "breaks in generation")
        how = (f"predicted to keep {p:.0%} [{float(r['low']):.0%}, {float(r['high']):.0%}] of the dense model's "
               "right generative answers")
    else:
        run = v.get("agreeing_tokens")
        run = float("inf") if run is None else float(run)
        gen = ("likely holds up in generation" if run >= 32 else "drifts within a short generated answer"
               if run >= 8 else "breaks in generation")
        how = f"about {run:.3g} greedy tokens before its output leaves the dense model's"
    mcq = ("multiple choice barely moves" if mc < 0.05
           else f"a one-step (multiple-choice) read changes {mc:.0%} of the time")
    return f"{name} {gen}: {how}; {mcq}."


def next_commands(result: dict[str, Any]) -> list[str]:
    """What to run next: advise to calibrate a verdict on this model, eval to measure this pruning."""
    nxt = result.get("next")
    if not isinstance(nxt, dict) or not nxt.get("model"):
        return []
    model, spec = str(nxt["model"]), nxt.get("recipe")
    out = [f"prunelens advise --model {model} --budget 25% --use generative --calibrate 2"]
    if spec:
        out.append(f"prunelens eval --model {model} --recipe '{spec}' --tasks gsm8k,arc_easy --limit 50")
    return out
