"""Checkpoints of replica state: a registry of state functions, and the shard assembled from it.

:class:`ReplicaCheckpoints` (a part of :class:`~lightning_fedopt.strategies.ReplicaStrategy`,
``strategy.checkpoints``): a checkpoint file's ``state_dict`` is the consensus model (loadable by
plain Lightning/PyTorch), its ``"lightning_fedopt"`` entry holds the replicated state (format,
strategy, world size, step, counters, the algorithm's global state), and every rank writes its own
state to ``<checkpoint>.replicas/rank<r>.pt`` (:mod:`~lightning_fedopt.runtime.shards`).

What goes into a shard comes from a :class:`StateRegistry`: each part registers a
``(key, state_fn, load_fn)`` (as torchft's ``Manager.register_state_dict_fn``): the run's NaN
events, the algorithm's per-replica state, the communication statistics, the RNG. The
module's weights and the optimizer states are saved beside them and loaded through Lightning's own
hooks; the counters beside them too (a resume at another world size takes the meta entry's). Resuming with the same world size restores every replica exactly; with a different world
size every replica restarts from the consensus (the shards are not read).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lightning.fabric.plugins import CheckpointIO

from lightning_fedopt.comm import Communicator
from lightning_fedopt.runtime.shards import (
    CHECKPOINT_KEY,
    check_meta,
    load_verified_shard,
    new_checkpoint_id,
    provenance,
    save_shard,
)

log = logging.getLogger("lightning_fedopt")

__all__ = ["ReplicaCheckpoints", "StateRegistry"]

#: when a registered state is restored: once the algorithm is set up, or when training starts
PHASES = ("setup", "train_start")


class StateRegistry:
    """Named state functions whose values make up a replica's shard."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Callable[[], Any], Callable[[Any], None], str]] = {}

    def register(
        self, key: str, state_fn: Callable[[], Any], load_fn: Callable[[Any], None], phase: str = "setup"
    ) -> None:
        """Save ``state_fn()`` under ``key`` in every shard; on resume call ``load_fn(value)`` at
        ``phase`` (``"setup"``: once the algorithm is set up; ``"train_start"``: when training starts)."""
        if phase not in PHASES:
            raise ValueError(f"`phase` must be one of {PHASES}, got {phase!r}")
        if key in self._entries:
            raise ValueError(f"state {key!r} is registered twice")
        self._entries[key] = (state_fn, load_fn, phase)

    def keys(self) -> list[str]:
        """The registered keys, in registration order."""
        return list(self._entries)

    def state_dict(self) -> dict[str, Any]:
        """Every registered state."""
        return {key: state_fn() for key, (state_fn, _, _) in self._entries.items()}

    def load_state_dict(self, state: dict[str, Any], phase: str = "setup") -> None:
        """Restore the entries of ``phase`` that ``state`` holds (older shards may lack some)."""
        for key, (_, load_fn, when) in self._entries.items():
            if when == phase and key in state:
                load_fn(state[key])


