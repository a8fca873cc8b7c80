"""eta on the reference code's scale: the ``rows`` weighting against a re-enactment of the reference's
batch (stored rows appended, one loss type per micro-batch, micro-batch losses averaged), against the
``additive`` form on the same batch, and inside GRPOTrainer."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from divergence_rl import PresampleConfig, hybrid_loss, load_rehearsal, plugin, presample, rehearsal_share

from klcore.errors import ConfigError
from klcore.losses import ppo_clip_loss
from klcore.plugins import build_plugin_manager
from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
from klcore.trainer import GRPOConfig, GRPOTrainer

ONLINE, STORED, LENGTH, MICRO = 6, 2, 5, 2


def _reference_generator(r: torch.Tensor, kind: str) -> torch.Tensor:
    """The reference code's generators, written in u: low_var_kl and js_low_var (twice the paper's JS)."""
    u = torch.exp(r)
    if kind == "forward_kl":
        return u - 1 - r
    return u * r - (u + 1) * torch.log((u + 1) / 2)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """verl's layout: online rows (type 1) then the appended stored rows (type 2); equal lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = ONLINE + STORED
    return {
        "old": -torch.rand(rows, LENGTH, generator=g) * 2,
        "new": (-torch.rand(rows, LENGTH, generator=g) * 2).requires_grad_(True),
        "adv": torch.randn(rows, 1, generator=g).expand(rows, LENGTH).contiguous(),
        "ref": -torch.rand(rows, LENGTH, generator=g) * 2,
        "mask": torch.ones(rows, LENGTH, dtype=torch.bool),
        "type": torch.tensor([1] * ONLINE + [2] * STORED),
    }


def _reference_loss(b: dict[str, torch.Tensor], coeff: float, kind: str) -> torch.Tensor:
    """Micro-batches of MICRO rows, each switched on its first row's type; every micro-batch loss is
    divided by the number of micro-batches (gradient accumulation), as the reference's update does."""
    starts = range(0, b["type"].shape[0], MICRO)
    total = torch.zeros(())
    for s in starts:
        part = slice(s, s + MICRO)
        m = b["mask"][part]
        if int(b["type"][s]) == 1:
            loss, _ = ppo_clip_loss(b["old"][part], b["new"][part], b["adv"][part], m)
        else:
            loss = coeff * (_reference_generator(b["new"][part] - b["ref"][part], kind) * m).sum() / m.sum()
        total = total + loss / len(starts)
    return total


@pytest.mark.parametrize(("kind", "eta_per_coeff"), [("forward_kl", 1.0), ("js", 2.0)])
def test_rows_weighting_is_the_reference_loss_and_additive_its_rescaling(kind: str, eta_per_coeff: float) -> None:
    b, coeff = _batch(), 0.3  # coeff: the reference's sft_loss_coeff
    flags = b["type"] == 2
    want = _reference_loss(b, coeff, kind)
    (g_want,) = torch.autograd.grad(want, b["new"])
    rows, metrics = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], flags, kind=kind,
                                eta=eta_per_coeff * coeff, weighting="rows")
    (g_rows,) = torch.autograd.grad(rows, b["new"])
    torch.testing.assert_close(rows, want)
    torch.testing.assert_close(g_rows, g_want)
    p = STORED / (ONLINE + STORED)
    assert float(metrics["dph/rehearsal_share"]) == pytest.approx(p) == rehearsal_share(STORED, ONLINE)
    # the additive form with the same eta weights the rehearsal term 1 / p more, relative to L_exp
    additive, _ = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], flags, kind=kind,
                              eta=eta_per_coeff * coeff)
    assert abs(float(additive.detach()) - float(want.detach())) > 1e-2
    # the conversion: additive eta = rows eta * R / N gives the reference loss times 1 / (1 - p)
    converted, _ = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], flags, kind=kind,
                               eta=eta_per_coeff * coeff * STORED / ONLINE)
    (g_conv,) = torch.autograd.grad(converted, b["new"])
    torch.testing.assert_close(converted * (1 - p), want)
    torch.testing.assert_close(g_conv * (1 - p), g_want)


def test_rows_share_over_micro_batches_comes_from_the_global_counts() -> None:
    from klcore.reduce import global_counts

    b = _batch(seed=1)
    flags = b["type"] == 2
    whole, _ = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], flags, weighting="rows")
    m = b["mask"]
    counts = (global_counts(m & ~flags[:, None]), global_counts(m & flags[:, None]))
    total = sum(hybrid_loss(b["old"][p], b["new"][p], b["adv"][p], b["ref"][p], m[p], flags[p], counts=counts,
                            weighting="rows")[0] for p in (slice(0, 5), slice(5, 8)))
    torch.testing.assert_close(total, whole)


def test_unknown_weighting() -> None:
    b = _batch()
    with pytest.raises(ConfigError, match="weighting"):
        hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], b["type"] == 2, weighting="mean")


# --- inside GRPOTrainer --------------------------------------------------------------------------


class FirstCharEven(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    cfg = PresampleConfig(num_prompts=24, samples=4, extra_sample=False, min_correct=2, chunk_size=8, seed=1)
    presample(tiny_causal_lm(tiny_config("tiny"), seed=0), char_tokenizer(), FirstCharEven(digits=1), cfg, root)
    return root


def _train(run_dir: Path, store: Path, model, **dph) -> torch.nn.Module:
    plugins = build_plugin_manager(plugins=[("divergence_rl", plugin)], load_entrypoints=False)
    reg = {"path": str(store), "kind": "forward_kl_plain", "batch_size": 6, **dph}  # f'(1) = -1: a step-0 gradient
    config = GRPOConfig(steps=2, prompts_per_step=4, group_size=4, mini_batches=2, progress=False,
                        regularisers={"dph": reg})
    trainer = GRPOTrainer(model, char_tokenizer(), FirstCharEven(digits=1), config, run_dir=run_dir, plugins=plugins,
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    trainer.train()
    return trainer.unwrapped_model


def test_the_regularisers_rows_weighting_is_additive_with_eta_times_r_over_n(store, tmp_path) -> None:
    base = tiny_causal_lm(tiny_config("tiny"), seed=0)
    stored_rows = min(6, len(load_rehearsal(store)))
    online_rows = 4 * 4 // 2  # per optimiser step: prompts x group / mini-batches
    rows = _train(tmp_path / "rows", store, copy.deepcopy(base), eta=0.4, weighting="rows")
    additive = _train(tmp_path / "add", store, copy.deepcopy(base), eta=0.4 * stored_rows / online_rows,
                      weighting="additive")
    same_eta = _train(tmp_path / "same", store, copy.deepcopy(base), eta=0.4, weighting="additive")
    for a, b in zip(rows.parameters(), additive.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(rows.parameters(), same_eta.parameters(), strict=True))
    assert gap > 1e-4
