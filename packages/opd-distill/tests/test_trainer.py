"""DistillTrainer on tiny random Llamas: runs, schedules, PACED weighting and vocabulary checks."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from opd_distill import DistillConfig, DistillTrainer, PacedConfig

from klcore.errors import ConfigError, VocabMismatchError
from klcore.toy import char_tokenizer, get_task, tiny_causal_lm, tiny_config


@dataclass(frozen=True)
class AlwaysRight:
    """A task whose verifier accepts everything: every pass rate is 1, so PACED gives weight 0."""

    inner: object
    name: str = "always"

    @property
    def max_answer_chars(self) -> int:
        return 3

    def problems(self, n, *, generator, split="train"):
        return self.inner.problems(n, generator=generator, split=split)

    def verify(self, problem, completion) -> float:
        return 1.0


def _config(**kw) -> DistillConfig:
    base = dict(steps=2, prompts_per_step=4, group_size=2, problem_pool=8, eval_problems=8, progress=False, lr=1e-2)
    base.update(kw)
    return DistillConfig(**base)


def _models(seed_s: int = 0, seed_t: int = 1):
    return tiny_causal_lm(tiny_config("tiny"), seed=seed_s), tiny_causal_lm(tiny_config("tiny"), seed=seed_t)


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


@pytest.mark.parametrize("loss", ["opd_reinforce", "opd_ppo", "full_reverse_kl", "full_jsd", "hard_ce"])
def test_trainer_runs_and_logs(tmp_path, loss):
    student, teacher = _models()
    task = get_task("addition", digits=1)
    cfg = _config(loss=loss)
    trainer = DistillTrainer(student, teacher, char_tokenizer(), task, cfg, run_dir=tmp_path, eval_tasks={"add": task})
    before = _params(trainer.unwrapped_model)
    history = trainer.train()
    assert len(history) == 2
    for key in ("kl/reverse", "kl/forward", "entropy/mean", "success/mean", "paced/weight_mean", "eval/add_pass@1"):
        assert key in history[0] and history[0][key] == history[0][key], key
    assert "eval/add_pass@1_final" in history[-1]
    assert history[0]["kl/reverse"] > 0 and history[0]["kl/forward"] > 0
    assert not torch.equal(before, _params(trainer.unwrapped_model))
    assert (tmp_path / "metrics.jsonl").exists()


def test_identical_teacher_gives_zero_kl_and_no_update(tmp_path):
    student = tiny_causal_lm(tiny_config("tiny"), seed=0)
    teacher = copy.deepcopy(student)
    trainer = DistillTrainer(
        student, teacher, char_tokenizer(), get_task("addition", digits=1), _config(steps=1), run_dir=tmp_path
    )
    before = _params(trainer.unwrapped_model)
    (metrics,) = trainer.train()
    assert abs(metrics["kl/reverse"]) < 1e-6 and abs(metrics["opd/reward_mean"]) < 1e-6
    assert metrics["optim/grad_norm"] < 1e-6
    torch.testing.assert_close(before, _params(trainer.unwrapped_model))


def test_paced_zero_weight_when_always_solved(tmp_path):
    student, teacher = _models()
    task = AlwaysRight(get_task("addition", digits=1))
    cfg = _config(steps=1, loss="full_forward_kl", paced=PacedConfig(weighting="paced", samples=3))
    trainer = DistillTrainer(student, teacher, char_tokenizer(), task, cfg, run_dir=tmp_path)
    before = _params(trainer.unwrapped_model)
    (metrics,) = trainer.train()
    assert metrics["paced/pool_pass_rate"] == 1.0 and metrics["paced/weight_zero_frac"] == 1.0
    assert metrics["loss/objective"] == 0.0
    torch.testing.assert_close(before, _params(trainer.unwrapped_model))
    # unweighted, the same batch does move the student
    student2, teacher2 = _models()
    cfg2 = _config(steps=1, loss="full_forward_kl")
    trainer2 = DistillTrainer(student2, teacher2, char_tokenizer(), task, cfg2, run_dir=tmp_path / "b")
    before2 = _params(trainer2.unwrapped_model)
    trainer2.train()
    assert not torch.equal(before2, _params(trainer2.unwrapped_model))


def test_pass_rate_estimation_in_trainer(tmp_path):
    student, teacher = _models()
    task = get_task("addition", digits=1)
    cfg = _config(paced=PacedConfig(weighting="paced", samples=4))
    trainer = DistillTrainer(student, teacher, char_tokenizer(), task, cfg, run_dir=tmp_path)
    rates = trainer.estimate_pass_rates(torch.Generator().manual_seed(5))
    assert rates.shape == (8,)
    assert bool(((rates * 4) == (rates * 4).round()).all())  # multiples of 1/K
    # a verifier that accepts every answer gives pass rate 1 on every problem
    always = DistillTrainer(*_models(), char_tokenizer(), AlwaysRight(task), cfg, run_dir=tmp_path / "b")
    torch.testing.assert_close(always.estimate_pass_rates(torch.Generator().manual_seed(5)), torch.ones(8))


def test_two_stage_schedule_switches_objective(tmp_path):
    cfg = _config(loss="full_forward_kl", then_loss="full_reverse_kl", switch_step=3, steps=5)
    trainer = DistillTrainer(*_models(), char_tokenizer(), get_task("addition", digits=1), cfg, run_dir=tmp_path)
    assert [trainer.objective_name(s) for s in range(5)] == ["full_forward_kl"] * 3 + ["full_reverse_kl"] * 2


def test_vocab_mismatch_and_bad_config_raise(tmp_path):
    student = tiny_causal_lm(tiny_config("tiny"), seed=0)
    big = tiny_config("tiny")
    big.vocab_size = 64
    teacher = tiny_causal_lm(big, seed=1)
    with pytest.raises(VocabMismatchError, match="output head has 49 rows and the teacher's 64"):
        DistillTrainer(student, teacher, char_tokenizer(), get_task("addition"), _config(), run_dir=tmp_path)
    small = tiny_config("tiny")
    small.vocab_size = 40  # fewer rows than the tokenizer has tokens: not padding, another vocabulary
    with pytest.raises(VocabMismatchError, match="same tokenizer"):
        DistillTrainer(student, tiny_causal_lm(small, seed=1), char_tokenizer(), get_task("addition"), _config(),
                       run_dir=tmp_path)
    with pytest.raises(ConfigError):
        _config(loss="vanilla")
    with pytest.raises(ConfigError):
        _config(then_loss="full_reverse_kl")  # no switch step
    with pytest.raises(ConfigError):
        _config(loss_options={"bta": 0.5})
    with pytest.raises(ConfigError):
        _config(paced=PacedConfig(samples=0))


def test_teacher_rollout_steps_use_the_teachers_completions(tmp_path):
    from klcore.rollout import sample
    from klcore.toy.warmup import encode_prompts
    from klcore.trainer.base import step_seed

    student, teacher = _models()
    tok, task = char_tokenizer(), get_task("addition", digits=1)
    cfg = _config(loss="full_forward_kl", teacher_rollout_steps=1)
    trainer = DistillTrainer(student, teacher, tok, task, cfg, run_dir=tmp_path)
    batch, metrics = trainer.collect(0)
    assert metrics["rollout/teacher_samples"] == 1.0
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, 0))
    idx = torch.randint(len(trainer.pool), (cfg.prompts_per_step,), generator=gen)
    expected = sample(
        teacher, encode_prompts(tok, [trainer.pool[int(i)] for i in idx]), group_size=cfg.group_size,
        max_new_tokens=trainer.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        generator=gen,
    )
    assert torch.equal(batch["tokens"], expected.responses)
    assert trainer.collect(1)[1]["rollout/teacher_samples"] == 0.0
    with pytest.raises(ConfigError, match="teacher_rollout_steps"):
        _config(loss="opd_reinforce", teacher_rollout_steps=3)


def _paced_trainer(run_dir, **kw):
    student, teacher = _models()
    cfg = _config(loss="full_reverse_kl", steps=4, checkpoint_every=2, paced=PacedConfig(weighting="hard_filter",
                  samples=3), **kw)
    return DistillTrainer(student, teacher, char_tokenizer(), get_task("addition", digits=1), cfg, run_dir=run_dir)


def test_a_resumed_run_keeps_the_pass_rates_and_equals_the_uninterrupted_one(tmp_path):
    """The pass rates are estimated once (every=0) at step 0 and travel in the checkpoint: the resumed
    steps weight their problems as the uninterrupted run's do (not with the 0.5 placeholder)."""
    import json

    full = _paced_trainer(tmp_path / "full")
    full.train()
    part = _paced_trainer(tmp_path / "part")
    part.config.steps = 2
    part.train()
    assert (tmp_path / "part" / "checkpoints" / "step-00000002" / "trainer_extra_0.pt").is_file()
    resumed = _paced_trainer(tmp_path / "part", resume=True, seed=7)  # seed 7: its own draws would differ
    assert resumed.resume() and torch.equal(resumed.pass_rates, full.pass_rates)
    resumed.config.seed = full.config.seed
    resumed.train()

    def rows(folder):
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    keys = ("paced/weight_mean", "paced/weight_zero_frac", "paced/batch_pass_rate", "loss/objective")
    for want, got in zip(rows(tmp_path / "full")[2:], rows(tmp_path / "part")[2:], strict=True):
        assert want["step"] == got["step"]
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_all_zero_paced_weights_warn_once_and_are_counted(tmp_path):
    student, teacher = _models()
    cfg = _config(steps=2, loss="full_forward_kl", paced=PacedConfig(weighting="paced", samples=3))
    trainer = DistillTrainer(student, teacher, char_tokenizer(), AlwaysRight(get_task("addition", digits=1)), cfg,
                             run_dir=tmp_path)
    with pytest.warns(UserWarning, match="every PACED weight") as caught:
        history = trainer.train()
    assert len([w for w in caught if "every PACED weight" in str(w.message)]) == 1
    assert [h["paced/all_weights_zero"] for h in history] == [1.0, 1.0]
    unweighted = DistillTrainer(*_models(), char_tokenizer(), get_task("addition", digits=1), _config(steps=1),
                                run_dir=tmp_path / "b")
    assert unweighted.train()[0]["paced/all_weights_zero"] == 0.0


