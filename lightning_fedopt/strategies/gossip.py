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
and the consensus model used for validation are the only collectives (an all-reduce for the mean,
an all-gather for the other operators); gossip rounds are point-to-point only.

NaN/Inf: a neighbour whose model is not finite is left out of the merge (the weights of the
others are renormalised); a replica whose own model is not finite is reset to the merge of its
finite neighbours, its optimizer state cleared, and the event reported.

Compressed gossip (``compressor=``): CHOCO-gossip (Koloskova, Stich & Jaggi, "Decentralized
Stochastic Optimization and Gossip Algorithms with Compressed Communication", ICML 2019, Algorithm 2,
CHOCO-SGD). Replica ``i`` keeps public copies ``x_hat_j`` of itself and of its in-neighbours (they start
at the common initial model, so every holder of ``x_hat_j`` has the same one). A gossip step is::

    q_i      = C(x_i - x_hat_i)                    # compressed, sent to the out-neighbours
    x_hat_j <- x_hat_j + q_j    for j in N(i) + {i} # every holder applies the same decoded q_j
    x_i     <- x_i + gamma * sum_j W_ij (x_hat_j - x_hat_i)

with the consensus step size ``gamma = consensus_lr`` in (0, 1]. Only ``q_i`` travels (at the
compressor's size, one byte of finite-flag per message). The copies follow each neighbour's model,
so what was not sent is sent later (CHOCO is its own error feedback: the compressor's must be off).
The copies and the compressor's state (per tensor name, under ``"gossip/<name>"``) are per-replica
state in the replica shards, so a resume continues exactly. The topology must be static: with a
time-varying one a replica's copy of a neighbour would miss the messages sent to others. A replica
whose model is not finite sends nothing that round (every copy of it stays), and restarts from its
own public copy mixed with its neighbours'. Global merges (``merge_from``, the final merge) are
exact, and every copy restarts from the merged model.

Every message goes through one place, :meth:`GossipStrategy.gossip_exchange`, which encodes what
is sent and decodes what is received.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_fedopt.compression import COMPRESSORS, Compressor, ErrorControl, RandomProjection, TopK
from lightning_fedopt.merging import Contribution, ContributionSet, Merge, as_merge
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.replica import ReplicaStrategy
from lightning_fedopt.topology import TOPOLOGIES, Topology, from_matrix, make_topology

__all__ = ["ChocoCopies", "GossipStrategy", "choco_compressor"]

log = logging.getLogger("lightning_fedopt")

#: merge operators a gossip round can use (the others need a base model that gossip does not have)
GOSSIP_MERGES = ("mean", "weighted", "variance_corrected", "median", "trimmed_mean", "nna", "krum")


#: topologies whose mixing matrix changes between rounds (CHOCO needs a static one)
_TIME_VARYING = ("one_peer_exponential", "random_matching")


def choco_compressor(spec: Any) -> Compressor:
    """The compressor of CHOCO-gossip's messages, from a :class:`~lightning_fedopt.compression.Compressor`
    or a name (made with its error feedback off).

    CHOCO's public copies already carry what a message left out into the next ones, so the
    compressor's own error feedback must be off (a second accumulation of the same residual
    overshoots); DGC's momentum correction is for gradients; EControl keeps a shared estimate
    of its own, and a random projection is not contractive (``||C(x) - x||`` can exceed ``||x||``),
    which CHOCO's consensus needs.

    Raises:
        ValueError: naming ``compressor``, for any other value or one of the options above.

    Example:
        >>> choco_compressor("sign")
        Sign(error_feedback=False)
    """
    if isinstance(spec, str):
        if spec not in COMPRESSORS:
            raise ValueError(
                f"`compressor` must be a Compressor or one of {sorted(COMPRESSORS)}, got {spec!r}"
            )
        comp = COMPRESSORS[spec]()
        if getattr(comp, "error_feedback", False):
            comp.error_feedback = False  # type: ignore[attr-defined]
    elif isinstance(spec, Compressor):
        comp = spec
    else:
        raise ValueError(
            f"`compressor` must be a Compressor, one of {sorted(COMPRESSORS)} or None, got {spec!r}"
        )
    if isinstance(comp, (ErrorControl, RandomProjection)):
        raise ValueError(
            f"`compressor` {comp!r} cannot compress CHOCO-gossip messages: it needs a contractive compressor "
            "without a shared estimate of its own (fp16, bf16, int8, int4, sign, topk)"
        )
    if getattr(comp, "error_feedback", False):
        raise ValueError(
            f"`compressor` {comp!r}: CHOCO-gossip is its own error feedback (the public copies carry what a "
            "message left out); pass the compressor with error_feedback=False"
        )
    if isinstance(comp, TopK) and comp.momentum > 0:
        raise ValueError(
            f"`compressor` {comp!r}: DGC's momentum correction is for gradients; CHOCO-gossip needs momentum=0"
        )
    return comp


class ChocoCopies:
    """CHOCO-gossip's public copies ``x_hat_j`` held by one replica (pure: no communication).

    ``hat[j]`` is replica ``j``'s public copy, for this replica and its in-neighbours, in float32.
    All start at the same model (the replicas' common initial weights), and every holder of
    ``x_hat_j`` adds the same decoded messages, so the copies agree across replicas.

    Example:
        >>> import torch
        >>> c = ChocoCopies([torch.zeros(2)], holders=[0, 1])
        >>> c.residual(0, [torch.tensor([1.0, 2.0])])
        [tensor([1., 2.])]
        >>> c.receive(0, [torch.tensor([1.0, 2.0])])          # an exact message
        >>> c.mix([torch.tensor([1.0, 2.0])], 0, {0: 0.5, 1: 0.5}, gamma=1.0)
        [tensor([0.5000, 1.0000])]
    """

    def __init__(self, values: list[Tensor], holders: list[int]) -> None:
        self.hat: dict[int, list[Tensor]] = {}
        self.reset(values, holders)

    def reset(self, values: list[Tensor], holders: list[int] | None = None) -> None:
        """Every copy := ``values`` (the replicas agree on them: at the start, after a global merge)."""
        holders = sorted(self.hat) if holders is None else sorted(holders)
        self.hat = {j: [v.detach().float().clone() for v in values] for j in holders}

    def residual(self, rank: int, values: list[Tensor]) -> list[Tensor]:
        """``x_i - x_hat_i``: what replica ``rank`` compresses and sends."""
        return [v.detach().float() - h for v, h in zip(values, self.hat[rank])]

    def receive(self, j: int, q: list[Tensor]) -> None:
        """``x_hat_j <- x_hat_j + q_j`` (``q_j`` decoded, the same bits on every holder)."""
        for h, d in zip(self.hat[j], q):
            h.add_(d.reshape(h.shape).float())

    def mix(self, values: list[Tensor], rank: int, weights: dict[int, float], gamma: float) -> list[Tensor]:
        """``x_i + gamma * sum_j W_ij (x_hat_j - x_hat_i)`` over ``weights`` = ``{j: W_ij}`` (``j != i``)."""
        own = self.hat[rank]
        out = []
        for k, v in enumerate(values):
            acc = torch.zeros_like(own[k])
            for j in sorted(weights):
                if j != rank:
                    acc.add_(self.hat[j][k] - own[k], alpha=weights[j])
            out.append((v.detach().float() + gamma * acc).to(v.dtype))
        return out

    def state_dict(self) -> dict[int, list[Tensor]]:
        return {j: [h.detach().cpu().clone() for h in hs] for j, hs in self.hat.items()}

    def load_state_dict(self, state: dict[int, list[Tensor]], device: torch.device | None = None) -> None:
        if sorted(state) != sorted(self.hat) or any(len(state[j]) != len(self.hat[j]) for j in state):
            raise ValueError(
                f"CHOCO copies in the checkpoint are for replicas {sorted(state)}, this replica holds "
                f"{sorted(self.hat)}"
            )
        for j, hs in state.items():
            for dst, src in zip(self.hat[j], hs):
                dst.copy_(src.to(dst.device))


def _flatten(tensors: list[Tensor]) -> list[tuple[torch.dtype, list[int], Tensor]]:
    """One flat buffer per dtype: (dtype, indices of the tensors in it, buffer)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return [
        (dt, idx, torch.cat([tensors[i].detach().reshape(-1) for i in idx]) if idx else torch.empty(0))
        for dt, idx in groups.items()
    ]


def _unflatten(groups: list[tuple[torch.dtype, list[int], Tensor]], like: list[Tensor]) -> list[Tensor]:
    out: list[Tensor | None] = [None] * len(like)
    for _, idx, flat in groups:
        offset = 0
        for i in idx:
            n = like[i].numel()
            out[i] = flat[offset : offset + n].view_as(like[i])
            offset += n
    return out  # type: ignore[return-value]


class GossipStrategy(ReplicaStrategy):
    """Decentralised SGD: replicas average with their neighbours on a topology, point-to-point.

    Args:
        topology: ``"ring"``, ``"torus"``, ``"exponential"``, ``"one_peer_exponential"``,
            ``"random_matching"``, ``"fully_connected"``, a :class:`~lightning_fedopt.topology.Topology`
            or a doubly stochastic mixing matrix (``N x N``).
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
        compressor: compress the gossip messages (CHOCO-gossip, module doc): a
            :class:`~lightning_fedopt.compression.Compressor` without error feedback, or a name
            (``"int8"``, ``"int4"``, ``"fp16"``, ``"bf16"``, ``"sign"``, ``"topk"``; made with error feedback
            off); None for exact gossip. Needs a static topology and ``merge="mean"``/``"weighted"``.
        consensus_lr: CHOCO's consensus step size ``gamma`` in (0, 1] (only with ``compressor``). With an
            exact compressor ``gamma = 1`` is plain gossip; the more a compressor drops, the smaller
            ``gamma`` must be for the replicas to agree (the paper tunes it, e.g. 0.01-0.5).
        **kwargs: :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy` arguments
            (``evaluate``, ``final_sync``, ``start_method``, ``timeout``, ...).

    Raises:
        ValueError: an argument out of range; a compressor CHOCO cannot use, or combined with a
            time-varying topology, a robust merge or DIMAT; at setup, a topology for a different number of
            replicas, a robust merge with fewer neighbours than it needs, or SAM with manual
            optimization or gradient accumulation.

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
        if isinstance(topology, str):
            if topology not in TOPOLOGIES:
                raise ValueError(
                    f"`topology` must be one of {sorted(TOPOLOGIES)} or a Topology, got {topology!r}"
                )
        elif not isinstance(topology, Topology):
            topology = from_matrix(topology)  # raises ValueError for a bad matrix
        if isinstance(gossip_steps, bool) or not isinstance(gossip_steps, int) or gossip_steps < 1:
            raise ValueError(f"`gossip_steps` must be an integer >= 1, got {gossip_steps!r}")
        self.merge = as_merge(merge)
        if self.merge.method not in GOSSIP_MERGES:
            raise ValueError(
                f"`merge` {self.merge.method!r} cannot merge gossip neighbours (it needs a base model); "
                f"use one of {GOSSIP_MERGES}"
            )
        if sam_rho is not None and not (
            isinstance(sam_rho, (int, float)) and math.isfinite(sam_rho) and sam_rho > 0
        ):
            raise ValueError(f"`sam_rho` must be a finite number > 0 or None, got {sam_rho!r}")
        if align not in (None, "dimat"):
            raise ValueError(f"`align` must be None or 'dimat', got {align!r}")
        if merge_from is not None and not (
            isinstance(merge_from, (int, float)) and not isinstance(merge_from, bool) and 0 < merge_from <= 1
        ):
            raise ValueError(f"`merge_from` must be a fraction in (0, 1] or None, got {merge_from!r}")
        if isinstance(topology_seed, bool) or not isinstance(topology_seed, int) or topology_seed < 0:
            raise ValueError(f"`topology_seed` must be an integer >= 0, got {topology_seed!r}")
        if not (
            isinstance(consensus_lr, (int, float))
            and not isinstance(consensus_lr, bool)
            and math.isfinite(consensus_lr)
            and 0 < consensus_lr <= 1
        ):
            raise ValueError(f"`consensus_lr` (CHOCO's gamma) must be in (0, 1], got {consensus_lr!r}")
        self.compressor = choco_compressor(compressor) if compressor is not None else None
        if self.compressor is None and consensus_lr != 1:
            raise ValueError(
                "`consensus_lr` is the step size of compressed gossip (CHOCO); it needs `compressor`"
            )
        if self.compressor is not None:
            if (isinstance(topology, str) and topology in _TIME_VARYING) or (
                isinstance(topology, Topology) and topology.time_varying
            ):
                name = topology if isinstance(topology, str) else topology.name
                raise ValueError(
                    f"`topology` {name} changes between rounds, and CHOCO-gossip (`compressor`) needs a static "
                    "one: a replica's copy of a neighbour would miss the messages that neighbour sent to others"
                )
            if not self.merge.linear:
                raise ValueError(
                    f"`compressor` (CHOCO-gossip) mixes with the weights W_ij; it cannot be combined with "
                    f"`merge={self.merge.method!r}`"
                )
            if align is not None:
                raise ValueError(
                    "`compressor` (CHOCO-gossip) sends compressed differences, not models: it cannot be "
                    "combined with `align='dimat'`"
                )
        super().__init__(gossip_every, warmup_steps=warmup_steps, **kwargs)
        self.topology_spec = topology
        self.gossip_steps = gossip_steps
        self.sam_rho = float(sam_rho) if sam_rho is not None else None
        self.merge_from = float(merge_from) if merge_from is not None else None
        self.topology_seed = topology_seed
        self.align = align
        self.align_module = align_module
        self._align_seq: torch.nn.Sequential | None = None
        self._align_prefix = ""
        self._align_inputs: Tensor | None = None
        self.topology: Topology | None = None
        self._round = 0  # gossip steps done so far (the round index of time-varying topologies)
        self._merged_step = 0  # replica step of the last global merge (replicas identical there)
        self._merge_from_step: int | None = None
        self.consensus_lr = float(consensus_lr)
        self._choco: ChocoCopies | None = None
        #: uncompressed / compressed bytes of the messages sent so far (compressed gossip)
        self._message_bytes = {"raw_bytes": 0, "compressed_bytes": 0}

    # ---------------------------------------------------------------- set-up and state
    def setup_algorithm(self) -> None:
        self.topology = make_topology(self.topology_spec, self.world_size, seed=self.topology_seed)
        need = self.merge.min_contributions()
        rounds = self.topology.period or 16
        smallest = min(
            1 + len(self.topology.in_neighbors(r, t)) for r in range(self.world_size) for t in range(rounds)
        )
        if smallest < need and self.world_size > 1:
            raise ValueError(
                f"`merge` {self.merge!r} needs {need} models per merge but on {self.topology.name} a replica "
                f"merges only {smallest} (its own and its neighbours'); use a denser topology or a smaller `f`"
            )
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        self._merge_from_step = None
        if self.merge_from is not None:
            total = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None
            if total is None and trainer is not None:
                est = trainer.estimated_stepping_batches
                total = int(est) if math.isfinite(est) else None
            if total is None:
                raise ValueError(
                    "`merge_from` needs a finite length of training (set `max_steps` or `max_epochs`)"
                )
            self._merge_from_step = max(1, math.ceil(self.merge_from * total - 1e-9))
        if self.sam_rho is not None:
            module = self.lightning_module
            if module is not None and not module.automatic_optimization:
                raise ValueError("`sam_rho` (DFedSAM) needs automatic optimization")
            if trainer is not None and trainer.accumulate_grad_batches != 1:
                raise ValueError("`sam_rho` (DFedSAM) cannot be combined with `accumulate_grad_batches` > 1")
        if self.align is not None:
            self._setup_align()
        self._round = 0
        self._merged_step = self._replica_step
        self._choco = None
        self._message_bytes = {"raw_bytes": 0, "compressed_bytes": 0}
        if self.compressor is not None:
            if self.topology.time_varying:
                raise ValueError(
                    f"`topology` {self.topology.name} changes between rounds; CHOCO-gossip (`compressor`) "
                    "needs a static one"
                )
            rank = self.global_rank
            holders = [rank, *self.topology.in_neighbors(rank, 0)]
            self._choco = ChocoCopies(self.tracked_tensors(), holders)  # the replicas are identical here
            self.compressor.reset_state()

    def _setup_align(self) -> None:
        from lightning_fedopt.dimat import _layers

        module = self.lightning_module
        assert module is not None
        if self.align_module is None:
            found = [n for n, m in module.named_children() if isinstance(m, torch.nn.Sequential)]
            if len(found) != 1:
                raise ValueError(
                    f"`align='dimat'`: cannot tell which nn.Sequential to permute (children: {found}); pass `align_module`"
                )
            name = found[0]
        else:
            name = self.align_module
        seq = module.get_submodule(name)
        _layers(seq)  # raises a clear ValueError for an architecture DIMAT cannot permute
        self._align_seq, self._align_prefix = seq, name + "."

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.align is not None and self.schedule.should_sync(self._replica_step + 1):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if not isinstance(x, Tensor):
                raise ValueError(
                    "`align='dimat'` needs the first element of a training batch to be the input tensor"
                )
            self._align_inputs = x.detach().clone()

    def _align_received(
        self, own: list[Tensor], received: dict[int, list[Tensor]]
    ) -> dict[int, list[Tensor]]:
        """DIMAT: permute each received model's hidden units to match this replica's on the local batch."""
        import copy

        from lightning_fedopt.dimat import align

        assert self._align_seq is not None
        if self._align_inputs is None:
            return received
        names = [n for n, _ in self.tracked_named_tensors()]
        prefix = self._align_prefix
        local_seq = self._align_seq
        out = {}
        for j, model in received.items():
            if not self.is_finite(model):
                out[j] = model
                continue
            theirs = copy.deepcopy(local_seq)
            state = theirs.state_dict()
            with torch.no_grad():
                for n, v in zip(names, model):
                    if n.startswith(prefix) and n[len(prefix) :] in state:
                        state[n[len(prefix) :]].copy_(v)
            aligned = align(local_seq, theirs, self._align_inputs).state_dict()
            out[j] = [
                aligned[n[len(prefix) :]].detach().clone()
                if n.startswith(prefix) and n[len(prefix) :] in aligned
                else v
                for n, v in zip(names, model)
            ]
        return out

    def algorithm_state_dict(self) -> dict[str, Any]:
        return {"round": self._round, "merged_step": self._merged_step}

    def load_algorithm_state_dict(self, state: dict[str, Any]) -> None:
        self._round = int(state.get("round", 0))
        self._merged_step = int(state.get("merged_step", -1))

    def replica_state_dict(self) -> dict[str, Any]:
        state = super().replica_state_dict()
        if self._choco is not None and self.compressor is not None:  # the copies differ between replicas
            state["choco"] = {
                "copies": self._choco.state_dict(),
                "compressor": self.compressor.state_dict(),
                "message_bytes": dict(self._message_bytes),
            }
        return state

    def load_replica_state_dict(self, state: dict[str, Any]) -> None:
        super().load_replica_state_dict(state)
        choco = state.get("choco")
        if self._choco is not None and self.compressor is not None:
            if choco is None:
                raise ValueError(
                    "the checkpoint has no CHOCO-gossip state (it was written without `compressor`); "
                    "resume with the strategy it was written with"
                )
            self._choco.load_state_dict(choco["copies"])
            self.compressor.load_state_dict(choco["compressor"])
            self._message_bytes = dict(choco["message_bytes"])

    @property
    def compression_ratio(self) -> float | None:
        """Uncompressed / compressed bytes of the gossip messages sent so far (None without a compressor)."""
        b = self._message_bytes
        return (
            b["raw_bytes"] / b["compressed_bytes"]
            if self.compressor is not None and b["compressed_bytes"]
            else None
        )

    def local_is_consensus(self) -> bool:
        return self._merged_step == self._replica_step

    def _after_final_sync(self) -> None:
        self._merged_step = self._replica_step
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
        """Send ``message`` to ``sends_to`` and receive one message from each of ``receives_from``,
        point-to-point: the one place where what is sent is encoded and what is received decoded.

        Without a compressor the message is a model, sent as one flat buffer per dtype. With one
        (CHOCO-gossip) it is ``x_i - x_hat_i``, compressed tensor by tensor (state under
        ``"gossip/<name>"``) into one byte buffer with a leading finite flag; the result then also
        holds this replica's own message as the receivers decode it, under its own rank. A message
        that is not finite travels as zeros with the flag down and is decoded as NaN.
        """
        if self.compressor is not None:
            return self._exchange_compressed(message, sends_to, receives_from)
        groups = _flatten(message)
        received: dict[int, list[tuple[torch.dtype, list[int], Tensor]]] = {j: [] for j in receives_from}
        for dt, idx, flat in groups:
            bufs = {j: torch.empty_like(flat) for j in receives_from}
            self.comm.exchange(dict.fromkeys(sends_to, flat), bufs, purpose="sync").wait()
            for j in receives_from:
                received[j].append((dt, idx, bufs[j]))
        return {j: _unflatten(g, message) for j, g in received.items()}

    def _exchange_compressed(
        self, message: list[Tensor], sends_to: list[int], receives_from: list[int]
    ) -> dict[int, list[Tensor]]:
        comp = self.compressor
        assert comp is not None
        rank = self.global_rank
        finite = self.is_finite(message)
        dev = message[0].device
        pays = [
            comp.compress(
                m.detach().reshape(-1).float() if finite else torch.zeros(m.numel(), device=dev),
                f"gossip/{name}",
                salt=rank,
                check_finite=False,
            )
            for name, m in zip(self._tracked_names, message)
        ]
        flag = torch.tensor([int(finite)], dtype=torch.uint8, device=dev)
        buf = torch.cat([flag, *[p.pack() for p in pays]])
        recvs = {j: torch.empty_like(buf) for j in receives_from}
        self.comm.exchange(dict.fromkeys(sends_to, buf), recvs, purpose="sync").wait()
        # what exact gossip would have sent: the model in its own dtypes
        raw = sum(t.numel() * t.element_size() for t in self.tracked_tensors())
        self._message_bytes["raw_bytes"] += len(sends_to) * raw
        self._message_bytes["compressed_bytes"] += len(sends_to) * buf.numel()

        def decode(got: Tensor | None) -> list[Tensor]:
            if got is not None and not bool(got[0]):
                return [torch.full(m.shape, float("nan"), device=dev) for m in message]
            out, off = [], 1
            for p, m in zip(pays, message):
                nb = p.nbytes
                q = p if got is None else p.unpack_like(got[off : off + nb])
                off += nb
                out.append(comp.decompress_sum([q]).view(m.shape))
            return out

        decoded = {j: decode(b) for j, b in recvs.items()}
        decoded[rank] = decode(None) if finite else decode(flag)
        return decoded

    # ---------------------------------------------------------------- merging
    def _merge_set(self, contributions: list[Contribution], reference: list[Tensor] | None) -> list[Tensor]:
        names = [n for n, _ in self.tracked_named_tensors()]
        if self.merge.method == "nna" and reference is None:  # a global merge: the same reference everywhere
            reference = Merge("median")(contributions)
        return self.merge(ContributionSet(contributions), reference=reference, names=names)

    def gossip_step(self) -> dict[str, float]:
        """One gossip step: exchange with the neighbours of round ``self._round`` and merge."""
        if self._choco is not None:
            return self._choco_step()
        assert self.topology is not None
        rank, t = self.global_rank, self._round
        tensors = self.tracked_tensors()
        ins = self.topology.in_neighbors(rank, t)
        outs = self.topology.out_neighbors(rank, t)
        own = [v.detach().clone() for v in tensors]
        received = self.gossip_exchange(self.outgoing_message(own), outs, sorted(ins))
        if self.align is not None:
            received = self._align_received(own, received)
        own_finite = self.is_finite(own)
        contributions = (
            [Contribution(rank, t, tuple(own), self.topology.self_weight(rank, t))] if own_finite else []
        )
        bad = 0 if own_finite else 1
        for j, model in received.items():
            if self.is_finite(model):
                contributions.append(Contribution(j, t, tuple(model), ins[j]))
            else:
                bad += 1
        info: dict[str, float] = {}
        if contributions and len(contributions) >= self.merge.min_contributions():
            new = self._merge_set(contributions, own if own_finite else None)
        elif contributions:  # too few finite models left for a robust operator: their mean
            new = Merge("mean")(ContributionSet(contributions))
        else:
            raise RuntimeError(
                f"lightning_fedopt: replica {rank} and all its neighbours have non-finite weights at step "
                f"{self.replica_step}; nothing is left to merge (resume from the last checkpoint)"
            )
        with torch.no_grad():
            for dst, v in zip(tensors, new):
                dst.copy_(v)
        if self.align is not None and self._align_inputs is not None and self._align_seq is not None:
            from lightning_fedopt.dimat import recompute_batchnorm

            recompute_batchnorm(self._align_seq, self._align_inputs)
        if bad:
            self.record_nonfinite(bad, local=not own_finite)
        if not own_finite:
            self.reset_optimizer_state()
        self._round += 1
        info["excluded_nonfinite"] = float(bad)
        return info

    def _choco_step(self) -> dict[str, float]:
        """One CHOCO-gossip step (module doc): send ``C(x_i - x_hat_i)``, update the copies, mix."""
        assert self.topology is not None and self._choco is not None
        rank, t = self.global_rank, self._round
        tensors = self.tracked_tensors()
        ins = self.topology.in_neighbors(rank, t)
        outs = self.topology.out_neighbors(rank, t)
        own = [v.detach().clone() for v in tensors]
        own_finite = self.is_finite(own)
        residual = self._choco.residual(rank, self.outgoing_message(own))
        decoded = self.gossip_exchange(residual, outs, sorted(ins))
        bad = 0 if own_finite else 1
        for j in sorted(decoded):
            if self.is_finite(decoded[j]):
                self._choco.receive(j, decoded[j])
            elif j != rank:
                bad += 1  # its copy stays as it was: it rejoins with its next finite message
        # a replica whose model is not finite restarts from its own public copy
        base = own if own_finite else self._choco.hat[rank]
        new = self._choco.mix(base, rank, ins, self.consensus_lr)
        with torch.no_grad():
            for dst, v in zip(tensors, new):
                dst.copy_(v)
        if bad:
            self.record_nonfinite(bad, local=not own_finite)
        if not own_finite:
            self.reset_optimizer_state()
        self._round += 1
        return {"excluded_nonfinite": float(bad)}

    def global_merge_values(self, purpose: str = "consensus") -> list[Tensor]:
        """Every replica's (finite) model merged with ``merge``: an all-reduce for the mean, an all-gather otherwise."""
        tensors = [v.detach().clone() for v in self.tracked_tensors()]
        message = self.outgoing_message(tensors)
        finite = self.is_finite(message)
        if self.merge.linear:
            contrib = [m * float(finite) if finite else torch.zeros_like(m) for m in message]
            count = torch.tensor([float(finite)], dtype=torch.float64, device=self.root_device)
            self.comm.all_reduce([*contrib, count], "sum", purpose=purpose)
            if count.item() <= 0:
                raise RuntimeError(
                    "lightning_fedopt: no replica has finite weights; there is no consensus model"
                )
            return [c / count.item() for c in contrib]
        groups = _flatten(message)
        gathered: list[list[tuple[torch.dtype, list[int], Tensor]]] = [[] for _ in range(self.world_size)]
        for dt, idx, flat in groups:
            parts = self.comm.all_gather(flat, purpose=purpose).wait()
            for r, part in enumerate(parts):
                gathered[r].append((dt, idx, part))
        contributions = []
        for r, g in enumerate(gathered):
            model = _unflatten(g, message)
            if self.is_finite(model):
                contributions.append(Contribution(r, self._replica_step, tuple(model)))
        if not contributions:
            raise RuntimeError("lightning_fedopt: no replica has finite weights; there is no consensus model")
        if len(contributions) < self.merge.min_contributions():
            return Merge("mean")(ContributionSet(contributions))
        return self._merge_set(contributions, None)

    def consensus_values(self) -> list[Tensor]:
        return self.global_merge_values()

    # ---------------------------------------------------------------- the round
    def in_merge_phase(self, step: int | None = None) -> bool:
        """Whether the round after optimizer step ``step`` is a global merge (``merge_from``)."""
        step = self._replica_step if step is None else step
        return self._merge_from_step is not None and step >= self._merge_from_step

    def sync(self) -> dict[str, float]:
        assert self.topology is not None
        tensors = self.tracked_tensors()
        info: dict[str, float] = {"spectral_gap": self.topology.spectral_gap}
        if self.track_consensus_distance:
            local = [t.detach().clone() for t in tensors]
            mean = self._plain_mean(local)
            info["consensus_distance"] = self.consensus_distance(local, mean, self.is_finite(local))
        if self.in_merge_phase():
            was_finite = self.is_finite()
            new = self.global_merge_values(purpose="sync")
            with torch.no_grad():
                for dst, v in zip(tensors, new):
                    dst.copy_(v)
            if not was_finite:
                self.record_nonfinite(1, local=True)
                self.reset_optimizer_state()
            self._merged_step = self._replica_step
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
        finite = self.is_finite(local)
        buf = [t.clone() if finite else torch.zeros_like(t) for t in local]
        count = torch.tensor([float(finite)], dtype=torch.float64, device=self.root_device)
        self.comm.all_reduce([*buf, count], "sum", purpose="metrics")
        return [b / max(count.item(), 1.0) for b in buf]

    # ---------------------------------------------------------------- DFedSAM local steps
    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        if self.sam_rho is not None:
            closure = self._sam_closure(optimizer, closure)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    def _sam_closure(self, optimizer: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
        """SAM: the gradient at ``y + rho g/||g||`` replaces the gradient at ``y`` (the step is taken at ``y``)."""
        rho = self.sam_rho
        assert rho is not None

        def sam() -> Any:
            loss = closure()
            first = getattr(closure, "_result", None)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if not params:
                return loss
            with torch.no_grad():
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
                )
                scale = rho / (float(norm) + 1e-12)
                eps = [p.grad * scale for p in params]
                for p, e in zip(params, eps):
                    p.add_(e)
            optimizer.zero_grad()
            closure()
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)
            if first is not None:
                closure._result = first  # type: ignore[attr-defined]  # Lightning reports the loss at y
            return loss

        return sam
