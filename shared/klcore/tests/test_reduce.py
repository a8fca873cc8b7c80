"""Masked aggregation: every mode against hand formulas, micro-batch and 2-process data-parallel splits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from klcore.errors import ConfigError, DTypeError, MaskError, NonFiniteError, ShapeError
from klcore.reduce import MODES, GlobalCounts, aggregate, global_counts

HERE = Path(__file__).resolve().parent


def reference(values: torch.Tensor, mask: torch.Tensor, mode: str, norm_length: int | None = None) -> float:
    """The aggregate written out with plain loops in float64."""
    rows = []
    for i in range(values.shape[0]):
        valid = [float(values[i, t]) for t in range(values.shape[1]) if bool(mask[i, t])]
        rows.append(valid)
    n_tokens = sum(len(r) for r in rows)
    non_empty = [r for r in rows if r]
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / n_tokens
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in non_empty) / len(non_empty)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in non_empty) / len(non_empty)
    if mode == "seq-mean-token-sum-norm":
        length = norm_length if norm_length is not None else values.shape[1]
        return sum(sum(r) for r in rows) / (len(non_empty) * length)
    raise AssertionError(mode)


def _batch(b: int = 5, t: int = 6):
    values = torch.randn(b, t)
    mask = torch.rand(b, t) > 0.4
    mask[0] = False  # an empty row
    mask[1] = True  # a full row
    mask[2, :] = False
    mask[2, 3] = True  # a single valid token
    return values, mask


def test_modes_are_the_documented_four() -> None:
    assert set(MODES) == {"token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "long"])
def test_aggregate_matches_hand_formula(mode: str, mask_kind: str) -> None:
    values, mask = _batch()
    m = {"bool": mask, "float": mask.float(), "long": mask.long()}[mask_kind]
    out = aggregate(values, m, mode)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert float(out) == pytest.approx(reference(values, mask, mode), rel=1e-5, abs=1e-6)


def test_modes_differ_on_this_batch() -> None:
    """The batch used above distinguishes all four modes (so a mode mix-up cannot pass)."""
    values, mask = _batch()
    values = values.abs() + 0.1  # keep the sum away from 0, where all modes agree
    outs = [float(aggregate(values, mask, mode)) for mode in MODES]
    assert len({round(v, 5) for v in outs}) == len(MODES)


def test_default_mode_is_token_mean_and_bf16_values() -> None:
    values, mask = _batch()
    torch.testing.assert_close(aggregate(values, mask), aggregate(values, mask, "token-mean"), rtol=0, atol=0)
    vb = values.to(torch.bfloat16)
    out = aggregate(vb, mask, "seq-mean-token-mean")
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(reference(vb.double(), mask, "seq-mean-token-mean"), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("norm_length", [6, 10, 1])
def test_norm_length(norm_length: int) -> None:
    values, mask = _batch()
    out = aggregate(values, mask, "seq-mean-token-sum-norm", norm_length=norm_length)
    expected = reference(values, mask, "seq-mean-token-sum-norm", norm_length)
    assert float(out) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_matches_hand_formula(mode: str) -> None:
    values0, mask = _batch()
    v = values0.clone().requires_grad_()
    aggregate(v, mask, mode).backward()
    n_tok = mask.sum().item()
    per_row = mask.sum(-1, keepdim=True).float()
    n_seq = (per_row > 0).sum().item()
    if mode == "token-mean":
        expected = mask.float() / n_tok
    elif mode == "seq-mean-token-sum":
        expected = mask.float() / n_seq
    elif mode == "seq-mean-token-mean":
        expected = mask.float() / per_row.clamp(min=1) / n_seq
    else:
        expected = mask.float() / (n_seq * mask.shape[1])
    torch.testing.assert_close(v.grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_global_counts_sum_to_full_batch(mode: str) -> None:
    values0 = torch.randn(7, 5)
    mask = torch.rand(7, 5) > 0.5
    mask[0, 0] = True
    mask[3] = False  # an empty row
    mask[5:] = False  # ... and a micro-batch without any valid token
    v_full = values0.clone().requires_grad_()
    full = aggregate(v_full, mask, mode)
    full.backward()
    counts = global_counts(mask)
    assert counts == GlobalCounts(tokens=float(mask.sum()), sequences=float(mask.any(-1).sum()), world_size=1)
    for splits in ([(0, 7)], [(0, 3), (3, 7)], [(0, 1), (1, 2), (2, 5), (5, 7)], [(i, i + 1) for i in range(7)]):
        v = values0.clone().requires_grad_()
        total = sum(aggregate(v[a:b], mask[a:b], mode, counts=counts) for a, b in splits)
        total.backward()
        torch.testing.assert_close(total.detach(), full.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v.grad, v_full.grad, rtol=1e-6, atol=1e-7)


def test_micro_batches_without_global_counts_differ() -> None:
    """Control: averaging local token-means of uneven micro-batches is not the global token-mean."""
    values = torch.zeros(4, 5)
    values[0, 0] = 16.0
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, :1] = True
    mask[1:, :] = True
    full = float(aggregate(values, mask, "token-mean"))
    assert full == 1.0  # 16 / 16 valid tokens
    naive = 0.5 * float(aggregate(values[:1], mask[:1]) + aggregate(values[1:], mask[1:]))
    assert naive == 8.0  # 0.5 * (16 / 1 + 0 / 15)
    counts = global_counts(mask)
    good = float(aggregate(values[:1], mask[:1], counts=counts) + aggregate(values[1:], mask[1:], counts=counts))
    assert good == pytest.approx(full, rel=1e-6)


def test_counts_with_world_size_scale_the_share() -> None:
    values, mask = _batch()
    counts = GlobalCounts(tokens=float(mask.sum()) * 2, sequences=float(mask.any(-1).sum()) * 2, world_size=2)
    # this rank holds half of a global batch that is twice this one: its scaled share equals the local mean
    for mode in MODES:
        out = aggregate(values, mask, mode, counts=counts)
        assert float(out) == pytest.approx(reference(values, mask, mode), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs() -> None:
    values, mask = _batch()
    with pytest.raises(MaskError):
        aggregate(values, torch.zeros_like(mask))
    with pytest.raises(MaskError):
        global_counts(torch.zeros_like(mask))
    with pytest.raises(ConfigError):
        aggregate(values, mask, "mean")
    with pytest.raises(ConfigError):
        aggregate(values, mask, "seq-mean-token-sum-norm", norm_length=0)
    with pytest.raises(MaskError):
        aggregate(values, mask.T)
    with pytest.raises(MaskError):
        aggregate(values, mask[:, :-1])
    with pytest.raises(MaskError):
        aggregate(values, mask.float() * 0.5)
    with pytest.raises(ShapeError):
        aggregate(values[0], mask[0])
    with pytest.raises(ShapeError):
        aggregate(values.unsqueeze(-1), mask.unsqueeze(-1))
    with pytest.raises(ShapeError):
        global_counts(mask[0])
    with pytest.raises(DTypeError):
        aggregate(values.long(), mask)
    with pytest.raises(DTypeError):
        aggregate(values, mask.tolist())


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_values(mode: str) -> None:
    values, mask = _batch()
    bad_in = values.clone()
    bad_in[1, 2] = float("nan")  # row 1 is fully valid
    with pytest.raises(NonFiniteError):
        aggregate(bad_in, mask, mode)
    bad_in[1, 2] = float("inf")
    with pytest.raises(NonFiniteError):
        aggregate(bad_in, mask, mode)
    bad_out = values.clone().requires_grad_(False)
    bad_out[0, :] = float("nan")  # row 0 is empty
    bad_out[2, 0] = float("inf")  # masked out
    bad_out.requires_grad_()
    out = aggregate(bad_out, mask, mode)
    assert float(out.detach()) == pytest.approx(reference(values, mask, mode), rel=1e-5, abs=1e-6)
    out.backward()
    assert bool(torch.isfinite(bad_out.grad).all())
    assert bool((bad_out.grad[~mask] == 0).all())


# ----------------------------------------------------------------------------- two processes (DDP on CPU)


def _global_batch():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(9, 6, 4, generator=g)
    mask = torch.rand(9, 6, generator=g) > 0.45
    mask[0, :] = True
    mask[2, :] = False  # an empty sequence on rank 0
    mask[6:8, 1:] = False  # rank 1 is short of tokens
    mask[8, :] = False  # ... and its second micro-batch holds none at all
    mask[6:8, 0] = True
    return x, mask


def _values(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return torch.tanh(out[..., 0]) * out[..., 1] + out[..., 2] ** 2


@pytest.mark.slow
def test_two_process_ddp_gradient_equals_single_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, mask = _global_batch()
    model = torch.nn.Linear(4, 3)
    # rank 0 holds rows 0..4 (two micro-batches 0..1, 1..5), rank 1 rows 5..8 (5..8, 8..9)
    shares = [[(0, 1), (1, 5)], [(5, 8), (8, 9)]]
    assert int(mask[0:5].sum()) != int(mask[5:9].sum())
    inputs = tmp_path / "inputs.pt"
    torch.save({"x": x, "mask": mask, "state": model.state_dict(), "shares": torch.tensor(shares)}, inputs)
    out = tmp_path / "grads.pt"

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_", "RANK"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "_ddp_reduce_worker.py"), str(inputs), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]
    for r, res in enumerate(results):
        assert res["num_processes"] == 2
        assert res["process_index"] == r
        assert res["distributed_type"] == "MULTI_CPU"
        assert res["ddp_wrapped"]

    for mode in MODES:
        ref_model = torch.nn.Linear(4, 3)
        ref_model.load_state_dict(model.state_dict())
        aggregate(_values(ref_model, x), mask, mode).backward()
        expected = {"weight": ref_model.weight.grad, "bias": ref_model.bias.grad}
        for res in results:
            got = res["grads"][mode]
            for name in ("weight", "bias"):
                torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
        if mode == "token-mean":
            # control: per-micro-batch counts (not the step's global counts) give a different gradient
            naive = results[0]["naive"]
            assert not torch.allclose(naive["weight"], expected["weight"], rtol=1e-3, atol=1e-4)
