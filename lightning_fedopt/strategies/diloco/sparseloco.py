"""SparseLoCo: DiLoCo whose outer momentum is a per-replica error-feedback buffer, through which the
pseudo-gradient travels as a chunked top-k with 2-bit values.

Sarfi, Thérien, Lidin & Belilovsky, "Communication Efficient LLM Pre-training with SparseLoCo"
(arXiv 2508.15706). One outer round, every ``H`` inner steps, for every replica ``r``
(``phi``: the outer weights)::

    Delta_r = phi - theta_r                 pseudo-gradient after H inner steps
    e_r    <- beta * e_r + Delta_r          error feedback (the replica's own "outer momentum")
    m_r     = Q(TopK(e_r))                  top-k of every chunk, values quantized to 2 bits
    e_r    <- e_r - m_r                     what was sent leaves the buffer, the rest stays
    phi    <- phi - lr * mean_r m_r         outer SGD without momentum

The three middle lines are the :class:`~lightning_fedopt.compression.SparseLoCo` compressor (its
docstring lists where it differs from the authors' code); this strategy is
:class:`~lightning_fedopt.strategies.diloco.DiLoCoStrategy` with that compressor and the authors'
outer step, plus one thing DiLoCo does not do: floating-point **buffers** (BatchNorm running
statistics) travel exact, uncompressed, in an all-reduce of their own, and are averaged as DiLoCo
averages them. Sent through the compressor as values, a buffer would be top-k'd, quantized to 2
bits and accumulated in an error-feedback buffer meant for pseudo-gradients, i.e. corrupted (the
authors' outer optimizer covers ``model.parameters()`` only, so their buffers never travel).

Defaults and their sources (docs/algorithms.md has the details; the authors' repository,
tplr-ai/SparseLoCo, could not be fetched here: read were its predecessor tplr-ai/CCLoco by the
same group and a public port of SparseLoCo to exogym, gist KMFODA/0a5b19e7):

* ``compressor=SparseLoCo(topk=128, chunk=4096, beta=0.95, bits=2)``: the port's ``top_k=128``,
  ``chunk_size=64`` (64 x 64 = 4096-value tiles, 3.125% density), ``quantization_bins=4`` (2 bits),
  ``quantization_range=6``; ``error_decay`` 0.95 (CCLoco ``train.py`` ``--error_decay`` default);
* outer SGD with ``lr=1.0``, ``momentum=0``, no Nesterov (the port's ``lr=1``; CCLoco's
  ``--outer_momentum`` defaults to 0.0 and ``--outer_nesterov`` is off);
* ``sync_every=15`` (CCLoco's sweeps ``inner_steps: 15``, the port's ``H=15``).
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

from lightning_fedopt.compression.sparseloco import SparseLoCo
from lightning_fedopt.runtime.reduce import PendingSum, masked_sum
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.diloco.diloco import DiLoCoStrategy
from lightning_fedopt.strategies.diloco.fragments import (
    WHOLE_MODEL,
    InFlight,
    pseudo_gradients,
    refuse_streaming,
)
from lightning_fedopt.strategies.diloco.outer import check_outer_kwargs, resolve_compressor

__all__ = ["SPARSELOCO_DEFAULTS", "SparseLoCoStrategy"]

#: the compressor's arguments when none is given (the authors' run, module doc)
SPARSELOCO_DEFAULTS: dict[str, Any] = {"topk": 128, "chunk": 4096, "beta": 0.95, "bits": 2}
#: the outer optimizer's arguments when none are given: plain SGD, the buffer is the momentum
_OUTER_DEFAULTS: dict[str, Any] = {"lr": 1.0, "momentum": 0.0, "nesterov": False}


class SparseLoCoStrategy(DiLoCoStrategy):
    """SparseLoCo: DiLoCo with an error-feedback, chunked top-k, 2-bit pseudo-gradient and a plain
    SGD outer step (the registered name ``"sparseloco"``).

    Args:
        sync_every: ``H`` (>= 1) inner steps per round, or a
            :class:`~lightning_fedopt.schedules.SyncSchedule`; default 15, the authors'.
        compressor: a :class:`~lightning_fedopt.compression.SparseLoCo` (or the name
            ``"sparseloco"``); default: a new ``SparseLoCo(topk=128, chunk=4096, beta=0.95,
            bits=2)`` for this strategy (its error-feedback buffers are this replica's; do not share
            one instance between strategies).
        outer_optimizer: as for :class:`~lightning_fedopt.strategies.diloco.DiLoCoStrategy`;
            default ``torch.optim.SGD``.
        outer_kwargs: its keyword arguments; with the default optimizer they update
            ``{"lr": 1.0, "momentum": 0.0, "nesterov": False}`` (e.g. ``{"lr": 0.7}``).
        **kwargs: :class:`~lightning_fedopt.strategies.diloco.DiLoCoStrategy` and
            :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy` arguments
            (``offload_global``, ``group_size``, ``round_seconds``, ``bn_recalibration``, ...).

    Floating-point buffers (BatchNorm running statistics) travel exact and uncompressed, in one
    all-reduce of their own per round, and are averaged; the compressor's byte counts
    (:attr:`compression_ratio`) cover the parameters.

    Raises:
        ValueError: for ``compressor=`` other than a SparseLoCo compressor, and for the streaming
            arguments ``fragments``, ``fragment_layout``, ``sync_delay``, ``mixing`` (every tensor
            is synchronised every ``H`` steps, as in the paper; the compressed all-reduce is
            synchronous anyway).

    Example:
        >>> import lightning as L
        >>> import lightning_fedopt as lf
        >>> strategy = lf.SparseLoCoStrategy()
        >>> (strategy.sync_every, strategy.compressor.topk, strategy.compressor.chunk, strategy.compressor.bits)
        (15, 128, 4096, 2)
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy)
    """

    strategy_name = "sparseloco"

    def __init__(
        self,
        sync_every: int | SyncSchedule = 15,
        *,
        compressor: Any = None,
        outer_optimizer: Any = None,
        outer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # the authors synchronise every tensor every H steps: the streaming arguments at their defaults
        refuse_streaming(
            "SparseLoCoStrategy",
            "DiLoCoStrategy(compressor=SparseLoCo(...), fragments=...)",
            {name: kwargs.pop(name) for name in WHOLE_MODEL if name in kwargs},
        )
        if compressor is None:
            compressor = SparseLoCo(**SPARSELOCO_DEFAULTS)  # a fresh one: its buffers are this replica's
        compressor = resolve_compressor(compressor)
        if not isinstance(compressor, SparseLoCo):
            raise ValueError(
                f"`compressor` of SparseLoCoStrategy must be a lightning_fedopt.compression.SparseLoCo "
                f"(or 'sparseloco'), got {compressor!r}; DiLoCoStrategy takes any compressor"
            )
        outer_kwargs = check_outer_kwargs(outer_kwargs)
        if outer_optimizer is None:
            outer_optimizer = torch.optim.SGD
            outer_kwargs = {**_OUTER_DEFAULTS, **outer_kwargs}
        super().__init__(
            sync_every,
            outer_optimizer=outer_optimizer,
            outer_kwargs=outer_kwargs,
            compressor=compressor,
            **kwargs,
        )
        self._buffer_idx: list[int] = []
        self._param_idx: list[int] = []

    @override
    def setup_algorithm(self) -> None:
        super().setup_algorithm()
        module = self.lightning_module
        assert module is not None
        params = {name for name, _ in module.named_parameters()}
        named = self.tracked_named_tensors()
        self._param_idx = [i for i, (name, _) in enumerate(named) if name in params]
        self._buffer_idx = [i for i, (name, _) in enumerate(named) if name not in params]

    @override
    def launch_round(self, fragment: int | None, apply_step: int) -> InFlight:
        """The round's pseudo-gradients through the compressor, and the floating-point buffers
        exact, in an uncompressed all-reduce of their own (both synchronous); one round in flight."""
        if not self._buffer_idx or not self._param_idx or fragment is not None:
            return super().launch_round(fragment, apply_step)
        tensors = self.tracked_tensors()
        n = len(tensors)
        is_param = [False] * n
        for i in self._param_idx:
            is_param[i] = True
        # heterogeneous local work: a pseudo-gradient is divided by the steps that made it (as DiLoCo)
        k = self.round_effective_steps if self.round_seconds is not None else 1
        contribution, valid, finite = pseudo_gradients(tensors, self.outer_weights, is_param, k)
        names = self.tracked.names
        compressed = masked_sum(
            self.outer_comm,
            [tensors[i] for i in self._param_idx],
            weight=float(k),
            purpose="sync",
            contribution=([contribution[i] for i in self._param_idx], valid, finite),
            compressor=self.compressor,
            names=[names[i] for i in self._param_idx],
        )
        exact = masked_sum(
            self.outer_comm,
            [tensors[i] for i in self._buffer_idx],
            weight=float(k),
            purpose="sync",
            contribution=([contribution[i] for i in self._buffer_idx], valid, finite),
        )
        sums: list[Any] = [None] * n
        for i, s in zip(self._param_idx, compressed.sums):
            sums[i] = s
        for i, s in zip(self._buffer_idx, exact.sums):
            sums[i] = s
        # both calls carried the same counters; the round is complete (synchronous)
        pending = PendingSum(sums, compressed.scalars, None, 0)
        return InFlight(None, list(range(n)), apply_step, pending, local_finite=finite)
