from __future__ import annotations

import dkm
import pytest
import torch
from dkm.fitting import fit

from klcore.errors import ConfigError

D = torch.float64


def _data(n: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 2, dtype=D) * 4 - 2
    return x, torch.sin(2 * x[:, 0]) * x[:, 1] + 0.05 * torch.randn(n, dtype=D)


def test_fit_improves_the_sparse_objective_and_prediction() -> None:
    x, y = _data()
    model = dkm.SparseDKM.from_data(x, 1, 16, num_layers=1, nu=1.0)
    objective = dkm.SparseDKMObjective(model, dkm.GaussianLikelihood(), num_data=80)
    start, _ = objective(x, y)
    result = fit(objective, x, y, epochs=100, batch_size=32, lr=0.03, progress=False)
    end, _ = objective(x, y)
    assert end.item() < start.item() - 0.5
    assert len(result.history) == 100 and {"train/loss", "dkm/ell", "dkm/kl"} <= set(result.history[-1])
    with torch.no_grad():
        rmse = (model(x).mean[:, 0] - y).square().mean().sqrt().item()
    assert rmse < 0.6 * y.std().item()


def test_early_stopping_restores_the_best_weights() -> None:
    x, y = _data(60)
    xv, yv = _data(30)
    model = dkm.SparseDKM.from_data(x, 1, 8)
    objective = dkm.SparseDKMObjective(model, dkm.GaussianLikelihood(), num_data=60)
    result = fit(objective, x, y, epochs=400, lr=0.3, patience=5, validation=(xv, yv), progress=False)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 6
    with torch.no_grad():
        assert objective.validation_loss(xv, yv) == pytest.approx(result.best_loss, abs=1e-10)


def test_full_dkm_trains_with_fit() -> None:
    x, y = _data(30)
    model = dkm.FullDKM(x, num_layers=1, nu=1.0)
    objective = dkm.FullDKMObjective(model, dkm.GaussianLikelihood())
    start, _ = objective(x, y)
    fit(objective, x, y, epochs=50, lr=0.02, progress=False)
    assert objective(x, y)[0].item() < start.item()


def test_fit_rejects_bad_settings() -> None:
    x, y = _data(10)
    objective = dkm.SparseDKMObjective(dkm.SparseDKM.from_data(x, 1, 4), dkm.GaussianLikelihood(), num_data=10)
    with pytest.raises(ConfigError):
        fit(objective, x, y, epochs=0)
    with pytest.raises(ConfigError):
        fit(objective, x, y, patience=0)
