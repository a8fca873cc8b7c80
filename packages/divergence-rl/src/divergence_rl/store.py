"""The versioned on-disk format of pre-sampled responses, and reading it back as a rehearsal set.

A store is a folder:

* ``manifest.json``: ``format``, ``version``, the sampling settings (``samples``, ``extra_sample``,
  ``responses_per_prompt``, ``temperature``, ``max_new_tokens``, ``chunk_size``, ``seed``), the
  model's ``vocab_size``, ``pad_token_id`` and ``model_fingerprint`` (a hash of its weights), the
  selection rule chosen at sampling time, and the ordered training prompts (``prompt``, ``answer``).
  Written first.
* ``shard-NNNNN.safetensors``, one per chunk of ``chunk_size`` prompts, written atomically
  (temporary name, then rename), with tensors

  - ``correct`` ``[c, S]`` uint8: whether each of the S samples of each prompt was verified correct
    (S = ``samples`` plus one when ``extra_sample``);
  - ``prompt_index`` ``[m]`` int64 and, for the stored correct responses (up to
    ``responses_per_prompt`` per prompt that had one), ``prompt_ids`` / ``prompt_mask`` ``[m, P]``
    (left-padded), ``response_ids`` / ``response_mask`` ``[m, R]`` (right-padded, through EOS) and
    ``ref_log_prob`` ``[m, R]`` float32: the initial policy's per-token log-probs at ``temperature``.

Every prompt with a correct sample keeps its response, so the rehearsal/exploration split can be
recomputed with another :class:`SelectionRule` without sampling again.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from klcore.errors import ConfigError, DataError
from klcore.rollout import position_ids
from klcore.toy.tasks import Problem

FORMAT = "divergence-rl/rehearsal"
VERSION = 2  # 2: adds model_fingerprint
MANIFEST = "manifest.json"
#: keys every manifest of this version holds (besides ``format`` and ``version``)
MANIFEST_KEYS = ("samples", "extra_sample", "responses_per_prompt", "temperature", "max_new_tokens", "chunk_size",
                 "seed", "rule", "vocab_size", "pad_token_id", "model_fingerprint", "prompts")
SHARD_KEYS = ("correct", "prompt_index", "prompt_ids", "prompt_mask", "response_ids", "response_mask", "ref_log_prob")


@dataclass(frozen=True)
class SelectionRule:
    """Which prompts go to the rehearsal set, from their S verified samples.

    A prompt is rehearsed when at least ``min_correct`` of the first ``samples`` are correct, the
    first ``first_correct`` are all correct, and (with ``extra_sample``) the extra sample is correct
    too. The paper: ``min_correct = 7`` (Qwen) or 6 (Llama) of 8 with ``extra_sample``; strict 8/8:
    ``min_correct = 8``; the released code: ``min_correct = 0, first_correct = 4,
    extra_sample = False``.
    """

    min_correct: int = 7
    first_correct: int = 0
    extra_sample: bool = True

    def __post_init__(self) -> None:
        for name in ("min_correct", "first_correct"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.extra_sample, bool):
            raise ConfigError(f"extra_sample must be true or false, got {self.extra_sample!r}")
        if self.min_correct == 0 and self.first_correct == 0 and not self.extra_sample:
            raise ConfigError("the selection rule accepts every prompt; set min_correct, first_correct or extra_sample")

    def check(self, samples: int, extra_drawn: bool) -> None:
        """Raise ``ConfigError`` if the rule needs more samples than ``samples`` (or an extra one not drawn)."""
        if self.min_correct > samples or self.first_correct > samples:
            raise ConfigError(f"min_correct={self.min_correct} / first_correct={self.first_correct} exceed the "
                              f"{samples} samples per prompt; lower them or sample more")
        if self.extra_sample and not extra_drawn:
            raise ConfigError("the rule asks for the extra sample but the store was sampled without one; set "
                              "extra_sample = false or pre-sample again with extra_sample")

    def select(self, correct: torch.Tensor, samples: int) -> torch.Tensor:
        """``[prompts]`` bool from ``correct`` ``[prompts, S]`` (S = ``samples`` or ``samples + 1``)."""
        ok = correct[:, :samples].bool()
        keep = ok.sum(1) >= self.min_correct
        if self.first_correct:
            keep &= ok[:, : self.first_correct].all(1)
        if self.extra_sample:
            keep &= correct[:, samples].bool()
        return keep


@dataclass
class RehearsalSet:
    """Rehearsal rows ready for a forward pass, and the prompts split into the two sets.

    ``batch`` holds ``input_ids`` / ``attention_mask`` / ``position_ids`` ``[N, P + R]``,
    ``responses`` / ``response_mask`` / ``ref_log_prob`` ``[N, R]``. ``manifest`` is the store's
    manifest; ``rehearsal`` and ``exploration`` are the training prompts of each set (as text and
    answer), ``rehearsal_index`` / ``exploration_index`` their positions in the manifest's prompts,
    ``row_prompt_index`` the position of each batch row's prompt.
    """

    batch: dict[str, torch.Tensor]
    rehearsal: list[Problem]
    exploration: list[Problem]
    manifest: dict[str, Any]
    rehearsal_index: list[int] = field(default_factory=list)
    exploration_index: list[int] = field(default_factory=list)
    row_prompt_index: list[int] = field(default_factory=list)

    def prompt_ids(self, row: int) -> list[int]:
        """The stored prompt token ids of batch row ``row`` (without padding)."""
        width = self.batch["input_ids"].shape[1] - self.batch["responses"].shape[1]
        keep = self.batch["attention_mask"][row, :width].bool()
        return self.batch["input_ids"][row, :width][keep].tolist()

    def __len__(self) -> int:
        return int(self.batch["responses"].shape[0])


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name, then rename it into place."""
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def atomic_write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def shard_path(root: Path, chunk: int) -> Path:
    return root / f"shard-{chunk:05d}.safetensors"


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The store's manifest; ``DataError`` if the folder or file is missing, corrupt, of another version,
    lacks one of ``MANIFEST_KEYS`` or holds an invalid selection rule."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"no rehearsal store at {Path(root)} (missing {MANIFEST}); run `klcore run dph-presample "
                        f"--out {Path(root)}` or divergence_rl.presample() first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); the store is corrupt: pre-sample again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a divergence-rl rehearsal manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path} has format version {manifest.get('version')!r}; this divergence-rl reads "
                        f"version {VERSION}: pre-sample again with this version")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DataError(f"{path} lacks the keys {missing} (a version-{VERSION} manifest holds {list(MANIFEST_KEYS)}); "
                        "the store is incomplete or was edited: pre-sample again into a new folder")
    try:
        SelectionRule(**manifest["rule"])
    except (TypeError, ConfigError) as exc:
        raise DataError(f"{path} holds an invalid selection rule {manifest['rule']!r} ({exc}); expected a table "
                        "with min_correct, first_correct, extra_sample: fix it or pre-sample again") from exc
    return manifest


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """One shard's tensors; ``DataError`` if it is missing, unreadable or lacks a tensor."""
    if not path.is_file():
        raise DataError(f"rehearsal shard {path} is missing; resume the pre-sampling run to complete the store")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"rehearsal shard {path} is corrupt ({exc}); delete it and resume the pre-sampling run") from exc
    missing = [k for k in SHARD_KEYS if k not in tensors]
    if missing:
        raise DataError(f"rehearsal shard {path} lacks tensors {missing}; delete it and resume the pre-sampling run")
    return tensors


