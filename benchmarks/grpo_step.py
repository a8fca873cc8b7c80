"""Seconds per GRPO step, klcore's GRPOTrainer against TRL's GRPOTrainer, and rollout tokens/s,
``klcore.rollout.sample`` against ``model.generate``; each pair on the same tiny Llama in one run.

    python benchmarks/grpo_step.py                 # CPU, about 3 minutes
    python benchmarks/grpo_step.py --quick         # smoke sizes, seconds
    python benchmarks/grpo_step.py --device cuda --size medium

Rollout: 64 sampled sequences (prompts x group size 4 and 16) of 32 and 128 new tokens after a 32-token
prompt, EOS disabled so both produce exactly that many tokens; ``generate`` gets the prompts once with
``num_return_sequences`` = group size (it repeats them before its prefill), klcore ``sample`` prefills
each prompt once. Printed: median tokens/s and the ratio klcore / generate (target >= 1.0 at every
size, >= 1.5 at group size 16).

GRPO step: ``prompts`` x ``group`` completions of at most ``max_new_tokens`` tokens, a reward on the
completion text, one optimiser step per batch, no reference model (beta = 0), no dropout; a step is
sampling, scoring, the old-log-prob pass and the update in both. Printed: median seconds per step and
the ratio klcore / TRL (target <= 0.8), with the mean completion length each produced.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _timing import StepTimer, sync
from transformers import LlamaConfig

from klcore.rollout import sample
from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
from klcore.toy.tasks import Problem

SIZES = {"small": None, "medium": (512, 4, 8, 4, 1536)}


def _model_config(size: str) -> LlamaConfig:
    cfg = tiny_config("small", max_positions=256)
    if SIZES[size] is not None:
        hidden, layers, heads, kv, mlp = SIZES[size]  # type: ignore[misc]
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads = hidden, layers, heads
        cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim = kv, mlp, hidden // heads
    return cfg


def _median_seconds(fns, repeats: int, device: str) -> list[float]:  # type: ignore[no-untyped-def]
    """Median seconds of each function, timed in alternation so drifts of the machine hit all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def rollout_rates(model, args) -> list[tuple[str, float, float]]:  # type: ignore[no-untyped-def]
    """``(setting, klcore tokens/s, generate tokens/s)`` for each rollout size."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for new_tokens in args.rollout_tokens:
        for group in (4, 16):
            prompts = torch.randint(4, 49, (args.rollout_rows // group, args.prompt_len), generator=gen).to(args.device)
            lists = prompts.tolist()

            def ours(lists=lists, group=group, new_tokens=new_tokens) -> None:
                sample(model, lists, group_size=group, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0,
                       generator=torch.Generator().manual_seed(1))

            def theirs(prompts=prompts, group=group, new_tokens=new_tokens) -> None:
                model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                               num_return_sequences=group, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               eos_token_id=None, pad_token_id=0, top_k=0, top_p=1.0, temperature=1.0)

            tokens = args.rollout_rows * new_tokens
            a, b = (tokens / t for t in _median_seconds([ours, theirs], args.repeats, args.device))
            rows.append((f"{args.rollout_rows} x {new_tokens} tokens, group {group}", a, b))
    return rows


def _reward_text(completion: str) -> float:
    """Share of digits: a reward with signal for an untrained model, the same in both trainers."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


class _DigitTask(AdditionTask):
    def verify(self, problem: Problem, completion: str) -> float:
        return _reward_text(completion)


def klcore_steps(model, tok, args, tmp: Path) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    from klcore.trainer import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(steps=args.warmup + args.steps, lr=1e-5, prompts_per_step=args.prompts, group_size=args.group,
                     max_new_tokens=args.max_new_tokens, progress=False, eval_problems=1)
    trainer = GRPOTrainer(model, tok, _DigitTask(digits=3), cfg, run_dir=tmp / "klcore")
    times, lengths = [], []
    for step in range(cfg.steps):
        sync(args.device)
        start = time.perf_counter()
        batch, metrics = trainer.collect(step)
        trainer.update(batch)
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            lengths.append(metrics["response/length_mean"])
    return times, statistics.mean(lengths)


def trl_steps(model, tok, args, tmp: Path) -> tuple[list[float], float] | None:  # type: ignore[no-untyped-def]
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        return None
    task = AdditionTask(digits=3)
    problems = task.problems(args.prompts * (args.warmup + args.steps + 1), generator=torch.Generator().manual_seed(0))
    lengths: list[float] = []

    def reward(completions, **kwargs):  # type: ignore[no-untyped-def]
        lengths.append(statistics.mean(len(tok.encode(c, add_special_tokens=False)) + 1 for c in completions))
        return [_reward_text(c) for c in completions]

    config = GRPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
        gradient_accumulation_steps=1, max_completion_length=args.max_new_tokens, beta=0.0, learning_rate=1e-5,
        max_steps=args.warmup + args.steps, report_to=[], logging_steps=10_000, save_strategy="no",
        use_cpu=args.device == "cpu", disable_tqdm=True, temperature=1.0, top_p=1.0, num_iterations=1,
        shuffle_dataset=False,
    )
    timer = StepTimer(args.device)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tok, callbacks=[timer],
                          train_dataset=Dataset.from_list([{"prompt": p.prompt} for p in problems]))
    trainer.train()
    return timer.times[args.warmup :], statistics.mean(lengths[args.warmup :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rollout-rows", type=int, default=64)
    parser.add_argument("--rollout-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke sizes")
    parser.add_argument("--no-trl", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rollout_rows, args.rollout_tokens, args.repeats, args.steps, args.warmup = 16, [8], 1, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    tok = char_tokenizer()
    base = tiny_causal_lm(_model_config(args.size), seed=0).to(args.device).eval()
    print(f"device {args.device}, {torch.get_num_threads()} threads, model {args.size} "
          f"({sum(p.numel() for p in base.parameters()) / 1e6:.2f} M params)")
    print("rollout (tokens/s, median)            klcore    generate   klcore/generate")
    for setting, ours, theirs in rollout_rates(base, args):
        print(f"  {setting:34s} {ours:9.0f}  {theirs:9.0f}   {ours / theirs:6.2f}x")
    print(f"GRPO step: {args.prompts} prompts x {args.group} completions, <= {args.max_new_tokens} new tokens, "
          f"{args.steps} timed steps")
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ours_times, ours_len = klcore_steps(copy.deepcopy(base).train(), tok, args, tmp)
        print(f"  klcore GRPOTrainer {statistics.median(ours_times):8.3f} s/step (mean completion {ours_len:.1f} tokens)")
        result = None if args.no_trl else trl_steps(copy.deepcopy(base).train(), tok, args, tmp)
        if result is None:
            print("  trl not installed: TRL baseline skipped")
            return
        trl_times, trl_len = result
        print(f"  TRL GRPOTrainer    {statistics.median(trl_times):8.3f} s/step (mean completion {trl_len:.1f} tokens)")
        print(f"  ratio klcore / TRL {statistics.median(ours_times) / statistics.median(trl_times):8.2f}x")


if __name__ == "__main__":
    main()
