"""The accelerate training loop every klcore LM trainer shares.

A subclass implements two methods:

* ``collect(step) -> (batch, metrics)``: a dict of ``[rows, ...]`` tensors for this process
  (rollout + scoring for RL, teacher queries for distillation, a dataloader batch offline);
* ``compute_loss(micro_batch, counts) -> (loss, metrics, outputs)`` for one micro-batch, with
  ``counts`` the global denominators of the optimiser step (``klcore.reduce``).

and may override ``prepare_minibatch(mini, micro)`` to add per-row tensors computed once per
optimiser mini-batch (every micro-batch then receives its rows).

The loop does the rest: seeding, ``ppo_epochs`` x ``mini_batches`` optimiser steps split into
micro-batches (gradient sync only on the last one), the plugins' extra loss terms, backward,
clipping, optimiser and scheduler steps, run-time hooks, metrics reduced over processes (to
``metrics.jsonl``, the console and accelerate's trackers), progress bar, atomic checkpoints and
exact resume. Distribution (DDP, FSDP, DeepSpeed) and mixed precision come from accelerate.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, gather_object, parse_flag_from_env, set_seed
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from klcore.config import to_dict
from klcore.errors import ConfigError, PluginError
from klcore.plugins import Plugins, build_plugin_manager
from klcore.reduce import GlobalCounts, global_counts
from klcore.trainer import run_folder
from klcore.trainer.config import TrainerConfig

Batch = dict[str, torch.Tensor]
Metrics = dict[str, float]


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``: every step reseeds, so a resumed run draws what the original drew."""
    return (seed * 1_000_003 + step * 7_919 + 1) % (2**31 - 1)


