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
    "READABLE_FORMATS",
    "CounterField",
    "Counters",
    "ShardedCheckpoints",
    "check_meta",
    "load_shard",
    "load_verified_shard",
    "new_checkpoint_id",
    "provenance",
    "remove_with_shard",
    "replica_shard_path",
    "require_shards",
    "save_shard",
    "shard_exists",
    "shard_problem",
]

#: the checkpoint entry holding the replicated algorithm state and the shard meta data
CHECKPOINT_KEY = "lightning_fedopt"
#: the layout version of :data:`CHECKPOINT_KEY` and of the shards. 2: the meta entry and every shard
#: carry the same random ``checkpoint_id`` (and a shard its rank, world size, step and strategy), so
#: that a shard proves which checkpoint it belongs to. Format 1 (no id) is still read.
CHECKPOINT_FORMAT = 2
#: the formats this version reads
READABLE_FORMATS = (1, 2)


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
    """Read rank ``rank``'s shard of the checkpoint at ``filepath``.

    ``weights_only`` defaults to True: a shard holds tensors and plain containers only, and a shard
    holding anything else (a crafted pickle) is refused before any of it runs. Pass False only for
    a shard you wrote yourself.
    """
    weights_only = True if weights_only is None else weights_only
    return checkpoint_io.load_checkpoint(replica_shard_path(filepath, rank), weights_only=weights_only)


def new_checkpoint_id(comm: Communicator, filepath: Any = None, finite: bool = True) -> str:
    """A fresh random id for the checkpoint being written, the same on every rank (a collective:
    one all-gather of 17 bytes per rank, purpose ``"control"``; the id is rank 0's 16 random bytes).

    ``finite``: whether this rank's weights are finite; when any rank's are not, every rank raises
    ``RuntimeError`` and nothing is written (rather than a checkpoint of NaN weights).
    """
    raw = torch.frombuffer(bytearray(bytes([int(bool(finite))]) + os.urandom(16)), dtype=torch.uint8)
    parts = comm.all_gather(raw, purpose="control").wait()
    bad = [r for r, p in enumerate(parts) if not int(p[0])]
    if bad:
        raise RuntimeError(
            f"lightning_fedopt: the weights of rank(s) {bad} are NaN/Inf; refusing to write checkpoint {filepath}"
        )
    return bytes(parts[0][1:].tolist()).hex()


