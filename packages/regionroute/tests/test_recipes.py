from __future__ import annotations

import json

import pytest

from klcore.errors import ConfigError
from klcore.plugins import build_plugin_manager
from klcore.recipes import run_recipe

TINY_TOY = [
    "image_size=8", "train_examples=4", "eval_examples=2", "heads=2", "head_dim=8", "dual_blocks=1",
    "single_blocks=1", "base_steps=2", "base_batch=2", "sample_steps=2", "train.trainer.steps=2",
    "train.batch_size=2", "train.trainer.progress=false", "train.sample_every=1", "seeds=[0,1]",
]


def test_toy_recipe_runs_at_tiny_size(tmp_path):
    summary = run_recipe(build_plugin_manager(), "regionroute-toy", out=tmp_path, overrides=TINY_TOY)
    exp = json.loads((tmp_path / "experiment" / "summary.json").read_text())
    for variant in ("without_attention_losses", "with_attention_losses"):
        assert 0 <= summary[f"{variant}/attention_mask_iou"] <= 1
        assert summary[f"{variant}/background_mse"] >= 0
        stats = exp["variants"][variant]["attention_mask_iou"]
        assert stats["n"] == 2 and summary[f"{variant}/attention_mask_iou"] == pytest.approx(stats["mean"])
        assert summary[f"{variant}/attention_mask_iou_ci"] == pytest.approx([stats["ci_low"], stats["ci_high"]])
        for seed in (0, 1):
            run = tmp_path / "experiment" / variant / f"seed-{seed}"
            assert (run / "experts" / "stripes" / "pytorch_lora_weights.safetensors").is_file()
            assert (run / "samples" / "step-00000001.png").is_file()
    per_seed = summary["difference/attention_mask_iou_per_seed"]
    assert len(per_seed) == 2 and summary["difference/attention_mask_iou"] == pytest.approx(sum(per_seed) / 2)
    for name in ("summary.json", "report.md", "losses.png", "attention_and_edits.png", "experiment/report.md"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["styles"] == ["stripes", "invert"]
    again = run_recipe(build_plugin_manager(), "regionroute-toy", out=tmp_path, overrides=TINY_TOY)  # resumes: loads
    assert again["with_attention_losses/attention_mask_iou"] == summary["with_attention_losses/attention_mask_iou"]


def test_eval_recipe_demo_and_identity(tmp_path):
    summary = run_recipe(build_plugin_manager(), "regionroute-eval", out=tmp_path, overrides=["demo_examples=2"])
    assert summary["images"] == 2 and 0 <= summary["rsm"] <= 1 and summary["bg/mse"] > 0
    records = json.loads((tmp_path / "demo" / "eval_records.json").read_text())
    same = [dict(r, edited=r["source"]) for r in records]
    (tmp_path / "demo" / "same.json").write_text(json.dumps(same))
    same_records = f"records={tmp_path / 'demo' / 'same.json'}"
    with pytest.raises(ConfigError, match="clip="):  # real records need real weights
        run_recipe(build_plugin_manager(), "regionroute-eval", out=tmp_path / "real", overrides=[same_records])
    out = run_recipe(build_plugin_manager(), "regionroute-eval", out=tmp_path / "same", overrides=[same_records, "random_weights=true"])
    assert out["weights"].startswith("random") and summary["weights"].startswith("random")
    rows = [json.loads(line) for line in (tmp_path / "same" / "per_image.jsonl").read_text().splitlines()]
    assert all(r["weights"].startswith("random") for r in rows)
    assert "random (demo" in (tmp_path / "same" / "report.md").read_text()
    assert out["bg/mse"] == 0 and out["bg/ssim"] == pytest.approx(1.0) and out["bg/lpips"] == pytest.approx(0.0, abs=1e-7)


def test_recipe_configs_are_validated(tmp_path):
    with pytest.raises(ConfigError):
        run_recipe(build_plugin_manager(), "regionroute-toy", out=tmp_path, overrides=["image_size=7"])
    with pytest.raises(ConfigError):
        run_recipe(build_plugin_manager(), "regionroute-toy", out=tmp_path, overrides=["train.layout=unet"])


def test_eval_recipe_bad_records_raise_data_error(tmp_path):
    from klcore.errors import DataError

    run_recipe(build_plugin_manager(), "regionroute-eval", out=tmp_path, overrides=["demo_examples=1"])
    records = json.loads((tmp_path / "demo" / "eval_records.json").read_text())
    missing = tmp_path / "demo" / "missing.json"
    missing.write_text(json.dumps([dict(records[0], edited="img/nope.png")]))
    with pytest.raises(DataError, match=r"nope\.png"):
        run_recipe(build_plugin_manager(), "regionroute-eval", out=tmp_path / "m", overrides=[f"records={missing}", "random_weights=true"])
    broken = tmp_path / "demo" / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match="JSON"):
        run_recipe(build_plugin_manager(), "regionroute-eval", out=tmp_path / "b", overrides=[f"records={broken}", "random_weights=true"])


def test_eval_recipe_isolates_failing_images(tmp_path):
    from PIL import Image

    run_recipe(build_plugin_manager(), "regionroute-eval", out=tmp_path, overrides=["demo_examples=3"])
    demo = tmp_path / "demo"
    records = json.loads((demo / "eval_records.json").read_text())
    big = Image.new("L", (64, 64), 255)  # an object covering all but an 8-px strip
    big.paste(0, (0, 0, 64, 8))
    big.save(demo / "img" / "big_mask.png")
    Image.new("L", (64, 64), 128).save(demo / "img" / "soft_mask.png")  # a soft 0.5 mask
    mixed = [
        dict(records[0], mask="img/big_mask.png"), dict(records[1], mask="img/soft_mask.png"),
        dict(records[2], edited="img/nope.png"), records[0],
    ]
    (demo / "mixed.json").write_text(json.dumps(mixed))
    out = run_recipe(build_plugin_manager(), "regionroute-eval", out=tmp_path / "mixed",
                     overrides=[f"records={demo / 'mixed.json'}", "random_weights=true"])
    assert out["images"] == 3 and out["failed"] == 1
    rows = [json.loads(line) for line in (tmp_path / "mixed" / "per_image.jsonl").read_text().splitlines()]
    assert [("error" in r) for r in rows] == [False, False, True, False]
    assert "DataError" in rows[2]["error"] and "nope.png" in rows[2]["error"]
    assert all(0 < rows[i]["bg/ssim"] <= 1 for i in (0, 1, 3))
    assert "1 records failed" in (tmp_path / "mixed" / "report.md").read_text()
