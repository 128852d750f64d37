"""Gossip: decentralised SGD over a topology, point-to-point only.

Every ``gossip_every`` optimizer steps each replica runs ``gossip_steps = Q`` gossip steps. In
gossip step ``t`` replica ``i`` sends its model to its out-neighbours and receives its
in-neighbours' models, point-to-point (:meth:`~lightning_fedopt.comm.Communicator.exchange`, no
all-reduce), and merges them: with the default ``merge="mean"`` that is
``theta_i <- sum_j W_ij(t) theta_j`` (Lian et al., "Can Decentralized Algorithms Outperform
Centralized Algorithms?", NeurIPS 2017; Koloskova et al., "A Unified Theory of Decentralized SGD",
ICML 2020). ``Q > 1`` is DFedSAM-MGS and ``sam_rho`` makes the local optimizer SAM (DFedSAM, Shi et
al., "Improving the Model Consistency of Decentralized Federated Learning", ICML 2023,
arXiv 2302.04083): ``y <- y - lr * grad F(y + rho g / ||g||)``.

A robust ``merge`` (``"median"``, ``"trimmed_mean"``, ``"nna"``, ``"krum"``) replaces the weighted
mean over ``{own model} + received models`` (MoNNA, Farhadkhani et al., ICML 2023, is ``"nna"`` with a
momentum optimizer). Contributions are keyed by ``(replica, gossip round)`` and merged in canonical
order (:mod:`~lightning_fedopt.merging`), so the result does not depend on arrival order.

"A Single Merging Suffices" (arXiv 2507.06542): gossip sparsely (a sparse topology, a large
``gossip_every``), and merge globally once at the end (``final_sync=True``, the default) or at every
round from a fraction ``merge_from`` of training on (the paper's "truncate" schedule). Global merges
and the consensus model used for validation are the only collectives that carry models (an
all-reduce for the mean, an all-gather otherwise); gossip rounds send models point-to-point only
(each round meets the others in the 16-byte step/stop-flag check of every replica strategy).

NaN/Inf: a neighbour whose model is not finite is left out of the merge (the weights of the
others are renormalised); a replica whose own model is not finite is reset to the merge of its
finite neighbours, its optimizer state cleared, and the event reported.

Compressed gossip (``compressor=``) is CHOCO-gossip (:mod:`lightning_fedopt.strategies.gossip.choco`):
only compressed differences to public copies travel; global merges are exact and every copy
restarts from the merged model. DIMAT alignment (``align=``): ``strategies/_gossip_align.py``.

Hierarchical training (``group_size=g``): the gossip runs between the groups, over
``outer_world_size`` replicas; rank ``j`` of a group exchanges with rank ``j`` of its neighbour
groups, so the members of a group, which all-reduce their gradients every step, stay identical.
Every message goes through :meth:`GossipStrategy.gossip_exchange` (encode, send, decode).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._flat import flatten, group_by_dtype, unflatten
from lightning_fedopt._validate import check_choice, check_float, check_int, check_seed, check_str
from lightning_fedopt.compression import Compressor
from lightning_fedopt.merging import Contribution, ContributionSet, Merge, as_merge
from lightning_fedopt.runtime.reduce import NoFiniteReplicaError, all_finite, masked_sum
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.gossip.align import DimatAligner
from lightning_fedopt.strategies.gossip.choco import ChocoCopies, ChocoGossip, check_choco, choco_compressor
from lightning_fedopt.strategies.local_sgd.sam import perturbed, sam_offsets
from lightning_fedopt.strategies.replica import ReplicaStrategy
from lightning_fedopt.topology import TOPOLOGIES, Topology, from_matrix, make_topology

__all__ = ["ChocoCopies", "GossipStrategy", "choco_compressor"]

#: merge operators a gossip round can use (the others need a base model that gossip does not have)
GOSSIP_MERGES = ("mean", "weighted", "variance_corrected", "median", "trimmed_mean", "nna", "krum")


def _transfer(tensors: list[Tensor], move: Callable[[Tensor], dict[int, Tensor]]) -> dict[int, list[Tensor]]:
    """Move ``tensors`` as one flat buffer per dtype: ``move(flat)`` returns ``{peer: the buffer it
    delivered}``; the result is ``{peer: its tensors}``, shaped like ``tensors``."""
    out: dict[int, list[Tensor]] = {}
    for idx in group_by_dtype(tensors):
        part = [tensors[i] for i in idx]
        for peer, buf in move(flatten(part)).items():
            slot = out.setdefault(peer, list(tensors))
            for i, v in zip(idx, unflatten(buf, part)):
                slot[i] = v
    return out


class GossipStrategy(ReplicaStrategy):
    """Decentralised SGD: replicas average with their neighbours on a topology, point-to-point.

    Args:
        topology: ``"ring"``, ``"torus"``, ``"exponential"``, ``"one_peer_exponential"``,
            ``"random_matching"``, ``"fully_connected"``, a :class:`~lightning_fedopt.topology.Topology`
            or a doubly stochastic mixing matrix (``N x N``; ``N`` the number of groups with ``group_size``).
        gossip_every: optimizer steps between gossip rounds (>= 1), or a
            :class:`~lightning_fedopt.schedules.SyncSchedule`.
        gossip_steps: ``Q`` gossip steps per round (>= 1; DFedSAM-MGS).
        merge: how a replica combines its model with its neighbours': ``"mean"`` (the mixing
            weights ``W_ij``), ``"variance_corrected"``, or a robust operator (``"median"``,
            ``"trimmed_mean"``, ``"nna"``, ``"krum"``); a name or a :class:`~lightning_fedopt.merging.Merge`.
        sam_rho: SAM radius ``rho`` > 0 for the local steps (DFedSAM), None for the plain optimizer.
        align: ``"dimat"`` to align every received model's hidden units to this replica's by
            activation matching on the gossip step's training batch before merging, and to
            re-estimate BatchNorm statistics on it after (DIMAT, :mod:`lightning_fedopt.dimat`).
        align_module: attribute path of the ``nn.Sequential`` DIMAT permutes (default: the module's
            only ``nn.Sequential`` child); the first element of a training batch must be its input.
        merge_from: fraction of training in (0, 1] from which every round is a global merge instead of
            gossip ("A Single Merging Suffices", truncate schedule); None for gossip throughout (the
            final merge at the end of ``fit`` is ``final_sync``).
        topology_seed: seed of ``"random_matching"``'s round-seeded matchings.
        warmup_steps: gossip after every one of the first ``warmup_steps`` steps (>= 0).
        compressor: compress the gossip messages (CHOCO-gossip, :mod:`~lightning_fedopt.strategies.gossip.choco`):
            a :class:`~lightning_fedopt.compression.Compressor` without error feedback, or a name
            (``"int8"``, ``"int4"``, ``"fp16"``, ``"bf16"``, ``"sign"``, ``"topk"``; made with error feedback
            off); None for exact gossip. Needs a static topology and ``merge="mean"``/``"weighted"``.
        consensus_lr: CHOCO's consensus step size ``gamma`` in (0, 1] (only with ``compressor``). With an
            exact compressor ``gamma = 1`` is plain gossip; the more a compressor drops, the smaller
            ``gamma`` must be for the replicas to agree (the paper tunes it, e.g. 0.01-0.5).
        **kwargs: :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy` arguments
            (``evaluate``, ``final_sync``, ``group_size``, ``start_method``, ``timeout``, ...).

    Raises:
        ValueError: an argument out of range; a compressor CHOCO cannot use, or combined with a
            time-varying topology, a robust merge or DIMAT; DIMAT with ``group_size > 1``; at setup, a
            topology for a different number of replicas (groups), a robust merge with fewer neighbours
            than it needs, or SAM with manual optimization or gradient accumulation.

    Example:
        >>> import lightning as L
        >>> import lightning_fedopt as lf
        >>> trainer = L.Trainer(accelerator="cpu", devices=4, strategy=lf.GossipStrategy("ring", gossip_every=2))
        >>> choco = lf.GossipStrategy("ring", compressor=lf.compression.Int8(block=64), consensus_lr=0.5)
    """

    strategy_name = "gossip"

    def __init__(
        self,
        topology: str | Topology | Any = "ring",
        gossip_every: int | SyncSchedule = 1,
        *,
        gossip_steps: int = 1,
        merge: str | Merge = "mean",
        sam_rho: float | None = None,
        align: str | None = None,
        align_module: str | None = None,
        merge_from: float | None = None,
        topology_seed: int = 0,
        warmup_steps: int = 0,
        compressor: Compressor | str | None = None,
        consensus_lr: float = 1.0,
        **kwargs: Any,
    ) -> None:
        topology = _topology_spec(topology)
        self.gossip_steps = check_int("gossip_steps", gossip_steps, low=1)
        self.merge = as_merge(merge)
        if self.merge.method not in GOSSIP_MERGES:
            raise ValueError(
                f"`merge` {self.merge.method!r} cannot merge gossip neighbours (it needs a base model); "
                f"use one of {GOSSIP_MERGES}"
            )
        self.sam_rho = check_float("sam_rho", sam_rho, low=0, low_open=True, allow_none=True)
        self.align = check_choice("align", align, (None, "dimat"))
        self.merge_from = check_float("merge_from", merge_from, low=0, high=1, low_open=True, allow_none=True)
        self.topology_seed = check_seed("topology_seed", topology_seed)
        if not isinstance(gossip_every, SyncSchedule):
            check_int("gossip_every", gossip_every, low=1)
        align_module = check_str("align_module", align_module, allow_none=True)
        self.consensus_lr = check_float("consensus_lr", consensus_lr, low=0, high=1, low_open=True)
        self.compressor = choco_compressor(compressor) if compressor is not None else None
        if self.compressor is None and consensus_lr != 1:
            raise ValueError(
                "`consensus_lr` is the step size of compressed gossip (CHOCO); it needs `compressor`"
            )
        if self.compressor is not None:
            check_choco(topology, self.merge, align)
        super().__init__(gossip_every, warmup_steps=warmup_steps, **kwargs)
        if align is not None and self.group_size > 1:
            raise ValueError(
                "`align='dimat'` cannot be combined with `group_size` > 1: the members of a group would "
                "align on different batches and drift apart"
            )
        self.topology_spec = topology
        self.align_module = align_module
        self.topology: Topology | None = None
        self._aligner: DimatAligner | None = None
        self._choco: ChocoGossip | None = None
        self._round = 0  # gossip steps done so far (the round index of time-varying topologies)
        self._merged_step = 0  # replica step of the last global merge (replicas identical there)
        self._merge_from_step: int | None = None

    # ---------------------------------------------------------------- set-up and state
    @override
    def setup_algorithm(self) -> None:
        rank = self.outer_rank
        self.topology = make_topology(self.topology_spec, self.outer_world_size, seed=self.topology_seed)
        _check_merge_fits(self.merge, self.topology)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        self._merge_from_step = _merge_from_step(self.merge_from, trainer)
        if self.sam_rho is not None:
            _check_sam(self.lightning_module, trainer)
        self._aligner = None
        if self.align is not None:
            assert self.lightning_module is not None
            self._aligner = DimatAligner.for_module(self.lightning_module, self.align_module)
        self._round = 0
        self._merged_step = self.replica_step
        self._choco = None
        if self.compressor is not None:
            if self.topology.time_varying:
                raise ValueError(
                    f"`topology` {self.topology.name} changes between rounds; CHOCO-gossip (`compressor`) "
                    "needs a static one"
                )
            holders = [rank, *self.topology.in_neighbors(rank, 0)]
            # the replicas are identical here: so are the copies
            self._choco = ChocoGossip(self.compressor, self.consensus_lr, self.tracked_tensors(), holders)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._aligner is not None and self.schedule.should_sync(self.replica_step + 1):
            self._aligner.capture(batch)

    @override
    def algorithm_state_dict(self) -> dict[str, Any]:
        return {"round": self._round, "merged_step": self._merged_step}

    @override
    def load_algorithm_state_dict(self, state: dict[str, Any]) -> None:
        self._round = int(state.get("round", 0))
        self._merged_step = int(state.get("merged_step", -1))

    @override
    def replica_state_dict(self) -> dict[str, Any]:
        state = super().replica_state_dict()
        if self._choco is not None:  # the copies differ between replicas
            state["choco"] = self._choco.state_dict()
        return state

    @override
    def load_replica_state_dict(self, state: dict[str, Any]) -> None:
        super().load_replica_state_dict(state)
        if self._choco is not None:
            if state.get("choco") is None:
                raise ValueError(
                    "the checkpoint has no CHOCO-gossip state (it was written without `compressor`); "
                    "resume with the strategy it was written with"
                )
            self._choco.load_state_dict(state["choco"])

    @property
    def compression_ratio(self) -> float | None:
        """Uncompressed / compressed bytes of the gossip messages sent so far (None without a compressor)."""
        return self._choco.compression_ratio if self._choco is not None else None

    @override
    def local_is_consensus(self) -> bool:
        return self._merged_step == self.replica_step

    @override
    def after_final_sync(self) -> None:
        self._merged_step = self.replica_step
        if self._choco is not None:  # every replica holds the merged model: so does every copy
            self._choco.reset(self.tracked_tensors())

    @property
    def spectral_gap(self) -> float | None:
        """The topology's spectral gap (None before ``fit`` builds the topology)."""
        return self.topology.spectral_gap if self.topology is not None else None

    # ---------------------------------------------------------------- what crosses the network
    def outgoing_message(self, values: list[Tensor]) -> list[Tensor]:
        """What this replica sends of its model ``values`` (itself). Tests of faulty replicas override it."""
        return values

    def gossip_exchange(
        self, message: list[Tensor], sends_to: list[int], receives_from: list[int]
    ) -> dict[int, list[Tensor]]:
        """Send ``message`` to ``sends_to`` and receive one message from each of ``receives_from``
        (replicas of the topology: groups with ``group_size``), point-to-point: the one place where
        what is sent is encoded and what is received decoded.

        Without a compressor the message is a model, sent as one flat buffer per dtype. With one
        (CHOCO-gossip) it is ``x_i - x_hat_i``, compressed (:meth:`ChocoGossip.exchange
        <lightning_fedopt.strategies.gossip.choco.ChocoGossip.exchange>`); the result then also holds this
        replica's own message as the receivers decode it, under its own rank.
        """
        comm = self.outer_comm
        if self._choco is not None:
            raw = sum(t.numel() * t.element_size() for t in self.tracked_tensors())
            names = [n for n, _ in self.tracked_named_tensors()]
            return self._choco.exchange(comm, message, names, self.outer_rank, sends_to, receives_from, raw)

        def move(flat: Tensor) -> dict[int, Tensor]:
            bufs = {j: torch.empty_like(flat) for j in receives_from}
            comm.exchange(dict.fromkeys(sends_to, flat), bufs, purpose="sync").wait()
            return bufs

        return _transfer(message, move)

    # ---------------------------------------------------------------- gossip
    def gossip_step(self) -> dict[str, float]:
        """One gossip step: exchange with the neighbours of round ``self._round`` and merge (or, with
        a compressor, update the public copies and mix)."""
        assert self.topology is not None
        rank, t = self.outer_rank, self._round
        tensors = self.tracked_tensors()
        ins = self.topology.in_neighbors(rank, t)
        outs = self.topology.out_neighbors(rank, t)
        own = [v.detach().clone() for v in tensors]
        own_finite = all_finite(own)
        if self._choco is not None:
            residual = self._choco.residual(rank, self.outgoing_message(own))
            decoded = self.gossip_exchange(residual, outs, sorted(ins))
            new, bad = self._choco.mix(own, own_finite, decoded, rank, ins)
        else:
            received = self.gossip_exchange(self.outgoing_message(own), outs, sorted(ins))
            if self._aligner is not None:
                received = self._aligner.align_received(
                    [n for n, _ in self.tracked_named_tensors()], received
                )
            new, bad = self._merge_neighbours(own, own_finite, received, ins)
        with torch.no_grad():
            for dst, v in zip(tensors, new):
                dst.copy_(v)
        if self._aligner is not None:
            self._aligner.recompute_batchnorm()
        if bad:
            self.record_nonfinite(bad, local=not own_finite)
        if not own_finite:
            self.reset_optimizer_state()
        self._round += 1
        return {"excluded_nonfinite": float(bad)}

    def _merge_neighbours(
        self, own: list[Tensor], own_finite: bool, received: dict[int, list[Tensor]], ins: dict[int, float]
    ) -> tuple[list[Tensor], int]:
        """``merge`` over the finite ones of ``{own} + received`` (weights ``W_ij``): ``(model, left out)``."""
        assert self.topology is not None
        rank, t = self.outer_rank, self._round
        contributions = (
            [Contribution(rank, t, tuple(own), self.topology.self_weight(rank, t))] if own_finite else []
        )
        bad = 0 if own_finite else 1
        for j, model in received.items():
            if all_finite(model):
                contributions.append(Contribution(j, t, tuple(model), ins[j]))
            else:
                bad += 1
        if not contributions:
            raise NoFiniteReplicaError(self.replica_step, replicas=[rank, *received], what="merge")
        if len(contributions) < self.merge.min_contributions():  # too few for a robust operator: their mean
            return Merge("mean")(ContributionSet(contributions)), bad
        return self._merge_set(contributions, own if own_finite else None), bad

    def _merge_set(self, contributions: list[Contribution], reference: list[Tensor] | None) -> list[Tensor]:
        names = [n for n, _ in self.tracked_named_tensors()]
        if self.merge.method == "nna" and reference is None:  # a global merge: the same reference everywhere
            reference = Merge("median")(contributions)
        return self.merge(ContributionSet(contributions), reference=reference, names=names)

    # ---------------------------------------------------------------- global merges
    def global_merge_values(self, purpose: str = "consensus") -> list[Tensor]:
        """Every replica's (finite) model merged with ``merge``: an all-reduce for the mean, an all-gather otherwise."""
        message = self.outgoing_message([v.detach().clone() for v in self.tracked_tensors()])
        comm = self.outer_comm
        if self.merge.linear:
            return (
                masked_sum(comm, message, purpose=purpose).wait().mean(step=self.replica_step, what="merge")
            )
        gathered = _transfer(
            message, lambda flat: dict(enumerate(comm.all_gather(flat, purpose=purpose).wait()))
        )
        contributions = [
            Contribution(r, self.replica_step, tuple(model))
            for r, model in sorted(gathered.items())
            if all_finite(model)
        ]
        if not contributions:
            raise NoFiniteReplicaError(self.replica_step, what="merge")
        if len(contributions) < self.merge.min_contributions():
            return Merge("mean")(ContributionSet(contributions))
        return self._merge_set(contributions, None)

    @override
    def consensus_values(self) -> list[Tensor]:
        return self.global_merge_values()

    def in_merge_phase(self, step: int | None = None) -> bool:
        """Whether the round after optimizer step ``step`` is a global merge (``merge_from``)."""
        step = self.replica_step if step is None else step
        return self._merge_from_step is not None and step >= self._merge_from_step

    # ---------------------------------------------------------------- the round
    @override
    def sync(self) -> dict[str, float]:
        assert self.topology is not None
        tensors = self.tracked_tensors()
        info: dict[str, float] = {"spectral_gap": self.topology.spectral_gap}
        if self.track_consensus_distance:
            local = [t.detach().clone() for t in tensors]
            mean = self._plain_mean(local)
            info["consensus_distance"] = self.consensus_distance(local, mean, all_finite(local))
        if self.in_merge_phase():
            was_finite = self.is_finite()
            new = self.global_merge_values(purpose="sync")
            with torch.no_grad():
                for dst, v in zip(tensors, new):
                    dst.copy_(v)
            if not was_finite:
                self.record_nonfinite(1, local=True)
                self.reset_optimizer_state()
            self._merged_step = self.replica_step
            if self._choco is not None:  # the replicas agree on the merged model: so do the copies
                self._choco.reset(tensors)
            info["global_merge"] = 1.0
            return info
        bad = 0.0
        for _ in range(self.gossip_steps):
            bad += self.gossip_step()["excluded_nonfinite"]
        info["excluded_nonfinite"] = bad
        info["gossip_round"] = float(self._round)
        return info

    def _plain_mean(self, local: list[Tensor]) -> list[Tensor]:
        """The replicas' mean, for the consensus-distance metric (an all-reduce under purpose "metrics")."""
        s = masked_sum(self.outer_comm, local, purpose="metrics").wait()
        return [x / max(s.weight, 1.0) for x in s.sums]

    # ---------------------------------------------------------------- DFedSAM local steps
    @override
    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        if (
            self.sam_rho is not None
        ):  # with `group_size`, on the group's mean gradient: the members stay identical
            closure = _sam_closure(optimizer, closure, self.sam_rho, self.average_gradients_in_group)
        return super().optimizer_step(optimizer, closure, model, **kwargs)


def _topology_spec(topology: Any) -> str | Topology:
    """A topology name, a :class:`Topology`, or a mixing matrix made into one (``ValueError`` otherwise)."""
    if isinstance(topology, str):
        if topology not in TOPOLOGIES:
            raise ValueError(
                f"`topology` must be one of {sorted(TOPOLOGIES)} or a Topology, got {topology!r}"
            )
        return topology
    return topology if isinstance(topology, Topology) else from_matrix(topology)


def _check_merge_fits(merge: Merge, topology: Topology) -> None:
    """Refuse a robust ``merge`` that needs more models than a replica merges on ``topology``."""
    need = merge.min_contributions()
    rounds = topology.period or 16
    smallest = min(1 + len(topology.in_neighbors(r, t)) for r in range(topology.n) for t in range(rounds))
    if smallest < need and topology.n > 1:
        raise ValueError(
            f"`merge` {merge!r} needs {need} models per merge but on {topology.name} a replica "
            f"merges only {smallest} (its own and its neighbours'); use a denser topology or a smaller `f`"
        )


def _merge_from_step(merge_from: float | None, trainer: Any) -> int | None:
    """The first optimizer step whose round is a global merge (``merge_from`` of the training length)."""
    if merge_from is None:
        return None
    total = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None
    if total is None and trainer is not None:
        est = trainer.estimated_stepping_batches
        total = int(est) if math.isfinite(est) else None
    if total is None:
        raise ValueError("`merge_from` needs a finite length of training (set `max_steps` or `max_epochs`)")
    return max(1, math.ceil(merge_from * total - 1e-9))


def _check_sam(module: Any, trainer: Any) -> None:
    """Refuse SAM (``sam_rho``) where it cannot wrap the optimizer step's closure."""
    if module is not None and not module.automatic_optimization:
        raise ValueError("`sam_rho` (DFedSAM) needs automatic optimization")
    if trainer is not None and trainer.accumulate_grad_batches != 1:
        raise ValueError("`sam_rho` (DFedSAM) cannot be combined with `accumulate_grad_batches` > 1")


def _sam_closure(
    optimizer: Any, closure: Callable[[], Any], rho: float, on_gradient: Callable[[], None]
) -> Callable[[], Any]:
    """SAM: the gradient at ``y + rho g/||g||`` replaces the gradient at ``y`` (the step is taken at
    ``y``); ``on_gradient`` runs on ``g`` first (the group's gradient mean with ``group_size``)."""

    def sam() -> Any:
        loss = closure()
        first = getattr(closure, "_result", None)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        on_gradient()
        with perturbed(params, sam_offsets([p.grad for p in params], rho)):
            optimizer.zero_grad()
            closure()
        if first is not None:
            lightning_closure: Any = closure  # Lightning's Closure keeps the step's result
            lightning_closure._result = first  # Lightning reports the loss at y
        return loss

    return sam
