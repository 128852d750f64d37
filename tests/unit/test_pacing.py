"""Pacing functions, orderings and replica selection against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_fedopt.data import PACINGS, Pacing, ReplicaSelection, order_by_scores

# (name, a, b, t, T, expected fraction) — each worked out by hand from the formulas in docs/algorithms.md
CASES = [
    ("linear", 0.5, 0.2, 25, 100, 0.2 + 0.8 * 0.5),
    ("linear", 0.5, 0.2, 60, 100, 1.0),
    ("quad", 1.0, 0.1, 50, 100, 0.1 + 0.9 * 0.25),
    ("root", 1.0, 0.1, 25, 100, 0.1 + 0.9 * 0.5),
    ("step", 0.5, 0.3, 49, 100, 0.3),
    ("step", 0.5, 0.3, 50, 100, 1.0),
    ("exp", 1.0, 0.0 + 0.2, 50, 100, 0.2 + 0.8 * (math.exp(5) - 1) / (math.exp(10) - 1)),
    ("exp", 1.0, 0.2, 100, 100, 1.0),
    ("log", 1.0, 0.2, 50, 100, 0.2 + 0.8 * (1 + math.log(0.5 + math.exp(-10)) / 10)),
    ("log", 1.0, 0.2, 0, 100, 0.2),
    ("root", 2.0, 0.5, 100, 100, 0.5 + 0.5 * math.sqrt(0.5)),  # a > 1: never saturates
]


@pytest.mark.parametrize(("name", "a", "b", "t", "total", "expected"), CASES)
def test_pacing_equals_the_formula(name, a, b, t, total, expected):
    assert Pacing(name, a=a, b=b).fraction(t, total) == pytest.approx(expected, abs=1e-12)


def test_visible_count_has_a_floor_of_one_batch_and_a_ceiling_of_n():
    p = Pacing("linear", a=1.0, b=0.01)
    assert p.visible(0, 100, n=1000, floor=32) == 32  # bN = 10 < one batch
    assert p.visible(50, 100, n=1000, floor=32) == 505
    assert p.visible(500, 100, n=1000, floor=32) == 1000
    assert p.visible(0, 100, n=20, floor=32) == 20  # never more than the data
    for name in PACINGS:  # non-decreasing in t, from bN to N
        p = Pacing(name, a=0.8, b=0.1)
        values = [p.fraction(t, 100) for t in range(0, 101)]
        assert values[0] == pytest.approx(0.1) and values[-1] == 1.0
        assert all(x <= y + 1e-12 for x, y in itertools.pairwise(values))


def test_bad_pacing_and_ordering():
    for kwargs in ({"a": 0}, {"a": -1.0}, {"b": 0.0}, {"b": 1.5}, {"a": float("inf")}):
        with pytest.raises(ValueError, match="pacing parameter"):
            Pacing("linear", **kwargs)
    with pytest.raises(ValueError, match="pacing"):
        Pacing("cubic")
    with pytest.raises(ValueError, match="ordering"):
        order_by_scores(torch.zeros(3), "easiest")
    with pytest.raises(ValueError, match="ordering"):
        ReplicaSelection("hardest")
    with pytest.raises(ValueError, match="k"):
        ReplicaSelection().select([0.1, 0.2], k=3, round_index=0, step=0, total_steps=10)


def test_orderings():
    s = torch.tensor([0.5, float("nan"), 0.1, 0.9, 0.1])
    assert order_by_scores(s, "curriculum").tolist() == [2, 4, 0, 3, 1]  # stable ties, NaN last
    assert order_by_scores(s, "anti").tolist() == [3, 0, 2, 4, 1]
    g = torch.Generator().manual_seed(0)
    r = order_by_scores(s, "random", generator=g)
    assert sorted(r.tolist()) == [0, 1, 2, 3, 4]


def test_replica_selection_orders_by_loss_and_paces():
    losses = [0.9, 0.1, 0.5, 0.7, 0.3, 0.8]
    cur = ReplicaSelection("curriculum", pacing="linear", a=1.0, b=0.5, seed=0)
    anti = ReplicaSelection("anti", pacing="linear", a=1.0, b=0.5, seed=0)
    for rnd in range(20):
        # at t=0 only the 3 lowest-loss (curriculum) / highest-loss (anti) replicas are eligible
        assert set(cur.select(losses, 2, rnd, 0, 100)) <= {1, 4, 2}
        assert set(anti.select(losses, 2, rnd, 0, 100)) <= {0, 5, 3}
        # the same inputs give the same answer (what every rank computes)
        assert cur.select(losses, 2, rnd, 40, 100) == cur.select(list(losses), 2, rnd, 40, 100)
    assert cur.eligible(losses, 2, 0, 100, 100) == [1, 4, 2, 3, 5, 0]  # saturated: all, in loss order
    chosen = {tuple(cur.select(losses, 2, rnd, 100, 100)) for rnd in range(40)}
    assert len(chosen) > 5  # once all are eligible the draw varies with the round
