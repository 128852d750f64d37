"""The communicators of a strategy, and Lightning's own collectives counted through them.

* :class:`Communicators` (a part of :class:`~lightning_fedopt.strategies.ReplicaStrategy`, also
  used by the DDP baselines): the *world* communicator, and with ``group_size = g > 1`` the
  *inner* one (consecutive blocks of ``g`` ranks, e.g. one node's GPUs on fast links, that average
  their gradients at every step like DDP and stay identical) and the *outer* one (rank ``j`` of
  each group with rank ``j`` of the others: what the algorithm synchronises over). Lifetimes: the
  world communicator is opened at every Trainer entry point (``setup_environment``) and may be
  moved to a process group with the synchronisation deadline (``use_deadline``); the groups are
  built when the entry point sets up and dropped at its teardown (:meth:`Communicators.close`);
  a lost peer marks every one of them failed at once (:meth:`Communicators.fail`). The
  statistics (:class:`~lightning_fedopt.comm.CommStats`) outlive them all: one per strategy.
* :class:`CountedDDPStrategy`: Lightning's ``DDPStrategy`` whose collectives (``sync_dist``
  reductions under purpose ``"metrics"``, broadcasts and barriers under ``"control"``) go through
  the world communicator and are counted; the base of the replica strategies and of the DDP
  baselines.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from typing_extensions import override

from lightning_fedopt.comm import (
    CommStats,
    Communicator,
    FailureHandler,
    destroy_process_group,
    init_process_group_per_attempt,
    process_group_initialized,
)

__all__ = ["Communicators", "CountedDDPStrategy"]

_OPS = {"avg": "mean", "mean": "mean", "sum": "sum", "max": "max", "min": "min"}
#: torch's ReduceOp members the counted path handles, by name
_REDUCE_OPS = {"sum": "sum", "max": "max", "min": "min"}

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


class Communicators:
    """The world, inner and outer communicators of one strategy (see the module doc).

    Args:
        group_size: ranks per group (1: no groups; the outer communicator is the world).
    """

    def __init__(self, group_size: int = 1) -> None:
        self.group_size = group_size
        self.stats = CommStats()
        self.world = Communicator(stats=self.stats)
        self.inner: Communicator | None = None
        self._outer: Communicator | None = None

    @property
    def outer(self) -> Communicator:
        """What the algorithm synchronises over: the world, or the same-position ranks of every group."""
        return self._outer if self._outer is not None else self.world

    def all(self) -> list[Communicator]:
        """Every communicator that is open (the world first)."""
        return [c for c in (self.world, self.inner, self._outer) if c is not None]

    # ------------------------------------------------------------------ lifetimes
    def open(self) -> None:
        """At a Trainer entry point: a world communicator over the default process group (the
        groups of an earlier entry point are gone)."""
        self.close()
        self.world = Communicator(stats=self.stats)
        if self.world.available:
            _register_exit_cleanup()

    def use_deadline(self, seconds: float, on_failure: FailureHandler) -> Communicator:
        """Move the world communicator to a process group whose operations time out after
        ``seconds`` (a collective call) and return it."""
        self.world = self.world.with_deadline(seconds, on_failure)
        return self.world

    def check_group_size(self, world_size: int) -> None:
        """Raise ``ValueError`` when ``group_size`` does not divide ``world_size``."""
        if world_size % self.group_size:
            raise ValueError(
                f"`group_size` ({self.group_size}) must divide the number of processes ({world_size})"
            )

    def build_groups(self) -> None:
        """Create the inner and outer communicators from the world (a collective call; nothing
        with ``group_size=1``). Called when an entry point sets up."""
        g = self.group_size
        self.inner, self._outer = None, None
        if g == 1:
            return
        world = self.world.world_size
        self.check_group_size(world)
        n_groups = world // g
        self.inner = self.world.split([list(range(k * g, (k + 1) * g)) for k in range(n_groups)])
        self._outer = self.world.split([list(range(j, world, g)) for j in range(g)])

    def close(self) -> None:
        """At the end of an entry point: the groups are dropped (the world stays for Lightning's
        own teardown collectives)."""
        self.inner, self._outer = None, None

    def fail(self, err: BaseException) -> None:
        """A peer was lost: every later operation of every communicator raises ``err`` at once."""
        for c in self.all():
            c.failed = err

    # ------------------------------------------------------------------ inside a group
    def average_gradients_in_group(self, optimizers: list[Any]) -> None:
        """Inside a group, every step: the mean of the gradients over the fast links (like DDP)."""
        comm = self.inner
        if comm is None or comm.world_size == 1:
            return
        grads = [p.grad for opt in optimizers for group in opt.param_groups for p in group["params"]]
        grads = [gr for gr in grads if gr is not None]
        if grads:
            comm.all_reduce(grads, "mean", purpose="inner")

    def group_closure(
        self, closure: Callable[[], Any], optimizers: Callable[[], list[Any]]
    ) -> Callable[[], Any]:
        """``closure``, followed by the gradient average in the group when there are groups."""
        if self.inner is None:
            return closure

        def averaged() -> Any:  # gradients are averaged in the group before the optimizer uses them
            result = closure()
            self.average_gradients_in_group(optimizers())
            return result

        return averaged


class CountedDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` whose own collectives go through :attr:`comms` and are counted."""

    comms: Communicators

    @property
    def comm(self) -> Communicator:
        """The world communicator (every collective of this rank is counted in its statistics)."""
        return self.comms.world

    @property
    def comm_stats(self) -> CommStats:
        """Bytes sent/received, rounds and seconds of this rank's traffic (see :mod:`~lightning_fedopt.comm`)."""
        return self.comms.stats

    @override
    def setup_distributed(self) -> None:
        """Lightning's, except under one ``torchrun`` agent sharing its store with the workers: one
        store prefix per restart attempt (see :func:`~lightning_fedopt.comm.init_process_group_per_attempt`).
        Several agents count restarts each on their own, so there the prefix cannot be agreed on;
        ``elastic=True`` then asks for ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (``fault_tolerance.faults``)."""
        single_agent = os.environ.get("GROUP_WORLD_SIZE", "1") == "1"  # restart counts agree
        if (
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and single_agent
            and not process_group_initialized()
        ):
            self.set_world_ranks()
            backend = self._get_process_group_backend()
            timeout = self._timeout if self._timeout is not None else default_pg_timeout
            init_process_group_per_attempt(backend, self.global_rank, self.world_size, timeout)
        super().setup_distributed()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.comms.open()

    @override
    def on_exception(self, exception: BaseException) -> None:
        _EXIT_STATE["interrupted"] = True
        super().on_exception(exception)

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean") -> Any:
        """Reduce a metric across ranks (``sync_dist=True``), counted under purpose ``"metrics"``."""
        if not isinstance(tensor, Tensor) or group is not None or not self.comm.available:
            return super().reduce(tensor, group=group, reduce_op=reduce_op)
        if isinstance(reduce_op, ReduceOp):
            op = _REDUCE_OPS.get(str(reduce_op).rsplit(".", 1)[-1].lower())
        else:
            op = _OPS.get((reduce_op or "mean").lower())
        if op is None:  # anything else (e.g. product): Lightning's own path
            return super().reduce(tensor, group=group, reduce_op=reduce_op)
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
        never as a pickle; any other type raises :class:`~lightning_fedopt.errors.PlainValueError`
        on every rank.
        """
        return self.comm.broadcast_object(obj, src=src, purpose="control")

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """Wait for every rank, counted as ``"control"``."""
        self.comm.barrier(purpose="control", device_ids=self.determine_ddp_device_ids())
