"""Baselines written with PyTorch's own building blocks, for comparison with ``lightning_fedopt``.

:class:`TorchPeriodicAveragingStrategy` is periodic model averaging exactly as PyTorch ships it
(:class:`torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager`), wired
into Lightning as a strategy: the reference point for :class:`lightning_fedopt.LocalSGDStrategy`.

PyTorch calls :mod:`torch.distributed` itself, so the bytes cannot be counted through
:mod:`lightning_fedopt.comm`. Instead :attr:`TorchPeriodicAveragingStrategy.comm_stats` holds the
numbers the documented cost model (:func:`lightning_fedopt.comm.cost_model`) gives for the
transfers the averager makes (``bytes_source == "cost model"``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from typing_extensions import override

from lightning_fedopt._validate import check_int
from lightning_fedopt.comm import CommStats, Communicator, tensors_nbytes

__all__ = ["TorchPeriodicAveragingStrategy"]


class TorchPeriodicAveragingStrategy(DDPStrategy):
    """PyTorch's ``PeriodicModelAverager`` as a Lightning strategy (no ``DistributedDataParallel``).

    Every process trains its own replica (no gradient all-reduce). After every optimizer step the
    strategy calls ``PeriodicModelAverager(period, warmup_steps).average_parameters(params)``,
    which all-reduces the parameters (those with a gradient) when the averager's own step counter
    ``c`` (0 at the first call) satisfies ``c >= warmup_steps and (c - warmup_steps) % period == 0``.
    With ``warmup_steps=0`` the averages therefore follow optimizer steps 1, 1 + H, 1 + 2H, ...

    Note the different meaning of the warm-up: in PyTorch's post-local SGD the warm-up steps are
    covered by DDP's gradient all-reduce (``post_localSGD_hook``); here there is no DDP wrapper,
    so during the warm-up the replicas do not communicate at all. Buffers are not averaged, the
    module is evaluated on each rank's own replica, and there is no final average at the end of
    ``fit`` -- all as with the plain PyTorch recipe.

    Args:
        period: ``H``, optimizer steps between averages (>= 1).
        warmup_steps: averager calls to skip before the first average (>= 0).
        **kwargs: arguments of Lightning's ``DDPStrategy`` (the DDP comm-hook and model-averaging
            arguments excepted).

    Example:
        >>> import lightning as L
        >>> strategy = TorchPeriodicAveragingStrategy(period=8)
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy)
    """

    strategy_name = "torch_periodic_averaging"
    #: where the numbers in :attr:`comm_stats` come from
    bytes_source = "cost model"

    def __init__(self, period: int = 8, warmup_steps: int = 0, **kwargs: Any) -> None:
        for name in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period"):
            if name in kwargs:
                raise ValueError(f"TorchPeriodicAveragingStrategy: argument `{name}` is not supported")
        period = check_int("period", period, low=1)
        warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        super().__init__(**kwargs)
        self.period = period
        self.warmup_steps = warmup_steps
        self.averager: PeriodicModelAverager | None = None
        self.comm = Communicator()  # only accounts: torch makes these transfers itself
        self._averages = 0

    @property
    def comm_stats(self) -> CommStats:
        """Cost-model bytes of this rank: ``"setup"`` (initial broadcast) and ``"sync"`` (the averages)."""
        return self.comm.stats

    @property
    def sync_count(self) -> int:
        """Averages done so far."""
        return self._averages

    @override
    def configure_ddp(self) -> None:
        """No DDP wrapper: broadcast rank 0's module state, then start a fresh averager."""
        module = self.model
        assert module is not None
        self.comm.stats.reset()
        self._averages = 0
        t0 = time.perf_counter()
        _sync_module_states(module)
        nbytes = tensors_nbytes([*module.parameters(), *module.buffers()])
        seconds = time.perf_counter() - t0
        self.comm.account(
            "broadcast", nbytes, purpose="setup", is_source=self.global_rank == 0, seconds=seconds
        )
        self.averager = PeriodicModelAverager(period=self.period, warmup_steps=self.warmup_steps)

    def _averages_now(self) -> bool:
        a = self.averager
        return a is not None and a.step >= a.warmup_steps and (a.step - a.warmup_steps) % a.period == 0

    @override
    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.averager is None:
            return out
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        averaging = self._averages_now() and bool(params)
        t0 = time.perf_counter()
        self.averager.average_parameters(iter(params))
        if averaging:
            # the averager flattens the parameters into one buffer of their common dtype
            dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
            nbytes = sum(p.numel() for p in params) * torch.empty((), dtype=dtype).element_size()
            self.comm.account("all_reduce", nbytes, purpose="sync", seconds=time.perf_counter() - t0)
            self._averages += 1
        return out

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Registers nothing: the baseline is constructed explicitly, never by name."""
