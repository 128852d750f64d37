"""Hierarchical training: groups of ranks that act as one replica.

:class:`ReplicaGroups` is a mixin of :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`.
With ``group_size = g > 1`` consecutive blocks of ``g`` ranks (e.g. one node's GPUs, on fast links)
average their gradients at every step like DDP (the *inner* communicator) and stay identical; the
algorithm runs across the groups (slow links) over the *outer* communicator, rank ``j`` of each
group with rank ``j`` of the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from typing_extensions import override

from lightning_fedopt.comm import Communicator

__all__ = ["ReplicaGroups"]


class ReplicaGroups:
    """Mixin: the inner (within a group) and outer (across groups) communicators."""

    comm: Communicator
    group_size: int
    _outer_comm: Communicator | None
    _inner_comm: Communicator | None

    @property
    def outer_comm(self) -> Communicator:
        """The communicator the algorithm synchronises over: the world, or with ``group_size > 1``
        the same-position ranks of every group."""
        return self._outer_comm if self._outer_comm is not None else self.comm

    @property
    def outer_world_size(self) -> int:
        """Number of replicas the algorithm sees (groups count as one replica)."""
        return self.world_size // self.group_size  # type: ignore[attr-defined]

    @property
    def outer_rank(self) -> int:
        """This replica's index among :attr:`outer_world_size` (its group's index)."""
        return self.global_rank // self.group_size  # type: ignore[attr-defined]

    def _check_group_size(self, world_size: int) -> None:
        if world_size % self.group_size:
            raise ValueError(
                f"`group_size` ({self.group_size}) must divide the number of processes ({world_size})"
            )

    @override
    def _configure_launcher(self) -> None:
        self._check_group_size(self.num_nodes * self.num_processes)  # type: ignore[attr-defined]
        super()._configure_launcher()  # type: ignore[misc]

    def _setup_groups(self) -> None:
        """Create the intra-group and across-group process groups (once per process)."""
        g = self.group_size
        if g == 1 or self._outer_comm is not None:
            return
        world = self.world_size  # type: ignore[attr-defined]
        self._check_group_size(world)
        n_groups = world // g
        self._inner_comm = self.comm.split([list(range(k * g, (k + 1) * g)) for k in range(n_groups)])
        self._outer_comm = self.comm.split([list(range(j, world, g)) for j in range(g)])

    def _average_gradients_in_group(self) -> None:
        """Inside a group, every step: mean of the gradients over the fast links (like DDP)."""
        comm = self._inner_comm
        if comm is None or comm.world_size == 1:
            return
        optimizers = self.optimizers  # type: ignore[attr-defined]
        grads = [p.grad for opt in optimizers for group in opt.param_groups for p in group["params"]]
        grads = [gr for gr in grads if gr is not None]
        if grads:
            comm.all_reduce(grads, "mean", purpose="inner")

    def _group_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure``, followed by the gradient average in the group when there are groups."""
        if self._inner_comm is None:
            return closure

        def averaged() -> Any:  # gradients are averaged in the group before the optimizer uses them
            result = closure()
            self._average_gradients_in_group()
            return result

        return averaged
