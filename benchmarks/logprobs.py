"""Benchmark: klcore's chunked per-token log-prob + entropy against two baselines, in one run.

What it measures, for logits ``[B, T, V]`` (float32 or bfloat16) and taken tokens ``[B, T]``, under
``torch.no_grad()`` (the inference setting):

- ``klcore``: ``klcore.logprobs.token_logprobs_and_entropy(logits, tokens)``: on CUDA with triton its fused
  kernel (one pass per row, online softmax), elsewhere the chunked torch path, which upcasts one chunk of
  rows at a time to float32 instead of the whole tensor. On CUDA the chunked path is also measured as
  ``klcore-chunked``.
- ``naive``: ``lp = log_softmax(logits.float(), -1)``; ``lp.gather(-1, tokens)``; ``-(lp.exp() * lp).sum(-1)``.
- ``trl`` (only when ``import trl`` works): ``selective_log_softmax(logits, tokens)`` plus
  ``entropy_from_logits(logits)`` from TRL. On CUDA with Triton, TRL may dispatch to its own fused kernel.

For each (V, dtype) it reports the median wall time over ``--repeats`` calls (after a warm-up) and the peak
extra memory of one call (outputs included), first checking that klcore matches naive
(rtol = atol = 1e-4 for float32, 2e-2 for bfloat16).

Peak extra memory:

- CUDA: ``torch.cuda.reset_peak_memory_stats()``; ``base = torch.cuda.memory_allocated()`` with the inputs
  alive; one call; ``torch.cuda.max_memory_allocated() - base``.
- CPU: there is no allocator statistic, so every (method, V, dtype) runs in a fresh subprocess of this script
  (with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB, so freed large buffers leave the resident set, and
  MALLOC_TRIM_THRESHOLD_ at 256 MiB, so the heap is not returned and faulted in again after small frees)
  (hidden ``--worker`` flag). The child builds the inputs, warms the method up on 8 positions (thread pool,
  lazy imports), resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` = 5, where permitted), reads
  its resident set size from ``/proc/self/statm``, calls the method once and reports peak RSS minus that.
  Peak RSS is ``VmHWM`` from ``/proc/self/status`` (``ru_maxrss`` only as a fallback: across fork + exec it
  keeps the parent's RSS, which hides a child's smaller peaks). This is an RSS-based approximation: it
  counts touched pages, including allocator slack and freed heap the allocator keeps.

Targets (printed as PASS/FAIL per size; the exit status does not depend on them):

- klcore peak extra memory <= 0.25x naive,
- klcore time <= 1.1x naive,
- klcore no worse than trl on time and on peak extra memory (when trl is installed).

Default sizes: V in {32768, 131072}, B x T = 8 x 1024, dtypes float32 and bfloat16. On CPU a size whose
naive footprint (logits plus three float32 copies) exceeds 70% of the available RAM is skipped.

    python benchmarks/logprobs.py --quick                  # tiny smoke size, seconds on a CPU
    python benchmarks/logprobs.py --vocab 32768 --json runs/bench/logprobs.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from klcore.logprobs import DISABLE_FUSED_ENV, token_logprobs_and_entropy

Method = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

MIB = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
SPEC_VOCABS, SPEC_BATCH, SPEC_SEQ = [32768, 131072], 8, 1024
QUICK_VOCABS, QUICK_BATCH, QUICK_SEQ = [4096], 2, 128
MEMORY_FRACTION = {"cpu": 0.70, "cuda": 0.90}  # skip a size whose estimated need exceeds this share of free memory
TARGET_MEMORY_VS_NAIVE = 0.25
TARGET_TIME_VS_NAIVE = 1.1
TRL_MODULES = ("trl.trainer.utils", "trl.models.utils", "trl.utils", "trl.trainer")
RESULT_TAG = "@@result "
WARMUP_POSITIONS = 8


# --------------------------------------------------------------------------- methods


def naive(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(logits.float(), -1)
    token_lp = lp.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    return token_lp, entropy


def klcore_method(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return token_logprobs_and_entropy(logits, tokens)


def klcore_chunked(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """klcore's chunked torch path, which CUDA runs only when the fused kernel is disabled."""
    os.environ[DISABLE_FUSED_ENV] = "1"
    try:
        return token_logprobs_and_entropy(logits, tokens)
    finally:
        del os.environ[DISABLE_FUSED_ENV]


