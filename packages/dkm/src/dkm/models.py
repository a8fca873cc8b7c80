"""DKM models: the full DKM (all training points learned) and the sparse, inducing-point DKM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from dkm._random import RandomState, torch_generator
from dkm.gram import GramBlocks, check_inputs, input_gram
from dkm.kernels import make_kernel
from dkm.layers import GramLayer, OutputLayer
from dkm.linalg import safe_cholesky
from klcore.errors import ConfigError, DataError

DEFAULT_NU = 100.0
"""Default nu: the width of a hidden layer per replicated output column (see docs/dkm.md, "Choosing nu")."""


@dataclass
class DKMOutput:
    """Latent predictive marginals at test points: ``mean [P_t, C]``, ``var [P_t]`` (shared by the C
    outputs) and ``kl``, the summed penalty sum_l nu_l KL_l + output KL (a scalar)."""

    mean: torch.Tensor
    var: torch.Tensor
    kl: torch.Tensor


def layer_nus(nu: float | Sequence[float], num_layers: int) -> list[float]:
    """nu per hidden layer from a scalar or a sequence of length ``num_layers``."""
    if num_layers < 0:
        raise ConfigError(f"num_layers must be >= 0, got {num_layers}")
    nus = [float(nu)] * num_layers if isinstance(nu, (int, float)) else [float(v) for v in nu]
    if len(nus) != num_layers:
        raise ConfigError(f"got {len(nus)} values of nu for {num_layers} hidden layers")
    return nus


class GramStack(nn.Module):
    """kernel -> GramLayer -> ... -> kernel: maps the input Gram G0 to the top kernel K(G_L) and the KL penalty."""

    def __init__(
        self,
        num_inducing: int,
        num_layers: int,
        kernel: str,
        nu: float | Sequence[float],
        dtype: torch.dtype,
        *,
        whiten: bool = False,
    ) -> None:
        super().__init__()
        nus = layer_nus(nu, num_layers)
        self.kernels = nn.ModuleList(make_kernel(kernel, dtype=dtype) for _ in range(num_layers + 1))
        self.layers = nn.ModuleList(
            GramLayer(num_inducing, v, name=f"layer {i + 1}", whiten=whiten, dtype=dtype) for i, v in enumerate(nus)
        )

    def forward(self, gram: GramBlocks) -> tuple[GramBlocks, torch.Tensor]:
        penalty = gram.ii.new_zeros(())
        for kernel, layer in zip(self.kernels[:-1], self.layers):
            gram, layer_penalty = layer(kernel(gram))
            penalty = penalty + layer_penalty
        return self.kernels[-1](gram), penalty

    @torch.no_grad()
    def initialise(self, gram: GramBlocks) -> GramBlocks:
        """NNGP forward pass on the inducing block: every G_l = K(G_{l-1}), every KL zero. Returns K(G_L)."""
        gram = GramBlocks(gram.ii)
        for kernel, layer in zip(self.kernels[:-1], self.layers):
            k = kernel(gram)
            cast(GramLayer, layer).initialise(k.ii)
            gram, _ = layer(k)
        return self.kernels[-1](gram)


class InputScales(nn.Module):
    """Learned per-feature input scales s = exp(log_scale) ``[N0]`` (ARD): G0 = X diag(s^2) X^T / N0.

    Starts at s = 1 (G0 = X X^T / N0); with the sqexp kernel the ARD lengthscales are sqrt(N0) / s."""

    def __init__(self, features: int, *, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(features, dtype=dtype))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()


def _scales(module: InputScales | None) -> torch.Tensor | None:
    return None if module is None else module()


class FullDKM(nn.Module):
    """The full DKM on ``train_x [P, N0]``: one learned P x P Gram per hidden layer (O(P^3), small data).

    ``forward()`` returns (K(G_L) on the training points, sum_l nu_l KL_l); ``forward(x)`` adds the
    test blocks for ``x`` through the sparse conditional with the training points as inducing points.
    Use with ``FullDKMObjective`` and a ``GaussianLikelihood``. ``ard=True`` learns one input scale per
    feature (``InputScales``); ``whiten=True`` learns each G relative to its prior K (see ``GramLayer``).
    """

    train_x: torch.Tensor

    def __init__(
        self,
        train_x: torch.Tensor,
        *,
        num_layers: int = 1,
        kernel: str = "relu",
        nu: float | Sequence[float] = DEFAULT_NU,
        ard: bool = False,
        whiten: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        train_x = check_inputs(train_x, "train_x").to(dtype)
        self.register_buffer("train_x", train_x)
        self.input_scales = InputScales(train_x.shape[1], dtype=dtype) if ard else None
        self.stack = GramStack(train_x.shape[0], num_layers, kernel, nu, dtype, whiten=whiten)
        self.to(train_x.device)
        self.initialise()

    def initialise(self) -> None:
        """Reset every learned Gram to the NNGP forward pass (all KLs zero) at the current input scales."""
        self.stack.initialise(input_gram(self.train_x, scales=_scales(self.input_scales)))

    def forward(self, x: torch.Tensor | None = None) -> tuple[GramBlocks, torch.Tensor]:
        scales = _scales(self.input_scales)
        if x is None:
            return self.stack(input_gram(self.train_x, scales=scales))
        x = check_inputs(x, "x", self.train_x.shape[1]).to(self.train_x.dtype)
        return self.stack(input_gram(self.train_x, x, scales))

    def predict(self, x: torch.Tensor, train_y: torch.Tensor, noise: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
        """Latent GP predictive at ``x`` given the top kernel: mean ``[P_t, C]`` and var ``[P_t]``
        (add ``noise`` for the predictive of y)."""
        k, _ = self(x)
        if k.ti is None or k.t is None:
            raise DataError("internal: the full DKM returned no test blocks for x")
        y = train_y[:, None] if train_y.ndim == 1 else train_y
        if y.shape[0] != k.ii.shape[0]:
            raise DataError(f"train_y has {y.shape[0]} rows, the model holds {k.ii.shape[0]} training points")
        if not torch.isfinite(y).all():
            raise DataError("train_y holds NaN or infinite values; drop or impute them first")
        eye = torch.eye(k.ii.shape[0], dtype=k.ii.dtype, device=k.ii.device)
        chol = safe_cholesky(k.ii + noise * eye, name="K(G_L) + noise I")
        mean = k.ti @ torch.cholesky_solve(y.to(k.ii.dtype), chol)
        v = torch.linalg.solve_triangular(chol, k.ti.T, upper=False)
        return mean, (k.t - v.square().sum(0)).clamp_min(0.0)


class SparseDKM(nn.Module):
    """The sparse DKM: learned inducing inputs ``[P_i, N0]``, learned inducing Grams, variational output.

    ``forward(x [P_t, N0]) -> DKMOutput``; one step costs O(P_i^3 + P_i^2 P_t) per layer, linear in the batch.
    Built at the NNGP initialisation (every KL zero, q(f) = prior). ``ard=True`` learns one input scale per
    feature (``InputScales``), applied to the inducing and the test inputs alike; ``whiten`` as in ``GramLayer``.
    """

    def __init__(
        self,
        inducing_inputs: torch.Tensor,
        num_outputs: int,
        *,
        num_layers: int = 1,
        kernel: str = "relu",
        nu: float | Sequence[float] = DEFAULT_NU,
        learn_inducing: bool = True,
        ard: bool = False,
        whiten: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        z = check_inputs(inducing_inputs, "inducing_inputs").to(dtype).clone()
        self.inducing_inputs = nn.Parameter(z, requires_grad=learn_inducing)
        self.input_scales = InputScales(z.shape[1], dtype=dtype) if ard else None
        self.num_outputs = num_outputs
        self.stack = GramStack(z.shape[0], num_layers, kernel, nu, dtype, whiten=whiten)
        self.output = OutputLayer(z.shape[0], num_outputs, dtype=dtype)
        self.to(z.device)  # parameters on the inducing inputs' device before the NNGP initialisation
        self.initialise()

    @classmethod
    def from_data(
        cls,
        x: torch.Tensor,
        num_outputs: int,
        num_inducing: int = 100,
        *,
        seed: RandomState = 0,
        **kwargs: object,
    ) -> SparseDKM:
        """Inducing inputs = a random subset of ``min(num_inducing, P)`` distinct rows of ``x``; ``seed`` is
        None, an int or a numpy RandomState (scikit-learn's ``random_state``)."""
        x = check_inputs(x, "x")
        if num_inducing < 1:
            raise ConfigError(f"num_inducing must be >= 1, got {num_inducing}")
        distinct = torch.unique(x, dim=0)
        gen = torch_generator(seed)
        pick = torch.randperm(distinct.shape[0], generator=gen)[: min(num_inducing, distinct.shape[0])]
        return cls(distinct[pick], num_outputs, **kwargs)  # type: ignore[arg-type]

    def initialise(self) -> None:
        """Reset the Grams to the NNGP forward pass and q(f) to the prior (all KLs zero)."""
        k_top = self.stack.initialise(input_gram(self.inducing_inputs, scales=_scales(self.input_scales)))
        self.output.initialise(k_top.ii)

    @property
    def num_inducing(self) -> int:
        return self.inducing_inputs.shape[0]

    def forward(self, x: torch.Tensor) -> DKMOutput:
        x = check_inputs(x, "x", self.inducing_inputs.shape[1]).to(self.inducing_inputs.dtype)
        k, penalty = self.stack(input_gram(self.inducing_inputs, x, _scales(self.input_scales)))
        mean, var, output_kl = self.output(k)
        return DKMOutput(mean, var, penalty + output_kl)


__all__ = ["DEFAULT_NU", "DKMOutput", "FullDKM", "GramStack", "InputScales", "SparseDKM", "layer_nus"]
