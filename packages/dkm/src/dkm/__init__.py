"""Deep kernel machines (Yang et al., ICML 2023): full and sparse DKMs for regression and classification."""

from __future__ import annotations

from dkm.conv import ConvDKM
from dkm.estimators import DKMClassifier, DKMRegressor
from dkm.fitting import FitResult, fit
from dkm.gram import GramBlocks, input_gram
from dkm.kernels import LinearKernel, NormalizedGaussianKernel, ReluKernel, SqExpKernel, arccos_kernel, make_kernel
from dkm.kl import gaussian_kl
from dkm.layers import GramLayer, OutputLayer
from dkm.likelihoods import CategoricalLikelihood, GaussianLikelihood
from dkm.linalg import get_jitter, jitter, safe_cholesky
from dkm.models import DKMOutput, FullDKM, SparseDKM
from dkm.objectives import FullDKMObjective, SparseDKMObjective

__all__ = [
    "CategoricalLikelihood",
    "ConvDKM",
    "DKMClassifier",
    "DKMOutput",
    "DKMRegressor",
    "FitResult",
    "FullDKM",
    "FullDKMObjective",
    "GaussianLikelihood",
    "GramBlocks",
    "GramLayer",
    "LinearKernel",
    "NormalizedGaussianKernel",
    "OutputLayer",
    "ReluKernel",
    "SparseDKM",
    "SparseDKMObjective",
    "SqExpKernel",
    "arccos_kernel",
    "fit",
    "gaussian_kl",
    "get_jitter",
    "input_gram",
    "jitter",
    "make_kernel",
    "safe_cholesky",
]
