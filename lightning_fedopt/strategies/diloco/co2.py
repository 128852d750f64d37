"""CO2: local updating with the round's all-reduce fully overlapped by the next round's steps.

Sun et al., "CO2: Efficient Distributed Training with Full Communication-Computation Overlap",
ICLR 2024 (arXiv 2401.16265). Every ``H`` steps a replica launches the all-reduce of its round's
pseudo-gradient ``phi_t - theta_i`` **without waiting for it**, applies the outer update with the
*previous* round's average (which has had a whole round to arrive: one round of staleness), and
starts the next round from the new outer weights. The outer update is

* ``m <- beta m + (phi_{t-1} - mean_i theta_{i,t-1}) / Lambda_t``  (staleness-gap penalty),
* ``m <- clamp(m, -c, c)``  element-wise (outer-momentum clipping; the clamped value is kept),
* ``phi_{t+1} <- phi_t - alpha m``.

The staleness-gap penalty ``Lambda_t`` is either a constant divisor of the stale pseudo-gradient,
as in the authors' released code (``co2_gap_penalty``, 1.0 by default), or the paper's adaptive
penalty, computed every round from how far the outer weights moved since the stale
pseudo-gradient's round began (``gap_penalty="adaptive"``, see :class:`CO2OuterOptimizer`).
The other defaults follow the released code too: ``beta=0.5``, ``alpha=1``, ``H=48``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from typing_extensions import override

from lightning_fedopt._validate import check_float
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.diloco.diloco import DiLoCoStrategy
from lightning_fedopt.strategies.diloco.outer import MAX_OUTER_LR

__all__ = ["CO2OuterOptimizer", "CO2Strategy"]

#: ``gap_penalty`` value selecting the paper's adaptive staleness-gap penalty
ADAPTIVE = "adaptive"


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

    ``gap_penalty`` is ``Lambda``: a constant (> 0), or ``"adaptive"``: the paper's staleness-gap
    penalty, per tensor ``Lambda_t = 1 + ||x_t - x_{t-1}|| / ||1||`` where ``x_t - x_{t-1}`` is
    how far the outer weights moved since the stale pseudo-gradient's round began (the last outer
    step, ``-lr m``) and ``||1||`` the norm of an all-ones tensor of the same shape, i.e. one plus the
    root-mean-square of that move. It is 1 before the first step, and grows the more the weights
    moved while the pseudo-gradient was in flight.

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


class CO2Strategy(DiLoCoStrategy):
    """CO2: asynchronous, one-round-stale outer momentum step overlapping the next round's local steps.

    Args:
        sync_every: ``H`` (the paper's ``tau``), local steps per round (>= 1), or a
            :class:`~lightning_fedopt.schedules.SyncSchedule`.
        outer_lr: ``alpha`` (> 0).
        outer_momentum: ``beta`` in [0, 1).
        gap_penalty: the staleness-gap penalty ``Lambda`` dividing the stale pseudo-gradient: a
            constant (> 0), or ``"adaptive"`` for the paper's penalty computed each round from how
            far the outer weights moved meanwhile (:class:`CO2OuterOptimizer`; the paper's ablation
            on GPT-2 reports perplexity 7.39 with it, 7.56 without). The default stays the constant
            1.0 of the authors' released code (i.e. no penalty), which the published benchmarks of
            this package were measured with; whether "adaptive" helps at this package's scales is
            for a benchmark to show, not assumed.
        clip: element-wise bound ``c`` (> 0) of the outer momentum, or None for no clipping.
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

    supports_fault_tolerance = False

    @override
    def fault_tolerance_unsupported(self) -> str | None:
        return (
            "its all-reduce overlaps the next round's local steps, so a failure would surface after the "
            "round's quorum and vote; not wired to torchft yet (use DiLoCoStrategy)"
        )

    def __init__(
        self,
        sync_every: int | SyncSchedule = 48,
        *,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.5,
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
        # validates the outer arguments now, with their names
        CO2OuterOptimizer([torch.zeros(1)], outer_lr, outer_momentum, gap_penalty, clip)
        super().__init__(
            sync_every,
            outer_optimizer=CO2OuterOptimizer,
            outer_kwargs={
                "lr": outer_lr,
                "momentum": outer_momentum,
                "gap_penalty": gap_penalty,
                "clip": clip,
            },
            **kwargs,
        )
        self.outer_lr, self.outer_momentum, self.gap_penalty, self.clip = (
            outer_lr,
            outer_momentum,
            gap_penalty,
            clip,
        )

    @override
    def sync(self) -> dict[str, float]:
        """Launch this round's all-reduce, then apply the previous round's (one round stale)."""
        previous = self.in_flight
        self.in_flight = self.launch_round(None, self.replica_step + (self.sync_every or 0))
        if previous is None:  # first round: nothing to apply yet; restart from the outer weights
            self._restart_from_global()
            return {"stale_applied": 0.0}
        # whether a replica was finite *then* is already in the reduced counts; a reset now
        # depends only on the replica's weights now
        previous.local_finite = True
        return {**self.apply_round(previous), "stale_applied": 1.0}

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
        pending, self.in_flight = self.in_flight, None
        # the partial round's pseudo-gradient, against the outer weights it started from
        partial = self.launch_round(None, self.replica_step) if self.steps_since_sync > 0 else None
        if pending is not None:
            pending.local_finite = True
            self.apply_round(pending)
        if partial is not None:
            self.apply_round(partial)
        self.at_global = True

    @override
    def local_is_consensus(self) -> bool:
        return False if self.in_flight is not None else super().local_is_consensus()
