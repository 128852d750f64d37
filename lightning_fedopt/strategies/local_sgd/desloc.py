"""DES-LOC: local Adam(W) whose parameters, first moment and second moment are each averaged
across the replicas on a period of their own.

Iacob, Sani, Safaryan, Giampouras, Horváth, Jovanović, Kurmanji, Aleksandrov, Shen, Qiu & Lane,
"DES-LOC: Desynced Low Communication Adaptive Optimizers for Training Foundation Models",
arXiv 2505.22549 (2025; ICLR 2026). Every replica ``m`` runs its own Adam(W) on its own batches;
at step ``t`` (the count of optimizer steps taken) a state is replaced by its mean over the
``M`` replicas when ``t`` is a multiple of that state's period::

    theta_m <- mean_m theta_m     when t % K_x == 0     (the parameters)
    u_m     <- mean_m u_m         when t % K_u == 0     (Adam's first moment, ``exp_avg``)
    v_m     <- mean_m v_m         when t % K_v == 0     (Adam's second moment, ``exp_avg_sq``)

and the next local step continues from the result (``u_t = beta1 u + (1 - beta1) g``,
``v_t = beta2 v + (1 - beta2) g^2``, ``theta <- theta - lr u_hat / (sqrt(v_hat) + eps)``, with
AdamW's decoupled weight decay). Plain means, no outer optimizer, no phase offsets: a step that is
a multiple of several periods averages all of them, in one all-reduce here. At ``t = 0`` the
paper's rule averages states that are equal anyway (the replicas start from rank 0's weights and
Adam's moments start at zero), so nothing is sent before the first period ends. Adam's step count
(its bias correction) is the same on every replica and is not sent. ``K_u = 3 K_x`` and
``K_v = 6 K_x`` are the paper's recommended ratios; it motivates longer periods for the states
that change more slowly, by their half-life ``ln(0.5) / ln(beta)`` steps.

What was checked (docs/algorithms.md, section "DES-LOC", has the whole list): the update rule as
written out from the paper's Algorithm 1 in a public summary (junaidaliop.github.io/zij, "DES-LOC")
and the arXiv abstract; the authors' own implementation (Iacob-Alexandru-Andrei/torchtitan,
``torchtitan/experiments/fl/desloc.py``, and the ``DesLoc`` class of their torchft fork with its
test): after every optimizer step each fragment (parameters, then each tensor state of the
optimizer) counts one step; one whose count reaches its period is all-reduced to its mean, and its
count restarts; with no outer optimizer configured (their default) the parameters take the mean.

Where this class differs (and why):

* ``K_u`` and ``K_v`` are whole multiples of ``K_x``: ``moment_periods=(a, b)`` averages
  ``exp_avg`` at every ``a``-th and ``exp_avg_sq`` at every ``b``-th parameter average, i.e.
  ``K_u = a K_x``, ``K_v = b K_x`` with ``sync_every=K_x``. Then every message travels at a
  synchronisation point of the schedule (where the ranks already meet and prove they are at the
  same step), and ``sync_every`` may be any schedule (warm-up, ``"auto"``, ...). The paper's
  recommended ``(3, 6)`` is expressible; a ``K_v`` that is not a multiple of ``K_x`` (its toy
  problem's ``K_x = 192, K_v = 692``) is not.
* The synchronisation at the end of ``fit`` averages the parameters only (Local SGD's final
  synchronisation); the moments stay each replica's.
* A replica whose parameters or optimizer state hold NaN/Inf contributes nothing to the round
  (parameters and moments alike) and takes the others' mean; if its optimizer state is still not
  finite afterwards (a moment not due this round), its optimizer state is cleared (the library's
  rule). The paper assumes finite updates.
* A parameter that has no Adam state on some replica (it never received a gradient there) is
  averaged over the replicas that have the state (one presence count per tensor rides in the
  round's message), and gets no state where it had none.
* The paper's analysis clips each gradient at a radius ``rho``; that is the Trainer's
  ``gradient_clip_val`` here, not part of the strategy.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_int
from lightning_fedopt.runtime.optimizer_state import optimizer_state_tensors
from lightning_fedopt.runtime.reduce import NoFiniteReplicaError, all_finite, masked_contribution, masked_sum
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.local_sgd.local_sgd import LocalSGDStrategy

__all__ = [
    "ADAM_LIKE",
    "DESLOC_MOMENTS",
    "DESLOCStrategy",
    "adam_moment_slots",
    "check_adam_optimizers",
    "check_moment_periods",
    "moments_due",
]

#: the optimizer states that ``moment_periods`` schedules, in its order: Adam's first and second moments
DESLOC_MOMENTS: tuple[str, str] = ("exp_avg", "exp_avg_sq")
#: the ``torch.optim`` optimizers (and their subclasses) whose per-parameter state holds both
ADAM_LIKE: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
)
#: Local SGD arguments DES-LOC does not take, with the value that means "off"
_LOCAL_SGD_OFF: dict[str, Any] = {
    "weighting": "uniform",
    "participation": 1.0,
    "participation_seed": 0,
    "adaptive_weights": False,
    "server_lr": 1.0,
    "fedau_cutoff": None,
    "merge": "mean",
    "compressor": None,
    "selection": None,
    "average_optimizer_state": False,
}


def _is_off(value: Any, off: Any) -> bool:
    if off is None or isinstance(off, bool):
        return value is off
    if isinstance(off, str):
        return isinstance(value, str) and value == off
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == off


def _refuse_local_sgd_options(kwargs: dict[str, Any]) -> None:
    """``ValueError`` for a Local SGD argument given a value other than its "off" one.

    Kept out of ``DESLOCStrategy.__init__``: LightningCLI's signature resolver follows a ``**kwargs``
    that ``__init__`` only passes on (to Local SGD's and the base's arguments); one that ``__init__``
    reads itself makes it offer ``DDPStrategy``'s arguments as well, which the base refuses."""
    for name, off in _LOCAL_SGD_OFF.items():
        if name in kwargs and not _is_off(kwargs[name], off):
            raise ValueError(
                f"DESLOCStrategy does not take `{name}` (got {kwargs[name]!r}): DES-LOC averages every "
                "replica's parameters and Adam moments with equal weights (LocalSGDStrategy has it)"
            )


