"""What the replica strategies change in Lightning's training loop.

* :class:`ManualOptimizationHooks`: under manual optimization a batch may step several
  optimizers, so a replica's step ends at batch end; this callback, put first in
  ``trainer.callbacks``, closes it there.
* :class:`LoopPatches` (a mixin of :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`):
  Lightning broadcasts a SIGTERM flag from rank 0 before *every* training batch, which puts the
  replicas in lockstep and costs a network round trip per step; the strategy replaces it with one
  check before each synchronisation step, where the replicas meet anyway: a rendezvous that also
  checks that every rank is at the same step (any rank's SIGTERM stops them all after that
  synchronisation, see ``_faults``). Lightning's SIGTERM notifier, which broadcasts inside the
  signal handler, is replaced by one that only records the signal.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_fedopt.strategies._rendezvous import SYNC

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
        self._patch_signals(trainer)  # type: ignore[attr-defined]
        self._install_sync_points(trainer)  # type: ignore[attr-defined]
        self._patch_validation_check(trainer)  # type: ignore[attr-defined]

    def _unpatch_loop(self) -> None:
        """At teardown: the Trainer's loop as Lightning left it."""
        trainer = getattr(self.lightning_module, "_trainer", None)  # type: ignore[attr-defined]
        if trainer is not None:
            if self._hooks in trainer.callbacks:
                trainer.callbacks.remove(self._hooks)
            trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)
            self._unpatch_signals(trainer)  # type: ignore[attr-defined]
            trainer.fit_loop.epoch_loop.__dict__.pop("_should_check_val_fx", None)

    def _patch_sigterm_check(self, trainer: Trainer) -> None:
        """Lightning broadcasts a SIGTERM flag from rank 0 before *every* training batch, which puts
        the replicas in lockstep and costs a network round trip per step. Replicas only need to
        agree to stop where they meet anyway: check the flag before synchronisation steps only."""
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = self._sigterm_check  # instance attribute; removed in teardown

    def _sigterm_check(self) -> None:
        """Before a synchronisation step: if one rank received SIGTERM, every rank learns it here and
        stops after the synchronisation (``_faults``). The check is a rendezvous carrying the step
        (:mod:`~lightning_fedopt.strategies._rendezvous`): ranks that fell out of step raise a clear
        error here instead of waiting for each other until the timeout."""
        step = self._replica_step  # type: ignore[attr-defined]
        if not self.schedule.should_sync(step + 1):  # type: ignore[attr-defined]
            return
        if self._checked_step == step:  # type: ignore[has-type]
            return  # once per step (under manual optimization a batch need not step)
        self._checked_step = step
        self._stop_check()

    def _stop_check(self) -> None:
        """Whether to stop after the coming synchronisation: the rendezvous carries every rank's
        SIGTERM flag (NoLoCo, without a global meeting point, overrides this)."""
        if self.rendezvous(SYNC, sigterm=self._sigterm_received):  # type: ignore[attr-defined]
            self._agree_to_stop()  # type: ignore[attr-defined]
