"""docs/entropy-rl.md's worked example runs exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "entropy-rl.md"


def _worked_example_blocks() -> list[str]:
    text = DOC.read_text()
    section = text.split("## Worked example", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_worked_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    blocks = _worked_example_blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    out = capsys.readouterr().out
    assert "KL-Cov: penalised share" in out and "Clip-Cov: detached share" in out and "ceiling" in out
    assert namespace["fit"].a > 0  # the example's data follow the law
    assert len(namespace["history"]) == 2 and (tmp_path / "entropy-example").is_dir()