class Trainer(abc.ABC):
    """Base class of klcore's trainers; see the module docstring for what a subclass provides."""

    #: Batch key of the ``[rows, T]`` mask whose valid tokens the loss averages over.
    mask_key = "response_mask"
    #: Metrics shown in the progress bar when present.
    progress_keys: tuple[str, ...] = ("reward/mean", "entropy/mean", "loss/total")

    def __init__(
        self,
        model: nn.Module,
        config: TrainerConfig,
        *,
        run_dir: str | Path,
        plugins: Plugins | None = None,
        accelerator: Accelerator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        if accelerator is None:
            _fresh_accelerator_state()
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=config.log_with or None,
            project_dir=str(self.run_dir),
            step_scheduler_with_optimizer=False,
        )
        _check_engine(self.accelerator, config)
        set_seed(config.seed)
        self.plugins = plugins if plugins is not None else build_plugin_manager()
        for name, options in config.regularisers.items():
            self.plugins.enable("regulariser", name, options)
        for name, options in config.metrics.items():
            self.plugins.enable("metric", name, options)
        self.loss_fn = self.plugins.registry("loss").get_component(config.loss)
        optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        warm = config.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.step = 0
        self.history: list[Metrics] = []
        self.metrics_log = run_folder.MetricsLog(self.run_dir / "metrics.jsonl")
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")

    # --- what subclasses provide ---------------------------------------------------------------

    @abc.abstractmethod
    def collect(self, step: int) -> tuple[Batch, Metrics]:
        """The step's batch on this process and the metrics of collecting it."""

    @abc.abstractmethod
    def compute_loss(self, batch: Batch, counts: GlobalCounts) -> tuple[torch.Tensor, Metrics, Batch]:
        """Loss share, metrics and forward outputs (for ``klcore_extra_loss``) of one micro-batch."""

    def prepare_minibatch(self, mini: Batch, micro: int) -> Batch:
        """Extra ``[rows, ...]`` tensors computed once per optimiser mini-batch, before its micro-batches.

        They are added to the mini-batch (so every micro-batch gets its rows) under names that must not
        clash with the batch's. Default: none. :class:`GRPOTrainer` uses it for policy losses with a
        ``prepare`` attribute (selections over the whole mini-batch of every rank).
        """
        return {}

    def evaluate(self) -> Metrics:
        """Held-out metrics (``eval/*``), run before step 0, every ``config.eval_every`` steps and after the
        last update (logged with a ``_final`` suffix). Default: none."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """This process's trainer state beyond model, optimiser, scheduler, RNG and plugins (tensors and
        plain values, for ``torch.load(weights_only=True)``), saved in every checkpoint so a resumed run
        equals the uninterrupted one. Default: none."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned, on resume (before the first resumed step). Default: a
        subclass without extra state has nothing to restore."""
        del state

    # --- the loop ------------------------------------------------------------------------------

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def train(self) -> list[Metrics]:
        """Run from the current (or resumed) step to ``config.steps``; return every step's metrics."""
        cfg, acc = self.config, self.accelerator
        resumed = cfg.resume and self.resume()
        if cfg.log_with:
            acc.init_trackers("klcore", config=_flat(to_dict(cfg)))
        self.plugins.hook.klcore_train_start(trainer=self)
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (cfg.progress and acc.is_local_main_process),
            desc=type(self).__name__, dynamic_ncols=True, mininterval=1.0,
        )
        last_saved = self.step if resumed else -1  # a resumed run's checkpoint of this step exists
        while self.step < cfg.steps:
            step = self.step
            started = time.perf_counter()
            set_seed(step_seed(cfg.seed, step), device_specific=True)
            self.plugins.hook.klcore_step_start(trainer=self, step=step)
            batch, metrics = self.collect(step)
            if step == 0 or (cfg.eval_every and step % cfg.eval_every == 0):
                metrics.update(self.evaluate())
            self.plugins.hook.klcore_batch_ready(trainer=self, step=step, batch=batch)
            metrics.update(self.update(batch))
            if step == cfg.steps - 1:  # the final evaluation sees the last update
                metrics.update({f"{k}_final": v for k, v in self.evaluate().items()})
            for extra in self.plugins.hook.klcore_step_end(trainer=self, step=step, batch=batch, metrics=dict(metrics)):
                _merge(metrics, extra or {}, "klcore_step_end")
            metrics = self.reduce_metrics(metrics)
            metrics["perf/step_seconds"] = time.perf_counter() - started
            self.step = step + 1
            self.log(step, metrics)
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in self.progress_keys if k in metrics})
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
                last_saved = self.step
        bar.close()
        if last_saved != self.step:
            self.save_checkpoint()
        self.plugins.hook.klcore_train_end(trainer=self, history=self.history)
        for tracker in acc.trackers:  # not end_training(): the process group outlives one trainer
            tracker.finish()
        return self.history

    def update(self, batch: Batch) -> Metrics:
        """``ppo_epochs`` passes of ``mini_batches`` optimiser steps over ``batch``; mean metrics."""
        cfg = self.config
        rows = batch[self.mask_key].shape[0]
        if rows % cfg.mini_batches:
            raise ConfigError(f"{rows} rows per process do not divide into mini_batches = {cfg.mini_batches}")
        per_mini = rows // cfg.mini_batches
        micro = cfg.micro_batch_size or per_mini
        totals: dict[str, float] = defaultdict(float)
        updates = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rows) if cfg.mini_batches > 1 else torch.arange(rows)
            for m in range(cfg.mini_batches):
                idx = order[m * per_mini : (m + 1) * per_mini]
                mini = {k: v[idx.to(v.device)] for k, v in batch.items()}
                for k, v in self.optimizer_step(mini, micro).items():
                    totals[k] += v
                updates += 1
        return {k: v / updates for k, v in totals.items()}

    def optimizer_step(self, mini: Batch, micro: int) -> Metrics:
        """One optimiser step over a mini-batch split into micro-batches of ``micro`` rows."""
        acc = self.accelerator
        counts = global_counts(mini[self.mask_key], accelerator=acc)
        rows = mini[self.mask_key].shape[0]
        mini = {**mini, **self.prepare_minibatch(mini, micro)}
        starts = list(range(0, rows, micro))
        summed: dict[str, float] = defaultdict(float)  # loss shares: sum over micro-batches
        averaged: dict[str, float] = defaultdict(float)  # diagnostics: mean over micro-batches
        self.optimizer.zero_grad(set_to_none=True)
        for i, start in enumerate(starts):
            part = {k: v[start : start + micro] for k, v in mini.items()}
            last = i == len(starts) - 1
            acc.sync_gradients = last  # under DeepSpeed: the accumulation boundary, where the engine steps
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                with acc.autocast():
                    loss, metrics, outputs = self.compute_loss(part, counts)
                    terms: dict[str, torch.Tensor] = {}
                    for extra in self.plugins.hook.klcore_extra_loss(
                        trainer=self, batch=part, outputs=outputs, counts=counts, micro_index=i, micro_count=len(starts)
                    ):
                        _merge(terms, extra or {}, "klcore_extra_loss")
                    total = loss + sum(terms.values(), torch.zeros((), device=loss.device))
                acc.backward(total)
            # shares carry a factor world_size; the mean over ranks in reduce_metrics gives the global value
            summed["loss/objective"] += float(loss.detach())
            summed["loss/total"] += float(total.detach())
            for k, term in terms.items():
                summed[k] += float(term.detach())
            for k, value in metrics.items():
                averaged[k] += float(value) / len(starts)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        out = {**summed, **averaged}
        if isinstance(grad_norm, DTensor):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        out["optim/grad_norm"] = float(grad_norm) if grad_norm is not None else math.nan
        out["optim/lr"] = float(self.scheduler.get_last_lr()[0])
        return out

    def reduce_metrics(self, metrics: Mapping[str, float]) -> Metrics:
        """Mean of every metric over processes (same key order on every rank)."""
        keys = sorted(metrics)
        if self.accelerator.num_processes == 1:
            return {k: float(metrics[k]) for k in keys}
        per_rank = gather_object([keys])
        if any(k != keys for k in per_rank):
            raise PluginError(
                "processes logged different metric names this step (a plugin returned a metric on some ranks only): "
                + "; ".join(f"rank {i}: {k}" for i, k in enumerate(per_rank))
            )
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist(), strict=True))

    def log(self, step: int, metrics: Metrics) -> None:
        record = {"step": step, **metrics}
        self.history.append(record)
        if self.accelerator.is_main_process:
            self.metrics_log.append(record)
        if self.config.log_with:
            self.accelerator.log(metrics, step=step)

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Save model, optimiser, scheduler and plugin state for resuming at ``self.step``."""
        acc = self.accelerator
        root = run_folder.checkpoint_root(self.run_dir)
        name = run_folder.checkpoint_name(self.step)
        tmp, final = root / f".tmp-{name}", root / name
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)  # before the barrier: every rank writes its RNG state into it
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        torch.save(self.extra_state(), tmp / _extra_state_file(acc.process_index))
        states = self.plugins.call_each("klcore_save_checkpoint", trainer=self, step=self.step)
        acc.wait_for_everyone()  # every rank's files are in tmp before rank 0 renames it
        if acc.is_main_process:
            torch.save({k: v for k, v in states.items() if v is not None}, tmp / "klcore_plugins.pt")
            run_folder.atomic_write_text(tmp / "trainer_state.json", json.dumps({"step": self.step}) + "\n")
            run_folder.publish_checkpoint(tmp, final, self.config.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def resume(self) -> bool:
        """Load the run folder's latest checkpoint if there is one; return whether one was loaded."""
        path = run_folder.latest_checkpoint(self.run_dir)
        if path is None:
            return False
        self.accelerator.load_state(str(path))
        self.step = int(json.loads((path / "trainer_state.json").read_text())["step"])
        extra_file = path / _extra_state_file(self.accelerator.process_index)
        if extra_file.exists():
            self.load_extra_state(torch.load(extra_file, weights_only=True))
        plugin_file = path / "klcore_plugins.pt"
        states = torch.load(plugin_file, weights_only=True) if plugin_file.exists() else {}
        for impl in self.plugins.hook.klcore_load_checkpoint.get_hookimpls():
            if impl.plugin_name in states:
                given = {"trainer": self, "step": self.step, "state": states[impl.plugin_name]}
                impl.function(**{k: given[k] for k in impl.argnames})
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.history = self.metrics_log.truncate_before(self.step)
        else:
            self.history = [r for r in self.metrics_log.read() if r.get("step", 0) < self.step]
        return True