def find_trl() -> tuple[Method | None, str]:
    """TRL's baseline as one method, and a line saying which version and module (or why it is skipped)."""
    try:
        import trl
    except ImportError:
        return None, "trl not installed: skipped"
    except Exception as exc:  # an installed trl that fails to import (e.g. a transformers mismatch)
        return None, f"trl installed but `import trl` failed ({type(exc).__name__}: {exc}): skipped"
    version = getattr(trl, "__version__", "unknown")
    for name in TRL_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        select = getattr(module, "selective_log_softmax", None)
        entropy = getattr(module, "entropy_from_logits", None)
        if callable(select) and callable(entropy):

            def trl_method(
                logits: torch.Tensor, tokens: torch.Tensor, select: Callable = select, entropy: Callable = entropy
            ) -> tuple[torch.Tensor, torch.Tensor]:
                return select(logits, tokens), entropy(logits)

            return trl_method, f"trl {version}: selective_log_softmax + entropy_from_logits from {name}"
    return None, f"trl {version} installed but selective_log_softmax/entropy_from_logits not found: skipped"


def get_methods(with_trl: bool = True) -> tuple[dict[str, Method], str]:
    methods: dict[str, Method] = {"naive": naive}
    trl_line = "trl not requested"
    if with_trl:
        trl_method, trl_line = find_trl()
        if trl_method is not None:
            methods["trl"] = trl_method
    methods["klcore"] = klcore_method
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        methods["klcore-chunked"] = klcore_chunked  # the fused kernel is what `klcore` runs there
    return methods, trl_line


# --------------------------------------------------------------------------- inputs, time, memory


