from __future__ import annotations

import math

import pytest
import torch
from conftest import flux_inputs, tiny_flux, tiny_unet, unet_inputs
from regionroute._lse import chunked_logsumexp
from regionroute.capture import AttentionStore, register_attention_capture, remove_attention_capture

from klcore.errors import ConfigError, ShapeError, UnsupportedModelError

TOKENS = torch.tensor([[1, 2, 3], [5, 6, 0]])
VALID = torch.tensor([[True, True, True], [True, True, False]])


def brute_flux_probs(model, inputs):
    """Full joint-attention probabilities [B, H, L, L] of each block, from an independent processor."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    seen = {}

    class Brute(FluxAttnProcessor):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))
            k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1)))
            if encoder_hidden_states is not None:
                eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1)))
                ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1)))
                q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1).transpose(1, 2)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1).transpose(1, 2)
            seen[self.name] = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    model.set_attn_processor({n: Brute(n) for n in model.attn_processors})
    with torch.no_grad():
        model(**inputs)
    return seen


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_flux_capture_is_transparent_and_records_shapes(mode):
    model, inputs = tiny_flux(), flux_inputs()
    with torch.no_grad():
        ref = model(**inputs).sample
    store = AttentionStore(mode, chunk_size=5)
    names = register_attention_capture(model, store)
    assert names == ["transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"]
    store.set_tokens(TOKENS, VALID)
    with torch.no_grad():
        out = model(**inputs).sample
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert {tuple(m.shape) for m in store.maps.values()} == {(2, 16, 3)}
    assert store.stacked().shape == (2, 2, 16, 3)


def test_partial_rows_sum_to_one_over_each_samples_tokens():
    model, inputs = tiny_flux(), flux_inputs()
    store = AttentionStore("partial")
    register_attention_capture(model, store)
    store.set_tokens(TOKENS, VALID)
    with torch.no_grad():
        model(**inputs)
    for amap in store.maps.values():
        torch.testing.assert_close(amap.sum(-1), torch.ones(2, 16))
        assert (amap[1, :, 2] == 0).all()  # padding column
        assert amap.min() >= 0


@pytest.mark.parametrize("fused", [True, False])
def test_full_mode_equals_brute_force_softmax_over_all_keys(fused):
    inputs = flux_inputs(text_tokens=12)
    brute = brute_flux_probs(tiny_flux(), inputs)
    model = tiny_flux()
    store = AttentionStore("full", chunk_size=3, fused=fused)
    register_attention_capture(model, store)
    store.set_tokens(TOKENS, VALID)
    with torch.no_grad():
        model(**inputs)
    for name, amap in store.maps.items():
        probs = brute[name].mean(1)[:, 12:, :]  # image queries, head mean: [B, N, L]
        for b in range(2):
            for s in range(3):
                expected = probs[b, :, TOKENS[b, s]] if VALID[b, s] else torch.zeros(16)
                torch.testing.assert_close(amap[b, :, s], expected, atol=1e-6, rtol=1e-5)
        assert (amap.sum(-1) <= 1 + 1e-6).all()


def test_target_tokens_keeps_only_the_noisy_target_queries():
    model, inputs = tiny_flux(), flux_inputs(image_tokens=16)
    store = AttentionStore("full", target_tokens=8)
    register_attention_capture(model, store, layers=["single_transformer_blocks"])
    store.set_tokens(TOKENS, VALID)
    with torch.no_grad():
        model(**inputs)
    (amap,) = store.maps.values()
    brute = brute_flux_probs(tiny_flux(), inputs)["single_transformer_blocks.0.attn.processor"]
    torch.testing.assert_close(amap[0, :, 0], brute.mean(1)[0, 12:20, 1], atol=1e-6, rtol=1e-5)


def test_batch_of_two_equals_each_sample_alone():
    inputs = flux_inputs()
    model = tiny_flux()
    store = AttentionStore("partial")
    register_attention_capture(model, store)
    store.set_tokens(TOKENS, VALID)
    with torch.no_grad():
        model(**inputs)
    both = store.stacked()
    for b in range(2):
        alone = {k: (v[b : b + 1] if k not in ("img_ids", "txt_ids") else v) for k, v in inputs.items()}
        store.set_tokens(TOKENS[b : b + 1], VALID[b : b + 1])
        with torch.no_grad():
            model(**alone)
        torch.testing.assert_close(store.stacked()[:, 0], both[:, b], atol=1e-6, rtol=1e-5)


def test_union_flag_reproduces_the_reference_batch_union():
    model, inputs = tiny_flux(), flux_inputs()
    store = AttentionStore("partial", union_batch_tokens=True)
    register_attention_capture(model, store)
    store.set_tokens(TOKENS, VALID)
    with torch.no_grad():
        model(**inputs)
    amap = store.maps["transformer_blocks.0.attn.processor"]
    assert (amap[0].sum(-1) < 1 - 1e-4).all()  # sample 0's softmax also spans sample 1's tokens 5, 6


def test_unet_capture_transparent_and_equals_get_attention_scores():
    from diffusers.models.attention_processor import AttnProcessor

    inputs = unet_inputs()
    model = tiny_unet()
    with torch.no_grad():
        ref = model(**inputs).sample
    store = AttentionStore("full", chunk_size=4)
    names = register_attention_capture(model, store)
    assert names and all(".attn2." in n for n in names)
    tokens, valid = torch.tensor([[1, 2], [4, 0]]), torch.tensor([[True, True], [True, False]])
    store.set_tokens(tokens, valid)
    with torch.no_grad():
        out = model(**inputs).sample
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)

    brute_model, probs = tiny_unet(), {}
    brute_model.set_attn_processor(AttnProcessor())
    for name, module in brute_model.named_modules():
        if name.endswith("attn2"):
            original = module.get_attention_scores

            def grab(q, k, mask=None, _name=name, _orig=original):
                p = _orig(q, k, mask)
                probs[_name + ".processor"] = p
                return p

            module.get_attention_scores = grab
    with torch.no_grad():
        brute_model(**inputs)
    for name, amap in store.maps.items():
        p = probs[name].unflatten(0, (2, -1)).mean(1)  # [B, HW, T]
        assert amap.shape == (2, p.shape[1], 2)
        torch.testing.assert_close(amap[0], p[0][:, [1, 2]], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(amap[1, :, 0], p[1][:, 4], atol=1e-6, rtol=1e-5)
    remove_attention_capture(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, ref, atol=1e-6, rtol=0)


def test_chunked_logsumexp_matches_autograd_of_dense():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 3, 11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 3, 7, dtype=torch.float64, generator=g)
    dense = torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, -1)
    gq, gk = torch.autograd.grad((dense * w).sum(), (q, k))
    chunked = chunked_logsumexp(q, k, 0.3, 2)
    cq, ck = torch.autograd.grad((chunked * w).sum(), (q, k))
    torch.testing.assert_close(chunked.double(), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cq, gq, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ck, gk, atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise_klcore_errors():
    model, inputs = tiny_flux(), flux_inputs(text_tokens=12)
    store = AttentionStore()
    register_attention_capture(model, store)
    store.set_tokens(torch.tensor([[1, 20]]).expand(2, -1))
    with pytest.raises(ShapeError, match="text length"):
        model(**inputs)
    with pytest.raises(ConfigError):
        AttentionStore("softmax")
    with pytest.raises(ConfigError, match="selects no attention"):
        register_attention_capture(tiny_flux(), AttentionStore(), layers=["nope"])
    with pytest.raises(UnsupportedModelError):
        register_attention_capture(torch.nn.Linear(2, 2), AttentionStore())
    with pytest.raises(ShapeError):
        AttentionStore().set_tokens(torch.tensor([1, 2]))


def test_fused_full_mode_gives_the_outputs_and_gradients_of_the_chunked_path():
    inputs = flux_inputs()
    weights = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(5))
    results = {}
    for fused in (True, False):
        model = tiny_flux()
        store = AttentionStore("full", chunk_size=4, fused=fused)
        register_attention_capture(model, store)
        store.set_tokens(TOKENS, VALID)
        out = model(**inputs).sample
        loss = out.square().mean() + sum((m * weights).sum() for m in store.maps.values())
        loss.backward()
        results[fused] = (out.detach(), store.stacked().detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (out_f, maps_f, grads_f), (out_c, maps_c, grads_c) = results[True], results[False]
    torch.testing.assert_close(out_f, out_c, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps_f, maps_c, atol=1e-7, rtol=1e-5)
    assert grads_f.keys() == grads_c.keys() and len(grads_f) > 10
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_c[name], atol=2e-6, rtol=1e-4)


def test_attention_with_logsumexp_gradients_equal_dense_autograd():
    from regionroute._lse import attention_with_logsumexp

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64, requires_grad=True) for n in (10, 12, 12))
    go, gl = torch.randn(2, 3, 10, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, 10, generator=g, dtype=torch.float64)
    out, lse = attention_with_logsumexp(q, k, v, 0.3)
    got = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
    s = q @ k.transpose(-1, -2) * 0.3
    dense_out, dense_lse = s.softmax(-1) @ v, s.logsumexp(-1)
    torch.testing.assert_close(out, dense_out)
    torch.testing.assert_close(lse, dense_lse)
    expected = torch.autograd.grad((dense_out * go).sum() + (dense_lse * gl).sum(), (q, k, v))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
