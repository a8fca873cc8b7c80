"""The covariance of log-probability and advantage that drives entropy (Cui et al. 2025, Eq. 8-10).

* ``token_covariance``: Eq. 10, per valid token
  ``(log pi(y_i) - mean_j log pi(y_j)) (A(y_i) - mean_j A(y_j))`` with means over the valid tokens of
  the batch given (or of every rank's batch with ``accelerator``).
* ``response_covariance``: Eq. 8-9, per prompt group ``(1/K) sum_i (l_i - mean l)(A_i - mean A)``
  with ``l_i`` the length-normalised log-probability of response ``i`` and ``A_i`` its advantage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from entropy_rl._distributed import gather_rows
from entropy_rl._inputs import check_tokens
from klcore.errors import ConfigError, MaskError

if TYPE_CHECKING:
    from accelerate import Accelerator


def centred_product(log_prob: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eq. 10 on tensors already validated: ``[B, T]`` float32, zero at invalid positions."""
    m = valid.float()
    n = m.sum()
    if float(n) == 0:
        raise MaskError("the mask selects no token; the covariance needs at least one valid token")
    lp = log_prob.detach().float()
    adv = advantages.detach().float()
    mean_lp = (lp * m).sum() / n
    mean_adv = (adv * m).sum() / n
    return torch.where(valid, (adv - mean_adv) * (lp - mean_lp), torch.zeros((), device=lp.device))


def token_covariance(
    log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, accelerator: Accelerator | None = None
) -> torch.Tensor:
    """Per-token centred product of Eq. 10, ``[B, T]`` float32 (zero at padding), detached.

    With ``accelerator`` the means are over the valid tokens of every process's batch (every process
    must call it). The mean of the result over valid tokens is the batch covariance.
    """
    valid = check_tokens({"log_prob": log_prob, "advantages": advantages}, mask)
    if accelerator is None or accelerator.num_processes == 1:
        return centred_product(log_prob, advantages, valid)
    channels = torch.stack([log_prob.detach().float(), advantages.detach().float(), valid.float()], -1)
    everything, first = gather_rows(channels, accelerator)
    cov = centred_product(everything[..., 0], everything[..., 1], everything[..., 2] > 0)
    rows, width = log_prob.shape
    return cov[first : first + rows, :width]


def response_covariance(
    log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Eq. 8-9 per prompt group, ``[rows // group_size]`` float32.

    Rows are consecutive groups of ``group_size`` responses to one prompt (GRPO's layout);
    ``advantages`` are per token (a response's advantage is the mean over its valid tokens).
    Responses without a valid token are skipped; a group keeps the mean over the rest.
    """
    valid = check_tokens({"log_prob": log_prob, "advantages": advantages}, mask)
    rows = log_prob.shape[0]
    if not isinstance(group_size, int) or group_size < 1 or rows % group_size:
        raise ConfigError(f"group_size must be a positive int dividing the {rows} rows, got {group_size!r}")
    m = valid.float()
    lengths = m.sum(-1)
    if not bool((lengths > 0).any()):
        raise MaskError("no response has a valid token; the response covariance needs at least one")
    denom = lengths.clamp(min=1)
    seq_lp = ((log_prob.detach().float() * m).sum(-1) / denom).view(-1, group_size)
    seq_adv = ((advantages.detach().float() * m).sum(-1) / denom).view(-1, group_size)
    w = (lengths > 0).float().view(-1, group_size)
    k = w.sum(-1).clamp(min=1)
    mean_lp = (seq_lp * w).sum(-1, keepdim=True) / k.unsqueeze(-1)
    mean_adv = (seq_adv * w).sum(-1, keepdim=True) / k.unsqueeze(-1)
    return ((seq_lp - mean_lp) * (seq_adv - mean_adv) * w).sum(-1) / k


__all__ = ["response_covariance", "token_covariance"]
