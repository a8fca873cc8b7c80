"""Simplicial 2-complexes, boundary matrices, Hodge Laplacians, Betti numbers and the Hodge decomposition.

Orientation convention (fixed, as in the method notes): every edge is stored as ``(i, j)`` with ``i < j``
and oriented from ``i`` to ``j``; every triangle as ``(i, j, k)`` with ``i < j < k``. Edges and
triangles are sorted lexicographically. An edge signal is a mapping ``{(i, j): value}`` keyed by edge (a key with
``i > j`` is a flow from ``i`` to ``j``, stored negated) or an array in the order of ``SimplicialComplex.edges``,
accepted only when the complex kept the order it was given. With this convention

* ``B1[i, e] = -1``, ``B1[j, e] = +1`` for ``e = (i, j)``  (shape ``[n, |E|]``),
* ``B2[(j,k), t] = +1``, ``B2[(i,k), t] = -1``, ``B2[(i,j), t] = +1``  (shape ``[|E|, |T|]``),

so ``B1 @ B2 == 0``. A barrier is an unsigned quantity, so its energy split depends on which way each edge points;
the pipeline therefore orients the barrier by a property of the experts (``orientation.edge_orientation``) and passes
the signed signal here, so the storage convention itself never shapes the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import lsmr, lsqr

from hodgecover.extras import MissingExtraError
from klcore.errors import ConfigError, DataError, NonFiniteError, ShapeError

Solver = Literal["auto", "lsqr", "lsmr", "dense"]
FiltrationMode = Literal["joint", "triangles"]
Backend = Literal["auto", "gudhi", "exact"]
BACKENDS = ("auto", "gudhi", "exact")
SOLVERS = ("auto", "lsqr", "lsmr", "dense")
FILTRATION_MODES = ("joint", "triangles")
_DENSE_MAX_COLUMNS = 64


def _members(raw: object, name: str) -> list[object]:
    try:
        return list(raw)  # type: ignore[call-overload]
    except TypeError as err:
        raise DataError(f"a {name} must be a sequence of vertex indices, got {raw!r}") from err


def _vertex(value: object, name: str, raw: object) -> int:
    """``value`` as a vertex index; ``DataError`` naming the simplex when it is not an integer."""
    try:
        index = int(value)  # type: ignore[call-overload]
        integral = bool(index == value)
    except (TypeError, ValueError):
        integral = False
    if not integral:
        raise DataError(f"{name} {raw!r} has a vertex {value!r} that is not an integer index; give integer indices")
    return index


class SimplicialComplex:
    """A simplicial 2-complex on vertices ``0..num_vertices-1``.

    ``edges`` are vertex pairs and ``triangles`` vertex triples in any order and orientation; they are
    stored sorted, each oriented from low to high index. Every edge of a triangle must be an edge.
    """

    def __init__(
        self, num_vertices: int, edges: Iterable[Sequence[int]] = (), triangles: Iterable[Sequence[int]] = ()
    ) -> None:
        if int(num_vertices) != num_vertices or num_vertices < 1:
            raise DataError(f"num_vertices must be a positive integer, got {num_vertices!r}")
        self.num_vertices = int(num_vertices)
        edges = list(edges)
        self.edges: list[tuple[int, int]] = self._simplices(edges, 2, "edge")  # type: ignore[assignment]
        # whether a signal given as a plain array in the caller's edge order is already in the stored order
        self.edge_order_kept = [tuple(_members(e, "edge")) for e in edges] == self.edges
        self.triangles: list[tuple[int, int, int]] = self._simplices(triangles, 3, "triangle")  # type: ignore[assignment]
        self.edge_index: dict[tuple[int, int], int] = {e: k for k, e in enumerate(self.edges)}
        for t in self.triangles:
            for e in ((t[0], t[1]), (t[0], t[2]), (t[1], t[2])):
                if e not in self.edge_index:
                    raise DataError(
                        f"triangle {t} has edge {e} that is not in the edge list; add the edge or drop the triangle"
                    )

    def _simplices(self, items: Iterable[Sequence[int]], size: int, name: str) -> list[tuple[int, ...]]:
        out: set[tuple[int, ...]] = set()
        for raw in items:
            s = tuple(sorted(_vertex(v, name, raw) for v in _members(raw, name)))
            if len(s) != size or len(set(s)) != size:
                raise DataError(f"a {name} needs {size} distinct vertices, got {tuple(raw)!r}")
            if s[0] < 0 or s[-1] >= self.num_vertices:
                raise DataError(f"{name} {tuple(raw)!r} has a vertex outside 0..{self.num_vertices - 1}")
            out.add(s)
        return sorted(out)

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    @property
    def num_triangles(self) -> int:
        return len(self.triangles)

    def boundary(self, k: int) -> sp.csr_matrix:
        """Signed boundary matrix: ``k=1`` gives ``B1 [n, |E|]``, ``k=2`` gives ``B2 [|E|, |T|]`` (float64)."""
        if k == 1:
            cols = np.repeat(np.arange(self.num_edges), 2)
            rows = np.asarray(self.edges, dtype=np.int64).reshape(-1)
            vals = np.tile([-1.0, 1.0], self.num_edges)
            return sp.csr_matrix((vals, (rows, cols)), shape=(self.num_vertices, self.num_edges))
        if k == 2:
            entries = [
                (self.edge_index[e], t_idx, sign)
                for t_idx, (i, j, m) in enumerate(self.triangles)
                for e, sign in (((j, m), 1.0), ((i, m), -1.0), ((i, j), 1.0))
            ]
            r, c, v = (list(x) for x in zip(*entries)) if entries else ([], [], [])
            return sp.csr_matrix((v, (r, c)), shape=(self.num_edges, self.num_triangles))
        raise ConfigError(f"boundary(k) is defined for k in (1, 2) on a 2-complex, got k={k!r}")

    def laplacian(self, k: int) -> sp.csr_matrix:
        """Hodge Laplacian: ``L0 = B1 B1^T``, ``L1 = B1^T B1 + B2 B2^T``, ``L2 = B2^T B2`` (sparse float64)."""
        if k == 0:
            b1 = self.boundary(1)
            return (b1 @ b1.T).tocsr()
        if k == 1:
            b1, b2 = self.boundary(1), self.boundary(2)
            return (b1.T @ b1 + b2 @ b2.T).tocsr()
        if k == 2:
            b2 = self.boundary(2)
            return (b2.T @ b2).tocsr()
        raise ConfigError(f"laplacian(k) is defined for k in (0, 1, 2), got k={k!r}")

    def betti_numbers(self) -> tuple[int, int, int]:
        """Exact ``(beta0, beta1, beta2)``: components, independent cycles, enclosed voids (ranks over the reals)."""
        beta0 = self._components()
        rank_b1 = self.num_vertices - beta0
        rank_b2 = _rank_of_boundary2(self.boundary(2))
        return beta0, self.num_edges - rank_b1 - rank_b2, self.num_triangles - rank_b2

    def _components(self) -> int:
        if not self.edges:
            return self.num_vertices
        e = np.asarray(self.edges)
        adj = sp.csr_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(self.num_vertices,) * 2)
        return int(connected_components(adj, directed=False)[0])

    def is_complete_graph(self) -> bool:
        return self.num_edges == self.num_vertices * (self.num_vertices - 1) // 2

    def __repr__(self) -> str:
        return f"SimplicialComplex(num_vertices={self.num_vertices}, edges={self.num_edges}, triangles={self.num_triangles})"


def _rank_of_boundary2(b2: sp.csr_matrix) -> int:
    """rank(B2) from the dense block of its non-zero rows (at most ``3|T|`` of them)."""
    if b2.shape[1] == 0:
        return 0
    rows = np.unique(b2.nonzero()[0])
    return int(np.linalg.matrix_rank(b2[rows].toarray()))


@dataclass
class HodgeDecomposition:
    """``signal = gradient + curl + harmonic`` on the edges (each ``[|E|]`` float64).

    ``potential [n]`` and ``circulation [|T|]`` satisfy ``gradient = B1^T potential`` and
    ``curl = B2 circulation``. ``residual`` is ``max(||B1 h||, ||B2^T h||) / max(||signal||, 1e-300)``:
    how far the harmonic part is from the kernel of ``L1`` (0 for an exact solve).
    """

    gradient: np.ndarray
    curl: np.ndarray
    harmonic: np.ndarray
    potential: np.ndarray
    circulation: np.ndarray
    residual: float
    energies: dict[str, float] = field(default_factory=dict)


def as_edge_signal(complex_: SimplicialComplex, edge_signal: object) -> np.ndarray:
    """``[|E|]`` float64 in the order and orientation of ``complex_.edges``.

    A mapping ``{(i, j): value}`` is keyed by edge: ``(i, j)`` with ``i > j`` means the value flows from ``i`` to
    ``j``, stored negated on ``(j, i)``; every edge needs exactly one entry. A plain array is read in the order of
    ``complex_.edges``, and only when that is the order the complex was built with (else ``DataError``).
    """
    if isinstance(edge_signal, Mapping):
        b = np.zeros(complex_.num_edges)
        seen: set[tuple[int, int]] = set()
        for raw, value in edge_signal.items():
            i, j = (_vertex(v, "edge", raw) for v in _members(raw, "edge"))
            key = (min(i, j), max(i, j))
            if key not in complex_.edge_index or key in seen:
                raise DataError(f"edge_signal key {raw!r} is {'repeated' if key in seen else 'not an edge of the complex'}")
            seen.add(key)
            b[complex_.edge_index[key]] = float(value) if i < j else -float(value)  # type: ignore[arg-type]
        if len(seen) != complex_.num_edges:
            missing = [e for e in complex_.edges if e not in seen][:3]
            raise DataError(f"edge_signal has no value for {complex_.num_edges - len(seen)} edges, e.g. {missing}")
    else:
        if hasattr(edge_signal, "detach"):
            edge_signal = edge_signal.detach().cpu().double().numpy()  # type: ignore[attr-defined]
        b = np.asarray(edge_signal, dtype=np.float64)
        if b.shape != (complex_.num_edges,):
            raise ShapeError(
                f"edge_signal has shape {b.shape}, expected ({complex_.num_edges},): one value per edge of the complex, "
                "in the order of complex.edges"
            )
        if not complex_.edge_order_kept:
            raise DataError(
                "the complex sorted or reoriented the edges it was given, so an array edge_signal is ambiguous; pass "
                "a mapping {(i, j): value} (e.g. dict(zip(your_edges, values))) or build the complex from "
                "edges already sorted as (i, j) with i < j"
            )
    if not np.all(np.isfinite(b)):
        raise NonFiniteError("edge_signal holds NaN or infinite values; pass finite barriers")
    return b


def _least_squares(a: sp.csr_matrix, b: np.ndarray, solver: str, tol: float) -> np.ndarray:
    """argmin_x ||a x - b|| (minimum-norm for the dense solver)."""
    if a.shape[1] == 0:
        return np.zeros(0)
    if solver == "dense" or (solver == "auto" and a.shape[1] <= _DENSE_MAX_COLUMNS):
        rows = np.unique(a.nonzero()[0])  # zero rows of a do not change the minimiser
        return np.linalg.lstsq(a[rows].toarray(), b[rows], rcond=None)[0]
    limit = 20 * a.shape[1] + 100
    if solver == "lsmr":
        return lsmr(a, b, atol=tol, btol=tol, maxiter=limit)[0]
    return lsqr(a, b, atol=tol, btol=tol, iter_lim=limit)[0]


def decompose(
    complex_: SimplicialComplex, edge_signal: object, *, solver: Solver = "auto", tol: float = 1e-12
) -> HodgeDecomposition:
    """Hodge decomposition of an edge signal ``[|E|]`` with potentials, residual and energies.

    ``gradient = B1^T phi`` with ``phi = argmin ||B1^T phi - b||`` (closed form ``phi = B1 b / n`` on a complete
    graph), ``curl = B2 psi`` with ``psi = argmin ||B2 psi - b||``, ``harmonic = b - gradient - curl``.
    ``solver``: ``auto`` (closed form on complete graphs, dense least squares up to 64 unknowns, LSQR
    otherwise), ``lsqr``, ``lsmr`` (scipy sparse iterative, tolerance ``tol``) or ``dense`` (numpy ``lstsq``).
    """
    if solver not in SOLVERS:
        raise ConfigError(f"solver must be one of {SOLVERS}, got {solver!r}")
    b = as_edge_signal(complex_, edge_signal)
    b1, b2 = complex_.boundary(1), complex_.boundary(2)
    if solver == "auto" and complex_.is_complete_graph():
        potential = (b1 @ b) / complex_.num_vertices
    else:
        potential = _least_squares(b1.T.tocsr(), b, "lsqr" if solver == "auto" else solver, tol)
    gradient = b1.T @ potential
    circulation = _least_squares(b2, b, solver, tol)
    curl = b2 @ circulation if complex_.num_triangles else np.zeros_like(b)
    harmonic = b - gradient - curl
    scale = max(float(np.linalg.norm(b)), 1e-300)
    residual = max(float(np.linalg.norm(b1 @ harmonic)), float(np.linalg.norm(b2.T @ harmonic))) / scale
    energies = {
        "total": float(b @ b),
        "gradient": float(gradient @ gradient),
        "curl": float(curl @ curl),
        "harmonic": float(harmonic @ harmonic),
    }
    return HodgeDecomposition(gradient, curl, harmonic, potential, circulation, residual, energies)


def hodge_decomposition(
    complex: SimplicialComplex, edge_signal: object, *, solver: Solver = "auto", tol: float = 1e-12
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gradient, curl, harmonic)``, each ``[|E|]`` float64, summing to ``edge_signal``; see ``decompose``."""
    d = decompose(complex, edge_signal, solver=solver, tol=tol)
    return d.gradient, d.curl, d.harmonic


