"""The convolutional DKM (Milsom et al., ICLR 2024) on small images.

Inter-domain inducing points: the P_i inducing inputs are 3x3xC patches with no spatial extent, while the
test blocks keep a spatial index: ``ti`` is ``[B, H, W, P_i]`` and ``t`` is ``[B, H, W]``. Layers:
``ConvInputGram`` (patches to Grams), any Gram kernel, ``ConvMixup`` (learned 3x3 mixing of the inducing
features), ``GramLayer``, ``GramBatchNorm``, ``GlobalAveragePool`` (Nystrom approximation of the pooled
variance), then the variational ``OutputLayer``.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dkm.gram import GramBlocks
from dkm.kernels import make_kernel
from dkm.layers import GramLayer, OutputLayer
from dkm.linalg import safe_cholesky
from dkm.models import DKMOutput
from klcore.errors import ConfigError, DTypeError, NonFiniteError, ShapeError


def check_images(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Validate ``[B, C, H, W]`` floating, finite images with ``channels`` channels."""
    if not x.is_floating_point():
        raise DTypeError(f"images must be floating point, got {x.dtype}")
    if x.ndim != 4 or x.shape[1] != channels or x.shape[0] == 0:
        raise ShapeError(f"images must be [B, {channels}, H, W] with B > 0, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise NonFiniteError("images hold NaN or infinite values")
    return x


class ConvInputGram(nn.Module):
    """G_ii = vec(Z) vec(Z)^T / (9C), G_ti = conv2d(X, Z, pad 1) / (9C), g_t = avgpool_3x3(mean_c X^2).

    ``patches``: initial inducing patches ``[P_i, C, 3, 3]`` (learned). ``count_include_pad=True`` divides
    g_t by 9 at the border too, as G_ti is (zero padding: G_t,t is the Gram of the zero-padded patch, so
    the blocks are one consistent Gram matrix); ``False`` averages over the pixels inside the image, as the
    reference code does.
    """

    def __init__(self, patches: torch.Tensor, *, count_include_pad: bool = True) -> None:
        super().__init__()
        if patches.ndim != 4 or patches.shape[2:] != (3, 3):
            raise ShapeError(f"inducing patches must be [P_i, C, 3, 3], got shape {tuple(patches.shape)}")
        self.patches = nn.Parameter(patches.clone())
        self.count_include_pad = count_include_pad

    def forward(self, x: torch.Tensor | None = None) -> GramBlocks:
        z = self.patches
        scale = z[0].numel()
        flat = z.reshape(z.shape[0], -1)
        ii = flat @ flat.T / scale
        if x is None:
            return GramBlocks(ii)
        ti = F.conv2d(x, z, padding=1).permute(0, 2, 3, 1) / scale
        t = F.avg_pool2d(
            x.square().mean(1, keepdim=True), 3, stride=1, padding=1, count_include_pad=self.count_include_pad
        )[:, 0]
        return GramBlocks(ii, ti, t)


class ConvMixup(nn.Module):
    """Learned 3x3 mixing C ``[P_out, P_in, 3, 3]`` (latent weights scaled by 1/sqrt(P_in)):
    K_ii <- mean_d C_d K_ii C_d^T, K_ti <- conv2d(K_ti, C, pad 1, stride) / 9, k_t <- avgpool_3x3(k_t)
    (``count_include_pad`` as in ``ConvInputGram``)."""

    def __init__(
        self,
        p_in: int,
        p_out: int,
        *,
        stride: int = 1,
        count_include_pad: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if p_in < 1 or p_out < 1 or stride < 1:
            raise ConfigError(f"need p_in, p_out, stride >= 1, got {p_in}, {p_out}, {stride}")
        self.weight = nn.Parameter(torch.randn(p_out, p_in, 3, 3, dtype=dtype))
        self.stride = stride
        self.count_include_pad = count_include_pad

    def forward(self, k: GramBlocks) -> GramBlocks:
        c = self.weight / math.sqrt(self.weight.shape[1])
        taps = c.permute(2, 3, 0, 1).reshape(9, c.shape[0], c.shape[1])
        ii = (taps @ k.ii @ taps.transpose(1, 2)).mean(0)
        if k.ti is None or k.t is None:
            return GramBlocks(ii)
        ti = F.conv2d(k.ti.permute(0, 3, 1, 2), c, padding=1, stride=self.stride).permute(0, 2, 3, 1) / 9
        t = F.avg_pool2d(k.t[:, None], 3, stride=self.stride, padding=1, count_include_pad=self.count_include_pad)[:, 0]
        return GramBlocks(ii, ti, t)


class GramBatchNorm(nn.Module):
    """ "Global" Gram batch norm: G_ii / mean diag G_ii, G_ti / sqrt(mean diag G_ii mean g_t), g_t / mean g_t,
    then learned scales: G_ii s_i^2, G_ti s_i s_t, g_t s_t^2. mean g_t is the batch mean in training and a
    running mean (momentum 0.1, as torch BatchNorm) in eval mode."""

    running_mean_t: torch.Tensor

    def __init__(self, *, momentum: float = 0.1, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.log_scale_i = nn.Parameter(torch.zeros((), dtype=dtype))
        self.log_scale_t = nn.Parameter(torch.zeros((), dtype=dtype))
        self.momentum = momentum
        self.register_buffer("running_mean_t", torch.ones((), dtype=dtype))

    def forward(self, g: GramBlocks) -> GramBlocks:
        mean_i = g.ii.diagonal().mean()
        s_i, s_t = self.log_scale_i.exp(), self.log_scale_t.exp()
        ii = g.ii / mean_i * s_i.square()
        if g.ti is None or g.t is None:
            return GramBlocks(ii)
        if self.training:
            mean_t = g.t.mean()
            with torch.no_grad():
                self.running_mean_t.lerp_(mean_t.detach(), self.momentum)
        else:
            mean_t = self.running_mean_t
        ti = g.ti / torch.sqrt(mean_i * mean_t) * s_i * s_t
        return GramBlocks(ii, ti, g.t / mean_t * s_t.square())


class GlobalAveragePool(nn.Module):
    """Spatial mean of the features (Nystrom GAP): K_ti <- mean_s K_ti[s] (= k_bar),
    k_t <- k_bar K_ii^-1 k_bar^T + S^-2 sum_s (k_t[s] - K_ti[s] K_ii^-1 K_it[s]); output blocks are flat."""

    def forward(self, k: GramBlocks) -> GramBlocks:
        if k.ti is None or k.t is None:
            return GramBlocks(k.ii)
        b, s = k.ti.shape[0], k.ti.shape[1] * k.ti.shape[2]
        chol = safe_cholesky(k.ii, name="K_ii before global average pooling")
        ti = k.ti.reshape(b, s, -1)
        mean = ti.mean(1)
        solved_mean = torch.linalg.solve_triangular(chol, mean.T, upper=False)
        solved = torch.linalg.solve_triangular(chol, ti.reshape(b * s, -1).T, upper=False)
        residual = k.t.reshape(b, s) - solved.square().sum(0).reshape(b, s)
        return GramBlocks(k.ii, mean, solved_mean.square().sum(0) + residual.sum(1) / s**2)


class ConvDKM(nn.Module):
    """ConvInputGram -> kernel -> ConvMixup -> GramLayer -> GramBatchNorm -> [kernel -> ConvMixup(stride) ->
    GramLayer -> GramBatchNorm] x (len(strides)) -> GlobalAveragePool -> kernel -> GramBatchNorm -> OutputLayer.

    ``patches``: initial inducing patches ``[P_i, C, 3, 3]`` (e.g. random patches of training images);
    every layer uses P_i inducing points. ``forward(images [B, C, H, W]) -> DKMOutput``. The head is the
    reference's (top layer -> kernel -> Gram batch norm -> output); ``head_norm=False`` drops that last batch
    norm. ``count_include_pad``: see ``ConvInputGram`` (True: our self-consistent border; False: the reference).
    """

    def __init__(
        self,
        patches: torch.Tensor,
        num_classes: int,
        *,
        strides: tuple[int, ...] = (2,),
        kernel: str = "relu",
        nu: float = 0.01,
        head_norm: bool = True,
        count_include_pad: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        patches = patches.to(dtype)
        p = patches.shape[0]
        self.channels = patches.shape[1]
        self.num_outputs = num_classes
        self.input = ConvInputGram(patches, count_include_pad=count_include_pad)
        self.kernels = nn.ModuleList(make_kernel(kernel, dtype=dtype) for _ in range(len(strides) + 2))
        self.mixups = nn.ModuleList(
            ConvMixup(p, p, stride=s, count_include_pad=count_include_pad, dtype=dtype) for s in (1, *strides)
        )
        self.layers = nn.ModuleList(
            GramLayer(p, nu, name=f"conv layer {i + 1}", dtype=dtype) for i in range(len(strides) + 1)
        )
        self.norms = nn.ModuleList(GramBatchNorm(dtype=dtype) for _ in range(len(strides) + 1))
        self.pool = GlobalAveragePool()
        self.head_norm = GramBatchNorm(dtype=dtype) if head_norm else None
        self.output = OutputLayer(p, num_classes, dtype=dtype)
        self.to(patches.device)
        self.initialise()

    @classmethod
    def from_images(
        cls, images: torch.Tensor, num_classes: int, num_inducing: int = 32, *, seed: int = 0, **kwargs: object
    ) -> ConvDKM:
        """Inducing patches = ``num_inducing`` distinct random 3x3 patches of ``images [B, C, H, W]``."""
        if images.ndim != 4 or images.shape[2] < 3 or images.shape[3] < 3:
            raise ShapeError(f"images must be [B, C, H, W] with H, W >= 3, got shape {tuple(images.shape)}")
        images = check_images(images, images.shape[1])
        if num_inducing < 1:
            raise ConfigError(f"num_inducing must be >= 1, got {num_inducing}")
        gen = torch.Generator().manual_seed(seed)
        patches = F.unfold(images, 3)  # [B, C*9, L]
        flat = torch.unique(patches.permute(0, 2, 1).reshape(-1, patches.shape[1]), dim=0)
        if num_inducing > flat.shape[0]:
            raise ConfigError(
                f"asked for {num_inducing} inducing patches but the {images.shape[0]} image(s) of size "
                f"{images.shape[2]}x{images.shape[3]} hold only {flat.shape[0]} distinct 3x3 patches; "
                "pass more or larger images or a smaller num_inducing"
            )
        flat = flat[torch.randperm(flat.shape[0], generator=gen)[:num_inducing]]
        return cls(flat.reshape(-1, images.shape[1], 3, 3), num_classes, **kwargs)  # type: ignore[arg-type]

    def _propagate(self, g: GramBlocks, *, initialise: bool = False) -> tuple[GramBlocks, torch.Tensor]:
        penalty = g.ii.new_zeros(())
        for kernel, mixup, layer, norm in zip(self.kernels, self.mixups, self.layers, self.norms):
            k = mixup(kernel(g))
            if initialise:
                cast(GramLayer, layer).initialise(k.ii)
            g, layer_penalty = layer(k)
            g = norm(g)
            penalty = penalty + layer_penalty
        k_top = self.kernels[-1](self.pool(g))
        return (k_top if self.head_norm is None else self.head_norm(k_top)), penalty

    @torch.no_grad()
    def initialise(self) -> None:
        """NNGP forward pass on the inducing block (every KL zero) and q(f) = prior."""
        k_top, _ = self._propagate(self.input(), initialise=True)
        self.output.initialise(k_top.ii)

    def forward(self, images: torch.Tensor) -> DKMOutput:
        images = check_images(images, self.channels).to(self.input.patches.dtype)
        k, penalty = self._propagate(self.input(images))
        mean, var, output_kl = self.output(k)
        return DKMOutput(mean, var, penalty + output_kl)


__all__ = ["ConvDKM", "ConvInputGram", "ConvMixup", "GlobalAveragePool", "GramBatchNorm", "check_images"]
