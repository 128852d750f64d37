from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_fedopt.schedules import Explicit, Increasing, LateBudget, Periodic, as_schedule


def test_periodic_and_warmup():
    assert Periodic(4).sync_steps(13) == [4, 8, 12]
    assert Periodic(4, warmup_steps=2).sync_steps(12) == [1, 2, 6, 10]
    assert Periodic(1).sync_steps(3) == [1, 2, 3]


def test_increasing():
    assert Increasing(start=1, factor=2.0, rounds_per_stage=2).sync_steps(20) == [1, 2, 4, 6, 10, 14]
    assert Increasing(start=2, factor=3.0, rounds_per_stage=1, max_every=6).sync_steps(30) == [
        2,
        8,
        14,
        20,
        26,
    ]


def test_late_budget():
    steps = LateBudget(total_steps=100, num_syncs=4, power=2.0).sync_steps(100)
    assert steps == [50, 71, 87, 100]
    assert LateBudget(10, 10, power=5.0).sync_steps(10) == list(range(1, 11))
    assert LateBudget(100, 4, power=1.0).sync_steps(100) == [25, 50, 75, 100]


def test_increasing_with_a_cap_runs_past_the_float_range_of_the_growth():
    """The period reaches ``max_every`` after 6 doublings; the old code still computed ``2.0**k`` for
    every later sync and raised OverflowError at the 1025th (step 65,215)."""
    sched = Increasing(1, 2.0, rounds_per_stage=1, max_every=64)
    assert sched.should_sync(65_215)
    assert sched.sync_steps(200_000) == [1, 3, 7, 15, 31, 63, *range(127, 200_001, 64)]


@given(
    start=st.integers(1, 9),
    factor=st.integers(1, 5),
    rounds=st.integers(1, 3),
    extra=st.integers(0, 300),
    steps=st.integers(1, 3_000),
)
def test_increasing_equals_the_formula_in_exact_arithmetic(start, factor, rounds, extra, steps):
    """H_k = min(max_every, start * factor**(k // rounds_per_stage)), with Python integers."""
    max_every = start + extra
    expected, last, k = [], 0, 0
    while True:
        last += min(max_every, start * factor ** (k // rounds))
        if last > steps:
            break
        expected.append(last)
        k += 1
    assert Increasing(start, float(factor), rounds, max_every).sync_steps(steps) == expected


@given(t=st.integers(1, 400), k=st.integers(1, 400), p=st.floats(1.0, 8.0))
def test_late_budget_properties(t, k, p):
    if k > t:
        with pytest.raises(ValueError, match="num_syncs"):
            LateBudget(t, k, p)
        return
    steps = LateBudget(t, k, p).sync_steps(t)
    assert len(steps) == k and steps[-1] == t and steps == sorted(set(steps))
    # later half of training holds at least as many syncs as the first half
    assert sum(s > t / 2 for s in steps) >= sum(s <= t / 2 for s in steps)


def test_explicit_and_as_schedule():
    assert Explicit([10, 3, 3]).sync_steps(12) == [3, 10]
    assert isinstance(as_schedule(5), Periodic)
    sched = Explicit([1])
    assert as_schedule(sched) is sched
    with pytest.raises(ValueError, match="warmup_steps"):
        as_schedule(sched, warmup_steps=3)


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: Periodic(0), "sync_every"),
        (lambda: Periodic(True), "sync_every"),
        (lambda: Periodic(3, warmup_steps=-1), "warmup_steps"),
        (lambda: Increasing(start=0), "start"),
        (lambda: Increasing(factor=0.5), "factor"),
        (lambda: Increasing(factor=float("nan")), "factor"),
        (lambda: Increasing(factor=float("inf")), "factor"),
        (lambda: Increasing(rounds_per_stage=0), "rounds_per_stage"),
        (lambda: Increasing(start=4, max_every=2), "max_every"),
        (lambda: LateBudget(0, 1), "total_steps"),
        (lambda: LateBudget(10, 0), "num_syncs"),
        (lambda: LateBudget(10, 2, power=0.5), "power"),
        (lambda: LateBudget(10, 2, power=float("inf")), "power"),
        (lambda: LateBudget(10.0, 2), "total_steps"),
        (lambda: Explicit([]), "steps"),
        (lambda: Explicit([0, 2]), "steps"),
    ],
)
def test_bad_arguments(factory, name):
    with pytest.raises(ValueError, match=name):
        factory()
