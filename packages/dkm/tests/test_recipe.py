from __future__ import annotations

import json
from pathlib import Path

import pytest

from klcore.errors import ConfigError
from klcore.plugins import build_plugin_manager
from klcore.recipes import run_recipe


def test_dkm_benchmark_recipe_runs_at_a_tiny_size(tmp_path: Path) -> None:
    plugins = build_plugin_manager()
    summary = run_recipe(
        plugins,
        "dkm-benchmark",
        out=tmp_path,
        overrides=[
            "datasets=['diabetes', 'wine']",
            "seeds=2",
            "epochs=2",
            "num_inducing=8",
            "gp_iterations=3",
            "mlp_hidden=8",
        ],
    )
    assert set(summary["results"]) == {"diabetes", "wine"}
    rows = summary["results"]["wine"]["methods"]
    assert set(rows) == {"dkm", "nngp", "gp", "mlp"}
    assert all(0.0 <= r["metric_mean"] <= 1.0 and r["ll_mean"] < 0 for r in rows.values())
    assert (tmp_path / "report.md").read_text().count("| diabetes |") == 4
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["results"]["diabetes"]["metric"] == "rmse"


def test_dkm_benchmark_rejects_unknown_datasets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="iris"):
        run_recipe(build_plugin_manager(), "dkm-benchmark", out=tmp_path, overrides=["datasets=['iris']"])
