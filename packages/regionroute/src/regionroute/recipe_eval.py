"""Recipe ``regionroute-eval``: RSM and background MSE / PSNR / SSIM / LPIPS of edited images.

``records`` is a JSON list of ``{"edited": path, "source": path, "mask": path, "style": text}``
(paths relative to the file). ``clip`` is a local ``CLIPModel`` folder (with its tokenizer and, when
present, its ``CLIPImageProcessor``); ``lpips_features`` / ``lpips_lin`` are torchvision's AlexNet
(default: torch hub's cache) and the lpips package's ``alex.pth`` (default: the installed package's).
Scoring real records needs real weights (``ConfigError`` otherwise) unless ``random_weights=true``.
Left empty, the recipe runs a self-contained demo: toy edits (the styled targets, with noise added)
scored with a tiny random CLIP and a random LPIPS backbone. Random-weight numbers test plumbing only
and are labelled so in every output (each row, the summary, the report).

Each image is scored on its own: a record that fails (a missing file, an unreadable image, a mask
that does not fit) is written to ``per_image.jsonl`` with its error and left out of the means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klcore.errors import CheckpointError, ConfigError, DataError, KlcoreError, ShapeError
from regionroute.data import read_image, read_mask
from regionroute.metrics import alexnet_lpips, background_metrics, regional_style_matching


@dataclass
class EvalConfig:
    """Inputs of the evaluation; empty strings select the offline demo pieces."""

    records: str = ""
    clip: str = ""
    lpips_features: str = ""
    lpips_lin: str = ""
    random_weights: bool = False
    crop_padding: float = 0.05
    demo_examples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or self.demo_examples < 1:
            raise ConfigError("need crop_padding >= 0 and demo_examples >= 1")


def _demo_records(config: EvalConfig, run_dir: Path) -> Path:
    from PIL import Image

    from regionroute.toy import make_toy_dataset

    src_file = make_toy_dataset(run_dir / "demo", n=config.demo_examples, size=64, styles=["stripes", "invert"], seed=config.seed)
    g = torch.Generator().manual_seed(config.seed)
    out = []
    for i, rec in enumerate(json.loads(src_file.read_text())):
        target = read_image(src_file.parent / rec["target"])
        noisy = (target + 0.03 * torch.randn(target.shape, generator=g)).clamp(0, 1)
        edited = f"img/edited_{i:05d}.png"
        Image.fromarray((noisy.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(src_file.parent / edited)
        obj, style = next(iter(rec["objects"].items()))
        mask = str(Path(rec["source"]).parent / f"mask_{Path(rec['source']).stem}_{obj}.png")
        out.append({"edited": edited, "source": rec["source"], "mask": mask, "style": f"{style} style"})
    path = src_file.parent / "eval_records.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def _tiny_clip() -> tuple[Any, Any]:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "vocab_size": 300, "max_position_embeddings": 64},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )

    def tokenizer(texts: list[str], padding: bool = True, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        longest = max(len(t) for t in texts) + 2
        ids = [[1] + [3 + ord(c) % 290 for c in t] + [2] + [0] * (longest - len(t) - 2) for t in texts]
        return {"input_ids": torch.tensor(ids), "attention_mask": (torch.tensor(ids) != 0).long()}

    return CLIPModel(cfg).eval(), tokenizer


KEYS = ["rsm", "bg/lpips", "bg/mse", "bg/psnr", "bg/ssim"]


def _scorers(config: EvalConfig, random_weights: bool) -> tuple[Any, Any, Any, Any, str]:
    """CLIP model, tokenizer, image processor (or None), LPIPS model and the label of the weights used."""
    if config.clip:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        clip, tokenizer = CLIPModel.from_pretrained(config.clip).eval(), AutoTokenizer.from_pretrained(config.clip)
        try:
            processor = CLIPImageProcessor.from_pretrained(config.clip)
        except OSError:  # no preprocessor_config.json: clip_preprocess at the vision tower's size
            processor = None
    elif random_weights:
        clip, tokenizer = _tiny_clip()
        processor = None
    else:
        raise ConfigError("set clip=<local CLIPModel folder> to score real edits (or random_weights=true for a smoke run)")
    torch.manual_seed(config.seed)
    try:
        lpips = alexnet_lpips(config.lpips_features or None, config.lpips_lin or None, demo=random_weights)
    except CheckpointError as exc:
        raise ConfigError(f"{exc} (or set random_weights=true for a smoke run)") from exc
    label = "random (demo: numbers test plumbing only)" if random_weights else "real"
    return clip, tokenizer, processor, lpips, f"{label}; clip {config.clip or 'tiny random'}; lpips {lpips.source}"


def _score(rec: Any, path: Path, config: EvalConfig, scorers: tuple[Any, Any, Any, Any, str]) -> dict[str, float]:
    clip, tokenizer, processor, lpips, _ = scorers
    missing = [k for k in ("edited", "source", "mask", "style") if not isinstance(rec, dict) or k not in rec]
    if missing:
        raise DataError(f"the record lacks {missing}")
    absent = [str(path.parent / rec[k]) for k in ("edited", "source", "mask") if not (path.parent / rec[k]).is_file()]
    if absent:
        raise DataError(f"files {absent} do not exist (paths are relative to the records file)")
    edited, source = read_image(path.parent / rec["edited"])[None], read_image(path.parent / rec["source"])[None]
    if edited.shape != source.shape:
        raise ShapeError(f"edited image {tuple(edited.shape[2:])} and source {tuple(source.shape[2:])} differ in size")
    mask = read_mask(path.parent / rec["mask"], (int(source.shape[2]), int(source.shape[3])))[None, None]
    row = background_metrics(edited, source, mask, lpips=lpips)
    row["rsm"] = float(regional_style_matching(
        edited, mask, [rec["style"]], clip, tokenizer, padding=config.crop_padding, processor=processor
    )[0])
    return row


def run(config: EvalConfig, run_dir: Path) -> dict[str, Any]:
    """Score every record; write ``per_image.jsonl``, ``report.md``, ``metrics.png``; return the means."""
    demo = not config.records
    path = _demo_records(config, run_dir) if demo else Path(config.records)
    if not path.is_file():
        raise DataError(f"records file {path} does not exist")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} must hold a non-empty JSON list")
    scorers = _scorers(config, demo or config.random_weights)
    weights = scorers[-1]
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        try:
            rows.append({"index": i, **_score(rec, path, config, scorers), "weights": weights})
        except (KlcoreError, OSError) as exc:  # this image only; the rest are still scored
            rows.append({"index": i, "error": f"{type(exc).__name__}: {exc}", "weights": weights})
    with (run_dir / "per_image.jsonl").open("w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    scored = [r for r in rows if "error" not in r]
    summary: dict[str, Any] = {k: sum(r[k] for r in scored) / len(scored) if scored else float("nan") for k in KEYS}
    summary.update({
        "images": len(scored), "failed": len(rows) - len(scored), "demo": demo, "weights": weights,
        "records": str(path), "run_dir": str(run_dir),
    })
    _report(run_dir, summary, rows, KEYS)
    if not scored:
        raise DataError(f"no record of {path} could be scored; the first error: {rows[0]['error']} (all in per_image.jsonl)")
    return summary


def _report(run_dir: Path, summary: dict[str, Any], rows: list[dict[str, float]], keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.5))
    for a, k in zip(ax, keys, strict=True):
        a.hist([r[k] for r in scored if r[k] != float("inf")], bins=10)
        a.set_title(k, fontsize=8)
    fig.suptitle(f"weights: {summary['weights']}", fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "metrics.png", dpi=100)
    plt.close(fig)
    note = f"Weights: {summary['weights']}.\n\n"
    table = "| metric | mean |\n|---|---|\n" + "".join(f"| {k} | {summary[k]:.4f} |\n" for k in keys)
    failures = "".join(f"- record {r['index']}: {r['error']}\n" for r in rows if "error" in r)
    failed = f"\n{summary['failed']} records failed and are left out of the means:\n\n{failures}" if failures else ""
    (run_dir / "report.md").write_text(
        f"# regionroute-eval\n\n{note}{summary['images']} images scored from {summary['records']}\n\n{table}{failed}\n"
        "![metrics](metrics.png)\n"
    )


__all__ = ["KEYS", "EvalConfig", "run"]
