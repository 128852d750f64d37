"""``sync_every="auto"`` for CO2 (the overlapped rule) and streaming DiLoCo (the fragment schedule's
period): the pure rules with values computed by hand, and the streaming schedule's events."""

from __future__ import annotations

import pytest

import lightning_fedopt as lf
from lightning_fedopt.plan import choose_sync_every
from lightning_fedopt.schedules import AutoSync, streaming_sync_every
from lightning_fedopt.strategies.diloco.fragments import AutoFragmentEvents, RoundClock, fragment_events


def test_overlapped_rule_by_hand():
    # CO2: exposed max(0, R - H c) <= b (H c + exposed)  <=>  H >= R (1 - b) / c = 0.8 * 0.97 / 0.1 = 7.76
    auto = AutoSync(budget=0.03, low=1, high=1000)
    assert auto.decide(step=8, step_seconds=0.1, sync_seconds=0.8, overlapped=True) == 8
    assert auto.decisions == [(0, 8)] or auto.decisions[-1] == (8, 8)
    # blocking: H >= R (1 - b) / (b c) = 0.8 * 0.97 / 0.003 = 258.7
    blocking = AutoSync(budget=0.03, low=1, high=1000)
    assert blocking.decide(step=8, step_seconds=0.1, sync_seconds=0.8) == 259
    # the default stays the blocking rule (the existing API)
    assert AutoSync(budget=0.05).decide(8, 0.08, 0.322) == 77


def test_streaming_rule_by_hand():
    # F = 4, tau = 1: each fragment 0.8 / 4 = 0.2 s, 0.1 s hidden -> 0.4 s exposed a round;
    # 0.4 / (0.1 H + 0.4) <= 0.03  <=>  H >= 0.4 * 0.97 / 0.003 = 129.3
    assert streaming_sync_every(0.1, 0.8, 4, 1, budget=0.03) == 130
    # F = 2, tau = 2: 0.55 - 0.2 = 0.35 s a fragment, 0.7 s a round: H >= 0.7 * 0.97 / 0.003 = 226.3
    assert streaming_sync_every(0.1, 1.1, 2, 2, budget=0.03) == 227
    # hidden entirely (0.1 s a fragment behind 1 step of 0.1 s): the lower bound F (tau + 1) = 8, or low
    assert streaming_sync_every(0.1, 0.4, 4, 1) == 8
    assert streaming_sync_every(0.1, 0.4, 4, 1, low=10) == 10
    # tau = 0: blocking, as choose_sync_every: 0.53 (0.95) / 0.005 = 100.7
    assert streaming_sync_every(0.1, 0.53, 2, 0) == 101 == choose_sync_every(0.1, 0.53)
    # out of reach: the upper bound
    assert streaming_sync_every(0.1, 100.0, 2, 1, high=50) == 50
    with pytest.raises(ValueError, match="`high`"):
        streaming_sync_every(0.1, 0.4, 4, 1, high=7)


@pytest.mark.parametrize(
    ("every", "fragments", "delay"), [(4, 2, 1), (8, 4, 1), (9, 3, 2), (6, 1, 3), (5, 5, 0)]
)
def test_one_period_is_fragment_events(every, fragments, delay):
    auto = AutoFragmentEvents(AutoSync(probe=every, low=1, high=1000), fragments, delay)
    assert auto.every == every
    for step in range(0, 4 * every + 3):
        assert auto.events(step) == fragment_events(step, every, fragments, delay), step


