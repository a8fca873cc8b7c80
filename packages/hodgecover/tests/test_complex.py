from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hodgecover.complex import (
    SimplicialComplex,
    as_edge_signal,
    decompose,
    filtration,
    filtration_complex,
    hodge_decomposition,
)
from hodgecover.extras import MissingExtraError

from klcore.errors import ConfigError, DataError, NonFiniteError, ShapeError


def complete(n: int, triangles=()) -> SimplicialComplex:
    return SimplicialComplex(n, itertools.combinations(range(n), 2), triangles)


def torus() -> SimplicialComplex:
    """3x3 grid on a torus, each square split by its diagonal: 9 vertices, 27 edges, 18 triangles."""
    v = lambda a, b: 3 * (a % 3) + (b % 3)  # noqa: E731
    tris = []
    for a, b in itertools.product(range(3), range(3)):
        tris += [(v(a, b), v(a + 1, b), v(a + 1, b + 1)), (v(a, b), v(a, b + 1), v(a + 1, b + 1))]
    edges = {tuple(sorted(e)) for t in tris for e in itertools.combinations(t, 2)}
    return SimplicialComplex(9, edges, tris)


def octahedron() -> SimplicialComplex:
    tris = [(a, b, c) for a in (0, 1) for b in (2, 3) for c in (4, 5)]
    edges = {tuple(sorted(e)) for t in tris for e in itertools.combinations(t, 2)}
    return SimplicialComplex(6, edges, tris)


def random_complex(seed: int, n: int = 12, p_edge: float = 0.5, p_tri: float = 0.5) -> SimplicialComplex:
    rng = np.random.default_rng(seed)
    edges = [e for e in itertools.combinations(range(n), 2) if rng.random() < p_edge]
    es = set(edges)
    tris = [
        t for t in itertools.combinations(range(n), 3)
        if {(t[0], t[1]), (t[0], t[2]), (t[1], t[2])} <= es and rng.random() < p_tri
    ]
    return SimplicialComplex(n, edges, tris)


