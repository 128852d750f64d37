"""BatchNorm running statistics that belong to the consensus weights they are used with.

A replica's running statistics are estimated with *its own* weights. The consensus of an
outer-optimizer strategy is not the replicas' mean (DiLoCo's Nesterov outer step overshoots it,
CO2 applies a stale round, NoLoCo mixes pairs with momentum), so the replicas' averaged statistics
do not describe it: in eval mode such a model can be off by orders of magnitude (a ResNet-18 under
DiLoCo: validation loss 144 against 0.65 once its statistics are re-estimated).

:class:`BatchNormStatistics` (a part of :class:`~lightning_fedopt.strategies.ReplicaStrategy`, owned by
its :class:`~lightning_fedopt.runtime.consensus.Consensus`) re-estimates them whenever the consensus is *used* (validation and test on the consensus, a
checkpoint, the model ``fit`` returns), as ``torch.optim.swa_utils.update_bn`` does after weight
averaging: with the consensus weights loaded, every BatchNorm layer's statistics are reset and
accumulated (cumulative average) over the replica's last ``bn_recalibration`` training batches, in
train mode and without gradients, then averaged over the replicas (one all-reduce of the
statistics only). The batches are the ones the replica trained on last, kept by reference (no copy,
no extra data loading). Training itself is unaffected: in train mode BatchNorm normalises with the
batch's own statistics.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fedopt.comm import Communicator
from lightning_fedopt.runtime.reduce import masked_sum
from lightning_fedopt.runtime.tracked import TrackedTensors

__all__ = ["BatchNormStatistics", "default_bn_forward"]

_BN_STATS = ("running_mean", "running_var")


def default_bn_forward(module: nn.Module, batch: Any) -> None:
    """The forward pass used to re-estimate statistics: ``module(batch[0])`` for a tuple or list
    batch (inputs first, as ``torch.optim.swa_utils.update_bn`` assumes), ``module(batch)`` otherwise."""
    module(batch[0] if isinstance(batch, (list, tuple)) else batch)


class BatchNormStatistics:
    """The consensus's BatchNorm statistics re-estimated on the replica's recent batches.

    Args:
        size: ``bn_recalibration``, the training batches kept (0: off).
        forward: ``(module, batch) -> Any``, the forward pass (default :func:`default_bn_forward`).
    """

    def __init__(self, size: int, forward: Callable[[nn.Module, Any], Any] | None = None) -> None:
        self.size = size
        self.forward = forward
        self.batches: deque[Any] = deque(maxlen=max(size, 1))
        #: the BatchNorm layers in train mode while training (frozen ones in eval mode are left alone)
        self.training: set[int] = set()

    def reset(self) -> None:
        """Forget the batches and the layers (a new ``fit``)."""
        self.batches = deque(maxlen=max(self.size, 1))
        self.training = set()

    def batch_norms(
        self, module: nn.Module | None, tracked: TrackedTensors
    ) -> list[tuple[nn.modules.batchnorm._BatchNorm, list[int]]]:
        """Each BatchNorm layer with running statistics, and the tracked positions of those statistics."""
        if module is None or self.size <= 0:
            return []
        ids = tracked.ids
        out = []
        for m in module.modules():
            if (
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.track_running_stats
                and id(m) in self.training
            ):
                stats = [getattr(m, name) for name in _BN_STATS]
                if all(s is not None and id(s) in ids for s in stats):
                    out.append((m, [ids[id(s)] for s in stats]))
        return out

    def active(self, module: nn.Module | None, tracked: TrackedTensors) -> bool:
        """Whether the consensus's BatchNorm statistics are re-estimated when it is used (the module
        has BatchNorm layers that train, and training batches were kept in this fit)."""
        return bool(self.batches) and bool(self.batch_norms(module, tracked))

    def forget_batches(self) -> None:
        """After fit: the kept batches are released (the returned model has its statistics)."""
        self.batches.clear()

    def record(self, module: nn.Module | None, batch: Any) -> None:
        """Keep a reference to this training batch (the last ``size`` are kept) and note which
        BatchNorm layers train."""
        if self.size <= 0 or module is None:
            return
        self.batches.append(batch)
        self.training = {
            id(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        }

    def recalibrated(
        self,
        values: list[Tensor],
        module: nn.Module | None,
        tracked: TrackedTensors,
        comm: Communicator,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> list[Tensor]:
        """``values`` (the consensus of every tracked tensor) with its BatchNorm statistics
        re-estimated. A collective call over ``comm`` when the module has BatchNorm layers (every
        rank calls it at the same point: evaluation, checkpoint, end of fit)."""
        norms = self.batch_norms(module, tracked)
        if not norms or module is None:
            return values
        forward = self.forward or default_bn_forward
        with torch.no_grad():
            backup = tracked.snapshot()
            tracked.load(values)
            momenta = [(m, m.momentum) for m, _ in norms]
            modes = [(m, m.training) for m in module.modules()]
            batches = list(self.batches)
            try:
                for m, _ in norms:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over the batches
                module.train()
                with forward_context():
                    for batch in batches:
                        try:
                            forward(module, batch)
                        except Exception as err:
                            raise RuntimeError(
                                f"lightning_fedopt: re-estimating the consensus's BatchNorm statistics "
                                f"(bn_recalibration={self.size}) failed in the forward pass on a "
                                f"training batch: {err!r}. Pass bn_forward=(module, batch) -> output for this "
                                "batch structure, or bn_recalibration=0"
                            ) from err
                positions = [i for _, idx in norms for i in idx]
                estimates = [tracked.tensors[i].detach().clone() for i in positions]
            finally:
                for bn, momentum in momenta:
                    bn.momentum = momentum
                for layer, mode in modes:
                    layer.training = mode
                tracked.load(backup)
        # replicas without batches (none trained yet) weigh nothing; nobody: keep the values
        result = masked_sum(comm, estimates, weight=float(len(batches)), purpose="consensus").wait()
        if result.valid == 0 or result.weight <= 0:
            return values
        out = list(values)
        for i, s in zip(positions, result.sums):
            out[i] = (s / result.weight).to(values[i].dtype)
        return out
