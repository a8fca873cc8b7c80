"""scikit-learn estimators wrapping the sparse DKM: ``DKMRegressor`` and ``DKMClassifier``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from dkm._random import RandomState, torch_seed
from dkm.fitting import FitResult, fit
from dkm.likelihoods import CategoricalLikelihood, GaussianLikelihood
from dkm.models import DEFAULT_NU, DKMOutput, SparseDKM
from dkm.objectives import SparseDKMObjective
from klcore.errors import ConfigError, DataError


def _candidates(nu: float | Sequence[float]) -> list[float]:
    """The nu values to try: one scalar, or a sequence of candidates chosen by validation."""
    values = [float(nu)] if isinstance(nu, (int, float, np.number)) else [float(v) for v in nu]
    if not values or any(not v >= 0 for v in values):
        raise ConfigError(f"nu must be a number >= 0 (inf for the NNGP) or a non-empty list of them, got {nu!r}")
    return values


class _DKMEstimator(BaseEstimator):
    """Shared settings: architecture (``num_layers`` hidden Gram layers, ``num_inducing`` points initialised at
    distinct training rows, ``kernel``, ``ard`` (learned input scales), ``nu``; ``nu=inf`` is the NNGP; a list of ``nu`` values is searched on
    the validation split) and training (Adam, ``epochs``, ``batch_size``, ``lr``; with ``early_stopping=True``,
    ``validation_fraction`` of the data is held out and ``n_iter_no_change`` epochs without improvement of its
    loss stop training, the best-validation weights are kept; without it every epoch runs, as the Monte Carlo
    training loss is noisy; seeded by ``random_state``: None, an int or a numpy RandomState)."""

    _default_nu = DEFAULT_NU  # nu=None: 100 for regression, 1 for classification (docs/dkm.md, "Choosing nu")

    def __init__(
        self,
        *,
        num_layers: int = 1,
        num_inducing: int = 64,
        kernel: str = "relu",
        ard: bool = False,
        nu: float | Sequence[float] | None = None,
        epochs: int = 200,
        batch_size: int | None = 256,
        lr: float = 0.01,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int | None = 10,
        random_state: RandomState = None,
        progress: bool = False,
    ) -> None:
        self.num_layers = num_layers
        self.num_inducing = num_inducing
        self.kernel = kernel
        self.ard = ard
        self.nu = nu
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.progress = progress

    def _split(self, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
        """(x_train, y_train, x_val, y_val); stratified for classes with at least two members each."""
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        n_val = int(np.ceil(self.validation_fraction * len(x)))
        if n_val < 1 or len(x) - n_val < 2:
            raise DataError(
                f"{len(x)} samples are too few to hold out validation_fraction={self.validation_fraction}; "
                "pass more data or use early_stopping=False with a single nu"
            )
        stratify = None
        if isinstance(self, ClassifierMixin):
            counts = np.unique(y, return_counts=True)[1]
            if counts.min() >= 2 and n_val >= len(counts) and len(x) - n_val >= len(counts):
                stratify = y
        x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=n_val, random_state=seed, stratify=stratify)
        return x_tr, y_tr, x_val, y_val

    def _train(self, x: np.ndarray, y: np.ndarray, num_outputs: int, make_likelihood: Any) -> None:
        nus = _candidates(self._default_nu if self.nu is None else self.nu)
        seed = torch_seed(self.random_state)
        validate = self.early_stopping or len(nus) > 1
        if validate:
            x_tr, y_tr, x_val, y_val = self._split(x, y, seed)
            validation = (torch.tensor(x_val, dtype=torch.float64), self._targets(y_val))
        else:
            x_tr, y_tr, validation = x, y, None
        xt, yt = torch.tensor(x_tr, dtype=torch.float64), self._targets(y_tr)
        self.validation_losses_: dict[float, float] = {}
        best: tuple[float, float, SparseDKM, Any, FitResult] | None = None
        for nu in nus:
            model, likelihood, result = self._train_one(xt, yt, num_outputs, make_likelihood(), nu, seed, validation)
            score = result.best_loss if validation is not None else math.nan
            if validation is not None and not self.early_stopping:  # scored at the end of training
                score = SparseDKMObjective(model, likelihood, xt.shape[0]).validation_loss(*validation)
            self.validation_losses_[nu] = score
            if best is None or score < best[0]:
                best = (score, nu, model, likelihood, result)
        assert best is not None
        self.best_validation_loss_, self.nu_, self.model_, self.likelihood_, self.fit_result_ = best

    def _train_one(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        num_outputs: int,
        likelihood: Any,
        nu: float,
        seed: int,
        validation: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[SparseDKM, Any, FitResult]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = SparseDKM.from_data(
                x,
                num_outputs,
                self.num_inducing,
                seed=seed,
                num_layers=self.num_layers,
                kernel=self.kernel,
                nu=nu,
                ard=self.ard,
            )
            objective = SparseDKMObjective(model, likelihood, num_data=x.shape[0])
            result = fit(
                objective,
                x,
                y,
                epochs=self.epochs,
                batch_size=self.batch_size,
                lr=self.lr,
                patience=self.n_iter_no_change if self.early_stopping else None,
                validation=validation if self.early_stopping else None,
                progress=self.progress,
                seed=seed,
            )
        return model, likelihood, result

    def _targets(self, y: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

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
        self._train(x, y2, y2.shape[1], GaussianLikelihood)
        return self

    def _targets(self, y: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((y - self.y_mean_) / self.y_std_, dtype=torch.float64)

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

    _default_nu = 1.0

    def fit(self, X: Any, y: Any) -> DKMClassifier:
        x, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DataError(
                f"the targets hold a single class ({self.classes_[0]!r}): only one class is present; "
                "a classifier needs at least 2 classes"
            )
        self._train(x, encoded, len(self.classes_), CategoricalLikelihood)
        return self

    def _targets(self, y: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(y, dtype=torch.long)

    def predict_proba(self, X: Any) -> np.ndarray:
        out = self._latent(X)
        return self.likelihood_.predict_log_proba(out.mean, out.var).exp().numpy()

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


__all__ = ["DKMClassifier", "DKMRegressor"]
