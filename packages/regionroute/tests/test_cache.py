"""Streaming, batched, resumable latent and text cache."""

from __future__ import annotations

import pytest
import torch
from regionroute.cache import KEYS, FluxCache, build_flux_cache
from regionroute.data import build_tensors, load_records
from regionroute.moe import add_style_experts, style_lora_config
from regionroute.toy import ToyTextEncoder, WordTokenizer, make_toy_dataset, tiny_flux
from regionroute.train import RegionRouteConfig, RegionRouteTrainer, cache_flux_inputs, pack_images

from klcore.errors import CheckpointError, DataError
from klcore.trainer import TrainerConfig

STYLES = ["stripes", "invert"]


def setup(tmp_path, n=5):
    records = load_records(make_toy_dataset(tmp_path / "data", n=n, size=8, styles=STYLES, seed=0))
    tok = WordTokenizer()
    enc = ToyTextEncoder(len(tok), 32)

    def encode_text(prompts):
        return enc(torch.tensor([tok.encode(p) for p in prompts]))

    return records, tok, encode_text


class CountingImages:
    """pack_images that records the batch sizes it sees and can fail on a chosen call."""

    def __init__(self, fail_at=None):
        self.sizes, self.fail_at = [], fail_at

    def __call__(self, images):
        if self.fail_at is not None and len(self.sizes) == self.fail_at:
            raise RuntimeError("interrupted")
        self.sizes.append(images.shape[0])
        return pack_images(images)


def test_cache_equals_the_in_memory_cache_and_reads_batches(tmp_path):
    records, tok, encode_text = setup(tmp_path)
    images = CountingImages()
    cache = build_flux_cache(records, tmp_path / "cache", encode=tok.encode, styles=STYLES, encode_text=encode_text,
                             encode_images=images, batch_size=2)
    assert len(cache) == 5 and max(images.sizes) <= 2  # never more than one batch in memory
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cache.json"] + [f"shard-{i:05d}.safetensors" for i in range(3)]
    expected = cache_flux_inputs(build_tensors(records, tok.encode, STYLES), encode_text)
    index = torch.tensor([4, 0, 3, 3, 1])
    got = cache.take(index)
    assert set(got) == set(KEYS)
    for key in KEYS:
        torch.testing.assert_close(got[key], expected[key][index], msg=key)


def test_interrupted_build_resumes_where_it_stopped(tmp_path):
    records, tok, encode_text = setup(tmp_path)
    kwargs = dict(encode=tok.encode, styles=STYLES, encode_text=encode_text, batch_size=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_flux_cache(records, tmp_path / "c", encode_images=CountingImages(fail_at=2), **kwargs)  # 2 calls per shard
    with pytest.raises(CheckpointError, match="resume"):
        FluxCache(tmp_path / "c")
    images = CountingImages()
    resumed = build_flux_cache(records, tmp_path / "c", encode_images=images, **kwargs)
    assert len(images.sizes) == 4  # shards 1 and 2 only (targets and sources)
    full = build_flux_cache(records, tmp_path / "full", encode_images=pack_images, **kwargs)
    index = torch.arange(5)
    for key in KEYS:
        torch.testing.assert_close(resumed.take(index)[key], full.take(index)[key])
    again = CountingImages()
    build_flux_cache(records, tmp_path / "c", encode_images=again, **kwargs)
    assert again.sizes == []  # complete: nothing re-encoded


def test_cache_refuses_other_records_and_ragged_text(tmp_path):
    records, tok, encode_text = setup(tmp_path)
    kwargs = dict(encode=tok.encode, styles=STYLES, encode_text=encode_text)
    build_flux_cache(records, tmp_path / "c", batch_size=2, **kwargs)
    with pytest.raises(DataError, match="other records"):
        build_flux_cache(records[:3], tmp_path / "c", batch_size=2, **kwargs)
    with pytest.raises(DataError, match="other records"):
        build_flux_cache(records, tmp_path / "c", batch_size=3, **kwargs)

    def ragged(prompts):
        text, pooled = encode_text(prompts)
        return torch.cat([text, text[:, :1]], 1) if len(prompts) == 1 else text, pooled

    with pytest.raises(DataError, match="fixed length"):
        build_flux_cache(records, tmp_path / "r", batch_size=2, encode=tok.encode, styles=STYLES, encode_text=ragged)
    with pytest.raises(DataError, match=r"\[0, 5\)"):
        FluxCache(tmp_path / "c").take(torch.tensor([5]))


def test_trainer_reads_a_sharded_cache(tmp_path):
    records, tok, encode_text = setup(tmp_path)
    cache = build_flux_cache(records, tmp_path / "c", encode=tok.encode, styles=STYLES, encode_text=encode_text, batch_size=2)
    model = tiny_flux(heads=2, head_dim=8, dual=1, single=1)
    add_style_experts(model, STYLES, style_lora_config())
    cfg = RegionRouteConfig(trainer=TrainerConfig(steps=2, lr=1e-3, progress=False), batch_size=3)
    history = RegionRouteTrainer(model, cache, STYLES, cfg, run_dir=tmp_path / "run", image_size=(8, 8)).train()
    assert len(history) == 2 and history[-1]["attn/focus"] > 0
