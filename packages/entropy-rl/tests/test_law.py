"""The entropy-performance law: recovery of known coefficients, closed-form checks, extrapolation, bad data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from entropy_rl import extrapolate_entropy_law, fit_entropy_law, fit_entropy_law_joint

from klcore.errors import ConfigError, DataError, ShapeError


def test_exact_data_is_recovered_exactly() -> None:
    h = np.linspace(1.2, 0.1, 40)
    fit = fit_entropy_law(h, -0.3 * np.exp(h) + 0.9)
    assert fit.a == pytest.approx(0.3, abs=1e-10) and fit.b == pytest.approx(0.9, abs=1e-10)
    assert fit.ceiling == pytest.approx(0.6, abs=1e-10)
    assert fit.r2 == pytest.approx(1.0) and fit.rmse == pytest.approx(0.0, abs=1e-10)


def test_noisy_data_recovers_a_b_within_their_standard_error() -> None:
    rng = np.random.default_rng(0)
    a, b, sigma = 0.25, 0.8, 0.01
    h = rng.uniform(0.05, 1.5, 300)
    r = -a * np.exp(h) + b + rng.normal(0, sigma, h.size)
    fit = fit_entropy_law(h, r)
    # OLS standard errors of the slope and intercept in x = e^H (closed form)
    x = np.exp(h)
    sxx = np.sum((x - x.mean()) ** 2)
    se_a = sigma / math.sqrt(sxx)
    se_b = sigma * math.sqrt(1 / h.size + x.mean() ** 2 / sxx)
    assert abs(fit.a - a) < 4 * se_a and abs(fit.b - b) < 4 * se_b
    assert fit.rmse == pytest.approx(sigma, rel=0.15)
    assert 0.9 < fit.r2 < 1.0
    # the predicted curve at two entropies
    np.testing.assert_allclose(fit.predict([0.0, 1.0]), [fit.b - fit.a, fit.b - fit.a * math.e])


def test_two_point_closed_form_and_r2_definition() -> None:
    h = np.array([0.0, math.log(2.0), math.log(3.0)])  # x = 1, 2, 3
    r = np.array([1.0, 0.0, 0.5])
    fit = fit_entropy_law(h, r)
    # simple regression of r on x by hand (x mean 2, r mean 0.5): slope = sum dx dr / sum dx^2
    slope = ((1 - 2) * (1.0 - 0.5) + 0 + (3 - 2) * (0.5 - 0.5)) / 2.0
    assert fit.a == pytest.approx(-slope) and fit.b == pytest.approx(0.5 - slope * 2)
    pred = fit.b - fit.a * np.exp(h)
    assert fit.r2 == pytest.approx(1 - np.sum((r - pred) ** 2) / np.sum((r - 0.5) ** 2))


def test_extrapolation_from_the_first_fraction() -> None:
    rng = np.random.default_rng(1)
    h = np.linspace(1.4, 0.2, 200)
    truth = -0.2 * np.exp(h) + 0.75
    r = truth + rng.normal(0, 0.005, h.size)
    ext = extrapolate_entropy_law(h, r, fit_fraction=0.15)
    assert ext.n_fit == 30 and ext.n_predicted == 170
    pred = ext.fit.predict(h[30:])
    assert ext.rmse == pytest.approx(float(np.sqrt(np.mean((pred - r[30:]) ** 2))))
    assert ext.final_error == pytest.approx(float(pred[-1] - r[-1]))
    assert ext.rmse < 0.03


def test_bad_data() -> None:
    with pytest.raises(DataError, match="points"):
        fit_entropy_law([0.1, 0.2], [0.3, 0.4])
    with pytest.raises(DataError, match="3 points but performance has 2"):
        fit_entropy_law([0.1, 0.2, 0.3], [0.3, 0.4])
    with pytest.raises(DataError, match="NaN"):
        fit_entropy_law([0.1, float("nan"), 0.3], [0.3, 0.4, 0.5])
    with pytest.raises(DataError, match="same"):
        fit_entropy_law([0.5, 0.5, 0.5], [0.3, 0.4, 0.5])
    with pytest.raises(ConfigError, match="fit_fraction"):
        extrapolate_entropy_law(np.linspace(1, 0, 10), np.linspace(0, 1, 10), fit_fraction=1.0)
    with pytest.raises(DataError, match="none to predict"):
        extrapolate_entropy_law([0.3, 0.2, 0.1], [0.1, 0.2, 0.3])


def test_holds_needs_positive_a_and_enough_r2() -> None:
    h = np.linspace(1.2, 0.1, 40)
    assert fit_entropy_law(h, -0.3 * np.exp(h) + 0.9).holds()
    assert not fit_entropy_law(h, 0.3 * np.exp(h) + 0.1).holds()  # inverted: a < 0, R² = 1
    noisy = fit_entropy_law(h, -0.01 * np.exp(h) + 0.5 + np.random.default_rng(0).normal(0, 0.05, h.size))
    assert noisy.r2 < 0.5 and not noisy.holds() and noisy.holds(min_r2=noisy.r2 - 1e-9) == (noisy.a > 0)


def test_joint_fit_is_the_fit_of_all_points_and_checks_each_run() -> None:
    h1, h2 = np.linspace(1.5, 0.5, 12), np.linspace(0.9, 0.1, 8)
    r1, r2 = -0.3 * np.exp(h1) + 0.9, -0.3 * np.exp(h2) + 0.9
    joint = fit_entropy_law_joint([(h1, r1), (list(h2), list(r2))])
    assert joint.a == pytest.approx(0.3) and joint.b == pytest.approx(0.9) and joint.n == 20
    with pytest.raises(DataError, match="run 1 has 8 entropy values but 7"):
        fit_entropy_law_joint([(h1, r1), (h2, r2[:-1])])
    with pytest.raises(DataError, match="non-empty"):
        fit_entropy_law_joint([])


def test_negative_entropy_and_2d_input_are_rejected() -> None:
    with pytest.raises(DataError, match=r"entropy must be >= 0 nats.*index 1"):
        fit_entropy_law([0.5, -0.1, 0.3], [0.3, 0.4, 0.5])
    with pytest.raises(ShapeError, match=r"entropy must be 1-D.*\(2, 3\)"):
        fit_entropy_law(np.ones((2, 3)) * [[0.1, 0.2, 0.3]], np.ones(6))
    with pytest.raises(ShapeError, match="performance must be 1-D"):
        fit_entropy_law([0.1, 0.2, 0.3], [[0.3], [0.4], [0.5]])
    with pytest.raises(ShapeError, match="1-D"):
        extrapolate_entropy_law(np.linspace(1, 0, 20).reshape(4, 5), np.linspace(0, 1, 20).reshape(4, 5))


def test_non_numeric_series_raise_data_error() -> None:
    with pytest.raises(DataError, match="entropy must be a sequence of numbers"):
        fit_entropy_law(["a", "b", "c"], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="performance must be a sequence of numbers"):
        extrapolate_entropy_law([0.3, 0.2, 0.1, 0.05], [0.1, "high", 0.3, 0.4])