@dataclass
class Filtration:
    """beta numbers of ``K_tau`` over increasing thresholds; ``best_threshold = argmax beta1`` (first maximum)."""

    thresholds: np.ndarray
    beta0: np.ndarray
    beta1: np.ndarray
    beta2: np.ndarray
    mode: str

    @property
    def best_index(self) -> int:
        return int(np.argmax(self.beta1))

    @property
    def best_threshold(self) -> float:
        return float(self.thresholds[self.best_index])


def filtration_complex(
    num_vertices: int,
    edges: Sequence[tuple[int, int]],
    edge_values: ArrayLike,
    triangles: Sequence[tuple[int, int, int]],
    triangle_values: ArrayLike,
    threshold: float,
    *,
    mode: FiltrationMode = "joint",
) -> SimplicialComplex:
    """``K_tau``. ``joint``: edges with value <= tau and candidate triangles with value <= tau whose three edges
    are present. ``triangles``: every edge, and the candidate triangles with value <= tau."""
    if mode not in FILTRATION_MODES:
        raise ConfigError(f"filtration mode must be one of {FILTRATION_MODES}, got {mode!r}")
    ev, tv = np.asarray(edge_values, dtype=np.float64), np.asarray(triangle_values, dtype=np.float64)
    if ev.shape != (len(edges),) or tv.shape != (len(triangles),):
        raise ShapeError(
            f"need one value per edge and per triangle, got {ev.shape} for {len(edges)} edges and "
            f"{tv.shape} for {len(triangles)} triangles"
        )
    kept_edges = [tuple(sorted(e)) for e, v in zip(edges, ev) if mode == "triangles" or v <= threshold]
    present = set(kept_edges)
    kept_triangles = []
    for t, v in zip(triangles, tv):
        i, j, k = sorted(t)
        if v <= threshold and {(i, j), (i, k), (j, k)} <= present:
            kept_triangles.append((i, j, k))
    return SimplicialComplex(num_vertices, kept_edges, kept_triangles)


