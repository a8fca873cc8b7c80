"""The one-time warning when most online samples hit the length limit (private; shared by HyPO's trainers)."""

from __future__ import annotations

import warnings


def warn_truncated_once(truncated: float, max_new_tokens: int, warned: bool) -> bool:
    """Warn (once: pass the returned flag back) when over half the samples, ``truncated`` in [0, 1], lack EOS."""
    if truncated > 0.5 and not warned:
        warnings.warn(
            f"{truncated:.0%} of HyPO's online samples reached max_new_tokens = {max_new_tokens} without EOS; "
            "the online KL of their untruncated answers is underestimated: raise max_new_tokens",
            stacklevel=3,
        )
        return True
    return warned
