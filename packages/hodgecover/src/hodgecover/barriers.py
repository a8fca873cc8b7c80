"""Merge barriers on a Hugging Face MoE model, with a cached prefix, batched merges and a resumable disk cache.

``b_A = (1/|D|) sum_t KL(p_orig(.|x_<t) || p_A(.|x_<t))`` (direction configurable) where ``p_A`` is the model
with every expert slot of ``A`` (one MoE layer) overwritten by the frequency-weighted merge of ``A``.

Speed: one calibration forward pass caches each MoE layer's input hidden states (and the decoder's keyword
arguments: rotary embeddings, mask); a merge at layer ``l`` re-runs only layers ``l..L``, several merges are
stacked along the batch for layers ``l+1..L``, and the KL is computed in float32 over chunks of positions so
that no ``[positions, V]`` float32 copy of all positions is built. Weights are restored bit-exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn
from tqdm.auto import tqdm

from hodgecover.moe import MoELayer, decoder_of, find_moe_layers, merged
from klcore.divergences import kl
from klcore.errors import CheckpointError, ConfigError, DataError, DTypeError, NonFiniteError, ShapeError

KL_DIRECTIONS = ("forward", "reverse")


@dataclass
class BarrierConfig:
    """``kl_direction``: ``forward`` = KL(original || merged) (assumed by the notes), ``reverse`` = KL(merged ||
    original). ``merges_per_pass``: merges stacked along the batch in one suffix pass. ``positions_per_chunk``:
    positions per float32 logits chunk of the KL. ``batch_size``: calibration sequences per forward pass."""

    kl_direction: str = "forward"
    merges_per_pass: int = 8
    positions_per_chunk: int = 1024
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        if self.kl_direction not in KL_DIRECTIONS:
            raise ConfigError(f"kl_direction must be one of {KL_DIRECTIONS}, got {self.kl_direction!r}")
        for name in ("merges_per_pass", "positions_per_chunk", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass
class LayerStats:
    """Calibration statistics of one MoE layer (``E`` experts, hidden ``H``, expert width ``I``).

    ``frequencies [E]``: share of tokens routing to each expert (top-k hits / tokens). ``reap [E]``: REAP
    saliency, mean over routed tokens of ``gate weight * ||expert output||_2`` (0 if never routed).
    ``input_sq [E, H]`` and ``hidden_sq [E, I]``: per-expert sums of squared inputs of ``gate_up_proj`` and of
    ``down_proj`` over routed tokens (Wanda's ``||X_b||^2``). ``mean_output [E, H]``: each expert's output averaged
    over all calibration tokens, routed or not (HC-SMoE's clustering feature). ``linear_input_sq``: the same for each plain
    ``nn.Linear`` inside the block (a shared expert), keyed by its name in the block, over all tokens.
    """

    frequencies: torch.Tensor
    reap: torch.Tensor
    input_sq: torch.Tensor
    hidden_sq: torch.Tensor
    mean_output: torch.Tensor
    linear_input_sq: dict[str, torch.Tensor] = field(default_factory=dict)


class BarrierCache:
    """Barriers on disk keyed by ``layer:i,j[,k]``; refuses another run's cache.

    The file is a JSON-lines log: a header line ``{"fingerprint": ...}``, then one ``{"values": {...}}`` line
    appended per batch of merges (O(batch) I/O each). A truncated last line (an interrupted append) is dropped
    on load. ``compact`` rewrites the log atomically as one line holding every value.
    """

    def __init__(self, path: str | Path | None, fingerprint: str) -> None:
        self.path = Path(path) if path else None
        self.fingerprint = fingerprint
        self.values: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise CheckpointError(f"barrier cache {path} is unreadable ({err}); delete it to start over") from err
        records = []
        for n, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if n == len(lines) - 1 and n > 0:  # an append cut short: drop it and rewrite the file
                    break
                raise CheckpointError(f"barrier cache {path} line {n + 1} is corrupt ({err}); delete it to start "
                                      "over") from err
        if not records or not isinstance(records[0], dict) or records[0].get("fingerprint") != self.fingerprint:
            found = records[0].get("fingerprint") if records and isinstance(records[0], dict) else None
            raise CheckpointError(
                f"barrier cache {path} was computed for another model, calibration set or KL direction "
                f"(fingerprint {found!r}, expected {self.fingerprint!r}); use another path or delete it"
            )
        dropped = 0
        for record in records:
            for k, v in record.get("values", {}).items():
                if v is None or not math.isfinite(float(v)):  # written by an older version: recompute it
                    dropped += 1
                    self.values.pop(k, None)
                else:
                    self.values[k] = float(v)
        if len(records) < len(lines) or dropped:
            self.compact()

    @staticmethod
    def key(layer: int, members: Sequence[int]) -> str:
        return f"{layer}:" + ",".join(str(m) for m in sorted(members))

    def add(self, values: dict[str, float]) -> None:
        """Record ``values`` and append them to the log as one line (header first if the file is new)."""
        self.values.update(values)
        if self.path is None:
            return
        if not self.path.exists():
            self.compact()
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"values": values}) + "\n")
            f.flush()

    def compact(self) -> None:
        """Rewrite the log atomically (tmp file, rename) as the header plus one line with every value."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "values": self.values}) + "\n")
        os.replace(tmp, self.path)


FINGERPRINT_SAMPLES = 1 << 16


@torch.no_grad()
def weight_fingerprint(state_dict: dict[str, torch.Tensor], samples: int = FINGERPRINT_SAMPLES) -> str:
    """SHA-256 over every tensor's name, shape and dtype, its values at ``samples`` evenly strided flat positions
    (all of them for smaller tensors), its slice sums along dim 0 (one number per expert, row or channel) and its
    sum and sum of squares. Reordering experts (dim 0 of ``[E, ...]``) or rows changes the strided samples and the
    slice sums, so a permuted model does not collide; the reductions run where the tensor lives (float64, float32
    on MPS) and only ``samples + shape[0] + 2`` numbers per tensor cross to the CPU."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        x = t.detach()
        acc = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
        x = x.to(acc)
        flat = x.reshape(-1)
        if flat.numel() > samples:
            flat = flat[torch.linspace(0, flat.numel() - 1, samples, device=flat.device).long()]
        parts = [flat, torch.stack([x.sum(), x.square().sum()])]
        if x.dim() >= 2:
            parts.append(x.reshape(x.shape[0], -1).sum(1))
        h.update(torch.cat([p.reshape(-1) for p in parts]).cpu().double().numpy().tobytes())
    return h.hexdigest()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block; every submodule's previous ``training`` flag is restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _expand(value: Any, batch: int, copies: int) -> Any:
    """Repeat every tensor whose dim 0 is the batch ``copies`` times along dim 0 (tuples recursively)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(_expand(v, batch, copies) for v in value)
    return value


class BarrierEngine:
    """Merge barriers of one model on one calibration set ``tokens [N, T]`` (int64, no padding).

    Builds the prefix cache and the per-layer statistics at construction (one forward pass). ``cache_path``
    makes barriers resumable: values already on disk are not recomputed.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        config: BarrierConfig | None = None,
        *,
        cache_path: str | Path | None = None,
    ) -> None:
        self.config = config or BarrierConfig()
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.numel() == 0:
            raise ShapeError(f"tokens must be a non-empty [N, T] tensor, got {getattr(tokens, 'shape', type(tokens))}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise DTypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        vocab = model.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
        if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
            raise DataError(f"token ids must lie in [0, {vocab}) for this model, got range "
                            f"[{int(tokens.min())}, {int(tokens.max())}]")
        self.model: Any = model
        self.decoder = decoder_of(model)
        self.moe_layers = find_moe_layers(model)
        self.by_index = {m.index: m for m in self.moe_layers}
        device = next(model.parameters()).device
        self.tokens = tokens.to(device=device, dtype=torch.long)
        self.head: Any = model.get_output_embeddings()  # type: ignore[operator]
        self.inputs: dict[int, list[torch.Tensor]] = {m.index: [] for m in self.moe_layers}
        self.block_inputs: dict[int, list[torch.Tensor]] = {m.index: [] for m in self.moe_layers}
        self.layer_kwargs: dict[int, list[dict[str, Any]]] = {}
        self.final_hidden: list[torch.Tensor] = []
        self.linear_sq: dict[int, dict[str, torch.Tensor]] = {m.index: {} for m in self.moe_layers}
        self._capture()
        self.stats = {m.index: self._layer_stats(m) for m in self.moe_layers}
        self.cache = BarrierCache(cache_path, self._fingerprint())
        self.evaluations = 0

    # ------------------------------------------------------------------ capture
    @torch.no_grad()
    def _capture(self) -> None:
        hooks = []

        def layer_hook(idx: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if idx in self.inputs:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    self.inputs[idx].append(hidden.detach().clone())
                self.layer_kwargs.setdefault(idx, []).append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hook

        def block_hook(idx: int):
            def hook(module: nn.Module, args: tuple) -> None:
                self.block_inputs[idx].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
            return hook

        def linear_hook(idx: int, name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                acc = self.linear_sq[idx]
                acc[name] = acc.get(name, torch.zeros(x.shape[-1], device=x.device)) + (x * x).sum(0)
            return hook

        for idx, layer in enumerate(self.decoder.layers):
            hooks.append(layer.register_forward_pre_hook(layer_hook(idx), with_kwargs=True))
        for m in self.moe_layers:
            hooks.append(m.block.register_forward_pre_hook(block_hook(m.index)))
            for name, sub in m.block.named_modules():
                if isinstance(sub, nn.Linear) and not name.startswith("gate") and sub.out_features > 1:
                    hooks.append(sub.register_forward_pre_hook(linear_hook(m.index, name)))
        hooks.append(self.decoder.norm.register_forward_pre_hook(
            lambda module, args: self.final_hidden.append(args[0].detach().clone())))
        try:
            with _eval_mode(self.model):
                for chunk in self.tokens.split(self.config.batch_size):
                    self.model(input_ids=chunk, use_cache=False)
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def _layer_stats(self, moe: MoELayer) -> LayerStats:
        with _eval_mode(self.model):
            return self._layer_stats_eval(moe)

    def _layer_stats_eval(self, moe: MoELayer) -> LayerStats:
        x_all = torch.cat(self.block_inputs[moe.index])
        e = moe.num_experts
        gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
        inter = down.shape[-1]
        counts = torch.zeros(e, dtype=torch.float64)
        reap_sum = torch.zeros(e, dtype=torch.float64)
        input_sq = torch.zeros(e, x_all.shape[-1])
        hidden_sq = torch.zeros(e, inter)
        out_sum = torch.zeros(e, x_all.shape[-1], dtype=torch.float64)
        for x in x_all.split(4096):
            _, weights, index = moe.router(x)
            for j in range(e):
                g, u = nn.functional.linear(x, gate_up[j]).chunk(2, dim=-1)
                act_all = moe.experts.act_fn(g) * u
                out_all = nn.functional.linear(act_all, down[j])
                out_sum[j] += out_all.double().sum(0).cpu()
                tok, slot = torch.where(index == j)
                if tok.numel() == 0:
                    continue
                act, out = act_all[tok], out_all[tok]
                counts[j] += tok.numel()
                reap_sum[j] += (weights[tok, slot].double() * out.double().norm(dim=-1)).sum().cpu()
                input_sq[j] += (x[tok].float() ** 2).sum(0).cpu()
                hidden_sq[j] += (act.float() ** 2).sum(0).cpu()
        tokens = x_all.shape[0]
        reap = torch.where(counts > 0, reap_sum / counts.clamp_min(1), torch.zeros_like(reap_sum))
        return LayerStats(
            frequencies=(counts / tokens).float(), reap=reap.float(), input_sq=input_sq, hidden_sq=hidden_sq,
            mean_output=(out_sum / tokens).float(),
            linear_input_sq={k: v.cpu() for k, v in self.linear_sq[moe.index].items()},
        )

    @torch.no_grad()
    def _fingerprint(self) -> str:
        """Hash of the tokens, KL direction, model config JSON and every ``state_dict`` tensor; see
        ``weight_fingerprint``."""
        h = hashlib.sha256()
        h.update(self.tokens.cpu().numpy().tobytes())
        h.update(self.config.kl_direction.encode())
        config = getattr(self.model, "config", None)
        to_json = getattr(config, "to_json_string", None)
        h.update((to_json(use_diff=False) if to_json is not None else "").encode())
        h.update(weight_fingerprint(self.model.state_dict()).encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ evaluation
    def _suffix(self, start: int, hidden: torch.Tensor, chunk: int, copies: int) -> torch.Tensor:
        """Run decoder layers ``start..`` on ``hidden`` (``copies`` stacked copies of calibration batch ``chunk``);
        the final hidden state before the norm."""
        batch = hidden.shape[0] // copies
        for idx in range(start, len(self.decoder.layers)):
            kw = {k: _expand(v, batch, copies) for k, v in self.layer_kwargs[idx][chunk].items()}
            out = self.decoder.layers[idx](hidden, **kw)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _mean_kl(self, reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, int]:
        """Sum over positions of the KL between next-token distributions of two final hidden states, and count."""
        ref = reference.reshape(-1, reference.shape[-1])
        cand = candidate.reshape(-1, candidate.shape[-1])
        total = 0.0
        for r, c in zip(ref.split(self.config.positions_per_chunk), cand.split(self.config.positions_per_chunk)):
            lr, lc = self.head(self.decoder.norm(r)), self.head(self.decoder.norm(c))
            pair = (lr, lc) if self.config.kl_direction == "forward" else (lc, lr)
            total += float(kl(*pair).double().sum())
        return total, ref.shape[0]

    @torch.no_grad()
    def _evaluate(self, moe: MoELayer, merges: list[tuple[int, ...]]) -> list[float]:
        """Barrier of each merge of one layer (a set with a repeated expert merges it with itself)."""
        with _eval_mode(self.model):
            return self._evaluate_eval(moe, merges)

    def _evaluate_eval(self, moe: MoELayer, merges: list[tuple[int, ...]]) -> list[float]:
        sums = [0.0] * len(merges)
        count = 0
        start = moe.index
        freq = self.stats[moe.index].frequencies
        for b, hidden_in in enumerate(self.inputs[start]):
            kwargs = self.layer_kwargs[start][b]
            outs = []
            for members in merges:
                with merged(moe, members, freq):
                    out = self.decoder.layers[start](hidden_in, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
            final = self._suffix(start + 1, torch.cat(outs), b, len(merges))
            for m, cand in enumerate(final.split(hidden_in.shape[0])):
                s, n = self._mean_kl(self.final_hidden[b], cand)
                sums[m] += s
            count += n
        return [max(s / count, 0.0) for s in sums]

    def barriers(self, layer: int, sets: Sequence[Sequence[int]], *, desc: str = "barriers") -> np.ndarray:
        """Barrier of each expert set (one MoE layer, given by its decoder layer index) ``[len(sets)]`` float64.

        A set of one expert is the unmerged model: its barrier is 0 without evaluation.
        """
        if layer not in self.by_index:
            raise ConfigError(f"layer {layer} is not an MoE layer; MoE layers: {sorted(self.by_index)}")
        moe = self.by_index[layer]
        keys = []
        for s in sets:
            members = tuple(sorted({int(v) for v in s}))
            if not members or members[0] < 0 or members[-1] >= moe.num_experts:
                raise DataError(f"expert set {tuple(s)!r} must be non-empty with indices in 0..{moe.num_experts - 1}")
            keys.append(members)
        todo = [k for k in dict.fromkeys(keys) if len(k) > 1 and BarrierCache.key(layer, k) not in self.cache.values]
        step = self.config.merges_per_pass
        batches = [todo[i:i + step] for i in range(0, len(todo), step)]
        try:
            for batch in tqdm(batches, desc=f"{desc} layer {layer}", disable=not self.config.progress or not batches):
                values = self._evaluate(moe, batch)
                finite = {BarrierCache.key(layer, m): v for m, v in zip(batch, values) if math.isfinite(v)}
                self.cache.add(finite)  # a non-finite barrier is never cached: a re-run recomputes it
                self.evaluations += len(batch)
                bad = [m for m, v in zip(batch, values) if not math.isfinite(v)]
                if bad:
                    raise NonFiniteError(
                        f"layer {layer}: merging experts {bad[0]} gives a non-finite barrier (NaN or inf logits; "
                        f"{len(bad)} of this batch). Non-finite values are never cached, so the cache stays usable and a "
                        "re-run recomputes only them; load the model in float32 (--set dtype=float32) or check its "
                        "weights for NaN/inf (a changed model needs a fresh cache path)"
                    )
        finally:
            if batches:
                self.cache.compact()
        return np.array([0.0 if len(k) == 1 else self.cache.values[BarrierCache.key(layer, k)] for k in keys])

    def pair_barriers(self, layer: int) -> tuple[list[tuple[int, int]], np.ndarray]:
        """All ``C(E, 2)`` pairs ``(i, j)``, ``i < j``, in lexicographic order, and their barriers."""
        pairs = list(itertools.combinations(range(self.by_index[layer].num_experts), 2))
        return pairs, self.barriers(layer, pairs, desc="pairs")

    def triplet_barriers(self, layer: int, triangles: Sequence[tuple[int, int, int]]) -> np.ndarray:
        return self.barriers(layer, triangles, desc="triplets")


def _cliques(n: int, edges: set[tuple[int, int]]) -> np.ndarray:
    """``[T, 3]`` int64: every 3-clique ``i < j < k`` of the graph on ``0..n-1``, lexicographic."""
    adj = np.zeros((n, n), dtype=bool)
    for i, j in edges:
        adj[i, j] = adj[j, i] = True
    out = []
    for i, j in sorted(edges):
        ks = np.flatnonzero(adj[i, j + 1:] & adj[j, j + 1:]) + j + 1
        out.append(np.stack([np.full(len(ks), i), np.full(len(ks), j), ks], 1))
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 3), dtype=np.int64)


def candidate_triangles(
    edges: Sequence[tuple[int, int]], values: ArrayLike, *, cap: int = 500, seed: int = 0,
    quantile: float = 0.5, levels: int | None = None,
) -> list[tuple[int, int, int]]:
    """Candidate triangles for the filtration, sorted.

    ``levels=None`` (the paper's rule): 3-cliques of the graph of edges with barrier <= the ``quantile`` (median by
    default) of ``values``, a seeded random subset of ``cap`` when there are more. ``levels=L``: 3-cliques of the
    whole graph, stratified by the level at which their three edges are present (the largest edge barrier, in
    ``L`` equal-width bins over ``values``): the ``cap`` is shared evenly by the bins (a bin with fewer triangles
    passes its share on), so every threshold of the filtration has triangles that can fill its cycles. Within a bin
    the picks are evenly spaced in the order of (level, sum of edge barriers, smallest edge barrier), which does not
    depend on how the experts are numbered (``seed`` is used by the ``levels=None`` rule only).
    """
    if cap < 0 or not 0.0 < quantile <= 1.0 or (levels is not None and levels < 1):
        raise ConfigError(f"need cap >= 0, quantile in (0, 1] and levels >= 1, got cap={cap}, quantile={quantile}, "
                          f"levels={levels}")
    vals = np.asarray(values, dtype=float).reshape(-1)
    if vals.shape != (len(edges),):
        raise ShapeError(f"need one barrier value per edge: got {vals.shape[0]} values for {len(edges)} edges; "
                         "pass the pairs and the barriers returned together by pair_barriers")
    if vals.size == 0:
        return []
    rng = np.random.default_rng(seed)
    sorted_edges = [tuple(sorted(e)) for e in edges]
    n = max(max(e) for e in sorted_edges) + 1
    if levels is None:
        cut = np.quantile(vals, quantile)
        tris = _cliques(n, {e for e, v in zip(sorted_edges, vals) if v <= cut})  # type: ignore[misc]
        if len(tris) > cap:
            tris = tris[np.sort(rng.choice(len(tris), size=cap, replace=False))]
        return [tuple(int(v) for v in t) for t in tris]  # type: ignore[misc]
    tris = _cliques(n, set(sorted_edges))  # type: ignore[arg-type]
    if len(tris) <= cap:
        return [tuple(int(v) for v in t) for t in tris]  # type: ignore[misc]
    value = np.full((n, n), -np.inf)
    for (i, j), v in zip(sorted_edges, vals):
        value[i, j] = max(value[i, j], v)
    faces = np.stack([value[tris[:, 0], tris[:, 1]], value[tris[:, 0], tris[:, 2]], value[tris[:, 1], tris[:, 2]]])
    level = faces.max(0)
    # within a bin, triangles in order of (level, edge sum, smallest edge): a numbering-free order
    order = np.lexsort((faces.min(0), faces.sum(0), level))
    edges_of_bins = np.linspace(vals.min(), vals.max(), levels + 1)[1:-1]
    bin_of = np.digitize(level[order], edges_of_bins, right=True)
    bins = [order[bin_of == b] for b in range(levels)]
    chosen, left = [], cap
    for rank, b in enumerate(sorted(range(levels), key=lambda b: len(bins[b]))):  # smallest bins first
        take = min(left // (levels - rank), len(bins[b]))
        chosen.append(bins[b][np.round(np.linspace(0, len(bins[b]) - 1, take)).astype(np.int64)] if take else
                      bins[b][:0])
        left -= take
    picked = np.sort(np.concatenate(chosen))
    return [tuple(int(v) for v in t) for t in tris[picked]]  # type: ignore[misc]


__all__ = [
    "FINGERPRINT_SAMPLES",
    "KL_DIRECTIONS",
    "BarrierCache",
    "BarrierConfig",
    "BarrierEngine",
    "LayerStats",
    "candidate_triangles",
    "weight_fingerprint",
]
