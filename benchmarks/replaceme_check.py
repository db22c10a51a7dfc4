"""prunelens's training-free repair against the reference ReplaceMe code (Shopkhoev et al. 2025,
arXiv 2505.02819, github.com/mts-ai/ReplaceMe), on identical activations.

The reference is not vendored: point ``--ref`` at an extracted copy of the repository (e.g.
``git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/replaceme``). Its estimators live inside
functions that load models and datasets, so this script *executes their own statements* taken
from the copy with ``ast``: from ``ReplaceMe/lstsq.py::lstsq`` the accumulation of a1ᵀa1 / a1ᵀa2
(per batch, after the model call) and the ``transforms`` loop (``inv(a1ᵀa1 + αI) @ a1ᵀa2``), and
from ``ReplaceMe/utils.py`` the pure ``adam_method`` (the cosine variant). The one change made to
their text is ``'cuda'`` → the local device.

(a) synthetic X, R = X·T₀ + noise (well- and ill-conditioned X); (b) real activations of
``smollm2-135m`` around a dropped span of 2 blocks: X = MLP output of the block before the span
(the reference's hook on ``layer.mlp``), streams ``resid.s``/``mid.s-1``/``resid.e``; prunelens's
``ridge_map`` on the same X, and its full ``fit_repair`` pipeline. Also diagnoses ``cosine_map``
(L-BFGS from the ridge solution) and runs the reference Adam cosine solver on the same tokens.

    OMP_NUM_THREADS=1 python benchmarks/replaceme_check.py [--ref /tmp/replaceme] [--start 20]
"""

from __future__ import annotations

import argparse
import ast
import os
import types
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from prunelens.testing import shared_data_dir

DEVICE = "cpu"


# --- the reference's own code, executed from the fetched copy -------------------------------------


def _function(path: Path, name: str) -> ast.FunctionDef:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise SystemExit(f"{name} not found in {path}")


def _src(nodes: list[ast.stmt]) -> str:
    return "\n".join(ast.unparse(n) for n in nodes).replace("'cuda'", "DEVICE")


def _targets(node: ast.stmt) -> set[str]:
    return {t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)}


class ReferenceLstsq:
    """ReplaceMe's lstsq estimator: its statements from ``lstsq.lstsq``, fed with captured activations."""

    def __init__(self, ref: Path):
        body = _function(ref / "ReplaceMe" / "lstsq.py", "lstsq").body
        i_init = next(i for i, n in enumerate(body) if "start_ids" in _targets(n))
        i_loop = next(i for i, n in enumerate(body) if isinstance(n, ast.For) and ast.unparse(n.target) == "batch")
        i_tr = next(i for i, n in enumerate(body) if "transforms" in _targets(n))
        loop = body[i_loop].body
        after_call = next(i for i, n in enumerate(loop) if isinstance(n, ast.With)) + 1
        self.init = compile(_src(body[i_init:i_loop]), "ReplaceMe/lstsq.py:init", "exec")
        self.batch = compile(_src(loop[after_call:]), "ReplaceMe/lstsq.py:batch", "exec")
        self.solve = compile(_src(body[i_tr:i_tr + 2]), "ReplaceMe/lstsq.py:transforms", "exec")
        self.text = _src(body[i_tr:i_tr + 2])

    def __call__(self, batches: list[dict], n_layers: int, block: tuple[int, int], alpha: float = 0.0) -> torch.Tensor:
        """``batches``: per batch {'hidden_states': HF tuple (index k = stream before block k; None where
        unused), 'mlp': {layer: MLP output}}; ``block`` = (start, end) as select_non_overlapping_blocks
        returns it (blocks start..end-1 dropped)."""
        hidden = next(t for t in batches[0]["hidden_states"] if t is not None).shape[-1]
        ns: dict = {"torch": torch, "DEVICE": DEVICE, "hidden_size": hidden, "selected_blocks": [block],
                    "model": types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=n_layers)),
                    "diag": False, "alpha": alpha}
        exec(self.init, ns)
        for b in batches:
            ns["outputs"] = types.SimpleNamespace(hidden_states=b["hidden_states"])
            ns["mlp_activations"] = {f"layer_{i}_mlp": t for i, t in b["mlp"].items()}
            exec(self.batch, ns)
        exec(self.solve, ns)
        return ns["transforms"][0]


