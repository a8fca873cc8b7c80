from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from regionroute.data import build_tensors, load_records, style_token_indices, word_token_indices
from regionroute.moe import add_style_experts, style_lora_config
from regionroute.toy import ToyTextEncoder, WordTokenizer, make_toy_dataset, tiny_flux
from regionroute.train import RegionRouteConfig, RegionRouteTrainer, cache_flux_inputs, pack_images, unpack_images

from klcore.errors import ConfigError, DataError, ShapeError
from klcore.trainer import TrainerConfig


def test_word_token_indices_contiguous_match():
    assert word_token_indices([5, 7, 9, 7, 9, 1], [7, 9]) == [1, 2, 3, 4]  # every occurrence
    assert word_token_indices([5, 7, 9, 7, 9, 1], [7, 9], first_only=True) == [1, 2]  # the reference's
    assert word_token_indices([7, 7, 7], [7, 7]) == [0, 1]  # non-overlapping
    with pytest.raises(DataError):
        word_token_indices([5, 7, 1], [9])
    tok = WordTokenizer()
    prompt = "make the circle in stripes style , keep other area unchanged"
    ids = tok.encode(prompt)
    assert style_token_indices(tok.encode, prompt, "stripes") == [prompt.split().index("stripes")]
    assert ids[-1] == tok.eos_id
    with pytest.raises(DataError, match="not in the prompt"):
        style_token_indices(tok.encode, prompt, "invert")


def world(tmp_path, n=4, size=8):
    path = make_toy_dataset(tmp_path / "data", n=n, size=size, styles=["stripes", "invert"], seed=0)
    tok = WordTokenizer()
    enc = ToyTextEncoder(len(tok), 32)

    def encode_text(prompts):
        ids = [tok.encode(p) for p in prompts]
        return enc(torch.tensor(ids))

    data = build_tensors(load_records(path), tok.encode, ["stripes", "invert"])
    return path, data, cache_flux_inputs(data, encode_text)


def test_records_load_and_bad_data_raise(tmp_path):
    path, data, cache = world(tmp_path)
    assert data.sources.shape == (4, 3, 8, 8) and data.masks.shape == (4, 1, 8, 8)
    assert data.experts.tolist() == [0, 1, 0, 1]
    assert ((data.masks == 0) | (data.masks == 1)).all()
    assert cache["latents"].shape == (4, 16, 12)
    records = json.loads(path.read_text())
    empty = tmp_path / "data" / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="non-empty"):
        load_records(empty)
    bad = dict(records[0], prompt="make the thing in invert style")
    (tmp_path / "data" / "bad.json").write_text(json.dumps([bad]))
    with pytest.raises(DataError, match="not in the prompt"):
        load_records(tmp_path / "data" / "bad.json")
    from PIL import Image

    mask_name = next(p for p in (tmp_path / "data" / "img").iterdir() if p.name.startswith("mask_00000"))
    Image.new("L", (5, 5), 255).save(mask_name)
    with pytest.raises(ShapeError, match="resize"):
        build_tensors(load_records(path), WordTokenizer().encode, ["stripes", "invert"])
    with pytest.raises(DataError):
        build_tensors([], WordTokenizer().encode, ["stripes"])


def test_pack_unpack_round_trip():
    img = torch.rand(2, 3, 8, 6)
    torch.testing.assert_close(unpack_images(pack_images(img), 8, 6), img)


def flux_trainer(tmp_path, cache, steps=2, **over):
    model = tiny_flux(heads=2, head_dim=8, dual=1, single=1)
    add_style_experts(model, ["stripes", "invert"], style_lora_config())
    cfg = RegionRouteConfig(trainer=TrainerConfig(steps=steps, lr=1e-3, progress=False, checkpoint_every=1), batch_size=2, **over)
    return model, RegionRouteTrainer(model, cache, ["stripes", "invert"], cfg, run_dir=tmp_path / "run", image_size=(8, 8))


