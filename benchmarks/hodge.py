"""hodgecover benchmark: Hodge decomposition vs dense least squares; cached-prefix barriers vs full forward passes.

    python benchmarks/hodge.py                      # CPU, small defaults (< 2 min)
    python benchmarks/hodge.py --device cuda --dtype bfloat16 --layers 8

Prints times and ratios (baseline time / hodgecover time, > 1 means hodgecover is faster), measured in this run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np
import torch
from hodgecover.barriers import BarrierConfig, BarrierEngine
from hodgecover.complex import SimplicialComplex, decompose
from hodgecover.moe import merged

from klcore.divergences import kl

DENSE_LIMIT_BYTES = 256 * 1024**2


def _timed(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _random_triangles(n: int, count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    total = math.comb(n, 3)
    if count >= total:
        return list(itertools.combinations(range(n), 3))
    out: set[tuple[int, int, int]] = set()
    while len(out) < count:
        out.add(tuple(sorted(rng.choice(n, 3, replace=False).tolist())))  # type: ignore[arg-type]
    return sorted(out)


def dense_decomposition(cx: SimplicialComplex, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Baseline: numpy lstsq on the dense B1^T and B2."""
    b1, b2 = cx.boundary(1).toarray(), cx.boundary(2).toarray()
    grad = b1.T @ np.linalg.lstsq(b1.T, b, rcond=None)[0]
    curl = b2 @ np.linalg.lstsq(b2, b, rcond=None)[0] if cx.num_triangles else np.zeros_like(b)
    return grad, curl, b - grad - curl


def bench_decomposition(sizes: list[int], triangle_counts: list[int]) -> None:
    print("== Hodge decomposition (complete graph + T triangles): hodgecover (auto solver) vs dense lstsq")
    print(f"{'n':>5} {'|E|':>7} {'|T|':>7} {'hodgecover s':>13} {'dense s':>9} {'ratio':>7} {'max|diff|':>10} {'residual':>9}")
    rng = np.random.default_rng(0)
    for n, t in itertools.product(sizes, triangle_counts):
        cx = SimplicialComplex(n, itertools.combinations(range(n), 2), _random_triangles(n, t, rng))
        b = rng.uniform(size=cx.num_edges)
        fast_s, parts = _timed(lambda cx=cx, b=b: decompose(cx, b))
        dense_bytes = 8 * cx.num_edges * (cx.num_triangles + n)
        if dense_bytes > DENSE_LIMIT_BYTES:
            print(f"{n:>5} {cx.num_edges:>7} {cx.num_triangles:>7} {fast_s:>13.4f} {'skipped':>9} {'-':>7} "
                  f"{'-':>10} {parts.residual:>9.1e}  (dense needs {dense_bytes / 1e9:.1f} GB)")
            continue
        dense_s, dense = _timed(lambda cx=cx, b=b: dense_decomposition(cx, b), repeats=1)
        diff = max(float(np.abs(x - y).max()) for x, y in zip((parts.gradient, parts.curl, parts.harmonic), dense))
        print(f"{n:>5} {cx.num_edges:>7} {cx.num_triangles:>7} {fast_s:>13.4f} {dense_s:>9.4f} "
              f"{dense_s / fast_s:>7.1f} {diff:>10.1e} {parts.residual:>9.1e}")


def _model(layers: int, experts: int, hidden: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from klcore.toy import tiny_causal_lm, tiny_moe_config

    cfg = tiny_moe_config("small", num_experts=experts, top_k=2, max_positions=128)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = hidden, 2 * hidden, layers
    return tiny_causal_lm(cfg, seed=0).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def bench_barriers(layers: int, experts: int, hidden: int, merges: int, device: str, dtype: torch.dtype) -> None:
    print(f"\n== barrier evaluations/s: cached prefix + batched merges vs full forward passes "
          f"({layers} layers, {experts} experts, hidden {hidden}, {device}, {dtype})")
    model = _model(layers, experts, hidden, device, dtype)
    tokens = torch.randint(4, model.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(0))
    engine = BarrierEngine(model, tokens, BarrierConfig(merges_per_pass=8, batch_size=16, progress=False))
    pairs = list(itertools.combinations(range(experts), 2))[:merges]
    tok = tokens.to(device)
    ref = model(tok).logits
    print(f"{'layer':>5} {'cached eval/s':>14} {'full eval/s':>12} {'ratio':>7} {'max rel diff':>12}")
    total_fast = total_slow = 0.0
    for moe in engine.moe_layers:
        engine.cache.values.clear()
        t = time.perf_counter()
        fast = engine.barriers(moe.index, pairs)
        fast_s = time.perf_counter() - t
        t = time.perf_counter()
        slow = []
        for p in pairs:
            with merged(moe, p, engine.stats[moe.index].frequencies):
                slow.append(float(kl(ref, model(tok).logits).mean()))
        slow_s = time.perf_counter() - t
        total_fast, total_slow = total_fast + fast_s, total_slow + slow_s
        rel = float(np.max(np.abs(fast - np.array(slow)) / np.maximum(np.abs(slow), 1e-12)))
        print(f"{moe.index:>5} {len(pairs) / fast_s:>14.1f} {len(pairs) / slow_s:>12.1f} {slow_s / fast_s:>7.2f} "
              f"{rel:>12.1e}")
    print(f"{'all':>5} {len(pairs) * len(engine.moe_layers) / total_fast:>14.1f} "
          f"{len(pairs) * len(engine.moe_layers) / total_slow:>12.1f} {total_slow / total_fast:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--triangles", type=int, nargs="+", default=[500, 20000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--merges", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    bench_decomposition(args.sizes, args.triangles)
    bench_barriers(args.layers, args.experts, args.hidden, args.merges, args.device, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