def reference_adam(ref: Path):
    """``utils.adam_method`` from the copy (imports stubbed: only torch, DataLoader and tqdm are used)."""
    fn = _function(ref / "ReplaceMe" / "utils.py", "adam_method")
    ns: dict = {"torch": torch, "nn": nn, "Dataset": Dataset, "DataLoader": DataLoader, "Tuple": tuple,
                "DEVICE": DEVICE, "colored": lambda s, *a, **k: s}

    class _Bar:  # tqdm(range(10)) used as a context manager with set_postfix
        def __init__(self, it, **k):
            self.it = it

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def __iter__(self):
            return iter(self.it)

        def set_postfix(self, *a, **k):
            pass

    ns["tqdm"] = _Bar
    exec(compile(_src([fn]), "ReplaceMe/utils.py:adam_method", "exec"), ns)
    return ns["adam_method"]


# --- prunelens ------------------------------------------------------------------------------------


def prunelens_ridge(x: torch.Tensor, r: torch.Tensor, ridge: float) -> torch.Tensor:
    from prunelens.prune.linfit import NormalEquations, ridge_map

    eq = NormalEquations()
    eq.add(x, r)
    return ridge_map(eq.xtx, eq.xtr, ridge)


def rel_dt(t: torch.Tensor, t_ref: torch.Tensor) -> float:
    return float((t.double() - t_ref.double()).abs().max() / t_ref.double().abs().max())


def rel_res(x: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> float:
    x, r = x.double(), r.double()
    return float(torch.linalg.norm(x @ t.double() - r) / torch.linalg.norm(r))


def compare(label: str, x: torch.Tensor, r: torch.Tensor, t_ref: torch.Tensor, extra: dict[str, torch.Tensor],
            t_true: torch.Tensor | None = None) -> None:
    cond = float(torch.linalg.cond(x.double().T @ x.double()))
    print(f"\n[{label}]  tokens={x.shape[0]} d={x.shape[1]}  cond(XᵀX)={cond:.3g}")
    head = f"  {'T':34s} {'max|ΔT|/max|T_ref|':>20s} {'‖XT−R‖/‖R‖':>14s}"
    print(head + ("  max|T−T₀|/max|T₀|" if t_true is not None else ""))
    for name, t in {"reference inv(XᵀX+αI)XᵀR (α=0)": t_ref, **extra}.items():
        row = f"  {name:34s} {rel_dt(t, t_ref):20.3e} {rel_res(x, r, t):14.6e}"
        if t_true is not None:
            row += f"  {rel_dt(t, t_true):.3e}"
        print(row)


def synthetic(lst: ReferenceLstsq, ill: bool, seed: int = 0) -> None:
    from prunelens.prune.repair import DEFAULT_RIDGE

    g = torch.Generator().manual_seed(seed)
    n, d = 4096, 64
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if ill:  # a few massive channels and many quiet ones, as in LLM MLP outputs
        x = x * torch.logspace(-2, 2, d, dtype=torch.float64)[torch.randperm(d, generator=g)]
    t0 = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    y = 3 * torch.randn(n, d, generator=g, dtype=torch.float64)  # the stream without x
    ln = y + x @ t0 + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)  # the reference stream
    h_i = y + x  # block s-1's output (the stream when the span is dropped)
    batches = [{"hidden_states": (None, h_i[k:k + 512], ln[k:k + 512]), "mlp": {0: x[k:k + 512]}}
               for k in range(0, n, 512)]
    t_ref = lst(batches, 2, (1, 2))
    r = ln - y
    compare(f"(a) synthetic, {'ill' if ill else 'well'}-conditioned X", x, r, t_ref,
            {"prunelens ridge_map(ridge=0)": prunelens_ridge(x, ln - (h_i - x), 0.0),
             f"prunelens ridge_map(ridge={DEFAULT_RIDGE:g})": prunelens_ridge(x, ln - (h_i - x), DEFAULT_RIDGE)},
            t_true=t0)


# --- real activations -------------------------------------------------------------------------------


def capture_span(lm, ids: torch.Tensor, s: int, e: int, batch: int = 4) -> list[dict]:
    """Dense model: the MLP output of block s-1 (hook on ``layer.mlp``, as the reference), the streams
    resid.s (= block s-1's output), mid.s-1 and resid.e (the reference stream at the span's end)."""
    from prunelens.model.replay import stream_points

    mlp = lm.adapter.sublayer_path("mlp", s - 1)
    names = {mlp: "mlp", 2 * s: f"resid.{s}", 2 * s - 1: f"mid.{s - 1}", 2 * e: f"resid.{e}"}
    got = stream_points(lm.adapter, ids, batch, [2 * s, 2 * s - 1, 2 * e], [mlp], convert=lambda t: t.detach().clone())
    return [{names[k]: v for k, v in g.items()} for g in got]


