"""Ranks out of step: a clear error instead of a hang.

Replicas synchronise at the same optimizer step by construction, so a rank that fell out of step
(uneven epochs: one rank's loader has fewer batches; a rank that skipped optimizer steps under
manual optimization) does not show at a synchronisation: it shows when one rank reaches another
meeting point (validation, a checkpoint's barrier, the end of training) while the other is about
to synchronise. Two different collectives then wait for each other until the process-group
timeout (30 minutes by default).

:class:`StepCheck` (a mixin of :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`) makes
every meeting point the same small collective, a *rendezvous*: an all-reduce (max) of two int64,
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

from typing import Any

import torch
from typing_extensions import override

__all__ = ["POINTS", "ReplicasOutOfStepError", "StepCheck"]

#: the meeting points, by code
POINTS = {
    1: "about to synchronise",
    2: "at the start of a validation",
    3: "at the end of training",
    4: "in a Lightning barrier",
    5: "in a Lightning broadcast",
}
SYNC, VALIDATION, END, BARRIER, BROADCAST = 1, 2, 3, 4, 5


class ReplicasOutOfStepError(RuntimeError):
    """The ranks met at different optimizer steps or different points of the training loop."""

    def __init__(self, where: list[tuple[int, int]]) -> None:
        parts = [
            f"rank {r} after step {step}, {POINTS.get(point, f'point {point}')}"
            for r, (step, point) in enumerate(where)
        ]
        super().__init__(
            "lightning_fedopt: the replicas are out of step: "
            + "; ".join(parts)
            + ". Every rank must take the same optimizer steps between meeting points: give every rank "
            "the same number of batches per epoch (e.g. Lightning's DistributedSampler, or drop_last / "
            "limit_train_batches), and under manual optimization step an optimizer in the same batches "
            "on every rank"
        )
        self.where = where


class StepCheck:
    """Mixin: the rendezvous that carries the step (see the module doc)."""

    #: the replica step of the last rendezvous before a synchronisation (one per step)
    _checked_step: int | None

    def _in_fit_loop(self) -> bool:
        """Whether this is ``fit`` after its first optimizer step, on several processes (ranks can
        only be out of step once they have stepped)."""
        trainer = getattr(self.lightning_module, "_trainer", None)  # type: ignore[attr-defined]
        return bool(
            trainer is not None
            and self._algorithm_ready  # type: ignore[attr-defined]
            and self._replica_step > 0  # type: ignore[attr-defined]
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and self.comm.available  # type: ignore[attr-defined]
            and self.comm.world_size > 1  # type: ignore[attr-defined]
        )

    def rendezvous(self, point: int, sigterm: bool = False) -> bool:
        """Meet the other ranks at ``point`` (one of :data:`POINTS`); returns whether any rank
        received SIGTERM. Raises :class:`ReplicasOutOfStepError` on every rank when they disagree."""
        step = int(self._replica_step)  # type: ignore[attr-defined]
        self._arrive(f"the meeting of the ranks {POINTS.get(point, point)} after step {step}")  # type: ignore[attr-defined]
        dev = self.root_device  # type: ignore[attr-defined]
        key = 8 * step + point
        v = torch.tensor([2 * key + int(bool(sigterm)), -2 * key], dtype=torch.int64, device=dev)
        self.comm.all_reduce([v], "max", purpose="control")  # type: ignore[attr-defined]
        high, low = int(v[0]), -int(v[1])  # max(2 key + flag), 2 min(key)
        if high // 2 != low // 2:  # some rank's key is larger than the smallest
            mine = torch.tensor([step, point], dtype=torch.int64, device=dev)
            gathered = self.comm.all_gather(mine, purpose="control").wait()  # type: ignore[attr-defined]
            raise ReplicasOutOfStepError([(int(g[0]), int(g[1])) for g in gathered])
        return high - low == 1

    def _rendezvous_in_fit(self, point: int) -> None:
        """:meth:`rendezvous` during ``fit`` (outside it, or on one process, nothing)."""
        if self._in_fit_loop():
            self.rendezvous(point)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """During ``fit`` a Lightning barrier is a rendezvous (itself a barrier) that checks every
        rank is at the same step; otherwise a plain barrier."""
        if self._in_fit_loop():
            self.rendezvous(BARRIER)
        else:
            super().barrier(*args, **kwargs)  # type: ignore[misc]

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """During ``fit``: first a rendezvous that checks every rank is at the same step."""
        self._rendezvous_in_fit(BROADCAST)
        return super().broadcast(obj, src)  # type: ignore[misc]
