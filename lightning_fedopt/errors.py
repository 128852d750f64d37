"""Every public exception of ``lightning_fedopt``, importable from here and from the package itself.

* :class:`AgreementError`: the ranks are configured differently (the start-up handshake).
* :class:`ReplicasOutOfStepError`: the ranks met at different steps or points of the loop.
* :class:`ReplicaLostError`: a peer died or stopped answering within ``sync_timeout``.
* :class:`PeerStoppedError`: under ``elastic=True``, another rank was stopped; this one stops so
  that its agent restarts it.
* :class:`NoFiniteReplicaError`: every replica of a synchronisation has non-finite weights.
* :class:`PlainValueError`: a control message that is not a plain value.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "POINTS",
    "AgreementError",
    "NoFiniteReplicaError",
    "PeerStoppedError",
    "PlainValueError",
    "ReplicaLostError",
    "ReplicasOutOfStepError",
]

#: the meeting points of the ranks, by code (see :mod:`lightning_fedopt.runtime.meeting`)
POINTS = {
    1: "about to synchronise",
    2: "at the start of a validation",
    3: "at the end of training",
    4: "in a Lightning barrier",
    5: "in a Lightning broadcast",
}


class PlainValueError(ValueError):
    """A value that cannot travel as a plain control message, or bytes that do not decode to one."""


class AgreementError(ValueError):
    """The ranks are configured differently (raised on every rank, before the first step)."""


class NoFiniteReplicaError(RuntimeError):
    """Every replica taking part in a synchronisation has non-finite weights: nothing is left to
    average. Resume from the last checkpoint (with a lower learning rate, or gradient clipping)."""

    def __init__(
        self, step: int | None = None, replicas: Sequence[int] | None = None, what: str = "average"
    ) -> None:
        who = "every participating replica" if replicas is None else f"replicas {sorted(replicas)} all"
        at = "" if step is None else f" at step {step}"
        super().__init__(
            f"lightning_fedopt: {who} {'has' if replicas is None else 'have'} non-finite weights{at}; "
            f"nothing is left to {what} (resume from the last checkpoint)"
        )
        self.step = step
        self.replicas = None if replicas is None else list(replicas)


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


class ReplicaLostError(RuntimeError):
    """One or more replicas stopped answering: dead, stopped or cut off.

    Attributes:
        ranks: the global ranks found lost (empty when none could be told apart).
        step: this rank's optimizer step when the loss was noticed.
        during: what the ranks were doing (e.g. ``"the synchronisation after step 8 (all_reduce)"``).
    """

    def __init__(self, ranks: list[int], step: int, during: str, detail: str = "") -> None:
        self.ranks = list(ranks)
        self.step = int(step)
        self.during = during
        who = (
            f"replica rank(s) {', '.join(map(str, self.ranks))}"
            if self.ranks
            else "a replica (which one could not be told: every heartbeat is alive; a network partition?)"
        )
        super().__init__(
            f"lightning_fedopt: lost {who} during {during} (this rank at step {self.step})"
            + (f": {detail}" if detail else "")
            + ". To keep training without it, run under torchrun's elastic agent with the strategy's "
            "`elastic=True` (it resumes from the last synchronisation point at the new world size)"
        )


class PeerStoppedError(RuntimeError):
    """Under ``elastic=True``: another rank received SIGTERM; this one stops after the checkpoint of
    the synchronisation point so that its agent restarts it into the next rendezvous."""

    def __init__(self, step: int) -> None:
        self.step = step
        super().__init__(
            f"lightning_fedopt: another rank received SIGTERM (torchrun's agent re-forming the job, or a "
            f"preemption); the checkpoint of step {step} is written and this rank stops so that its agent "
            "restarts it at the new world size"
        )
