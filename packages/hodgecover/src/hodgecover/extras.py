"""The error for a missing optional dependency of hodgecover."""

from __future__ import annotations

from klcore.errors import KlcoreError


class MissingExtraError(KlcoreError, ImportError):
    """An optional dependency of hodgecover is not installed; the message names the extra to install."""


__all__ = ["MissingExtraError"]