def test_period_changes_at_round_ends_keep_every_fragment_consistent():
    auto = AutoFragmentEvents(AutoSync(probe=4, low=1, high=100), fragments=2, delay=1)
    assert auto.low == 4 and auto.every == 4
    with pytest.raises(RuntimeError, match="round"):
        auto.decide(step=6, step_seconds=0.1, sync_seconds=0.0)
    assert auto.round_ends(4) and not auto.round_ends(6)
    auto.decisions += [(4, 6), (16, 10)]
    launches: list[tuple[int, int]] = []
    in_flight: tuple[int, int] | None = None
    for step in range(1, 50):
        launch, apply = auto.events(step)
        if apply is not None:  # applied tau steps after its launch, the only one in flight
            assert in_flight == (step - 1, apply)
            in_flight = None
        if launch is not None:
            assert in_flight is None
            in_flight = (step, launch)
            launches.append((step, launch))
    assert launches == [
        (2, 0),
        (4, 1),
        (7, 0),
        (10, 1),
        (13, 0),
        (16, 1),
        (21, 0),
        (26, 1),
        (31, 0),
        (36, 1),
        (41, 0),
        (46, 1),
    ]
    assert [auto.rounds_done(s) for s in (3, 4, 10, 16, 25, 26)] == [
        0,
        1,
        2,
        3,
        3,
        4,
    ]  # ends at 4 | 10, 16 | 26


def test_measured_at_round_ends():
    auto = AutoFragmentEvents(AutoSync(probe=4, remeasure_every=2), fragments=2, delay=1)
    assert [s for s in range(1, 30) if auto.measures_at(s, 0)] == [4, 12, 20, 28]
    # F = 1: the first round ends before any fragment round completed; measured from the second
    single = AutoFragmentEvents(AutoSync(probe=3, remeasure_every=None), fragments=1, delay=2)
    assert [s for s in range(1, 30) if single.measures_at(s, 0)] == [6]


def test_state_round_trip_and_bounds():
    auto = AutoFragmentEvents(AutoSync(probe=2, low=1, high=50), fragments=4, delay=1)
    assert auto.every == 8  # the probe raised to F (tau + 1)
    auto.decide(step=8, step_seconds=0.1, sync_seconds=0.8)  # 0.4 s exposed a round: H = 50 (the bound)
    again = AutoFragmentEvents(AutoSync(probe=2, low=1, high=50), fragments=4, delay=1)
    again.load_state_dict(auto.state_dict())
    assert again.decisions == auto.decisions == [(0, 8), (8, 50)]
    with pytest.raises(ValueError, match="F \\(tau \\+ 1\\)"):
        again.load_state_dict({"decisions": [[0, 8], [8, 6]]})
    with pytest.raises(ValueError, match="`high`"):
        AutoFragmentEvents(AutoSync(high=7), fragments=4, delay=1)


def test_streaming_strategies_take_auto():
    s = lf.DiLoCoStrategy(sync_every="auto", fragments=2, sync_delay=1)
    assert isinstance(s.schedule, AutoFragmentEvents) and s.sync_every is None
    assert isinstance(lf.StreamingDiLoCoStrategy(sync_every="auto").schedule, AutoFragmentEvents)
    assert lf.CO2Strategy(sync_every="auto").auto_overlapped
    with pytest.raises(ValueError, match="`high`"):
        lf.DiLoCoStrategy(sync_every=lf.AutoSync(high=7), fragments=4, sync_delay=1)
    with pytest.raises(ValueError, match="sync_every"):
        lf.DiLoCoStrategy(sync_every=lf.Periodic(8), fragments=2)


def test_round_clock_measures_launch_to_completion():
    clock = RoundClock(launched=0.0)
    assert clock.seconds is None
    clock.done()
    first = clock.seconds
    assert first is not None and first > 0
    clock.done()  # the earliest completion counts
    assert clock.seconds == first


def test_replica_run_takes_medians_since_the_last_measurement() -> None:
    """``sync_every="auto"`` decides from the medians of the steps and synchronisations since the
    last measurement: one slow synchronisation or step (a load spike) does not move ``H``."""
    from lightning_fedopt.runtime.run import ReplicaRun

    run = ReplicaRun()
    assert run.step_seconds() is None and run.sync_seconds() is None
    run.sync_walls += [0.05, 0.9, 0.06]
    assert run.sync_seconds() == 0.06
    run.last_step_end = 0.0
    for now in (0.01, 0.02, 0.5, 0.51):
        run.note_step_end(now)
        run.last_step_end = now
    assert run.step_walls == pytest.approx([0.01, 0.01, 0.48, 0.01])
    assert run.step_seconds() == pytest.approx(0.01)