def _extra_state_file(rank: int) -> str:
    """Checkpoint file of one process's ``Trainer.extra_state``."""
    return f"trainer_extra_{rank}.pt"


#: Key under which the process group's own distributed type is remembered in accelerate's PartialState.
_LAUNCH_TYPE = "klcore_launch_distributed_type"


def _fresh_accelerator_state() -> None:
    """Forget the previous run's accelerate state but keep the process group.

    accelerate keeps one process-wide state; a second run in this process (a test, a notebook, a recipe
    comparing methods) may ask for another precision. accelerate also writes the engine it chose back
    into the process group's state (``PartialState.distributed_type = FSDP``) and enables FSDP only from
    a device type (``MULTI_GPU``, ...), so the launch type is restored, or a second FSDP run would come up
    without its FSDP plugin.
    """
    # the process group, created from the launcher's environment as Accelerator() would create it
    shared = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))._shared_state
    shared["distributed_type"] = shared.setdefault(_LAUNCH_TYPE, shared["distributed_type"])
    AcceleratorState._reset_state()


def _check_engine(acc: Accelerator, config: TrainerConfig) -> None:
    """The loop accumulates micro-batch gradients itself (loss shares are globally normalised)."""
    if acc.gradient_accumulation_steps != 1:
        raise ConfigError(
            f"pass an Accelerator with gradient_accumulation_steps=1 (got {acc.gradient_accumulation_steps}); "
            "set the trainer's micro_batch_size instead: it accumulates with globally normalised shares"
        )
    if acc.distributed_type == DistributedType.FSDP and acc.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(
            "klcore's trainers need FSDP2 (fsdp_version: 2 in the accelerate config, or FSDP_VERSION=2): "
            "rollouts and evaluation call the model's own modules token by token, which FSDP1's "
            "flat-parameter wrapper does not allow"
        )
    if acc.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(acc, config)


