"""Lightning's own collectives (metric reduction, broadcast of plain values, barrier) through comm.py."""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
from lightning.fabric.utilities.types import ReduceOp
from torch import Tensor
from typing_extensions import override

from lightning_fedopt.comm import (
    CommStats,
    Communicator,
    destroy_process_group,
    init_process_group_per_attempt,
    process_group_initialized,
)

__all__ = ["CountedCollectives"]

_OPS = {"avg": "mean", "mean": "mean", "sum": "sum", "max": "max", "min": "min"}

# Process-wide: whether the exit handler is registered, and whether a Trainer entry point was
# interrupted by an exception since (then a peer may be stuck in a collective and tearing the group
# down could block, so the handler leaves the group to torch).
_EXIT_STATE = {"registered": False, "interrupted": False}


def _destroy_group_at_exit() -> None:
    """Destroy the default process group while the interpreter is still whole.

    A process that exits with a gloo group alive can abort during interpreter finalisation (gloo's
    worker threads release tensors after Python is gone: ``terminate called without an active
    exception``, exit status 134). Lightning never destroys the group because a ``Trainer`` may be
    used again (``fit`` then ``validate``), so the strategy does it once, at exit, if every entry
    point ended normally; after an exception it stays as torch leaves it.
    """
    if _EXIT_STATE["interrupted"] or not process_group_initialized():
        return
    try:
        destroy_process_group()
    except Exception:  # exit must not fail because the group was already half torn down
        pass


def _register_exit_cleanup() -> None:
    if not _EXIT_STATE["registered"]:
        atexit.register(_destroy_group_at_exit)
        _EXIT_STATE["registered"] = True


class CountedCollectives:
    """Mixin for ``DDPStrategy`` subclasses: every collective Lightning asks the strategy for goes
    through :class:`~lightning_fedopt.comm.Communicator` ``self.comm`` and is counted
    (``sync_dist`` reductions under purpose ``"metrics"``, broadcasts and barriers under ``"control"``).
    """

    comm: Communicator

    @property
    def comm_stats(self) -> CommStats:
        """Bytes sent/received, rounds and seconds of this rank's traffic (see :mod:`~lightning_fedopt.comm`)."""
        return self.comm.stats

    @override
    def setup_distributed(self) -> None:
        """Lightning's, except under one ``torchrun`` agent sharing its store with the workers: one
        store prefix per restart attempt (see :func:`~lightning_fedopt.comm.init_process_group_per_attempt`).
        Several agents count restarts each on their own, so there the prefix cannot be agreed on;
        ``elastic=True`` then asks for ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (``_faults``)."""
        single_agent = os.environ.get("GROUP_WORLD_SIZE", "1") == "1"  # restart counts agree
        if (
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and single_agent
            and not process_group_initialized()
        ):
            self.set_world_ranks()  # type: ignore[attr-defined]
            backend = self._get_process_group_backend()  # type: ignore[attr-defined]
            init_process_group_per_attempt(backend, self.global_rank, self.world_size, self._timeout)  # type: ignore[attr-defined]
        super().setup_distributed()  # type: ignore[misc]

    @override
    def setup_environment(self) -> None:
        super().setup_environment()  # type: ignore[misc]
        self.comm = Communicator(stats=self.comm.stats)
        if self.comm.available:
            _register_exit_cleanup()

    @override
    def on_exception(self, exception: BaseException) -> None:
        _EXIT_STATE["interrupted"] = True
        super().on_exception(exception)  # type: ignore[misc]

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean") -> Any:
        """Reduce a metric across ranks (``sync_dist=True``), counted under purpose ``"metrics"``."""
        parent = super().reduce  # type: ignore[misc]
        if not isinstance(tensor, Tensor) or group is not None or not self.comm.available:
            return parent(tensor, group=group, reduce_op=reduce_op)
        if isinstance(reduce_op, ReduceOp):
            op = {ReduceOp.SUM: "sum", ReduceOp.MAX: "max", ReduceOp.MIN: "min"}.get(reduce_op)
        else:
            op = _OPS.get((reduce_op or "mean").lower())
        if op is None:  # anything else (e.g. product): Lightning's own path
            return parent(tensor, group=group, reduce_op=reduce_op)
        out = tensor.detach().clone().contiguous()
        if op == "mean" and not torch.is_floating_point(out):
            out = out.float()
        self.comm.all_reduce([out], op, purpose="metrics")
        return out

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Broadcast a plain value from ``src`` (Lightning's control messages: checkpoint paths, flags,
        the learning-rate finder's results), counted as ``"control"``.

        It travels as JSON in a tensor (:meth:`~lightning_fedopt.comm.Communicator.broadcast_object`),
        never as a pickle; any other type raises :class:`~lightning_fedopt._plain.PlainValueError`
        on every rank.
        """
        return self.comm.broadcast_object(obj, src=src, purpose="control")

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """Wait for every rank, counted as ``"control"``."""
        self.comm.barrier(purpose="control", device_ids=self.determine_ddp_device_ids())  # type: ignore[attr-defined]
