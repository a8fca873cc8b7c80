"""scikit-learn estimators wrapping the sparse DKM: ``DKMRegressor`` and ``DKMClassifier``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from dkm.fitting import FitResult, fit
from dkm.likelihoods import CategoricalLikelihood, GaussianLikelihood
from dkm.models import DKMOutput, SparseDKM
from dkm.objectives import SparseDKMObjective
from klcore.errors import DataError


class _DKMEstimator(BaseEstimator):
    """Shared settings: architecture (``num_layers`` hidden Gram layers, ``num_inducing`` points initialised at
    distinct training rows, ``kernel``, ``nu``; ``nu=inf`` is the NNGP) and training (Adam, ``epochs``,
    ``batch_size``, ``lr``, ``patience`` on the training loss, seeded by ``random_state``)."""

    def __init__(
        self,
        *,
        num_layers: int = 1,
        num_inducing: int = 64,
        kernel: str = "relu",
        nu: float = 1.0,
        epochs: int = 200,
        batch_size: int | None = 256,
        lr: float = 0.01,
        patience: int | None = None,
        random_state: int = 0,
        progress: bool = False,
    ) -> None:
        self.num_layers = num_layers
        self.num_inducing = num_inducing
        self.kernel = kernel
        self.nu = nu
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.patience = patience
        self.random_state = random_state
        self.progress = progress

    def _train(self, x: np.ndarray, y: torch.Tensor, num_outputs: int, likelihood: Any) -> None:
        xt = torch.tensor(x, dtype=torch.float64)
        with torch.random.fork_rng():
            torch.manual_seed(self.random_state)
            self.model_ = SparseDKM.from_data(
                xt,
                num_outputs,
                self.num_inducing,
                seed=self.random_state,
                num_layers=self.num_layers,
                kernel=self.kernel,
                nu=self.nu,
            )
            self.likelihood_ = likelihood
            objective = SparseDKMObjective(self.model_, likelihood, num_data=xt.shape[0])
            self.fit_result_: FitResult = fit(
                objective,
                xt,
                y,
                epochs=self.epochs,
                batch_size=self.batch_size,
                lr=self.lr,
                patience=self.patience,
                progress=self.progress,
                seed=self.random_state,
            )

    def _latent(self, x: Any) -> DKMOutput:
        check_is_fitted(self, "model_")
        x = validate_data(self, x, reset=False, dtype=np.float64)
        with torch.no_grad():
            return self.model_(torch.tensor(x, dtype=torch.float64))


class DKMRegressor(RegressorMixin, _DKMEstimator):
    """Sparse DKM regression with a Gaussian likelihood; targets are standardised internally.

    ``predict(X, return_std=False)`` gives the predictive mean (and the predictive standard deviation of y,
    noise included); ``score`` is R^2. Multi-output targets ``[n, D]`` are supported.
    """

    def fit(self, X: Any, y: Any) -> DKMRegressor:
        x, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        y2 = y.reshape(len(y), -1).astype(np.float64)
        self.y_mean_ = y2.mean(0)
        self.y_std_ = np.where(y2.std(0) > 0, y2.std(0), 1.0)
        self._y_ndim = y.ndim
        yt = torch.as_tensor((y2 - self.y_mean_) / self.y_std_)
        self._train(x, yt, y2.shape[1], GaussianLikelihood())
        return self

    def predict(self, X: Any, return_std: bool = False) -> Any:
        out = self._latent(X)
        mean = out.mean.numpy() * self.y_std_ + self.y_mean_
        std = np.sqrt(out.var.numpy() + self.likelihood_.noise.item())[:, None] * self.y_std_
        if self._y_ndim == 1:
            mean, std = mean[:, 0], std[:, 0]
        return (mean, std) if return_std else mean

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


class DKMClassifier(ClassifierMixin, _DKMEstimator):
    """Sparse DKM classification with a softmax (categorical) likelihood; ``predict_proba`` averages
    the softmax over Monte Carlo draws of the latent functions; ``score`` is accuracy."""

    def fit(self, X: Any, y: Any) -> DKMClassifier:
        x, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DataError(
                f"the targets hold a single class ({self.classes_[0]!r}): only one class is present; "
                "a classifier needs at least 2 classes"
            )
        self._train(x, torch.as_tensor(encoded, dtype=torch.long), len(self.classes_), CategoricalLikelihood())
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        out = self._latent(X)
        return self.likelihood_.predict_log_proba(out.mean, out.var).exp().numpy()

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


__all__ = ["DKMClassifier", "DKMRegressor"]
