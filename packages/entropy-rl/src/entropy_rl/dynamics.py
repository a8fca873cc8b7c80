"""Entropy dynamics (Cui et al. 2025, Sec. 3): the first-order entropy change and a run-time probe.

Lemma 1: for a softmax policy pi = softmax(z) at one state, a logit change dz changes the entropy by
``H(z + dz) - H(z) = -Cov_{a ~ pi}(log pi(a), dz_a) + O(|dz|^2)``. With vanilla policy gradient
``dz = eta pi A`` (Theorem 1) and with natural policy gradient ``dz = eta A`` (Theorem 2).

:class:`EntropyDynamics` is a klcore metric plugin (``trainer.metrics = {entropy_dynamics = {}}``)
that logs, per step, the entropy on the batch's states before and after the update, the first-order
prediction of its change from the logit change the update actually made, the measured change on
the same states, and the covariance of log-prob and advantage (token and response level).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.utils import gather_object

from entropy_rl.covariance import response_covariance, token_covariance
from entropy_rl.diagnostics import (
    covariance_entropy_agreement,
    sequence_mean_entropy,
    top_covariance_means,
    top_positive_share,
)
from klcore.errors import CheckpointError, ConfigError, DataError, DTypeError, NonFiniteError, ShapeError
from klcore.hookspecs import hookimpl
from klcore.rollout import forward_accepts

#: Default selection ratio of each loss (for ``cov/top_frac`` when the probe has no ``ratio``).
LOSS_RATIOS = {"clip_cov": 2e-4, "kl_cov": 2e-3}

NEEDED_KEYS = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask", "old_log_prob", "advantages")


def _entropy_of(log_p: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros((), device=p.device)).sum(-1)


def entropy_change_first_order(logits: torch.Tensor, delta_logits: torch.Tensor) -> torch.Tensor:
    """Lemma 1: ``-Cov_{a ~ softmax(logits)}(log pi(a), delta_logits_a)`` per state, shape ``[...]`` float32.

    ``logits`` and ``delta_logits`` are ``[..., V]``; adding a constant to ``delta_logits`` changes nothing.
    """
    for name, t in (("logits", logits), ("delta_logits", delta_logits)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise DTypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if logits.shape != delta_logits.shape:
        raise ShapeError(f"logits {tuple(logits.shape)} and delta_logits {tuple(delta_logits.shape)} must match")
    z = logits.detach().float()
    if bool((torch.isnan(z) | (z == math.inf)).any()):
        raise NonFiniteError("logits hold NaN or +inf; only -inf (an action of probability 0) is allowed")
    if bool((z == -math.inf).all(-1).any()):
        raise NonFiniteError("a state has every logit -inf (no action of positive probability); drop that state")
    log_p = torch.log_softmax(logits.float(), -1)
    p = log_p.exp()
    d = delta_logits.float()
    if bool(((p > 0) & ~torch.isfinite(d.detach())).any()):
        raise NonFiniteError("delta_logits is NaN or inf at an action of positive probability; check the update")
    p_log_p = torch.where(p > 0, p * log_p, torch.zeros((), device=p.device))
    d = torch.where(p > 0, d, torch.zeros((), device=p.device))  # actions of probability 0 do not count
    return -((p_log_p * d).sum(-1) - p_log_p.sum(-1) * (p * d).sum(-1))


def _response_log_softmax(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor:
    r = batch["responses"].shape[1]
    kwargs: dict[str, Any] = {"logits_to_keep": r + 1} if forward_accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        use_cache=False, **kwargs,
    )
    return torch.log_softmax(out.logits[:, -(r + 1) : -1].float() / temperature, -1)


class EntropyDynamics:
    """Run-time probe: predicted versus measured entropy change of each update (klcore metric plugin).

    ``max_states``: at most this many valid response positions of the step's batch (drawn with
    ``seed`` and the step) keep their full old distribution (``max_states x V`` float32) for the
    prediction; the entropy means use every valid token. Costs two extra forward passes per step.
    Needs a trainer whose batch has the GRPO keys (``input_ids``, ``responses``, ``response_mask``,
    ``old_log_prob``, ``advantages``, ...). Metrics:

    * ``dynamics/entropy``, ``dynamics/entropy_after``: token-mean entropy of the batch's response
      positions before and after the step's update;
    * ``dynamics/cov_token``: Eq. 10 token covariance of log-prob and advantage (mean over tokens);
    * ``dynamics/cov_response``: Eq. 8-9 response-level covariance, mean over prompt groups;
    * ``dynamics/entropy_seq_mean`` (``_after``): Eq. 5 entropy (token mean per response, then mean);
    * ``dynamics/cov_top_0.0002`` / ``_0.002`` / ``_0.02``: Table 1, mean covariance of the top share of tokens;
    * ``cov/top_frac``: share of the summed positive token covariance carried by the top ``ratio`` tokens;
    * ``cov/warn_bounds_select_none`` / ``cov/warn_ratio_select_none``: 1 when no token lies inside
      ``cov_bounds`` / when ``ratio`` times the tokens per selection is below one (also a warning);
    * ``dynamics/run_corr_cov_neg_dh``, ``dynamics/run_cov_positive_frac``: over this process's steps so far,
      corr(response covariance, -dH) (dH the Eq. 5 change on the batch) and the share of steps with cov > 0
      (their per-step series are stored in the run's checkpoints, one per process, so a resume continues them);
    * ``dynamics/predicted_change``: Lemma 1 with the logit change the update made, mean over the
      sampled states; ``dynamics/actual_change``: the measured entropy change on the same states.
    """

    def __init__(
        self, max_states: int = 1024, seed: int = 0, ratio: float | None = None,
        cov_bounds: Sequence[float] | None = None,
    ) -> None:
        if isinstance(max_states, bool) or not isinstance(max_states, int) or max_states < 1:
            raise ConfigError(f"max_states must be a positive int, got {max_states!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
            raise ConfigError(f"ratio must be None (the loss's) or a fraction in (0, 1), got {ratio!r}")
        if cov_bounds is not None and (len(cov_bounds) != 2 or not float(cov_bounds[0]) < float(cov_bounds[1])):
            raise ConfigError(f"cov_bounds must be None (the loss's) or (low, high) with low < high, got {cov_bounds!r}")
        self.max_states = max_states
        self.seed = seed
        self.ratio = ratio
        self.cov_bounds = cov_bounds
        self._before: dict[str, Any] | None = None
        self._run_cov: list[float] = []
        self._run_change: list[float] = []
        self._warned = False

    def _selection_metrics(self, trainer: Any, cov: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Table 1 means, ``cov/top_frac`` and the two selection warnings, on this step's batch."""
        config = trainer.config
        loss = getattr(config, "loss", "")
        options = dict(getattr(config, "loss_options", {}) or {})
        ratio = self.ratio or float(options.get("ratio", LOSS_RATIOS.get(loss, LOSS_RATIOS["kl_cov"])))
        lo, hi = (float(v) for v in (self.cov_bounds or options.get("cov_bounds", (1.0, 5.0))))
        out = {f"dynamics/cov_top_{f:g}": v for f, v in top_covariance_means(cov, mask).items()}
        out["cov/top_frac"] = top_positive_share(cov, mask, ratio)
        # tokens one selection sees: a mini-batch (global scope) or a micro-batch
        rows = mask.shape[0] // max(int(getattr(config, "mini_batches", 1)), 1)
        if options.get("scope") == "micro-batch" and int(getattr(config, "micro_batch_size", 0) or 0):
            rows = min(rows, int(config.micro_batch_size))
        tokens = float(mask.sum()) * rows / mask.shape[0]
        values = cov[mask]
        out["cov/warn_bounds_select_none"] = float(not bool(((values > lo) & (values < hi)).any()))
        out["cov/warn_ratio_select_none"] = float(int(ratio * tokens) < 1)
        if not self._warned and (out["cov/warn_bounds_select_none"] or out["cov/warn_ratio_select_none"]):
            self._warned = True
            warnings.warn(
                f"entropy_dynamics: on this batch no token has covariance inside ({lo:g}, {hi:g}) "
                f"(cov/warn_bounds_select_none = {out['cov/warn_bounds_select_none']:g}) or ratio {ratio:g} x "
                f"{tokens:.0f} tokens per selection is below one token (cov/warn_ratio_select_none = "
                f"{out['cov/warn_ratio_select_none']:g}); the paper's values assume far more tokens: scale ratio "
                "or the bounds to your batch",
                stacklevel=2,
            )
        return out

    def _forward_all(
        self, trainer: Any, batch: Mapping[str, torch.Tensor], states: torch.Tensor
    ) -> tuple[float, float, torch.Tensor]:
        """Token-mean and Eq. 5 entropy over valid positions, the log-softmax ``[S, V]`` at ``states``."""
        model = trainer.unwrapped_model
        temperature = float(getattr(trainer.config, "temperature", 1.0))
        rows = batch["responses"].shape[0]
        chunk = int(getattr(trainer.config, "micro_batch_size", 0)) or rows
        mask = batch["response_mask"].bool()
        token_entropy, picked = [], []
        with torch.no_grad():
            for start in range(0, rows, chunk):
                part = {k: batch[k][start : start + chunk] for k in NEEDED_KEYS}
                log_p = _response_log_softmax(model, part, temperature)
                token_entropy.append(_entropy_of(log_p) * mask[start : start + chunk])
                inside = (states[:, 0] >= start) & (states[:, 0] < start + chunk)
                sel = states[inside]
                picked.append(log_p[sel[:, 0] - start, sel[:, 1]])
        ent = torch.cat(token_entropy)
        token_mean = float(ent.sum()) / max(int(mask.sum()), 1)
        seq_mean = sequence_mean_entropy(ent, mask) if bool(mask.any()) else float("nan")
        return token_mean, seq_mean, torch.cat(picked)

    @hookimpl
    def klcore_batch_ready(self, trainer: Any, step: int, batch: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in NEEDED_KEYS if k not in batch]
        if missing:
            raise DataError(f"entropy_dynamics needs the batch keys {list(NEEDED_KEYS)}; this trainer's batch lacks {missing}")
        mask = batch["response_mask"].bool()
        valid = mask.nonzero()
        if valid.shape[0] > self.max_states:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            keep = torch.randperm(valid.shape[0], generator=g)[: self.max_states].sort().values
            valid = valid[keep.to(valid.device)]
        entropy, entropy_seq, log_p = self._forward_all(trainer, batch, valid)
        metrics = {"dynamics/entropy": entropy, "dynamics/entropy_seq_mean": entropy_seq}
        if valid.shape[0]:
            cov = token_covariance(batch["old_log_prob"], batch["advantages"], mask)
            metrics["dynamics/cov_token"] = float(cov[mask].mean())
            metrics.update(self._selection_metrics(trainer, cov, mask))
        group = getattr(trainer.config, "group_size", 0)
        if group and mask.shape[0] % group == 0 and bool(mask.any()):
            metrics["dynamics/cov_response"] = float(
                response_covariance(batch["old_log_prob"], batch["advantages"], mask, group).mean()
            )
        self._before = {"states": valid, "log_p": log_p, "metrics": metrics}

    @hookimpl
    def klcore_step_end(self, trainer: Any, step: int, batch: Mapping[str, torch.Tensor]) -> dict[str, float] | None:
        if self._before is None:
            return None
        before, self._before = self._before, None
        entropy_after, entropy_seq_after, log_p = self._forward_all(trainer, batch, before["states"])
        old = before["log_p"]
        metrics = dict(before["metrics"])
        metrics["dynamics/entropy_after"] = entropy_after
        metrics["dynamics/entropy_seq_mean_after"] = entropy_seq_after
        key = "dynamics/cov_response" if "dynamics/cov_response" in metrics else "dynamics/cov_token"
        if key in metrics and math.isfinite(entropy_seq_after - metrics["dynamics/entropy_seq_mean"]):
            self._run_cov.append(metrics[key])
            self._run_change.append(entropy_seq_after - metrics["dynamics/entropy_seq_mean"])
            corr, positive = covariance_entropy_agreement(self._run_cov, self._run_change)
            metrics["dynamics/run_cov_positive_frac"] = positive
            if math.isfinite(corr):
                metrics["dynamics/run_corr_cov_neg_dh"] = corr
        if old.shape[0]:
            metrics["dynamics/predicted_change"] = float(entropy_change_first_order(old, log_p - old).mean())
            metrics["dynamics/actual_change"] = float((_entropy_of(log_p) - _entropy_of(old)).mean())
        return metrics

    @hookimpl
    def klcore_save_checkpoint(self, trainer: Any) -> dict[str, list[torch.Tensor]]:
        """The run statistics' per-step series, ``[2, steps]`` float64 (cov, dH) per process, rank order."""
        own = torch.tensor([self._run_cov, self._run_change], dtype=torch.float64).reshape(2, -1)
        processes = _processes(trainer)[0]
        return {"run_series": gather_object([own]) if processes > 1 else [own]}

    @hookimpl
    def klcore_load_checkpoint(self, trainer: Any, state: Mapping[str, Any]) -> None:
        series = state.get("run_series") if isinstance(state, Mapping) else None
        processes, rank = _processes(trainer)
        if not isinstance(series, list) or len(series) != processes:
            saved = len(series) if isinstance(series, list) else "no"
            raise CheckpointError(
                f"the checkpoint holds entropy_dynamics run statistics of {saved} processes but this run has "
                f"{processes} processes; resume with the process count that wrote the checkpoint"
            )
        own = series[rank]
        if not isinstance(own, torch.Tensor) or own.ndim != 2 or own.shape[0] != 2:
            raise CheckpointError(f"entropy_dynamics run statistics must be a [2, steps] tensor, got {own!r}")
        self._run_cov, self._run_change = own[0].tolist(), own[1].tolist()


def _processes(trainer: Any) -> tuple[int, int]:
    """(number of processes, this process's index) of the trainer's accelerator; (1, 0) without one."""
    accelerator = getattr(trainer, "accelerator", None)
    return int(getattr(accelerator, "num_processes", 1)), int(getattr(accelerator, "process_index", 0))


__all__ = ["EntropyDynamics", "entropy_change_first_order"]
