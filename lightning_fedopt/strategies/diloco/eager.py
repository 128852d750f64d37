"""Eager updates: DiLoCo whose all-reduce overlaps the next round, with the replica's own fresh
pseudo-gradient standing in for its share of the average until the average arrives.

Kale, Douillard & Donchev, "Eager Updates For Overlapped Communication and Computation in DiLoCo",
arXiv 2502.12996 (2025). Plain DiLoCo blocks at every outer step until the all-reduce of the
pseudo-gradients is done. Delaying the outer step by one round lets the all-reduce overlap the
whole next round (the paper's "1-outer-step" overlap), but applying only the one-round-old average
(the paper's naive delayed variant, Algorithm 2, close to CO2) costs quality. The eager variant
(their Algorithm 3) applies, at the end of round ``t``, on every replica ``m`` at once, a mixture
of its **own fresh** pseudo-gradient with the **other replicas' contributions of round ``t - 1``**,
which have had a whole round to arrive:

* ``Delta_m^t = phi_m^{t-1} - theta_m^t`` (this replica's progress in round ``t``), sent at once
  (asynchronous all-reduce, in flight during round ``t + 1``);
* ``g_m^t = (1/M) Delta_m^t + (1/M) sum_{k != m} Delta_k^{t-1}
  = mean_k Delta_k^{t-1} - (1/M) Delta_m^{t-1} + (1/M) Delta_m^t``;
* ``phi_m^t = OuterOpt_m(phi_m^{t-1}, g_m^t)`` and ``theta_m <- phi_m^t``.

Written the second way, the proxy ``Delta_m^t / M`` enters once, eagerly, and is taken out again
one round later, when the average it stood for arrives (``- Delta_m^{t-1} / M`` next to the mean):
summed over the rounds, every replica's outer optimizer receives exactly the sum of the true
averages, plus its own latest proxy. The outer weights therefore differ between replicas (each has
its own outer optimizer state, in the replica's checkpoint shard), but they do not drift apart:
with a linear outer optimizer (SGD, momentum, Nesterov) two replicas differ only by the filtered
difference of their last proxies (plain SGD: ``phi_m - phi_k = -(lr / M) (Delta_m^t - Delta_k^t)``,
nothing accumulates). With one replica the rule is plain DiLoCo.

The first round of a fit has no earlier average: it applies ``Delta_m^1 / M`` (the average and the
replica's own earlier contribution both count as zero). Buffers (BatchNorm running statistics)
travel as values and follow the same mixture: the others' values of round ``t - 1`` with the
replica's own fresh one (at the first round the others' values are the common starting values).

**The consensus** (validation, checkpoints, the model ``fit`` returns) is the mean of the replicas'
outer weights: one all-reduce of the weights when it is used during training (purpose
``"consensus"``), none before the first round or after the end. **The end of fit** receives the
round in flight (its proxy replaced by the average) and the partial round since (its average,
waited for), in one outer step; the replicas' outer weights are then averaged (one all-reduce of
the weights, purpose ``"sync"``) and every replica takes the mean (a fit that ends at a
synchronisation takes that outer step with the correction alone). The bytes of a round are
DiLoCo's (one all-reduce of the pseudo-gradients with the counters).

The weights ``1/M`` are the plain average's, our reading of the paper's "mixture of the current
local outer gradient with the delayed mixture of all other replicas' outer gradients" (the text of
its Algorithm 3 was not available here; ``docs/algorithms.md`` says what was read). The default
outer learning rate is lower than DiLoCo's from three replicas on (:data:`EAGER_OUTER_LR_MORE`).

A replica whose weights are NaN/Inf contributes nothing to the round's all-reduce (the mean is over
the finite replicas), counts its own fresh pseudo-gradient as zero, restarts from its new outer
weights and loses its inner optimizer state (DiLoCo's handling, through
:meth:`~lightning_fedopt.strategies.diloco.DiLoCoStrategy.apply_round`). When no replica of the
round in flight was finite, training stops with :class:`~lightning_fedopt.NoFiniteReplicaError`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt.runtime.reduce import MaskedSum, NoFiniteReplicaError, PendingSum, masked_sum
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.diloco.diloco import DiLoCoStrategy
from lightning_fedopt.strategies.diloco.fragments import InFlight, pseudo_gradients
from lightning_fedopt.strategies.diloco.outer import DILOCO_OUTER_MOMENTUM, check_outer_kwargs, replica_count

__all__ = [
    "DEFAULT_SYNC_EVERY",
    "EagerDiLoCoStrategy",
    "EagerOuterOptimizer",
    "eager_outer_gradients",
    "eager_outer_lr",
]

log = logging.getLogger("lightning_fedopt")

#: ``H``: the paper's, Table 2 ("we propose to overlap up to 2.4 seconds (H = 30 total steps)"),
#: the number of inner steps of its comparison of the overlaps
DEFAULT_SYNC_EVERY = 30

#: the default outer learning rate (Nesterov SGD, momentum 0.9) up to two replicas: 0.4, the value
#: the streaming DiLoCo paper "tuned to be optimal at small scale" with two replicas, the setting this
#: paper's experiments build on (its own text on the value was not available here: see docs)
EAGER_OUTER_LR_TWO = 0.4
#: ... and from three replicas, or when their number is unknown: this package's measurement, not
#: the paper's. The eager step is ``(1/M) Delta^t`` fresh and ``(M-1)/M`` one
#: round old, so it nears the naive delayed step as ``M`` grows and, like it, needs a lower rate: on
#: the 2-layer regression of the tests (H = 16, 640 steps, three initialisations) 0.6 diverged at
#: M = 4 and 8 every time; at M = 8, 0.4 ended 4-18x above 0.2; at M = 4 it was mixed (0.8-3.4x);
#: at M = 2, 0.4 was the best of {0.2, 0.4, 0.6} every time
EAGER_OUTER_LR_MORE = 0.2

#: the DiLoCo arguments that eager updates do not take (one round of the whole model at a time)
_STREAMING_ARGUMENTS = ("fragments", "fragment_layout", "sync_delay", "mixing")


def eager_outer_gradients(
    previous_mean: list[Tensor], own_previous: list[Tensor], own_fresh: list[Tensor], replicas: int
) -> list[Tensor]:
    """The eager outer gradient of one replica, per tensor:
    ``previous_mean - own_previous / M + own_fresh / M`` (``M = replicas``), i.e. its own fresh
    pseudo-gradient's share with the other replicas' shares of the round before.

    Example:
        >>> mean = [torch.tensor([3.0])]          # round t-1: replicas sent 2 and 4
        >>> eager_outer_gradients(mean, [torch.tensor([2.0])], [torch.tensor([6.0])], 2)
        [tensor([5.])]
    """
    m = float(replicas)
    return [
        p - o.to(p.device, p.dtype) / m + f.to(p.device, p.dtype) / m
        for p, o, f in zip(previous_mean, own_previous, own_fresh)
    ]


def eager_outer_lr(replicas: int | None) -> float:
    """The default outer learning rate of eager updates for ``replicas`` replicas:
    :data:`EAGER_OUTER_LR_TWO` up to two, :data:`EAGER_OUTER_LR_MORE` from three or when unknown.

    Example:
        >>> [eager_outer_lr(m) for m in (1, 2, 3, 8, None)]
        [0.4, 0.4, 0.2, 0.2, 0.2]
    """
    return EAGER_OUTER_LR_TWO if replicas is not None and replicas <= 2 else EAGER_OUTER_LR_MORE


class EagerOuterOptimizer:
    """The default outer optimizer of eager updates, a factory ``params -> torch.optim.SGD``:
    Nesterov SGD, momentum 0.9, learning rate :func:`eager_outer_lr` of the strategy's number of
    replicas, resolved when built (at set-up) and logged once (rank 0).

    Example:
        >>> make = EagerOuterOptimizer({"momentum": 0.9, "nesterov": True})
        >>> make([torch.zeros(1)]).defaults["lr"]   # no strategy: replicas unknown
        0.2
        >>> make
        EagerOuterOptimizer(SGD, lr=0.4 up to 2 replicas, else 0.2, momentum=0.9, nesterov=True)
    """

    def __init__(self, kwargs: dict[str, Any], strategy: Any = None) -> None:
        self.kwargs = dict(kwargs)
        #: the strategy whose replicas are counted (None: unknown)
        self.strategy = strategy
        self._logged: int | None = None

    def __call__(self, params: Any) -> torch.optim.SGD:
        replicas = replica_count(self.strategy)
        lr = eager_outer_lr(replicas)
        if (
            replicas is not None
            and self._logged != replicas
            and getattr(self.strategy, "global_rank", 0) == 0
        ):
            self._logged = replicas
            log.info(
                "lightning_fedopt: eager DiLoCo outer learning rate %.2g for %d replica(s); pass "
                "outer_kwargs={'lr': ...} to choose",
                lr,
                replicas,
            )
        return torch.optim.SGD(params, lr=lr, **self.kwargs)

    @override
    def __repr__(self) -> str:
        # process-independent (the start-up handshake compares it): the rule, not the strategy
        rest = "".join(f", {k}={v!r}" for k, v in sorted(self.kwargs.items()))
        return f"EagerOuterOptimizer(SGD, lr={EAGER_OUTER_LR_TWO} up to 2 replicas, else {EAGER_OUTER_LR_MORE}{rest})"


class EagerDiLoCoStrategy(DiLoCoStrategy):
    """DiLoCo with eager updates: each round's all-reduce overlaps the whole next round, and every
    replica takes its outer step at once with its own fresh pseudo-gradient standing in for its
    share of the average (Kale, Douillard & Donchev 2025, arXiv 2502.12996, Algorithm 3).

    Per round ``t`` and replica ``m`` (``M`` replicas; a group of ``group_size`` processes is one):
    ``g_m = mean_k Delta_k^{t-1} - Delta_m^{t-1} / M + Delta_m^t / M``, stepped by the replica's own
    outer optimizer on its own outer weights ``phi_m``; ``theta_m`` restarts from ``phi_m``. See
    :mod:`~lightning_fedopt.strategies.diloco.eager` for the rule, the consensus (the mean of the
    replicas' outer weights) and the end of fit.

    Args:
        sync_every: ``H`` (>= 1), inner steps per round, or a
            :class:`~lightning_fedopt.schedules.SyncSchedule` (``"auto"`` too). Default 30, the
            paper's (Table 2: "H = 30 total steps").
        outer_optimizer, outer_kwargs: the outer optimizer, as for
            :class:`~lightning_fedopt.strategies.diloco.DiLoCoStrategy`; default: SGD, momentum 0.9,
            Nesterov, learning rate 0.4 up to two replicas (streaming DiLoCo's) and 0.2 from three
            (:class:`EagerOuterOptimizer`: lower than DiLoCo's 0.6-0.8, because most of the eager
            step is one round old; an explicit ``outer_kwargs={"lr": ...}`` wins). One per replica
            (the replicas' outer weights differ). The bound on the replicas' drift holds for a
            linear outer optimizer (SGD with or without momentum/Nesterov).
        offload_global: keep the outer weights, the outer optimizer and the replica's previous
            pseudo-gradient on the CPU.
        warmup_steps, **kwargs: as for :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`
            (``group_size``, ``final_sync``, ``bn_recalibration`` (8 here, as for DiLoCo), ...).

    Raises:
        ValueError: for an argument out of range; for ``fragments``, ``fragment_layout``,
            ``sync_delay``, ``mixing`` (streaming DiLoCo's: a round here is the whole model, its
            transfer overlapping the whole next round); for ``compressor`` (the compressed
            all-reduce is synchronous, so it would block instead of overlapping); for
            ``round_seconds`` (the eager share ``1/M`` assumes replicas of equal weight) and for
            ``fault_tolerance="torchft"`` (its all-reduce overlaps the next round).

    Memory: besides DiLoCo's outer weights and outer optimizer, one copy of the model for the
    replica's previous pseudo-gradient (and, during a synchronisation, one for the fresh one).

    Example:
        >>> import lightning as L
        >>> strategy = EagerDiLoCoStrategy(sync_every=30)
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy)
        >>> EagerDiLoCoStrategy(sync_delay=5)
        Traceback (most recent call last):
        ...
        ValueError: `sync_delay` is not supported by EagerDiLoCoStrategy: a round synchronises the whole model and its all-reduce overlaps the whole next round (streaming DiLoCo's fragments, delay and mixing are not combined with eager updates)
    """

    strategy_name = "eager_diloco"
    #: the eager share 1/M of a replica's fresh pseudo-gradient assumes equal weights
    supports_round_seconds = False
    supports_fault_tolerance = False

    def __init__(
        self,
        sync_every: int | str | SyncSchedule = DEFAULT_SYNC_EVERY,
        *,
        outer_optimizer: Any = None,
        outer_kwargs: dict[str, Any] | None = None,
        offload_global: bool = False,
        warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        for name in _STREAMING_ARGUMENTS:
            if name in kwargs:
                raise ValueError(
                    f"`{name}` is not supported by EagerDiLoCoStrategy: a round synchronises the whole model "
                    "and its all-reduce overlaps the whole next round (streaming DiLoCo's fragments, delay "
                    "and mixing are not combined with eager updates)"
                )
        if kwargs.get("compressor") is not None:
            raise ValueError(
                "`compressor` is not supported by EagerDiLoCoStrategy: the compressed all-reduce is "
                "synchronous, so the round's transfer would block instead of overlapping the next round's "
                "steps; use DiLoCoStrategy(compressor=...) for compressed pseudo-gradients"
            )
        default_outer: EagerOuterOptimizer | None = None
        outer_kwargs = None if outer_kwargs is None else check_outer_kwargs(outer_kwargs)
        if outer_optimizer is None and "lr" not in (outer_kwargs or {}):
            # the default (Nesterov SGD) with a learning rate for eager updates, by replicas
            sgd = {"momentum": DILOCO_OUTER_MOMENTUM, "nesterov": True, **check_outer_kwargs(outer_kwargs)}
            default_outer = outer_optimizer = EagerOuterOptimizer(sgd)
            outer_kwargs = None
        super().__init__(
            sync_every,
            outer_optimizer=outer_optimizer,
            outer_kwargs=outer_kwargs,
            offload_global=offload_global,
            warmup_steps=warmup_steps,
            **kwargs,
        )
        if default_outer is not None:
            default_outer.strategy = self  # the learning rate by this strategy's replicas, at set-up
        #: ``Delta_m^{t-1}``: this replica's pseudo-gradient of the round in flight (buffers: its
        #: values then), on the outer weights' device
        self._own_previous: list[Tensor] = []

    @override
    def fault_tolerance_unsupported(self) -> str | None:
        return (
            "its all-reduce overlaps the next round's local steps and each replica keeps its own outer "
            "weights, while a torchft round is one quorum and one set of global weights per sync "
            "(use DiLoCoStrategy)"
        )

    # ---------------------------------------------------------------- state
    @override
    def setup_algorithm(self) -> None:
        super().setup_algorithm()
        self._reset_own_previous()

    def _reset_own_previous(self) -> None:
        """No round in flight: the replica's earlier contribution counts as zero (a buffer: as its
        present value, which every replica shares)."""
        with torch.no_grad():
            self._own_previous = [
                torch.zeros_like(phi) if param else phi.detach().clone()
                for phi, param in zip(self.outer_weights, self.param_mask)
            ]

    @property
    def own_previous_pseudo_gradients(self) -> list[Tensor]:
        """``Delta_m^{t-1}``: this replica's contribution to the round in flight (read-only copies)."""
        return [t.detach().clone() for t in self._own_previous]

    @override
    def algorithm_state_dict(self) -> dict[str, Any]:
        """DiLoCo's (the round in flight, completed; rank 0's outer optimizer), with the consensus
        as the outer weights: what every replica restarts from when the world size changes. Each
        replica's own outer weights, outer optimizer and previous pseudo-gradient are in its shard
        (:meth:`replica_state_dict`)."""
        state = super().algorithm_state_dict()
        state["global"] = [v.detach().cpu().clone() for v in self.cached_consensus_values()]
        return state

    @override
    def load_algorithm_state_dict(self, state: dict[str, Any]) -> None:
        super().load_algorithm_state_dict(state)
        # Without this replica's shard (another world size) every replica restarts from the
        # consensus, which holds the proxies of the round in flight on average: count the round's
        # average as this replica's contribution, so that its arrival is not applied twice.
        self._reset_own_previous()
        f = self.in_flight
        if f is None or len(f.indices) != len(self._own_previous):
            return
        result = f.wait()
        if result.valid > 0:  # (a round without a finite replica stops training when it is applied)
            with torch.no_grad():
                self._own_previous = [
                    (s / result.valid).to(o.device, o.dtype) for s, o in zip(result.sums, self._own_previous)
                ]

    @override
    def replica_state_dict(self) -> dict[str, Any]:
        state = super().replica_state_dict()
        held, self.in_flight = self.in_flight, None  # the round in flight is saved once, in the meta entry
        try:
            own = super().algorithm_state_dict()
        finally:
            self.in_flight = held
        state["eager"] = {
            "outer_weights": own["global"],
            "outer": own["outer"],
            "own_previous": [t.detach().cpu().clone() for t in self._own_previous],
        }
        return state

    @override
    def load_replica_state_dict(self, state: dict[str, Any]) -> None:
        super().load_replica_state_dict(state)
        own = state.get("eager")
        if own is None:
            return
        if len(own["own_previous"]) != len(self._own_previous):
            log.warning(
                "lightning_fedopt: eager DiLoCo replica state does not match the model; it starts afresh"
            )
            return
        super().load_algorithm_state_dict(
            {"global": own["outer_weights"], "outer": own["outer"], "at_global": self.at_global}
        )
        with torch.no_grad():
            self._own_previous = [
                t.to(o.device, o.dtype) for t, o in zip(own["own_previous"], self._own_previous)
            ]

    # ---------------------------------------------------------------- consensus
    @override
    def consensus_values(self) -> list[Tensor]:
        """The mean of the replicas' outer weights: one all-reduce while a round is in flight (the
        replicas' outer weights differ then), none otherwise (they are equal)."""
        if self.in_flight is None:
            return super().consensus_values()
        return self._replica_mean(purpose="consensus")

    def _replica_mean(self, purpose: str) -> list[Tensor]:
        """The mean over the (finite) replicas of their outer weights, on every rank."""
        dev = self.root_device
        values = [phi.detach().to(dev, copy=True) for phi in self.outer_weights]
        pending = masked_sum(self.outer_comm, values, purpose=purpose)
        return pending.wait().mean(step=self.replica_step, what="outer weights")

    @override
    def after_final_sync(self) -> None:
        """Every replica took the consensus (a stop the strategy could not foresee): the round in
        flight is dropped, the outer weights are the consensus, nothing is in flight to correct."""
        super().after_final_sync()
        self._reset_own_previous()

    # ---------------------------------------------------------------- the round
    def _own_pseudo_gradients(self) -> tuple[list[Tensor], bool]:
        """``Delta_m^t`` against this replica's outer weights (buffers: their values), and whether
        the replica is finite. A non-finite replica counts zero progress and keeps its buffers'
        earlier values."""
        tensors = self.tracked_tensors()
        mask = self.param_mask
        fresh, valid, finite = pseudo_gradients(tensors, self.outer_weights, mask, 1)
        if not valid:
            with torch.no_grad():
                fresh = [
                    torch.zeros_like(t) if param else prev.to(t.device, t.dtype, copy=True)
                    for t, param, prev in zip(tensors, mask, self._own_previous)
                ]
        return fresh, finite

    def _round_mean(self, f: InFlight) -> tuple[list[Tensor], int, int]:
        """Wait for round ``f``: the mean over its finite replicas, their number and the number
        excluded as non-finite."""
        result = f.wait()
        if result.valid == 0:
            raise NoFiniteReplicaError(self.replica_step)
        return [s / result.valid for s in result.sums], result.valid, result.invalid

    def _outer_step_with(
        self, gradients: list[Tensor], local_finite: bool, excluded: int, valid: int
    ) -> dict[str, float]:
        """One outer step of this replica with ``gradients`` as the outer gradient (buffers: as the
        new values), through DiLoCo's :meth:`apply_round` (the replica restarts from its new outer
        weights; a non-finite one is reset and loses its inner optimizer state)."""
        sums = [g.detach() for g in gradients]
        scalars = torch.tensor([1.0, 1.0, float(excluded)], dtype=torch.float64)
        done = InFlight(
            None,
            list(range(len(sums))),
            self.replica_step,
            PendingSum(sums, scalars, None, 0),
            local_finite,
            result=MaskedSum(sums, 1.0, 1, excluded),
        )
        # DiLoCo measures the distance to the average it applies; the eager gradient is not one
        tracking, self.track_consensus_distance = self.track_consensus_distance, False
        try:
            info = self.apply_round(done)
        finally:
            self.track_consensus_distance = tracking
        info["valid_replicas"] = float(valid)
        return info

    @override
    def sync(self) -> dict[str, float]:
        """Send this round's pseudo-gradient (asynchronously), receive the previous round's average
        (sent one round ago) and take the eager outer step."""
        previous = self.in_flight
        fresh, finite = self._own_pseudo_gradients()
        self.in_flight = self.launch_round(None, self.replica_step + (self.sync_every or 0))
        if previous is None:  # the first round: no earlier average, no earlier contribution
            mean, valid, excluded = [t.to(f.device) for t, f in zip(self._own_previous, fresh)], 0, 0
        else:
            mean, valid, excluded = self._round_mean(previous)
        gradients = eager_outer_gradients(mean, self._own_previous, fresh, self.outer_world_size)
        info = self._outer_step_with(gradients, finite, excluded, valid)
        with torch.no_grad():
            self._own_previous = [f.to(o.device, o.dtype) for f, o in zip(fresh, self._own_previous)]
        return {**info, "eager_first_round": float(previous is None)}

    @override
    def final_sync(self) -> None:
        """The end of fit: the round in flight arrives (its proxy is replaced by its average) and the
        partial round since is waited for (its average is added), in one outer step; then every
        replica takes the mean of the replicas' outer weights."""
        pending, self.in_flight = self.in_flight, None
        partial = self.launch_round(None, self.replica_step) if self.steps_since_sync > 0 else None
        if pending is None and partial is None:
            return
        mask = self.param_mask
        gradients: list[Tensor | None] = [None] * len(mask)
        valid = excluded = 0
        if pending is not None:
            mean, valid, excluded = self._round_mean(pending)
            m = float(self.outer_world_size)
            gradients = [
                x - o.to(x.device, x.dtype) / m if param else x
                for x, o, param in zip(mean, self._own_previous, mask)
            ]
        local_finite = True
        if partial is not None:
            mean, valid, newly_excluded = self._round_mean(partial)
            excluded += newly_excluded
            local_finite = partial.local_finite
            gradients = [x if g is None or not param else g + x for g, x, param in zip(gradients, mean, mask)]
        self._outer_step_with([g for g in gradients if g is not None], local_finite, excluded, valid)
        if pending is not None:  # the replicas' outer weights differ: every replica takes their mean
            mean = self._replica_mean(purpose="sync")
            with torch.no_grad():
                for phi, t, x in zip(self.outer_weights, self.tracked_tensors(), mean):
                    phi.copy_(x.to(phi.device, phi.dtype))
                    t.copy_(x.to(t.device, t.dtype))
        self.at_global = True
        self._reset_own_previous()
