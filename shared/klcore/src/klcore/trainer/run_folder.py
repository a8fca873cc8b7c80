"""The run folder: ``metrics.jsonl``, ``config.json`` and atomic checkpoints.

Layout::

    RUN/config.json                 the resolved config
    RUN/metrics.jsonl               one JSON object per logged step ({"step": s, "area/name": value})
    RUN/checkpoints/step-00000012/  accelerate state + trainer_state.json + klcore_plugins.pt
                                    + trainer_extra_<rank>.pt (Trainer.extra_state)
    RUN/checkpoints/latest          name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when complete, and ``latest`` is
replaced atomically, so an interrupted save never leaves a half checkpoint behind ``latest``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from klcore.errors import CheckpointError

LATEST = "latest"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSONL of per-step metrics that a resumed run continues."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_before(self, step: int) -> list[dict[str, Any]]:
        """Keep only records of steps < ``step`` (those a checkpoint at ``step`` covers); return them."""
        kept = [r for r in self.read() if r.get("step", 0) < step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of ``run_dir``, or None when there is none."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / "trainer_state.json").exists():
        raise CheckpointError(
            f"{pointer} names {path.name} but that checkpoint is incomplete or missing; "
            "delete the pointer file to start over or point it at a complete checkpoint"
        )
    return path


def publish_checkpoint(tmp: Path, final: Path, keep: int) -> None:
    """Rename a finished temporary checkpoint into place, update ``latest``, prune old ones."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(final.parent / LATEST, final.name)
    done = sorted(p for p in final.parent.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