@pytest.mark.parametrize("loss", ["opd_reinforce", "opd_ppo"])
def test_sampled_token_objectives_refuse_a_temperature(loss):
    with pytest.raises(ConfigError, match=r"temperature=0\.7"):
        _config(loss=loss, temperature=0.7)
    with pytest.raises(ConfigError, match="temperature"):
        _config(loss="full_forward_kl", then_loss=loss, switch_step=2, temperature=0.7)
    _config(loss="full_reverse_kl", temperature=0.7)  # a full-vocabulary objective scores every token


def test_reinforce_refuses_stale_updates_and_ppo_takes_them():
    from opd_distill import EnvDistillConfig

    for kw in ({"ppo_epochs": 2}, {"mini_batches": 2}):
        with pytest.raises(ConfigError, match="importance weights"):
            _config(loss="opd_reinforce", **kw)
        with pytest.raises(ConfigError, match="importance weights"):
            EnvDistillConfig(loss="opd_reinforce", **kw)
        _config(loss="opd_ppo", **kw)


def _padded(vocab: int, seed: int):
    cfg = tiny_config("tiny")
    cfg.vocab_size = vocab
    return tiny_causal_lm(cfg, seed=seed)


def _pad_logits(model, n: int, value: float):
    """Give the head rows beyond the tokenizer's ``n`` tokens the logit ``value`` (a trained padded head
    gives them about -inf)."""
    def hook(module, inputs, out):
        return out.index_fill(-1, torch.arange(n, out.shape[-1], device=out.device), value)

    model.get_output_embeddings().register_forward_hook(hook)
    return model


