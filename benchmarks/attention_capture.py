"""Attention capture overhead on Flux: a training step (forward + backward, LoRA experts trainable) and
a no-grad forward with capture (partial, full fused, full chunked) vs the default processor, and peak
memory of full mode with and without query chunking.

    python benchmarks/attention_capture.py                      # CPU, tiny + medium configs
    python benchmarks/attention_capture.py --device cuda --dtype bf16 --configs medium large

Ratios are against diffusers' default ``FluxAttnProcessor`` measured in the same run (fastest of
``--repeats`` round-robin steps after a warm-up). The training step of the default processor is the
flow-matching loss only; the capture variants add the Focus/Cover loss of their maps (``full``: the
logsumexp from the fused attention kernel and one fused backward; ``full-chunked``: the previous second
score pass in query chunks). Kontext layout: ``[text | target N | context N]``, the
style tokens are 3 per sample. Memory: CUDA peak allocation, or on CPU the peak RSS of a fresh
subprocess that runs one full-mode forward (the baseline subtracted is a default-processor forward).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CONFIGS = {
    # name: (heads, head_dim, dual blocks, single blocks, grid side (N = side^2), text tokens, batch)
    "tiny": (2, 16, 1, 1, 8, 16, 2),
    "medium": (4, 32, 2, 4, 24, 64, 1),
    "large": (24, 128, 4, 8, 64, 512, 1),
}


def build(name: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, torch.Tensor], int]:
    from diffusers import FluxTransformer2DModel

    heads, hd, dual, single, side, text, batch = CONFIGS[name]
    torch.manual_seed(0)
    axes = [hd // 4, hd // 4, hd - 2 * (hd // 4)]
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=dual, num_single_layers=single, attention_head_dim=hd,
        num_attention_heads=heads, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=axes,
    ).to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    n = side * side
    ids = torch.zeros(2 * n, 3)
    ids[n:, 0] = 1
    ids[:, 1] = torch.arange(side).repeat_interleave(side).repeat(2)
    ids[:, 2] = torch.arange(side).repeat(2 * side)
    inputs = {
        "hidden_states": torch.randn(batch, 2 * n, 16), "encoder_hidden_states": torch.randn(batch, text, 64),
        "pooled_projections": torch.randn(batch, 64), "timestep": torch.full((batch,), 0.5),
        "img_ids": ids, "txt_ids": torch.zeros(text, 3),
    }
    inputs = {k: v.to(device, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype) for k, v in inputs.items()}
    return model, inputs, n


def timed(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], repeats: int, device: str) -> dict[str, float]:
    """Fastest of ``repeats`` forwards per model, measured round-robin (a shared CPU slows runs unevenly)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for i in range(repeats + 1):
            for key, model in models.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(**inputs)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times[key].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


def arm(model: torch.nn.Module, inputs: dict[str, torch.Tensor], mode: str, n: int, chunk: int, *, detach: bool = True):
    from regionroute.capture import AttentionStore, register_attention_capture

    fused = mode != "full-chunked"
    store = AttentionStore(mode.removesuffix("-chunked"), chunk_size=chunk, target_tokens=n, detach=detach, fused=fused)
    register_attention_capture(model, store)
    batch = inputs["hidden_states"].shape[0]
    store.set_tokens(torch.tensor([[3, 4, 5]] * batch))
    return store


def train_times(name: str, device: str, dtype: torch.dtype, repeats: int, chunk: int) -> dict[str, float]:
    """Fastest forward + backward per variant (LoRA rank 4 experts trainable, as in expert training)."""
    from regionroute.losses import region_attention_loss
    from regionroute.moe import add_style_experts

    modes = ("default", "partial", "full", "full-chunked")
    models, stores = {}, {}
    for mode in modes:
        models[mode], inputs, n = build(name, device, dtype)
        add_style_experts(models[mode], ["style"])
        if mode != "default":
            stores[mode] = arm(models[mode], inputs, mode, n, chunk, detach=False)
    side = int(n**0.5)
    batch = inputs["hidden_states"].shape[0]
    masks = torch.zeros(batch, 1, side, side, device=device)
    masks[..., side // 4 : side // 2, side // 3 : side - 2] = 1
    objects = torch.zeros(batch, 3, dtype=torch.long, device=device)
    target = torch.randn_like(inputs["hidden_states"])
    times: dict[str, list[float]] = {k: [] for k in modes}
    for i in range(repeats + 1):
        for mode in modes:
            model = models[mode]
            model.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            out = model(**inputs).sample
            loss = torch.nn.functional.mse_loss(out.float(), target.float())
            if mode != "default":
                attn, _ = region_attention_loss(list(stores[mode].maps.values()), masks, objects, grid=(side, side),
                                                normalize="max" if mode.startswith("full") else "none")
                loss = loss + attn
            loss.backward()
            _sync(device)
            if i:
                times[mode].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory_child(name: str, mode: str, chunk: int) -> None:
    """Subprocess entry: one forward, print peak RSS (KiB)."""
    torch.set_num_threads(1)
    model, inputs, n = build(name, "cpu", torch.float32)
    if mode != "default":
        arm(model, inputs, mode, n, chunk)
    with torch.no_grad():
        model(**inputs)
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def cpu_peak(name: str, mode: str, chunk: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, mode, str(chunk)], capture_output=True, text=True, check=True
    ).stdout.strip().splitlines()[-1]
    return json.loads(out)["maxrss_kib"] / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=sorted(CONFIGS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1], int(args.memory_child[2]))
        return
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"device={args.device} dtype={args.dtype} threads={args.threads} repeats={args.repeats} (fastest forward)")
    for name in args.configs:
        tt = train_times(name, args.device, dtype, args.repeats, args.chunk)
        print(
            f"[{name}] train step (fwd+bwd) default {tt['default'] * 1e3:.1f} ms | "
            + " | ".join(f"{m} {tt[m] * 1e3:.1f} ms (x{tt[m] / tt['default']:.3f})" for m in ("partial", "full", "full-chunked"))
        )
        models = {}
        for mode in ("default", "partial", "full", "full-chunked"):
            models[mode], inputs, n = build(name, args.device, dtype)
            if mode != "default":
                arm(models[mode], inputs, mode, n, args.chunk)
        t = timed(models, inputs, args.repeats, args.device)
        del models
        print(
            f"[{name}] N={n} forward (no grad) default {t['default'] * 1e3:.1f} ms | "
            + " | ".join(f"{m} {t[m] * 1e3:.1f} ms (x{t[m] / t['default']:.3f})" for m in ("partial", "full", "full-chunked"))
        )
        variants = (("default", "default", 0), ("fused", "full", args.chunk), ("chunked", "full-chunked", args.chunk),
                    ("unchunked", "full-chunked", 10**9))
        if args.device == "cuda":
            peaks = {}
            for label, mode, chunk in variants:
                m, _, _ = build(name, args.device, dtype)
                if mode != "default":
                    arm(m, inputs, mode, n, chunk)
                torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    m(**inputs)
                peaks[label] = torch.cuda.max_memory_allocated() / 2**20
                del m
        else:
            peaks = {label: cpu_peak(name, mode, chunk) for label, mode, chunk in variants}
        print(
            f"[{name}] peak forward memory MiB: default {peaks['default']:.1f} | "
            + " | ".join(f"full {k} {peaks[k]:.1f} (+{peaks[k] - peaks['default']:.1f})" for k in ("fused", "chunked", "unchunked"))
        )


if __name__ == "__main__":
    main()
