from __future__ import annotations

import pytest
import torch
from conftest import flux_inputs, tiny_flux, tiny_unet, unet_inputs
from regionroute.moe import LoraMoE, add_style_experts, load_expert, lora_layers, save_expert, style_lora_config

from klcore.errors import CheckpointError, ConfigError, UnsupportedModelError

STYLES = ["pixel", "stripes", "ink"]


def flux_with_experts(seed=0):
    model = tiny_flux(seed)
    add_style_experts(model, STYLES, style_lora_config(init=False))  # init=False: random B, experts differ
    return model


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_reference_lora_layout_on_tiny_flux():
    model = flux_with_experts()
    # dual block: to_q, to_k, to_v, to_out.0; single block (pre_only): to_q, to_k, to_v
    assert len(lora_layers(model)) == 7
    trainable = sum(p.numel() for n, p in model.named_parameters() if ".pixel." in n)
    assert trainable == 7 * 4 * (32 + 32)


def test_hard_routing_equals_one_active_adapter_per_sample():
    model, inputs = flux_with_experts(), flux_inputs()
    expected = []
    for style in ("ink", "pixel"):
        model.set_adapters([style], [1.0])
        expected.append(run(model, inputs))
    moe = LoraMoE(model, STYLES)
    moe.route(torch.tensor([2, 0]))
    out = run(model, inputs)
    torch.testing.assert_close(out[0], expected[0][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1], expected[1][1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[1], atol=1e-4)
    moe.release()
    model.disable_lora()
    base = run(model, inputs)
    model.enable_lora()
    model.set_adapters(["pixel"], [1.0])
    torch.testing.assert_close(run(model, inputs), expected[1])
    assert not torch.allclose(base, expected[1], atol=1e-4)


def test_soft_router_gates_sum_to_one_and_one_hot_reproduces_hard_routing():
    model, inputs = flux_with_experts(), flux_inputs()
    moe = LoraMoE(model, STYLES, router=True)
    moe.route(torch.tensor([1, 1]))
    hard = run(model, inputs)
    for gate in moe.gates.values():
        torch.nn.init.normal_(gate.proj.weight)
    moe.route_soft()
    with torch.no_grad():
        model(**inputs)
    for g in moe.last_gates:
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:-1]))
    assert moe.balance_loss().item() >= 0
    for gate in moe.gates.values():  # a saturated gate on expert 1 is one-hot
        torch.nn.init.zeros_(gate.proj.weight)
        with torch.no_grad():
            gate.proj.bias.copy_(torch.tensor([-1e4, 1e4, -1e4]))
    moe.route_soft()
    torch.testing.assert_close(run(model, inputs), hard, atol=1e-6, rtol=1e-5)
    for gate in moe.gates.values():
        torch.nn.init.zeros_(gate.proj.bias)
    moe.route_soft()
    with torch.no_grad():
        model(**inputs)
    assert abs(moe.balance_loss().item()) < 1e-6  # uniform gates


def test_router_trains_with_experts_frozen():
    model, inputs = flux_with_experts(), flux_inputs()
    moe = LoraMoE(model, STYLES, router=True)
    for p in model.parameters():
        p.requires_grad_(False)
    moe.route_soft()
    out = model(**inputs).sample
    (out.square().mean() + moe.balance_loss()).backward()
    assert all(p.grad is not None for p in moe.router_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_expert_save_load_round_trip_in_diffusers_format(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model, inputs = flux_with_experts(), flux_inputs()
    model.set_adapters(["stripes"], [1.0])
    expected = run(model, inputs)
    file = save_expert(model, "stripes", tmp_path / "stripes")
    assert file.name == "pytorch_lora_weights.safetensors"
    fresh = tiny_flux(0)
    load_expert(fresh, tmp_path / "stripes", "stripes")
    torch.testing.assert_close(run(fresh, inputs), expected, atol=1e-6, rtol=1e-5)
    state, metadata = FluxPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    assert all(k.startswith("transformer.") for k in state) and metadata is not None
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux(0),
    )
    pipe.load_lora_weights(str(tmp_path / "stripes"), adapter_name="stripes")
    torch.testing.assert_close(run(pipe.transformer, inputs), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(CheckpointError):
        load_expert(tiny_flux(0), tmp_path / "missing", "x")


def test_unet_experts_round_trip(tmp_path):
    model, inputs = tiny_unet(), unet_inputs()
    add_style_experts(model, ["a", "b"], style_lora_config(init=False))
    model.set_adapters(["b"], [1.0])
    expected = run(model, inputs)
    save_expert(model, "b", tmp_path / "b")
    fresh = tiny_unet()
    load_expert(fresh, tmp_path / "b", "b")
    torch.testing.assert_close(run(fresh, inputs), expected, atol=1e-6, rtol=1e-5)


def test_moe_rejects_bad_setup():
    with pytest.raises(UnsupportedModelError):
        LoraMoE(tiny_flux(), ["a"])
    model = flux_with_experts()
    with pytest.raises(ConfigError):
        LoraMoE(model, ["nope"])
    moe = LoraMoE(model, STYLES)
    with pytest.raises(ConfigError):
        moe.route(torch.tensor([3]))
    with pytest.raises(ConfigError):
        moe.route_soft()
    with pytest.raises(ConfigError):
        add_style_experts(tiny_flux(), ["a", "a"])
