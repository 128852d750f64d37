"""CO2: local updating with the round's all-reduce fully overlapped by the next round's steps.

Sun et al., "CO2: Efficient Distributed Training with Full Communication-Computation Overlap",
ICLR 2024 (arXiv 2401.16265). Every ``H`` steps a replica launches the all-reduce of its round's
pseudo-gradient ``phi_t - theta_i`` **without waiting for it**, applies the outer update with the
*previous* round's average (which has had a whole round to arrive: one round of staleness), and
starts the next round from the new outer weights. The outer update is

* ``m <- beta m + (phi_{t-1} - mean_i theta_{i,t-1}) / Lambda_t``  (staleness-gap penalty),
* ``m <- clamp(m, -c, c)``  element-wise (outer-momentum clipping; the clamped value is kept),
* ``phi_{t+1} <- phi_t - alpha m``.

The first synchronisation of a fit has no earlier round to apply, so the second round starts from
the same outer weights as the first and measures the first round's progress again. It is applied
against the outer weights it lands on (shifted by the first round's outer step), not as a second
copy of that step: on a module already near a minimum (a trained module fit again) the copy
threw the outer weights out of the basin the replicas had found.

The staleness-gap penalty ``Lambda_t`` is a constant divisor of the stale pseudo-gradient, as in
the authors' released code (``co2_gap_penalty``, 1.0 by default), or ``gap_penalty="adaptive"``,
this package's own heuristic (not the paper's formula, which could not be checked here; see
:class:`CO2OuterOptimizer`). The other defaults follow the released code too: ``alpha=1``
(``outer_lr``), ``H=48`` (fairscale-CO2's ``outer_frequency``), clipping at 1.0 (the 4-GPU example),
and the outer momentum ``beta`` by world size when not given (:func:`co2_outer_momentum`).

What the staleness costs: each round restarts from outer weights that lack the round still in
flight, so it measures much of that round's progress again, and both are applied, one round apart
(``phi_{t+1} = phi_t + P(phi_{t-1})`` at ``alpha=1, beta=0``, ``P`` a round's mean progress): in the
directions a round's inner steps settle, the outer weights swing around the minimum instead of
reaching it. It is not "the synchronous average one round late": on the language-model benchmark
(4 replicas, H=16, 2048 steps, bits per byte) CO2 at the defaults ends at 3.38 where the synchronous
average (DiLoCo with outer SGD lr 1, no momentum) ends at 2.79, replicas that never talk at 2.93 and
DiLoCo (Nesterov 0.9/0.9) at 2.51; ``outer_lr=0.7`` gives 3.07 (2.79 and 3.07 from a
single-process re-run of the same model, data and schedule, which reproduces the benchmark's 3.38
and 2.51 to 0.001). The clip (1.0) and the constant penalty (1.0) do not act there (the outer
momentum stays below 0.04). See docs/algorithms.md.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from typing_extensions import override

from lightning_fedopt._validate import check_float, check_int
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.diloco.diloco import DiLoCoStrategy
from lightning_fedopt.strategies.diloco.fragments import InFlight
from lightning_fedopt.strategies.diloco.outer import MAX_OUTER_LR

__all__ = ["CO2OuterFactory", "CO2OuterOptimizer", "CO2Strategy", "co2_outer_momentum"]

log = logging.getLogger("lightning_fedopt")

#: ``gap_penalty`` value selecting this package's adaptive staleness-gap heuristic
ADAPTIVE = "adaptive"

#: the authors' outer momentum by world size (fairseq-CO2, ``fairseq/models/distributed_fairseq_model.py``,
#: ``ddp_backend == "co2"`` with ``co2_outer_momentum`` unset): ``(largest world size, beta)``
CO2_MOMENTUM_BY_WORLD_SIZE: tuple[tuple[int, float], ...] = ((16, 0.0), (32, 0.2), (64, 0.5))
#: beyond the last bound
CO2_MOMENTUM_ABOVE = 0.6


def co2_outer_momentum(world_size: int) -> float:
    """CO2's outer momentum ``beta`` for ``world_size`` processes when none is given, the authors'
    rule (weigao266/fairseq-CO2, ``fairseq/models/distributed_fairseq_model.py``): "if
    args.distributed_world_size <= 16: args.co2_outer_momentum = 0.0 / elif <= 32: 0.2 / elif
    <= 64: 0.5 / else: 0.6" (the same values as fairseq's SlowMo defaults, "obtained by tuning on
    the En-De 16 dataset"; their 4-GPU GPT-2 example passes 0.2 explicitly).

    Example:
        >>> [co2_outer_momentum(n) for n in (1, 2, 16, 17, 32, 33, 64, 65)]
        [0.0, 0.0, 0.0, 0.2, 0.2, 0.5, 0.5, 0.6]
    """
    world_size = check_int("world_size", world_size, low=1)
    for bound, beta in CO2_MOMENTUM_BY_WORLD_SIZE:
        if world_size <= bound:
            return beta
    return CO2_MOMENTUM_ABOVE


def _check_gap_penalty(gap_penalty: Any) -> float | str:
    if isinstance(gap_penalty, str):
        if gap_penalty != ADAPTIVE:
            raise ValueError(
                f"`gap_penalty` (Lambda) must be a finite number > 0 or 'adaptive', got {gap_penalty!r}"
            )
        return gap_penalty
    return check_float("gap_penalty", gap_penalty, low=0.0, low_open=True)


class CO2OuterOptimizer(torch.optim.Optimizer):
    """CO2's outer step as a ``torch.optim`` optimizer over the outer weights.

    ``p.grad`` holds the (stale) mean pseudo-gradient ``phi_old - theta_bar``; the step is
    ``m <- beta m + grad / Lambda``; ``m <- clamp(m, -clip, clip)`` (if ``clip`` is set);
    ``p <- p - lr m``.

    ``gap_penalty`` is ``Lambda``: a constant (> 0), or ``"adaptive"``: this package's own
    heuristic in the spirit of the paper's staleness-gap penalty (not its formula, which could not
    be checked against the paper's text here), per tensor ``Lambda_t = 1 + ||x_t - x_{t-1}|| / ||1||``
    where ``x_t - x_{t-1}`` is how far the outer weights moved since the stale pseudo-gradient's
    round began (the last outer step, ``-lr m``) and ``||1||`` the norm of an all-ones tensor of
    the same shape, i.e. one plus the root-mean-square of that move. It is 1 before the first step
    and grows the more the weights moved while the pseudo-gradient was in flight. It is in weight
    units, not scale-free: for ordinary rounds the move is ~1e-3 to 1e-2 per weight, so
    ``Lambda - 1`` is that small and the heuristic barely changes the update; no measurement backs
    it, which is why the default stays the constant 1.0.

    Example:
        >>> p = torch.zeros(3)
        >>> opt = CO2OuterOptimizer([p], lr=1.0, momentum=0.5, gap_penalty=2.0, clip=0.25)
        >>> p.grad = torch.tensor([0.2, 1.0, -4.0])
        >>> opt.step()
        >>> p
        tensor([-0.1000, -0.2500,  0.2500])
        >>> opt.state[p]["momentum_buffer"]   # clipped, and kept clipped
        tensor([ 0.1000,  0.2500, -0.2500])
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        momentum: float = 0.5,
        gap_penalty: float | str = 1.0,
        clip: float | None = None,
    ) -> None:
        lr = check_float("outer_lr", lr, low=0.0, low_open=True, high=MAX_OUTER_LR)
        momentum = check_float("outer_momentum", momentum, low=0.0, high=1.0, high_open=True)
        gap_penalty = _check_gap_penalty(gap_penalty)
        clip = check_float("clip", clip, low=0.0, low_open=True, allow_none=True)
        super().__init__(params, {"lr": lr, "momentum": momentum, "gap_penalty": gap_penalty, "clip": clip})

    @override
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                m = state.get("momentum_buffer")
                if m is None:
                    m = state["momentum_buffer"] = torch.zeros_like(p)
                if group["gap_penalty"] == ADAPTIVE:
                    # x_t - x_{t-1} is the last step's -lr m: Lambda = 1 + lr ||m|| / sqrt(numel)
                    gap = group["lr"] * float(m.norm()) / math.sqrt(max(m.numel(), 1))
                    penalty = 1.0 + gap
                else:
                    penalty = group["gap_penalty"]
                m.mul_(group["momentum"]).add_(p.grad, alpha=1.0 / penalty)
                if group["clip"] is not None:
                    m.clamp_(-group["clip"], group["clip"])  # in place: the clipped momentum is what is kept
                p.add_(m, alpha=-group["lr"])
        return loss


