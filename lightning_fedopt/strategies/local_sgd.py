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
result, ``theta_i - x``, through
:meth:`~lightning_fedopt.comm.Communicator.all_reduce_compressed` (error-feedback state per
tracked tensor name), and continue from ``x + sum_i w_i (theta_i - x) / sum_i w_i``. The consensus
for evaluation, checkpoints and the final synchronisation stays an exact average. With error
feedback, a replica's carried error is sent even in a round it does not take part in.

NaN/Inf guard: a replica whose weights are not finite at a synchronisation contributes nothing,
is reset to the result (its optimizer state is cleared) and the event is logged and counted in
:attr:`~lightning_fedopt.strategies.replica.ReplicaStrategy.nonfinite_events`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fedopt.compression import Compressor, get_compressor
from lightning_fedopt.data.pacing import ReplicaSelection
from lightning_fedopt.merging import Contribution, ContributionSet, Merge, as_merge
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.replica import ReplicaStrategy

__all__ = ["FedAUState", "LocalSGDStrategy", "choose_participants"]

log = logging.getLogger("lightning_fedopt")

_WEIGHTING = ("uniform", "samples")


def choose_participants(
    round_index: int, world_size: int, participation: float | Sequence[float], seed: int = 0
) -> list[int]:
    """The replicas that take part in round ``round_index`` — the same answer on every rank.

    ``participation`` is either a fraction ``p`` in (0, 1] (exactly ``max(1, round(p N))``
    replicas, chosen uniformly) or one probability per replica (independent Bernoulli draws,
    possibly none).

    Example:
        >>> choose_participants(0, 4, 1.0)
        [0, 1, 2, 3]
        >>> len(choose_participants(3, 10, 0.3))
        3
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(round_index) * 7919 + 17)
    if isinstance(participation, (int, float)):
        if participation >= 1.0:
            return list(range(world_size))
        k = max(1, round(participation * world_size))
        return sorted(torch.randperm(world_size, generator=gen)[:k].tolist())
    probs = torch.tensor(list(participation), dtype=torch.float64)
    draws = torch.rand(world_size, generator=gen, dtype=torch.float64)
    return [i for i in range(world_size) if bool(draws[i] < probs[i])]


class FedAUState:
    """FedAU's online estimate of each replica's aggregation weight ``omega_n``.

    Per replica ``n``: ``S_n`` rounds counted since its last recorded interval and the mean
    ``Omega_n`` of its ``M_n`` recorded intervals. In a round, a participant uses
    ``omega_n = Omega_n`` (1 while ``M_n = 0``); then it records the interval ``S_n + 1`` and
    ``S_n`` restarts at 0. A non-participant increments ``S_n`` and, on reaching the cutoff ``K``,
    records an interval of ``K``. This follows the authors' reference implementation.

    Example:
        >>> s = FedAUState(2, cutoff=None)
        >>> [s.step([0]) for _ in range(3)][-1]   # replica 1 never takes part
        [1.0, 1.0]
        >>> s.step([1])   # replica 1's first participation is unscaled
        [1.0, 1.0]
        >>> s.weights()   # its interval of 4 rounds is now on record
        [1.0, 4.0]
    """

    def __init__(self, world_size: int, cutoff: int | None = None) -> None:
        self.world_size = world_size
        self.cutoff = cutoff
        self.since = [0] * world_size
        self.count = [0] * world_size
        self.mean = [1.0] * world_size

    def weights(self) -> list[float]:
        """``omega_n`` for every replica, from the intervals recorded so far."""
        return [self.mean[n] if self.count[n] > 0 else 1.0 for n in range(self.world_size)]

    def _record(self, n: int, interval: int) -> None:
        self.mean[n] = (
            (self.count[n] * self.mean[n] + interval) / (self.count[n] + 1)
            if self.count[n]
            else float(interval)
        )
        self.count[n] += 1

    def step(self, participants: Sequence[int]) -> list[float]:
        """Advance one round; returns the weights used *in* this round (before its intervals)."""
        used = self.weights()
        part = set(participants)
        for n in range(self.world_size):
            if n in part:
                self._record(n, self.since[n] + 1)
                self.since[n] = 0
            else:
                self.since[n] += 1
                if self.cutoff is not None and self.since[n] >= self.cutoff:
                    self._record(n, self.since[n])
                    self.since[n] = 0
        return used

    def state_dict(self) -> dict[str, Any]:
        return {"since": list(self.since), "count": list(self.count), "mean": list(self.mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.since, self.count, self.mean = list(state["since"]), list(state["count"]), list(state["mean"])


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
            DARE, task arithmetic and model stock are taken from the last round's result).
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
        if selection is not None:
            if not isinstance(selection, ReplicaSelection):
                raise ValueError(
                    f"`selection` must be a lightning_fedopt.data.ReplicaSelection or None, got {selection!r}"
                )
            if not (isinstance(participation, (int, float)) and not isinstance(participation, bool)) or not (
                0.0 < float(participation) < 1.0
            ):
                raise ValueError(
                    f"`selection` chooses a fraction of the replicas: `participation` must be in (0, 1), "
                    f"got {participation!r}"
                )
            if kwargs.get("group_size", 1) != 1:
                raise ValueError(
                    "`selection` with `group_size` > 1 is not supported: the members of a group hold "
                    "different data, so they would pick different participants and the group would diverge"
                )
        if weighting not in _WEIGHTING:
            raise ValueError(f"`weighting` must be one of {_WEIGHTING}, got {weighting!r}")
        if isinstance(participation, (int, float)) and not isinstance(participation, bool):
            if not (0.0 < float(participation) <= 1.0):
                raise ValueError(f"`participation` must be in (0, 1], got {participation!r}")
            participation = float(participation)
        elif isinstance(participation, Sequence) and not isinstance(participation, str):
            participation = [float(p) for p in participation]
            if not participation or any(not (0.0 <= p <= 1.0) for p in participation):
                raise ValueError(
                    f"`participation` probabilities must each be in [0, 1], got {participation!r}"
                )
        else:
            raise ValueError(
                f"`participation` must be a number in (0, 1] or a sequence of probabilities, got {participation!r}"
            )
        if not (isinstance(server_lr, (int, float)) and math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"`server_lr` must be a finite number > 0, got {server_lr!r}")
        if fedau_cutoff is not None and (not isinstance(fedau_cutoff, int) or fedau_cutoff < 1):
            raise ValueError(f"`fedau_cutoff` must be an integer >= 1 or None, got {fedau_cutoff!r}")
        if adaptive_weights and weighting != "uniform":
            raise ValueError("`adaptive_weights=True` (FedAU) needs `weighting='uniform'`")
        self.merge = as_merge(merge)
        if not self.merge.linear and (
            participation != 1.0
            or adaptive_weights
            or weighting != "uniform"
            or kwargs.get("round_seconds")
            or self.compressor is not None
        ):
            raise ValueError(
                f"`merge={self.merge.method!r}` needs full participation, uniform weighting, no FedAU, no "
                "round_seconds and no compressor (only the mean combines with those)"
            )
        super().__init__(sync_every, warmup_steps=warmup_steps, **kwargs)
        self.weighting = weighting
        self.count_samples = weighting == "samples"
        self.average_optimizer_state = bool(average_optimizer_state)
        self.participation = participation
        self.participation_seed = int(participation_seed)
        self.adaptive_weights = bool(adaptive_weights)
        self.server_lr = float(server_lr)
        self.fedau_cutoff = fedau_cutoff
        self.selection = selection
        #: per round with ``selection``: the replicas' mean losses and the chosen participants
        self.selection_history: list[dict[str, Any]] = []
        # this round's training losses: a running sum on the device (no per-step sync) and a count
        self._round_loss_sum: Tensor | None = None
        self._round_loss_count = 0
        self._warned_no_losses = False
        self._global: list[Tensor] = []
        self._fedau: FedAUState | None = None

    # ---------------------------------------------------------------- state
    def setup_algorithm(self) -> None:
        if isinstance(self.participation, list) and len(self.participation) != self.outer_world_size:
            raise ValueError(
                f"`participation` lists {len(self.participation)} probabilities but there are "
                f"{self.outer_world_size} replicas"
            )
        # the last round's result: FedAU adds to it, and with partial participation a round that
        # nobody joins restarts every replica from it (as FedAvg clients restart from the server model)
        keep_global = (
            self.adaptive_weights
            or self.participation != 1.0
            or self.round_seconds is not None
            or not self.merge.linear
            or self.compressor is not None
        )
        self._global = [t.detach().clone() for t in self.tracked_tensors()] if keep_global else []
        self._fedau = FedAUState(self.outer_world_size, self.fedau_cutoff) if self.adaptive_weights else None

    def algorithm_state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"global": [t.detach().cpu().clone() for t in self._global]}
        if self._fedau is not None:
            state["fedau"] = self._fedau.state_dict()
        return state

    def load_algorithm_state_dict(self, state: dict[str, Any]) -> None:
        if self._global and len(state.get("global", [])) == len(self._global):
            for dst, src in zip(self._global, state["global"]):
                dst.copy_(src)
        if self._fedau is not None and "fedau" in state:
            if len(state["fedau"]["since"]) == self.outer_world_size:
                self._fedau.load_state_dict(state["fedau"])
            else:
                log.warning(
                    "lightning_fedopt: FedAU participation statistics were recorded for %d replicas, "
                    "now there are %d; they start afresh",
                    len(state["fedau"]["since"]),
                    self.outer_world_size,
                )

    def replica_state_dict(self) -> dict[str, Any]:
        state = super().replica_state_dict()
        if self.compressor is not None:  # error feedback differs between replicas
            state["compressor"] = self.compressor.state_dict()
        if self.selection is not None:
            total = self._round_loss_sum
            state["round_loss"] = (None if total is None else total.cpu(), self._round_loss_count)
            state["selection_history"] = list(self.selection_history)
        return state

    def load_replica_state_dict(self, state: dict[str, Any]) -> None:
        super().load_replica_state_dict(state)
        if self.compressor is not None and "compressor" in state:
            self.compressor.load_state_dict(state["compressor"])
        if self.selection is not None and "round_loss" in state:
            total, self._round_loss_count = state["round_loss"]
            self._round_loss_sum = None if total is None else total.to(self.root_device)
            self.selection_history = list(state.get("selection_history", []))

    @property
    def compression_ratio(self) -> float | None:
        """Uncompressed / compressed bytes of the compressed synchronisations so far (None without a compressor)."""
        return self.outer_comm.compression_ratio if self.compressor is not None else None

    def _after_final_sync(self) -> None:
        for g, t in zip(self._global, self.tracked_tensors()):
            g.copy_(t)

    def final_sync(self) -> None:
        if self.round_seconds is not None:
            if self._steps_since_sync > 0:  # the last, partial round under the same normalised rule
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

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        if self.selection is not None and not self._skip_step:
            loss = out.get("loss") if isinstance(out, dict) else out
            if isinstance(loss, Tensor) and loss.numel() == 1:
                value = loss.detach().reshape(()).to(torch.float64)
                self._round_loss_sum = value if self._round_loss_sum is None else self._round_loss_sum + value
                self._round_loss_count += 1
        return out

    def _round_losses(self) -> list[float]:
        """Every replica's mean training loss in this round (one all-gather), then a fresh round."""
        if self._round_loss_sum is None or self._round_loss_count == 0:
            mine = torch.full((1,), math.nan, dtype=torch.float64, device=self.root_device)
        else:
            mine = (self._round_loss_sum / self._round_loss_count).reshape(1)
        gathered = self.outer_comm.all_gather(mine, purpose="control").wait()
        self._round_loss_sum, self._round_loss_count = None, 0
        losses = [float(g[0]) for g in gathered]
        if all(math.isnan(x) for x in losses) and not self._warned_no_losses:
            self._warned_no_losses = True
            log.warning(
                "lightning_fedopt: replica selection saw no training loss this round (training_step returned "
                "no scalar loss, e.g. under manual optimization); participants are chosen in rank order"
            )
        return losses

    def _weight(self) -> float:
        if self.weighting == "samples" and self._samples_since_sync > 0:
            return float(self._samples_since_sync)
        return 1.0

    def _scalar_dtype(self, tensors: list[Tensor]) -> torch.dtype:
        return torch.float32 if all(t.dtype == torch.float32 for t in tensors) else torch.float64

    def _reduce_weighted(
        self,
        tensors: list[Tensor],
        weight: float,
        *,
        purpose: str,
        base: list[Tensor] | None = None,
        extra: list[float] | None = None,
        compress: bool = False,
    ) -> tuple[list[Tensor], float, int, int]:
        """All-reduce ``weight * (t - base)`` together with [weight, valid, invalid] counters.

        A replica with non-finite tensors (or weight 0) contributes zeros. Returns the summed
        contributions and the summed weight / number of valid / invalid contributors. ``extra``
        numbers are summed over the valid contributors in the same all-reduce (in place).
        """
        finite = self.is_finite(tensors)
        valid = finite and weight > 0
        if compress and self.compressor is not None:
            return self._reduce_weighted_compressed(tensors, weight, valid, finite, base, extra)
        with torch.no_grad():
            if valid:
                contrib = [
                    (t.detach() - b if base is not None else t.detach()) * weight
                    for t, b in zip(tensors, base if base is not None else tensors)
                ]
            else:
                contrib = [torch.zeros_like(t) for t in tensors]
        extras = [x if valid else 0.0 for x in (extra or [])]
        scalars = torch.tensor(
            [weight if valid else 0.0, float(valid), float(weight > 0 and not finite), *extras],
            dtype=self._scalar_dtype(tensors),
            device=tensors[0].device if tensors else self.root_device,
        )
        self.outer_comm.all_reduce([*contrib, scalars], "sum", purpose=purpose)
        if extra is not None:
            extra[:] = [float(x) for x in scalars[3:]]
        return contrib, float(scalars[0]), round(float(scalars[1])), round(float(scalars[2]))

    def _reduce_weighted_compressed(
        self,
        tensors: list[Tensor],
        weight: float,
        valid: bool,
        finite: bool,
        base: list[Tensor] | None,
        extra: list[float] | None = None,
    ) -> tuple[list[Tensor], float, int, int]:
        """:meth:`_reduce_weighted` of the model deltas ``weight * (t - x)`` through the compressor.

        Returns contributions that sum as the uncompressed ones would: ``sum_i w_i (t_i - base)`` when
        ``base`` is given, else ``sum_i w_i x + sum_i w_i (t_i - x)`` (``x``: the last round's result).
        """
        assert self.compressor is not None
        with torch.no_grad():
            deltas = [
                (t.detach() - g) * weight if valid else torch.zeros_like(t)
                for t, g in zip(tensors, self._global)
            ]
        scalars = torch.tensor(
            [
                weight if valid else 0.0,
                float(valid),
                float(weight > 0 and not finite),
                *[x if valid else 0.0 for x in (extra or [])],
            ],
            dtype=torch.float64,
            device=tensors[0].device if tensors else self.root_device,
        )
        comm = self.outer_comm
        comm.all_reduce([scalars], "sum", purpose="sync")
        total = float(scalars[0])
        if extra is not None:
            extra[:] = [float(x) for x in scalars[3:]]
        comm.all_reduce_compressed(deltas, self.compressor, names=self._tracked_names, purpose="sync")
        with torch.no_grad():
            n = comm.world_size
            if base is not None:
                contrib = [d * n for d in deltas]
            else:
                contrib = [d * n + g * total for d, g in zip(deltas, self._global)]
        return contrib, total, round(float(scalars[1])), round(float(scalars[2]))

    def sync(self) -> dict[str, float]:
        if not self.merge.linear:
            return self._sync_merge()
        tensors = self.tracked_tensors()
        round_index = self._sync_count
        if self.selection is not None:
            losses = self._round_losses()
            participants = self.participants(round_index, losses)
            self.selection_history.append(
                {"round": round_index, "losses": losses, "participants": participants}
            )
        else:
            participants = self.participants(round_index)
        i_take_part = self.outer_rank in participants
        locally_finite = self.is_finite(tensors)
        info: dict[str, float] = {"participants": float(len(participants))}

        if self._fedau is not None:
            omegas = self._fedau.step(participants)
            weight = omegas[self.outer_rank] if i_take_part else 0.0
            contrib, _, n_valid, n_bad = self._reduce_weighted(
                tensors, weight, purpose="sync", base=self._global, compress=True
            )
            with torch.no_grad():
                new = [
                    g + (self.server_lr / self.outer_world_size) * c for g, c in zip(self._global, contrib)
                ]
        elif self.round_seconds is not None:
            # heterogeneous local work: each update divided by its step count, the mean scaled by
            # the mean step count (FedNova's normalised averaging with uniform weights)
            k = self.round_effective_steps if i_take_part else 0
            steps = [float(k)]
            contrib, _, n_valid, n_bad = self._reduce_weighted(
                tensors,
                1.0 / k if k > 0 else 0.0,
                purpose="sync",
                base=self._global,
                extra=steps,
                compress=True,
            )
            with torch.no_grad():
                if n_valid > 0:
                    tau_eff = steps[0] / n_valid
                    new = [g + (tau_eff / n_valid) * c for g, c in zip(self._global, contrib)]
                else:  # no replica managed a step: everyone restarts from the last result
                    new = [g.clone() for g in self._global]
            info["mean_steps"] = steps[0] / n_valid if n_valid else 0.0
        else:
            weight = self._weight() if i_take_part else 0.0
            contrib, total, n_valid, n_bad = self._reduce_weighted(
                tensors, weight, purpose="sync", compress=True
            )
            if total <= 0 and participants:
                raise RuntimeError(
                    f"lightning_fedopt: every participating replica has non-finite weights at step "
                    f"{self.replica_step}; nothing is left to average (resume from the last checkpoint)"
                )
            with torch.no_grad():
                if total > 0:
                    new = [c / total for c in contrib]
                else:  # nobody took part: every replica restarts from the last round's result
                    new = [g.clone() for g in self._global]
                    info["skipped_round"] = 1.0

        if self.track_consensus_distance:
            info["consensus_distance"] = self.consensus_distance(tensors, new, locally_finite)

        if self.average_optimizer_state:
            self._average_optimizer_state(weight if locally_finite else 0.0)

        with torch.no_grad():
            for t, v in zip(tensors, new):
                t.copy_(v)
            for g, v in zip(self._global, new):
                g.copy_(v)
        if n_bad or not locally_finite:
            # a diverged non-participant is reset as well, though it was never part of the average
            self.record_nonfinite(n_bad, local=not locally_finite)
        if not locally_finite:
            self.reset_optimizer_state()
        info["excluded_nonfinite"] = float(n_bad)
        info["valid_replicas"] = float(n_valid)
        return info

    def _optimizer_state_tensors(self) -> list[Tensor]:
        """The optimizers' per-parameter statistics: floating state tensors shaped like their
        parameter (momentum, Adam's moments). Step counters and other scalars are left alone."""
        out = []
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    state = opt.state.get(p, {})
                    for key in sorted(state):
                        v = state[key]
                        if isinstance(v, Tensor) and torch.is_floating_point(v) and v.shape == p.shape:
                            out.append(v)
        return out

    def _average_optimizer_state(self, weight: float) -> None:
        tensors = self._optimizer_state_tensors()
        # compared as plain tuples: Python's str hash differs between processes
        signature = tuple((tuple(t.shape), str(t.dtype)) for t in tensors)
        signatures = self.outer_comm.all_gather_object(signature, purpose="control")
        if len(set(signatures)) != 1:
            raise RuntimeError(
                "average_optimizer_state: the replicas' optimizer states differ in structure "
                "(e.g. a parameter that received no gradient on some ranks); cannot average them"
            )
        if not tensors:
            return
        contrib, total, _, _ = self._reduce_weighted(tensors, weight, purpose="sync")
        if total <= 0:
            return
        with torch.no_grad():
            for t, c in zip(tensors, contrib):
                t.copy_(c / total)

    # ---------------------------------------------------------------- merge operators
    def _merged_models(self, purpose: str) -> tuple[list[Tensor], int]:
        """Every replica's model (one all-gather), merged with ``merge`` over the set keyed by
        (replica, round): the same result on every rank. Returns it and the number of non-finite
        replicas left out. Deltas (TIES, DARE, ...) are taken from the last round's result; NNA's
        reference is the coordinate-wise median, so that every rank agrees."""
        tensors = [t.detach() for t in self.tracked_tensors()]
        names = [n for n, _ in self.tracked_named_tensors()]
        gathered: list[list[Tensor | None]] = [[None] * len(tensors) for _ in range(self.outer_world_size)]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            for r, part in enumerate(self.outer_comm.all_gather(flat, purpose=purpose).wait()):
                offset = 0
                for i in idx:
                    gathered[r][i] = part[offset : offset + tensors[i].numel()].view_as(tensors[i])
                    offset += tensors[i].numel()
        models = [[t for t in m if t is not None] for m in gathered]
        ok = [Contribution(r, self._sync_count, tuple(m)) for r, m in enumerate(models) if self.is_finite(m)]
        if not ok:
            raise RuntimeError("lightning_fedopt: no replica has finite weights; nothing is left to merge")
        if len(ok) < self.merge.min_contributions():
            return Merge("mean")(ContributionSet(ok)), self.outer_world_size - len(ok)
        reference = Merge("median")(ContributionSet(ok)) if self.merge.method == "nna" else None
        base = self._global if self._global else None
        merged = self.merge(ContributionSet(ok), base=base, reference=reference, names=names)
        return merged, self.outer_world_size - len(ok)

    def _sync_merge(self) -> dict[str, float]:
        tensors = self.tracked_tensors()
        locally_finite = self.is_finite(tensors)
        new, n_bad = self._merged_models("sync")
        info: dict[str, float] = {"participants": float(self.outer_world_size)}
        if self.track_consensus_distance:
            info["consensus_distance"] = self.consensus_distance(tensors, new, locally_finite)
        with torch.no_grad():
            for t, v in zip(tensors, new):
                t.copy_(v)
            for g, v in zip(self._global, new):
                g.copy_(v)
        if n_bad:
            self.record_nonfinite(n_bad, local=not locally_finite)
        if not locally_finite:
            self.reset_optimizer_state()
        info["excluded_nonfinite"] = float(n_bad)
        info["valid_replicas"] = float(self.outer_world_size - n_bad)
        return info

    def consensus_values(self) -> list[Tensor]:
        """The weighted mean of every replica with finite weights (one all-reduce)."""
        if not self.merge.linear:
            return self._merged_models("consensus")[0]
        tensors = self.tracked_tensors()
        contrib, total, _, _ = self._reduce_weighted(tensors, self._weight(), purpose="consensus")
        if total <= 0:
            raise RuntimeError("lightning_fedopt: no replica has finite weights; there is no consensus model")
        return [c / total for c in contrib]
