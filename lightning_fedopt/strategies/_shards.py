"""Per-rank checkpoint shards: ``<checkpoint>.replicas/rank<r>.pt`` next to a checkpoint file.

A checkpoint file holds what is the same on every rank (for :class:`ReplicaStrategy
<lightning_fedopt.strategies.replica.ReplicaStrategy>`: the consensus model and a ``"lightning_fedopt"``
meta entry); what differs between ranks (a replica's weights, optimizer and algorithm state,
counters, RNG, a compressor's error feedback) goes to one shard per rank. This module is the one
place that knows where a shard lives and how it is written, read, found missing and removed;
:class:`ShardedCheckpoints` is the replica strategies' checkpoint plumbing built on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_fedopt.comm import Communicator

log = logging.getLogger("lightning_fedopt")

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KEY",
    "CounterField",
    "Counters",
    "ShardedCheckpoints",
    "load_shard",
    "remove_with_shard",
    "replica_shard_path",
    "require_shards",
    "save_shard",
    "shard_exists",
]

#: the checkpoint entry holding the replicated algorithm state and the shard meta data
CHECKPOINT_KEY = "lightning_fedopt"
#: the layout version of :data:`CHECKPOINT_KEY` and of the shards (1 since the first release)
CHECKPOINT_FORMAT = 1


def replica_shard_path(filepath: str | os.PathLike, rank: int) -> str:
    """Where rank ``rank`` keeps its replica state for the checkpoint at ``filepath``.

    ``<checkpoint>.replicas/rank<r>.pt`` next to the checkpoint; a local symbolic link (Lightning's
    ``save_last="link"``) leads to the shards of the checkpoint it points to. Remote paths
    (``s3://...``) are used as they are.
    """
    path = os.fspath(filepath)
    if "://" not in path:
        path = os.path.realpath(path)
    return f"{path}.replicas/rank{rank}.pt"


def shard_exists(filepath: str | os.PathLike, rank: int) -> bool:
    """Whether rank ``rank``'s shard of the checkpoint at ``filepath`` exists."""
    path = replica_shard_path(filepath, rank)
    return bool(get_filesystem(path).exists(path))


def save_shard(checkpoint_io: CheckpointIO, shard: dict[str, Any], filepath: Any, rank: int) -> None:
    """Write rank ``rank``'s ``shard`` of the checkpoint at ``filepath``."""
    checkpoint_io.save_checkpoint(shard, replica_shard_path(filepath, rank))


def load_shard(
    checkpoint_io: CheckpointIO, filepath: Any, rank: int, weights_only: bool | None = None
) -> dict[str, Any]:
    """Read rank ``rank``'s shard of the checkpoint at ``filepath``."""
    return checkpoint_io.load_checkpoint(replica_shard_path(filepath, rank), weights_only=weights_only)


def require_shards(comm: Communicator, filepath: Any, rank: int) -> None:
    """Raise ``FileNotFoundError`` on every rank if any rank's shard is missing (a collective call).

    Every rank learns whether any shard is missing, so that all of them stop and none hangs in a
    later collective.
    """
    path = replica_shard_path(filepath, rank)
    found = comm.all_gather_object(get_filesystem(path).exists(path), purpose="control")
    if not all(found):
        missing = [r for r, ok in enumerate(found) if not ok]
        raise FileNotFoundError(
            f"the replica shard(s) of rank(s) {missing} of checkpoint {filepath} are missing "
            f"(rank {rank} looked for {path}); copy the whole '<checkpoint>.replicas' "
            "folder along with the checkpoint"
        )


def remove_with_shard(
    checkpoint_io: CheckpointIO, filepath: Any, rank: int, remove_checkpoint: Callable[[Any], None]
) -> None:
    """Remove the checkpoint at ``filepath`` with ``remove_checkpoint``, then rank ``rank``'s shard.

    Removing a link (``save_last="link"``) leaves the linked checkpoint's shards alone; the
    ``.replicas`` folder goes once the last rank's shard is gone.
    """
    path = os.fspath(filepath)
    linked = "://" not in path and os.path.islink(path)
    shard = replica_shard_path(path, rank)  # before the link is gone: it resolves through it
    remove_checkpoint(filepath)
    fs = get_filesystem(shard)
    if not linked and fs.exists(shard):
        checkpoint_io.remove_checkpoint(shard)
        with contextlib.suppress(OSError):  # other ranks' shards may still be there
            fs.rmdir(os.path.dirname(shard))


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


class CounterField:
    """A strategy attribute (``_replica_step``, ...) stored in the strategy's :class:`Counters`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else getattr(obj._counts, self.name)

    def __set__(self, obj: Any, value: int) -> None:
        setattr(obj._counts, self.name, value)


class ShardedCheckpoints:
    """Mixin for :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`: checkpoints whose file
    is the consensus model plus a meta entry, with every replica's own state in its shard.

    Resuming with the same world size restores every replica exactly; with a different world size
    every replica restarts from the consensus.
    """

    _counts: Counters
    _resume_meta: dict[str, Any] | None
    _resume_shard: dict[str, Any] | None
    _weights_from_shard: bool

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if self._algorithm_ready and "optimizer_states" in checkpoint:
            checkpoint[CHECKPOINT_KEY] = {
                "format": CHECKPOINT_FORMAT,
                "strategy": type(self).__name__,
                "world_size": self.world_size,
                "counters": self._counts.as_dict(),
                "algorithm": self.algorithm_state_dict(),
                "replica_shards": True,
            }
            shard = {
                "format": CHECKPOINT_FORMAT,
                "rank": self.global_rank,
                "world_size": self.world_size,
                "module": self._local_module_state_dict(),
                "optimizer_states": [self.optimizer_state(opt) for opt in self.optimizers],
                "replica": self.replica_state_dict(),
                "counters": self._counts.as_dict(),
                "comm_stats": self.comm.stats.state_dict(),
                "nonfinite_events": list(self._nonfinite_events),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
            }
            # callbacks whose state differs between replicas (a curriculum's per-rank scores) keep
            # this rank's copy here; the checkpoint file itself holds rank 0's
            keys = self._per_replica_callback_keys()
            shard["callbacks"] = {k: v for k, v in checkpoint.get("callbacks", {}).items() if k in keys}
            save_shard(self.checkpoint_io, shard, filepath, self.global_rank)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    def _per_replica_callback_keys(self) -> set[str]:
        """State keys of the Trainer's callbacks that declare ``per_replica_state = True``."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None:
            return set()
        return {cb.state_key for cb in trainer.callbacks if getattr(cb, "per_replica_state", False)}

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        remove_with_shard(
            self.checkpoint_io,
            filepath,
            self.global_rank,
            super().remove_checkpoint,  # type: ignore[misc]
        )

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)  # type: ignore[misc]
        meta = checkpoint.get(CHECKPOINT_KEY)
        module = self.lightning_module
        fitting = (
            module is not None
            and module._trainer is not None
            and module.trainer.state.fn == TrainerFn.FITTING
        )
        self._resume_meta, self._resume_shard = None, None
        if not fitting or meta is None:
            return checkpoint
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint {checkpoint_path}: unsupported lightning_fedopt format {meta.get('format')!r}"
            )
        self._resume_meta = meta
        if meta.get("replica_shards") and meta["world_size"] == self.world_size:
            require_shards(self.comm, checkpoint_path, self.global_rank)
            self._resume_shard = load_shard(
                self.checkpoint_io, checkpoint_path, self.global_rank, weights_only=weights_only
            )
            if self._resume_shard.get("callbacks"):
                checkpoint.setdefault("callbacks", {}).update(self._resume_shard["callbacks"])
        elif meta.get("replica_shards"):
            log.warning(
                "lightning_fedopt: checkpoint was written by %d replicas, resuming with %d; every replica "
                "restarts from the consensus weights",
                meta["world_size"],
                self.world_size,
            )
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        self._consensus_cache = None
        if self._resume_shard is not None:
            assert self.lightning_module is not None
            self.lightning_module.load_state_dict(self._resume_shard["module"], strict=strict)
            self._weights_from_shard = True
            return
        super().load_model_state_dict(checkpoint, strict=strict)  # type: ignore[misc]

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if self._resume_shard is not None:
            checkpoint = {"optimizer_states": self._resume_shard["optimizer_states"]}
        super().load_optimizer_state_dict(checkpoint)  # type: ignore[misc]

    def _restore_from_resume(self) -> None:
        """Counters and algorithm state from the checkpoint being resumed (in ``configure_ddp``)."""
        meta, shard = self._resume_meta, self._resume_shard
        assert meta is not None
        if shard is not None:
            self._counts = Counters.from_shard(shard["counters"])
        else:
            self._counts = Counters.from_meta(meta["counters"])
        self.load_algorithm_state_dict(meta["algorithm"])
        if shard is not None:
            self.load_replica_state_dict(shard["replica"])
            self.comm.stats.load_state_dict(shard["comm_stats"])
            self._nonfinite_events = list(shard.get("nonfinite_events", []))

    @override
    def on_train_start(self) -> None:
        """This replica's RNG state from the resumed shard, then the resume is over."""
        shard = self._resume_shard
        if shard is not None:
            torch.set_rng_state(shard["rng"]["torch"])
            if shard["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(shard["rng"]["cuda"])
        self._forget_resume()

    def _forget_resume(self) -> None:
        self._resume_meta, self._resume_shard, self._weights_from_shard = None, None, False
