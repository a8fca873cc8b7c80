"""Clip-Cov and KL-Cov (entropy_rl) versus PPO-clip (klcore.losses.ppo_clip_loss) and, when importable,
verl's own compute_policy_loss_clip_cov / compute_policy_loss_kl_cov.

Times forward + backward of each loss on random [rows, T] tensors (default 1024 x 1024 = 1M tokens,
80% valid), median of interleaved repeats, and prints each time as a ratio to PPO-clip measured in the
same run (target: <= 1.2x). Where verl is importable (the ``verl`` nox session's environment), it also
times verl's own losses and entropy_rl's verl wrappers (``clip_cov_klcore`` / ``kl_cov_klcore`` through
``get_policy_loss_fn``) and prints the micro-batch-scope ratios against verl in the same run (target:
<= 1.0x). ``python benchmarks/cov_losses.py [--device cuda] [--dtype bfloat16]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from entropy_rl import clip_cov_loss, kl_cov_loss

from klcore.losses import ppo_clip_loss


def _inputs(rows: int, width: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    old = (-torch.rand(rows, width, generator=g) * 4).to(device)
    new = (old.cpu() + 0.3 * torch.randn(rows, width, generator=g)).to(device=device, dtype=dtype)
    adv = (torch.randn(rows, 1, generator=g) * 2).expand(rows, width).contiguous().to(device)
    lengths = torch.randint(width // 2, width + 1, (rows,), generator=g)
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    return old, new, adv, mask


def _verl_functions() -> dict[str, Callable]:
    try:
        from omegaconf import OmegaConf
        from verl.trainer.ppo import core_algos
    except ImportError:
        return {}
    config = OmegaConf.create(
        {"clip_ratio": 1.0, "clip_ratio_low": 1.0, "clip_ratio_high": 1.0, "global_batch_info": {}, "policy_loss": {
            "clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 2e-3, "ppo_kl_coef": 1.0}}
    )

    def wrap(fn):
        return lambda old, new, adv, mask: fn(old, new, adv, mask, loss_agg_mode="token-mean", config=config)[0]

    import entropy_rl.integrations.verl  # noqa: F401  (registers the wrappers)

    return {"verl clip_cov": wrap(core_algos.compute_policy_loss_clip_cov),
            "verl kl_cov": wrap(core_algos.compute_policy_loss_kl_cov),
            "clip_cov_klcore (verl)": wrap(core_algos.get_policy_loss_fn("clip_cov_klcore")),
            "kl_cov_klcore (verl)": wrap(core_algos.get_policy_loss_fn("kl_cov_klcore"))}


#: (ours, verl's) pairs compared where verl is importable, all in micro-batch scope
AGAINST_VERL = [("clip_cov micro-batch", "verl clip_cov"), ("clip_cov_klcore (verl)", "verl clip_cov"),
                ("kl_cov micro-batch", "verl kl_cov"), ("kl_cov_klcore (verl)", "verl kl_cov")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    old, new, adv, mask = _inputs(args.rows, args.width, args.device, dtype)
    cases: dict[str, Callable] = {
        "ppo_clip (baseline)": lambda o, n, a, m: ppo_clip_loss(o, n, a, m)[0],
        "clip_cov": lambda o, n, a, m: clip_cov_loss(o, n, a, m)[0],
        "clip_cov micro-batch": lambda o, n, a, m: clip_cov_loss(o, n, a, m, scope="micro-batch")[0],
        "kl_cov": lambda o, n, a, m: kl_cov_loss(o, n, a, m)[0],
        "kl_cov micro-batch": lambda o, n, a, m: kl_cov_loss(o, n, a, m, scope="micro-batch")[0],
        **_verl_functions(),
    }

    def once(fn: Callable) -> float:
        x = new.detach().clone().requires_grad_(True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(old, x, adv, mask).backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        once(fn)  # warm-up
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(once(fn))
    base = statistics.median(times["ppo_clip (baseline)"])
    tokens = int(mask.sum())
    print(f"{args.rows} x {args.width} tokens ({tokens} valid), {args.device}, {args.dtype}, median of {args.repeats}")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:24s} {med * 1e3:9.2f} ms   {med / base:5.2f}x ppo_clip")
    for ours, theirs in AGAINST_VERL:
        if theirs in times:
            ratio = statistics.median(times[ours]) / statistics.median(times[theirs])
            print(f"{ours:24s} {ratio:5.2f}x {theirs} (target <= 1.0x)")


if __name__ == "__main__":
    main()
