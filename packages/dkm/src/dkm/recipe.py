"""Recipe ``dkm-benchmark``: DKM vs NNGP (nu = inf) vs GP vs a small MLP on scikit-learn datasets.

Standardised 90/10 splits over several seeds; regression RMSE and test log-likelihood on the original
target scale (RMSE * std_y, LL - log std_y), classification accuracy and test log-likelihood; mean and
standard error over seeds; ``report.md`` and ``benchmark.png`` in the run folder.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dkm.fitting import fit
from dkm.likelihoods import CategoricalLikelihood, GaussianLikelihood
from dkm.models import DEFAULT_NU, FullDKM, SparseDKM
from dkm.objectives import FullDKMObjective, SparseDKMObjective
from klcore.errors import ConfigError

DATASETS = {
    "diabetes": "regression",
    "wine": "classification",
    "breast_cancer": "classification",
    "digits": "classification",
}
METHODS = ("dkm", "nngp", "gp", "mlp")


@dataclass
class DKMBenchmarkConfig:
    """Datasets, seeds and model/training settings shared by the DKM and NNGP rows (``--set epochs=5``)."""

    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 3
    test_fraction: float = 0.1
    num_layers: int = 1
    num_inducing: int = 100
    kernel: str = "relu"
    nu: float | None = None  # None: 100 for regression, 1 for classification (docs/dkm.md, "Choosing nu")
    epochs: int = 60
    batch_size: int = 256
    lr: float = 0.02
    gp_iterations: int = 100
    mlp_hidden: int = 64
    threads: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.datasets) - set(DATASETS)) + sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown dataset/method {unknown}; datasets: {list(DATASETS)}, methods: {list(METHODS)}")
        if self.seeds < 1 or not 0 < self.test_fraction < 1 or self.epochs < 1 or self.num_inducing < 1:
            raise ConfigError("need seeds >= 1, 0 < test_fraction < 1, epochs >= 1 and num_inducing >= 1")
        if self.threads < 0 or self.gp_iterations < 1 or self.mlp_hidden < 1 or self.batch_size < 1:
            raise ConfigError("need threads >= 0, gp_iterations >= 1, mlp_hidden >= 1 and batch_size >= 1")


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    y_scale: float  # std of the training targets (regression), 1 for classification


def load_split(name: str, seed: int, test_fraction: float) -> Split:
    """A standardised split (X on the training set; regression y too) of a scikit-learn dataset."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    stratify = y if DATASETS[name] == "classification" else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=stratify)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = np.where(std > 0, std, 1.0)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if DATASETS[name] == "classification":
        return Split(x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), 1.0)
    y_mean, y_std = y_tr.mean(), y_tr.std()
    return Split(x_tr, (y_tr - y_mean) / y_std, x_te, (y_te - y_mean) / y_std, float(y_std))


def _sparse(split: Split, config: DKMBenchmarkConfig, seed: int, *, nu: float, num_layers: int, kernel: str) -> tuple:
    """Train a sparse DKM; returns (point metric, mean test log-likelihood) on the standardised scale."""
    classify = split.y_train.dtype == np.int64
    x = torch.tensor(split.x_train)
    y = torch.tensor(split.y_train)
    outputs = int(split.y_train.max()) + 1 if classify else 1
    torch.manual_seed(seed)
    model = SparseDKM.from_data(x, outputs, config.num_inducing, seed=seed, num_layers=num_layers, kernel=kernel, nu=nu)
    likelihood: CategoricalLikelihood | GaussianLikelihood
    likelihood = CategoricalLikelihood() if classify else GaussianLikelihood()
    objective = SparseDKMObjective(model, likelihood, num_data=x.shape[0])
    fit(objective, x, y, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, progress=False, seed=seed)
    xt, yt = torch.tensor(split.x_test), torch.tensor(split.y_test)
    with torch.no_grad():
        out = model(xt)
        ll = likelihood.log_predictive(yt if classify else yt[:, None], out.mean, out.var).mean().item()
        if isinstance(likelihood, CategoricalLikelihood):
            metric = (likelihood.predict_log_proba(out.mean, out.var).argmax(-1) == yt).double().mean().item()
        else:
            metric = (out.mean[:, 0] - yt).square().mean().sqrt().item()
    return metric, ll


