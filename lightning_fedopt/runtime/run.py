"""A replica's run state: its step counters and what happened in this ``fit``.

:class:`ReplicaRun` is one dataclass, owned by :class:`~lightning_fedopt.strategies.ReplicaStrategy`
as ``strategy.run`` and replaced by a fresh one when a new ``fit`` starts (not when a ``fit``
resumes: the checkpoint's counters are loaded into it). Its :class:`Counters` and NaN events are
what a replica's checkpoint shard keeps of it (through the strategy's state registry); the rest
lives for the ``fit``.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from typing import Any

log = logging.getLogger("lightning_fedopt")

__all__ = ["Counters", "ReplicaRun"]


@dataclasses.dataclass
class Counters:
    """A replica's step counters (saved in its shard as a plain dict of ints)."""

    #: optimizer steps taken (one per training batch in which any optimizer stepped)
    replica_step: int = 0
    #: steps since the last synchronisation
    steps_since_sync: int = 0
    #: synchronisations done
    sync_count: int = 0
    #: training samples since the last synchronisation (when the strategy counts them)
    samples_since_sync: int = 0
    #: steps this replica computed in the current round (``round_seconds``)
    effective_steps: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as ``{name: int}``, as the shards and the meta entry store them."""
        return {f.name: int(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_shard(cls, counters: dict[str, Any]) -> Counters:
        """A replica's own counters, from its shard (``effective_steps`` may be absent: 0)."""
        return cls(
            replica_step=int(counters["replica_step"]),
            steps_since_sync=int(counters["steps_since_sync"]),
            sync_count=int(counters["sync_count"]),
            samples_since_sync=int(counters["samples_since_sync"]),
            effective_steps=int(counters.get("effective_steps", 0)),
        )

    @classmethod
    def from_meta(cls, counters: dict[str, Any]) -> Counters:
        """Counters for a replica restarting from the consensus (rank 0's, at a round start)."""
        return cls(replica_step=int(counters["replica_step"]), sync_count=int(counters["sync_count"]))


@dataclasses.dataclass
class ReplicaRun:
    """The state of one ``fit`` on one replica (see the module doc)."""

    counts: Counters = dataclasses.field(default_factory=Counters)
    #: under manual optimization: an optimizer stepped in this batch (the batch end closes the step)
    stepped: bool = False
    #: seconds this replica computed in the current round (``round_seconds``)
    round_compute: float = 0.0
    #: the coming optimizer step is a skipped one (this replica's time in the round is spent)
    skip_step: bool = False
    #: steps computed in each finished round (``round_seconds`` runs)
    effective_history: list[int] = dataclasses.field(default_factory=list)
    #: what the last synchronisation reported
    last_sync: dict[str, float] = dataclasses.field(default_factory=dict)
    #: one entry per synchronisation at which some replica had non-finite weights
    nonfinite_events: list[dict[str, int]] = dataclasses.field(default_factory=list)
    #: the algorithm's state is set up (the replicas hold identical weights)
    algorithm_ready: bool = False
    #: training was closed at its last step (then ``on_train_end`` has nothing left to do)
    closed: bool = False
    #: the replica step of the last meeting before a synchronisation (one per step)
    checked_step: int | None = None
    #: inside an automatic optimizer step (Lightning has not counted the step yet)
    in_step: bool = False
    #: ``sync_every="auto"``: wall seconds between consecutive step ends without a synchronisation
    #: in between, this round (the loop's own time included: data, logging)
    step_walls: list[float] = dataclasses.field(default_factory=list)
    #: ``sync_every="auto"``: when the last step ended (after its synchronisation, if any)
    last_step_end: float | None = None
    #: ``sync_every="auto"``: seconds of each synchronisation since the last measurement
    sync_walls: list[float] = dataclasses.field(default_factory=list)

    # ------------------------------------------------------------------ the step's life
    def end_step(self) -> None:
        """Count one optimizer step."""
        self.counts.replica_step += 1
        self.counts.steps_since_sync += 1
        self.closed = False

    def close_round(self, keep_history: bool) -> None:
        """A round ended (a synchronisation, or the final one): its compute counters start again."""
        if keep_history:
            self.effective_history.append(self.counts.effective_steps)
        self.counts.effective_steps = 0
        self.round_compute = 0.0

    def note_step_end(self, now: float) -> None:
        """``sync_every="auto"``: a step ended at ``now`` (before any synchronisation after it)."""
        if self.last_step_end is not None:
            self.step_walls.append(now - self.last_step_end)

    def step_seconds(self) -> float | None:
        """The median wall time of the steps since the last measurement (None before two steps):
        robust to the slow first steps of a fit, to an occasional validation and to load spikes."""
        return statistics.median(self.step_walls) if self.step_walls else None

    def sync_seconds(self) -> float | None:
        """The median seconds of the synchronisations since the last measurement (None before one):
        one slow or fast synchronisation does not decide ``H``."""
        return statistics.median(self.sync_walls) if self.sync_walls else None

    def note_nonfinite(self, excluded: int, local: bool, rank: int) -> None:
        """Record a synchronisation that excluded ``excluded`` replicas with non-finite weights."""
        step = self.counts.replica_step
        self.nonfinite_events.append(
            {"step": step, "excluded": int(excluded), "rank": rank, "local": int(local)}
        )
        if local:
            log.warning(
                "lightning_fedopt: replica %d has non-finite weights at step %d; it was excluded from the "
                "average and reset to the result",
                rank,
                step,
            )
        elif rank == 0:
            log.warning(
                "lightning_fedopt: %d replica(s) with non-finite weights excluded at step %d", excluded, step
            )