def test_trainer_flow_matching_target_and_attention_losses(tmp_path):
    _, _, cache = world(tmp_path)
    model, trainer = flux_trainer(tmp_path, cache)
    base_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    history = trainer.train()
    assert len(history) == 2 and "attn/focus" in history[0] and "attn/cover" in history[0]
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n])
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    batch = {k: v[:2] for k, v in cache.items()}
    noise = torch.randn_like(batch["latents"])
    _, target = trainer._flux_forward({**batch, "t": torch.rand(2), "noise": noise})
    torch.testing.assert_close(target, noise - batch["latents"])
    drawn, _ = trainer.collect(0)  # the batch carries its rows' times in [0, 1) and noise
    assert drawn["t"].shape == (2,) and float(drawn["t"].min()) >= 0 and float(drawn["t"].max()) < 1
    assert drawn["noise"].shape == drawn["latents"].shape


def test_trainer_resumes_from_checkpoint(tmp_path):
    _, _, cache = world(tmp_path)
    _, first = flux_trainer(tmp_path, cache, steps=1)
    first.train()
    _, second = flux_trainer(tmp_path, cache, steps=2)
    second.config.resume = True
    history = second.train()
    assert [h["step"] for h in history] == [0, 1]


def test_trainer_unet_epsilon_layout(tmp_path):
    model = tiny_unet()
    add_style_experts(model, ["a", "b"], style_lora_config())
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    cache = {
        "latents": torch.randn(3, 4, 8, 8, generator=g), "context": torch.randn(3, 4, 8, 8, generator=g),
        "text": torch.randn(3, 5, 8, generator=g), "pooled": torch.randn(3, 8, generator=g), "masks": masks,
        "token_indices": torch.tensor([[1], [2], [3]]), "token_objects": torch.zeros(3, 1, dtype=torch.long),
        "experts": torch.tensor([0, 1, 0]),
    }
    cfg = RegionRouteConfig(trainer=TrainerConfig(steps=1, progress=False), layout="unet", prediction="epsilon", batch_size=2)
    history = RegionRouteTrainer(model, cache, ["a", "b"], cfg, run_dir=tmp_path / "u", image_size=(8, 8)).train()
    assert history[0]["attn/focus"] > 0


def test_router_training_keeps_experts_frozen(tmp_path):
    _, _, cache = world(tmp_path)
    model = tiny_flux(heads=2, head_dim=8, dual=1, single=1)
    add_style_experts(model, ["stripes", "invert"], style_lora_config(init=False))
    experts_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    cfg = RegionRouteConfig(trainer=TrainerConfig(steps=2, lr=1e-2, progress=False), batch_size=2, train_router=True)
    trainer = RegionRouteTrainer(model, cache, ["stripes", "invert"], cfg, run_dir=tmp_path / "r", image_size=(8, 8))
    gates_before = [p.clone() for p in trainer.moe.router_parameters()]
    history = trainer.train()
    assert "router/balance" in history[0] and history[0]["router/balance"] >= 0
    for n, p in model.named_parameters():
        if n in experts_before:
            assert torch.equal(p, experts_before[n])
    assert any(not torch.equal(a, b) for a, b in zip(gates_before, trainer.moe.router_parameters(), strict=True))


def test_records_with_different_image_sizes_raise_shape_error(tmp_path):
    from PIL import Image

    path = make_toy_dataset(tmp_path / "data", n=2, size=8, styles=["stripes", "invert"], seed=0)
    records = load_records(path)
    rec = records[1]
    for file in [rec.source, rec.target, *rec.masks.values()]:
        with Image.open(file) as img:
            resized = img.resize((10, 10))
        resized.save(file)
    with pytest.raises(ShapeError, match="size="):
        build_tensors(records, WordTokenizer().encode, ["stripes", "invert"])
    data = build_tensors(records, WordTokenizer().encode, ["stripes", "invert"], size=8)
    assert data.sources.shape == (2, 3, 8, 8) and data.masks.shape == (2, 1, 8, 8)
    # the resized mask is the nearest-neighbour resize of the stored 10x10 mask
    with Image.open(next(iter(rec.masks.values()))) as img:
        expected = torch.from_numpy(np.asarray(img.convert("L").resize((8, 8), Image.NEAREST), dtype=np.float32) / 255)
    torch.testing.assert_close(data.masks[1, 0], expected)


