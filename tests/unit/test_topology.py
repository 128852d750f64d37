"""Topologies: mixing matrices are doubly stochastic (symmetric where they should be), connected, validated."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_fedopt import topology as tp

SYMMETRIC = {"ring", "torus", "fully_connected", "random_matching"}


@given(
    name=st.sampled_from(sorted(set(tp.TOPOLOGIES) - {"full"})), n=st.integers(1, 12), t=st.integers(0, 40)
)
def test_every_topology_is_doubly_stochastic(name, n, t):
    topo = tp.make_topology(name, n, seed=3)
    w = topo.matrix(t)
    assert w.shape == (n, n) and bool((w >= 0).all())
    torch.testing.assert_close(w.sum(0), torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(w.sum(1), torch.ones(n, dtype=torch.float64))
    if name in SYMMETRIC:
        assert topo.symmetric and torch.equal(w, w.T)
    # the neighbour lists are the matrix's support
    for i in range(n):
        ins = topo.in_neighbors(i, t)
        assert sum(ins.values()) + topo.self_weight(i, t) == pytest.approx(1.0)
        for k in topo.out_neighbors(i, t):
            assert i in topo.in_neighbors(k, t)
    assert 0.0 <= topo.spectral_gap <= 1.0 + 1e-12
    if not topo.time_varying and n > 1:
        tp.check_mixing_matrix(w)  # connected


def test_ring_matrix_hand_written_and_spectral_gap():
    w = tp.ring(5).matrix()
    for i in range(5):
        for j in range(5):
            expected = 1 / 3 if (i - j) % 5 in (0, 1, 4) else 0.0
            assert w[i, j].item() == pytest.approx(expected)
    # eigenvalues of the ring: 1/3 + 2/3 cos(2 pi k / n); gap = 1 - max_{k>0} |.|
    lam = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / 5) for k in range(1, 5)]
    assert tp.ring(5).spectral_gap == pytest.approx(1 - max(abs(x) for x in lam))
    assert tp.fully_connected(6).spectral_gap == pytest.approx(1.0)


def test_exponential_and_one_peer():
    w = tp.exponential(8).matrix()
    assert (w > 0).sum(1).tolist() == [4] * 8  # self + offsets 1, 2, 4
    assert not torch.equal(w, w.T)
    topo = tp.one_peer_exponential(8)
    assert topo.period == 3 and topo.time_varying
    prod = topo.matrix(2) @ topo.matrix(1) @ topo.matrix(0)
    torch.testing.assert_close(prod, torch.full((8, 8), 1 / 8, dtype=torch.float64))  # exact averaging
    assert topo.spectral_gap == pytest.approx(1.0)
    assert tp.one_peer_exponential(6).spectral_gap < 1.0


def test_torus_and_random_matching():
    topo = tp.torus(12, rows=3)
    assert all(len(topo.in_neighbors(i)) == 4 for i in range(12))
    m = tp.random_matching(6, seed=1)
    assert [m.matrix(4).tolist()] == [tp.random_matching(6, seed=1).matrix(4).tolist()]  # round-seeded
    assert any(not torch.equal(m.matrix(0), m.matrix(t)) for t in range(1, 5))
    odd = tp.random_matching(5).matrix(0)
    assert sorted(int((odd[i] > 0).sum()) for i in range(5)) == [1, 2, 2, 2, 2]


def test_bad_input():
    with pytest.raises(ValueError, match="doubly stochastic"):
        tp.from_matrix([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]])
    with pytest.raises(ValueError, match="not connected"):
        tp.from_matrix(
            [[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]]
        )
    with pytest.raises(ValueError, match="non-negative"):
        tp.from_matrix([[1.5, -0.5], [-0.5, 1.5]])
    with pytest.raises(ValueError, match="needs 8 replicas but there are 4"):
        tp.make_topology(tp.exponential(8), 4)
    with pytest.raises(ValueError, match="needs 3 replicas but there are 4"):
        tp.make_topology([[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], 4)
    with pytest.raises(ValueError, match="rows"):
        tp.torus(10, rows=3)
    with pytest.raises(ValueError, match="topology"):
        tp.make_topology("star", 4)
    # a cycle of matrices that is connected only together is accepted
    a = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    b = torch.tensor([[0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0], [0, 0.5, 0.5, 0], [0.5, 0, 0, 0.5]])
    assert tp.from_matrix([a, b]).period == 2


def test_sizes_are_checked_integers():
    import numpy as np

    for bad in (0, True, 2.0, "4"):
        with pytest.raises(ValueError, match=r"`n` must be an integer in \[1, 4096\]"):
            tp.ring(bad)
    with pytest.raises(ValueError, match="`rows` must be an integer >= 1"):
        tp.torus(4, rows=True)
    topo = tp.ring(np.int64(4))  # an integral number of another type is one
    assert topo.n == 4 and type(topo.n) is int
