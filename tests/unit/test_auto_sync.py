"""``sync_every="auto"``: the schedule alone (its decisions, their state, its arguments)."""

from __future__ import annotations

import pytest

import lightning_fedopt as lf
from lightning_fedopt.plan import choose_sync_every
from lightning_fedopt.schedules import AutoSync, as_schedule


def test_probe_then_the_chosen_period():
    auto = AutoSync(budget=0.05, probe=4, low=2, high=50)
    assert auto.sync_steps(12) == [4, 8, 12]
    every = auto.decide(step=8, step_seconds=0.01, sync_seconds=0.02)
    assert every == choose_sync_every(0.01, 0.02, budget=0.05, low=2, high=50)
    assert auto.sync_steps(8 + 2 * every) == [4, 8, 8 + every, 8 + 2 * every]
    # a slower link: a longer period, from the step it was measured at
    later = auto.decide(step=8 + every, step_seconds=0.01, sync_seconds=0.2)
    assert later == 50 and auto.decisions[-1] == (8 + every, 50)
    # a decision that keeps H adds nothing
    auto.decide(step=8 + every + 50, step_seconds=0.01, sync_seconds=0.2)
    assert len(auto.decisions) == 3


def test_at_least_min_rounds_over_the_run():
    """Where the run's steps are known, H <= steps // min_rounds, even above the budget; never
    below ``low``; unknown steps or ``min_rounds=None``: the budget alone."""
    auto = AutoSync(budget=0.05, probe=8, low=2, high=1000)  # min_rounds 32 by default
    assert auto.ceiling(4096) == 128 and auto.ceiling(None) == 1000 and auto.ceiling(0) == 1000
    assert auto.ceiling(40) == 2  # 40 // 32 = 1, below low
    budget_h = choose_sync_every(0.015, 0.46, budget=0.05, low=2, high=1000)
    assert budget_h > 128  # a 10 Mbit/s round on the netns LM: ~600
    assert auto.decide(8, 0.015, 0.46, total_steps=4096) == 128
    assert auto.decide(8 + 128, 0.015, 0.46) == budget_h  # steps not known: the budget's H
    free = AutoSync(budget=0.05, low=2, high=1000, min_rounds=None)
    assert free.ceiling(4096) == 1000 and free.decide(8, 0.015, 0.46, total_steps=4096) == budget_h
    # a cheap round: the budget's smaller H stands
    assert AutoSync(low=2).decide(8, 0.015, 0.01, total_steps=4096) == choose_sync_every(
        0.015, 0.01, low=2, high=1000
    )


def test_streaming_ceiling_keeps_the_fragment_period():
    """Streaming: the ceiling never goes below F (tau + 1)."""
    from lightning_fedopt.strategies.diloco.fragments import AutoFragmentEvents

    events = AutoFragmentEvents(AutoSync(probe=4, low=1, high=1000, min_rounds=16), fragments=4, delay=1)
    assert events.ceiling(64) == 8  # 64 // 16 = 4 < F (tau + 1) = 8
    assert events.decide(8, 0.015, 0.46, overlapped=False, total_steps=4096) == 256
    assert events.min_rounds == 16


def test_measurements_once_or_every_k_syncs():
    assert [AutoSync().wants_measurement(k) for k in (1, 2, 3)] == [True, False, False]
    assert [AutoSync(remeasure_every=2).wants_measurement(k) for k in (1, 2, 3, 4, 5)] == [
        True,
        False,
        True,
        False,
        True,
    ]


def test_state_round_trip_and_bad_state():
    auto = AutoSync(probe=3)
    auto.decide(3, 0.01, 0.5)
    again = AutoSync(probe=3)
    again.load_state_dict(auto.state_dict())
    assert again.decisions == auto.decisions and again.sync_steps(200) == auto.sync_steps(200)
    with pytest.raises(ValueError, match="AutoSync"):
        again.load_state_dict({"decisions": [[5, 0]]})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.0}, "budget"),
        ({"low": 0}, "low"),
        ({"low": 5, "high": 4}, "high"),
        ({"probe": 0}, "probe"),
        ({"remeasure_every": 0}, "remeasure_every"),
        ({"min_rounds": 0}, "min_rounds"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        AutoSync(**kwargs)


def test_the_strategies_take_auto():
    assert isinstance(as_schedule("auto"), AutoSync)
    assert isinstance(lf.DiLoCoStrategy(sync_every="auto").schedule, AutoSync)
    assert isinstance(lf.LocalSGDStrategy(sync_every="auto").schedule, AutoSync)
    with pytest.raises(ValueError, match="sync_every"):
        lf.LocalSGDStrategy(sync_every="sometimes")
    with pytest.raises(ValueError, match="fault_tolerance"):
        lf.DiLoCoStrategy(sync_every="auto", fault_tolerance="torchft")
