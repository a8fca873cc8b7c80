"""Training, routing and saving leave the model and the folders as they were found."""

from __future__ import annotations

import pytest
import torch
from conftest import flux_inputs, tiny_flux, tiny_unet, unet_inputs
from regionroute.capture import AttentionStore, capture_installed, register_attention_capture, remove_attention_capture
from regionroute.moe import LoraMoE, add_style_experts, expert_parameters, lora_layers, save_expert, style_lora_config
from regionroute.toy import tiny_flux as toy_flux
from regionroute.train import RegionRouteConfig, RegionRouteTrainer
from test_data_train import world

from klcore.errors import CheckpointError
from klcore.trainer import TrainerConfig

STYLES = ["stripes", "invert"]


def snapshot(model):
    return {
        "processors": dict(model.attn_processors),
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
        "disabled": [layer._disable_adapters for _, layer in lora_layers(model)],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_as_found(model, before):
    after = snapshot(model)
    assert after["processors"].keys() == before["processors"].keys()
    assert all(after["processors"][k] is v for k, v in before["processors"].items())
    assert after["hooks"] == before["hooks"] and after["disabled"] == before["disabled"]
    assert after["grad"] == {k: v for k, v in before["grad"].items() if k in after["grad"]}
    assert not capture_installed(model)


def outputs_per_adapter(model, cache, batch=3):
    from regionroute.train import flux_velocity

    x = cache["latents"][:batch]
    outs = {}
    with torch.no_grad():
        for style in STYLES:
            model.set_adapters([style], [1.0])
            outs[style] = flux_velocity(model, x, cache["context"][:batch], cache["text"][:batch],
                                        cache["pooled"][:batch], torch.full((batch,), 0.5), (8, 8))
    return outs


def make_trainer(tmp_path, cache, model, **over):
    cfg = RegionRouteConfig(trainer=TrainerConfig(steps=2, lr=1e-3, progress=False), batch_size=2, **over)
    return RegionRouteTrainer(model, cache, STYLES, cfg, run_dir=tmp_path, image_size=(8, 8), on_sample=over.pop("on_sample", None))


def expert_model():
    model = toy_flux(heads=2, head_dim=8, dual=1, single=1)
    add_style_experts(model, STYLES, style_lora_config(init=False))  # experts differ from the start
    return model


def test_trainer_leaves_the_model_as_found_after_success(tmp_path):
    _, _, cache = world(tmp_path)
    model = expert_model()
    before = snapshot(model)
    make_trainer(tmp_path / "a", cache, model).train()
    assert_as_found(model, before)
    outs = outputs_per_adapter(model, cache, batch=3)  # a batch size the trainer never routed
    assert not torch.allclose(outs["stripes"], outs["invert"], atol=1e-5)
    before = snapshot(model)  # peft's set_adapters froze the inactive expert; the trainer trains both anyway
    make_trainer(tmp_path / "b", cache, model).train()  # a second trainer stacks nothing
    assert_as_found(model, before)


def test_trainer_leaves_the_model_as_found_after_a_failure(tmp_path):
    _, _, cache = world(tmp_path)
    model = expert_model()
    before = snapshot(model)

    def fail(trainer, step):
        if step == 1:  # after one step ran with capture and routing armed
            assert capture_installed(model) and trainer.moe.active
            raise RuntimeError("boom")

    cfg = RegionRouteConfig(trainer=TrainerConfig(steps=3, lr=1e-3, progress=False), batch_size=2, sample_every=1)
    trainer = RegionRouteTrainer(model, cache, STYLES, cfg, run_dir=tmp_path / "f", image_size=(8, 8), on_sample=fail)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert_as_found(model, before)
    assert not trainer.store.armed
    outs = outputs_per_adapter(model, cache, batch=3)
    assert not torch.allclose(outs["stripes"], outs["invert"], atol=1e-5)


def test_router_training_restores_requires_grad(tmp_path):
    _, _, cache = world(tmp_path)
    model = expert_model()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(grads.values())
    cfg = RegionRouteConfig(trainer=TrainerConfig(steps=1, lr=1e-2, progress=False), batch_size=2, train_router=True)
    RegionRouteTrainer(model, cache, STYLES, cfg, run_dir=tmp_path / "r", image_size=(8, 8)).train()
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in grads} == grads


