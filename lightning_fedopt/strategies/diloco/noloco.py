"""NoLoCo: no all-reduce at all — random pairs average point-to-point with an outer momentum.

Kolehmainen et al., "NoLoCo: No-all-reduce Low Communication Training Method for Large Models",
arXiv 2506.10911. Every ``H`` steps all replicas draw the same random permutation from an RNG
seeded by the round number and pair up along it (with an odd number of replicas the last one of
the permutation sits the round out). Each pair exchanges its tensors point-to-point; replica
``i`` of group ``G`` then updates its outer state:

* ``g = mean_{j in G} (theta_j - phi_j)``  (the group's mean local progress),
* ``phi_bar = mean_{j in G} phi_j``,
* ``m_i <- beta m_i + alpha g + alpha (phi_bar - phi_i)``,
* ``phi_i <- phi_i + m_i``; ``theta_i <- phi_i``.

The two terms share ``alpha``, and ``g + phi_bar - phi_i = mean_{j in G} theta_j - phi_i``: the update
needs only the partners' local models. So a message is ``theta_j`` (and a finite flag), one model's
worth of bytes, not the two (progress and global weights) the formula names; the result is the
same up to floating-point rounding (the tests check it against the formula as written).

Buffers (BatchNorm statistics) are averaged within the group; the consensus's statistics are
re-estimated for its weights when it is used (``bn_recalibration``, default 8 here, see
:mod:`~lightning_fedopt.runtime.batchnorm`). Nothing is broadcast or all-reduced during
training: a SIGTERM on one rank travels through the rendezvous store (every rank stops after the
same synchronisation, two rounds ahead, with a checkpoint), and ranks that fall out of step, e.g.
with uneven epochs, are caught at the next validation or the end of training only, by the
rendezvous of :mod:`~lightning_fedopt.runtime.meeting`, not before a pair exchange.
Evaluation and the final model use the mean of all replicas (an all-reduce at those points only).

No ``compressor=``: a pair's message is absolute state (the partner's model), and partners change
every round, so there is no copy both sides share to send differences against (CHOCO's public
copies need fixed neighbours, :class:`~lightning_fedopt.strategies.gossip.GossipStrategy`) and no
fixed receiver for error feedback to compensate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._flat import flatten, unflatten
from lightning_fedopt._validate import check_float, check_int, check_seed
from lightning_fedopt.errors import PeerStoppedError
from lightning_fedopt.fault_tolerance.faults import FaultHandler, StopPolicy
from lightning_fedopt.runtime.reduce import NoFiniteReplicaError, masked_sum
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.replica import ReplicaStrategy

__all__ = ["NoLoCoStrategy", "pair_groups"]

log = logging.getLogger("lightning_fedopt")


def pair_groups(round_index: int, world_size: int, seed: int = 0) -> list[list[int]]:
    """The groups of round ``round_index``: consecutive pairs of a round-seeded permutation (the
    same on every rank); with an odd ``world_size`` the last replica is alone.

    Example:
        >>> groups = pair_groups(3, 5)
        >>> sorted(len(g) for g in groups)
        [1, 2, 2]
        >>> sorted(r for g in groups for r in g)
        [0, 1, 2, 3, 4]
    """
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(round_index) * 104_729 + 31) % 2**64)
    perm = torch.randperm(world_size, generator=gen).tolist()
    groups = [sorted(perm[k : k + 2]) for k in range(0, world_size - 1, 2)]
    if world_size % 2:
        groups.append([perm[-1]])
    return groups


class StopThroughStore:
    """NoLoCo's stop policy: without a global meeting point a SIGTERM travels through the rendezvous
    store. The signalled rank asks every rank to stop after the synchronisation two rounds ahead (the
    replicas drift apart by less); before each synchronisation every rank reads the store (a few
    bytes, no collective) and stops, with a checkpoint, after that one
    (:mod:`~lightning_fedopt.fault_tolerance.faults`)."""

    def before_sync(self, faults: FaultHandler, meet: Callable[[bool], bool]) -> None:
        live = faults.liveness
        host = faults.host
        if live is None or not live.available:  # one process, or no TCP store: each rank on its own
            if faults.sigterm_received:
                raise SIGTERMException()
            return
        if faults.sigterm_received:
            live.request_stop(host.sync_count + 2)
        target = live.stop_target()
        if target is None:
            return
        if host.sync_count > target:  # already past it: cannot meet the others there
            raise PeerStoppedError(host.replica_step)
        if host.sync_count == target:
            faults.agree_to_stop()


class NoLoCoStrategy(ReplicaStrategy):
    """NoLoCo: every ``H`` steps random pairs of replicas average point-to-point, with outer momentum.

    Args:
        sync_every: ``H`` (>= 1) or a :class:`~lightning_fedopt.schedules.SyncSchedule`.
        outer_lr: ``alpha`` (> 0), weight of the group's progress and of the pull toward the
            group's mean global weights.
        outer_momentum: ``beta`` in [0, 1).
        seed: seed of the round-seeded pairing.
        **kwargs: :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy` arguments
            (``bn_recalibration`` defaults to 8: the consensus's BatchNorm statistics are
            re-estimated when it is used, at the cost of 8 forward passes without gradients and one
            all-reduce of the statistics per validation, checkpoint and end of fit).

    Example:
        >>> import lightning as L
        >>> import lightning_fedopt as lf
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=lf.NoLoCoStrategy(sync_every=50))
    """

    strategy_name = "noloco"
    #: the consensus is not the mean of the weights the statistics were estimated with
    default_bn_recalibration = 8

    def __init__(
        self,
        sync_every: int | SyncSchedule = 50,
        *,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.5,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(sync_every, SyncSchedule):
            sync_every = check_int("sync_every", sync_every, low=1)
        outer_lr = check_float("outer_lr", outer_lr, low=0.0, low_open=True)
        outer_momentum = check_float("outer_momentum", outer_momentum, low=0.0, high=1.0, high_open=True)
        if kwargs.pop("compressor", None) is not None:
            raise ValueError(
                "`compressor` is not supported by NoLoCoStrategy: its messages are the partners' global "
                "weights and partners change every round, so there is nothing shared to compress against "
                "(see the module doc); GossipStrategy(compressor=...) compresses gossip on a static topology"
            )
        if kwargs.get("group_size", 1) != 1:
            raise ValueError("`group_size` > 1 is not supported by NoLoCoStrategy (it has no all-reduce)")
        super().__init__(sync_every, **kwargs)
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.seed = check_seed("seed", seed)
        #: ``phi_i``: this replica's outer weights (they differ between replicas)
        self._outer_weights: list[Tensor] = []
        self._momentum: list[Tensor] = []
        self._is_param: list[bool] = []

    # ---------------------------------------------------------------- state
    @override
    def setup_algorithm(self) -> None:
        module = self.lightning_module
        assert module is not None
        names = {name for name, _ in module.named_parameters()}
        self._is_param = [name in names for name, _ in self.tracked_named_tensors()]
        self._outer_weights = [t.detach().clone() for t in self.tracked_tensors()]
        self._momentum = [torch.zeros_like(t) for t in self.tracked_tensors()]

    @override
    def replica_state_dict(self) -> dict[str, Any]:
        # phi_i and m_i differ between replicas: they live in each rank's shard
        return {
            "global": [g.detach().cpu().clone() for g in self._outer_weights],
            "momentum": [m.detach().cpu().clone() for m in self._momentum],
        }

    @override
    def load_replica_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("global", [])) == len(self._outer_weights):
            with torch.no_grad():
                for dst, src in zip(self._outer_weights, state["global"]):
                    dst.copy_(src)
                for dst, src in zip(self._momentum, state["momentum"]):
                    dst.copy_(src)

    @override
    def after_final_sync(self) -> None:
        with torch.no_grad():
            for g, t in zip(self._outer_weights, self.tracked_tensors()):
                g.copy_(t)

    @override
    def stop_policy(self) -> StopPolicy:
        """No global meeting point: a SIGTERM travels through the rendezvous store (:class:`StopThroughStore`)."""
        return StopThroughStore()

    # ---------------------------------------------------------------- the round
    def groups(self, round_index: int) -> list[list[int]]:
        """The pairs of round ``round_index`` (identical on every rank)."""
        return pair_groups(round_index, self.world_size, self.seed)

    @override
    def sync(self) -> dict[str, float]:
        tensors = self.tracked_tensors()
        me = self.global_rank
        group = next(g for g in self.groups(self.sync_count) if me in g)
        finite = self.is_finite(tensors)
        with torch.no_grad():
            # one message: the local model and a finite flag (in the weights' dtype when they share one)
            dtype = tensors[0].dtype if len({t.dtype for t in tensors}) == 1 else torch.float64
            flag = torch.tensor([float(finite)], dtype=dtype, device=tensors[0].device)
            mine = torch.cat([flatten(tensors, dtype), flag])
        members: dict[int, Tensor] = {me: mine}
        peers = [j for j in group if j != me]
        if peers:
            recvs = {j: torch.empty_like(mine) for j in peers}
            self.comm.exchange(dict.fromkeys(peers, mine), recvs, purpose="sync").wait()
            members.update(recvs)
        ok = [j for j in sorted(members) if float(members[j][-1]) == 1.0]
        n_bad = len(members) - len(ok)
        if not ok:
            raise NoFiniteReplicaError(self.replica_step, replicas=sorted(members))
        # mean model of the group's finite members: alpha (g + phi_bar - phi_i) = alpha (theta_bar - phi_i)
        total = members[ok[0]][:-1].clone()
        for j in ok[1:]:
            total += members[j][:-1]
        theta_bar = unflatten(total / len(ok), tensors)
        a, b = self.outer_lr, self.outer_momentum
        with torch.no_grad():
            for i, t in enumerate(tensors):
                if not self._is_param[i]:
                    self._outer_weights[i].copy_(theta_bar[i])  # buffers: the group's mean
                elif finite:
                    m = self._momentum[i]
                    m.mul_(b).add_(theta_bar[i] - self._outer_weights[i], alpha=a)
                    self._outer_weights[i].add_(m)
                else:  # a diverged replica restarts from its finite partners' mean model
                    self._momentum[i].zero_()
                    self._outer_weights[i].copy_(theta_bar[i])
                t.copy_(self._outer_weights[i])
        if n_bad:
            self.record_nonfinite(n_bad, local=not finite)
        if not finite:
            self.reset_optimizer_state()
        return {"group_size": float(len(group)), "excluded_nonfinite": float(n_bad)}

    @override
    def consensus_values(self) -> list[Tensor]:
        """The mean of all replicas with finite weights (one all-reduce; evaluation and the end only)."""
        result = masked_sum(
            self.comm,
            self.tracked_tensors(),
            purpose="consensus",
            counters_dtype=torch.float64,
            device=self.root_device,
        ).wait()
        return result.mean(step=self.replica_step)

    @override
    def local_is_consensus(self) -> bool:
        return self.world_size == 1