def _pad(rows: list[torch.Tensor], width: int, value: float, left: bool) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if left:
            out[i, width - len(r) :] = r
        else:
            out[i, : len(r)] = r
    return out


def load_rehearsal(root: str | Path, rule: SelectionRule | None = None) -> RehearsalSet:
    """Read a complete store and split its prompts with ``rule`` (default: the rule it was sampled with).

    Raises ``DataError`` for a missing, corrupt or incomplete store and for an empty rehearsal set.
    """
    root = Path(root)
    manifest = read_manifest(root)
    rule = rule if rule is not None else SelectionRule(**manifest["rule"])
    rule.check(manifest["samples"], manifest["extra_sample"])
    prompts = [Problem(p, a) for p, a in manifest["prompts"]]
    chunk = manifest["chunk_size"]
    correct_parts, prompt_rows, response_rows, logp_rows, owners = [], [], [], [], []
    for c in range((len(prompts) + chunk - 1) // chunk):
        shard = read_shard(shard_path(root, c))
        correct_parts.append(shard["correct"])
        pm, rm = shard["prompt_mask"].bool(), shard["response_mask"].bool()
        for i in range(shard["prompt_index"].shape[0]):
            owners.append(int(shard["prompt_index"][i]))
            prompt_rows.append(shard["prompt_ids"][i][pm[i]])
            response_rows.append(shard["response_ids"][i][rm[i]])
            logp_rows.append(shard["ref_log_prob"][i][rm[i]])
    correct = torch.cat(correct_parts)
    if correct.shape[0] != len(prompts):
        raise DataError(f"the shards of {root} hold {correct.shape[0]} prompts but the manifest lists {len(prompts)}")
    keep = rule.select(correct, manifest["samples"])
    rows = [i for i, owner in enumerate(owners) if bool(keep[owner])]
    if not rows:
        raise DataError(f"the rehearsal set of {root} is empty under {rule}: no training prompt passes it; relax the "
                        f"rule (min_correct, first_correct, extra_sample) or warm the policy up further")
    width_p = max(len(prompt_rows[i]) for i in rows)
    width_r = max(len(response_rows[i]) for i in rows)
    pad = manifest["pad_token_id"]
    p_ids = _pad([prompt_rows[i] for i in rows], width_p, pad, left=True)
    p_mask = _pad([torch.ones(len(prompt_rows[i]), dtype=torch.long) for i in rows], width_p, 0, left=True)
    r_ids = _pad([response_rows[i] for i in rows], width_r, pad, left=False)
    r_mask = _pad([torch.ones(len(response_rows[i]), dtype=torch.bool) for i in rows], width_r, False, left=False)
    attention = torch.cat([p_mask, r_mask.long()], dim=1)
    batch = {
        "input_ids": torch.cat([p_ids, r_ids], dim=1),
        "attention_mask": attention,
        "position_ids": position_ids(attention),
        "responses": r_ids,
        "response_mask": r_mask,
        "ref_log_prob": _pad([logp_rows[i] for i in rows], width_r, 0.0, left=False),
    }
    rehearsed = {owners[i] for i in rows}
    rehearsal_index = [i for i in range(len(prompts)) if i in rehearsed]
    exploration_index = [i for i in range(len(prompts)) if i not in rehearsed]
    return RehearsalSet(
        batch=batch,
        rehearsal=[prompts[i] for i in rehearsal_index],
        exploration=[prompts[i] for i in exploration_index],
        manifest={**manifest, "rule": asdict(rule)},
        rehearsal_index=rehearsal_index,
        exploration_index=exploration_index,
        row_prompt_index=[owners[i] for i in rows],
    )


__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "RehearsalSet",
    "SelectionRule",
    "load_rehearsal",
    "read_manifest",
    "read_shard",
]
