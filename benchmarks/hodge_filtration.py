"""hodgecover benchmark: the beta_1 curve of the tau* filtration, gudhi persistence vs one exact rank per threshold.

    python benchmarks/hodge_filtration.py                  # n = 64 and 128, 500 triangles, 80 thresholds (< 1 min)
    python benchmarks/hodge_filtration.py --sizes 64 256

Both backends of ``hodgecover.complex.filtration`` run on the same complex in this run: all C(n, 2) edges with
random barriers, ``--triangles`` candidates drawn by ``candidate_triangles(levels=thresholds)``, triangle values
just above their largest edge. Prints each time, the ratio exact / gudhi (> 1: gudhi is faster) and whether the
two curves are identical.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from hodgecover.barriers import candidate_triangles
from hodgecover.complex import filtration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--triangles", type=int, default=500)
    parser.add_argument("--thresholds", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3, help="gudhi repeats (best of); exact runs once")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'n':>5} {'edges':>7} {'triangles':>9} {'exact s':>9} {'gudhi s':>9} {'ratio':>8}  identical")
    for n in args.sizes:
        edges = list(itertools.combinations(range(n), 2))
        ev = rng.exponential(size=len(edges))
        tris = candidate_triangles(edges, ev, cap=args.triangles, seed=0, levels=args.thresholds)
        lookup = dict(zip(edges, ev))
        tv = np.array([max(lookup[(i, j)], lookup[(i, k)], lookup[(j, k)]) for i, j, k in tris])
        tv = tv + rng.uniform(0, 0.2, len(tris))
        kw = dict(num_thresholds=args.thresholds, mode="joint")
        t0 = time.perf_counter()
        exact = filtration(n, edges, ev, tris, tv, backend="exact", **kw)
        t_exact = time.perf_counter() - t0
        t_gudhi = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fast = filtration(n, edges, ev, tris, tv, backend="gudhi", **kw)
            t_gudhi = min(t_gudhi, time.perf_counter() - t0)
        same = all(np.array_equal(getattr(fast, b), getattr(exact, b)) for b in ("beta0", "beta1", "beta2"))
        print(f"{n:>5} {len(edges):>7} {len(tris):>9} {t_exact:>9.3f} {t_gudhi:>9.4f} {t_exact / t_gudhi:>7.0f}x  {same}")


if __name__ == "__main__":
    main()
