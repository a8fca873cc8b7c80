"""Clip-Cov and KL-Cov against loop-based references and autograd of hand-written per-token formulas."""

from __future__ import annotations

import math

import pytest
import torch
from _brute import covariances, ppo_clipped, valid_tokens
from entropy_rl import clip_cov_loss, clip_cov_selection, kl_cov_loss, kl_cov_selection, token_covariance

from klcore.errors import ConfigError, DTypeError, MaskError, NonFiniteError, ShapeError
from klcore.losses import ppo_clip_loss


def _batch(rows: int = 8, width: int = 12, seed: int = 0, spread: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=g) * 4
    new = old + 0.6 * torch.randn(rows, width, generator=g)
    adv = (torch.randn(rows, 1, generator=g) * spread).expand(rows, width).clone()
    mask = torch.rand(rows, width, generator=g) < 0.8
    mask[:, 0] = True
    return old, new, adv, mask


def _reference_clip_cov(old, new, adv, mask, ratio, bounds, clip, seed):
    """verl's algorithm written as loops: candidates in row-major order, randperm with a seeded generator."""
    cov = covariances(new, adv, mask)
    cands = [p for p in valid_tokens(mask) if bounds[0] < cov[p] < bounds[1] and not ppo_clipped(old, new, adv, p, *clip)]
    n = min(max(int(ratio * len(cov)), 1), len(cands))
    perm = torch.randperm(len(cands), generator=torch.Generator().manual_seed(seed)).tolist()
    return {cands[k] for k in perm[:n]}, cands


@pytest.mark.parametrize("ratio", [1e-4, 0.05, 0.3, 0.9])
@pytest.mark.parametrize("clip", [(1.0, 1.0), (0.2, 0.28)])
def test_clip_cov_selection_matches_reference(ratio: float, clip: tuple[float, float]) -> None:
    old, new, adv, mask = _batch()
    bounds = (0.2, 3.0)
    want, cands = _reference_clip_cov(old, new, adv, mask, ratio, bounds, clip, seed=7)
    got = clip_cov_selection(
        old, new, adv, mask, ratio=ratio, cov_bounds=bounds, clip=clip, scope="micro-batch",
        generator=torch.Generator().manual_seed(7),
    )
    chosen = {tuple(p) for p in got.nonzero().tolist()}
    assert len(cands) > 3
    assert chosen == want
    assert len(chosen) == min(max(int(ratio * int(mask.sum())), 1), len(cands))


def test_clip_cov_interval_is_strict_and_clipped_tokens_are_excluded() -> None:
    # two tokens: centred log-probs +-1, advantages +-c, so both covariances equal c exactly
    old = torch.tensor([[-1.0, -3.0]])
    adv_at = {1.0: torch.tensor([[1.0, -1.0]]), 5.0: torch.tensor([[5.0, -5.0]]), 2.0: torch.tensor([[2.0, -2.0]])}
    mask = torch.ones(1, 2, dtype=torch.bool)
    for c, adv in adv_at.items():
        sel = clip_cov_selection(old, old.clone(), adv, mask, ratio=0.9, scope="micro-batch")
        assert int(sel.sum()) == (1 if c == 2.0 else 0), c  # bounds (1, 5) are open; count max(int(0.9*2),1)=1
    # ratio 3 on the first token (A = 2 > 0, clipped above 1 + 1): excluded, so the other token is drawn
    new = old + torch.tensor([[math.log(3.0), 0.0]])
    sel = clip_cov_selection(old, new, adv_at[2.0], mask, ratio=0.9, cov_bounds=(-100.0, 100.0), scope="micro-batch")
    assert sel.tolist() == [[False, True]]


def _per_token_ppo(old, new, adv, lo, hi):
    r = torch.exp(new - old)
    return torch.maximum(-adv * r, -adv * r.clamp(1 - lo, 1 + hi))