def diagnose_cosine(x, y, ref, init) -> tuple[torch.Tensor, dict]:
    """prunelens's cosine_map, with its L-BFGS and its loss evaluations recorded."""
    import prunelens.prune.linfit as lf

    made: list = []
    losses: list[float] = []
    orig_opt, orig_loss = torch.optim.LBFGS, lf.cosine_loss

    class Recording(orig_opt):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    def loss(*a):
        v = orig_loss(*a)
        losses.append(float(v.detach()))
        return v

    # the gradient at the start, in the same float32 arithmetic
    t = init.float().clone().requires_grad_(True)
    lf.cosine_loss(x.float(), y.float(), ref.float(), t).backward()
    grad = t.grad.double()
    torch.optim.LBFGS, lf.cosine_loss = Recording, loss
    try:
        out, info = lf.cosine_map(x, y, ref, init)
    finally:
        torch.optim.LBFGS, lf.cosine_loss = orig_opt, orig_loss
    st = made[0].state[made[0]._params[0]]
    first_t = min(1.0, 1.0 / float(grad.abs().sum()))
    info.update(n_iter=st.get("n_iter"), func_evals=st.get("func_evals"), last_step_t=float(st.get("t", 0.0)),
                evaluated=losses,
                grad_max=float(grad.abs().max()), grad_l1=float(grad.abs().sum()),
                grad_l2sq=float((grad ** 2).sum()), first_step=first_t,
                predicted_first_decrease=first_t * float((grad ** 2).sum()),
                float32_ulp_of_loss=float(torch.finfo(torch.float32).eps) * info["cosine_loss_before"],
                changed_rel=rel_dt(out.float(), init.float()))
    return out, info


