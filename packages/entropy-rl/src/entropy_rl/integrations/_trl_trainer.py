"""Implementation of :class:`entropy_rl.integrations.trl.CovGRPOTrainer` (imports trl; private).

TRL's own ``_compute_loss`` computes everything (its surrogate, normalisation, masks, IS correction,
reference KL, entropy bonus, metrics); this subclass only

* sees the per-token log-probs of TRL's forward (by wrapping ``_get_per_token_logps_and_entropies``),
  picks the Clip-Cov / KL-Cov tokens with :mod:`entropy_rl.losses`' selections, and
* Clip-Cov: hands TRL per-token advantages that are 0 at the selected tokens (their policy loss and
  gradient are then exactly 0, the normalisation is untouched);
* KL-Cov: adds ``beta |log rho|`` at the selected tokens, under TRL's token masks, IS weights and the
  ``loss_type``'s normalisation (:func:`normalise`), to TRL's loss.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from trl import GRPOTrainer

from entropy_rl.losses import SCOPES, _check_ratio, _clip_cov_options, clip_cov_selection, kl_cov_selection
from klcore.errors import ConfigError, PluginError

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
OPTIONS: dict[str, tuple[str, ...]] = {
    "clip_cov": ("ratio", "cov_bounds", "scope", "generator"),
    "kl_cov": ("ratio", "beta", "scope"),
}
_WHY_NOT = {
    "cispo": "it replaces the PPO-clip surrogate whose tokens Clip-Cov / KL-Cov act on",
    "sapo": "its soft gate replaces the PPO-clip surrogate whose tokens Clip-Cov / KL-Cov act on",
    "vespo": "its sequence-level gamma weights replace the PPO-clip surrogate",
    "luspo": "it needs importance_sampling_level='sequence' and the covariance selection is per token",
}


def check_config(args: Any, cov_loss: str) -> None:
    """Refuse the GRPOConfig options the covariance losses do not define (``ConfigError`` naming them)."""
    loss_type = getattr(args, "loss_type", None)
    if loss_type not in LOSS_TYPES:
        why = _WHY_NOT.get(str(loss_type), "it is not one of TRL's PPO-clip losses")
        raise ConfigError(
            f"CovGRPOTrainer does not support GRPOConfig(loss_type={loss_type!r}): {why}; use one of {LOSS_TYPES}"
        )
    if getattr(args, "importance_sampling_level", "token") != "token":
        raise ConfigError(
            f"CovGRPOTrainer needs GRPOConfig(importance_sampling_level='token'), got "
            f"{args.importance_sampling_level!r}: the covariance selection and the clip are per token"
        )
    if cov_loss == "clip_cov" and args.epsilon_high is not None and args.epsilon_high < 0:
        raise ConfigError(f"GRPOConfig(epsilon_high=...) must be >= 0 for Clip-Cov, got {args.epsilon_high}")
    if cov_loss == "clip_cov" and not args.epsilon >= 0:
        raise ConfigError(f"GRPOConfig(epsilon=...) must be >= 0 for Clip-Cov, got {args.epsilon}")


def normalise(trainer: Any, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar exactly as TRL 1.16 reduces its policy loss for
    ``trainer.loss_type`` (including the division by the gradient-accumulation steps in training)."""
    m = mask.to(per_token.dtype)
    train = trainer.model.training
    accumulation = trainer.current_gradient_accumulation_steps if train else 1.0
    total = (per_token * m).sum()
    if trainer.loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / accumulation
    if trainer.loss_type == "bnpo":
        return total / m.sum().clamp(min=1.0) / accumulation
    if trainer.loss_type == "dr_grpo":
        return total / (per_token.size(0) * trainer.max_completion_length) / accumulation
    # dapo: tokens of the whole generation batch, per process, per accumulation window
    tokens = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if train:
        tokens = tokens * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return total / tokens


@dataclass
class _Capture:
    """What the wrapped forward saw inside one ``_compute_loss`` call."""

    inputs: dict[str, Any]
    log_prob: torch.Tensor | None = None
    entropies: torch.Tensor | None = None
    selected: torch.Tensor | None = None


def _loss_mask(inputs: dict[str, Any]) -> torch.Tensor:
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