def check_moment_periods(value: Any) -> tuple[int, int]:
    """``value`` as ``(a, b)``, two integers >= 1; ``ValueError`` naming ``moment_periods`` otherwise.

    Example:
        >>> check_moment_periods((3, 6))
        (3, 6)
        >>> check_moment_periods((0, 6))
        Traceback (most recent call last):
        ...
        ValueError: `moment_periods[0]` must be an integer >= 1, got 0
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(
            "`moment_periods` must be a pair (a, b) of integers >= 1: exp_avg is averaged at every a-th and "
            f"exp_avg_sq at every b-th parameter average (K_u = a K_x, K_v = b K_x), got {value!r}"
        )
    return check_int("moment_periods[0]", value[0], low=1), check_int("moment_periods[1]", value[1], low=1)


def moments_due(round_index: int, moment_periods: tuple[int, int]) -> tuple[str, ...]:
    """The Adam states averaged at parameter average number ``round_index`` (1-based): those
    whose period in :data:`DESLOC_MOMENTS` order divides it.

    Example:
        >>> [moments_due(r, (3, 6)) for r in (1, 3, 6)]
        [(), ('exp_avg',), ('exp_avg', 'exp_avg_sq')]
    """
    return tuple(key for key, every in zip(DESLOC_MOMENTS, moment_periods) if round_index % every == 0)


def check_adam_optimizers(optimizers: Sequence[Any]) -> None:
    """Refuse optimizers without Adam's two moments in their per-parameter state.

    Raises:
        TypeError: no optimizer, or one that is not :data:`ADAM_LIKE` (e.g. SGD).
        ValueError: an ``amsgrad=True`` group (its ``max_exp_avg_sq`` would stay local).
    """
    if not optimizers:
        raise TypeError(
            "DESLOCStrategy averages the optimizer's exp_avg and exp_avg_sq: configure_optimizers returned no optimizer"
        )
    for opt in optimizers:
        if not isinstance(opt, ADAM_LIKE):
            names = ", ".join(c.__name__ for c in ADAM_LIKE)
            raise TypeError(
                "DESLOCStrategy averages Adam's moments (exp_avg, exp_avg_sq): the LightningModule's "
                f"optimizer must be one of torch.optim.{{{names}}} or a subclass, got {type(opt).__name__}"
            )
        if any(group.get("amsgrad", False) for group in opt.param_groups):
            raise ValueError(
                "DESLOCStrategy does not support `amsgrad=True`: it averages exp_avg_sq, while AMSGrad "
                "divides by the running maximum max_exp_avg_sq, which would stay each replica's"
            )


def adam_moment_slots(optimizers: Sequence[Any], key: str) -> list[tuple[Tensor, Tensor | None]]:
    """``(parameter, its state[key] or None)`` for every parameter that requires a gradient, in the
    optimizers' order (each parameter once): the same list on every replica."""
    seen: set[int] = set()
    out: list[tuple[Tensor, Tensor | None]] = []
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                value = opt.state.get(p, {}).get(key)
                out.append((p, value if isinstance(value, Tensor) else None))
    return out


