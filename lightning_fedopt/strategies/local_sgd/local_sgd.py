"""Local SGD / FedAvg: periodic model averaging.

Every ``H`` optimizer steps the replicas replace their weights with a weighted average
``theta_i <- sum_j w_j theta_j / sum_j w_j`` (Stich, "Local SGD Converges Fast and Communicates
Little", ICLR 2019; McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017). With ``warmup_steps=W`` the first ``W`` steps each end with an
average (post-local SGD, Lin et al., ICLR 2020).

Partial participation: each round a subset of replicas is chosen by an RNG seeded with the round
number, so every rank agrees on it without communicating. Only participants' weights enter the
average; every replica (participant or not) then continues from the result, as clients of FedAvg
continue from the server model. With ``adaptive_weights=True`` the update follows FedAU (Wang &
Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated Averaging",
ICLR 2024): ``x <- x + eta_g / N * sum_{n participating} omega_n (theta_n - x)`` where ``omega_n``
is the mean of replica ``n``'s observed participation intervals (cut off at ``K``; 1 before the
first interval is observed).

Compression (``compressor=``): the replicas send their *model delta* since the last round's
result, ``theta_i - x``, through the compressed all-reduce (error-feedback state per tracked
tensor name), and continue from ``x + sum_i w_i (theta_i - x) / sum_i w_i``. The consensus for
evaluation, checkpoints and the final synchronisation stays an exact average. With error
feedback, a replica's carried error is sent even in a round it does not take part in.

Merged rounds (``merge=``, any operator but the mean): every replica's model travels in one
all-gather and every rank applies the same merge, with equal weights summing to 1, to the deltas
from the last round's result (:mod:`lightning_fedopt.strategies.local_sgd.merge`).

NaN/Inf guard: a replica whose weights are not finite at a synchronisation contributes nothing,
is reset to the result (its optimizer state is cleared) and the event is logged and counted in
:attr:`~lightning_fedopt.strategies.replica.ReplicaStrategy.nonfinite_events`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_choice, check_float, check_int, check_seed
from lightning_fedopt.compression import Compressor, get_compressor
from lightning_fedopt.data.pacing import ReplicaSelection
from lightning_fedopt.fault_tolerance.rounds import torchft_round
from lightning_fedopt.merging import Merge, as_merge
from lightning_fedopt.runtime.optimizer_state import average_optimizer_state
from lightning_fedopt.runtime.reduce import MaskedSum, NoFiniteReplicaError, masked_sum
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.local_sgd.merge import (
    check_merge_options,
    check_merge_world,
    gather_models,
    merge_round,
)
from lightning_fedopt.strategies.local_sgd.participation import (
    FedAUState,
    RoundLosses,
    check_participation,
    check_participation_length,
    choose_participants,
)
from lightning_fedopt.strategies.replica import ReplicaStrategy

__all__ = ["FedAUState", "LocalSGDStrategy", "choose_participants"]

_WEIGHTING = ("uniform", "samples")


class LocalSGDStrategy(ReplicaStrategy):
    """Local SGD / FedAvg / post-local SGD: every ``H`` steps the replicas average their weights.

    Args:
        sync_every: ``H`` (>= 1) or a :class:`~lightning_fedopt.schedules.SyncSchedule`.
        warmup_steps: post-local SGD warm-up, steps that each end with an average (>= 0).
        weighting: ``"uniform"`` or ``"samples"`` (weight each replica by the samples it
            processed since the last average, as FedAvg weights clients by data size).
        average_optimizer_state: also average the optimizers' floating-point state (momentum,
            Adam moments) at every synchronisation.
        participation: fraction of replicas per round in (0, 1], or a per-replica sequence of
            participation probabilities in [0, 1].
        participation_seed: seed of the round-seeded participant draw.
        adaptive_weights: FedAU weights for uneven participation (needs ``weighting="uniform"``).
        server_lr: FedAU's global step size ``eta_g`` (> 0).
        fedau_cutoff: FedAU's interval cutoff ``K`` (>= 1, or None for no cutoff).
        merge: how the replicas' models combine: ``"mean"`` (the weighted average, one all-reduce)
            or any :class:`~lightning_fedopt.merging.Merge` / name (one all-gather; deltas for TIES,
            DARE, task arithmetic and model stock are taken from the last round's result, and the
            replicas' deltas are averaged, not added: see :mod:`~lightning_fedopt.strategies.local_sgd.merge`).
            A merge that needs more models than there are replicas is refused at set-up.
        compressor: compress the model deltas of the synchronisations: a
            :class:`~lightning_fedopt.compression.Compressor`, a name such as ``"int8"``, or None.
        selection: choose each round's ``participation`` fraction of replicas by their mean training
            loss in the round, with an ordering and a pacing of its own
            (:class:`~lightning_fedopt.data.ReplicaSelection`), instead of uniformly at random. The
            replicas' mean losses travel in one all-gather of one number per replica per round
            (purpose ``"control"``), so every rank makes the same choice. All replicas train every
            round; the choice, made at the round's end from the losses of that round's training,
            decides whose update is averaged (Vahidian et al. score clients with the global model
            before the round). Needs ``participation`` a fraction below 1 and ``group_size=1``.
        **kwargs: :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy` arguments
            (``evaluate``, ``final_sync``, ``start_method``, ``timeout``, ...).

    Example:
        >>> import lightning as L
        >>> import lightning_fedopt as lf
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=lf.LocalSGDStrategy(sync_every=8))
    """

    strategy_name = "local_sgd"
    supports_round_seconds = True
    supports_fault_tolerance = True

    def __init__(
        self,
        sync_every: int | SyncSchedule = 8,
        *,
        warmup_steps: int = 0,
        weighting: str = "uniform",
        average_optimizer_state: bool = False,
        participation: float | Sequence[float] = 1.0,
        participation_seed: int = 0,
        adaptive_weights: bool = False,
        server_lr: float = 1.0,
        fedau_cutoff: int | None = None,
        merge: str | Merge = "mean",
        compressor: Compressor | str | None = None,
        selection: ReplicaSelection | None = None,
        **kwargs: Any,
    ) -> None:
        self.compressor = get_compressor(compressor)
        participation = check_participation(participation, selection, kwargs.get("group_size", 1))
        weighting = check_choice("weighting", weighting, _WEIGHTING)
        server_lr = check_float("server_lr", server_lr, low=0.0, low_open=True)
        fedau_cutoff = check_int("fedau_cutoff", fedau_cutoff, low=1, allow_none=True)
        adaptive_weights = check_bool("adaptive_weights", adaptive_weights)
        average_optimizer_state = check_bool("average_optimizer_state", average_optimizer_state)
        participation_seed = check_seed("participation_seed", participation_seed)
        if adaptive_weights and weighting != "uniform":
            raise ValueError("`adaptive_weights=True` (FedAU) needs `weighting='uniform'`")
        self.merge = as_merge(merge)
        check_merge_options(
            self.merge,
            participation=participation != 1.0,
            adaptive_weights=adaptive_weights,
            weighting=weighting != "uniform",
            round_seconds=kwargs.get("round_seconds") is not None,
            compressor=self.compressor is not None,
        )
        super().__init__(sync_every, warmup_steps=warmup_steps, **kwargs)
        self.weighting = weighting
        self.count_samples = weighting == "samples"
        self.average_optimizer_state = average_optimizer_state
        self.participation = participation
        self.participation_seed = participation_seed
        self.adaptive_weights = adaptive_weights
        self.server_lr = server_lr
        self.fedau_cutoff = fedau_cutoff
        self.selection = selection
        #: per round with ``selection``: the replicas' mean losses and the chosen participants
        self.selection_history: list[dict[str, Any]] = []
        self._round_losses = RoundLosses()
        # the last round's result (FedAvg's server model); kept only where a round needs it
        self._last_average: list[Tensor] = []
        self._fedau: FedAUState | None = None
        self._is_param: list[bool] = []
        self.check_fault_tolerance()

    # ---------------------------------------------------------------- state
    @override
    def setup_algorithm(self) -> None:
        check_participation_length(self.participation, self.outer_world_size)
        if not self.merge.linear:
            check_merge_world(self.merge, self.outer_world_size)
        # the last round's result: FedAU adds to it, compressed and merged rounds take deltas from
        # it, and with partial participation a round that nobody joins restarts every replica from
        # it (as FedAvg clients restart from the server model)
        keep = (
            self.adaptive_weights
            or self.participation != 1.0
            or self.round_seconds is not None
            or not self.merge.linear
            or self.compressor is not None
            or self.fault_tolerance is not None  # what a group that heals receives
        )
        self._last_average = [t.detach().clone() for t in self.tracked_tensors()] if keep else []
        self._fedau = FedAUState(self.outer_world_size, self.fedau_cutoff) if self.adaptive_weights else None
        module = self.lightning_module
        params = {name for name, _ in module.named_parameters()} if module is not None else set()
        self._is_param = [name in params for name, _ in self.tracked_named_tensors()]

    @override
    def algorithm_state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"global": [t.detach().cpu().clone() for t in self._last_average]}
        if self._fedau is not None:
            state["fedau"] = self._fedau.state_dict()
        return state

    @override
    def load_algorithm_state_dict(self, state: dict[str, Any]) -> None:
        if self._last_average and len(state.get("global", [])) == len(self._last_average):
            for dst, src in zip(self._last_average, state["global"]):
                dst.copy_(src)
        if self._fedau is not None and "fedau" in state:
            self._fedau.load_state_dict(state["fedau"])

    @override
    def replica_state_dict(self) -> dict[str, Any]:
        state = super().replica_state_dict()
        if self.compressor is not None:  # error feedback differs between replicas
            state["compressor"] = self.compressor.state_dict()
        if self.selection is not None:
            state["round_loss"] = self._round_losses.state()
            state["selection_history"] = list(self.selection_history)
        return state

    @override
    def load_replica_state_dict(self, state: dict[str, Any]) -> None:
        super().load_replica_state_dict(state)
        if self.compressor is not None and "compressor" in state:
            self.compressor.load_state_dict(state["compressor"])
        if self.selection is not None and "round_loss" in state:
            self._round_losses.load_state(state["round_loss"], self.root_device)
            self.selection_history = list(state.get("selection_history", []))

    # ---------------------------------------------------------------- fault_tolerance="torchft"
    @override
    def fault_tolerance_unsupported(self) -> str | None:
        options = {
            "compressor": self.compressor is not None,
            "participation": self.participation != 1.0,
            "weighting='samples'": self.weighting != "uniform",
            "adaptive_weights": self.adaptive_weights,
            "merge": self.merge.method != "mean",
            "selection": self.selection is not None,
            "average_optimizer_state": self.average_optimizer_state,
            "server_lr": self.server_lr != 1.0,
        }
        used = [name for name, on in options.items() if on]
        if used:
            return (
                f"a torchft round is the uniform mean of the groups that computed it; {', '.join(used)} "
                "would need more than one managed all-reduce per round"
            )
        return None

    @override
    def sync_fault_tolerant(self, contribute: bool = True) -> dict[str, float]:
        """Local SGD as a torchft round: the global weights are the last round's average, each group
        sends ``global - local``, the mean of the groups that computed it moves the global weights to
        their average (``rounds.torchft_round``)."""

        def average(sums: list[Tensor], n: int) -> None:
            with torch.no_grad():
                for g, s, param in zip(self._last_average, sums, self._is_param):
                    if param:
                        g.sub_((s / n).to(g.dtype))
                    else:
                        g.copy_(s / n)

        numbers, local_nonfinite = torchft_round(
            self.faults,
            self.tracked_tensors(),
            self._last_average,
            self._is_param,
            self.replica_step,
            apply=average,
            contribute=contribute,
        )
        if local_nonfinite:
            self.record_nonfinite(0, local=True)
            self.reset_optimizer_state()
        return numbers

    @property
    def compression_ratio(self) -> float | None:
        """Uncompressed / compressed bytes of the compressed synchronisations so far (None without a compressor)."""
        return self.compressor.totals.ratio if self.compressor is not None else None

    @override
    def after_final_sync(self) -> None:
        for g, t in zip(self._last_average, self.tracked_tensors()):
            g.copy_(t)

    @override
    def final_sync(self) -> None:
        if self.fault_tolerance is not None:
            if self.steps_since_sync > 0:  # the last, partial round, as a torchft round
                self.run.last_sync = {**self.sync_fault_tolerant(), "step": self.replica_step}
            return
        if self.round_seconds is not None:
            if self.steps_since_sync > 0:  # the last, partial round under the same normalised rule
                self.sync()
            return
        super().final_sync()

    # ---------------------------------------------------------------- the round
    def participants(self, round_index: int, losses: Sequence[float] | None = None) -> list[int]:
        """Replicas taking part in round ``round_index`` (identical on every rank).

        With ``selection``, ``losses`` are every replica's mean loss in the round (by outer rank).
        """
        if self.selection is None:
            return choose_participants(
                round_index, self.outer_world_size, self.participation, self.participation_seed
            )
        if losses is None:
            raise ValueError("`losses` are needed to select participants by loss")
        assert isinstance(self.participation, float)
        k = max(1, round(self.participation * self.outer_world_size))
        module = self.lightning_module
        total = module.trainer.estimated_stepping_batches if module is not None and module._trainer else 0
        total = int(total) if math.isfinite(total) else 0
        return self.selection.select(losses, k, round_index, self.replica_step, total)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        if self.selection is not None and not self.skipping_step:
            self._round_losses.add(out)
        return out

    def _round_participants(self) -> list[int]:
        """This round's participants; with ``selection`` after exchanging the round's losses."""
        round_index = self.sync_count
        if self.selection is None:
            return self.participants(round_index)
        losses = self._round_losses.gather(self.outer_comm, self.root_device)
        participants = self.participants(round_index, losses)
        self.selection_history.append({"round": round_index, "losses": losses, "participants": participants})
        return participants

    def _weight(self) -> float:
        if self.weighting == "samples" and self.samples_since_sync > 0:
            return float(self.samples_since_sync)
        return 1.0

    def _masked_sum(
        self,
        tensors: list[Tensor],
        weight: float,
        *,
        purpose: str = "sync",
        base: list[Tensor] | None = None,
        extra: Sequence[float] = (),
        compress: bool = False,
    ) -> MaskedSum:
        """:func:`~lightning_fedopt.runtime.reduce.masked_sum` over the replicas, through the
        compressor when ``compress`` (the deltas from ``base``; exact float64 counters first)."""
        compressor = self.compressor if compress else None
        return masked_sum(
            self.outer_comm,
            tensors,
            weight=weight,
            base=base,
            extra=extra,
            purpose=purpose,
            counters_dtype=torch.float64 if compressor is not None else None,
            device=None if tensors else self.root_device,
            compressor=compressor,
            names=self.tracked.names if compressor is not None else None,
        ).wait()

    @override
    def sync(self) -> dict[str, float]:
        if not self.merge.linear:
            return self._sync_merge()
        tensors = self.tracked_tensors()
        participants = self._round_participants()
        i_take_part = self.outer_rank in participants
        locally_finite = self.is_finite(tensors)
        info: dict[str, float] = {"participants": float(len(participants))}
        last = self._last_average
        if self._fedau is not None:
            omegas = self._fedau.step(participants)
            weight = omegas[self.outer_rank] if i_take_part else 0.0
            s = self._masked_sum(tensors, weight, base=last, compress=True)
            with torch.no_grad():
                new = [g + (self.server_lr / self.outer_world_size) * d for g, d in zip(last, s.sums)]
        elif self.round_seconds is not None:
            # heterogeneous local work: each update divided by its step count, the mean scaled by
            # the mean step count (FedNova's normalised averaging with uniform weights)
            k = self.round_effective_steps if i_take_part else 0
            weight = 1.0 if k > 0 else 0.0  # of the optimizer state: uniform over those that stepped
            s = self._masked_sum(
                tensors, 1.0 / k if k > 0 else 0.0, base=last, extra=[float(k)], compress=True
            )
            with torch.no_grad():
                if s.valid > 0:
                    tau_eff = s.extras[0] / s.valid
                    new = [g + (tau_eff / s.valid) * d for g, d in zip(last, s.sums)]
                else:  # no replica managed a step: everyone restarts from the last result
                    new = [g.clone() for g in last]
            info["mean_steps"] = s.extras[0] / s.valid if s.valid else 0.0
        else:
            weight = self._weight() if i_take_part else 0.0
            compressed = self.compressor is not None
            s = self._masked_sum(tensors, weight, base=last if compressed else None, compress=True)
            if not participants:  # nobody took part: every replica restarts from the last round's result
                new = [g.clone() for g in last]
                info["skipped_round"] = 1.0
            elif s.valid == 0 or s.weight <= 0:
                raise NoFiniteReplicaError(self.replica_step)
            else:
                with torch.no_grad():  # compressed: sums of deltas from the last result
                    new = (
                        [(d + g * s.weight) / s.weight for d, g in zip(s.sums, last)]
                        if compressed
                        else s.mean()
                    )
        return self._finish_round(
            tensors, new, info, locally_finite, s.valid, s.invalid, weight if locally_finite else 0.0
        )

    def _finish_round(
        self,
        tensors: list[Tensor],
        new: list[Tensor],
        info: dict[str, float],
        locally_finite: bool,
        n_valid: int,
        n_bad: int,
        optimizer_weight: float | None = None,
    ) -> dict[str, float]:
        """Every replica (and the last result) takes ``new``; a diverged replica is counted and
        its optimizer state cleared. With ``average_optimizer_state`` the optimizers' statistics
        are averaged with ``optimizer_weight`` first."""
        if self.track_consensus_distance:
            info["consensus_distance"] = self.consensus_distance(tensors, new, locally_finite)
        if self.average_optimizer_state and optimizer_weight is not None:
            average_optimizer_state(self.outer_comm, self.optimizers, optimizer_weight)
        with torch.no_grad():
            for t, v in zip(tensors, new):
                t.copy_(v)
            for g, v in zip(self._last_average, new):
                g.copy_(v)
        if n_bad or not locally_finite:
            # a diverged non-participant is reset as well, though it was never part of the average
            self.record_nonfinite(n_bad, local=not locally_finite)
        if not locally_finite:
            self.reset_optimizer_state()
        info["excluded_nonfinite"] = float(n_bad)
        info["valid_replicas"] = float(n_valid)
        return info

    # ---------------------------------------------------------------- merge operators
    def _merged(self, purpose: str) -> tuple[list[Tensor], int]:
        """Every replica's model (one all-gather) merged with ``merge``: the same on every rank."""
        tensors = self.tracked_tensors()
        return merge_round(
            self.merge,
            gather_models(self.outer_comm, tensors, purpose),
            self.sync_count,
            base=self._last_average or None,
            names=[n for n, _ in self.tracked_named_tensors()],
            step=self.replica_step,
        )

    def _sync_merge(self) -> dict[str, float]:
        tensors = self.tracked_tensors()
        locally_finite = self.is_finite(tensors)
        new, n_bad = self._merged("sync")
        info: dict[str, float] = {"participants": float(self.outer_world_size)}
        return self._finish_round(tensors, new, info, locally_finite, self.outer_world_size - n_bad, n_bad)

    @override
    def consensus_values(self) -> list[Tensor]:
        """The weighted mean of every replica with finite weights (one all-reduce), or with a
        ``merge``, their merge (one all-gather). Under ``fault_tolerance="torchft"``: the last
        round's average (no traffic: the other groups are reached only through a round)."""
        if self.fault_tolerance is not None:
            return [g.detach().clone() for g in self._last_average]
        if not self.merge.linear:
            return self._merged("consensus")[0]
        s = self._masked_sum(self.tracked_tensors(), self._weight(), purpose="consensus")
        return s.mean(step=self.replica_step)
