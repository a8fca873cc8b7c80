"""Calibration errors: top-label ECE for classifiers, interval-coverage error for Gaussian regression."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from klcore.errors import ShapeError


def classification_ece(proba: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top label: sum_b |B_b|/n |accuracy(B_b) - confidence(B_b)| over
    ``bins`` equal-width confidence bins; ``proba [n, C]``, ``labels [n]`` integer classes."""
    if proba.ndim != 2 or labels.shape != (proba.shape[0],):
        raise ShapeError(f"need proba [n, C] and labels [n], got {proba.shape} and {labels.shape}")
    confidence = proba.max(1)
    correct = (proba.argmax(1) == labels).astype(float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def regression_ece(mean: np.ndarray, std: np.ndarray, y: np.ndarray, levels: int = 9) -> float:
    """Mean |empirical - nominal| coverage of the central Gaussian intervals mean +- z std at the nominal levels
    0.1, 0.2, ..., 0.9 (``levels`` of them): 0 for a calibrated predictive; ``mean``, ``std``, ``y`` are ``[n]``."""
    if not mean.shape == std.shape == y.shape or mean.ndim != 1:
        raise ShapeError(f"need mean, std and y of one shape [n], got {mean.shape}, {std.shape}, {y.shape}")
    nominal = np.arange(1, levels + 1) / (levels + 1)
    z = np.abs(y - mean) / std
    half_widths = np.array([NormalDist().inv_cdf(0.5 + q / 2) for q in nominal])
    covered = (z[:, None] <= half_widths[None]).mean(0)
    return float(np.abs(covered - nominal).mean())


__all__ = ["classification_ece", "regression_ece"]
