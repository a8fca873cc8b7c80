"""Recipes ``dph-presample`` (the pre-sampling stage as a command) and ``dph-toy`` (the comparison).

Both start from the same base policy: klcore's tiny Llama warmed up on the toy task, mixed with a
share ``warmup_ood_fraction`` of out-of-domain problems so that the out-of-domain check measures
what RL on the in-domain task keeps. The base model is saved (safetensors) in ``RUN/base_model``
and reused when the command is run again in the same folder, so an interrupted pre-sampling resumes
from the same policy.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from divergence_rl.evaluation import check_ks, pass_at_ks
from divergence_rl.losses import check_weighting
from divergence_rl.presampling import PresampleConfig, presample
from divergence_rl.regulariser import ExplorationTask
from divergence_rl.store import load_rehearsal
from klcore.errors import ConfigError
from klcore.lm_recipes import PromptSource
from klcore.toy.tasks import Problem, Task
from klcore.trainer.config import GRPOConfig

#: the compared methods (see DPHToyConfig)
METHODS = ("grpo", "grpo_rkl", "dph_forward", "dph_js", "dph_alpha")
_DPH_KIND = {"dph_forward": "forward_kl", "dph_js": "js", "dph_alpha": "alpha"}


@dataclass
class _Mixture:
    """Problems drawn from ``tasks`` with probabilities ``weights`` (for the warm-up only)."""

    tasks: tuple[Task, ...]
    weights: tuple[float, ...]
    name: str = "mixture"

    @property
    def max_answer_chars(self) -> int:
        return max(t.max_answer_chars for t in self.tasks)

    def problems(self, n: int, *, generator: torch.Generator, split: str = "train") -> list[Problem]:
        which = torch.multinomial(torch.tensor(self.weights), n, replacement=True, generator=generator).tolist()
        return [self.tasks[i].problems(1, generator=generator, split=split)[0] for i in which]

    def verify(self, problem: Problem, completion: str) -> float:
        return 1.0 if completion.strip() == problem.answer else 0.0


@dataclass
class BasePolicyConfig:
    """The task and the base policy: ``model`` is a local Hugging Face folder, or empty for the toy
    warm-up (``model_size``, ``warmup_*``; ``warmup_ood_fraction`` of its problems from ``ood_task``)."""

    task: str = "addition"
    task_options: dict[str, int] = field(default_factory=lambda: {"digits": 1})
    ood_task: str = "multiplication"
    ood_task_options: dict[str, int] = field(default_factory=lambda: {"digits": 1})
    model: str = ""
    model_size: str = "small"
    warmup_steps: int = 100
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    warmup_ood_fraction: float = 0.3
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.warmup_batch_size < 1 or self.threads < 0 or self.seed < 0:
            raise ConfigError("need warmup_steps >= 0, warmup_batch_size >= 1, threads >= 0 and seed >= 0")
        if not 0.0 <= self.warmup_ood_fraction < 1.0:
            raise ConfigError(f"warmup_ood_fraction must be in [0, 1), got {self.warmup_ood_fraction}")
        if self.warmup_ood_fraction > 0 and not self.ood_task:
            raise ConfigError("warmup_ood_fraction > 0 needs an ood_task")


def _tasks(config: BasePolicyConfig) -> tuple[Task, Task | None]:
    from klcore.toy import get_task

    task = get_task(config.task, **config.task_options)
    return task, (get_task(config.ood_task, **config.ood_task_options) if config.ood_task else None)


def base_policy(config: BasePolicyConfig, run_dir: Path) -> Any:
    """The base (initial) policy: loaded from ``config.model`` or ``RUN/base_model``, else warmed up
    and saved there atomically."""
    from transformers import AutoModelForCausalLM

    from klcore.toy import char_tokenizer, tiny_causal_lm, tiny_config, warmup

    if config.threads:
        torch.set_num_threads(config.threads)
    saved = run_dir / "base_model"
    source = Path(config.model) if config.model else saved
    if source.is_dir():
        return AutoModelForCausalLM.from_pretrained(source)
    if config.model:
        raise ConfigError(f"model folder {config.model} does not exist; pass a local Hugging Face model folder")
    task, ood = _tasks(config)
    mixed: Task = task
    if ood is not None and config.warmup_ood_fraction > 0:
        mixed = _Mixture((task, ood), (1 - config.warmup_ood_fraction, config.warmup_ood_fraction))
    model = tiny_causal_lm(tiny_config(config.model_size), seed=config.seed)
    warmup(model, char_tokenizer(), mixed, steps=config.warmup_steps, batch_size=config.warmup_batch_size,
           lr=config.warmup_lr, seed=config.seed, eval_problems=0)
    tmp = run_dir / ".tmp-base_model"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # safetensors
    os.replace(tmp, saved)
    return model


# --- dph-presample ----------------------------------------------------------------------------------


def _default_presample() -> PresampleConfig:
    return PresampleConfig()


@dataclass
class PresampleRecipeConfig(PromptSource):
    """``dph-presample``: the store is ``RUN/store``; ``presample`` holds the stage's settings.

    With ``model`` (a hub name or local folder, loaded by ``klcore.models.load_causal_lm`` with its
    tokenizer; ``lora.*`` as in ``klcore run grpo``, whose base is then sampled) the prompts are
    ``data.*`` (``klcore.data``, chat templates included) or a registered ``task``, scored by ``reward``,
    as in ``klcore run grpo``. Without it: the toy task and base policy of ``base``.
    """

    base: BasePolicyConfig = field(default_factory=BasePolicyConfig)
    presample: PresampleConfig = field(default_factory=_default_presample)


def run_presample(config: PresampleRecipeConfig, run_dir: Path) -> dict[str, Any]:
    """Pre-sample the base policy's responses into ``RUN/store`` (resumes when run again in ``RUN``)."""
    if config.model:
        from klcore.lm_recipes import build_task
        from klcore.models import load_causal_lm
        from klcore.plugins import build_plugin_manager

        torch.manual_seed(config.presample.seed)  # a LoRA adapter's initialisation (its base is sampled)
        model, tokenizer = load_causal_lm(config)
        task = build_task(build_plugin_manager(), config, tokenizer)
        return presample(model, tokenizer, task, config.presample, run_dir / "store")
    if config.data.path or config.task:
        raise ConfigError("data.path / task need a model to sample from: --set model=NAME_OR_FOLDER (without it "
                          "the recipe pre-samples the toy base policy of base.*)")
    from klcore.toy import char_tokenizer

    model = base_policy(config.base, run_dir)
    toy_task, _ = _tasks(config.base)
    return presample(model, char_tokenizer(), toy_task, config.presample, run_dir / "store")


