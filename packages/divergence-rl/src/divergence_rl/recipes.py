"""Recipes ``dph-presample`` (the pre-sampling stage as a command) and ``dph-toy`` (the comparison,
an experiment on ``klcore.experiments``).

The toy base policy is klcore's tiny Llama warmed up on a toy task (``BasePolicyConfig``: by default
1-digit addition with a share ``warmup_ood_fraction`` of out-of-domain problems; ``dph-toy`` uses
2-digit x 1-digit multiplication, whose held-out split has 200 problems). It is saved (safetensors) in
``RUN/base_model`` and reused when the command is run again in the same folder, so an interrupted
pre-sampling or experiment resumes from the same policy.
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

from divergence_rl.evaluation import check_ks, counts_on, distinct_problems, mean_pass_at_k
from divergence_rl.losses import check_weighting
from divergence_rl.presampling import PresampleConfig, presample, training_prompts
from divergence_rl.regulariser import ExplorationTask
from divergence_rl.store import load_rehearsal
from klcore.errors import ConfigError
from klcore.lm_recipes import PromptSource
from klcore.toy.tasks import Problem, Task
from klcore.trainer.config import GRPOConfig

#: the compared methods (see DPHToyConfig)
METHODS = ("base", "grpo", "grpo_rkl", "dph_forward", "dph_js", "dph_alpha")
#: the curves drawn by the experiment (mean and 95% band over seeds per variant)
_FIGURES = ("reward/mean", "entropy/mean", "rehearsal/forward_kl", "rehearsal/js")
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
    return GRPOConfig(steps=100, lr=1e-4, prompts_per_step=8, group_size=8, mini_batches=2, progress=False)


def _default_toy_base() -> BasePolicyConfig:
    return BasePolicyConfig(task="multiplication", task_options={"digits": 2}, ood_task="", ood_task_options={},
                            warmup_steps=250, warmup_ood_fraction=0.0)


def _default_toy_presample() -> PresampleConfig:
    return PresampleConfig(num_prompts=256, samples=8, extra_sample=True, min_correct=7)


@dataclass
class DPHToyConfig:
    """The comparison, run through ``klcore.experiments`` (variants x ``seeds``, 95% intervals).

    One base policy (``base``) and one store of ``presample.num_prompts`` training prompts for every
    run. Variants: ``base`` (no training: the initial policy, evaluated with each seed's samples),
    ``grpo`` (no KL, on all training prompts), ``grpo_rkl`` (plus a k3 reverse-KL penalty
    ``rkl_coef`` to an online frozen reference), and ``dph_<kind>-x<scale>`` for each method in
    ``methods`` and scale in ``eta_scales``: GRPO on the exploration set plus the rehearsal term with
    ``eta_<kind> * scale`` (``weighting``, ``rehearsal_batch`` stored rows per optimiser step).
    Pass@k (``ks``, ``eval_samples`` samples) after training on up to ``eval_problems`` distinct
    held-out problems and on the training prompts (split into the rehearsal and exploration sets).
    """

    base: BasePolicyConfig = field(default_factory=_default_toy_base)
    presample: PresampleConfig = field(default_factory=_default_toy_presample)
    methods: list[str] = field(default_factory=lambda: ["base", "grpo", "dph_forward", "dph_js"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rkl_coef: float = 0.05
    eta_forward: float = 0.05
    eta_js: float = 0.4
    eta_alpha: float = 0.05
    eta_scales: list[float] = field(default_factory=lambda: [1.0, 10.0])
    weighting: str = "rows"
    alpha: float = 0.2
    rehearsal_batch: int = 4
    eval_problems: int = 256
    eval_samples: int = 16
    ks: list[int] = field(default_factory=lambda: [1, 16])
    divergence_every: int = 25
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
        if not self.eta_scales or any(not isinstance(x, (int, float)) or not x > 0 for x in self.eta_scales):
            raise ConfigError(f"eta_scales must be a non-empty list of numbers > 0, got {self.eta_scales}")
        check_ks(self.ks, self.eval_samples)
        check_weighting(self.weighting)
        if self.eval_problems < 1 or self.rehearsal_batch < 0:
            raise ConfigError("need eval_problems >= 1 and rehearsal_batch >= 0")
        if self.presample.temperature != self.trainer.temperature:
            raise ConfigError(f"presample.temperature = {self.presample.temperature} and trainer.temperature = "
                              f"{self.trainer.temperature} must agree: the stored log-probs are compared with the "
                              "trainer's")
        if self.trainer.kl_coef or self.trainer.regularisers:
            raise ConfigError("set the methods' penalties with rkl_coef / eta_*, not trainer.kl_coef / "
                              "trainer.regularisers (every method starts from the same trainer settings)")

    def variants(self) -> dict[str, dict[str, Any]]:
        """Variant name -> ``{"method", "eta"}`` (``eta`` for the DPH methods only)."""
        out: dict[str, dict[str, Any]] = {}
        for method in self.methods:
            if method not in _DPH_KIND:
                out[method] = {"method": method}
                continue
            eta = getattr(self, "eta_" + method.removeprefix("dph_"))
            for scale in self.eta_scales:
                out[f"{method}-x{scale:g}"] = {"method": method, "eta": eta * scale}
        return out


def _method_config(config: DPHToyConfig, method: str, eta: float, seed: int, store: Path) -> GRPOConfig:
    metrics = {**config.trainer.metrics,
               "rehearsal_divergence": {"path": str(store), "kinds": ["forward_kl", "js"],
                                        "every": config.divergence_every}}
    regularisers: dict[str, dict[str, Any]] = {}
    if method in _DPH_KIND:
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


@dataclass
class _Setting:
    """What every run of one dph-toy experiment shares."""

    config: DPHToyConfig
    base: Any
    task: Task
    ood: Task | None
    store: Path
    prompts: list[Problem]
    rehearsal: list[Problem]
    exploration: list[Problem]
    held_out: list[Problem]


def _evaluate(setting: _Setting, model: Any, seed: int) -> dict[str, float]:
    """Final Pass@k on the held-out problems and on the training prompts (all, rehearsal, exploration)."""
    from klcore.toy import char_tokenizer

    cfg, tok = setting.config, char_tokenizer()
    out: dict[str, float] = {}

    def passes(name: str, task: Task, problems: list[Problem]) -> list[int]:
        counts = counts_on(model, tok, task, problems, samples=cfg.eval_samples,
                           temperature=cfg.trainer.temperature, seed=10_007 * seed + len(out) + 1)
        out.update({f"{name}_pass@{k}": mean_pass_at_k(counts, cfg.eval_samples, k) for k in cfg.ks})
        return counts

    model.eval()
    passes("test", setting.task, setting.held_out)
    counts = passes("train", setting.task, setting.prompts)
    by_prompt = dict(zip((p.prompt for p in setting.prompts), counts, strict=True))
    for name, subset in (("rehearsal_set", setting.rehearsal), ("exploration_set", setting.exploration)):
        values = [by_prompt[p.prompt] for p in subset]
        out.update({f"{name}_pass@{k}": mean_pass_at_k(values, cfg.eval_samples, k) for k in cfg.ks})
    if setting.ood is not None:
        ood = distinct_problems(setting.ood, cfg.eval_problems, split="test", seed=4321)
        passes(f"ood_{setting.ood.name}", setting.ood, ood)
    return out


def _run_one(setting: _Setting, variant: str, options: dict[str, Any], seed: int, run_dir: Path) -> dict[str, float]:
    """One variant x seed: train a copy of the base policy (nothing for ``base``), then evaluate."""
    from klcore.toy import char_tokenizer
    from klcore.trainer.grpo import GRPOTrainer

    method = options["method"]
    model = copy.deepcopy(setting.base)
    metrics: dict[str, float] = {"rehearsal/forward_kl": 0.0, "rehearsal/js": 0.0}
    if method != "base":
        pool = setting.exploration if method in _DPH_KIND else setting.prompts
        config = _method_config(setting.config, method, float(options.get("eta", 0.0)), seed, setting.store)
        trainer = GRPOTrainer(model, char_tokenizer(), ExplorationTask(setting.task, tuple(pool)), config,
                              run_dir=run_dir, plugins=_plugins())
        history = trainer.train()
        last = history[-10:]
        metrics = {k: history[-1][k] for k in ("rehearsal/forward_kl", "rehearsal/js")}
        metrics.update({"reward_last10": statistics.fmean(r["reward/mean"] for r in last),
                        "entropy_last10": statistics.fmean(r["entropy/mean"] for r in last),
                        "step_seconds": statistics.median(r["perf/step_seconds"] for r in history)})
        model = trainer.unwrapped_model
    return {**_evaluate(setting, model, seed), **metrics}


def run_toy(config: DPHToyConfig, run_dir: Path) -> dict[str, Any]:
    """Warm-up and pre-sampling (once, resumable), then every variant x seed through
    ``klcore.experiments.run_experiment``: ``report.md``, ``summary.json`` and figures in ``run_dir``."""
    from klcore.experiments import run_experiment
    from klcore.toy import char_tokenizer

    started = time.perf_counter()
    base = base_policy(config.base, run_dir)
    task, ood = _tasks(config.base)
    store = run_dir / "store"
    sampling = presample(base, char_tokenizer(), task, config.presample, store)
    split = load_rehearsal(store)
    setting = _Setting(config, base, task, ood, store, training_prompts(task, config.presample.num_prompts,
                                                                        config.presample.seed),
                       split.rehearsal, split.exploration,
                       distinct_problems(task, config.eval_problems, split="test", seed=4321))
    ExplorationTask(task, tuple(setting.exploration))  # refuses an empty exploration set before any run
    result = run_experiment(
        lambda variant, options, seed, folder: _run_one(setting, variant, options, seed, folder),
        config.variants(), config.seeds, run_dir / "experiment",
        title=f"dph-toy: {task.name} ({config.base.task_options}), {len(setting.held_out)} held-out problems, "
              f"{len(setting.prompts)} training prompts ({len(setting.rehearsal)} rehearsal)",
        figure_metrics=_FIGURES if any(v["method"] != "base" for v in config.variants().values()) else [],
    )
    summary = {"presample": sampling, "held_out_problems": len(setting.held_out),
               "experiment": result.summary, "report": str(result.out / "report.md"),
               "total_seconds": time.perf_counter() - started}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["METHODS", "BasePolicyConfig", "DPHToyConfig", "PresampleRecipeConfig", "base_policy", "run_presample",
           "run_toy"]
