"""What the replica strategies change in Lightning's training loop.

* :class:`ManualOptimizationHooks`: under manual optimization a batch may step several
  optimizers, so a replica's step ends at batch end; this callback, put first in
  ``trainer.callbacks``, closes it there.
* :class:`LoopPatches` (a mixin of :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`):
  Lightning broadcasts a SIGTERM flag from rank 0 before *every* training batch, which puts the
  replicas in lockstep and costs a network round trip per step; the strategy replaces it with one
  check before each synchronisation step, where the replicas meet anyway.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

__all__ = ["LoopPatches", "ManualOptimizationHooks"]


class ManualOptimizationHooks(Callback):
    """Internal: the batch-end point of the loop, needed only under manual optimization.

    With automatic optimization a step ends inside the strategy's ``optimizer_step``. With
    manual optimization a batch may step several optimizers, so the step ends at batch end; this
    callback is then put first in ``trainer.callbacks`` so that the callbacks after it
    (checkpointing, monitors) see the state after synchronisation.
    """

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.strategy._stepped:
            self.strategy._stepped = False
            self.strategy._end_step()


class LoopPatches:
    """Mixin: installs and removes the strategy's changes to the Trainer's loop."""

    _hooks: ManualOptimizationHooks

    def _patch_loop(self, trainer: Trainer) -> None:
        """At the start of ``fit``: the batch-end hook under manual optimization, and the SIGTERM check."""
        module = self.lightning_module  # type: ignore[attr-defined]
        if module is not None and not module.automatic_optimization and self._hooks not in trainer.callbacks:
            trainer.callbacks.insert(0, self._hooks)
        self._patch_sigterm_check(trainer)

    def _unpatch_loop(self) -> None:
        """At teardown: the Trainer's loop as Lightning left it."""
        trainer = getattr(self.lightning_module, "_trainer", None)  # type: ignore[attr-defined]
        if trainer is not None:
            if self._hooks in trainer.callbacks:
                trainer.callbacks.remove(self._hooks)
            trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)

    def _patch_sigterm_check(self, trainer: Trainer) -> None:
        """Lightning broadcasts a SIGTERM flag from rank 0 before *every* training batch, which puts
        the replicas in lockstep and costs a network round trip per step. Replicas only need to
        agree to stop where they meet anyway: check the flag before synchronisation steps only."""
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = self._sigterm_check  # instance attribute; removed in teardown

    def _sigterm_check(self) -> None:
        """Before a synchronisation step: stop every rank if rank 0 received SIGTERM."""
        if not self.schedule.should_sync(self._replica_step + 1):  # type: ignore[attr-defined]
            return
        trainer = getattr(self.lightning_module, "_trainer", None)  # type: ignore[attr-defined]
        # int64, as Lightning's own SIGTERM notifier broadcasts it (the two may pair up)
        flag = torch.tensor(
            [1 if getattr(trainer, "received_sigterm", False) else 0],
            device=self.root_device,  # type: ignore[attr-defined]
        )
        self.comm.broadcast([flag], src=0, purpose="control")  # type: ignore[attr-defined]
        if int(flag.item()) == 1:
            with contextlib.suppress(Exception):
                self.comm.barrier(purpose="control")  # type: ignore[attr-defined]
            raise SIGTERMException()