class CO2OuterFactory:
    """CO2's outer optimizer factory ``params -> CO2OuterOptimizer``: ``momentum=None`` takes the
    authors' ``beta`` for the world size of ``strategy`` (:func:`co2_outer_momentum`) when the
    optimizer is built, at set-up (the same on every rank); the first build for a world size logs
    it (rank 0). Without a strategy (e.g. the check at construction) the world size is 1.

    Example:
        >>> make = CO2OuterFactory(lr=1.0, momentum=None, gap_penalty=1.0, clip=1.0)
        >>> make([torch.zeros(2)]).defaults["momentum"]
        0.0
        >>> make
        CO2OuterFactory(lr=1.0, momentum=by world size (<=16: 0.0, <=32: 0.2, <=64: 0.5, else 0.6), gap_penalty=1.0, clip=1.0)
    """

    def __init__(
        self, lr: float, momentum: float | None, gap_penalty: float | str, clip: float | None
    ) -> None:
        self.lr, self.momentum, self.gap_penalty, self.clip = lr, momentum, gap_penalty, clip
        #: the strategy whose world size sets ``beta`` when ``momentum`` is None
        self.strategy: Any = None
        self._logged: int | None = None

    def momentum_for(self, world_size: int) -> float:
        """``beta`` for ``world_size`` processes."""
        return self.momentum if self.momentum is not None else co2_outer_momentum(world_size)

    def __call__(self, params: Any) -> CO2OuterOptimizer:
        world = max(1, int(self.strategy.world_size)) if self.strategy is not None else 1
        beta = self.momentum_for(world)
        if (
            self.momentum is None
            and self.strategy is not None
            and self._logged != world
            and self.strategy.global_rank == 0
        ):
            self._logged = world
            log.info(
                "lightning_fedopt: CO2 outer momentum %.2g for %d processes (the authors' rule, "
                "fairseq-CO2); pass outer_momentum=... to choose",
                beta,
                world,
            )
        return CO2OuterOptimizer(params, self.lr, beta, self.gap_penalty, self.clip)

    @override
    def __repr__(self) -> str:
        # process-independent (the start-up handshake compares it): the rule, not the strategy
        if self.momentum is None:
            rule = ", ".join(f"<={bound}: {beta}" for bound, beta in CO2_MOMENTUM_BY_WORLD_SIZE)
            momentum = f"by world size ({rule}, else {CO2_MOMENTUM_ABOVE})"
        else:
            momentum = repr(self.momentum)
        return (
            f"CO2OuterFactory(lr={self.lr!r}, momentum={momentum}, gap_penalty={self.gap_penalty!r}, "
            f"clip={self.clip!r})"
        )


