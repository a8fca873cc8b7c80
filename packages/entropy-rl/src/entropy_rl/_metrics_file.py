"""Reading a run's metric series (private)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from klcore.errors import DataError


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` (a file, or a run folder holding one) or of a JSON list of objects."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise DataError(f"metrics file {p} does not exist; pass a run folder or its metrics.jsonl (--set metrics=PATH)")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataError(f"{p} is not JSON lines / a JSON list: {exc}") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{p} must hold one JSON object per step")
    return rows
