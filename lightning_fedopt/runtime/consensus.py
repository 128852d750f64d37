"""The consensus model: computed once per step, swapped in for evaluation, saved as the checkpoint's model.

:class:`Consensus` is a part of :class:`~lightning_fedopt.strategies.ReplicaStrategy`
(``strategy.consensus``), the one owner of the consensus's cache, of the evaluation swap (with
``evaluate="consensus"`` validation, test and predict run on the consensus weights, which a
checkpoint file's ``state_dict`` also holds; the replica's own weights are kept aside meanwhile) and
of its BatchNorm statistics (:class:`~lightning_fedopt.runtime.batchnorm.BatchNormStatistics`).
The algorithm says what the consensus is (``compute``) and whether the replica holds it already
(``holds``); the part never communicates by itself except through them and the re-estimation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fedopt.comm import Communicator
from lightning_fedopt.runtime.batchnorm import BatchNormStatistics
from lightning_fedopt.runtime.tracked import TrackedTensors

__all__ = ["Consensus", "consensus_distance"]


class Consensus:
    """The consensus of the tracked tensors (see the module doc).

    Args:
        tracked: the tracked tensors (the module's own).
        batchnorm: the BatchNorm re-estimation of the consensus.
        compute: the algorithm's consensus value of every tracked tensor (may communicate).
        holds: whether the replica's weights are the consensus as they are.
        module: the module (for the re-estimation and the checkpoint's state dict).
        comm: the world communicator (the re-estimation's all-reduce).
        forward_context: the precision plugin's forward context.
    """

    def __init__(
        self,
        tracked: TrackedTensors,
        batchnorm: BatchNormStatistics,
        *,
        compute: Callable[[], list[Tensor]],
        holds: Callable[[], bool],
        module: Callable[[], nn.Module | None],
        comm: Callable[[], Communicator],
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.tracked = tracked
        self.batchnorm = batchnorm
        self._compute = compute
        self._holds = holds
        self._module = module
        self._comm = comm
        self._forward_context = forward_context
        self.cache: list[Tensor] | None = None
        #: the replica's own tracked values while the consensus is swapped in, else None
        self.backup: list[Tensor] | None = None

    def reset(self) -> None:
        """A new ``fit``, or the model changed: nothing cached, nothing swapped in."""
        self.cache, self.backup = None, None

    def invalidate(self) -> None:
        """The replica's weights changed (an optimizer step, a synchronisation): compute again."""
        self.cache = None

    @property
    def swapped_in(self) -> bool:
        """Whether the module holds the consensus in place of the replica's own weights."""
        return self.backup is not None

    def recalibrates(self) -> bool:
        """Whether the consensus's BatchNorm statistics are re-estimated when it is used."""
        return self.batchnorm.active(self._module(), self.tracked)

    def values(self) -> list[Tensor]:
        """The consensus, computed at most once between two optimizer steps (validation, a
        checkpoint and the final synchronisation at the same step share one result)."""
        if self.cache is None:
            values = [v.detach().clone() for v in self._compute()]
            # BatchNorm statistics that belong to the consensus weights (bn_recalibration)
            self.cache = self.batchnorm.recalibrated(
                values, self._module(), self.tracked, self._comm(), self._forward_context
            )
        return self.cache

    def held(self) -> bool:
        """Whether the module holds the consensus as it is: the replica's weights are the consensus,
        and no BatchNorm statistics are to be re-estimated for it."""
        return self._holds() and not self.recalibrates()

    def swap_in(self) -> None:
        """Put the consensus into the module, keeping the replica's own weights aside."""
        if self.backup is not None or self.held():
            return
        values = self.values()
        self.backup = self.tracked.snapshot()
        self.tracked.load(values)

    def swap_out(self) -> None:
        """Give the module the replica's own weights back."""
        if self.backup is None:
            return
        self.tracked.load(self.backup)
        self.backup = None

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Run the block with the consensus in the module, then restore the replica's weights."""
        swapped = self.backup is None
        if swapped:
            self.swap_in()
        try:
            yield
        finally:
            if swapped:
                self.swap_out()

    def load_into_replica(self) -> None:
        """The replica takes the consensus (as validation and checkpoints at this step saw it)."""
        self.tracked.load(self.values())

    # ------------------------------------------------------------------ the checkpoint's model
    def local_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """The replica's own weights, even while the consensus is swapped in for evaluation."""
        if self.backup is not None:
            return self.tracked.state_dict_with(module, self.backup)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def state_dict(self, module: nn.Module, ready: bool) -> dict[str, Any]:
        """The consensus model's state dict (``ready``: the algorithm is set up)."""
        if not ready or self.backup is not None or self.held():
            return module.state_dict()
        return self.tracked.state_dict_with(module, self.values())


def consensus_distance(
    comm: Communicator, local: list[Tensor], consensus: list[Tensor], valid: bool, device: torch.device
) -> float:
    """Mean over valid replicas of ``||theta_i - theta_bar|| / ||theta_bar||`` (one scalar all-reduce)."""
    with torch.no_grad():
        if valid:
            diff = math.sqrt(
                sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(local, consensus))
            )
        else:
            diff = 0.0
        norm = math.sqrt(sum(float(b.double().pow(2).sum()) for b in consensus))
    buf = torch.tensor([diff, float(valid)], dtype=torch.float64, device=device)
    comm.all_reduce([buf], "sum", purpose="metrics")
    n_valid = float(buf[1])
    return float(buf[0]) / n_valid / max(norm, 1e-12) if n_valid > 0 else float("nan")