class ReplicaCheckpoints:
    """Saving and resuming a replica strategy's checkpoints (see the module doc).

    Args:
        registry: the per-replica state saved in each rank's shard.
        strategy: the strategy's class name (recorded in the checkpoint and checked on resume).
    """

    def __init__(self, registry: StateRegistry, strategy: str) -> None:
        self.registry = registry
        self.strategy = strategy
        #: the meta entry of the checkpoint being resumed (None: not resuming)
        self.resume_meta: dict[str, Any] | None = None
        #: this rank's shard of the checkpoint being resumed (None: not resuming, or another world size)
        self.resume_shard: dict[str, Any] | None = None
        #: the module's weights came from this rank's shard (no start-up broadcast then)
        self.weights_from_shard = False

    @property
    def resuming(self) -> bool:
        """Whether a checkpoint is being resumed."""
        return self.resume_meta is not None

    def forget_resume(self) -> None:
        """The resume is over (or never started)."""
        self.resume_meta, self.resume_shard, self.weights_from_shard = None, None, False

    # ------------------------------------------------------------------ saving
    def save(
        self,
        checkpoint: dict[str, Any],
        filepath: Any,
        *,
        comm: Communicator,
        checkpoint_io: CheckpointIO,
        rank: int,
        world_size: int,
        counters: dict[str, int],
        algorithm_state: dict[str, Any],
        schedule_state: dict[str, Any] | None = None,
        module_state: dict[str, Any],
        optimizer_states: list[dict[str, Any]],
        per_replica_callbacks: set[str],
    ) -> None:
        """Add the meta entry to ``checkpoint`` and write this rank's shard (a collective call:
        the checkpoint id is agreed on)."""
        ckpt_id = new_checkpoint_id(comm, filepath)
        where = provenance(self.strategy, world_size, rank, counters["replica_step"], ckpt_id)
        checkpoint[CHECKPOINT_KEY] = {
            **{k: where[k] for k in ("format", "strategy", "world_size", "step", "checkpoint_id")},
            "counters": dict(counters),
            "algorithm": algorithm_state,
            "replica_shards": True,
            **({"schedule": schedule_state} if schedule_state is not None else {}),
        }
        shard = {
            **where,
            "module": module_state,
            "optimizer_states": optimizer_states,
            "counters": dict(counters),
            **self.registry.state_dict(),
        }
        # callbacks whose state differs between replicas (a curriculum's per-rank scores) keep
        # this rank's copy here; the checkpoint file itself holds rank 0's
        shard["callbacks"] = {
            k: v for k, v in checkpoint.get("callbacks", {}).items() if k in per_replica_callbacks
        }
        save_shard(checkpoint_io, shard, filepath, rank)

    # ------------------------------------------------------------------ resuming
    def load(
        self,
        checkpoint: dict[str, Any],
        checkpoint_path: Any,
        *,
        fitting: bool,
        comm: Communicator,
        checkpoint_io: CheckpointIO,
        weights_only: bool | None = None,
    ) -> None:
        """A checkpoint was read: when ``fitting``, check its meta entry and read this rank's shard
        (a collective call when the world size is the one that wrote it)."""
        meta = checkpoint.get(CHECKPOINT_KEY)
        self.resume_meta, self.resume_shard = None, None
        if not fitting or meta is None:
            return
        check_meta(meta, checkpoint_path, self.strategy)
        self.resume_meta = meta
        if meta.get("replica_shards") and meta["world_size"] == comm.world_size:
            shard = load_verified_shard(comm, checkpoint_io, checkpoint_path, meta, weights_only=weights_only)
            self.resume_shard = shard
            if shard.get("callbacks"):
                checkpoint.setdefault("callbacks", {}).update(shard["callbacks"])
        elif meta.get("replica_shards"):
            log.warning(
                "lightning_fedopt: checkpoint was written by %d replicas, resuming with %d; every replica "
                "restarts from the consensus weights",
                meta["world_size"],
                comm.world_size,
            )

    def restore(
        self,
        load_counters: Callable[[dict[str, Any], bool], None],
        load_algorithm_state: Callable[[dict[str, Any]], None],
        load_schedule: Callable[[dict[str, Any] | None], None] | None = None,
    ) -> None:
        """Once the algorithm is set up: the counters (this rank's own, or the consensus's),
        the algorithm's global state, and the registered per-replica state of the shard."""
        meta, shard = self.resume_meta, self.resume_shard
        assert meta is not None
        if shard is not None:
            load_counters(shard["counters"], True)
        else:
            load_counters(meta["counters"], False)
        load_algorithm_state(meta["algorithm"])
        if load_schedule is not None:
            load_schedule(meta.get("schedule"))
        if shard is not None:
            self.registry.load_state_dict(shard, phase="setup")

    def start_training(self) -> None:
        """When training starts: the registered state of that phase (the RNG), then the resume is over."""
        if self.resume_shard is not None:
            self.registry.load_state_dict(self.resume_shard, phase="train_start")
        self.forget_resume()
