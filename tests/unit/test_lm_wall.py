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


def test_verdict_over_seeds(capsys) -> None:
    """The ``*_auto`` row's mean over the seeds against the best other row's mean."""
    from benchmarks import _lm_report

    def row(name: str, seed: int, loss: float) -> dict:
        return {"world_size": 2, "seed": seed, "strategy": name, "final_val_loss": loss, "budget_s": 60.0}

    summary = [
        row("diloco_auto", 0, 1.80), row("diloco_h128", 0, 1.75), row("diloco_h512", 0, 1.76),
        row("diloco_auto", 1, 1.60), row("diloco_h128", 1, 1.64), row("diloco_h512", 1, 1.66),
    ]  # fmt: skip
    _lm_report.print_wall_over_seeds(summary)
    out = capsys.readouterr().out
    # auto 1.70 against h128's 1.695: +0.29%
    assert "diloco_auto's mean vs the best fixed H's mean (diloco_h128): +0.29%" in out and "MET" in out
    _lm_report.print_wall_over_seeds(summary[:3])  # one seed: nothing to say
    assert capsys.readouterr().out == ""
