"""``sync_every="auto"``: the ranks' measurements agreed in one all-reduce, and the period chosen
from them (:class:`~lightning_fedopt.schedules.AutoSync` holds the rule and the decisions)."""

from __future__ import annotations

import logging

import torch

from lightning_fedopt.comm import Communicator
from lightning_fedopt.schedules import AutoSync

log = logging.getLogger("lightning_fedopt")

__all__ = ["agree_sync_every"]


def agree_sync_every(
    schedule: AutoSync,
    comm: Communicator,
    device: torch.device,
    *,
    step: int,
    step_seconds: float,
    round_seconds: float | None,
    timed: bool = False,
    overlapped: bool = False,
    total_steps: int | None = None,
) -> dict[str, float]:
    """Every rank takes the slowest rank's compute time per step and one round's seconds, and
    :meth:`AutoSync.decide` the same ``H`` from them after ``step`` (one 32-byte all-reduce, max).

    The round's seconds are the largest rank's for a blocking round; for a ``timed`` one (a round
    timed from this rank's launch to its completion) the smallest: a rank that launched early
    counts its wait for the last one, which no ``H`` changes. ``round_seconds`` None on any rank
    (not known, e.g. the round was restored from a checkpoint): ``H`` stays. ``overlapped``: the
    round hides behind the next ``H`` steps (CO2's rule). ``total_steps``: the run's steps as
    this rank knows them (None: not known), agreed as the largest any rank knows (ranks whose
    epochs differ in length would otherwise cap ``H`` differently; :meth:`AutoSync.ceiling`).
    Returns what to log."""
    known = round_seconds is not None
    secs = float(round_seconds) if round_seconds is not None else 0.0
    steps = float(total_steps) if total_steps is not None and total_steps > 0 else 0.0
    measured = torch.tensor(
        [step_seconds, secs, -secs, 0.0 if known else 1.0, steps], dtype=torch.float64, device=device
    )
    comm.all_reduce([measured], "max", purpose="control")
    step_s = float(measured[0])
    sync_s = -float(measured[2]) if timed else float(measured[1])
    if float(measured[3]) > 0:
        log.info("lightning_fedopt: sync_every='auto': a round's time is not known on every rank; H stays")
        return {"measured_step_seconds": step_s}
    agreed_steps = int(measured[4]) or None
    every = schedule.decide(step, step_s, sync_s, overlapped=overlapped, total_steps=agreed_steps)
    ceiling = schedule.ceiling(agreed_steps)
    log.info(
        "lightning_fedopt: sync_every='auto': %.4f s per step, %.4f s per round%s -> H = %d (budget %.0f%%%s)",
        step_s,
        sync_s,
        " (overlapped)" if timed else "",
        every,
        100 * schedule.budget,
        f"; at most {ceiling}: {schedule.min_rounds} rounds in {agreed_steps} steps"
        if ceiling < schedule.high
        else "",
    )
    out = {"sync_every": float(every), "measured_step_seconds": step_s, "measured_sync_seconds": sync_s}
    if ceiling < schedule.high:
        out["sync_every_ceiling"] = float(ceiling)
    return out
