from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dkm.calibration import classification_ece, regression_ece

from klcore.errors import ConfigError
from klcore.plugins import build_plugin_manager
from klcore.recipes import run_recipe


def test_dkm_benchmark_recipe_runs_at_a_tiny_size(tmp_path: Path) -> None:
    summary = run_recipe(
        build_plugin_manager(),
        "dkm-benchmark",
        out=tmp_path,
        overrides=["seeds=2", "max_iterations=3", "adam_epochs=2", "num_inducing=8", "mlp_hidden=8"],
    )
    assert set(summary["results"]) == {"diabetes", "wine"}
    rows = summary["results"]["wine"]["methods"]
    assert set(rows) == {"dkm", "nngp", "gp", "mlp"}
    for r in rows.values():
        assert 0.0 <= r["accuracy"]["mean"] <= 1.0 and r["test_ll"]["mean"] < 0 and 0 <= r["ece"]["mean"] <= 1
        assert r["accuracy"]["half_width"] is not None  # 95% interval over the 2 seeds
    assert summary["results"]["diabetes"]["methods"]["gp"]["rmse"]["mean"] > 0
    assert (tmp_path / "report.md").read_text().count("| diabetes |") == 4
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    assert (tmp_path / "runs" / "wine-dkm" / "seed-1" / "result.json").exists()  # klcore.experiments layout
    assert json.loads((tmp_path / "summary.json").read_text())["results"]["diabetes"]["metric"] == "rmse"


def test_dkm_benchmark_rejects_unknown_datasets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="iris"):
        run_recipe(build_plugin_manager(), "dkm-benchmark", out=tmp_path, overrides=["datasets=['iris']"])


def test_calibration_errors_against_hand_computed_values() -> None:
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    # bins (15): 0.9 -> bin 13, 0.8 -> bin 12, 0.7 -> bin 10, 0.55 -> bin 8; each holds one point
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.55)) / 4
    assert classification_ece(proba, labels) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    y = rng.standard_normal(20000)
    assert regression_ece(np.zeros_like(y), np.ones_like(y), y) < 0.01  # calibrated
    assert regression_ece(np.zeros_like(y), 0.1 * np.ones_like(y), y) > 0.3  # overconfident
