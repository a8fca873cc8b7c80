"""Exceptions raised by klcore and its packages.

Every error says what was given, what was expected and how to fix it. Each class also derives from
the built-in exception a Python user would try first (``ValueError``, ``KeyError``, ...), so existing
``except`` clauses keep working.
"""

from __future__ import annotations


class KlcoreError(Exception):
    """Base class of every error klcore raises on purpose."""


class ShapeError(KlcoreError, ValueError):
    """A tensor has the wrong number of dimensions or a size that does not match its partner."""


class MaskError(KlcoreError, ValueError):
    """A mask is empty, has the wrong shape, or holds values other than 0/1."""


class NonFiniteError(KlcoreError, ValueError):
    """A tensor holds NaN or infinite values where finite numbers are required."""


class DTypeError(KlcoreError, TypeError):
    """A tensor has a dtype the function cannot use (for example float token ids)."""


class VocabMismatchError(KlcoreError, ValueError):
    """Two distributions or models disagree on the vocabulary size."""


class ConfigError(KlcoreError, ValueError):
    """A configuration value is out of range, of the wrong type, or unknown."""


class PluginError(KlcoreError, RuntimeError):
    """A plugin failed to import or to register its components."""


class DuplicateNameError(KlcoreError, ValueError):
    """Two plugins registered a component of the same kind under the same name."""


class UnknownNameError(KlcoreError, KeyError):
    """A component name is not in the registry; the message lists what is installed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(KlcoreError, TypeError):
    """A model's architecture is not one the function supports."""


class NotPSDError(KlcoreError, ValueError):
    """A matrix that must be positive semi-definite is not, even after adding jitter."""


class CheckpointError(KlcoreError, RuntimeError):
    """A checkpoint is missing, incomplete or incompatible with the run resuming from it."""


class DataError(KlcoreError, ValueError):
    """Input data is missing, malformed or inconsistent."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DTypeError",
    "DataError",
    "DuplicateNameError",
    "KlcoreError",
    "MaskError",
    "NonFiniteError",
    "NotPSDError",
    "PluginError",
    "ShapeError",
    "UnknownNameError",
    "UnsupportedModelError",
    "VocabMismatchError",
]
