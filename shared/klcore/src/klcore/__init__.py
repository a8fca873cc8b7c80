"""klcore: the shared core of divergence-based training methods.

Submodules: ``divergences``, ``logprobs``, ``reduce``, ``advantages``, ``rollout``, ``losses``,
``plugins`` / ``hookspecs``, ``trainer``, ``toy`` (needs ``klcore[lm]``), ``cli``, ``errors``.
"""

from klcore import advantages, divergences, errors, logprobs, reduce
from klcore.errors import KlcoreError
from klcore.hookspecs import Component, hookimpl, hookspec
from klcore.plugins import Plugins, build_plugin_manager
from klcore.recipes import Recipe

__version__ = "0.1.0"

__all__ = [
    "Component",
    "KlcoreError",
    "Plugins",
    "Recipe",
    "__version__",
    "advantages",
    "build_plugin_manager",
    "divergences",
    "errors",
    "hookimpl",
    "hookspec",
    "logprobs",
    "reduce",
]