CASES = {
    "hollow triangle": (SimplicialComplex(3, [(0, 1), (0, 2), (1, 2)]), (1, 1, 0)),
    "filled triangle": (SimplicialComplex(3, [(0, 1), (0, 2), (1, 2)], [(0, 1, 2)]), (1, 0, 0)),
    "hollow tetrahedron": (complete(4, itertools.combinations(range(4), 3)), (1, 0, 1)),
    "octahedron (sphere)": (octahedron(), (1, 0, 1)),
    "torus": (torus(), (1, 2, 1)),
    "K8": (complete(8), (1, 21, 0)),
    "K16": (complete(16), (1, 105, 0)),
    "two points": (SimplicialComplex(2), (2, 0, 0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_betti_numbers_of_standard_complexes(name):
    cx, expected = CASES[name]
    assert cx.betti_numbers() == expected


@pytest.mark.parametrize("name", list(CASES))
def test_boundary_of_boundary_is_zero_and_kernel_of_l1_is_beta1(name):
    cx, expected = CASES[name]
    b1, b2 = cx.boundary(1), cx.boundary(2)
    assert b1.shape == (cx.num_vertices, cx.num_edges) and b2.shape == (cx.num_edges, cx.num_triangles)
    assert abs(b1 @ b2).sum() == 0
    eig = np.linalg.eigvalsh(cx.laplacian(1).toarray()) if cx.num_edges else np.zeros(0)
    assert int((np.abs(eig) < 1e-9).sum()) == expected[1]
    # Euler characteristic: V - E + F = b0 - b1 + b2
    assert cx.num_vertices - cx.num_edges + cx.num_triangles == expected[0] - expected[1] + expected[2]


def test_boundary_signs_follow_the_i_lt_j_convention():
    cx = SimplicialComplex(3, [(1, 0), (2, 0), (2, 1)], [(2, 1, 0)])
    assert cx.edges == [(0, 1), (0, 2), (1, 2)] and cx.triangles == [(0, 1, 2)]
    assert cx.boundary(1).toarray().tolist() == [[-1, -1, 0], [1, 0, -1], [0, 1, 1]]
    assert cx.boundary(2).toarray().ravel().tolist() == [1, -1, 1]  # (01)=+1, (02)=-1, (12)=+1


def test_laplacians_match_their_definitions():
    cx = random_complex(0)
    b1, b2 = cx.boundary(1).toarray(), cx.boundary(2).toarray()
    np.testing.assert_array_equal(cx.laplacian(0).toarray(), b1 @ b1.T)
    np.testing.assert_array_equal(cx.laplacian(1).toarray(), b1.T @ b1 + b2 @ b2.T)
    np.testing.assert_array_equal(cx.laplacian(2).toarray(), b2.T @ b2)
    # L0 is the graph Laplacian D - A
    adj = np.zeros((cx.num_vertices,) * 2)
    for i, j in cx.edges:
        adj[i, j] = adj[j, i] = 1
    np.testing.assert_array_equal(cx.laplacian(0).toarray(), np.diag(adj.sum(1)) - adj)


def test_betti_numbers_agree_with_gudhi_on_random_complexes():
    gudhi = pytest.importorskip("gudhi")
    for seed in range(5):
        cx = random_complex(seed, n=10, p_edge=0.6, p_tri=0.4)
        st = gudhi.SimplexTree()
        for v in range(cx.num_vertices):
            st.insert([v])
        for s in [*cx.edges, *cx.triangles]:
            st.insert(list(s))
        st.compute_persistence(persistence_dim_max=True)
        b = [*st.betti_numbers(), 0, 0, 0]
        assert cx.betti_numbers() == tuple(b[:3])


@pytest.mark.parametrize("solver", ["auto", "lsqr", "lsmr", "dense"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decomposition_is_orthogonal_and_matches_pinv_projections(solver, seed):
    cx = random_complex(seed, n=14, p_edge=0.55, p_tri=0.5)
    rng = np.random.default_rng(seed + 10)
    f = rng.normal(size=cx.num_edges)
    g, c, h = hodge_decomposition(cx, f, solver=solver)
    b1, b2 = cx.boundary(1).toarray(), cx.boundary(2).toarray()
    # independent: orthogonal projections onto im B1^T and im B2 through the pseudo-inverse
    np.testing.assert_allclose(g, b1.T @ np.linalg.pinv(b1.T) @ f, atol=1e-8)
    np.testing.assert_allclose(c, b2 @ np.linalg.pinv(b2) @ f, atol=1e-8)
    np.testing.assert_allclose(g + c + h, f, atol=1e-12)
    for x, y in ((g, c), (g, h), (c, h)):
        assert abs(x @ y) < 1e-8
    assert abs(f @ f - (g @ g + c @ c + h @ h)) < 1e-8
    np.testing.assert_allclose(b1 @ h, 0, atol=1e-8)
    np.testing.assert_allclose(b2.T @ h, 0, atol=1e-8)
    np.testing.assert_allclose(cx.laplacian(1) @ h, 0, atol=1e-8)


def test_complete_graph_closed_form_gradient_matches_least_squares():
    cx = complete(9, [(0, 1, 2), (3, 4, 5), (1, 5, 8)])
    f = np.random.default_rng(3).uniform(size=cx.num_edges)
    d = decompose(cx, f, solver="auto")
    b1 = cx.boundary(1).toarray()
    phi = np.linalg.lstsq(b1.T, f, rcond=None)[0]
    np.testing.assert_allclose(d.gradient, b1.T @ phi, atol=1e-12)
    np.testing.assert_allclose(d.potential, b1 @ f / 9, atol=1e-12)
    assert d.residual < 1e-10
    assert d.energies["total"] == pytest.approx(sum(d.energies[k] for k in ("gradient", "curl", "harmonic")))


def test_circulation_is_harmonic_when_hollow_and_curl_when_filled():
    f = np.array([1.0, -1.0, 1.0])  # 0->1, 0->2 (against the cycle), 1->2
    hollow = SimplicialComplex(3, [(0, 1), (0, 2), (1, 2)])
    filled = SimplicialComplex(3, [(0, 1), (0, 2), (1, 2)], [(0, 1, 2)])
    g, c, h = hodge_decomposition(hollow, f)
    np.testing.assert_allclose(h, f, atol=1e-12)
    np.testing.assert_allclose(g, 0, atol=1e-12)
    g, c, h = hodge_decomposition(filled, f)
    np.testing.assert_allclose(c, f, atol=1e-12)
    np.testing.assert_allclose(h, 0, atol=1e-12)


def test_flipping_an_edge_is_equivariant_for_signed_flows_but_not_for_unsigned_barriers():
    cx = random_complex(4, n=8, p_edge=0.7, p_tri=0.3)
    rng = np.random.default_rng(5)
    f = rng.normal(size=cx.num_edges)
    b1 = cx.boundary(1).toarray()
    flip = np.ones(cx.num_edges)
    flip[0] = -1
    # a flipped edge's boundary column changes sign; the decomposition of the flipped flow flips the same entry
    b1_flipped = b1 * flip
    g = cx.boundary(1).T @ decompose(cx, f).potential
    g_flipped = b1_flipped.T @ np.linalg.lstsq(b1_flipped.T, f * flip, rcond=None)[0]
    np.testing.assert_allclose(g_flipped, g * flip, atol=1e-9)
    # an unsigned barrier keeps its sign when the edge flips, so the split changes
    barrier = np.abs(f)
    g1 = cx.boundary(1).T @ decompose(cx, barrier).potential
    g2 = b1_flipped.T @ np.linalg.lstsq(b1_flipped.T, barrier, rcond=None)[0]
    assert not np.isclose(g1 @ g1, g2 @ g2)


def test_beta1_does_not_increase_as_triangles_are_added_with_edges_fixed():
    n = 7
    edges = list(itertools.combinations(range(n), 2))
    tris = list(itertools.combinations(range(n), 3))
    rng = np.random.default_rng(0)
    tv = rng.uniform(size=len(tris))
    curve = filtration(n, edges, np.zeros(len(edges)), tris, tv, num_thresholds=20, mode="triangles")
    assert np.all(np.diff(curve.beta1) <= 0)
    assert curve.beta1[0] <= math.comb(n, 2) - (n - 1)
    assert curve.best_index == 0


def test_joint_filtration_rises_then_falls_and_picks_its_maximum():
    n = 6
    edges = list(itertools.combinations(range(n), 2))
    tris = list(itertools.combinations(range(n), 3))
    rng = np.random.default_rng(1)
    ev, tv = rng.uniform(0, 1, len(edges)), rng.uniform(1, 2, len(tris))
    curve = filtration(n, edges, ev, tris, tv, num_thresholds=40, mode="joint")
    assert curve.beta1[0] == 0 and curve.beta1[-1] == 0  # one edge; then the filled K6 (contractible 2-skeleton)
    assert curve.beta1.max() == math.comb(n, 2) - (n - 1)  # K6 before any triangle enters
    k = filtration_complex(n, edges, ev, tris, tv, curve.best_threshold, mode="joint")
    assert k.betti_numbers()[1] == curve.beta1.max()


def test_bad_input_raises_klcore_errors():
    with pytest.raises(DataError):
        SimplicialComplex(3, [(0, 0)])
    with pytest.raises(DataError):
        SimplicialComplex(3, [(0, 3)])
    with pytest.raises(DataError):
        SimplicialComplex(3, [(0, 1)], [(0, 1, 2)])
    cx = complete(3)
    with pytest.raises(ShapeError):
        hodge_decomposition(cx, np.ones(2))
    with pytest.raises(NonFiniteError):
        hodge_decomposition(cx, np.array([1.0, np.nan, 0.0]))
    with pytest.raises(ConfigError):
        hodge_decomposition(cx, np.ones(3), solver="magic")
    with pytest.raises(ConfigError):
        cx.boundary(3)


def test_non_integer_vertices_raise_data_error_naming_the_simplex():
    with pytest.raises(DataError, match=r"\('a', 'b'\)"):
        SimplicialComplex(3, [("a", "b")])
    with pytest.raises(DataError, match=r"1\.5"):
        SimplicialComplex(3, [(0, 1.5)])
    with pytest.raises(DataError, match="sequence"):
        SimplicialComplex(3, [7])
    assert SimplicialComplex(3, [(np.int64(0), 1.0)]).edges == [(0, 1)]


def test_hodge_decomposition_accepts_the_documented_keyword_names():
    cx = complete(4)
    signal = np.arange(6, dtype=float)
    by_name = hodge_decomposition(complex=cx, edge_signal=signal)
    for a, b in zip(by_name, hodge_decomposition(cx, signal)):
        np.testing.assert_array_equal(a, b)


def test_edge_signal_is_keyed_by_edge_and_an_ambiguous_array_is_refused():
    given = [(0, 2), (0, 1), (1, 2)]  # the complex stores (0, 1), (0, 2), (1, 2)
    cx = SimplicialComplex(3, given)
    assert not cx.edge_order_kept
    with pytest.raises(DataError, match="mapping"):
        decompose(cx, [10.0, 1.0, 1.0])
    parts = decompose(cx, dict(zip(given, [10.0, 1.0, 1.0])))
    total = parts.gradient + parts.curl + parts.harmonic
    np.testing.assert_allclose(total, [1.0, 10.0, 1.0])  # 10 sits on (0, 2), in stored order
    # a key against the stored orientation is a flow the other way: stored negated
    np.testing.assert_allclose(as_edge_signal(cx, {(1, 0): 2.0, (0, 2): 1.0, (2, 1): 3.0}), [-2.0, 1.0, -3.0])
    with pytest.raises(DataError, match="no value for 1 edges"):
        as_edge_signal(cx, {(0, 1): 1.0, (0, 2): 1.0})
    with pytest.raises(DataError, match="repeated"):
        as_edge_signal(cx, {(0, 1): 1.0, (1, 0): 1.0, (0, 2): 1.0, (1, 2): 1.0})
    sorted_cx = SimplicialComplex(3, [(0, 1), (0, 2), (1, 2)])
    assert sorted_cx.edge_order_kept
    np.testing.assert_array_equal(as_edge_signal(sorted_cx, [1.0, 10.0, 1.0]), [1.0, 10.0, 1.0])


@pytest.mark.parametrize("mode", ["joint", "triangles"])
def test_gudhi_beta_curve_equals_the_exact_ranks(mode):
    pytest.importorskip("gudhi")
    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.integers(3, 11))
        all_e, all_t = list(itertools.combinations(range(n), 2)), list(itertools.combinations(range(n), 3))
        edges = [all_e[i] for i in rng.choice(len(all_e), int(rng.integers(1, len(all_e) + 1)), replace=False)]
        tris = [all_t[i] for i in rng.choice(len(all_t), int(rng.integers(1, len(all_t) + 1)), replace=False)]
        if trial % 2:  # integer values: many ties at the thresholds themselves
            ev, tv = rng.integers(0, 5, len(edges)).astype(float), rng.integers(0, 6, len(tris)).astype(float)
        else:
            ev, tv = rng.uniform(size=len(edges)), rng.uniform(size=len(tris))
        exact = filtration(n, edges, ev, tris, tv, num_thresholds=12, mode=mode, backend="exact")
        fast = filtration(n, edges, ev, tris, tv, num_thresholds=12, mode=mode, backend="gudhi")
        np.testing.assert_array_equal(fast.thresholds, exact.thresholds)
        for name in ("beta0", "beta1", "beta2"):
            np.testing.assert_array_equal(getattr(fast, name), getattr(exact, name), err_msg=f"{trial} {name}")


def test_gudhi_backend_without_gudhi_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gudhi", None)  # import gudhi now raises ImportError
    args = (3, [(0, 1), (0, 2), (1, 2)], [0.0, 1.0, 2.0], [(0, 1, 2)], [3.0])
    with pytest.raises(MissingExtraError, match=r"hodgecover\[gudhi\]"):
        filtration(*args, backend="gudhi")
    assert filtration(*args, backend="auto").beta1.tolist()[-1] == 0  # falls back to the exact ranks