def test_clip_cov_selected_tokens_get_exactly_zero_gradient() -> None:
    old, new, adv, mask = _batch()
    new = new.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    loss, metrics = clip_cov_loss(old, new, adv, mask, ratio=0.2, cov_bounds=(0.1, 4.0), scope="micro-batch", generator=gen)
    loss.backward()
    sel = clip_cov_selection(
        old, new.detach(), adv, mask, ratio=0.2, cov_bounds=(0.1, 4.0), scope="micro-batch",
        generator=torch.Generator().manual_seed(3),
    )
    assert int(sel.sum()) > 2
    assert torch.all(new.grad[sel] == 0)
    # everything else: the gradient of the token-mean of PPO-clip with eps = 1
    x = new.detach().clone().requires_grad_(True)
    ref = (_per_token_ppo(old, x, adv, 1.0, 1.0) * (mask & ~sel)).sum() / mask.sum()
    ref.backward()
    torch.testing.assert_close(new.grad, x.grad)
    torch.testing.assert_close(loss, ref.detach())
    assert float(metrics["cov/selected_frac"]) == pytest.approx(int(sel.sum()) / int(mask.sum()))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_clip_cov_without_candidates_is_ppo_clip(agg: str) -> None:
    old, new, adv, mask = _batch()
    x1, x2 = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    loss, m = clip_cov_loss(old, x1, adv, mask, cov_bounds=(1e6, 2e6), clip=(0.2, 0.2), agg=agg)
    ref, rm = ppo_clip_loss(old, x2, adv, mask, clip_low=0.2, clip_high=0.2, agg=agg)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert float(m["cov/selected_frac"]) == 0.0
    assert float(m["policy/clipfrac"]) == pytest.approx(float(rm["policy/clipfrac"]))


