"""Experiments: intervals against t-table values, resumable runs, report/summary/figures, bad input."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

import klcore.experiments as ex
from klcore.errors import ConfigError, DataError, UnknownNameError
from klcore.experiments import ExperimentResult, mean_interval, run_experiment


def t_quantile(p: float, dof: int) -> float:
    """Student t quantile from its closed forms (Shaw 2006), independent of scipy: dof 1, 2 and 4."""
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    assert dof == 4 and p > 0.5
    a = 4 * p * (1 - p)
    return 2 * math.sqrt(math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a) - 1)


T975_1 = t_quantile(0.975, 1)
T975_2 = t_quantile(0.975, 2)
T975_4 = t_quantile(0.975, 4)
T95_2 = t_quantile(0.95, 2)


def test_closed_forms_match_t_tables() -> None:
    computed = [T975_1, T975_2, T975_4, T95_2]
    assert computed == pytest.approx([12.7062047, 4.3026527, 2.7764451, 2.9199856], abs=1e-7)  # t tables, 7 decimals


def strict_json(path: Path) -> Any:
    def no_constants(token: str) -> None:
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def test_interval_of_three() -> None:
    ci = mean_interval([1, 2, 3])
    half = T975_2 * 1.0 / math.sqrt(3)
    assert (ci.n, ci.mean, ci.std) == (3, 2.0, 1.0)
    assert ci.half_width == pytest.approx(half, rel=1e-12)
    assert (ci.low, ci.high) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-12)


def test_interval_of_five_and_other_confidence() -> None:
    # mean 3.8; squared deviations 3.24 + 3 * 0.04 + 1.44 = 4.8; sample variance 4.8 / 4 = 1.2
    ci = mean_interval([2.0, 4.0, 4.0, 4.0, 5.0])
    assert ci.mean == pytest.approx(3.8, rel=1e-12)
    assert ci.std == pytest.approx(math.sqrt(1.2), rel=1e-12)
    assert ci.half_width == pytest.approx(T975_4 * math.sqrt(1.2 / 5), rel=1e-12)
    assert mean_interval([1, 2, 3], confidence=0.9).half_width == pytest.approx(T95_2 / math.sqrt(3), rel=1e-12)


def test_interval_of_one_value_and_non_finite() -> None:
    one = mean_interval([7.5])
    assert one.n == 1 and one.mean == 7.5
    assert all(math.isnan(x) for x in (one.std, one.low, one.high, one.half_width))
    assert math.isnan(mean_interval([1.0, math.nan]).mean)
    assert math.isnan(mean_interval([1.0, math.inf]).std)


def test_interval_bad_input() -> None:
    with pytest.raises(DataError):
        mean_interval([])
    with pytest.raises(DataError):
        mean_interval([1.0, "2"])  # type: ignore[list-item]
    with pytest.raises(ConfigError):
        mean_interval([1.0, 2.0], confidence=1.0)


class Counting:
    """A run whose metric is ``base + seed`` (so over seeds 0, 1, 2: mean base + 1, std 1)."""

    def __init__(self, fail: tuple[str, int] | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    def __call__(self, variant: str, options: dict[str, Any], seed: int, run_dir: Path) -> dict[str, float]:
        self.calls.append((variant, seed))
        if (variant, seed) == self.fail:
            raise RuntimeError("boom")
        with (run_dir / "metrics.jsonl").open("w") as fh:
            for step in range(4):
                fh.write(json.dumps({"step": step, "train/loss": options["base"] - step + seed, "note": "x"}) + "\n")
        return {"eval/score": options["base"] + seed, "eval/flat": 1.0}


VARIANTS = {"baseline": {"base": 1.0}, "kl-0.1": {"base": 10.0}}


def test_summary_report_and_figure(tmp_path: Path) -> None:
    result = run_experiment(Counting(), VARIANTS, [0, 1, 2], tmp_path, title="Demo")
    half = T975_2 / math.sqrt(3)
    summary = strict_json(tmp_path / "summary.json")
    assert summary == result.summary
    assert summary["title"] == "Demo" and summary["seeds"] == [0, 1, 2]
    assert list(summary["variants"]) == ["baseline", "kl-0.1"]
    score = summary["variants"]["kl-0.1"]["eval/score"]
    assert score["values"] == [10.0, 11.0, 12.0] and score["n"] == 3
    assert (score["mean"], score["std"]) == pytest.approx((11.0, 1.0), rel=1e-12)
    assert score["half_width"] == pytest.approx(half, rel=1e-12)
    assert (score["ci_low"], score["ci_high"]) == pytest.approx((11.0 - half, 11.0 + half), rel=1e-12)
    assert result.interval("baseline", "eval/score") == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-12)
    assert summary["variants"]["baseline"]["eval/flat"]["half_width"] == 0.0
    assert result.runs["kl-0.1", 2] == {"eval/score": 12.0, "eval/flat": 1.0}

    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Demo\n")
    assert "| variant | eval/score | eval/flat |" in report
    assert "| baseline | 2 ± 2.48 | 1 ± 0 |" in report
    assert "| kl-0.1 | 11 ± 2.48 | 1 ± 0 |" in report
    assert "![train/loss](figures/train_loss.png)" in report
    png = tmp_path / "figures" / "train_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["train_loss.png"]  # "note" is not numeric
    assert json.loads((tmp_path / "kl-0.1" / "seed-1" / "result.json").read_text())["metrics"]["eval/score"] == 11.0


def test_finished_runs_are_not_redone(tmp_path: Path) -> None:
    first = Counting()
    before = run_experiment(first, VARIANTS, [0, 1, 2], tmp_path)
    assert len(first.calls) == 6

    again = Counting()
    after = run_experiment(again, VARIANTS, [0, 1, 2], tmp_path)
    assert again.calls == []
    assert after.summary == before.summary and after.runs == before.runs

    (tmp_path / "kl-0.1" / "seed-1" / "result.json").unlink()
    redo = Counting()
    assert run_experiment(redo, VARIANTS, [0, 1, 2], tmp_path).summary == before.summary
    assert redo.calls == [("kl-0.1", 1)]


def test_failed_run_leaves_no_result_and_is_redone(tmp_path: Path) -> None:
    failing = Counting(fail=("kl-0.1", 1))
    with pytest.raises(RuntimeError, match="boom") as info:
        run_experiment(failing, VARIANTS, [0, 1, 2], tmp_path)
    if sys.version_info >= (3, 11):
        assert any("'kl-0.1'" in note and "seed 1" in note for note in info.value.__notes__)
    assert not (tmp_path / "kl-0.1" / "seed-1" / "result.json").exists()
    assert (tmp_path / "kl-0.1" / "seed-0" / "result.json").exists()

    fixed = Counting()
    run_experiment(fixed, VARIANTS, [0, 1, 2], tmp_path)
    assert fixed.calls == [("kl-0.1", 1), ("kl-0.1", 2)]


def test_single_seed_and_non_finite_metrics(tmp_path: Path) -> None:
    def run(variant: str, options: dict[str, Any], seed: int, run_dir: Path) -> dict[str, float]:
        return {"acc": 0.5, "loss": math.inf if variant == "b" else math.nan}

    result = run_experiment(run, ["a", "b"], [3], tmp_path)
    acc = strict_json(tmp_path / "summary.json")["variants"]["a"]["acc"]
    assert acc == {
        "n": 1,
        "mean": 0.5,
        "std": None,
        "ci_low": None,
        "ci_high": None,
        "half_width": None,
        "values": [0.5],
    }
    assert result.summary["variants"]["b"]["loss"]["values"] == [None]
    assert all(math.isnan(x) for x in result.interval("a", "loss"))
    report = (tmp_path / "report.md").read_text()
    assert "| a | 0.5 (n=1) | nan (n=1) |" in report
    assert "Non-finite values" in report and "a / loss" in report and "b / loss" in report
    assert not (tmp_path / "figures").exists()
    # infinities survive the round trip through result.json
    assert run_experiment(run, ["a", "b"], [3], tmp_path).runs["b", 3]["loss"] == math.inf


def test_curves_aggregate_over_the_seeds_that_have_each_step(tmp_path: Path, monkeypatch) -> None:
    def run(variant: str, options: dict[str, Any], seed: int, run_dir: Path) -> dict[str, float]:
        steps = range(2 + 2 * seed)  # seed 0: steps 0-1, seed 1: steps 0-3
        (run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": t, "m/x": t + 10 * seed}) + "\n" for t in steps)
        )
        return {"final": 1.0}

    plotted: dict[str, Any] = {}
    monkeypatch.setattr(ex, "_plot", lambda path, metric, bands: plotted.update({metric: bands}))
    run_experiment(run, ["v"], [0, 1], tmp_path)
    steps, cis = plotted["m/x"]["v"]
    assert steps == [0, 1, 2, 3]
    assert [c.n for c in cis] == [2, 2, 1, 1]
    assert [c.mean for c in cis] == [5.0, 6.0, 12.0, 13.0]
    # step 0: values 0 and 10, std sqrt(50), half-width t_{0.975,1} * sqrt(50) / sqrt(2) = t_{0.975,1} * 5
    assert cis[0].half_width == pytest.approx(T975_1 * 5.0, rel=1e-12)


def test_result_lookup_errors(tmp_path: Path) -> None:
    result = run_experiment(Counting(), VARIANTS, [0, 1], tmp_path, figure_metrics=[])
    assert isinstance(result, ExperimentResult) and result.out == tmp_path
    assert not (tmp_path / "figures").exists()
    with pytest.raises(UnknownNameError, match="baseline"):
        result.interval("nope", "eval/score")
    with pytest.raises(KeyError, match="eval/score"):
        result.interval("baseline", "nope")


def ok_run(variant: str, options: dict[str, Any], seed: int, run_dir: Path) -> dict[str, float]:
    return {"m": 1.0}


@pytest.mark.parametrize(
    ("variants", "seeds"),
    [
        ({}, [0]),
        ([], [0]),
        (["a"], []),
        (["a"], [1, 1]),
        (["a"], [-1]),
        (["a"], [0.5]),
        (["a", "a"], [0]),
        (["a/b"], [0]),
        ([".."], [0]),
        ([""], [0]),
        (["figures"], [0]),
        ("abc", [0]),
        ({"a": 1}, [0]),
    ],
)
def test_bad_variants_and_seeds(tmp_path: Path, variants: Any, seeds: Any) -> None:
    with pytest.raises(ConfigError):
        run_experiment(ok_run, variants, seeds, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("returned", [[("m", 1.0)], {"m": "1.0"}, {1: 1.0}, {"m": None}, {"m": True}, None])
def test_bad_run_result_names_variant_and_seed(tmp_path: Path, returned: Any) -> None:
    with pytest.raises(DataError, match=r"'v'.*seed 4"):
        run_experiment(lambda *args: returned, ["v"], [4], tmp_path)
    assert not (tmp_path / "v" / "seed-4" / "result.json").exists()


def test_unknown_figure_metric_and_corrupt_result(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train/loss"):
        run_experiment(Counting(), VARIANTS, [0], tmp_path, figure_metrics=["nope"])
    (tmp_path / "baseline" / "seed-0" / "result.json").write_text("{not json")
    with pytest.raises(DataError, match="delete it"):
        run_experiment(Counting(), VARIANTS, [0], tmp_path)
