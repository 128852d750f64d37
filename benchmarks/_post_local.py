"""PyTorch's post-local SGD as a Lightning strategy: ``post_localSGD_hook`` + ``PeriodicModelAverager``.

PyTorch's recipe (``torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook``): DDP
all-reduces the gradients for the first ``warmup_steps`` iterations (``PostLocalSGDState``'s
``start_localSGD_iter``), then stops (``post_local_gradient_allreduce=False``: no intra-node
subgroup on a CPU host), and a ``PeriodicModelAverager(period, warmup_steps)`` all-reduces the
parameters after every ``period``-th optimizer step from then on. Lightning's ``DDPStrategy``
wires this only on CUDA; this subclass of :class:`lightning_fedopt.MeteredDDPStrategy` registers
the hook on CPU/gloo too. Torch makes the transfers itself, so the bytes are the cost model's
(``bytes_source == "cost model"``), as for :mod:`benchmarks.baselines`.
"""

# no ``from __future__ import annotations``: DDP checks the comm hook's annotations at registration

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed import GradBucket
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
    PostLocalSGDState,
    post_localSGD_hook,
)
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from typing_extensions import override

import lightning_fedopt as lf
from lightning_fedopt._validate import check_int
from lightning_fedopt.comm import Communicator

__all__ = ["TorchPostLocalSGDStrategy", "counted_post_local_sgd_hook"]


def counted_post_local_sgd_hook(
    state: tuple[PostLocalSGDState, Communicator], bucket: GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """PyTorch's ``post_localSGD_hook``, the gradient all-reduces of its warm-up counted by the cost model."""
    ps_state, comm = state
    if ps_state.iter < ps_state.start_localSGD_iter:
        comm.account("all_reduce", bucket.buffer().numel() * bucket.buffer().element_size(), purpose="sync")
    return post_localSGD_hook(ps_state, bucket)


class TorchPostLocalSGDStrategy(lf.MeteredDDPStrategy):
    """DDP for ``warmup_steps`` optimizer steps, then PyTorch's periodic model averaging every ``period``.

    Args:
        period: optimizer steps between parameter averages after the warm-up (>= 1).
        warmup_steps: optimizer steps with DDP's gradient all-reduce (>= 0).
        **kwargs: :class:`lightning_fedopt.MeteredDDPStrategy`'s arguments.

    ``sync_count`` counts the steps with a gradient all-reduce plus the averages. Buffers are not
    averaged and validation runs on each rank's own replica (the plain PyTorch recipe).
    """

    bytes_source = "cost model"

    def __init__(self, period: int = 16, warmup_steps: int = 0, **kwargs: Any) -> None:
        period = check_int("period", period, low=1)
        warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        super().__init__(**kwargs)
        self.period = period
        self.warmup_steps = warmup_steps
        self.averager: PeriodicModelAverager | None = None
        self._state: PostLocalSGDState | None = None
        self._syncs = 0

    @property
    def sync_count(self) -> int:
        """Optimizer steps with a gradient all-reduce, plus parameter averages, so far."""
        return self._syncs

    @override
    def _register_ddp_hooks(self) -> None:
        self._syncs = 0
        self._state = PostLocalSGDState(
            process_group=None,
            subgroup=None,
            start_localSGD_iter=self.warmup_steps,
            post_local_gradient_allreduce=False,
        )
        self.model.register_comm_hook((self._state, self.comm), counted_post_local_sgd_hook)  # type: ignore[union-attr]
        self.averager = PeriodicModelAverager(period=self.period, warmup_steps=self.warmup_steps)

    @override
    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        before = self._state.iter if self._state is not None else 0
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._state is not None and self._state.iter != before:
            self._syncs += 1  # the hook all-reduced this step's gradients
        a = self.averager
        if a is None:
            return out
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        averaging = bool(params) and a.step >= a.warmup_steps and (a.step - a.warmup_steps) % a.period == 0
        t0 = time.perf_counter()
        a.average_parameters(iter(params))
        if averaging:
            dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
            nbytes = sum(p.numel() for p in params) * torch.empty((), dtype=dtype).element_size()
            self.comm.account("all_reduce", nbytes, purpose="sync", seconds=time.perf_counter() - t0)
            self._syncs += 1
        return out