def test_clip_cov_paper_clip_is_eps_one() -> None:
    old, new, adv, mask = _batch()
    new = old + torch.randn_like(old) * 1.5  # ratios beyond 2 happen
    loss, _ = clip_cov_loss(old, new, adv, mask, cov_bounds=(1e6, 2e6))
    ref = (_per_token_ppo(old, new, adv, 1.0, 1.0) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("ratio", [1e-4, 0.05, 0.25])
def test_kl_cov_selection_is_top_k_by_covariance(ratio: float) -> None:
    _old, new, adv, mask = _batch(seed=1)
    cov = covariances(new, adv, mask)
    k = max(1, int(len(cov) * ratio))
    want = set(sorted(cov, key=lambda p: -cov[p])[:k])
    got = kl_cov_selection(new, adv, mask, ratio=ratio, scope="micro-batch")
    assert {tuple(p) for p in got.nonzero().tolist()} == want


def test_kl_cov_gradients() -> None:
    old, new, adv, mask = _batch(seed=2)
    beta = 0.7
    x = new.clone().requires_grad_(True)
    loss, metrics = kl_cov_loss(old, x, adv, mask, ratio=0.1, beta=beta, scope="micro-batch")
    loss.backward()
    sel = kl_cov_selection(new, adv, mask, ratio=0.1, scope="micro-batch")
    n = mask.sum()
    r = torch.exp(new - old)
    # d/dx of -A e^(x - old) = -A r (unclipped everywhere); selected add beta sign(x - old)
    want = (-adv * r + sel * beta * torch.sign(new - old)) * mask / n
    torch.testing.assert_close(x.grad, want)
    assert float(metrics["policy/abs_kl"]) == pytest.approx(float(((new - old).abs() * mask).sum() / n), rel=1e-6)


def test_kl_cov_on_policy_is_vanilla_policy_gradient() -> None:
    _, new, adv, mask = _batch(seed=3)
    x = new.clone().requires_grad_(True)
    kl_cov_loss(new, x, adv, mask, ratio=0.5, beta=10.0)[0].backward()
    torch.testing.assert_close(x.grad, -adv * mask / mask.sum())


def test_token_covariance_matches_loops() -> None:
    _, new, adv, mask = _batch(seed=4)
    got = token_covariance(new, adv, mask)
    for p, c in covariances(new, adv, mask).items():
        assert float(got[p]) == pytest.approx(c, rel=1e-5, abs=1e-6)
    assert torch.all(got[~mask] == 0)


def test_bad_inputs_raise_klcore_errors() -> None:
    old, new, adv, mask = _batch()
    for ratio in (0.0, 1.0, -0.1, 1.5, True):
        with pytest.raises(ConfigError, match="ratio"):
            clip_cov_loss(old, new, adv, mask, ratio=ratio)
        with pytest.raises(ConfigError, match="ratio"):
            kl_cov_loss(old, new, adv, mask, ratio=ratio)
    with pytest.raises(ConfigError, match="cov_bounds"):
        clip_cov_loss(old, new, adv, mask, cov_bounds=(5.0, 1.0))
    with pytest.raises(ConfigError, match="clip"):
        clip_cov_loss(old, new, adv, mask, clip=(1.5, 1.0))
    with pytest.raises(ConfigError, match="scope"):
        kl_cov_loss(old, new, adv, mask, scope="batch")
    with pytest.raises(ConfigError, match="beta"):
        kl_cov_loss(old, new, adv, mask, beta=-1.0)
    with pytest.raises(ConfigError, match="agg"):
        clip_cov_loss(old, new, adv, mask, agg="mean")
    empty = torch.zeros_like(mask)
    for fn in (clip_cov_loss, kl_cov_loss):
        with pytest.raises(MaskError):
            fn(old, new, adv, empty)
        bad = adv.clone()
        bad[1, 0] = float("nan")
        with pytest.raises(NonFiniteError, match=r"advantages.*\(1, 0\)"):
            fn(old, new, bad, mask)
        with pytest.raises(ShapeError):
            fn(old, new[:, :-1], adv, mask)
        with pytest.raises(MaskError):
            fn(old, new, adv, mask[:, :-1])
        with pytest.raises(DTypeError):
            fn(old, new, adv.long(), mask)
        with pytest.raises(MaskError, match="selected"):
            fn(old, new, adv, mask, selected=mask[:-1])
    # NaN at padding is ignored (its log-probs may be garbage)
    pad_nan = new.clone()
    pad_nan[~mask] = float("nan")
    loss, _ = clip_cov_loss(old, pad_nan, adv, mask)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("which", ["old_log_prob", "log_prob"])
@pytest.mark.parametrize("value", [float("-inf"), float("inf"), float("nan")])
def test_non_finite_log_probs_at_a_valid_token_raise_in_both_losses(which: str, value: float) -> None:
    old, new, adv, mask = _batch()
    row, col = (int(i) for i in mask.nonzero()[3])
    tensors = {"old_log_prob": old.clone(), "log_prob": new.clone()}
    tensors[which][row, col] = value
    for fn in (clip_cov_loss, kl_cov_loss):
        # before the fix Clip-Cov returned a finite loss here (the clip hides the infinite ratio)
        with pytest.raises(NonFiniteError, match=rf"{which} is NaN or inf at valid position \({row}, {col}\)"):
            fn(tensors["old_log_prob"], tensors["log_prob"], adv, mask)
    # the same value at padding is ignored
    pad = mask.logical_not().nonzero()[0]
    tensors = {"old_log_prob": old.clone(), "log_prob": new.clone()}
    tensors[which][pad[0], pad[1]] = value
    for fn in (clip_cov_loss, kl_cov_loss):
        loss, _ = fn(tensors["old_log_prob"], tensors["log_prob"], adv, mask)
        assert torch.isfinite(loss)


def test_registered_in_klcore(plugins) -> None:
    reg = plugins.registry("loss")
    assert reg.get_component("clip_cov") is clip_cov_loss
    assert reg.get_component("kl_cov") is kl_cov_loss


@pytest.mark.parametrize("which", ["clip_cov", "kl_cov"])
def test_weights_multiply_the_per_token_loss_before_aggregation(which: str) -> None:
    old, new, adv, mask = _batch(seed=3)
    w = torch.rand(old.shape, generator=torch.Generator().manual_seed(4)) * 2
    options = {"cov_bounds": (-1e6, 1e6), "ratio": 0.1} if which == "clip_cov" else {"ratio": 0.1, "beta": 0.5}
    fn = clip_cov_loss if which == "clip_cov" else kl_cov_loss
    selected = (clip_cov_selection(old, new, adv, mask, **options, generator=torch.Generator().manual_seed(0))
                if which == "clip_cov" else kl_cov_selection(new, adv, mask, ratio=0.1))
    x = new.clone().requires_grad_(True)
    loss, _ = fn(old, x, adv, mask, selected=selected, weights=w, agg="token-mean", **options)
    # by hand: the unweighted per-token loss (seq-mean-token-sum with one row per token is a token sum)
    rows = []
    for b, t in valid_tokens(mask):
        one = torch.zeros_like(mask)
        one[b, t] = True
        part, _ = fn(old, new, adv, one, selected=selected & one, agg="token-mean", **options)
        rows.append(part.item() * w[b, t].item())
    assert float(loss) == pytest.approx(sum(rows) / int(mask.sum()), rel=1e-5)
    loss.backward()
    assert bool((x.grad[~mask] == 0).all())
    with pytest.raises(ConfigError, match="weights must be >= 0"):
        fn(old, new, adv, mask, selected=selected, weights=-w, **options)
    with pytest.raises(ShapeError, match="weights must be a"):
        fn(old, new, adv, mask, selected=selected, weights=w[:, :3], **options)