# --- dph-toy -------------------------------------------------------------------------------------


def _default_trainer() -> GRPOConfig:
    return GRPOConfig(steps=100, lr=1e-4, prompts_per_step=16, group_size=8, mini_batches=2, progress=False)


def _default_toy_presample() -> PresampleConfig:
    return PresampleConfig(num_prompts=256, samples=8, extra_sample=True, min_correct=7)


@dataclass
class DPHToyConfig:
    """The comparison: every method in ``methods`` trained from the same base policy with each seed.

    ``grpo``: GRPO without KL on the whole training split; ``grpo_rkl``: plus a reverse-KL penalty
    (k3, coefficient ``rkl_coef``) to an online frozen reference; ``dph_forward`` / ``dph_js`` /
    ``dph_alpha``: GRPO on the exploration set plus the rehearsal term (``eta_*``, ``alpha``) on
    ``rehearsal_batch`` stored rows per optimiser step. Pass@1 / Pass@k (``ks``, from
    ``eval_samples`` samples of ``eval_problems`` held-out problems) are logged every
    ``eval_every`` steps in and out of domain; the rehearsal divergences every ``divergence_every``.
    """

    base: BasePolicyConfig = field(default_factory=BasePolicyConfig)
    presample: PresampleConfig = field(default_factory=_default_toy_presample)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    rkl_coef: float = 0.05
    eta_forward: float = 0.05
    eta_js: float = 0.2
    eta_alpha: float = 0.05
    weighting: str = "rows"
    alpha: float = 0.2
    rehearsal_batch: int = 64
    eval_every: int = 25
    eval_problems: int = 64
    eval_samples: int = 16
    ks: list[int] = field(default_factory=lambda: [1, 16])
    divergence_every: int = 10
    trainer: GRPOConfig = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"methods must be a non-empty list of {', '.join(METHODS)}; got {self.methods}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of ints >= 0, got {self.seeds}")
        for name in ("rkl_coef", "eta_forward", "eta_js", "eta_alpha"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_ks(self.ks, self.eval_samples)
        check_weighting(self.weighting)
        if self.presample.temperature != self.trainer.temperature:
            raise ConfigError(f"presample.temperature = {self.presample.temperature} and trainer.temperature = "
                              f"{self.trainer.temperature} must agree: the stored log-probs are compared with the "
                              "trainer's")
        if self.trainer.kl_coef or self.trainer.regularisers:
            raise ConfigError("set the methods' penalties with rkl_coef / eta_*, not trainer.kl_coef / "
                              "trainer.regularisers (every method starts from the same trainer settings)")


def _method_config(config: DPHToyConfig, method: str, seed: int, store: Path) -> GRPOConfig:
    eval_options = {"every": config.eval_every, "ks": list(config.ks), "problems": config.eval_problems,
                    "samples": config.eval_samples, "temperature": config.trainer.temperature,
                    "ood_task": config.base.ood_task, "ood_task_options": dict(config.base.ood_task_options)}
    metrics = {
        **config.trainer.metrics,
        "pass_at_k": eval_options,
        "rehearsal_divergence": {"path": str(store), "kinds": ["forward_kl", "js", "alpha"], "alpha": config.alpha,
                                 "every": config.divergence_every},
    }
    regularisers: dict[str, dict[str, Any]] = {}
    if method in _DPH_KIND:
        eta = {"dph_forward": config.eta_forward, "dph_js": config.eta_js, "dph_alpha": config.eta_alpha}[method]
        regularisers["dph"] = {"path": str(store), "kind": _DPH_KIND[method], "eta": eta, "alpha": config.alpha,
                               "weighting": config.weighting, "batch_size": config.rehearsal_batch, "seed": seed}
    kl = config.rkl_coef if method == "grpo_rkl" else 0.0
    return replace(config.trainer, seed=seed, kl_coef=kl, regularisers=regularisers, metrics=metrics)


def _plugins() -> Any:
    from divergence_rl import plugin
    from klcore.plugins import build_plugin_manager

    plugins = build_plugin_manager()
    if "divergence_rl" not in plugins.distributions:  # entry points disabled: register this package explicitly
        plugins.load("divergence_rl", plugin)
    return plugins


def run_toy(config: DPHToyConfig, run_dir: Path) -> dict[str, Any]:
    """Warm-up, pre-sampling, then every method x seed; writes the report, plots and a summary."""
    from klcore.toy import char_tokenizer
    from klcore.trainer.grpo import GRPOTrainer

    started, cpu_started = time.perf_counter(), time.process_time()
    phases: dict[str, dict[str, float]] = {}

    def lap(name: str, since: tuple[float, float]) -> tuple[float, float]:
        now = (time.perf_counter(), time.process_time())
        phases[name] = {"wall_s": now[0] - since[0], "cpu_s": now[1] - since[1]}
        return now

    mark = (started, cpu_started)
    tok = char_tokenizer()
    base = base_policy(config.base, run_dir)
    mark = lap("base_policy", mark)
    task, ood = _tasks(config.base)
    store = run_dir / "store"
    sampling = presample(base, tok, task, config.presample, store)
    mark = lap("presample", mark)
    split = load_rehearsal(store)
    exploration = ExplorationTask(task, tuple(split.exploration))
    base_eval = {}
    for name, t in [(task.name, task)] + ([(f"ood_{ood.name}", ood)] if ood is not None else []):
        values = pass_at_ks(base, tok, t, ks=config.ks, problems=config.eval_problems, samples=config.eval_samples,
                            temperature=config.trainer.temperature, seed=1234)
        base_eval.update({f"eval/{name}_pass_at_{k}": v for k, v in values.items()})
    histories: dict[str, list[list[dict[str, float]]]] = {}
    for method in config.methods:
        for seed in config.seeds:
            model = copy.deepcopy(base)
            trainer = GRPOTrainer(
                model, tok, exploration if method in _DPH_KIND else task, _method_config(config, method, seed, store),
                run_dir=run_dir / f"{method}-seed{seed}", plugins=_plugins(),
            )
            histories.setdefault(method, []).append(trainer.train())
            mark = lap(f"{method}-seed{seed}", mark)
    from divergence_rl import _report

    table = _report.table(histories, base_eval, config.ks, task.name, ood.name if ood is not None else None)
    _report.plots(histories, base_eval, config.ks, task.name, ood.name if ood is not None else None, run_dir)
    summary: dict[str, Any] = {
        "presample": sampling,
        "base": base_eval,
        "methods": table,
        "step_seconds_median": {m: statistics.median(r["perf/step_seconds"] for h in hs for r in h)
                                for m, hs in histories.items()},
        "total_seconds": time.perf_counter() - started,
        "total_cpu_seconds": time.process_time() - cpu_started,
        "phases": phases,
        "run_dir": str(run_dir),
    }
    _report.markdown(summary, config, run_dir)
    (run_dir / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    return summary


__all__ = ["METHODS", "BasePolicyConfig", "DPHToyConfig", "PresampleRecipeConfig", "base_policy", "run_presample",
           "run_toy"]
