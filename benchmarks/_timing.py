"""Timing helpers the benchmark scripts share (not a benchmark: ``nox -s bench`` skips ``_*.py``)."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback


def sync(device: str) -> None:
    """Wait for queued CUDA work, so wall-clock times cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Seconds of every optimiser step of a Hugging Face ``Trainer`` (TRL's trainers too) in ``times``."""

    def __init__(self, device: str) -> None:
        self.device, self.times, self._start = device, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        sync(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)