def _joint_entries(
    edges: Sequence[tuple[int, int]], ev: np.ndarray, triangles: Sequence[tuple[int, int, int]], tv: np.ndarray,
    mode: str, start: float,
) -> tuple[list[tuple[int, int]], np.ndarray, list[tuple[int, int, int]], np.ndarray]:
    """Each simplex with the threshold at which it enters ``K_tau`` (``filtration_complex``'s rule); triangles
    whose edges are not all given never enter and are left out."""
    sorted_edges = [tuple(sorted(e)) for e in edges]
    edge_entry = np.full(len(edges), start) if mode == "triangles" else ev
    entry = dict(zip(sorted_edges, edge_entry))
    tris, t_entry = [], []
    for t, v in zip(triangles, tv):
        i, j, k = sorted(t)
        faces = ((i, j), (i, k), (j, k))
        if all(f in entry for f in faces):
            tris.append((i, j, k))
            t_entry.append(max(float(v), *(float(entry[f]) for f in faces)))
    return sorted_edges, np.asarray(edge_entry, dtype=np.float64), tris, np.asarray(t_entry)  # type: ignore[return-value]


def _betti_curve_gudhi(
    num_vertices: int, edges: list[tuple[int, int]], edge_entry: np.ndarray, triangles: list[tuple[int, int, int]],
    tri_entry: np.ndarray, thresholds: np.ndarray, gudhi: object,
) -> np.ndarray:
    """``[len(thresholds), 3]`` Betti numbers from gudhi's persistence: ``beta_d(tau)`` counts the intervals of
    dimension ``d`` born at or before ``tau`` that die after it."""
    tree = gudhi.SimplexTree()  # type: ignore[attr-defined]
    floor = float(thresholds[0]) - 1.0
    for v in range(num_vertices):
        tree.insert([v], filtration=floor)
    for (i, j), f in zip(edges, edge_entry):
        tree.insert([i, j], filtration=float(f))
    for t, f in zip(triangles, tri_entry):
        tree.insert(list(t), filtration=float(f))
    tree.compute_persistence(homology_coeff_field=11, persistence_dim_max=True)
    out = np.zeros((len(thresholds), 3), dtype=np.int64)
    for d in range(3):
        iv = np.asarray(tree.persistence_intervals_in_dimension(d), dtype=np.float64).reshape(-1, 2)
        born = iv[:, 0][None, :] <= thresholds[:, None]
        alive = iv[:, 1][None, :] > thresholds[:, None]
        out[:, d] = (born & alive).sum(1)
    return out


