"""Evaluating on the consensus model: swapping its weights into the module and back out.

:class:`ConsensusEvaluation` is a mixin of :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`:
with ``evaluate="consensus"`` validation, test and predict run on the consensus weights, which a
checkpoint file's ``state_dict`` also holds; the replica's own weights are kept aside meanwhile.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt.strategies._rendezvous import VALIDATION

__all__ = ["ConsensusEvaluation"]


class ConsensusEvaluation:
    """Mixin: the consensus swapped in for evaluation, and the consensus as the checkpoint's model."""

    #: the replica's own tracked values while the consensus is swapped in, else None
    _eval_backup: list[Tensor] | None
    _consensus_cache: list[Tensor] | None
    _algorithm_ready: bool
    evaluate: str

    def cached_consensus_values(self) -> list[Tensor]:
        """:meth:`consensus_values`, computed at most once between two optimizer steps.

        Validation, a checkpoint and the final synchronisation at the same step share one result.
        """
        if self._consensus_cache is None:
            values = [v.detach().clone() for v in self.consensus_values()]  # type: ignore[attr-defined]
            # BatchNorm statistics that belong to the consensus weights (bn_recalibration)
            self._consensus_cache = self._recalibrated(values)  # type: ignore[attr-defined]
        return self._consensus_cache

    @contextlib.contextmanager
    def consensus_swapped(self) -> Iterator[None]:
        """Run the block with the consensus model's weights in the module, then restore the replica's.

        A collective call for algorithms whose consensus needs communication (every rank must enter
        it at the same point), used e.g. by :class:`~lightning_fedopt.callbacks.Curriculum` to score
        samples under the consensus model. Does nothing when the consensus is already swapped in.
        """
        swapped = self._eval_backup is None
        if swapped:
            self._swap_in_consensus(force=True)
        try:
            yield
        finally:
            if swapped:
                self._swap_out_consensus()

    def _holds_consensus(self) -> bool:
        """Whether the module holds the consensus as it is: the replica's weights are the consensus,
        and no BatchNorm statistics are to be re-estimated for it."""
        return self.local_is_consensus() and not self.recalibrates_batchnorm()  # type: ignore[attr-defined]

    def _swap_in_consensus(self, force: bool = False) -> None:
        if (not force and self.evaluate != "consensus") or not self._algorithm_ready:
            return
        if self._eval_backup is not None or self._holds_consensus():
            return
        values = self.cached_consensus_values()
        tracked = self.tracked_tensors()  # type: ignore[attr-defined]
        with torch.no_grad():
            self._eval_backup = [t.detach().clone() for t in tracked]
            for t, v in zip(tracked, values):
                t.copy_(v)

    def _swap_out_consensus(self) -> None:
        if self._eval_backup is None:
            return
        with torch.no_grad():
            for t, v in zip(self.tracked_tensors(), self._eval_backup):  # type: ignore[attr-defined]
                t.copy_(v)
        self._eval_backup = None

    @override
    def on_validation_start(self) -> None:
        self._rendezvous_in_fit(VALIDATION)  # type: ignore[attr-defined]
        self._note_validation()  # type: ignore[attr-defined]
        self._swap_in_consensus()

    @override
    def on_validation_end(self) -> None:
        self._swap_out_consensus()

    @override
    def on_test_start(self) -> None:
        self._swap_in_consensus()

    @override
    def on_test_end(self) -> None:
        self._swap_out_consensus()

    @override
    def on_predict_start(self) -> None:
        self._swap_in_consensus()

    @override
    def on_predict_end(self) -> None:
        self._swap_out_consensus()

    # ------------------------------------------------------------------ the checkpoint's model
    def _local_module_state_dict(self) -> dict[str, Any]:
        """This replica's own weights, even while the consensus is swapped in for evaluation."""
        module = self.lightning_module  # type: ignore[attr-defined]
        assert module is not None
        if self._eval_backup is not None:
            return self._state_dict_with(self._eval_backup)  # type: ignore[attr-defined]
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The consensus model's state dict (what plain Lightning/PyTorch loads from the checkpoint)."""
        module = self.lightning_module  # type: ignore[attr-defined]
        assert module is not None
        if not self._algorithm_ready or self._eval_backup is not None or self._holds_consensus():
            return module.state_dict()
        return self._state_dict_with(self.cached_consensus_values())  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ measuring the spread
    def consensus_distance(self, local: list[Tensor], consensus: list[Tensor], valid: bool) -> float:
        """Mean over valid replicas of ``||theta_i - theta_bar|| / ||theta_bar||`` (one scalar all-reduce)."""
        with torch.no_grad():
            if valid:
                diff = math.sqrt(
                    sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(local, consensus))
                )
            else:
                diff = 0.0
            norm = math.sqrt(sum(float(b.double().pow(2).sum()) for b in consensus))
        buf = torch.tensor([diff, float(valid)], dtype=torch.float64, device=self.root_device)  # type: ignore[attr-defined]
        self.outer_comm.all_reduce([buf], "sum", purpose="metrics")  # type: ignore[attr-defined]
        n_valid = float(buf[1])
        return float(buf[0]) / n_valid / max(norm, 1e-12) if n_valid > 0 else float("nan")
