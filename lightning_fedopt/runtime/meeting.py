"""Ranks out of step: a clear error instead of a hang.

Replicas synchronise at the same optimizer step by construction, so a rank that fell out of step
(uneven epochs: one rank's loader has fewer batches; a rank that skipped optimizer steps under
manual optimization) does not show at a synchronisation: it shows when one rank reaches another
meeting point (validation, a checkpoint's barrier, the end of training) while the other is about
to synchronise. Two different collectives then wait for each other until the process-group
timeout (30 minutes by default).

:class:`MeetingPoints` (a part of :class:`~lightning_fedopt.strategies.ReplicaStrategy`,
``strategy.meeting``) makes every meeting point the same small collective, a *rendezvous*: an all-reduce (max) of two int64,
``[2 key + sigterm, -2 key]`` with ``key = 8 step + point`` (16 bytes), which gives every rank the
largest and the smallest key and whether any rank received SIGTERM. Before a
synchronisation step it replaces the SIGTERM broadcast that ran there anyway (no extra round trip);
it is also what Lightning's barriers become during ``fit``, and it runs once before a validation
during ``fit``, before a Lightning broadcast (a checkpoint's file name) and at the end of training.
When ranks meet at different steps or points, every rank learns it from the same all-reduce, then
all-gathers who is where and raises :class:`ReplicasOutOfStepError` naming each rank's step and
point.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_fedopt.comm import Communicator
from lightning_fedopt.errors import POINTS, ReplicasOutOfStepError

__all__ = ["POINTS", "MeetingPoints", "ReplicasOutOfStepError"]

SYNC, VALIDATION, END, BARRIER, BROADCAST = 1, 2, 3, 4, 5


class MeetingPoints:
    """The rendezvous that carries the step (see the module doc).

    Args:
        comm: the world communicator (read at each meeting: it changes per ``fit``).
        device: where the 16 bytes travel (NCCL needs a CUDA tensor).
        arrive: called before the collective with a description of the meeting (the fault
            handler's wait for every rank while their heartbeats live).
    """

    def __init__(
        self,
        comm: Callable[[], Communicator],
        device: Callable[[], torch.device],
        arrive: Callable[[str], None] | None = None,
    ) -> None:
        self._comm = comm
        self._device = device
        self._arrive = arrive

    def meet(self, point: int, step: int, sigterm: bool = False) -> bool:
        """Meet the other ranks at ``point`` (one of :data:`POINTS`) after optimizer step ``step``;
        returns whether any rank received SIGTERM. Raises :class:`ReplicasOutOfStepError` on every
        rank when they disagree."""
        step = int(step)
        if self._arrive is not None:
            self._arrive(f"the meeting of the ranks {POINTS.get(point, point)} after step {step}")
        comm, dev = self._comm(), self._device()
        key = 8 * step + point
        v = torch.tensor([2 * key + int(bool(sigterm)), -2 * key], dtype=torch.int64, device=dev)
        comm.all_reduce([v], "max", purpose="control")
        high, low = int(v[0]), -int(v[1])  # max(2 key + flag), 2 min(key)
        if high // 2 != low // 2:  # some rank's key is larger than the smallest
            mine = torch.tensor([step, point], dtype=torch.int64, device=dev)
            gathered = comm.all_gather(mine, purpose="control").wait()
            raise ReplicasOutOfStepError([(int(g[0]), int(g[1])) for g in gathered])
        return high - low == 1