def lbfgs64(x, y, ref, init) -> tuple[torch.Tensor, float, int]:
    """Diagnostic only: cosine_map's L-BFGS settings with the loss in float64 instead of float32."""
    from prunelens.prune.linfit import cosine_loss

    x, y, ref = x.double(), y.double(), ref.double()
    t = init.double().clone(memory_format=torch.contiguous_format).requires_grad_(True)
    opt = torch.optim.LBFGS([t], lr=1.0, max_iter=100, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        v = cosine_loss(x, y, ref, t)
        v.backward()
        return v

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return t.detach(), float(cosine_loss(x, y, ref, t)), opt.state[t]["n_iter"]


def real(lst: ReferenceLstsq, ref: Path, s: int, n_seq: int, seq_len: int, calib: str) -> None:
    import prunelens as pl
    from prunelens.data import calibration_ids
    from prunelens.prune.linfit import cosine_loss
    from prunelens.prune.repair import DEFAULT_RIDGE, fit_repair

    e = s + 2
    lm = pl.load_model("smollm2-135m")
    n_layers = lm.adapter.n_layers
    ids = calibration_ids(lm.tokenizer, calib, n_seq, seq_len)
    got = capture_span(lm, ids, s, e)
    x = torch.cat([g["mlp"].reshape(-1, g["mlp"].shape[-1]) for g in got])
    h_i = torch.cat([g[f"resid.{s}"].reshape(-1, x.shape[-1]) for g in got])
    mid = torch.cat([g[f"mid.{s - 1}"].reshape(-1, x.shape[-1]) for g in got])
    h_n = torch.cat([g[f"resid.{e}"].reshape(-1, x.shape[-1]) for g in got])
    print(f"\n(b) smollm2-135m ({n_layers} blocks, {lm.model.dtype}), blocks {s}..{e - 1} dropped; "
          f"X = MLP output of block {s - 1}; {n_seq}×{seq_len} tokens of {Path(calib).name}")
    print(f"  check: resid.{s} − (mid.{s - 1} + X) max abs = {float((h_i - mid - x).abs().max()):.3g} "
          f"(|resid.{s}| max {float(h_i.abs().max()):.3g})")

    def hs(g: dict) -> tuple:
        t = [None] * (n_layers + 1)
        t[s], t[e] = g[f"resid.{s}"], g[f"resid.{e}"]
        return tuple(t)

    t_ref = lst([{"hidden_states": hs(g), "mlp": {s - 1: g["mlp"]}} for g in got], n_layers, (s, e))
    r_ref = h_n.double() + x.double() - h_i.double()  # the reference's a2
    y = h_i - x  # prunelens: the stream at the span's end (pruned) minus x
    r_pl = h_n - y
    print(f"  targets: max|R_prunelens − a2_reference|/max|a2| = "
          f"{float((r_pl.double() - r_ref).abs().max() / r_ref.abs().max()):.3g}")

    plan = pl.DropPlan(block=tuple(range(s, e)))
    torch.manual_seed(0)
    fitted = {}
    for spec in ("repair:linear:0", "repair:linear"):
        m = fit_repair(lm.adapter, plan, spec, ids, batch_size=4).maps[0]
        fitted[spec] = m
    compare("(b) real activations", x, r_ref, t_ref,
            {"prunelens ridge_map(ridge=0)": prunelens_ridge(x, r_pl, 0.0),
             f"prunelens ridge_map(ridge={DEFAULT_RIDGE:g})": prunelens_ridge(x, r_pl, DEFAULT_RIDGE),
             "fit_repair repair:linear:0 (fp32 T)": fitted["repair:linear:0"].t,
             f"fit_repair repair:linear ({DEFAULT_RIDGE:g})": fitted["repair:linear"].t,
             "identity (plain drop)": torch.eye(x.shape[1], dtype=torch.float64)})
    print(f"  fit_repair module: {fitted['repair:linear'].module}; stream error "
          f"{fitted['repair:linear'].stats['stream_error_before']:.4f} -> "
          f"{fitted['repair:linear'].stats['stream_error_after']:.4f}")

    # cosine: prunelens (L-BFGS from the ridge solution, full stream) and the reference (Adam from I)
    t_ridge = prunelens_ridge(x, r_pl, DEFAULT_RIDGE)
    t_cos, info = diagnose_cosine(x, y, h_n, t_ridge)
    ev = info.pop("evaluated")
    print("\n  prunelens cosine_map diagnosis (init = ridge solution, as fit_span):")
    for k, v in info.items():
        print(f"    {k:26s} {v:.6g}" if isinstance(v, float) else f"    {k:26s} {v}")
    print(f"    loss evaluations ({len(ev)}): {' '.join(f'{v:.9f}' for v in ev)}")
    print(f"    before/after exactly: {info['cosine_loss_before']!r} / {info['cosine_loss_after']!r}")
    t64, l64, it64 = lbfgs64(x, y, h_n, t_ridge)
    print(f"    same L-BFGS in float64: {it64} iterations, loss {l64:.9f}, max|T−T_ridge|/max|T_ridge| = "
          f"{rel_dt(t64, t_ridge):.3g}")

    adam = reference_adam(ref)
    torch.manual_seed(42)  # the reference's seed_all()
    t_adam = adam(x.bfloat16(), r_ref.bfloat16(), a3=None, loss="cosine")  # cosine_dist stores a1, a2 in bf16

    def their_cos(t: torch.Tensor) -> float:  # adam_method's objective (accurate: False): cos(XT, a2)
        xa = x.float() @ t.float()
        return float(1 - torch.nn.functional.cosine_similarity(xa, r_ref.float(), dim=-1).mean())

    print(f"\n  {'T':34s} {'cos(XT,R) loss':>15s} {'cos stream loss':>16s} {'‖XT−R‖/‖R‖':>12s}")
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for name, t in {"identity (plain drop)": eye, "reference lstsq": t_ref, "prunelens ridge 1e-4": t_ridge,
                        "prunelens cosine_map": t_cos, "cosine L-BFGS in float64": t64,
                        "reference adam_method (10 steps)": t_adam}.items():
            full = float(cosine_loss(x.float(), y.float(), h_n.float(), t.float()))
            print(f"  {name:34s} {their_cos(t):15.6f} {full:16.9f} {rel_res(x, r_ref, t):12.5f}")
    print(f"  adam: max|T−I| = {float((t_adam.detach() - eye).abs().max()):.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="/tmp/replaceme", help="extracted copy of github.com/mts-ai/ReplaceMe")
    ap.add_argument("--start", type=int, default=20, help="first dropped block (2 are dropped)")
    ap.add_argument("--n-seq", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib", default=str(shared_data_dir() / "c4_calibration.jsonl"))
    ap.add_argument("--skip-real", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ref = Path(a.ref)
    lst = ReferenceLstsq(ref)
    print("reference estimator executed from", ref / "ReplaceMe/lstsq.py", ":\n  " + lst.text.replace("\n", "\n  "))
    synthetic(lst, ill=False)
    synthetic(lst, ill=True)
    if not a.skip_real:
        real(lst, ref, a.start, a.n_seq, a.seq_len, a.calib)


if __name__ == "__main__":
    main()
