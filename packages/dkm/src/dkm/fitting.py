"""A convenience training loop: Adam or L-BFGS, minibatches, progress bar and early stopping (you may own the loop)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from dkm._random import RandomState, torch_generator
from klcore.errors import ConfigError, NonFiniteError, ShapeError

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
OPTIMIZERS = ("adam", "lbfgs")


@dataclass
class FitResult:
    """``history``: one dict of epoch-mean metrics per epoch (``train/loss``, ``val/loss`` when validating, and
    the objective's own metrics); ``best_epoch``/``best_loss``: the monitored loss's minimum, whose weights are kept."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_loss: float = math.inf
    stopped_early: bool = False


def _check_loss(loss: torch.Tensor, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteError(f"the loss became {loss.item()} at epoch {epoch}; lower lr or raise dkm.jitter")


def _adam_epoch(
    objective: nn.Module,
    optimiser: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    size: int,
    epoch: int,
) -> dict[str, float]:
    sums: dict[str, float] = {}
    n = x.shape[0]
    for start in range(0, n, size):
        idx = order[start : start + size]
        optimiser.zero_grad()
        loss, metrics = objective(x[idx], y[idx])
        _check_loss(loss, epoch)
        loss.backward()
        optimiser.step()
        for key, value in {"train/loss": loss.item(), **metrics}.items():
            sums[key] = sums.get(key, 0.0) + idx.numel() / n * value
    return sums


def _lbfgs_epoch(
    objective: nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epoch: int
) -> dict[str, float]:
    """One L-BFGS iteration (strong Wolfe line search, full batch); metrics at the accepted point."""

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss, _ = objective(x, y)
        _check_loss(loss, epoch)
        loss.backward()
        return loss

    optimiser.step(closure)  # type: ignore[arg-type]  # LBFGS takes a closure returning the loss tensor
    with torch.no_grad():  # the line search's last evaluation need not be the accepted point
        loss, metrics = objective(x, y)
    _check_loss(loss, epoch)
    return {"train/loss": loss.item(), **metrics}


def fit(
    objective: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 200,
    batch_size: int | None = None,
    lr: float | None = None,
    patience: int | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    optimizer: str = "adam",
    progress: bool = True,
    seed: RandomState = 0,
) -> FitResult:
    """Minimise ``objective(x_batch, y_batch) -> (loss, metrics)`` over ``epochs`` passes.

    ``optimizer``: ``adam`` (``lr`` default 0.01; ``batch_size=None`` is full batch in the given row order, what
    ``FullDKMObjective`` needs) or ``lbfgs`` (full batch, one L-BFGS iteration with a strong Wolfe line search
    per epoch, ``lr`` default 1). With ``validation=(x_val, y_val)`` every epoch records ``val/loss``, the
    objective's ``validation_loss`` (held-out negative log predictive density per point). With ``patience``,
    training stops after that many epochs without improvement of the monitored loss (``val/loss`` when
    validating, else ``train/loss``); the best weights are restored in both cases. ``seed`` (None, int or
    numpy RandomState) seeds the minibatch shuffling.
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if lr is None:
        lr = 1.0 if optimizer == "lbfgs" else 0.01
    if epochs < 1 or (batch_size is not None and batch_size < 1) or not lr > 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1 (or None) and lr > 0; got {epochs}, {batch_size}, {lr}")
    if patience is not None and patience < 1:
        raise ConfigError(f"patience must be >= 1 or None, got {patience}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ShapeError(f"x and y need the same non-zero number of rows, got {x.shape[0]} and {y.shape[0]}")
    if validation is not None and not callable(getattr(objective, "validation_loss", None)):
        raise ConfigError(
            f"validation needs an objective with validation_loss(x, y, *, train_y); {type(objective).__name__} has none"
        )
    n = x.shape[0]
    size = n if batch_size is None else min(batch_size, n)
    if optimizer == "lbfgs" and size < n:
        raise ConfigError(f"optimizer='lbfgs' is full batch: pass batch_size=None (got {batch_size} for {n} rows)")
    params = [p for p in objective.parameters() if p.requires_grad]
    optimiser: torch.optim.Optimizer
    if optimizer == "lbfgs":
        optimiser = torch.optim.LBFGS(
            params, lr=lr, max_iter=1, max_eval=20, history_size=20, line_search_fn="strong_wolfe"
        )
    else:
        optimiser = torch.optim.Adam(params, lr=lr)
    gen = torch_generator(seed)
    result = FitResult()
    best_state = copy.deepcopy(objective.state_dict())
    bar = tqdm(range(epochs), disable=not progress, desc="dkm fit", leave=False)
    for epoch in bar:
        objective.train()
        if optimizer == "lbfgs":
            sums = _lbfgs_epoch(objective, optimiser, x, y, epoch)
        else:
            order = torch.randperm(n, generator=gen) if size < n else torch.arange(n)  # full batch keeps the order
            sums = _adam_epoch(objective, optimiser, x, y, order, size, epoch)
        if validation is not None:
            objective.eval()
            validation_loss = cast(Callable[..., float], objective.validation_loss)
            sums["val/loss"] = validation_loss(*validation, train_y=y)
        result.history.append(sums)
        monitored = sums["val/loss" if validation is not None else "train/loss"]
        bar.set_postfix(loss=f"{monitored:.4f}")
        if epoch == 0 or monitored < result.best_loss - 1e-6 * abs(result.best_loss):
            result.best_epoch, result.best_loss = epoch, monitored
            best_state = copy.deepcopy(objective.state_dict())
        elif patience is not None and epoch - result.best_epoch >= patience:
            result.stopped_early = True
            break
    objective.load_state_dict(best_state)
    objective.eval()
    return result


__all__ = ["OPTIMIZERS", "FitResult", "fit"]