class CO2Strategy(DiLoCoStrategy):
    """CO2: asynchronous, one-round-stale outer momentum step overlapping the next round's local steps.

    Args:
        sync_every: ``H`` (the paper's ``tau``), local steps per round (>= 1), or a
            :class:`~lightning_fedopt.schedules.SyncSchedule`. ``"auto"`` (an
            :class:`~lightning_fedopt.schedules.AutoSync`) chooses ``H`` from the measured step time
            ``c`` and the round's transfer time ``R`` (launch to completion, measured when the round
            is applied, one synchronisation after the schedule's measurement): on CUDA by the
            overlapped rule, the smallest ``H`` with ``max(0, R - H c)`` within the budget's share,
            ``ceil(R (1 - budget) / c)``; on CPU, where gloo's all-reduce shares the cores with the
            compute, by the blocking rule (``R`` counted as exposed); bounded by ``low``, ``high``.
        outer_lr: ``alpha`` (> 0); default 1.0, fairscale-CO2's ``outer_lr``.
        outer_momentum: ``beta`` in [0, 1), or None (default): by world size at set-up, the
            authors' rule (:func:`co2_outer_momentum`: 0 up to 16 processes, 0.2 up to 32, 0.5 up
            to 64, 0.6 above), logged once.
        gap_penalty: the staleness-gap penalty ``Lambda`` dividing the stale pseudo-gradient: a
            constant (> 0), or ``"adaptive"``: this package's own heuristic, computed each round
            from how far the outer weights moved meanwhile (:class:`CO2OuterOptimizer`; in weight
            units, so it barely acts at ordinary scales, and unmeasured). The default is the
            constant 1.0 of the authors' released code (``co2_gap_penalty``), i.e. no penalty.
        clip: element-wise bound ``c`` (> 0) of the outer momentum, or None for no clipping;
            default 1.0, the authors' ``co2_clip_threshold`` (their 4-GPU example turns it on).
        offload_global, **kwargs: as for :class:`~lightning_fedopt.strategies.diloco.DiLoCoStrategy`
            and :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy` (``group_size``,
            ``bn_recalibration``, which defaults to 8 as for DiLoCo, ...).

    Raises:
        ValueError: for ``compressor=``: the compressed all-reduce is synchronous, so the round's
            transfer could not overlap the next round's steps (CO2's point); DiLoCoStrategy takes
            a compressor.

    Example:
        >>> import lightning as L
        >>> import lightning_fedopt as lf
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=lf.CO2Strategy(sync_every=48, clip=1.0))
        >>> adaptive = lf.CO2Strategy(sync_every=48, gap_penalty="adaptive")
    """

    strategy_name = "co2"

    def __init__(
        self,
        sync_every: int | str | SyncSchedule = 48,
        *,
        outer_lr: float = 1.0,
        outer_momentum: float | None = None,
        gap_penalty: float | str = 1.0,
        clip: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        for name in (
            "outer_optimizer",
            "outer_kwargs",
            "fragments",
            "fragment_layout",
            "sync_delay",
            "mixing",
        ):
            if name in kwargs:
                raise ValueError(f"CO2Strategy: unknown argument {name!r} (its outer step is fixed)")
        if kwargs.get("compressor") is not None:
            raise ValueError(
                "`compressor` is not supported by CO2Strategy: the compressed all-reduce is synchronous, so "
                "the round's transfer would block instead of overlapping the next round's local steps (the "
                "point of CO2); use DiLoCoStrategy(compressor=...) for compressed pseudo-gradients"
            )
        outer_momentum = check_float(
            "outer_momentum", outer_momentum, low=0.0, high=1.0, high_open=True, allow_none=True
        )
        # validates the outer arguments now, with their names
        CO2OuterOptimizer([torch.zeros(1)], outer_lr, outer_momentum or 0.0, gap_penalty, clip)
        factory = CO2OuterFactory(outer_lr, outer_momentum, gap_penalty, clip)
        super().__init__(sync_every, outer_optimizer=factory, **kwargs)
        factory.strategy = self  # beta by this strategy's world size, at set-up
        self.outer_lr, self.outer_momentum, self.gap_penalty, self.clip = (
            outer_lr,
            outer_momentum,
            gap_penalty,
            clip,
        )
        #: ``fault_tolerance="torchft"``: whether the last synchronisation applied a round
        self._ft_applied_last = False
        #: ``sync_every="auto"``: the transfer seconds of the round the last synchronisation applied
        #: (None: none applied, or not timed, e.g. restored from a checkpoint)
        self._applied_seconds: float | None = None

    @override
    def algorithm_state_dict(self) -> dict[str, Any]:
        return {**super().algorithm_state_dict(), "ft_applied_last": self._ft_applied_last}

    @override
    def load_algorithm_state_dict(self, state: dict[str, Any]) -> None:
        super().load_algorithm_state_dict(state)
        self._ft_applied_last = bool(state.get("ft_applied_last", False))

    @override
    def sync_fault_tolerant(self, contribute: bool = True) -> dict[str, float]:
        """CO2 as torchft rounds, one in flight at a time: this round's pseudo-gradients are
        measured (from the outer weights the round started at), the previous round is finished (its
        all-reduce has overlapped this round's steps; the vote; the stale outer step if it
        committed), then this round's quorum and all-reduce start, to overlap the next round. A
        failure surfaces at the finish: that round is not applied (its progress is dropped; never a
        partial average). A group that joins or heals at the quorum sends nothing and finishes the
        round with its peers' sum, so it applies what they apply."""
        contribution = self.all_pseudo_gradients()
        same_start = not self._ft_applied_last
        info: dict[str, float] = {"stale_applied": 0.0}
        if self.ft_in_flight:
            before = [phi.clone() for phi in self.outer_weights] if same_start else None
            info.update(self.ft_finish())
            info["stale_applied"] = info.pop("applied")
            if info["stale_applied"] and before is not None:
                # this round started from the outer weights the applied one started from (nothing was
                # applied in between): it is applied against the weights it lands on, as in `sync`
                with torch.no_grad():
                    for d, phi, b, param in zip(contribution[0], self.outer_weights, before, self.param_mask):
                        if param:
                            d.add_((phi - b).to(d.device))
        else:
            self._restart_from_global()
        self._ft_applied_last = bool(info["stale_applied"])
        launched = self.ft_launch(contribute=contribute, contribution=contribution)
        # "healed": at this synchronisation's quorum (the finished round's numbers are the rest)
        return {**info, "healed": launched["healed"]}

    @property
    def effective_outer_momentum(self) -> float:
        """The ``beta`` in use: ``outer_momentum``, or the authors' rule for this world size."""
        if self.outer_momentum is not None:
            return self.outer_momentum
        return co2_outer_momentum(max(1, self.world_size))

    @override
    def sync(self) -> dict[str, float]:
        """Launch this round's all-reduce, then apply the previous round's (one round stale)."""
        previous = self.in_flight
        self.in_flight = self.launch_round(None, self.replica_step + (self.sync_every or 0))
        self._applied_seconds = None
        if previous is None:  # first round: nothing to apply yet; restart from the outer weights
            self._restart_from_global()
            return {"stale_applied": 0.0}
        info = self._apply_stale(previous, self.in_flight)
        self._applied_seconds = previous.seconds
        return {**info, "stale_applied": 1.0}

    # ---------------------------------------------------------------- sync_every="auto"
    #: a round overlaps the next ``H`` steps: ``H = ceil(R (1 - b) / c)``, not the blocking rule
    auto_overlapped = True

    @override
    def auto_hides_rounds(self) -> bool:
        """The overlapped rule where the all-reduce runs beside the compute without taking its
        resources (CUDA: NCCL on its own stream); on CPU (gloo) the all-reduce's copies and sums
        run on the cores that compute, so nothing is hidden for sure and ``H`` follows the
        blocking rule with the round's transfer time (measured on 2 CPU processes, 100 Mbit/s:
        the overlapped rule chose H = 2 and the steps took 1.9x the compute alone)."""
        return self.root_device.type == "cuda"

    @override
    def auto_round_timed(self) -> bool:
        return True

    @override
    def auto_measures(self, step: int, sync_count: int) -> bool:
        """One synchronisation after the schedule's: a round's transfer time is known when it has
        completed, at the next synchronisation (which applies it, one round stale); the new ``H``
        starts there, at a round boundary (the round launched there overlaps the new ``H`` steps)."""
        return sync_count > 1 and super().auto_measures(step, sync_count - 1)

    @override
    def auto_round_seconds(self, blocking_seconds: float) -> float | None:
        """The transfer time ``R`` of the round this synchronisation applied, from its launch to its
        completion (not the part of it this synchronisation waited for, which ``blocking_seconds``
        holds with the launch of the next); None if not timed in this process."""
        return self._applied_seconds

    def _apply_stale(self, f: InFlight, later: InFlight | None) -> dict[str, float]:
        """Apply the stale round ``f``. ``later``, the round launched since, started from the same
        outer weights as ``f`` when the first synchronisation of the fit applied nothing (the fit's
        second round, or its partial round after one synchronisation): it measured the progress of
        ``f`` again, from the same point, and applied as it is it would repeat ``f``'s outer step. It
        is shifted by that step, i.e. applied against the outer weights it lands on."""
        # whether a replica was finite *then* is already in the reduced counts; a reset now
        # depends only on the replica's weights now
        f.local_finite = True
        same_start = later is not None and self.sync_count == 1
        before = [phi.clone() for phi in self.outer_weights] if same_start else None
        info = self.apply_round(f)
        if later is not None and before is not None:
            later.shift = [
                phi - b if param else None
                for phi, b, param in zip(self.outer_weights, before, self.param_mask)
            ]
        return info

    def _restart_from_global(self) -> None:
        """Every replica restarts from the outer weights (a non-finite one also forgets its optimizer state)."""
        tensors = self.tracked_tensors()
        local_finite = self.is_finite(tensors)
        with torch.no_grad():
            for t, phi in zip(tensors, self.outer_weights):
                t.copy_(phi.to(t.device, non_blocking=True))
        if not local_finite:
            self.record_nonfinite(0, local=True)
            self.reset_optimizer_state()
        self.at_global = True

    @override
    def final_sync(self) -> None:
        """Apply the round in flight, then the partial round since (if any), synchronously (at the
        last training step, before its validation and checkpoints)."""
        if self.fault_tolerance:
            if self.ft_in_flight:
                contribution = self.all_pseudo_gradients() if self.steps_since_sync > 0 else None
                info = self.ft_finish()
                self._ft_applied_last = bool(info["applied"])
                if contribution is not None:
                    self.ft_launch(contribution=contribution)
                    self.run.last_sync = {**self.ft_finish(), "step": self.replica_step}
            self.at_global = True
            return
        pending, self.in_flight = self.in_flight, None
        # the partial round's pseudo-gradient, against the outer weights it started from
        partial = self.launch_round(None, self.replica_step) if self.steps_since_sync > 0 else None
        if pending is not None:
            self._apply_stale(pending, partial)
        if partial is not None:
            self.apply_round(partial)
        self.at_global = True

    @override
    def local_is_consensus(self) -> bool:
        if self.in_flight is not None or self.ft_in_flight:
            return False
        return super().local_is_consensus()