class DESLOCStrategy(LocalSGDStrategy):
    """DES-LOC: local Adam(W); the parameters are averaged every ``K_x = sync_every`` steps, Adam's
    first moment every ``a``-th and its second moment every ``b``-th of those averages
    (``moment_periods=(a, b)``; the registered name ``"desloc"``).

    Args:
        sync_every: ``K_x`` (>= 1), optimizer steps between parameter averages, or a
            :class:`~lightning_fedopt.schedules.SyncSchedule`; default 8 (Local SGD's: the paper
            gives no single default).
        moment_periods: ``(a, b)``, integers >= 1: ``exp_avg`` is averaged at every ``a``-th and
            ``exp_avg_sq`` at every ``b``-th parameter average, so ``K_u = a K_x`` and
            ``K_v = b K_x``; default ``(3, 6)``, the paper's recommended ``K_u = 3 K_x``,
            ``K_v = 6 K_x``. ``(1, 1)`` is Local Adam (every state at every average).
        **kwargs: :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy` arguments
            (``warmup_steps``, ``group_size``, ``evaluate``, ``final_sync``, ``start_method``, ...).

    The LightningModule's optimizer must be Adam-like (:data:`ADAM_LIKE`: Adam, AdamW, NAdam,
    RAdam; several optimizers under manual optimization are fine); anything else is refused when
    the Trainer sets the strategy up. One round sends the parameters and floating-point buffers,
    the moments due, and ``3 + (number of moment tensors due)`` counters, in one all-reduce
    (purpose ``"sync"``, counted by :class:`~lightning_fedopt.callbacks.CommunicationMonitor`).

    Raises:
        ValueError: for ``moment_periods`` out of range, and for the Local SGD arguments this
            strategy does not take (``weighting``, ``participation``, ``participation_seed``,
            ``adaptive_weights``, ``server_lr``, ``fedau_cutoff``, ``merge``, ``compressor``,
            ``selection``, ``average_optimizer_state``: DES-LOC is a plain mean of every replica),
            ``round_seconds`` and ``fault_tolerance``.

    Example:
        >>> import lightning as L
        >>> from lightning_fedopt.strategies.local_sgd.desloc import DESLOCStrategy
        >>> strategy = DESLOCStrategy(sync_every=16, moment_periods=(3, 6))
        >>> strategy.moment_periods, [strategy.moments_due(r) for r in (1, 3, 6)]
        ((3, 6), [(), ('exp_avg',), ('exp_avg', 'exp_avg_sq')])
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    """

    strategy_name = "desloc"
    supports_round_seconds = False
    supports_fault_tolerance = False

    def __init__(
        self,
        sync_every: int | SyncSchedule = 8,
        *,
        moment_periods: tuple[int, int] = (3, 6),
        **kwargs: Any,
    ) -> None:
        _refuse_local_sgd_options(kwargs)
        periods = check_moment_periods(moment_periods)
        super().__init__(sync_every, **kwargs)
        self.moment_periods = periods
        self._param_rounds = 0

    @override
    def fault_tolerance_unsupported(self) -> str | None:
        return "its rounds also average the optimizer state, which a torchft round does not carry"

    # ---------------------------------------------------------------- set-up and state
    @override
    def setup_optimizers(self, trainer: Any) -> None:
        """Lightning's optimizers, then the check that they keep Adam's two moments."""
        super().setup_optimizers(trainer)
        check_adam_optimizers(self.optimizers)

    @override
    def setup_algorithm(self) -> None:
        super().setup_algorithm()
        self._param_rounds = 0

    @property
    def param_rounds(self) -> int:
        """Parameter averages done by :meth:`sync` in this fit (the moments' schedule counts them;
        the synchronisation at the end of ``fit`` is not one)."""
        return self._param_rounds

    def moments_due(self, round_index: int) -> tuple[str, ...]:
        """The Adam states averaged at parameter average number ``round_index`` (1-based)."""
        return moments_due(round_index, self.moment_periods)

    @override
    def algorithm_state_dict(self) -> dict[str, Any]:
        """Local SGD's state and the count of parameter averages (the same on every rank); the
        moments themselves are each replica's optimizer state, saved in its shard."""
        return {**super().algorithm_state_dict(), "desloc_rounds": self._param_rounds}

    @override
    def load_algorithm_state_dict(self, state: dict[str, Any]) -> None:
        super().load_algorithm_state_dict(state)
        self._param_rounds = int(state.get("desloc_rounds", 0))

    # ---------------------------------------------------------------- the round
    @override
    def sync(self) -> dict[str, float]:
        """One parameter average, with the moments due at this average, in one all-reduce."""
        round_index = self._param_rounds + 1
        due = self.moments_due(round_index)
        tensors = self.tracked_tensors()
        slots = [slot for key in due for slot in adam_moment_slots(self.optimizers, key)]
        moments = [t if t is not None else torch.zeros_like(p) for p, t in slots]
        present = [0.0 if t is None else 1.0 for _, t in slots]
        send = tensors + moments
        # a replica with any non-finite parameter or optimizer state (due this round or not) sits out
        finite = self.is_finite(tensors) and all_finite(optimizer_state_tensors(self.optimizers))
        contribution = (
            masked_contribution(send, 1.0) if finite else ([torch.zeros_like(t) for t in send], False, False)
        )
        s = masked_sum(self.outer_comm, send, extra=present, purpose="sync", contribution=contribution).wait()
        if s.valid == 0 or s.weight <= 0:
            raise NoFiniteReplicaError(self.replica_step)
        n = len(tensors)
        new = [total.div_(s.weight) for total in s.sums[:n]]  # the sums are the round's own buffers
        info: dict[str, float] = {
            "participants": float(self.outer_world_size),
            **{key: float(key in due) for key in DESLOC_MOMENTS},
        }
        if self.track_consensus_distance:
            info["consensus_distance"] = self.consensus_distance(tensors, new, finite)
        with torch.no_grad():
            for t, v in zip(tensors, new):
                t.copy_(v)
            for (_, state), total, count in zip(slots, s.sums[n:], s.extras):
                if state is not None and count > 0:  # the mean over the replicas that have the state
                    state.copy_(total.div_(count))
        if s.invalid or not finite:
            self.record_nonfinite(s.invalid, local=not finite)
        if not finite and not all_finite(optimizer_state_tensors(self.optimizers)):
            self.reset_optimizer_state()
        self._param_rounds = round_index
        info["excluded_nonfinite"] = float(s.invalid)
        info["valid_replicas"] = float(s.valid)
        return info
