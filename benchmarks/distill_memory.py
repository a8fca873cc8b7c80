"""Peak memory and time of full-vocabulary reverse KL and JSD(beta) losses, forward + backward.

Compares ``opd_distill.divergence_loss`` (chunked through ``klcore.divergences``; with and without
recomputation in backward) against the naive float32 computation (upcast, log-softmax, full
[N, V] products) and, when trl is installed, TRL's ``GKDTrainer.generalized_jsd_loss`` (reverse KL is
its beta = 1 endpoint). Every measurement runs in a fresh subprocess; on CPU the peak is the growth of
the process's maximum resident set size over the inputs, on CUDA ``max_memory_allocated`` over the
inputs. Prints ratios against the naive baseline and against TRL.

    python benchmarks/distill_memory.py                       # CPU, bf16 logits, V = 32k and 128k
    python benchmarks/distill_memory.py --device cuda --rows 4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("naive_fp32", "trl", "opd_distill", "opd_distill_recompute")
LOSSES = ("reverse_kl", "jsd")


def _naive(student, teacher, kind: str, beta: float):
    import torch

    ls = torch.log_softmax(student.float(), -1)
    lt = torch.log_softmax(teacher.float(), -1)
    if kind == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1).mean()
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-beta)), lt + torch.log(torch.tensor(beta))]), 0)
    return (beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)).mean()


def _loss_fn(method: str, kind: str, beta: float, chunk: int = 0):
    if method == "naive_fp32":
        return lambda s, t: _naive(s, t, kind, beta)
    if method == "trl":
        from trl.experimental.gkd import GKDTrainer

        b = 1.0 if kind == "reverse_kl" else beta
        return lambda s, t: GKDTrainer.generalized_jsd_loss(s[None], t[None], beta=b, reduction="batchmean")
    from opd_distill import divergence_loss

    recompute = method == "opd_distill_recompute"

    def fn(s, t):
        import torch

        mask = torch.ones(1, s.shape[0], dtype=torch.bool, device=s.device)
        return divergence_loss(
            s[None], t[None], mask, kind=kind, beta=beta, checkpoint=recompute, chunk_size=chunk or None
        )[0]

    return fn


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(
    method: str, kind: str, vocab: int, rows: int, device: str, dtype: str, beta: float, repeats: int, chunk: int = 0
) -> dict:
    """One measurement, in this process: peak extra memory (bytes) and median seconds of forward + backward."""
    import torch

    torch.manual_seed(0)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    student = torch.randn(rows, vocab, device=device).to(dt).requires_grad_(True)
    teacher = torch.randn(rows, vocab, device=device).to(dt)
    fn = _loss_fn(method, kind, beta, chunk)
    warm = torch.randn(2, vocab, device=device).to(dt).requires_grad_(True)
    fn(warm, torch.randn(2, vocab, device=device).to(dt)).backward()  # lazy initialisation outside the peak
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()
    fn(student, teacher).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(0, _peak_rss_bytes() - base)
    times = []
    for _ in range(repeats):
        student.grad = None
        start = time.perf_counter()
        fn(student, teacher).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "seconds": sorted(times)[len(times) // 2] if times else 0.0}


def _in_subprocess(args: argparse.Namespace, method: str, kind: str, vocab: int) -> dict | None:
    """Memory from one fresh process (fixed mmap threshold), time from another (default allocator)."""
    call = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import distill_memory as d; "
        f"print(json.dumps(d.measure({method!r}, {kind!r}, {vocab}, {args.rows}, {args.device!r}, {args.dtype!r}, "
        f"{args.beta}, {{repeats}}, {args.chunk_size})))"
    )
    # a fixed mmap threshold makes glibc return every large freed block at once, so the resident-set peak is
    # the peak of live tensor memory (the default dynamic threshold keeps freed blocks on the heap)
    results = []
    for env, repeats in (({**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}, 0), (dict(os.environ), args.repeats)):
        out = subprocess.run([sys.executable, "-c", call.format(repeats=repeats)], capture_output=True, text=True, env=env)
        if out.returncode:
            err = out.stderr.strip().splitlines()
            print(f"  {method} failed: {err[-1] if err else out.returncode}")
            return None
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"peak_bytes": results[0]["peak_bytes"], "seconds": results[1]["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of the logits")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_000])
    parser.add_argument("--rows", type=int, default=512, help="token positions (batch x sequence)")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD(beta) interpolation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=0, help="rows per chunk for opd_distill (0: klcore's default)")
    args = parser.parse_args()
    try:
        import trl  # noqa: F401

        methods = METHODS
    except ImportError:
        methods = tuple(m for m in METHODS if m != "trl")
        print("trl is not installed: comparing against the naive float32 computation only")
    print(f"device={args.device} logits={args.dtype} rows={args.rows} (forward + backward; memory over the inputs)")
    header = f"{'loss':<11}{'V':>8}  {'method':<23}{'peak MiB':>10}{'ms':>10}{'mem/naive':>11}{'time/naive':>11}"
    header += f"{'mem/trl':>9}{'time/trl':>10}" if "trl" in methods else ""
    print(header)
    for kind in LOSSES:
        for vocab in args.vocab:
            results = {m: _in_subprocess(args, m, kind, vocab) for m in methods}
            naive, ref = results.get("naive_fp32"), results.get("trl")
            for m, r in results.items():
                if r is None:
                    continue
                line = f"{kind:<11}{vocab:>8}  {m:<23}{r['peak_bytes'] / 2**20:>10.1f}{r['seconds'] * 1e3:>10.1f}"
                for base in (naive, ref) if "trl" in methods else (naive,):
                    if base and base["peak_bytes"] > 0:
                        line += f"{r['peak_bytes'] / base['peak_bytes']:>10.2f}x{r['seconds'] / base['seconds']:>9.2f}x"
                    else:
                        line += f"{'n/a':>11}{'n/a':>10}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
