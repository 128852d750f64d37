"""BatchNorm running statistics that belong to the consensus weights they are used with.

A replica's running statistics are estimated with *its own* weights. The consensus of an
outer-optimizer strategy is not the replicas' mean (DiLoCo's Nesterov outer step overshoots it,
CO2 applies a stale round, NoLoCo mixes pairs with momentum), so the replicas' averaged statistics
do not describe it: in eval mode such a model can be off by orders of magnitude (a ResNet-18 under
DiLoCo: validation loss 144 against 0.65 once its statistics are re-estimated).

:class:`BatchNormStatistics` (a mixin of :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`)
re-estimates them whenever the consensus is *used* (validation and test on the consensus, a
checkpoint, the model ``fit`` returns), as ``torch.optim.swa_utils.update_bn`` does after weight
averaging: with the consensus weights loaded, every BatchNorm layer's statistics are reset and
accumulated (cumulative average) over the replica's last ``bn_recalibration`` training batches, in
train mode and without gradients, then averaged over the replicas (one all-reduce of the
statistics only). The batches are the ones the replica trained on last, kept by reference (no copy,
no extra data loading). Training itself is unaffected: in train mode BatchNorm normalises with the
batch's own statistics.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fedopt.strategies._reduce import masked_sum

__all__ = ["BatchNormStatistics", "default_bn_forward"]

_BN_STATS = ("running_mean", "running_var")


def default_bn_forward(module: nn.Module, batch: Any) -> None:
    """The forward pass used to re-estimate statistics: ``module(batch[0])`` for a tuple or list
    batch (inputs first, as ``torch.optim.swa_utils.update_bn`` assumes), ``module(batch)`` otherwise."""
    module(batch[0] if isinstance(batch, (list, tuple)) else batch)


class BatchNormStatistics:
    """Mixin: the consensus's BatchNorm statistics re-estimated on the replica's recent batches."""

    bn_recalibration: int
    bn_forward: Callable[[nn.Module, Any], Any] | None
    _bn_batches: deque[Any]
    #: the BatchNorm layers in train mode while training (frozen ones in eval mode are left alone)
    _bn_training: set[int]

    def _batch_norms(self) -> list[tuple[nn.modules.batchnorm._BatchNorm, list[int]]]:
        """Each BatchNorm layer with running statistics, and the tracked positions of those statistics."""
        module = self.lightning_module  # type: ignore[attr-defined]
        if module is None or self.bn_recalibration <= 0:
            return []
        ids = self._tracked_ids  # type: ignore[attr-defined]
        out = []
        for m in module.modules():
            if (
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.track_running_stats
                and id(m) in self._bn_training
            ):
                stats = [getattr(m, name) for name in _BN_STATS]
                if all(s is not None and id(s) in ids for s in stats):
                    out.append((m, [ids[id(s)] for s in stats]))
        return out

    def recalibrates_batchnorm(self) -> bool:
        """Whether the consensus's BatchNorm statistics are re-estimated when it is used (the module
        has BatchNorm layers that train, and training batches were kept in this fit)."""
        return bool(self._bn_batches) and bool(self._batch_norms())

    def _forget_batches(self) -> None:
        """After fit: the kept batches are released (the returned model has its statistics)."""
        self._bn_batches.clear()

    def _record_batch(self, batch: Any) -> None:
        """Keep a reference to this training batch (the last ``bn_recalibration`` are kept) and note
        which BatchNorm layers train."""
        module = self.lightning_module  # type: ignore[attr-defined]
        if self.bn_recalibration <= 0 or module is None:
            return
        if self._bn_batches.maxlen != self.bn_recalibration:
            self._bn_batches = deque(self._bn_batches, maxlen=self.bn_recalibration)
        self._bn_batches.append(batch)
        self._bn_training = {
            id(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        }

    def _recalibrated(self, values: list[Tensor]) -> list[Tensor]:
        """``values`` (the consensus of every tracked tensor) with its BatchNorm statistics
        re-estimated. A collective call when the module has BatchNorm layers (every rank calls it
        at the same point: evaluation, checkpoint, end of fit)."""
        norms = self._batch_norms()
        if not norms:
            return values
        module = self.lightning_module  # type: ignore[attr-defined]
        tracked = self.tracked_tensors()  # type: ignore[attr-defined]
        forward = self.bn_forward or default_bn_forward
        with torch.no_grad():
            backup = [t.detach().clone() for t in tracked]
            for t, v in zip(tracked, values):
                t.copy_(v)
            momenta = [(m, m.momentum) for m, _ in norms]
            modes = [(m, m.training) for m in module.modules()]
            batches = list(self._bn_batches)
            try:
                for m, _ in norms:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over the batches
                module.train()
                with self.precision_plugin.forward_context():  # type: ignore[attr-defined]
                    for batch in batches:
                        try:
                            forward(module, batch)
                        except Exception as err:
                            raise RuntimeError(
                                f"lightning_fedopt: re-estimating the consensus's BatchNorm statistics "
                                f"(bn_recalibration={self.bn_recalibration}) failed in the forward pass on a "
                                f"training batch: {err!r}. Pass bn_forward=(module, batch) -> output for this "
                                "batch structure, or bn_recalibration=0"
                            ) from err
                positions = [i for _, idx in norms for i in idx]
                estimates = [tracked[i].detach().clone() for i in positions]
            finally:
                for m, momentum in momenta:
                    m.momentum = momentum
                for m, mode in modes:
                    m.training = mode
                for t, b in zip(tracked, backup):
                    t.copy_(b)
        # replicas without batches (none trained yet) weigh nothing; nobody: keep the values
        result = masked_sum(self.comm, estimates, weight=float(len(batches)), purpose="consensus").wait()  # type: ignore[attr-defined]
        if result.valid == 0 or result.weight <= 0:
            return values
        out = list(values)
        for i, s in zip(positions, result.sums):
            out[i] = (s / result.weight).to(values[i].dtype)
        return out