def _exact_gp(split: Split, config: DKMBenchmarkConfig) -> tuple[float, float, str]:
    """Exact GP regression: GPyTorch (RBF x scale, Adam) when installed, else dkm's FullDKM with no hidden layer."""
    x, y = torch.tensor(split.x_train), torch.tensor(split.y_train)
    xt, yt = torch.tensor(split.x_test), torch.tensor(split.y_test)
    try:
        import gpytorch
    except ImportError:
        model = FullDKM(x, num_layers=0, kernel="sqexp")
        likelihood = GaussianLikelihood()
        fit(FullDKMObjective(model, likelihood), x, y, epochs=config.gp_iterations, lr=0.05, progress=False)
        with torch.no_grad():
            mean, var = model.predict(xt, y, likelihood.noise)
            ll = likelihood.log_predictive(yt[:, None], mean, var).mean().item()
            return (mean[:, 0] - yt).square().mean().sqrt().item(), ll, "dkm FullDKM (0 hidden layers, sqexp)"

    class ExactGP(gpytorch.models.ExactGP):
        def __init__(self, lik: Any) -> None:
            super().__init__(x, y, lik)
            self.mean = gpytorch.means.ConstantMean()
            self.covar = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

        def forward(self, inp: torch.Tensor) -> Any:
            return gpytorch.distributions.MultivariateNormal(self.mean(inp), self.covar(inp))

    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    gp = ExactGP(lik).double()
    gp.train()
    lik.train()
    opt = torch.optim.Adam(gp.parameters(), lr=0.1)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)
    for _ in range(config.gp_iterations):
        opt.zero_grad()
        (-mll(gp(x), y)).backward()
        opt.step()
    gp.eval()
    lik.eval()
    with torch.no_grad():
        pred = lik(gp(xt))
        ll = torch.distributions.Normal(pred.mean, pred.variance.sqrt()).log_prob(yt).mean().item()
        return (pred.mean - yt).square().mean().sqrt().item(), ll, "GPyTorch ExactGP (RBF x scale, Adam)"


def _mlp(split: Split, config: DKMBenchmarkConfig, seed: int) -> tuple[float, float]:
    """scikit-learn MLP (two hidden layers, early stopping); regression LL from the training residual variance."""
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    hidden = (config.mlp_hidden, config.mlp_hidden)
    if split.y_train.dtype == np.int64:
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=500, early_stopping=True, random_state=seed).fit(
            split.x_train, split.y_train
        )
        proba = np.clip(clf.predict_proba(split.x_test), 1e-12, 1.0)
        index = np.searchsorted(clf.classes_, split.y_test)
        return float((clf.predict(split.x_test) == split.y_test).mean()), float(
            np.log(proba[np.arange(len(index)), index]).mean()
        )
    reg = MLPRegressor(hidden_layer_sizes=hidden, max_iter=1000, early_stopping=True, random_state=seed).fit(
        split.x_train, split.y_train
    )
    var = float(np.mean((reg.predict(split.x_train) - split.y_train) ** 2))
    err = reg.predict(split.x_test) - split.y_test
    ll = float(np.mean(-0.5 * (np.log(2 * np.pi * var) + err**2 / var)))
    return float(np.sqrt(np.mean(err**2))), ll


