"""Defaults that do not overfit, scikit-learn random_state semantics, validation-based stopping, nu selection."""

from __future__ import annotations

import dkm
import numpy as np
import pytest
import torch
from dkm.estimators import DKMClassifier, DKMRegressor
from sklearn.datasets import load_diabetes, make_blobs

from klcore.errors import ConfigError

D = torch.float64


def _diabetes(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_diabetes(return_X_y=True)
    x, y = x[:n], y[:n]
    return torch.tensor((x - x.mean(0)) / x.std(0)), torch.tensor((y - y.mean()) / y.std())


def _learned_noise(nu: float | None) -> float:
    x, y = _diabetes()
    model = dkm.FullDKM(x) if nu is None else dkm.FullDKM(x, nu=nu)
    likelihood = dkm.GaussianLikelihood()
    dkm.fit(dkm.FullDKMObjective(model, likelihood), x, y, epochs=30, optimizer="lbfgs", progress=False)
    return likelihood.noise.item()


def test_default_full_dkm_keeps_the_noise_on_diabetes() -> None:
    # standardised diabetes targets: linear models explain about half the variance, so the noise is ~0.5;
    # nu = 1 (the old default) with one output column lets G_L fit Y Y^T and the noise collapses
    assert dkm.FullDKM(_diabetes(10)[0]).stack.layers[0].nu == dkm.models.DEFAULT_NU
    assert 0.25 < _learned_noise(None) < 0.8
    assert _learned_noise(1.0) < 0.01


def test_lbfgs_is_ahead_of_adam_early_and_ends_near_its_optimum() -> None:
    x, y = _diabetes(80)
    curves = {}
    for optimizer, epochs, lr in (("adam", 400, 0.05), ("lbfgs", 60, None)):
        objective = dkm.FullDKMObjective(dkm.FullDKM(x), dkm.GaussianLikelihood())
        result = dkm.fit(objective, x, y, epochs=epochs, lr=lr, optimizer=optimizer, progress=False)
        curves[optimizer] = [h["train/loss"] for h in result.history]
    assert curves["lbfgs"][19] < curves["adam"][19] - 0.05
    assert min(curves["lbfgs"]) < min(curves["adam"]) + 5e-3  # L-BFGS's tail is slower (ill-conditioned G)
    objective = dkm.SparseDKMObjective(dkm.SparseDKM.from_data(x, 1, 8), dkm.GaussianLikelihood(), num_data=80)
    with pytest.raises(ConfigError, match="full batch"):
        dkm.fit(objective, x, y, batch_size=16, optimizer="lbfgs")
    with pytest.raises(ConfigError, match="sgd"):
        dkm.fit(objective, x, y, optimizer="sgd")


def test_full_dkm_early_stopping_on_held_out_predictive_density() -> None:
    x, y = _diabetes(140)
    model = dkm.FullDKM(x[:100], nu=1.0)  # overfits: the held-out loss turns up while the training loss falls
    objective = dkm.FullDKMObjective(model, dkm.GaussianLikelihood())
    result = dkm.fit(objective, x[:100], y[:100], epochs=300, lr=0.05, patience=10, validation=(x[100:], y[100:]))
    assert result.stopped_early and len(result.history) == result.best_epoch + 11
    assert result.history[-1]["train/loss"] < result.history[result.best_epoch]["train/loss"]
    assert objective.validation_loss(x[100:], y[100:], train_y=y[:100]) == pytest.approx(result.best_loss, abs=1e-10)
    with torch.no_grad():  # independent check of the criterion: mean -log N(y; mean, var + noise)
        mean, var = model.predict(x[100:], y[:100], objective.likelihood.noise)
        std = (var + objective.likelihood.noise).sqrt()
        expected = -torch.distributions.Normal(mean[:, 0], std).log_prob(y[100:]).mean().item()
    assert result.best_loss == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("state", [None, 3, np.random.RandomState(3)])
def test_random_state_accepts_none_int_and_randomstate(state: object) -> None:
    x, y = make_blobs(n_samples=40, centers=2, random_state=0)
    clf = DKMClassifier(num_inducing=6, epochs=3, random_state=state).fit(x, y)
    assert clf.predict(x).shape == (40,)
    model = dkm.SparseDKM.from_data(torch.tensor(x), 2, 5, seed=state)  # type: ignore[arg-type]
    assert model.num_inducing == 5


def test_int_random_state_is_reproducible_and_bad_ones_are_refused() -> None:
    x, y = make_blobs(n_samples=40, centers=2, random_state=0)
    a = DKMClassifier(num_inducing=6, epochs=3, random_state=5).fit(x, y).predict_proba(x)
    b = DKMClassifier(num_inducing=6, epochs=3, random_state=5).fit(x, y).predict_proba(x)
    np.testing.assert_array_equal(a, b)
    gen = np.random.RandomState(0)  # a RandomState is advanced, as in scikit-learn: two fits differ
    z1 = dkm.SparseDKM.from_data(torch.tensor(x), 2, 5, seed=gen).inducing_inputs
    z2 = dkm.SparseDKM.from_data(torch.tensor(x), 2, 5, seed=gen).inducing_inputs
    assert not torch.equal(z1, z2)
    with pytest.raises(ConfigError, match="random_state"):
        DKMClassifier(random_state="zero").fit(x, y)  # type: ignore[arg-type]


def _noisy_sine(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n, 2))
    return x, np.sin(2 * x[:, 0]) + 0.5 * rng.standard_normal(n)


def test_regressor_early_stopping_keeps_the_best_validation_weights() -> None:
    x, y = _noisy_sine(100, 0)
    reg = DKMRegressor(
        num_inducing=40,
        nu=0.01,
        epochs=400,
        lr=0.1,
        batch_size=None,
        early_stopping=True,
        n_iter_no_change=5,
        validation_fraction=0.25,
        random_state=0,
    ).fit(x, y)
    result = reg.fit_result_
    assert result.stopped_early and len(result.history) == result.best_epoch + 6
    assert reg.best_validation_loss_ == result.best_loss == result.history[result.best_epoch]["val/loss"]
    _, _, x_val, y_val = reg._split(x, y.reshape(-1, 1), 0)
    mean, std = reg.predict(x_val, return_std=True)  # the kept model scores the best validation loss
    nlpd = -np.mean(-0.5 * np.log(2 * np.pi * std**2) - 0.5 * ((y_val[:, 0] - mean) / std) ** 2) - np.log(reg.y_std_[0])
    assert nlpd == pytest.approx(reg.best_validation_loss_, rel=1e-8)


def test_nu_is_selected_on_the_validation_split() -> None:
    x, y = _noisy_sine(80, 1)
    reg = DKMRegressor(num_inducing=30, nu=[1e-3, 100.0], epochs=60, lr=0.05, random_state=0).fit(x, y)
    assert set(reg.validation_losses_) == {1e-3, 100.0}
    assert reg.nu_ == min(reg.validation_losses_, key=reg.validation_losses_.get)
    assert reg.model_.stack.layers[0].nu == reg.nu_
    assert reg.best_validation_loss_ == reg.validation_losses_[reg.nu_]
    assert DKMRegressor().fit(x, y).nu_ == 100.0 and DKMClassifier()._default_nu == 1.0
    with pytest.raises(ConfigError, match="nu"):
        DKMRegressor(nu=[]).fit(x, y)