def make_inputs(
    vocab: int, batch: int, seq: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded logits ~ randn * 2 and uniform tokens, filled in row chunks so no float32 copy of it all exists."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(batch * seq, vocab, dtype=dtype, device=device)
    step = max(1, (1 << 22) // vocab)
    for start in range(0, batch * seq, step):
        rows = logits[start : start + step]
        rows.copy_(torch.randn(rows.shape, generator=gen, device=device) * 2)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
    return logits.view(batch, seq, vocab), tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(method: Method, logits: torch.Tensor, tokens: torch.Tensor) -> float:
    sync(logits.device)
    start = time.perf_counter()
    out = method(logits, tokens)
    sync(logits.device)
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def proc_kib(path: str, key: str) -> int | None:
    """Bytes of a ``Key:  N kB`` line of a /proc file, or None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This address space's peak RSS: VmHWM from /proc/self/status, else ru_maxrss (kilobytes on Linux).

    VmHWM is preferred because ru_maxrss also keeps the parent's RSS at fork time across exec, which would
    hide a child's smaller peaks; both are the kernel's resident-set high-water mark otherwise.
    """
    hwm = proc_kib("/proc/self/status", "VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Lower the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); True when it took effect."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss() <= current_rss() + 4 * MIB


def measure_cuda(method: Method, logits: torch.Tensor, tokens: torch.Tensor, repeats: int) -> dict:
    timed_call(method, logits, tokens)  # warm-up: kernels, caches, autotuning stay out of the memory figure
    device = logits.device
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = method(logits, tokens)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    times = [timed_call(method, logits, tokens) for _ in range(repeats)]
    return {"peak_extra_bytes": peak, "times_s": times, "time_s": statistics.median(times)}


def worker(args: argparse.Namespace) -> None:
    """One (method, V, dtype) on CPU in a fresh process: peak RSS increase of one call, then timing."""
    device = torch.device("cpu")
    methods, _ = get_methods(with_trl=args.worker == "trl")
    method = methods[args.worker]
    logits, tokens = make_inputs(args.vocab[0], args.batch, args.seq, DTYPES[args.dtypes[0]], device, args.seed)
    with torch.no_grad():
        method(logits[:1, :WARMUP_POSITIONS], tokens[:1, :WARMUP_POSITIONS])
        reset = reset_peak_rss()
        before = current_rss()
        start = time.perf_counter()
        out = method(logits, tokens)  # the memory call doubles as the full-size warm-up
        first = time.perf_counter() - start
        peak = peak_rss() - before
        del out
        times = [timed_call(method, logits, tokens) for _ in range(args.repeats)]
    result = {
        "peak_extra_bytes": peak,
        "rss_before_bytes": before,
        "peak_rss_reset": reset,
        "first_call_s": first,
        "times_s": times,
        "time_s": statistics.median(times),
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_worker(method: str, vocab: int, dtype: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--vocab", str(vocab)]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--dtypes", dtype]
    cmd += ["--repeats", str(args.repeats), "--seed", str(args.seed), "--device", "cpu"]
    cmd += ["--threads", str(torch.get_num_threads())]
    # glibc raises its mmap threshold after large frees and then serves big buffers from the heap, whose
    # freed pages stay resident: peak RSS would count dead buffers. A fixed threshold returns every large
    # buffer to the OS on free, for every method alike, so RSS tracks live memory. Fixing it also fixes
    # the heap's trim threshold (128 KiB), which would hand the heap back to the OS after every small
    # free and fault it in again (glibc's default raises that threshold too): keep the heap instead.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 28)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited with {proc.returncode}: {' | '.join(tail)}"}


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    return proc_kib("/proc/meminfo", "MemAvailable")


def estimated_bytes(vocab: int, positions: int, dtype: torch.dtype) -> int:
    """The largest footprint of a size: naive's logits plus log_softmax, its exp and their product in float32."""
    return positions * vocab * (dtype.itemsize + 3 * 4) + positions * 16


# --------------------------------------------------------------------------- check, report


def check(methods: dict[str, Method], logits: torch.Tensor, tokens: torch.Tensor, dtype: str) -> dict:
    """Every method against naive at the size's tolerance; klcore's verdict gates nothing, it is printed."""
    tol = TOLERANCE[dtype]
    ref_lp, ref_ent = naive(logits, tokens)
    result = {}
    for name, method in methods.items():
        if name == "naive":
            continue
        lp, ent = (t.float() for t in method(logits, tokens))
        result[name] = {
            "ok": bool(
                torch.allclose(lp, ref_lp, rtol=tol, atol=tol) and torch.allclose(ent, ref_ent, rtol=tol, atol=tol)
            ),
            "max_abs_diff_logprob": (lp - ref_lp).abs().max().item(),
            "max_abs_diff_entropy": (ent - ref_ent).abs().max().item(),
        }
        del lp, ent
    return result


def ratio(results: dict, name: str, ref: str, key: str) -> float | None:
    a, b = results.get(name, {}), results.get(ref, {})
    if key not in a or key not in b or not b[key]:
        return None
    return a[key] / b[key]


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def targets(results: dict) -> list[dict]:
    rows = [
        ("klcore peak extra memory <= 0.25x naive", "naive", "peak_extra_bytes", TARGET_MEMORY_VS_NAIVE),
        ("klcore time <= 1.1x naive", "naive", "time_s", TARGET_TIME_VS_NAIVE),
        ("klcore time <= trl", "trl", "time_s", 1.0),
        ("klcore peak extra memory <= trl", "trl", "peak_extra_bytes", 1.0),
    ]
    out = []
    for label, ref, key, limit in rows:
        value = ratio(results, "klcore", ref, key)
        verdict = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
        out.append({"target": label, "ratio": value, "limit": limit, "verdict": verdict})
    return out


def print_table(results: dict) -> None:
    head = f"  {'method':<8} {'time ms':>10} {'peak extra MiB':>15} {'time/naive':>11} {'mem/naive':>10}"
    print(head + f" {'time/trl':>9} {'mem/trl':>8}")
    for name, res in results.items():
        if "error" in res:
            print(f"  {name:<8} error: {res['error']}")
            continue
        line = f"  {name:<8} {res['time_s'] * 1e3:>10.2f} {res['peak_extra_bytes'] / MIB:>15.1f}"
        line += f" {fmt_ratio(ratio(results, name, 'naive', 'time_s')):>11}"
        line += f" {fmt_ratio(ratio(results, name, 'naive', 'peak_extra_bytes')):>10}"
        vs_trl = name == "klcore"
        line += f" {fmt_ratio(ratio(results, name, 'trl', 'time_s') if vs_trl else None):>9}"
        line += f" {fmt_ratio(ratio(results, name, 'trl', 'peak_extra_bytes') if vs_trl else None):>8}"
        print(line)


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "peak extra = torch.cuda.max_memory_allocated() - memory_allocated() with the inputs alive, "
            "over one call after a warm-up call (outputs included)"
        )
    reset = "available" if reset_peak_rss() else "NOT available: earlier transient peaks may mask smaller ones"
    return (
        "peak extra = peak RSS (VmHWM, else ru_maxrss) - RSS (/proc/self/statm) after inputs, over one call, "
        "each (method, V, dtype) "
        f"in a fresh subprocess after an 8-position warm-up; peak-RSS reset via /proc/self/clear_refs {reset}. "
        "CPU figures are RSS-based approximations (outputs included); the memory call is the full-size warm-up"
    )


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def bench_size(
    vocab: int, dtype: str, methods: dict[str, Method], device: torch.device, args: argparse.Namespace
) -> dict:
    torch_dtype = DTYPES[dtype]
    positions = args.batch * args.seq
    entry: dict = {"vocab": vocab, "dtype": dtype, "batch": args.batch, "seq": args.seq}
    print(f"\n== V={vocab}  dtype={dtype}  tokens={args.batch}x{args.seq}")
    need, free = estimated_bytes(vocab, positions, torch_dtype), available_bytes(device)
    if free is not None and need > MEMORY_FRACTION[device.type] * free:
        entry["skipped"] = (
            f"needs ~{need / 2**30:.1f} GiB (logits + naive's three float32 copies), more than "
            f"{MEMORY_FRACTION[device.type]:.0%} of the {free / 2**30:.1f} GiB available on {device.type}"
        )
        print(f"  skipped: {entry['skipped']}")
        return entry

    logits, tokens = make_inputs(vocab, args.batch, args.seq, torch_dtype, device, args.seed)
    entry["check"] = check(methods, logits, tokens, dtype)
    parts = []
    for name, res in entry["check"].items():
        verdict = "ok" if res["ok"] else "MISMATCH"
        parts.append(
            f"{name} {verdict} (max |diff| logprob {res['max_abs_diff_logprob']:.2e}, "
            f"entropy {res['max_abs_diff_entropy']:.2e})"
        )
    print(f"  check vs naive (rtol=atol={TOLERANCE[dtype]:g}): " + "; ".join(parts))

    results: dict[str, dict] = {}
    if device.type == "cuda":
        for name, method in methods.items():
            results[name] = measure_cuda(method, logits, tokens, args.repeats)
        del logits, tokens
        torch.cuda.empty_cache()
    else:
        del logits, tokens  # the workers build their own copies
        for name in methods:
            results[name] = run_worker(name, vocab, dtype, args)
    entry["methods"] = results
    print_table(results)
    entry["targets"] = targets(results)
    for t in entry["targets"]:
        shown = "" if t["ratio"] is None else f" ({t['ratio']:.2f}x)"
        if t["verdict"] == "n/a" and "trl" in t["target"] and "trl" not in methods:
            shown = " (trl not available)"
        print(f"  target {t['target']:<40} {t['verdict']}{shown}")
    return entry


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", help=f"vocabulary sizes (default {SPEC_VOCABS})")
    p.add_argument("--batch", type=int, help=f"batch size B (default {SPEC_BATCH})")
    p.add_argument("--seq", type=int, help=f"sequence length T (default {SPEC_SEQ})")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up; the median is reported")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")
    p.add_argument("--json", type=Path, help="write every result to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads for every process (default: torch's own)")
    p.add_argument("--quick", action="store_true", help=f"tiny smoke size: V={QUICK_VOCABS}, {QUICK_BATCH}x{QUICK_SEQ}")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one CPU measurement in a fresh process
    args = p.parse_args(argv)
    args.vocab = args.vocab or (QUICK_VOCABS if args.quick else SPEC_VOCABS)
    args.batch = args.batch or (QUICK_BATCH if args.quick else SPEC_BATCH)
    args.seq = args.seq or (QUICK_SEQ if args.quick else SPEC_SEQ)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    methods, trl_line = get_methods()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    print("klcore.logprobs.token_logprobs_and_entropy vs naive log_softmax (and trl), torch.no_grad()")
    print(f"device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"klcore {version('klcore')}; {trl_line}")
    print(f"sizes: V={args.vocab}, B x T = {args.batch} x {args.seq}, dtypes {args.dtypes}, seed {args.seed}")
    print(f"time: median of {args.repeats} calls after one warm-up, time.perf_counter (CUDA synchronized)")
    print(f"memory: {memory_note(device)}")
    print(
        f"targets: klcore memory <= {TARGET_MEMORY_VS_NAIVE}x naive, time <= {TARGET_TIME_VS_NAIVE}x naive, "
        "time and memory <= trl"
    )

    entries = []
    with torch.no_grad():
        for vocab in args.vocab:
            for dtype in args.dtypes:
                entries.append(bench_size(vocab, dtype, methods, device, args))

    verdicts = [t["verdict"] for e in entries for t in e.get("targets", [])]
    checks = [c["ok"] for e in entries for n, c in e.get("check", {}).items() if n == "klcore"]
    print(
        f"\nsummary: klcore check {'ok' if all(checks) else 'MISMATCH'} on {len(checks)} size(s); targets "
        f"{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, {verdicts.count('n/a')} n/a; "
        f"{sum('skipped' in e for e in entries)} size(s) skipped"
    )
    if args.json:
        report = {
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
            "klcore": version("klcore"),
            "trl": trl_line,
            "threads": torch.get_num_threads(),
            "memory_method": memory_note(device),
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
            "results": entries,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
