"""The offline pre-sampling stage: sample, verify, store the initial policy's correct responses.

For each training prompt, draw ``samples`` responses (plus one extra when ``extra_sample``) from the
initial policy, verify them, and keep up to ``responses_per_prompt`` correct responses with their
per-token log-probs under the initial policy (a teacher-forced forward pass at ``temperature``, the
same computation the trainer does). The prompts come from a toy task or from any prompt dataset
(``klcore.data.load_prompts``: files or ``datasets`` names, chat templates, any tokenizer), encoded as
the trainer encodes them and scored by the dataset's reward (correct: reward >= 1). With a peft LoRA
policy the initial policy is its base model: sampling and log-probs run with the adapters disabled
(``klcore.models.adapters_disabled``), with no second copy of the model. Prompts are processed in chunks of ``chunk_size``; each chunk is
one atomically written shard drawn with its own seed, so an interrupted run resumed in the same
folder skips the finished shards and produces exactly the store an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedTokenizerBase

from divergence_rl.store import (
    FORMAT,
    MANIFEST,
    VERSION,
    SelectionRule,
    atomic_save,
    atomic_write_json,
    read_manifest,
    read_shard,
    shard_path,
)
from klcore.data import padding_id, score_completions
from klcore.errors import CheckpointError, ConfigError, DataError
from klcore.models import adapters_disabled, is_peft_model
from klcore.rollout import sample
from klcore.toy import encode_prompts
from klcore.toy.tasks import Problem, Task
from klcore.trainer.grpo import policy_forward

#: manifest keys that must agree when a run resumes in an existing store (the model is checked first, apart)
_RESUME_KEYS = ("samples", "extra_sample", "responses_per_prompt", "temperature", "max_new_tokens", "chunk_size",
                "seed", "vocab_size", "prompts")


@dataclass
class PresampleConfig:
    """Settings of the pre-sampling stage (defaults: the paper's k = 8 with one extra sample, >= 7/8).

    ``num_prompts = 0`` takes every training prompt of a prompt dataset (see :func:`training_prompts`).
    ``max_new_tokens = 0`` uses the task's longest answer plus two (set it for free-form answers). The selection rule
    (``min_correct``, ``first_correct``, ``extra_sample``) is stored as the default split; another
    rule can be applied when the store is read (:func:`divergence_rl.load_rehearsal`).
    """

    num_prompts: int = 256
    samples: int = 8
    extra_sample: bool = True
    min_correct: int = 7
    first_correct: int = 0
    responses_per_prompt: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 0
    chunk_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_prompts, bool) or not isinstance(self.num_prompts, int) or self.num_prompts < 0:
            raise ConfigError(f"presample num_prompts must be an int >= 0 (0: every prompt of a dataset), got "
                              f"{self.num_prompts!r}")
        for name in ("samples", "responses_per_prompt", "chunk_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"presample {name} must be a positive int, got {v!r}")
        for name in ("max_new_tokens", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"presample {name} must be an int >= 0, got {v!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ConfigError(f"presample temperature must be > 0, got {self.temperature!r}")
        self.rule.check(self.samples, self.extra_sample)

    @property
    def rule(self) -> SelectionRule:
        return SelectionRule(self.min_correct, self.first_correct, self.extra_sample)


def training_prompts(task: Task, n: int, seed: int) -> list[Problem]:
    """The training prompts the store is built from.

    For a prompt dataset (a task with ``items``, such as ``klcore.data.PromptDataset``): its ``train``
    split in file order, the first ``n`` (``n = 0``: all), each an encoded ``klcore.data.Prompt``. For a
    toy task: ``n`` distinct training-split problems drawn with ``seed`` (fewer if the split is smaller).
    """
    if hasattr(task, "items"):
        pool = list(task.items("train"))
        return pool[:n] if n else pool
    if n == 0:
        raise ConfigError(f"num_prompts = 0 (every prompt) needs a prompt dataset; {type(task).__name__} draws its "
                          "problems: give num_prompts")
    gen = torch.Generator().manual_seed(seed)
    seen: dict[str, Problem] = {}
    for _ in range(20):
        for p in task.problems(n, generator=gen, split="train"):
            if len(seen) < n:
                seen.setdefault(p.prompt, p)
        if len(seen) == n:
            break
    return list(seen.values())


@contextlib.contextmanager
def as_reference(model: nn.Module) -> Iterator[None]:
    """Inside, ``model`` computes the reference policy: a peft model's base (adapters disabled), else itself."""
    if is_peft_model(model):
        with adapters_disabled(model):
            yield
    else:
        yield


#: name parts of peft's adapter weights (skipped) and of its wrappers around a base weight (dropped from the name)
_ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                            "modules_to_save"})
_WRAPPER_PARTS = frozenset({"base_layer", "original_module"})


