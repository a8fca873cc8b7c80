"""Aspect-ratio buckets: assignment, cover-and-crop, batches within a bucket, bucketed cache and training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from regionroute.buckets import BucketBatches, cover_and_crop, nearest_bucket, parse_buckets
from regionroute.cache import KEYS, build_flux_cache
from regionroute.data import build_tensors, load_records
from regionroute.moe import add_style_experts, style_lora_config
from regionroute.toy import ToyTextEncoder, WordTokenizer, tiny_flux
from regionroute.train import RegionRouteConfig, RegionRouteTrainer, cache_flux_inputs, pack_images

from klcore.errors import ConfigError, DataError, ShapeError
from klcore.trainer import TrainerConfig

STYLES = ["stripes", "invert"]
BUCKETS = [(8, 8), (8, 16), (16, 8)]
#: (height, width) of the records: squares, landscapes and portraits of other sizes than the buckets
SHAPES = [(10, 10), (12, 24), (20, 9), (8, 8), (9, 20), (14, 30), (16, 16)]


def mixed_dataset(folder, shapes=SHAPES):
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (h, w) in enumerate(shapes):
        style = STYLES[i % 2]
        src = rng.random((h, w, 3))
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h - h // 4, w // 4 : w - w // 4] = 255
        for arr, name in ((src, f"{i}.png"), (1 - src, f"{i}_t.png")):
            Image.fromarray((arr * 255).round().astype(np.uint8)).save(folder / "img" / name)
        Image.fromarray(mask).save(folder / "img" / f"mask_{i}_square.png")
        records.append({"prompt": f"make the square in {style} style", "source": f"img/{i}.png",
                        "target": f"img/{i}_t.png", "objects": {"square": style}})
    (folder / "records.json").write_text(json.dumps(records))
    return load_records(folder / "records.json")


def encoders():
    tok = WordTokenizer()
    enc = ToyTextEncoder(len(tok), 32)

    def encode_text(prompts):
        ids = [tok.encode(p) for p in prompts]
        return enc(torch.tensor([i + [tok.pad_id] * (8 - len(i)) for i in ids]))  # one fixed length

    return tok, encode_text


def test_parse_buckets_reads_diffusers_strings_and_rejects_bad_ones():
    assert parse_buckets("1024,1024; 768,1360") == [(1024, 1024), (768, 1360)]
    assert parse_buckets([[16, 32], (32, 16)], multiple=16) == [(16, 32), (32, 16)]
    for bad in ("1024x1024", "16,16,16", "", "16,16;16,16"):
        with pytest.raises(ConfigError):
            parse_buckets(bad)
    with pytest.raises(ConfigError, match="multiples of 16"):
        parse_buckets("24,16", multiple=16)


def test_nearest_bucket_is_the_nearest_log_aspect():
    for h, w in [(10, 10), (12, 24), (20, 9), (9, 20), (100, 130), (130, 100), (1, 50)]:
        distances = [abs(np.log(h / w) - np.log(bh / bw)) for bh, bw in BUCKETS]
        assert nearest_bucket(h, w, BUCKETS) == int(np.argmin(distances))
    assert nearest_bucket(8, 8, [(16, 16), (8, 8)]) == 0  # equal aspects: the first listed
    assert nearest_bucket(10, 11, BUCKETS) == 0 and nearest_bucket(10, 19, BUCKETS) == 1


def test_cover_and_crop_scales_to_cover_and_crops_the_centre():
    arr = np.arange(16 * 48 * 3, dtype=np.uint8).reshape(16, 48, 3) % 251
    img = Image.fromarray(arr)
    same = np.asarray(cover_and_crop(img, (16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(same, arr[:, 16:32])  # no scaling needed: the middle third
    half = np.asarray(cover_and_crop(img, (8, 24), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(half, np.asarray(img.resize((24, 8), Image.Resampling.BICUBIC)))  # same aspect
    tall = cover_and_crop(Image.fromarray(arr[:, :20]), (8, 4), Image.Resampling.NEAREST)  # 16x20 -> 8x10 -> crop
    np.testing.assert_array_equal(np.asarray(tall), np.asarray(Image.fromarray(arr[:, :20]).resize(
        (10, 8), Image.Resampling.NEAREST))[:, 3:7])


def test_bucket_batches_cover_each_epoch_within_buckets_and_depend_on_seed_and_step_only():
    bucket_of = [0, 1, 0, 2, 1, 0, 0, 1, 2]
    sampler = BucketBatches(bucket_of, batch_size=2, seed=3)
    assert sampler.per_epoch == 2 + 2 + 1  # ceil(4/2) + ceil(3/2) + ceil(2/2)
    for epoch in range(3):
        batches = [sampler.batch(epoch * sampler.per_epoch + j).tolist() for j in range(sampler.per_epoch)]
        assert sorted(i for b in batches for i in b) == list(range(len(bucket_of)))  # each record once per epoch
        assert all(len({bucket_of[i] for i in b}) == 1 and 1 <= len(b) <= 2 for b in batches)
    fresh = BucketBatches(bucket_of, batch_size=2, seed=3)  # a resumed run asks for step 7 first
    assert fresh.batch(7).tolist() == sampler.batch(7).tolist()
    other = BucketBatches(bucket_of, batch_size=2, seed=4)
    assert [other.batch(s).tolist() for s in range(10)] != [sampler.batch(s).tolist() for s in range(10)]
    first, second = sampler.epoch(0), sampler.epoch(1)
    assert first != second  # reshuffled every epoch


def test_bucketed_cache_groups_shards_by_bucket_and_equals_the_in_memory_path(tmp_path):
    records = mixed_dataset(tmp_path / "data")
    tok, encode_text = encoders()
    cache = build_flux_cache(records, tmp_path / "cache", encode=tok.encode, styles=STYLES, encode_text=encode_text,
                             batch_size=2, buckets=BUCKETS)
    expected_bucket = [nearest_bucket(h, w, BUCKETS) for h, w in SHAPES]
    assert cache.bucket_of == expected_bucket and cache.buckets == BUCKETS
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    for rows, b in zip(manifest["shard_rows"], manifest["shard_bucket"], strict=True):
        assert len(rows) <= 2 and all(expected_bucket[r] == b for r in rows)
    for i, rec in enumerate(records):
        bucket = BUCKETS[expected_bucket[i]]
        ref = cache_flux_inputs(build_tensors([rec], tok.encode, STYLES, bucket=bucket), encode_text)
        got = cache.take(torch.tensor([i]))
        assert got["masks"].shape[-2:] == bucket and got["grid"].tolist() == [list(bucket)]  # pixels: factor 1
        for key in KEYS:
            torch.testing.assert_close(got[key], ref[key], msg=f"record {i} {key}")
    with pytest.raises(DataError, match="one size"):
        cache.take(torch.tensor([0, 1]))  # a square and a landscape
    with pytest.raises(DataError, match="not both"):
        build_flux_cache(records, tmp_path / "x", encode=tok.encode, styles=STYLES, encode_text=encode_text,
                         size=8, buckets=BUCKETS)
    with pytest.raises(DataError, match="buckets"):  # the folder's cache has other buckets
        build_flux_cache(records, tmp_path / "cache", encode=tok.encode, styles=STYLES, encode_text=encode_text,
                         batch_size=2, buckets=BUCKETS[:2])


def test_interrupted_bucketed_build_resumes(tmp_path):
    records = mixed_dataset(tmp_path / "data")
    tok, encode_text = encoders()
    calls = []

    def failing(images):
        if len(calls) == 4:
            raise RuntimeError("interrupted")
        calls.append(images.shape)
        return pack_images(images)

    kwargs = dict(encode=tok.encode, styles=STYLES, encode_text=encode_text, batch_size=2, buckets=BUCKETS)
    with pytest.raises(RuntimeError):
        build_flux_cache(records, tmp_path / "c", encode_images=failing, **kwargs)
    resumed = build_flux_cache(records, tmp_path / "c", **kwargs)
    full = build_flux_cache(records, tmp_path / "full", **kwargs)
    for i in range(len(records)):
        for key in KEYS:
            torch.testing.assert_close(resumed.take(torch.tensor([i]))[key], full.take(torch.tensor([i]))[key])


def bucket_trainer(tmp_path, cache, steps, run="run", **trainer):
    torch.manual_seed(0)
    model = tiny_flux(heads=2, head_dim=8, dual=1, single=1)
    add_style_experts(model, STYLES, style_lora_config(init=False))
    cfg = RegionRouteConfig(trainer=TrainerConfig(steps=steps, lr=1e-2, progress=False, **trainer), batch_size=2)
    return model, RegionRouteTrainer(model, cache, STYLES, cfg, run_dir=tmp_path / run)


def test_trainer_draws_batches_within_buckets_and_resumes_exactly(tmp_path):
    records = mixed_dataset(tmp_path / "data")
    tok, encode_text = encoders()
    cache = build_flux_cache(records, tmp_path / "cache", encode=tok.encode, styles=STYLES, encode_text=encode_text,
                             batch_size=2, buckets=BUCKETS)
    model, trainer = bucket_trainer(tmp_path, cache, 4)
    seen = []
    original = cache.take
    cache.take = lambda index: seen.append(index.tolist()) or original(index)
    history = trainer.train()
    cache.take = original
    assert len(history) == 4 and all(np.isfinite(h["loss/total"]) for h in history)
    assert seen == [trainer.batches.batch(s).tolist() for s in range(4)]
    assert len({tuple(BUCKETS[cache.bucket_of[i]]) for b in seen for i in b}) > 1  # several sizes were trained
    _, first = bucket_trainer(tmp_path, cache, 2, run="resumed")
    first.train()
    resumed_model, resumed = bucket_trainer(tmp_path, cache, 4, run="resumed", resume=True)
    resumed.train()
    for (n, p), q in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    _, wrong = bucket_trainer(tmp_path, cache, 1, run="wrong")
    wrong.image_size = (8, 8)
    with pytest.raises(ShapeError, match="image_size"):
        for step in range(4):
            batch, _ = wrong.collect(step)
            wrong._grid(batch)


def test_micro_batches_accumulate_to_the_full_batch_gradient(tmp_path):
    records = mixed_dataset(tmp_path / "data", shapes=[(8, 8)] * 4)
    tok, encode_text = encoders()
    cache = build_flux_cache(records, tmp_path / "cache", encode=tok.encode, styles=STYLES, encode_text=encode_text,
                             batch_size=4)
    logs = {}
    for micro in (0, 1, 2):
        torch.manual_seed(0)
        model = tiny_flux(heads=2, head_dim=8, dual=1, single=1)
        add_style_experts(model, STYLES, style_lora_config(init=False))
        cfg = RegionRouteConfig(trainer=TrainerConfig(steps=1, lr=1e-3, progress=False, micro_batch_size=micro),
                                batch_size=4)
        logs[micro] = RegionRouteTrainer(model, cache, STYLES, cfg, run_dir=tmp_path / f"m{micro}").train()[0]
    for micro in (1, 2):
        for key in ("optim/grad_norm", "loss/total", "loss/diffusion"):
            assert logs[micro][key] == pytest.approx(logs[0][key], rel=1e-5), (micro, key)
