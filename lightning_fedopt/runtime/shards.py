"""Per-rank checkpoint shards: ``<checkpoint>.replicas/rank<r>.pt`` next to a checkpoint file.

A checkpoint file holds what is the same on every rank (for :class:`ReplicaStrategy
<lightning_fedopt.strategies.replica.ReplicaStrategy>`: the consensus model and a ``"lightning_fedopt"``
meta entry); what differs between ranks (a replica's weights, optimizer and algorithm state,
counters, RNG, a compressor's error feedback) goes to one shard per rank. This module is the one
place that knows where a shard lives and how it is written, read, found missing and removed;
:class:`~lightning_fedopt.runtime.checkpoints.ReplicaCheckpoints` is the replica strategies' checkpoint part
built on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from lightning_fedopt.comm import Communicator

log = logging.getLogger("lightning_fedopt")

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KEY",
    "READABLE_FORMATS",
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
