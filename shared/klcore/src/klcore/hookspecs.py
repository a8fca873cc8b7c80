"""The pluggy hook specifications of klcore (project name and entry-point group ``klcore``).

Two kinds of hook, one documented spec per event:

* Registration hooks, called once per plugin when a plugin manager is built. Each returns an
  iterable of :class:`Component` records; the manager files them in per-kind registries and rejects
  a name registered twice, naming both owners.
* Run-time hooks, called by a trainer at fixed points of a run. Implement only the arguments you
  need (pluggy passes a subset). A regulariser or metric component is an object with run-time hook
  implementations that a run registers when its config enables it, so an installed plugin changes
  no run that did not ask for it.

Write implementations with ``klcore.hookimpl``::

    from klcore import hookimpl, Component

    @hookimpl
    def klcore_register_losses():
        return [Component("my_loss", my_loss, help="one line for `klcore plugins`")]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from klcore.reduce import GlobalCounts

PROJECT = "klcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Component:
    """A named thing a plugin contributes: a loss function, a factory, a recipe, ...

    ``obj`` depends on the kind: a loss is a callable returning ``(loss, metrics)``; a regulariser or
    metric is a factory ``(**options) -> object with run-time hookimpls``; a recipe is a
    :class:`klcore.recipes.Recipe`.
    """

    name: str
    obj: Any
    help: str = ""


# --- registration hooks -------------------------------------------------------------------------


@hookspec
def klcore_register_losses() -> Iterable[Component]:
    """Policy losses and training objectives, looked up by name from a trainer config.

    An RL policy loss is called as ``fn(old_log_prob, log_prob, advantages, mask, *, agg, counts,
    norm_length, **options) -> (loss, metrics)`` with ``[B, T]`` tensors (see ``klcore.losses``).
    """


@hookspec
def klcore_register_regularisers() -> Iterable[Component]:
    """Factories ``(**options) -> plugin object`` of extra loss terms (``klcore_extra_loss``)."""


@hookspec
def klcore_register_metrics() -> Iterable[Component]:
    """Factories ``(**options) -> plugin object`` of observers that add metrics (``klcore_step_end``)."""


@hookspec
def klcore_register_rewards() -> Iterable[Component]:
    """Factories ``(**options) -> reward`` of rewards, called as ``reward(completions, rows) -> [float]``:
    the decoded completions and the dataset rows they answer (see ``klcore.rewards``)."""


@hookspec
def klcore_register_tasks() -> Iterable[Component]:
    """Factories ``(tokenizer=, data=, **options) -> task`` of prompt sources with a verifier: objects
    with ``problems(n, generator=, split=)`` and ``verify(problem, completion)`` (see ``klcore.tasks``)."""


@hookspec
def klcore_register_recipes() -> Iterable[Component]:
    """Runnable pipelines (``klcore.recipes.Recipe``) for ``klcore run NAME``."""


# --- run-time hooks ---------------------------------------------------------------------------------


@hookspec
def klcore_train_start(trainer: Any) -> None:
    """The run is set up (model prepared, resumed if asked) and about to take its first step."""


@hookspec
def klcore_step_start(trainer: Any, step: int) -> None:
    """Step ``step`` (0-based) starts, before its batch is collected."""


@hookspec
def klcore_batch_ready(trainer: Any, step: int, batch: Mapping[str, torch.Tensor]) -> None:
    """The step's batch is collected and scored, before any update (observers snapshot here)."""


@hookspec
def klcore_extra_loss(
    trainer: Any,
    batch: Mapping[str, torch.Tensor],
    outputs: Mapping[str, torch.Tensor],
    counts: GlobalCounts,
    micro_index: int,
    micro_count: int,
) -> Mapping[str, torch.Tensor] | None:
    """Extra loss terms for one micro-batch, by name (each is logged under its own name).

    ``batch`` is the micro-batch, ``outputs`` the policy's forward results on it (``log_prob``,
    ``entropy``); ``counts`` are the global denominators of the optimiser step (pass them to
    ``klcore.reduce.aggregate`` so the term is this micro-batch's share). A term computed on data of
    its own should be added once per optimiser step (``micro_index == 0``). Terms are added with
    weight one: apply your coefficient. Return ``None`` to add nothing.
    """


@hookspec
def klcore_step_end(
    trainer: Any, step: int, batch: Mapping[str, torch.Tensor], metrics: Mapping[str, float]
) -> Mapping[str, float] | None:
    """Step ``step`` finished its update; ``metrics`` so far. Return more metrics to log, or None."""


@hookspec
def klcore_save_checkpoint(trainer: Any, step: int) -> Any:
    """Return this plugin's state to store in the checkpoint of ``step`` (tensors, numbers, lists, dicts)."""


@hookspec
def klcore_load_checkpoint(trainer: Any, step: int, state: Any) -> None:
    """Restore the state this plugin returned from ``klcore_save_checkpoint`` when the run resumes."""


@hookspec
def klcore_train_end(trainer: Any, history: list[dict[str, float]]) -> None:
    """The run finished; ``history`` holds every logged step's metrics."""

