"""Where training ends and where validation looks: the last step, and validation of a changed model.

:class:`FitEnd` is a mixin of :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`.

* **The last step.** When Lightning will stop after the current optimizer step (``max_steps``
  reached, or the last batch of the last epoch), the strategy closes training right there, in the
  step, with the algorithm's :meth:`final_sync` (DiLoCo's last outer step, CO2's round in flight,
  ...), *before* the validation, the checkpoints and the callbacks of that step. So the last
  validation, ``last.ckpt`` and the model ``fit`` leaves in the module are one and the same. A stop
  the strategy cannot foresee (``EarlyStopping``, ``max_time``, a callback setting
  ``trainer.should_stop``) ends on the consensus that the last validation and checkpoint saw: work
  since then that is not yet part of the consensus (a partial round, a round in flight) is dropped.
* **Validation of an unchanged model.** Algorithms whose consensus changes only at outer steps
  (DiLoCo, CO2) say so through :meth:`consensus_version`; with ``skip_unchanged_validation`` (default)
  a validation Lightning schedules when the consensus has not changed since the last validation is
  skipped: it would score the same model again, and ``EarlyStopping`` would count the repeat as "no
  improvement" and stop training too early.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_fedopt.strategies._rendezvous import END

log = logging.getLogger("lightning_fedopt")

__all__ = ["FitEnd"]


class FitEnd:
    """Mixin: closing training at its last step, and skipping validation of an unchanged consensus."""

    skip_unchanged_validation: bool
    final_sync_enabled: bool
    evaluate: str
    #: whether training was closed at its last step (then ``on_train_end`` has nothing left to do)
    _closed: bool
    #: :meth:`consensus_version` at the last validation during fit (None: none yet)
    _validated_version: int | None
    _skipped_validations: int
    _consensus_cache: list[torch.Tensor] | None

    def consensus_version(self) -> int:
        """A number that changes whenever the consensus model may have changed (default: every
        optimizer step). Algorithms whose consensus changes only at outer steps count those."""
        return self._replica_step  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ the last step
    def _trainer(self) -> Trainer | None:
        return getattr(self.lightning_module, "_trainer", None)  # type: ignore[attr-defined]

    def _is_last_training_step(self) -> bool:
        """Whether Lightning's fit loop ends after the optimizer step now finishing (``max_steps``
        reached, or the last batch of the last epoch). Called at the end of a replica step."""
        trainer = self._trainer()
        if trainer is None:
            return False
        module = self.lightning_module  # type: ignore[attr-defined]
        loop = trainer.fit_loop
        epochs = loop.epoch_loop
        # automatic optimization: Lightning counts this step as completed only after the strategy's
        # optimizer_step returns; manual optimization: at batch end it already has
        done = epochs.global_step + (1 if module is not None and module.automatic_optimization else 0)
        if trainer.max_steps is not None and trainer.max_steps >= 0 and done >= trainer.max_steps:
            return True
        max_epochs = loop.max_epochs
        if max_epochs is None or max_epochs < 0:
            return False
        last_batch = epochs._num_ready_batches_reached()
        return bool(last_batch and trainer.current_epoch + 1 >= max_epochs)

    def _close_training(self, close: Callable[[], None]) -> None:
        """Run ``close`` (the final synchronisation) and count it as a synchronisation if it was one."""
        before = self.local_is_consensus()  # type: ignore[attr-defined]
        close()
        if not before:
            self._sync_count += 1  # type: ignore[attr-defined]
            self._close_round()  # type: ignore[attr-defined]
        self._steps_since_sync = 0  # type: ignore[attr-defined]
        self._consensus_cache = None

    def _load_consensus(self) -> None:
        """Every replica takes the consensus (as validation and checkpoints at this step saw it)."""
        values = self.cached_consensus_values()  # type: ignore[attr-defined]
        with torch.no_grad():
            for t, v in zip(self.tracked_tensors(), values):  # type: ignore[attr-defined]
                t.copy_(v)
        self._after_final_sync()  # type: ignore[attr-defined]

    @override
    def on_train_end(self) -> None:
        """The final synchronisation (after the callbacks' ``on_train_end``, before ``on_fit_end``),
        unless training was closed at its last step."""
        self._rendezvous_in_fit(END)  # type: ignore[attr-defined]
        if self.final_sync_enabled and self._algorithm_ready:  # type: ignore[attr-defined]
            if not self._closed and not self.local_is_consensus():  # type: ignore[attr-defined]
                # a stop the strategy could not foresee (EarlyStopping, max_time): end on the consensus
                # that this step's validation and checkpoints saw
                self._close_training(self._load_consensus)
            elif self.recalibrates_batchnorm():  # type: ignore[attr-defined]
                # the consensus's re-estimated BatchNorm statistics (those this step's validation and
                # checkpoints used, from the cache)
                self._load_consensus()
            self._steps_since_sync = 0  # type: ignore[attr-defined]
        self._forget_batches()  # type: ignore[attr-defined]
        self._closed = False
        self._consensus_cache = None

    # ------------------------------------------------------------------ validation of a changed model
    def _patch_validation_check(self, trainer: Trainer) -> None:
        loop = trainer.fit_loop.epoch_loop
        original = getattr(loop, "_should_check_val_fx", None)
        if original is None or "_should_check_val_fx" in loop.__dict__:
            return

        def should_check_val(data_fetcher: Any) -> bool:
            run = bool(original(data_fetcher))
            if run and self._unchanged_since_validation():
                self._skipped_validations += 1
                if self._skipped_validations == 1 and getattr(self, "global_rank", 0) == 0:
                    log.warning(
                        "lightning_fedopt: %s: validation at step %d skipped: the consensus model has not "
                        "changed since the last validation (it changes at outer steps only), so it would "
                        "score the same model again (and EarlyStopping would count that as no improvement). "
                        "Validate on sync steps (val_check_interval a multiple of sync_every) or pass "
                        "skip_unchanged_validation=False; this is reported once",
                        type(self).__name__,
                        self._replica_step,  # type: ignore[attr-defined]
                    )
                return False
            return run

        loop._should_check_val_fx = should_check_val  # type: ignore[method-assign]

    @staticmethod
    def _unpatch_validation_check(trainer: Any) -> None:
        trainer.fit_loop.epoch_loop.__dict__.pop("_should_check_val_fx", None)

    def _unchanged_since_validation(self) -> bool:
        return (
            self.skip_unchanged_validation
            and self.evaluate == "consensus"
            and self._validated_version is not None
            and self._validated_version == self.consensus_version()
        )

    def _note_validation(self) -> None:
        """At the start of a validation during fit: remember which consensus it scores."""
        trainer = self._trainer()
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated_version = self.consensus_version()

    @property
    def skipped_validations(self) -> int:
        """Validations skipped in this fit because the consensus had not changed since the last one."""
        return self._skipped_validations
