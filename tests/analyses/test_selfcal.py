"""Self-calibration of the retention prediction: the fit recovers known parameters from synthetic
outcomes, N = 0/1/2 anchors get the documented model, and the interval's coverage on families drawn
from the prior matches its level."""

from __future__ import annotations

import numpy as np
import pytest

from prunelens.analyses.selfcal import calibrate, choose_anchors, predict, prior_from_fits


def _sig(z: float) -> float:
    return float(1 / (1 + np.exp(-z)))


def _anchors(rng: np.random.Generator, w: np.ndarray, kls: list[float], n: int) -> list[dict[str, float]]:
    return [{"tf_kl": kl, "k": float(rng.binomial(n, _sig(w[0] + w[1] * np.log(kl)))), "n": n} for kl in kls]


def test_many_anchors_recover_known_parameters() -> None:
    rng = np.random.default_rng(0)
    true = np.array([-0.8, -0.7])
    kls = list(np.exp(np.linspace(-4, 1.5, 12)))
    cal = calibrate(_anchors(rng, true, kls, 4000), np.array([0.0, -0.5]), np.diag([1.0, 0.25]))
    assert cal["model"] == "intercept+slope"
    assert np.allclose(cal["weights"], true, atol=0.06)
    assert abs(predict(cal, 0.3)["predicted"] - _sig(true[0] + true[1] * np.log(0.3))) < 0.01


def test_each_number_of_anchors_gets_its_documented_model() -> None:
    mean, cov = np.array([-0.75, -0.73]), np.diag([1.0, 0.0625])
    rng = np.random.default_rng(1)
    none = calibrate([], mean, cov)
    assert none["model"] == "prior" and none["weights"] == mean.tolist()
    one = calibrate(_anchors(rng, np.array([1.5, -0.73]), [0.2], 300), mean, cov)
    # the intercept moves to the anchor; the slope stays at the prior mean
    assert one["model"] == "intercept" and one["weights"][1] == mean[1] and one["weights"][0] > mean[0] + 1
    two = calibrate(_anchors(rng, np.array([1.5, -0.3]), [0.05, 2.0], 300), mean, cov)
    assert two["model"] == "intercept+slope" and two["weights"][1] != mean[1]
    # with one anchor the interval is narrowest at the anchor and widens away from it
    at, far = predict(one, 0.2), predict(one, 5.0)
    assert at["high"] - at["low"] < far["high"] - far["low"] and far["outside"] > 0 == at["outside"]


@pytest.mark.parametrize("n_anchors", [0, 1, 2, 3])
def test_interval_coverage_matches_its_level_on_families_drawn_from_the_prior(n_anchors: int) -> None:
    rng = np.random.default_rng(n_anchors)
    mean, cov = np.array([-0.75, -0.73]), np.diag([0.8, 0.1]) ** 2
    grid = list(np.exp(np.linspace(-4, 1.5, 9)))
    inside = []
    for _ in range(600):  # a family: its true weights, anchors measured on 200 questions each
        w = rng.multivariate_normal(mean, cov)
        picks = choose_anchors(list(np.log(grid)), n_anchors)
        cal = calibrate(_anchors(rng, w, [grid[i] for i in picks], 200), mean, cov, coverage=0.8)
        for kl in grid:
            r = predict(cal, kl)
            inside.append(r["low"] <= _sig(w[0] + w[1] * np.log(kl)) <= r["high"])
    share = float(np.mean(inside))
    assert abs(share - 0.8) <= 0.05 or (n_anchors == 1 and 0.8 <= share <= 0.9), share


def test_anchors_spread_over_the_range_and_the_prior_comes_from_the_shipped_fits() -> None:
    assert choose_anchors([3.0, -1.0, 0.5, 2.0, -3.0], 2) == [1, 3]  # the quartiles of log KL, not the ends
    assert choose_anchors([3.0, -1.0, 0.5, 2.0, -3.0, 1.0, 4.0], 3) == [1, 5, 0]
    assert choose_anchors([3.0, -1.0, 0.5], 1) == [2] and choose_anchors([1.0], 0) == []
    fits = {"a": {"weights": [-1.7, -0.97]}, "b": {"weights": [0.2, -0.90]}}
    mean, cov = prior_from_fits(fits)
    assert np.allclose(mean, [-0.75, -0.935])
    # the intercepts' spread as measured; the slopes' (0.05) floored: two families understate it
    assert cov[0, 0] == pytest.approx(np.std([-1.7, 0.2], ddof=1) ** 2) and cov[1, 1] == pytest.approx(0.25 ** 2)


def test_the_interval_for_a_measured_share_is_the_predicted_counts_quantiles() -> None:
    import math

    from prunelens.analyses.selfcal import count_interval

    # a retention known exactly (variance 0): the binomial's own 10 % and 90 % quantiles
    def cdf(k: int) -> float:
        return sum(math.comb(100, i) for i in range(k + 1)) / 2 ** 100

    lo = next(k for k in range(101) if cdf(k) >= 0.1)
    hi = next(k for k in range(101) if cdf(k) >= 0.9)
    assert count_interval(0.0, 0.0, 100, 0.8) == (lo / 100, hi / 100)
    # shares of 0 and 1 are reachable: a measured 0/22 can fall inside
    assert count_interval(-5.0, 0.5, 22, 0.8)[0] == 0.0 and count_interval(5.0, 0.5, 22, 0.8)[1] == 1.0
    # coverage of measured shares: families drawn from the prior, 22 questions per measurement
    rng = np.random.default_rng(3)
    mean, cov = np.array([-0.75, -0.73]), np.diag([1.0, 0.0625])
    grid = np.exp(np.linspace(-3.5, 1.5, 9))
    inside = []
    for _ in range(300):
        w = rng.multivariate_normal(mean, cov)
        picks = choose_anchors(list(np.log(grid)), 2)
        cal = calibrate(_anchors(rng, w, [grid[i] for i in picks], 22), mean, cov, coverage=0.8)
        for kl in grid:
            r = predict(cal, kl, n_items=22)
            measured = rng.binomial(22, _sig(w[0] + w[1] * np.log(kl))) / 22
            inside.append(r["low"] <= measured <= r["high"])
    assert 0.78 <= float(np.mean(inside)) <= 0.92, float(np.mean(inside))
