"""MuLoCo: DiLoCo with Muon as the inner optimizer and an error-feedback, 2-bit pseudo-gradient.

Thérien, Huang, Rish & Belilovsky, "MuLoCo: Muon is a practical inner optimizer for DiLoCo"
(arXiv 2505.23725; v2 with Defazio adds the scaling study). One outer round, every ``H`` inner
steps, for every replica ``r`` (``phi``: the outer weights)::

    theta_r <- H steps of Muon (hidden matrices) / AdamW (the rest), from phi
    Delta_r  = phi - theta_r                 pseudo-gradient
    e_r     <- beta * e_r + Delta_r          error feedback (the replica's accumulator)
    m_r      = Q(e_r)                        every value coded to 2 bits (statistical levels)
    e_r     <- e_r - m_r                     the quantization error stays
    phi     <- NesterovSGD(phi, mean_r m_r)  the outer step; every replica restarts from phi

The inner optimizer is the module's own (``configure_optimizers``): return
:class:`~lightning_fedopt.optim.MuonAdamW` there. The strategy checks it when the optimizers are
set up and logs a warning (once, rank 0) when it is not Muon-based: the run is then DiLoCo with
a compressed pseudo-gradient, not MuLoCo. The middle three lines are the
:class:`~lightning_fedopt.compression.statquant.StatQuant` compressor (``"gather"`` scheme: every
replica's message is decoded by everyone, no second quantization); floating-point buffers
(BatchNorm statistics) travel exact, in an uncompressed all-reduce of their own, as in
:class:`~lightning_fedopt.strategies.diloco.sparseloco.SparseLoCoStrategy` (quantized to 2 bits
through an accumulator meant for pseudo-gradients they would be corrupted).

Defaults and their sources (docs/_pending_muloco.md has the details):

* ``sync_every=30``: the paper's compression runs (v1, Figure 1: "K = 8 workers and H = 30 local
  steps") and the authors' code (bentherien/muloco-1: ``sync_interval=30``, "H=30 used in all
  experiments");
* ``compressor=StatQuant(bits=2, beta=1.0, range_sigmas=6.0)``: "MuLoCo (Muon inner optimizer)
  with 2-bit quantization and error feedback outperforms standard AdamW-DiLoCo with 8x less
  communication" (v1, Figure 1); "2-bit statistical quantization works well; 2-bit linear
  quantization degrades" (the authors' ``muloco-1.md``); ``beta=1``: the classic accumulator
  (Karimireddy et al. 2019, the paper's reference for error feedback) -- the decay the paper used
  could not be read here; ``range_sigmas=6``: the same group's SparseLoCo quantizer;
* outer Nesterov SGD ``lr=0.7``, ``momentum=0.6``: the authors' code (``outer_lr=0.7``,
  ``outer_momentum=0.6``: "Outer LR 0.7, constant across scales"; "MuLoCo K=1 uses lower outer
  momentum (0.6) than DiLoCo K=1 (0.8)"). These were tuned for one worker (K=1); the values of the
  paper's K=8 compression runs could not be read from the sources available here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from typing_extensions import override

from lightning_fedopt.compression.statquant import StatQuant
from lightning_fedopt.optim import is_muon_based
from lightning_fedopt.runtime.reduce import PendingSum, masked_sum
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.diloco.diloco import DiLoCoStrategy
from lightning_fedopt.strategies.diloco.fragments import InFlight, pseudo_gradients, refuse_streaming
from lightning_fedopt.strategies.diloco.outer import check_outer_kwargs, resolve_compressor

__all__ = ["MULOCO_COMPRESSOR", "MULOCO_OUTER", "MULOCO_SYNC_EVERY", "MuLoCoStrategy"]

log = logging.getLogger("lightning_fedopt")

#: ``H`` when none is given (module doc)
MULOCO_SYNC_EVERY = 30
#: the compressor's arguments when none is given: 2-bit statistical levels, plain error feedback
MULOCO_COMPRESSOR: dict[str, Any] = {"bits": 2, "beta": 1.0, "range_sigmas": 6.0}
#: the outer optimizer's arguments when none are given (the authors' code)
MULOCO_OUTER: dict[str, Any] = {"lr": 0.7, "momentum": 0.6, "nesterov": True}
#: ``compressor=`` default: a new :class:`StatQuant` with :data:`MULOCO_COMPRESSOR` per strategy
_DEFAULT = "muloco"


class MuLoCoStrategy(DiLoCoStrategy):
    """MuLoCo (the registered name ``"muloco"``): DiLoCo whose replicas train with Muon inside
    (the module returns :class:`~lightning_fedopt.optim.MuonAdamW`) and whose pseudo-gradients
    travel 2-bit quantized with error feedback; outer Nesterov SGD.

    Args:
        sync_every: ``H`` (>= 1) inner steps per round, or a
            :class:`~lightning_fedopt.schedules.SyncSchedule`; default 30, the paper's.
        compressor: default: a new ``StatQuant(bits=2, beta=1.0, range_sigmas=6.0)`` for this
            strategy (its error-feedback buffers are this replica's: do not share one instance
            between strategies); any :class:`~lightning_fedopt.compression.Compressor` or its name
            (``"int4"``; ``"statquant"``: :class:`StatQuant` with its own defaults), or None for
            full-precision pseudo-gradients (then the strategy is DiLoCo with Muon inside).
        outer_optimizer: as for :class:`~lightning_fedopt.strategies.diloco.DiLoCoStrategy`;
            default ``torch.optim.SGD``.
        outer_kwargs: its keyword arguments; with the default optimizer they update
            ``{"lr": 0.7, "momentum": 0.6, "nesterov": True}``.
        fragments, fragment_layout, sync_delay, mixing: DiLoCo's streaming arguments, accepted at
            their defaults only (1, ``"auto"``, 0, 0.0): every tensor is synchronised every ``H``
            steps (the compressed all-reduce is synchronous anyway).
        **kwargs: :class:`~lightning_fedopt.strategies.diloco.DiLoCoStrategy` and
            :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy` arguments
            (``offload_global``, ``group_size``, ``round_seconds``, ``bn_recalibration``, ...).

    The compressor's byte counts (:attr:`compression_ratio`) cover the parameters; buffers travel
    exact. A compressor without error feedback (e.g. ``"int4"``, whose feedback is off by default)
    is accepted with a warning: the paper's 2-bit result needs the accumulator.

    Raises:
        ValueError: for the streaming arguments ``fragments``, ``fragment_layout``,
            ``sync_delay``, ``mixing`` other than their defaults (1, ``"auto"``, 0, 0.0;
            ``DiLoCoStrategy(compressor=StatQuant(), fragments=...)`` is the streaming variant), and
            for any argument out of its range.

    Example:
        >>> from lightning_fedopt.strategies.diloco.muloco import MuLoCoStrategy
        >>> s = MuLoCoStrategy()
        >>> s.sync_every, s.compressor
        (30, StatQuant(bits=2, beta=1.0, range_sigmas=6.0, error_feedback=True))
        >>> s.outer_factory([torch.zeros(1)]).defaults["momentum"]
        0.6
    """

    strategy_name = "muloco"

    def __init__(
        self,
        sync_every: int | SyncSchedule = MULOCO_SYNC_EVERY,
        *,
        compressor: Any = _DEFAULT,
        outer_optimizer: Any = None,
        outer_kwargs: dict[str, Any] | None = None,
        fragments: int = 1,
        fragment_layout: str = "auto",
        sync_delay: int = 0,
        mixing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        refuse_streaming(
            "MuLoCoStrategy",
            "DiLoCoStrategy(compressor=StatQuant(...), fragments=...)",
            {
                "fragments": fragments,
                "fragment_layout": fragment_layout,
                "sync_delay": sync_delay,
                "mixing": mixing,
            },
        )
        if isinstance(compressor, str) and compressor in (_DEFAULT, StatQuant.name):
            # a fresh one: its buffers are this replica's
            compressor = StatQuant(**MULOCO_COMPRESSOR) if compressor == _DEFAULT else StatQuant()
        compressor = resolve_compressor(compressor)
        outer_kwargs = check_outer_kwargs(outer_kwargs)
        if outer_optimizer is None:
            outer_optimizer = torch.optim.SGD
            outer_kwargs = {**MULOCO_OUTER, **outer_kwargs}
        super().__init__(
            sync_every,
            outer_optimizer=outer_optimizer,
            outer_kwargs=outer_kwargs,
            compressor=compressor,
            fragments=fragments,
            fragment_layout=fragment_layout,
            sync_delay=sync_delay,
            mixing=mixing,
            **kwargs,
        )
        if compressor is not None and getattr(compressor, "error_feedback", True) is False:
            log.warning(
                "lightning_fedopt: MuLoCoStrategy with %r: a compressor without error feedback; the "
                "paper's 2-bit result relies on the error-feedback accumulator",
                compressor,
            )
        self._params_at: list[int] = []
        self._buffers_at: list[int] = []
        self._inner_checked = False

    # ---------------------------------------------------------------- the inner optimizer
    def check_inner_optimizers(self, optimizers: list[Any]) -> bool:
        """Whether one of ``optimizers`` is Muon-based
        (:func:`~lightning_fedopt.optim.is_muon_based`); if none is, a warning is logged (the first
        time only, on rank 0): the run is DiLoCo with a compressed pseudo-gradient, not MuLoCo."""
        muon = any(is_muon_based(opt) for opt in optimizers)
        if not muon and not self._inner_checked and self.global_rank == 0:
            kinds = ", ".join(type(opt).__name__ for opt in optimizers) or "none"
            log.warning(
                "lightning_fedopt: MuLoCoStrategy: the module's optimizer is not Muon-based (%s); this "
                "trains as DiLoCo with a compressed pseudo-gradient. Return "
                "lightning_fedopt.optim.MuonAdamW(self, ...) from configure_optimizers for MuLoCo",
                kinds,
            )
        self._inner_checked = True
        return muon

    @override
    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        self.check_inner_optimizers(list(self.optimizers))

    # ---------------------------------------------------------------- the round
    @override
    def setup_algorithm(self) -> None:
        super().setup_algorithm()
        mask = self.param_mask
        self._params_at = [i for i, is_param in enumerate(mask) if is_param]
        self._buffers_at = [i for i, is_param in enumerate(mask) if not is_param]

    @override
    def launch_round(self, fragment: int | None, apply_step: int) -> InFlight:
        """The parameters' pseudo-gradients through the compressor and the floating-point buffers
        exact, in an uncompressed all-reduce of their own (both synchronous)."""
        if self.compressor is None or not self._buffers_at or not self._params_at or fragment is not None:
            return super().launch_round(fragment, apply_step)
        tensors = self.tracked_tensors()
        n = len(tensors)
        # heterogeneous local work: a pseudo-gradient is divided by the steps that made it (as DiLoCo)
        k = self.round_effective_steps if self.round_seconds is not None else 1
        contribution, valid, finite = pseudo_gradients(tensors, self.outer_weights, self.param_mask, k)
        names = self.tracked.names
        sums: list[Any] = [None] * n
        pending: PendingSum | None = None
        for at, compressor in ((self._params_at, self.compressor), (self._buffers_at, None)):
            pending = masked_sum(
                self.outer_comm,
                [tensors[i] for i in at],
                weight=float(k),
                purpose="sync",
                contribution=([contribution[i] for i in at], valid, finite),
                compressor=compressor,
                names=[names[i] for i in at] if compressor is not None else None,
            )  # synchronous: complete on return
            for i, s in zip(at, pending.sums):
                sums[i] = s
        assert pending is not None
        # both calls carried the same counters; the round is complete (synchronous)
        done = PendingSum(sums, pending.scalars, None, 0)
        return InFlight(None, list(range(n)), apply_step, done, local_finite=finite)
