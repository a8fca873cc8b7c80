"""A convenience training loop: Adam, minibatches, progress bar and early stopping (the user may own the loop)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from klcore.errors import ConfigError, NonFiniteError, ShapeError

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class FitResult:
    """``history``: one dict of epoch-mean metrics per epoch (``train/loss``, ``val/loss`` when validating, and
    the objective's own metrics); ``best_epoch``/``best_loss``: the monitored loss's minimum, whose weights are kept."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_loss: float = math.inf
    stopped_early: bool = False


def fit(
    objective: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 200,
    batch_size: int | None = None,
    lr: float = 0.01,
    patience: int | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> FitResult:
    """Minimise ``objective(x_batch, y_batch) -> (loss, metrics)`` with Adam over ``epochs`` passes.

    ``batch_size=None`` is full batch, in the given row order (what ``FullDKMObjective`` needs). With
    ``patience``, training stops after that many epochs without improvement of the monitored loss
    (``val/loss`` when ``validation`` is given, else ``train/loss``); the best weights are restored in both cases. Shuffling uses a generator seeded by ``seed``.
    """
    if epochs < 1 or (batch_size is not None and batch_size < 1) or not lr > 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1 (or None) and lr > 0; got {epochs}, {batch_size}, {lr}")
    if patience is not None and patience < 1:
        raise ConfigError(f"patience must be >= 1 or None, got {patience}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ShapeError(f"x and y need the same non-zero number of rows, got {x.shape[0]} and {y.shape[0]}")
    params = [p for p in objective.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    size = n if batch_size is None else min(batch_size, n)
    result = FitResult()
    best_state = copy.deepcopy(objective.state_dict())
    bar = tqdm(range(epochs), disable=not progress, desc="dkm fit", leave=False)
    for epoch in bar:
        objective.train()
        order = torch.randperm(n, generator=gen) if size < n else torch.arange(n)  # full batch keeps the order
        sums: dict[str, float] = {}
        for start in range(0, n, size):
            idx = order[start : start + size]
            optimiser.zero_grad()
            loss, metrics = objective(x[idx], y[idx])
            if not torch.isfinite(loss):
                raise NonFiniteError(f"the loss became {loss.item()} at epoch {epoch}; lower lr or raise dkm.jitter")
            loss.backward()
            optimiser.step()
            weight = idx.numel() / n
            for key, value in {"train/loss": loss.item(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + weight * value
        if validation is not None:
            objective.eval()
            with torch.no_grad():
                sums["val/loss"] = objective(*validation)[0].item()
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


__all__ = ["FitResult", "fit"]