def _configure_deepspeed(acc: Accelerator, config: TrainerConfig) -> None:
    """Fill the DeepSpeed config's ``auto`` entries the loop decides, and refuse those it cannot honour.

    The loop marks the last micro-batch of an optimiser step with ``accelerator.sync_gradients``, which
    accelerate passes to DeepSpeed as the accumulation boundary; DeepSpeed's own accumulation count must
    stay 1 (it would rescale the already normalised loss shares). Clipping is DeepSpeed's, at
    ``config.max_grad_norm``. ``train_micro_batch_size_per_gpu`` is bookkeeping for DeepSpeed (the loop
    sizes micro-batches itself).
    """
    ds = acc.state.deepspeed_plugin.deepspeed_config
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise ConfigError(
            f"the DeepSpeed config sets gradient_accumulation_steps = {gas}; set it to 1 or 'auto' and use the "
            "trainer's micro_batch_size: the loop accumulates micro-batches with globally normalised loss shares"
        )
    clip = ds.get("gradient_clipping", "auto")
    if clip == "auto":
        ds["gradient_clipping"] = config.max_grad_norm
    elif float(clip) != config.max_grad_norm:
        raise ConfigError(
            f"the DeepSpeed config clips gradients at {clip} but the trainer's max_grad_norm is "
            f"{config.max_grad_norm}; make them equal (or set gradient_clipping to 'auto')"
        )
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = config.micro_batch_size or 1


def _merge(into: dict[str, Any], extra: Mapping[str, Any], hook: str) -> None:
    clash = sorted(set(into) & set(extra))
    if clash:
        raise PluginError(f"{hook} results collide on names {clash}; each plugin must use its own metric names")
    into.update(extra)


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