def test_heads_padded_to_different_sizes_need_slice_vocab_and_then_compare_the_tokenizers_tokens(tmp_path):
    """Qwen2.5-7B vs 0.5B: heads of 152064 and 151936 rows over one tokenizer. Here: the tokenizer's
    tokens plus 16 and 8 padding rows."""
    from opd_distill import divergence_loss, response_logits

    from klcore.errors import DataError

    tok = char_tokenizer()
    n = len(tok)
    student, teacher = _pad_logits(_padded(n + 16, 0), n, -1e9), _pad_logits(_padded(n + 8, 1), n, -1e9)
    task = get_task("addition", digits=1)
    with pytest.raises(VocabMismatchError, match="slice_vocab=True"):
        DistillTrainer(student, teacher, tok, task, _config(), run_dir=tmp_path / "a")
    cfg = _config(steps=1, loss="full_reverse_kl", slice_vocab=True)
    trainer = DistillTrainer(student, teacher, tok, task, cfg, run_dir=tmp_path / "b")
    batch, metrics = trainer.collect(0)
    assert batch["teacher_logits"].shape[-1] == n
    torch.testing.assert_close(batch["teacher_logits"], response_logits(teacher, batch)[..., :n])
    loss, _ = divergence_loss(trainer.student_logits(batch), batch["teacher_logits"], batch["response_mask"],
                              kind="reverse_kl")
    assert torch.isfinite(loss) and math.isfinite(metrics["kl/reverse"])
    # a student that samples padding rows is refused rather than scored against a sliced teacher
    greedy_pad = _pad_logits(_padded(n + 16, 0), n, 1e9)
    bad = DistillTrainer(greedy_pad, teacher, tok, task, cfg, run_dir=tmp_path / "c")
    with pytest.raises(DataError, match="padding row"):
        bad.collect(0)


def test_a_teacher_tokenizer_with_other_ids_is_refused(tmp_path):
    from klcore.toy.tokenizer import chat_tokenizer

    student, teacher = _models()
    with pytest.raises(VocabMismatchError, match="tokenizers differ"):
        DistillTrainer(student, teacher, char_tokenizer(), get_task("addition", digits=1), _config(),
                       run_dir=tmp_path, teacher_tokenizer=chat_tokenizer())
    DistillTrainer(student, teacher, char_tokenizer(), get_task("addition", digits=1), _config(),
                   run_dir=tmp_path / "same", teacher_tokenizer=char_tokenizer())