def _gudhi_module(backend: str) -> object | None:
    if backend == "exact":
        return None
    try:
        import gudhi
    except ImportError as err:
        if backend == "gudhi":
            raise MissingExtraError(
                f"filtration backend 'gudhi' needs gudhi, which is not importable ({err}); install the extra: "
                "pip install 'hodgecover[gudhi]', or use backend='exact'"
            ) from err
        return None
    return gudhi


def filtration(
    num_vertices: int,
    edges: Sequence[tuple[int, int]],
    edge_values: ArrayLike,
    triangles: Sequence[tuple[int, int, int]],
    triangle_values: ArrayLike,
    *,
    num_thresholds: int = 80,
    mode: FiltrationMode = "joint",
    backend: Backend = "auto",
) -> Filtration:
    """The beta curve over ``num_thresholds`` evenly spaced thresholds from the smallest to the largest value
    (edge and triangle values for ``joint``, triangle values for ``triangles``).

    ``backend``: ``gudhi`` (persistent homology of the whole filtration in one pass; ``pip install
    'hodgecover[gudhi]'``), ``exact`` (ranks of every ``K_tau`` over the reals, one per threshold) or ``auto``
    (gudhi when importable). Both give the same curve (gudhi works over Z/11, which differs from the reals only
    for a complex with 11-torsion).
    """
    if num_thresholds < 2:
        raise ConfigError(f"num_thresholds must be >= 2, got {num_thresholds}")
    if mode not in FILTRATION_MODES:
        raise ConfigError(f"filtration mode must be one of {FILTRATION_MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"filtration backend must be one of {BACKENDS}, got {backend!r}")
    ev = np.asarray(edge_values, dtype=np.float64).reshape(-1)
    tv = np.asarray(triangle_values, dtype=np.float64).reshape(-1)
    if ev.shape != (len(edges),) or tv.shape != (len(triangles),):
        raise ShapeError(
            f"need one value per edge and per triangle, got {ev.shape} for {len(edges)} edges and "
            f"{tv.shape} for {len(triangles)} triangles"
        )
    values = tv if mode == "triangles" else np.concatenate([ev, tv])
    if values.size == 0:
        raise DataError("the filtration needs at least one edge or triangle value")
    if not np.all(np.isfinite(values)):
        raise NonFiniteError("filtration values hold NaN or infinite entries")
    thresholds = np.linspace(values.min(), values.max(), num_thresholds)
    gudhi = _gudhi_module(backend)
    if gudhi is not None:
        entries = _joint_entries(edges, ev, triangles, tv, mode, float(thresholds[0]))
        betti = _betti_curve_gudhi(num_vertices, *entries, thresholds, gudhi)
    else:
        betti = np.array([
            filtration_complex(num_vertices, edges, ev, triangles, tv, float(t), mode=mode).betti_numbers()
            for t in thresholds
        ])
    return Filtration(thresholds, betti[:, 0], betti[:, 1], betti[:, 2], mode)


__all__ = [
    "BACKENDS",
    "FILTRATION_MODES",
    "SOLVERS",
    "Filtration",
    "HodgeDecomposition",
    "SimplicialComplex",
    "as_edge_signal",
    "decompose",
    "filtration",
    "filtration_complex",
    "hodge_decomposition",
]
