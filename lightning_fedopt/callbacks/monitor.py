"""What crosses the network, logged to any Lightning logger."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_int, check_str
from lightning_fedopt.callbacks._scoring import log_every_n_steps
from lightning_fedopt.strategies.replica import ReplicaStrategy

__all__ = ["CommunicationMonitor"]


class CommunicationMonitor(Callback):
    """Logs this run's communication to every logger the Trainer has (wandb, CSV, TensorBoard, ...).

    At every synchronisation of a :class:`~lightning_fedopt.strategies.ReplicaStrategy` (and every
    ``log_every_n_steps`` steps for strategies that talk every step, such as
    :class:`~lightning_fedopt.strategies.MeteredDDPStrategy`) it logs, under ``prefix``:

    * ``bytes_sent``, ``bytes_received``, ``rounds``, ``seconds``: totals so far for this rank,
      under the cost model of :mod:`lightning_fedopt.comm`;
    * ``sync_bytes_sent``: the part spent on the algorithm's synchronisations;
    * ``sync_count``, ``sync_seconds`` (the last synchronisation's blocking time);
    * ``consensus_distance``: mean over replicas of ``||theta_i - theta_bar|| / ||theta_bar||``
      just before the replicas were combined (one extra scalar all-reduce per sync);
    * ``nonfinite_replicas``: replicas excluded so far because their weights were NaN/Inf;
    * ``spectral_gap``: the topology's spectral gap, for strategies that have one (gossip);
    * ``compression_ratio``: when the strategy reports one (a compressor is set);
    * with ``fault_tolerance="torchft"``: ``quorum_size`` (replica groups in the last round),
      ``heals`` (times this group healed from a peer), ``rounds_not_committed`` and
      ``quorum_seconds`` (totals so far).

    Metrics are logged from rank 0, as Lightning's loggers do. :attr:`history` keeps every row
    that was logged (on every rank) for programmatic use.

    Args:
        prefix: metric name prefix.
        consensus_distance: measure the consensus distance at synchronisations.
        log_every_n_steps: for strategies without sync points; default: the Trainer's setting.

    Example:
        >>> import lightning as L
        >>> monitor = CommunicationMonitor()
        >>> trainer = L.Trainer(strategy="local_sgd", devices=2, callbacks=[monitor])  # doctest: +SKIP
    """

    def __init__(
        self, prefix: str = "comm/", consensus_distance: bool = True, log_every_n_steps: int | None = None
    ) -> None:
        self.prefix = check_str("prefix", prefix)
        self.consensus_distance = check_bool("consensus_distance", consensus_distance)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, low=1, allow_none=True)
        self.history: list[dict[str, float]] = []
        self._last_sync_count = 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if self.consensus_distance and hasattr(strategy, "track_consensus_distance"):
            strategy.track_consensus_distance = True

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_sync_count = getattr(trainer.strategy, "sync_count", 0)

    def _metrics(self, trainer: Trainer) -> dict[str, float]:
        strategy: Any = trainer.strategy
        stats = getattr(strategy, "comm_stats", None)
        if stats is None:
            return {}
        m: dict[str, float] = {
            "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received,
            "rounds": stats.rounds,
            "seconds": stats.seconds,
            "sync_bytes_sent": stats.purpose("sync").bytes_sent,
        }
        if isinstance(strategy, ReplicaStrategy):
            last = strategy.last_sync
            m["sync_count"] = strategy.sync_count
            m["nonfinite_replicas"] = sum(e["excluded"] for e in strategy.nonfinite_events)
            if "sync_seconds" in last:
                m["sync_seconds"] = last["sync_seconds"]
            ft = strategy.fault_tolerance_stats
            if ft:
                m.update({k: v for k, v in ft.items()})
            d = last.get("consensus_distance")
            if d is not None and math.isfinite(d):
                m["consensus_distance"] = d
        gap = getattr(strategy, "spectral_gap", None)
        if gap is not None:
            m["spectral_gap"] = float(gap)
        ratio = getattr(strategy, "compression_ratio", None)
        if ratio is not None:
            m["compression_ratio"] = float(ratio)
        return {self.prefix + k: float(v) for k, v in m.items()}

    def _log(self, trainer: Trainer, in_batch: bool = True) -> None:
        metrics = self._metrics(trainer)
        if not metrics:
            return
        # the step Lightning logs this batch's metrics against (it counts batches that stepped, which
        # differs from global_step with several optimizers; incremented after on_train_batch_end)
        stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
        step = trainer.global_step if stepped is None else stepped + int(in_batch)
        self.history.append({"step": float(step), **metrics})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        strategy: Any = trainer.strategy
        if isinstance(strategy, ReplicaStrategy):
            if strategy.sync_count != self._last_sync_count:
                self._last_sync_count = strategy.sync_count
                self._log(trainer)
            return
        every = self.log_every_n_steps or log_every_n_steps(trainer)
        if trainer.global_step % every == 0:  # (one optimizer per step under DDP)
            self._log(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # totals after the final consensus synchronisation
        self._log(trainer, in_batch=False)