def test_moe_release_restores_peft_state_and_removes_hooks():
    model, inputs = tiny_flux(), flux_inputs()
    add_style_experts(model, STYLES, style_lora_config(init=False))
    model.disable_lora()
    with torch.no_grad():
        base = model(**inputs).sample
    hooks = [len(m._forward_hooks) for m in model.modules()]
    moe = LoraMoE(model, STYLES)
    moe.route(torch.tensor([0, 1]))
    assert moe.active
    with torch.no_grad():
        routed = model(**inputs).sample
    moe.release()
    assert not moe.active and [len(m._forward_hooks) for m in model.modules()] == hooks
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, base)  # LoRA is disabled again, as it was
    assert not torch.allclose(routed, base, atol=1e-5)


def test_moe_scaling_comes_from_alpha_over_rank_not_peft_state():
    model, inputs = tiny_flux(), flux_inputs()
    add_style_experts(model, STYLES, style_lora_config(rank=4, alpha=8, init=False))
    with torch.no_grad():
        model.set_adapters(["stripes"], [1.0])
        expected = model(**inputs).sample
        model.set_adapters(["stripes"], [0.3])
        model.set_adapters(["invert"], [1.0])  # leaves stripes' peft scaling at 0.3 * 2
        moe = LoraMoE(model, STYLES)
        moe.route(torch.tensor([0, 0]))
        routed = model(**inputs).sample
        moe.release()
    torch.testing.assert_close(routed, expected, atol=1e-6, rtol=1e-5)
    assert all(s["stripes"] == 2.0 for s in moe._scaling)


def test_rslora_scaling():
    model = tiny_flux()
    from peft import LoraConfig

    add_style_experts(model, ["a"], LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=["to_q"]))
    assert all(s["a"] == 2.0 for s in LoraMoE(model, ["a"])._scaling)


def test_remove_attention_capture_restores_the_original_processor_objects():
    from diffusers.models.attention_processor import AttnProcessor
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_flux()
    custom = {name: FluxAttnProcessor() for name in model.attn_processors}
    model.set_attn_processor(dict(custom))
    pre_hooks = len(model._forward_pre_hooks)
    register_attention_capture(model, AttentionStore())
    register_attention_capture(model, AttentionStore("full"))  # a second capture on top
    remove_attention_capture(model)
    assert all(model.attn_processors[k] is v for k, v in custom.items())
    assert len(model._forward_pre_hooks) == pre_hooks

    unet = tiny_unet()
    plain = {name: AttnProcessor() for name in unet.attn_processors}
    unet.set_attn_processor(dict(plain))
    with torch.no_grad():
        expected = unet(**unet_inputs()).sample
    register_attention_capture(unet, AttentionStore())
    remove_attention_capture(unet)
    assert all(unet.attn_processors[k] is v for k, v in plain.items())
    with torch.no_grad():
        torch.testing.assert_close(unet(**unet_inputs()).sample, expected)


def test_save_expert_writes_beside_existing_files(tmp_path):
    model = tiny_flux()
    add_style_experts(model, ["a"], style_lora_config(init=False))
    folder = tmp_path / "a"
    (folder / "notes").mkdir(parents=True)
    (folder / "my_notes.txt").write_text("keep me")
    (folder / "notes" / "x.txt").write_text("keep me too")
    first = save_expert(model, "a", folder)
    old = first.read_bytes()
    with torch.no_grad():
        for p in expert_parameters(model, "a"):
            p.add_(1.0)
    save_expert(model, "a", folder)
    assert first.read_bytes() != old
    assert sorted(p.name for p in folder.iterdir()) == ["my_notes.txt", "notes", "pytorch_lora_weights.safetensors"]
    assert (folder / "my_notes.txt").read_text() == "keep me" and (folder / "notes" / "x.txt").read_text() == "keep me too"


def test_save_expert_failure_keeps_old_weights_and_leaves_no_temp(tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    model = tiny_flux()
    add_style_experts(model, ["a"], style_lora_config(init=False))
    folder = tmp_path / "a"
    file = save_expert(model, "a", folder)
    old = file.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(FluxPipeline, "save_lora_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        save_expert(model, "a", folder)
    assert file.read_bytes() == old and [p.name for p in folder.iterdir()] == [file.name]


def test_save_expert_refuses_a_folder_in_the_weights_place(tmp_path):
    model = tiny_flux()
    add_style_experts(model, ["a"], style_lora_config(init=False))
    (tmp_path / "a" / "pytorch_lora_weights.safetensors").mkdir(parents=True)
    (tmp_path / "a" / "pytorch_lora_weights.safetensors" / "inner.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a file"):
        save_expert(model, "a", tmp_path / "a")
    assert (tmp_path / "a" / "pytorch_lora_weights.safetensors" / "inner.txt").read_text() == "x"
    (tmp_path / "f").write_text("a file")
    with pytest.raises(CheckpointError, match="is a file"):
        save_expert(model, "a", tmp_path / "f")
