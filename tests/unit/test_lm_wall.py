"""``python -m benchmarks.lm --equal-wall``: the cost model that gives each row the steps filling the
budget, and the generic ``diloco_h<N>`` rows."""

from __future__ import annotations

import doctest

import pytest

from benchmarks import _lm_wall, lm


def test_doctests() -> None:
    for module in (_lm_wall, lm):
        assert doctest.testmod(module).failed == 0


def test_any_diloco_h_is_a_row() -> None:
    assert lm.SUITE.knows("diloco_h8") and lm.SUITE.knows("diloco_h128")
    assert not lm.SUITE.knows("diloco_h0") and not lm.SUITE.knows("diloco_hx")
    label, _ = lm.SUITE.row("diloco_h8")
    assert "sync_every=8" in label


def test_solve_fills_the_budget_with_whole_validation_intervals() -> None:
    costs = _lm_wall.Costs(start=1.0, step=0.01, round=0.5)
    for h, budget in ((8, 20.0), (64, 20.0), (1000, 12.0)):
        steps, every = _lm_wall.solve(costs, budget, h, 64)
        assert steps % every == 0 and abs(every - 64) <= 64 // 2
        assert _lm_wall.predict(costs, steps, h) == pytest.approx(budget, rel=0.06)
    # a smaller H pays more rounds: fewer steps fit
    assert _lm_wall.solve(costs, 20.0, 8, 64)[0] < _lm_wall.solve(costs, 20.0, 64, 64)[0]
