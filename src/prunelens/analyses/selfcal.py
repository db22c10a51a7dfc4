"""Calibrating the retention prediction on the user's own model from a few measured prunings.

The shipped fits (retention = σ(w₀ + w₁·log KL_tf), one per measured model) predict held-out
*methods* of their own model well and held-out *families* badly (docs/beyond-the-paper.md §2b):
the intercept moves most between families. So the shipped fits are treated as draws of a family's
(w₀, w₁), and N anchor prunings measured on the user's model update that prior:

- N = 0: the prior itself (its mean; its spread is the interval);
- N = 1: the intercept only, through the anchor; the slope stays at the prior mean, and its prior
  spread widens the interval with the distance from the anchor's KL;
- N ≥ 2: intercept and slope, maximum a posteriori under the prior (binomial likelihood of each
  anchor's k kept answers out of n).

Intervals are for the candidate's true retention (Laplace approximation of the posterior, mapped
through σ), at the stated coverage. Pure numerics: the anchors are measured elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

PRIOR_FLOOR = (1.0, 0.25)  # least prior s.d. of (w₀, w₁): two or three families underestimate the spread
MODELS = {0: "prior", 1: "intercept", 2: "intercept+slope"}


def prior_from_fits(fits: Mapping[str, Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (diagonal) covariance of (w₀, w₁) over the shipped per-model fits, each s.d. floored."""
    w = np.array([f["weights"][:2] for f in fits.values()], dtype=float)
    sd = np.maximum(w.std(axis=0, ddof=1) if len(w) > 1 else 0.0, PRIOR_FLOOR)
    return w.mean(axis=0), np.diag(sd ** 2)


def scatter_from_fits(fits: Mapping[str, Mapping[str, Any]]) -> float:
    """The methods' scatter about their model's curve (``predictor.method_scatter``), pooled over the
    shipped fits (root mean square); 0 where none records it."""
    s = [float(f["scatter"]) for f in fits.values() if f.get("scatter") is not None]
    return math.sqrt(sum(v * v for v in s) / len(s)) if s else 0.0


def _sigmoid(z: np.ndarray | float) -> Any:
    return 1 / (1 + np.exp(-np.asarray(z, dtype=float)))