def _token_advantages(inputs: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
    advantages = inputs["advantages"]
    return (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(like)


class CovGRPOTrainer(GRPOTrainer):
    """TRL ``GRPOTrainer`` whose policy loss is Clip-Cov or KL-Cov; other arguments go to TRL unchanged.

    ``cov_loss``: ``"clip_cov"`` or ``"kl_cov"``; ``cov_options``: Clip-Cov ``ratio``, ``cov_bounds``,
    ``scope``, ``generator``; KL-Cov ``ratio``, ``beta`` (the penalty's coefficient, not GRPOConfig's
    ``beta``), ``scope``. The PPO clip is GRPOConfig's ``epsilon`` / ``epsilon_high``. Logs ``cov/selected_frac``
    (and KL-Cov's ``policy/abs_kl``) beside TRL's metrics.
    """

    def __init__(self, *args: Any, cov_loss: str = "clip_cov", cov_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if cov_loss not in OPTIONS:
            raise ConfigError(f"cov_loss must be one of {sorted(OPTIONS)}, got {cov_loss!r}")
        options = dict(cov_options or {})
        if "clip" in options:
            raise ConfigError(
                "cov_options may not set 'clip': Clip-Cov's PPO clip is GRPOConfig(epsilon=..., epsilon_high=...)"
            )
        unknown = sorted(set(options) - set(OPTIONS[cov_loss]))
        if unknown:
            raise ConfigError(f"cov_options for {cov_loss!r} take {OPTIONS[cov_loss]}, got unknown {unknown}")
        if options.get("scope", "global") not in SCOPES:
            raise ConfigError(f"cov_options scope must be one of {SCOPES}, got {options['scope']!r}")
        self.cov_loss = cov_loss
        self.cov_options = options
        self._check_options()
        config = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs).arguments.get("args")
        if config is not None:
            check_config(config, cov_loss)
        self._cov_capture: _Capture | None = None
        super().__init__(*args, **kwargs)
        check_config(self.args, cov_loss)

    def _check_options(self) -> None:
        """Validate ``cov_options`` now, with the losses' own checks (``ConfigError`` on bad values)."""
        if self.cov_loss == "clip_cov":
            options = self._selection_options()
            _clip_cov_options(options.get("ratio", 2e-4), options.get("cov_bounds", (1.0, 5.0)), options["clip"])
            return
        _check_ratio(self.cov_options.get("ratio", 2e-3))
        beta = self.cov_options.get("beta", 1.0)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < float("inf"):
            raise ConfigError(f"cov_options beta (KL-Cov's coefficient) must be a finite number >= 0, got {beta!r}")

    def _selection_options(self, epsilon_low: float = 0.2, epsilon_high: float = 0.2) -> dict[str, Any]:
        options = {k: v for k, v in self.cov_options.items() if k != "beta"}
        if self.cov_loss == "clip_cov":
            # a lower epsilon >= 1 never binds (rho > 0); an infinite upper one is any huge finite bound
            options["clip"] = (min(epsilon_low, 1.0), min(epsilon_high, 1e30))
        return options

    # --- the selection, on the log-probs of TRL's own forward ---------------------------------------

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        capture = self._cov_capture
        if capture is not None and capture.log_prob is None:
            capture.log_prob, capture.entropies = out[0], out[1]
            capture.selected = self._select(capture.inputs, out[0])
            if self.cov_loss == "clip_cov":
                advantages = _token_advantages(capture.inputs, out[0])
                capture.inputs["advantages"] = advantages.masked_fill(capture.selected, 0.0)
        return out

    def _select(self, inputs: dict[str, Any], log_prob: torch.Tensor) -> torch.Tensor:
        mask = _loss_mask(inputs).bool()
        if not bool(mask.any()):
            return torch.zeros_like(mask)
        old = inputs.get("old_per_token_logps")
        old = log_prob.detach() if old is None else old
        advantages = _token_advantages(inputs, log_prob)
        kwargs = {"accelerator": self.accelerator}
        if self.cov_loss == "clip_cov":
            options = self._selection_options(self.epsilon_low, self.epsilon_high)
            return clip_cov_selection(old, log_prob.detach(), advantages, mask, **options, **kwargs)
        return kl_cov_selection(log_prob.detach(), advantages, mask, **self._selection_options(), **kwargs)

    # --- the loss ----------------------------------------------------------------------------------

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        capture = _Capture(dict(inputs))
        self._cov_capture = capture
        try:
            loss = super()._compute_loss(model, capture.inputs)
        finally:
            self._cov_capture = None
        if capture.log_prob is None or capture.selected is None:
            raise PluginError(
                "CovGRPOTrainer saw no forward inside GRPOTrainer._compute_loss; this TRL release computes its "
                "log-probs differently (tested with trl 1.16)"
            )
        mask = _loss_mask(inputs)
        if self.cov_loss == "kl_cov":
            loss = loss + self._kl_cov_penalty(capture, inputs, mask)
        self._log_cov_metrics(capture, inputs, mask)
        return loss

    def _kl_cov_penalty(self, capture: _Capture, inputs: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """``beta |log rho|`` at the selected tokens, weighted like TRL's per-token policy loss, normalised."""
        assert capture.log_prob is not None and capture.selected is not None
        log_prob = capture.log_prob
        old = inputs.get("old_per_token_logps")
        old = log_prob.detach() if old is None else old
        log_ratio = torch.where(mask.bool(), log_prob - old, torch.zeros((), device=log_prob.device))
        per_token = self.cov_options.get("beta", 1.0) * log_ratio.abs() * capture.selected
        if self.off_policy_mask_threshold is not None:
            advantages = inputs["advantages"]
            per_token = per_token * self.get_off_policy_mask(
                advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
                per_token_logps=log_prob,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
        if self.top_entropy_quantile < 1.0:
            assert capture.entropies is not None  # TRL 1.16's loss forward always computes them
            per_token = per_token * self.get_high_entropy_mask(capture.entropies, mask, 1 - self.top_entropy_quantile)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token = per_token * inputs["importance_sampling_ratio"]
        return normalise(self, per_token, mask, inputs)

    def _log_cov_metrics(self, capture: _Capture, inputs: dict[str, Any], mask: torch.Tensor) -> None:
        assert capture.log_prob is not None and capture.selected is not None
        mode = "train" if getattr(self.model, "training", False) else "eval"
        m = mask.float()
        channels = [capture.selected.float()]
        names = ["cov/selected_frac"]
        if self.cov_loss == "kl_cov":
            old = inputs.get("old_per_token_logps")
            log_prob = capture.log_prob.detach()
            log_ratio = log_prob - (log_prob if old is None else old)
            channels.append(torch.where(mask.bool(), log_ratio, torch.zeros((), device=m.device)).abs())
            names.append("policy/abs_kl")
        sums = torch.stack([(c * m).sum() for c in channels] + [m.sum()])
        totals = self.accelerator.reduce(sums, reduction="sum")
        for name, value in zip(names, totals[:-1]):
            self._metrics[mode][name].append((value / totals[-1].clamp(min=1.0)).item())


__all__ = ["LOSS_TYPES", "CovGRPOTrainer", "check_config", "normalise"]