def test_guidance_distilled_transformer_trains_with_embedded_guidance(tmp_path):
    from regionroute.train import flux_velocity

    _, _, cache = world(tmp_path)
    model = tiny_flux(heads=2, head_dim=8, dual=1, single=1, guidance_embeds=True)  # like FLUX.1-Kontext-dev
    add_style_experts(model, ["stripes", "invert"], style_lora_config())
    cfg = RegionRouteConfig(trainer=TrainerConfig(steps=1, lr=1e-3, progress=False), batch_size=2, guidance=1.0)
    trainer = RegionRouteTrainer(model, cache, ["stripes", "invert"], cfg, run_dir=tmp_path / "run", image_size=(8, 8))
    assert trainer.guidance == 1.0  # read from the config because the transformer embeds guidance
    assert len(trainer.train()) == 1  # without the embedded guidance the transformer's forward fails
    t, noise = torch.rand(2), torch.randn_like(cache["latents"][:2])
    batch = {**{k: v[:2] for k, v in cache.items()}, "t": t, "noise": noise}
    preds = {}
    for scale in (1.0, 4.0):
        trainer.guidance = scale
        preds[scale], _ = trainer._flux_forward(batch)
    assert not torch.allclose(preds[1.0], preds[4.0])  # the scale reaches the model
    xt = (1 - t[:, None, None]) * batch["latents"] + t[:, None, None] * noise
    expected = flux_velocity(model, xt, batch["context"], batch["text"], batch["pooled"], t, (8, 8), guidance=4.0)
    torch.testing.assert_close(preds[4.0], expected)
    _, plain = flux_trainer(tmp_path / "plain", cache, steps=1)
    assert plain.guidance is None  # other transformers get no guidance input
    with pytest.raises(ConfigError, match="guidance"):
        RegionRouteConfig(guidance=0.0)


def test_a_style_word_appearing_twice_supervises_every_occurrence(tmp_path):
    path = make_toy_dataset(tmp_path / "data", n=2, size=8, styles=["stripes", "invert"], seed=0)
    records = load_records(path)
    records[0].prompt = "make the circle in stripes style , keep the stripes"
    tok = WordTokenizer()
    words = records[0].prompt.split()
    assert style_token_indices(tok.encode, records[0].prompt, "stripes") == [4, 9] == [i for i, w in enumerate(words) if w == "stripes"]
    assert style_token_indices(tok.encode, records[0].prompt, "stripes", first_only=True) == [4]
    data = build_tensors(records, tok.encode, ["stripes", "invert"])
    assert data.token_indices[0].tolist() == [4, 9] and data.token_objects[0].tolist() == [0, 0]
    assert data.token_objects[1].tolist()[1] == -1  # the other record pads its single token


def test_trainer_refuses_transposed_masks_on_a_non_square_grid(tmp_path):
    model = tiny_unet()
    add_style_experts(model, ["a", "b"], style_lora_config())
    g = torch.Generator().manual_seed(0)

    def cache(masks):
        return {
            "latents": torch.randn(2, 4, 8, 12, generator=g), "context": torch.randn(2, 4, 8, 12, generator=g),
            "text": torch.randn(2, 5, 8, generator=g), "pooled": torch.randn(2, 8, generator=g), "masks": masks,
            "token_indices": torch.tensor([[1], [2]]), "token_objects": torch.zeros(2, 1, dtype=torch.long),
            "experts": torch.tensor([0, 1]),
        }

    masks = torch.zeros(2, 1, 16, 24)
    masks[..., 4:12, 6:18] = 1
    cfg = RegionRouteConfig(trainer=TrainerConfig(steps=1, progress=False), layout="unet", prediction="epsilon", batch_size=2)
    history = RegionRouteTrainer(model, cache(masks), ["a", "b"], cfg, run_dir=tmp_path / "ok", image_size=(8, 12)).train()
    assert history[0]["attn/focus"] > 0
    transposed = masks.transpose(2, 3).contiguous()  # 24 x 16: 96 cells at 8 x 12 too
    trainer = RegionRouteTrainer(model, cache(transposed), ["a", "b"], cfg, run_dir=tmp_path / "t", image_size=(8, 12))
    with pytest.raises(ShapeError, match="transposed"):
        trainer.train()
