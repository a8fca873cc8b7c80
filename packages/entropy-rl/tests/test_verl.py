"""entropy_rl's verl losses against verl's own ``clip_cov`` / ``kl_cov`` (runs where verl is installed: the
``verl`` nox session)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.verl
verl_config = pytest.importorskip("verl.workers.config")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
B, T = 6, 10


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    new = old + 0.5 * torch.randn(B, T, generator=g)
    adv = (torch.randn(B, 1, generator=g) * 2).expand(B, T).contiguous()
    mask = (torch.rand(B, T, generator=g) < 0.8).float()
    mask[:, 0] = 1
    mask[-1] = 0  # a fully masked row: the sequence modes must not count it
    weights = torch.rand(B, T, generator=g) + 0.5
    return old, new, adv, mask, weights


def _config(loss: str, info: dict) -> object:
    policy = verl_config.PolicyLossConfig(loss_mode=loss, clip_cov_ratio=0.1, clip_cov_lb=-50.0, clip_cov_ub=50.0,
                                          kl_cov_ratio=0.1, ppo_kl_coef=0.7)
    config = verl_config.ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, rollout_n=1, policy_loss=policy,
                                     clip_ratio_low=0.2, clip_ratio_high=0.28)
    config.global_batch_info.update(info)
    return config


def _run(name: str, config, old, new, adv, mask, mode: str, weights, seed: int):
    x = new.clone().requires_grad_(True)
    torch.manual_seed(seed)  # Clip-Cov's draw: both use torch.randperm on the global generator
    loss, metrics = core_algos.get_policy_loss_fn(name)(old, x, adv, mask, loss_agg_mode=mode, config=config,
                                                        rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), x.grad, metrics


INFOS = {
    "local": {},
    "dp2": {"dp_size": 2, "batch_num_tokens": 4 * B * T, "global_batch_size": 2 * B, "loss_scale_factor": None},
    "dp2-scaled": {"dp_size": 2, "batch_num_tokens": torch.tensor(3 * B * T), "global_batch_size": 3 * B,
                   "loss_scale_factor": 7},
}


@pytest.mark.parametrize("loss", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", sorted(INFOS))
@pytest.mark.parametrize("weighted", [False, True])
def test_wrappers_equal_verls_own_losses(loss: str, mode: str, info: str, weighted: bool) -> None:
    from entropy_rl.integrations import verl as integration

    assert f"{loss}_klcore" in integration.REGISTERED
    for seed in range(3):
        old, new, adv, mask, weights = _batch(seed)
        w = weights if weighted else None
        config = _config(loss, INFOS[info])
        ref = _run(loss, config, old, new, adv, mask, mode, w, seed)
        ours = _run(f"{loss}_klcore", config, old, new, adv, mask, mode, w, seed)
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-7)
        assert set(ours[2]) == set(ref[2])
        for key in ref[2]:
            assert ours[2][key] == pytest.approx(ref[2][key], rel=1e-5, abs=1e-7), key


def test_global_batch_info_changes_the_loss_as_verl_does() -> None:
    """The figure of the issue: dp_size 2 over 4 B T tokens halves the local token mean (the wrapper used to ignore it)."""
    old, new, adv, mask, _ = _batch(0)
    local = _run("kl_cov_klcore", _config("kl_cov", {}), old, new, adv, mask, "token-mean", None, 0)[0]
    scaled = _run("kl_cov_klcore", _config("kl_cov", INFOS["dp2"]), old, new, adv, mask, "token-mean", None, 0)[0]
    assert float(scaled) == pytest.approx(float(local) * 2 * float(mask.sum()) / (4 * B * T), rel=1e-5)


def test_missing_global_count_with_several_ranks_is_a_config_error() -> None:
    from klcore.errors import ConfigError

    old, new, adv, mask, _ = _batch(0)
    config = _config("clip_cov", {"dp_size": 2})
    with pytest.raises(ConfigError, match="batch_num_tokens"):
        core_algos.get_policy_loss_fn("clip_cov_klcore")(old, new, adv, mask, loss_agg_mode="token-mean", config=config)
    with pytest.raises(ConfigError, match="loss_agg_mode"):
        core_algos.get_policy_loss_fn("kl_cov_klcore")(old, new, adv, mask, loss_agg_mode="mean", config=config)


def test_verl_plugin_entry_point_registers_in_a_fresh_process() -> None:
    """``import verl`` alone (as in a Ray worker) loads the entry point; no VERL_USE_EXTERNAL_MODULES."""
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "get_policy_loss_fn('clip_cov_klcore'); get_policy_loss_fn('kl_cov_klcore'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_verl_present_but_unusable_raises_plugin_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import entropy_rl.integrations
    import entropy_rl.integrations.verl as integration

    from klcore.errors import PluginError

    monkeypatch.delattr(entropy_rl.integrations, "_verl_losses", raising=False)
    monkeypatch.delitem(sys.modules, "entropy_rl.integrations._verl_losses", raising=False)
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", None)  # import fails as with ray missing
    with pytest.raises(PluginError, match="cannot be imported"):
        importlib.reload(integration)
    monkeypatch.undo()
    importlib.reload(integration)
