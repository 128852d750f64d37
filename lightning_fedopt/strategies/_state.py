"""A replica's run state: its step counters, what its synchronisations reported, its NaN events.

:class:`ReplicaState` is a mixin of :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`.
The counters live in one :class:`~lightning_fedopt.strategies._shards.Counters` (``self._counts``,
saved in the checkpoint shards); ``self._replica_step`` and its siblings read and write it.
"""

from __future__ import annotations

import logging

from lightning_fedopt.strategies._shards import CounterField, Counters

log = logging.getLogger("lightning_fedopt")

__all__ = ["ReplicaState"]


class ReplicaState:
    """Mixin: the counters and the per-run records of a replica, with their public read-only views."""

    _counts: Counters
    _last_sync: dict[str, float]
    _nonfinite_events: list[dict[str, int]]
    _effective_history: list[int]

    # the step counters live in ``self._counts`` (a :class:`~._shards.Counters`, saved in the shards)
    _replica_step = CounterField("replica_step")
    _steps_since_sync = CounterField("steps_since_sync")
    _sync_count = CounterField("sync_count")
    _samples_since_sync = CounterField("samples_since_sync")
    _effective_steps = CounterField("effective_steps")

    @property
    def replica_step(self) -> int:
        """Optimizer steps this replica has taken (one per training batch in which any optimizer stepped)."""
        return self._replica_step

    @property
    def steps_since_sync(self) -> int:
        """Optimizer steps since the last synchronisation."""
        return self._steps_since_sync

    @property
    def sync_count(self) -> int:
        """Synchronisations done so far (the final one at the end of fit included)."""
        return self._sync_count

    @property
    def last_sync(self) -> dict[str, float]:
        """What the last synchronisation reported (step, seconds, excluded replicas, ...)."""
        return dict(self._last_sync)

    @property
    def nonfinite_events(self) -> list[dict[str, int]]:
        """One entry per synchronisation at which some replica had non-finite weights."""
        return list(self._nonfinite_events)

    @property
    def round_effective_steps(self) -> int:
        """Steps this replica computed in the current round (fewer than the round's batches when
        ``round_seconds`` cut it short)."""
        return self._effective_steps

    @property
    def effective_steps_history(self) -> list[int]:
        """Steps this replica computed in each finished round (``round_seconds`` runs)."""
        return list(self._effective_history)

    # ------------------------------------------------------------------ helpers for algorithms
    def record_nonfinite(self, excluded: int, local: bool) -> None:
        """Note a synchronisation that excluded ``excluded`` replicas with non-finite weights."""
        event = {
            "step": self._replica_step,
            "excluded": int(excluded),
            "rank": self.global_rank,
            "local": int(local),
        }
        self._nonfinite_events.append(event)
        if local:
            log.warning(
                "lightning_fedopt: replica %d has non-finite weights at step %d; it was excluded from the "
                "average and reset to the result",
                self.global_rank,
                self._replica_step,
            )
        elif self.global_rank == 0:
            log.warning(
                "lightning_fedopt: %d replica(s) with non-finite weights excluded at step %d",
                excluded,
                self._replica_step,
            )

    def reset_optimizer_state(self) -> None:
        """Forget this replica's optimizer state (after its weights were replaced by a non-finite reset)."""
        for opt in self.optimizers:
            opt.state.clear()