def _map(x: np.ndarray, k: np.ndarray, n: np.ndarray, mean: np.ndarray, prec: np.ndarray,
         iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Newton steps on the negative log posterior; returns the mode and the Hessian there."""
    w = mean.copy()
    for _ in range(iters):
        p = _sigmoid(x @ w)
        grad = x.T @ (k - n * p) - prec @ (w - mean)
        hess = (x * (n * p * (1 - p))[:, None]).T @ x + prec
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.max(np.abs(step)) < 1e-10:
            break
    p = _sigmoid(x @ w)
    return w, (x * (n * p * (1 - p))[:, None]).T @ x + prec


def calibrate(anchors: Sequence[Mapping[str, float]], mean: np.ndarray, cov: np.ndarray,
              coverage: float = 0.8, scatter: float = 0.0) -> dict[str, Any]:
    """The calibrated fit from anchors (each ``tf_kl``, ``k`` answers kept of ``n``); see the module
    docstring for the model each N gets. ``scatter``: how far a method lies off its model's curve
    (logit s.d.), added to every prediction's variance. JSON-ready."""
    logs = np.log(np.maximum([float(a["tf_kl"]) for a in anchors], 1e-6))
    k = np.array([float(a["k"]) for a in anchors])
    n = np.array([float(a["n"]) for a in anchors])
    out: dict[str, Any] = {"model": MODELS[min(len(anchors), 2)], "n_anchors": len(anchors), "coverage": coverage,
                           "scatter": scatter,
                           "log_range": [float(logs.min()), float(logs.max())] if len(logs) else None}
    if len(anchors) == 0:
        out.update(weights=mean.tolist(), cov=cov.tolist(), anchor_log=None)
    elif len(anchors) == 1:  # z = z_a + w₁ (log KL − log KL_a): the intercept through the anchor
        x = np.ones((1, 1))
        z_prior = mean[0] + mean[1] * logs[0]
        var_prior = cov[0, 0] + cov[1, 1] * logs[0] ** 2
        za, h = _map(x, k, n, np.array([z_prior]), np.array([[1 / var_prior]]))
        w0 = float(za[0] - mean[1] * logs[0])
        out.update(weights=[w0, float(mean[1])], anchor_log=float(logs[0]), z_var=float(1 / h[0, 0]),
                   slope_var=float(cov[1, 1]))
    else:
        x = np.column_stack([np.ones(len(logs)), logs])
        w, h = _map(x, k, n, mean.astype(float), np.linalg.inv(cov))
        out.update(weights=w.tolist(), cov=np.linalg.inv(h).tolist(), anchor_log=None)
    return out


def predict(cal: Mapping[str, Any], tf_kl: float, n_items: int | None = None) -> dict[str, float]:
    """Predicted retention at ``tf_kl`` with its interval, and how far outside the anchors' KL range
    it lies (in units of that range's width, at least one unit of log KL; 0 inside).

    With ``n_items`` the interval is for the share *measured* on that many questions, not the true
    retention: the quantiles of the predicted count of right answers (binomial given the retention,
    the retention uncertain as fitted), so a user comparing with a 22-question measurement gets an
    interval of shares that measurement can take."""
    x = math.log(max(float(tf_kl), 1e-6))
    w0, w1 = cal["weights"]
    z = w0 + w1 * x
    if cal["model"] == "intercept":
        var = cal["z_var"] + cal["slope_var"] * (x - cal["anchor_log"]) ** 2
    else:
        c = np.asarray(cal["cov"])
        v = np.array([1.0, x])
        var = float(v @ c @ v)
    # the candidate's own scatter about the curve, and the anchors' (carried into the fitted curve)
    var += float(cal.get("scatter", 0.0)) ** 2 * (1 + 1 / cal["n_anchors"] if cal["n_anchors"] else 1)
    q = NormalDist().inv_cdf((1 + cal["coverage"]) / 2) * math.sqrt(max(var, 0.0))
    outside = 0.0
    if cal["log_range"] is not None:
        lo, hi = cal["log_range"]
        outside = max(lo - x, x - hi, 0.0) / max(hi - lo, 1.0)
    low, high = float(_sigmoid(z - q)), float(_sigmoid(z + q))
    if n_items:
        low, high = count_interval(z, max(var, 0.0), n_items, cal["coverage"])
    return {"predicted": float(_sigmoid(z)), "low": low, "high": high, "outside": outside}


def count_interval(z: float, var: float, n: int, coverage: float) -> tuple[float, float]:
    """Central ``coverage`` interval of k/n where k ~ Binomial(n, σ(Z)), Z ~ Normal(z, var): the
    predictive distribution of a share measured on n questions (Gauss–Hermite over Z)."""
    x, w = np.polynomial.hermite.hermgauss(48)
    p = np.clip(_sigmoid(z + math.sqrt(2 * var) * x), 1e-12, 1 - 1e-12)
    k = np.arange(n + 1)
    log_c = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])
    pmf = (w[:, None] / math.sqrt(math.pi) * np.exp(log_c + np.outer(np.log(p), k)
                                                    + np.outer(np.log1p(-p), n - k))).sum(0)
    cdf = np.cumsum(pmf / pmf.sum())
    a = (1 - coverage) / 2
    return float(np.searchsorted(cdf, a) / n), float(min(np.searchsorted(cdf, 1 - a), n) / n)


def choose_anchors(log_kls: Sequence[float], n: int) -> list[int]:
    """Indices of ``n`` candidates spread over the KL range: the (j + ½)/n quantiles of log KL (the
    median for one; the quartiles for two). Not the two ends: the mildest pruning keeps every answer
    and the harshest none, and a share of 1 or 0 says little about where the curve lies."""
    order = sorted(range(len(log_kls)), key=lambda i: log_kls[i])
    if n <= 0 or not order:
        return []
    picks = [order[round((j + 0.5) / n * (len(order) - 1))] for j in range(n)]
    return list(dict.fromkeys(picks))
