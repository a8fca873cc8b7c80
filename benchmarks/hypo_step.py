"""Time per optimisation step: HyPO vs DPO alone (hypo.HyPOTrainer, same model and batch), and vs TRL's
DPOTrainer step when trl is installed.

    python benchmarks/hypo_step.py                      # CPU, small sizes (< 2 min)
    python benchmarks/hypo_step.py --device cuda --bf16 --size medium --pairs 32

A step is what each trainer does per optimiser step: DPO = forward of chosen + rejected and backward
(reference log-probs precomputed once and cached, in TRL too: precompute_ref_log_probs=True); HyPO
adds sampling k completions per prompt with the KV cache, their reference forward and the online
term in the same forward. Printed: median milliseconds per step and the ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _timing import StepTimer, sync
from hypo import HyPOConfig, HyPOTrainer, PreferencePair, plugin, tokenize_pairs
from transformers import LlamaConfig

from klcore.plugins import build_plugin_manager
from klcore.toy import char_tokenizer, tiny_causal_lm, tiny_config

SIZES = {"tiny": None, "small": None, "medium": (512, 4, 8, 4, 1536)}


def _model_config(size: str) -> LlamaConfig:
    if SIZES[size] is None:
        return tiny_config(size, max_positions=256)
    hidden, layers, heads, kv, mlp = SIZES[size]  # type: ignore[misc]
    cfg = tiny_config("small", max_positions=256)
    cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads = hidden, layers, heads
    cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim = kv, mlp, hidden // heads
    return cfg


def _pairs(n: int, prompt_len: int, completion_len: int, seed: int) -> list[PreferencePair]:
    gen = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def text(length: int) -> str:
        return "".join(letters[int(i)] for i in torch.randint(len(letters), (length,), generator=gen))

    return [PreferencePair(text(prompt_len), text(completion_len), text(completion_len)) for _ in range(n)]


def _time_klcore(model, tok, data, args, kl_coef: float, tmp: Path) -> list[float]:  # type: ignore[no-untyped-def]
    cfg = HyPOConfig(
        steps=args.warmup + args.steps, lr=1e-5, kl_coef=kl_coef, group_size=args.k, pairs_per_step=args.pairs,
        max_new_tokens=args.completion_len + 1, progress=False, mixed_precision="bf16" if args.bf16 else "no",
    )
    plugins = build_plugin_manager(plugins=[("hypo", plugin)], load_entrypoints=False)
    trainer = HyPOTrainer(model, tok, data, cfg, run_dir=tmp / f"hypo-{kl_coef}", plugins=plugins)
    times = []
    for step in range(cfg.steps):
        sync(args.device)
        start = time.perf_counter()
        batch, _ = trainer.collect(step)
        trainer.update(batch)
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def _time_trl(model, tok, pairs, args, tmp: Path) -> list[float] | None:  # type: ignore[no-untyped-def]
    try:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return None
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    config = DPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=args.pairs, max_steps=args.warmup + args.steps,
        learning_rate=1e-5, precompute_ref_log_probs=True, report_to=[], logging_steps=10_000, save_strategy="no",
        use_cpu=args.device == "cpu", bf16=args.bf16, dataloader_drop_last=True, disable_tqdm=True,
    )
    timer = StepTimer(args.device)
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer]
    )
    trainer.train()
    return timer.times[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--pairs", type=int, default=16, help="pairs per step")
    parser.add_argument("--k", type=int, default=4, help="online samples per prompt (HyPO)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--completion-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-trl", action="store_true")
    args = parser.parse_args()
    if args.device == "cpu":
        import os

        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    tok = char_tokenizer()
    base = tiny_causal_lm(_model_config(args.size), seed=0).to(args.device)
    pairs = _pairs(args.pairs * (args.warmup + args.steps), args.prompt_len, args.completion_len, seed=0)
    data = tokenize_pairs(pairs, tok, max_length=args.prompt_len + args.completion_len + 2)
    print(f"device {args.device}, bf16 {args.bf16}, model {args.size} "
          f"({sum(p.numel() for p in base.parameters()) / 1e6:.2f} M params), {args.pairs} pairs/step, "
          f"prompt {args.prompt_len} + completion {args.completion_len} chars, HyPO k = {args.k}, {args.steps} timed steps")
    with tempfile.TemporaryDirectory(prefix="hypo-bench-") as tmp_name:
        tmp = Path(tmp_name)
        results = {
            "klcore DPO (hypo, kl_coef=0)": _time_klcore(copy.deepcopy(base), tok, data, args, 0.0, tmp),
            "klcore HyPO (hypo, kl_coef=0.1)": _time_klcore(copy.deepcopy(base), tok, data, args, 0.1, tmp),
        }
        if not args.no_trl:
            trl_times = _time_trl(copy.deepcopy(base), tok, pairs, args, tmp)
            if trl_times is not None:
                results["TRL DPOTrainer"] = trl_times
            else:
                print("trl not installed: TRL baseline skipped")
    ms = {name: 1000 * statistics.median(t) for name, t in results.items()}
    for name, value in ms.items():
        print(f"{name:34s} {value:9.1f} ms/step (median)")
    dpo, hypo_ms = ms["klcore DPO (hypo, kl_coef=0)"], ms["klcore HyPO (hypo, kl_coef=0.1)"]
    print(f"ratio HyPO / DPO (klcore)          {hypo_ms / dpo:6.2f}x")
    if "TRL DPOTrainer" in ms:
        print(f"ratio klcore DPO / TRL DPOTrainer  {dpo / ms['TRL DPOTrainer']:6.2f}x")
        print(f"ratio HyPO / TRL DPOTrainer        {hypo_ms / ms['TRL DPOTrainer']:6.2f}x")


if __name__ == "__main__":
    main()
