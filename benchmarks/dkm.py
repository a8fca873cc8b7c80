"""dkm benchmark: objective + gradient time against GPyTorch, sparse DKM epoch scaling, sparse DKM vs SVGP.

Prints ratios against baselines measured in the same run:
1. zero-hidden-layer full DKM objective + gradient vs GPyTorch ExactMarginalLogLikelihood (default settings,
   i.e. CG/Lanczos above max_cholesky_size = 800, and with Cholesky forced) at P = 1000, 2000 and 4000;
   full DKMs with 1 and 2 hidden layers (relu) against the same GPyTorch default at each P;
2. sparse DKM epoch time as the number of data points grows 8x (linear cost: ratio about 8);
3. sparse DKM (0 and 1 hidden layers) epoch vs GPyTorch SVGP epoch with the same inducing points.

    python benchmarks/dkm.py [--device cuda] [--dtype float32] [--sizes 1000 2000 4000] [--repeats 3]

bf16 is not offered: torch.linalg.cholesky has no bf16 kernel and GP numerics need float32 at least.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# This file is named dkm.py: drop its folder from the import path so that `import dkm` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import dkm  # noqa: E402
from dkm.fitting import fit  # noqa: E402


def _timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def exact_objective(sizes: list[int], features: int, dtype: torch.dtype, device: str, repeats: int) -> None:
    print("\n## 1. zero-hidden-layer objective + gradient vs GPyTorch exact MLL (sqexp / RBF kernel)")
    print(
        "| P | dkm s | gpytorch default s | ratio | gpytorch cholesky s | ratio | 1 hidden s | ratio | 2 hidden s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in sizes:
        t_ours, t_default, t_chol = _exact_case(p, features, dtype, device, repeats)
        deep = [_full_dkm_case(p, features, layers, dtype, device, repeats) for layers in (1, 2)]
        print(
            f"| {p} | {t_ours:.4f} | {t_default:.4f} | {t_ours / t_default:.2f} | {t_chol:.4f} | "
            f"{t_ours / t_chol:.2f} | {deep[0]:.4f} | {deep[0] / t_default:.2f} | {deep[1]:.4f} | "
            f"{deep[1] / t_default:.2f} |",
            flush=True,
        )


def _full_dkm_case(p: int, features: int, layers: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    """Seconds for one objective + gradient of a full DKM with ``layers`` hidden layers (relu kernel)."""
    x = torch.randn(p, features, dtype=dtype, device=device)
    y = torch.sin(x.sum(1))
    model = dkm.FullDKM(x, num_layers=layers, kernel="relu", dtype=dtype).to(device)
    objective = dkm.FullDKMObjective(model, dkm.GaussianLikelihood(0.1, dtype=dtype).to(device))

    def step() -> None:
        objective.zero_grad()
        objective(x, y)[0].backward()

    return _timed(step, device, repeats)


def _exact_case(p: int, features: int, dtype: torch.dtype, device: str, repeats: int) -> tuple[float, float, float]:
    """Seconds for (dkm, GPyTorch default settings, GPyTorch with Cholesky forced) objective + gradient."""
    import gpytorch

    x = torch.randn(p, features, dtype=dtype, device=device)
    y = torch.sin(x.sum(1))
    model = dkm.FullDKM(x, num_layers=0, kernel="sqexp", dtype=dtype).to(device)
    objective = dkm.FullDKMObjective(model, dkm.GaussianLikelihood(0.1, dtype=dtype).to(device))

    def ours() -> None:
        objective.zero_grad()
        objective(x, y)[0].backward()

    class GP(gpytorch.models.ExactGP):
        def __init__(self, lik: gpytorch.likelihoods.GaussianLikelihood) -> None:
            super().__init__(x, y, lik)
            self.covar = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

        def forward(self, inp: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
            return gpytorch.distributions.MultivariateNormal(torch.zeros_like(inp[:, 0]), self.covar(inp))

    lik = gpytorch.likelihoods.GaussianLikelihood().to(device=device, dtype=dtype)
    gp = GP(lik).to(device=device, dtype=dtype)
    gp.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)

    def theirs() -> None:
        gp.zero_grad()
        (-mll(gp(x), y)).backward()

    def theirs_cholesky() -> None:
        with gpytorch.settings.max_cholesky_size(10**7):
            theirs()

    return _timed(ours, device, repeats), _timed(theirs, device, repeats), _timed(theirs_cholesky, device, repeats)


def _sparse_epoch(
    p: int, features: int, layers: int, inducing: int, batch: int, dtype: torch.dtype, device: str
) -> float:
    x = torch.randn(p, features, dtype=dtype, device=device)
    y = torch.sin(x.sum(1))
    model = dkm.SparseDKM(x[:inducing], 1, num_layers=layers, dtype=dtype).to(device)
    objective = dkm.SparseDKMObjective(model, dkm.GaussianLikelihood(dtype=dtype).to(device), num_data=p)
    fit(objective, x, y, epochs=1, batch_size=batch, progress=False)  # warm-up
    start = time.perf_counter()
    fit(objective, x, y, epochs=1, batch_size=batch, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _svgp_epoch(p: int, features: int, inducing: int, batch: int, dtype: torch.dtype, device: str) -> float:
    import gpytorch

    x = torch.randn(p, features, dtype=dtype, device=device)
    y = torch.sin(x.sum(1))

    class SVGP(gpytorch.models.ApproximateGP):
        def __init__(self) -> None:
            dist = gpytorch.variational.CholeskyVariationalDistribution(inducing)
            strategy = gpytorch.variational.VariationalStrategy(self, x[:inducing], dist, learn_inducing_locations=True)
            super().__init__(strategy)
            self.covar = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

        def forward(self, inp: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
            return gpytorch.distributions.MultivariateNormal(torch.zeros_like(inp[:, 0]), self.covar(inp))

    model = SVGP().to(device=device, dtype=dtype)
    lik = gpytorch.likelihoods.GaussianLikelihood().to(device=device, dtype=dtype)
    elbo = gpytorch.mlls.VariationalELBO(lik, model, num_data=p)
    opt = torch.optim.Adam([*model.parameters(), *lik.parameters()], lr=0.01)

    def epoch() -> None:
        for idx in torch.randperm(p, device=device).split(batch):
            opt.zero_grad()
            (-elbo(model(x[idx]), y[idx])).backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    epoch()
    start = time.perf_counter()
    epoch()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling-points", type=int, default=1000, help="P for the 8x scaling test (P and 8P)")
    parser.add_argument("--inducing", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"# dkm benchmark: device {args.device}, {args.dtype}, torch threads {torch.get_num_threads()}")
    try:
        import gpytorch  # noqa: F401
    except ImportError:
        gpytorch_installed = False
        print("GPyTorch is not installed (pip install dkm[gpytorch]): sections 1 and 3 are skipped")
    else:
        gpytorch_installed = True
        exact_objective(args.sizes, args.features, dtype, args.device, args.repeats)

    p = args.scaling_points
    print(
        f"\n## 2. sparse DKM epoch time, P -> 8P ({args.inducing} inducing points, 1 hidden layer, batch {args.batch})"
    )
    small = _sparse_epoch(p, args.features, 1, args.inducing, args.batch, dtype, args.device)
    large = _sparse_epoch(8 * p, args.features, 1, args.inducing, args.batch, dtype, args.device)
    print(f"| P | epoch s |\n|---|---|\n| {p} | {small:.3f} |\n| {8 * p} | {large:.3f} |")
    print(f"ratio {large / small:.2f} (linear cost: about 8)")

    if gpytorch_installed:
        n = 4 * p
        print(
            f"\n## 3. sparse DKM vs GPyTorch SVGP epoch, P = {n}, {args.inducing} inducing points, batch {args.batch}"
        )
        svgp = _svgp_epoch(n, args.features, args.inducing, args.batch, dtype, args.device)
        print("| model | epoch s | ratio to SVGP |\n|---|---|---|")
        print(f"| GPyTorch SVGP | {svgp:.3f} | 1.00 |")
        for layers in (0, 1):
            t = _sparse_epoch(n, args.features, layers, args.inducing, args.batch, dtype, args.device)
            print(f"| sparse DKM, {layers} hidden layers | {t:.3f} | {t / svgp:.2f} |")


if __name__ == "__main__":
    main()