def _mean_se(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else 0.0
    return float(arr.mean()), se


def run(config: DKMBenchmarkConfig, run_dir: Path) -> dict[str, Any]:
    """Run every (dataset, method, seed); write report.md and benchmark.png; return the summary table."""
    if config.threads:
        torch.set_num_threads(config.threads)
    results: dict[str, dict[str, Any]] = {}
    gp_backend = {}
    for name in config.datasets:
        task = DATASETS[name]
        rows: dict[str, dict[str, list[float]]] = {m: {"metric": [], "ll": [], "seconds": []} for m in config.methods}
        for seed in range(config.seeds):
            split = load_split(name, seed, config.test_fraction)
            for method in config.methods:
                start = time.perf_counter()
                if method in ("dkm", "nngp"):
                    default = DEFAULT_NU if task == "regression" else 1.0
                    nu = (default if config.nu is None else config.nu) if method == "dkm" else math.inf
                    metric, ll = _sparse(split, config, seed, nu=nu, num_layers=config.num_layers, kernel=config.kernel)
                elif method == "gp" and task == "regression":
                    metric, ll, gp_backend[name] = _exact_gp(split, config)
                elif method == "gp":
                    metric, ll = _sparse(split, config, seed, nu=math.inf, num_layers=0, kernel="sqexp")
                    gp_backend[name] = "dkm SparseDKM with no hidden layer (SVGP, sqexp, softmax)"
                else:
                    metric, ll = _mlp(split, config, seed)
                seconds = time.perf_counter() - start
                print(
                    f"dkm-benchmark {name} seed {seed} {method}: {metric:.4f} / {ll:.4f} ({seconds:.1f} s)", flush=True
                )
                if task == "regression":  # back to the original target scale
                    metric, ll = metric * split.y_scale, ll - math.log(split.y_scale)
                for key, value in (("metric", metric), ("ll", ll), ("seconds", seconds)):
                    rows[method][key].append(value)
        results[name] = {"task": task, "metric": "rmse" if task == "regression" else "accuracy", "methods": {}}
        for method, r in rows.items():
            m, m_se = _mean_se(r["metric"])
            ll, ll_se = _mean_se(r["ll"])
            results[name]["methods"][method] = {
                "metric_mean": m,
                "metric_se": m_se,
                "ll_mean": ll,
                "ll_se": ll_se,
                "seconds_per_split": float(np.mean(r["seconds"])),
            }
    report = _report(config, results, gp_backend)
    (run_dir / "report.md").write_text(report)
    _plot(results, run_dir / "benchmark.png")
    return {
        "results": results,
        "gp_backend": gp_backend,
        "report": str(run_dir / "report.md"),
        "plot": str(run_dir / "benchmark.png"),
        "run_dir": str(run_dir),
    }


def _report(config: DKMBenchmarkConfig, results: dict[str, Any], gp_backend: dict[str, str]) -> str:
    lines = [
        "# dkm-benchmark",
        "",
        f"{config.seeds} seeds, {int(100 * (1 - config.test_fraction))}/{int(100 * config.test_fraction)} splits, "
        f"sparse DKM: {config.num_layers} hidden layer(s), {config.num_inducing} inducing points, kernel "
        f"{config.kernel}, nu = {config.nu}; NNGP = the same model with nu = inf; {config.epochs} epochs, "
        f"batch {config.batch_size}, Adam lr {config.lr}. Mean +- standard error over seeds. Regression figures "
        "are on the original target scale.",
        "",
        "| dataset | method | RMSE / accuracy | test log-lik | s / split |",
        "|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for method, r in res["methods"].items():
            label = res["metric"]
            lines.append(
                f"| {name} | {method} | {label} {r['metric_mean']:.4f} +- {r['metric_se']:.4f} | "
                f"{r['ll_mean']:.4f} +- {r['ll_se']:.4f} | {r['seconds_per_split']:.1f} |"
            )
    lines += ["", "GP rows: " + "; ".join(f"{k}: {v}" for k, v in gp_backend.items()), ""]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.2), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        methods = list(res["methods"])
        ll = [res["methods"][m]["ll_mean"] for m in methods]
        se = [res["methods"][m]["ll_se"] for m in methods]
        for pos, (method, value, err) in enumerate(zip(methods, ll, se)):
            ax.errorbar([pos], [value], yerr=[err], fmt="o", capsize=3, color=f"C{pos}", label=method)
        ax.set_xticks(range(len(methods)), methods)
        ax.margins(x=0.2)
        ax.set_title(name)
        ax.set_ylabel("test log-likelihood")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["DATASETS", "METHODS", "DKMBenchmarkConfig", "load_split", "run"]