def provenance(strategy: str, world_size: int, rank: int, step: int, checkpoint_id: str) -> dict[str, Any]:
    """What a shard records about the checkpoint it belongs to (plain values, format 2)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "strategy": strategy,
        "world_size": int(world_size),
        "rank": int(rank),
        "step": int(step),
        "checkpoint_id": checkpoint_id,
    }


def shard_problem(shard: Any, meta: dict[str, Any], rank: int, world_size: int) -> str | None:
    """Why ``shard`` is not rank ``rank``'s shard of the checkpoint whose meta entry is ``meta``
    (None when it is): another rank's (swapped), another checkpoint's (stale or foreign), another
    world size or strategy."""
    if not isinstance(shard, dict):
        return f"it holds a {type(shard).__name__}, not a shard"
    if shard.get("format") not in READABLE_FORMATS:
        return f"unsupported shard format {shard.get('format')!r}"
    if shard.get("rank") != rank:
        return f"it holds rank {shard.get('rank')!r}'s state, not rank {rank}'s (shards swapped?)"
    if shard.get("world_size") != world_size:
        return f"it was written by {shard.get('world_size')!r} ranks, the checkpoint by {world_size}"
    want = meta.get("checkpoint_id")
    if want is not None or shard.get("checkpoint_id") is not None:
        if shard.get("checkpoint_id") != want:
            return (
                f"it belongs to another checkpoint (id {shard.get('checkpoint_id')!r} at step "
                f"{shard.get('step')!r}; the checkpoint's is {want!r} at step {meta.get('step')!r}): "
                "a stale or foreign shard"
            )
    if "strategy" in shard and "strategy" in meta and shard["strategy"] != meta["strategy"]:
        return f"it was written by {shard['strategy']}, the checkpoint by {meta['strategy']}"
    return None


def load_verified_shard(
    comm: Communicator,
    checkpoint_io: CheckpointIO,
    filepath: Any,
    meta: dict[str, Any],
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """Read this rank's shard of the checkpoint at ``filepath`` and check that it belongs there
    (:func:`shard_problem`); a collective call.

    Every rank learns every rank's problem (one small all-gather of plain strings), so a missing,
    unreadable (truncated, or not tensors and plain containers), swapped, stale or foreign shard
    on any rank stops all of them with the same ``ValueError`` naming each file and what is
    wrong, instead of leaving the others in a later collective.
    """
    rank, world_size = comm.rank, comm.world_size
    path = replica_shard_path(filepath, rank)
    shard: Any = None
    problem: str | None = None
    if not get_filesystem(path).exists(path):
        problem = "missing (copy the whole '<checkpoint>.replicas' folder along with the checkpoint)"
    else:
        try:
            shard = load_shard(checkpoint_io, filepath, rank, weights_only=weights_only)
        except Exception as err:  # truncated, corrupt, or objects that weights_only refuses
            problem = (
                f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''})"
            )
        else:
            problem = shard_problem(shard, meta, rank, world_size)
    problems = comm.all_gather_object(None if problem is None else f"{path}: {problem}", purpose="control")
    bad = [r for r, p in enumerate(problems) if p is not None]
    if bad:
        raise ValueError(
            f"checkpoint {filepath}: the replica shard(s) of rank(s) {bad} are refused, nothing was loaded: "
            + "; ".join(problems[r] for r in bad)
        )
    return shard


def require_shards(comm: Communicator, filepath: Any, rank: int) -> None:
    """Raise ``FileNotFoundError`` on every rank if any rank's shard is missing (a collective call).

    Every rank learns whether any shard is missing, so that all of them stop and none hangs in a
    later collective.
    """
    path = replica_shard_path(filepath, rank)
    flag = torch.tensor([int(bool(get_filesystem(path).exists(path)))], dtype=torch.uint8)
    found = comm.all_gather(flag, purpose="control").wait()
    if not all(bool(f.item()) for f in found):
        missing = [r for r, ok in enumerate(found) if not bool(ok.item())]
        raise FileNotFoundError(
            f"the replica shard(s) of rank(s) {missing} of checkpoint {filepath} are missing "
            f"(rank {rank} looked for {path}); copy the whole '<checkpoint>.replicas' "
            "folder along with the checkpoint"
        )


def check_meta(meta: Any, checkpoint_path: Any, strategy: str) -> None:
    """Refuse to resume ``strategy`` from a checkpoint whose meta entry is of an unknown format or
    was written by another strategy (the same on every rank: it reads the same file)."""
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        fmt = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"checkpoint {checkpoint_path}: unsupported lightning_fedopt format {fmt!r}")
    if meta.get("strategy", strategy) != strategy:
        raise ValueError(
            f"checkpoint {checkpoint_path} was written by {meta['strategy']}; it cannot resume under "
            f"{strategy} (their algorithm and replica states differ). To start {strategy} from its "
            "weights, load them into the module (e.g. LightningModule.load_from_checkpoint) and call "
            "fit without ckpt_path"
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
            ckpt_id = new_checkpoint_id(self.comm, filepath)
            where = provenance(
                type(self).__name__, self.world_size, self.global_rank, self._counts.replica_step, ckpt_id
            )
            checkpoint[CHECKPOINT_KEY] = {
                **{k: where[k] for k in ("format", "strategy", "world_size", "step", "checkpoint_id")},
                "counters": self._counts.as_dict(),
                "algorithm": self.algorithm_state_dict(),
                "replica_shards": True,
            }
            shard = {
                **where,
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
        check_meta(meta, checkpoint_path, type(self).__name__)
        self._resume_meta = meta
        if meta.get("replica_shards") and meta["world_size"] == self.world_size:
            self._resume_shard = load_verified_shard(
                self.comm, self.checkpoint_io, checkpoint_path, meta, weights_only=weights_only
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