def reference_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of the reference policy ``model`` stands for: its own parameters, or for a peft
    LoRA model its base model's weights under the base model's names (adapters excluded), since with LoRA
    the reference is the adapter-disabled base."""
    if not is_peft_model(model):
        yield from model.named_parameters()
        return
    for name, param in model.get_base_model().named_parameters():  # type: ignore[operator]
        parts = name.split(".")
        if not _ADAPTER_PARTS.intersection(parts):
            yield ".".join(q for q in parts if q not in _WRAPPER_PARTS), param


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """A cheap hash of the reference policy's weights (16 hex digits; see :func:`reference_parameters`: a LoRA
    model gives its base model's fingerprint): per parameter its name, shape, dtype, sum of |w| and of w^2
    (6 significant digits) and sum(w) / sum(|w|) (6 decimals), so that the last-bit differences of a float64
    reduction on another device do not change it while any real change of the weights does. Sharded (FSDP2)
    weights are gathered first: call it on every process."""
    digest = hashlib.sha256()
    for name, param in reference_parameters(model):
        w = param.detach()
        if isinstance(w, DTensor):
            w = w.full_tensor()
        w = w.double()
        l1, l2, signed = (float(v) for v in torch.stack([w.abs().sum(), w.square().sum(), w.sum()]).cpu())
        balance = signed / l1 if l1 > 0 else 0.0
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{l1:.6e}|{l2:.6e}|{balance:.6f};".encode())
    return digest.hexdigest()[:16]


def _manifest(config: PresampleConfig, prompts: list[Problem], vocab_size: int, pad_token_id: int,
              max_new_tokens: int, fingerprint: str) -> dict[str, Any]:
    settings = asdict(config)
    return {
        "format": FORMAT,
        "version": VERSION,
        **{k: settings[k] for k in ("samples", "extra_sample", "responses_per_prompt", "temperature", "chunk_size",
                                    "seed")},
        "max_new_tokens": max_new_tokens,
        "rule": asdict(config.rule),
        "vocab_size": vocab_size,
        "pad_token_id": pad_token_id,
        "model_fingerprint": fingerprint,
        "prompts": [[p.prompt, p.answer] for p in prompts],
    }


def _chunk_seed(seed: int, chunk: int) -> int:
    return (seed * 1_000_003 + chunk * 104_729 + 7) % (2**31 - 1)


@torch.no_grad()
def _sample_chunk(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, problems: list[Problem], first_index: int,
    config: PresampleConfig, max_new_tokens: int, seed: int,
) -> dict[str, torch.Tensor]:
    per_prompt = config.samples + int(config.extra_sample)
    gen = torch.Generator().manual_seed(seed)
    with as_reference(model):
        roll = sample(
            model, encode_prompts(tokenizer, problems), group_size=per_prompt, max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=padding_id(tokenizer), temperature=config.temperature,
            generator=gen,
        )
    texts = tokenizer.batch_decode(roll.responses, skip_special_tokens=True)
    rewards = score_completions(task, [problems[i // per_prompt] for i in range(len(texts))], texts)
    correct = torch.tensor([r >= 1.0 for r in rewards]).view(len(problems), per_prompt).to(torch.uint8)
    rows = [i * per_prompt + j for i in range(len(problems))
            for j in correct[i].nonzero().flatten().tolist()[: config.responses_per_prompt]]
    take = torch.tensor(rows, dtype=torch.long)
    p = roll.prompt_length
    out = {"correct": correct, "prompt_index": first_index + take // per_prompt}
    if rows:
        batch = {"input_ids": roll.input_ids[take], "attention_mask": roll.attention_mask[take],
                 "position_ids": roll.position_ids[take], "responses": roll.responses[take]}
        was_training = model.training
        model.eval()
        try:
            with as_reference(model):
                ref_log_prob, _ = policy_forward(model, batch, config.temperature)
        finally:
            model.train(was_training)
        mask = roll.response_mask[take]
        out.update(prompt_ids=batch["input_ids"][:, :p], prompt_mask=batch["attention_mask"][:, :p].to(torch.uint8),
                   response_ids=batch["responses"], response_mask=mask.to(torch.uint8),
                   ref_log_prob=torch.where(mask, ref_log_prob, torch.zeros_like(ref_log_prob)))
    else:  # no correct sample in this chunk: empty [0, 1] tensors keep every shard's key set
        out.update(prompt_ids=torch.zeros(0, 1, dtype=torch.long), prompt_mask=torch.zeros(0, 1, dtype=torch.uint8),
                   response_ids=torch.zeros(0, 1, dtype=torch.long), response_mask=torch.zeros(0, 1, dtype=torch.uint8),
                   ref_log_prob=torch.zeros(0, 1))
    return {k: v.detach().cpu() for k, v in out.items()}


def presample(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, config: PresampleConfig, out: str | Path
) -> dict[str, Any]:
    """Run (or resume) the pre-sampling stage into the store folder ``out``; return a summary.

    ``task`` is a toy task or a prompt dataset (``klcore.data.PromptDataset``, scored by its reward);
    ``model`` the initial policy, or a peft LoRA model whose base is the initial policy.

    The summary holds the number of prompts, of shards written now and skipped as already done, of
    stored responses, and the sizes of the rehearsal and exploration sets under the config's rule.
    Raises ``CheckpointError`` when ``out`` holds a store sampled with other settings or prompts, and
    ``DataError`` when it was sampled from another model (see :func:`model_fingerprint`).
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ConfigError(f"{type(model).__name__} has no config.vocab_size; pass a Hugging Face causal LM")
    max_new = config.max_new_tokens or task.max_answer_chars + 2
    prompts = training_prompts(task, config.num_prompts, config.seed)
    if not prompts:
        raise DataError(f"{getattr(task, 'name', type(task).__name__)!r} has no training prompt to pre-sample; "
                        "check the data's train split (data.test_fraction) or num_prompts")
    manifest = _manifest(config, prompts, vocab, padding_id(tokenizer), max_new, model_fingerprint(model))
    if (root / MANIFEST).exists():
        old = read_manifest(root)
        if old["model_fingerprint"] != manifest["model_fingerprint"]:
            raise DataError(f"{root} was pre-sampled from another model (weights fingerprint "
                            f"{old['model_fingerprint']}, this model {manifest['model_fingerprint']}): resuming would "
                            "mix responses and log-probs of two initial policies. Resume with the model the store was "
                            "started with, or start a fresh store: pre-sample into a new folder (or delete this one)")
        changed = [k for k in _RESUME_KEYS if old.get(k) != manifest[k]]
        if changed:
            raise CheckpointError(f"{root} holds a pre-sampling run with other {changed}; resume with the same "
                                  "settings, or pre-sample into a new folder")
        if old["rule"] != manifest["rule"]:  # only the default split changed: no sample is affected
            atomic_write_json(manifest, root / MANIFEST)
    else:
        atomic_write_json(manifest, root / MANIFEST)
    for stale in root.glob(".tmp-*"):
        stale.unlink()
    chunk = config.chunk_size
    written = skipped = 0
    correct_parts, stored = [], 0
    for c in range((len(prompts) + chunk - 1) // chunk):
        path = shard_path(root, c)
        shard = None
        if path.exists():
            try:
                shard = read_shard(path)
            except DataError:
                shard = None  # a damaged shard is sampled again
        if shard is None:
            part = prompts[c * chunk : (c + 1) * chunk]
            shard = _sample_chunk(model, tokenizer, task, part, c * chunk, config, max_new, _chunk_seed(config.seed, c))
            atomic_save(shard, path, {"format": FORMAT, "version": str(VERSION), "chunk": str(c)})
            written += 1
        else:
            skipped += 1
        correct_parts.append(shard["correct"])
        stored += int(shard["prompt_index"].shape[0])
    keep = SelectionRule(**manifest["rule"]).select(torch.cat(correct_parts), config.samples)
    return {
        "prompts": len(prompts),
        "shards_written": written,
        "shards_skipped": skipped,
        "stored_responses": stored,
        "rehearsal_prompts": int(keep.sum()),
        "exploration_prompts": len(prompts) - int(keep.sum()),
        "mean_pass_rate": float(torch.cat(correct_parts)[:, : config.samples].float().mean()),
        "store": str(root),
    }


__all__ = ["PresampleConfig", "as_reference", "model_fingerprint", "presample", "reference_parameters",
           "training_prompts"]
