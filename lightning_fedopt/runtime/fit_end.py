"""Where training ends and where validation looks: the last step, and validation of a changed model.

The functions here and :class:`ValidationGate` (a part of :class:`~lightning_fedopt.strategies.ReplicaStrategy`,
``strategy.validation``) hold the rules; the strategy runs them at its hooks.

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

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from lightning_fedopt.runtime.patches import LightningPatches

log = logging.getLogger("lightning_fedopt")

__all__ = ["ValidationGate", "is_last_training_step"]


def is_last_training_step(trainer: Trainer | None, module: LightningModule | None) -> bool:
    """Whether Lightning's fit loop ends after the optimizer step now finishing (``max_steps``
    reached, or the last batch of the last epoch). Called at the end of a replica step."""
    if trainer is None:
        return False
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


class ValidationGate:
    """Skips a validation during ``fit`` that would score an unchanged consensus.

    Args:
        enabled: ``skip_unchanged_validation`` (and the strategy evaluates on the consensus).
        version: the algorithm's consensus version (changes whenever the consensus may have changed).
        name: the strategy's name, for the warning.
    """

    def __init__(self, enabled: bool, version: Callable[[], int], name: str = "strategy") -> None:
        self.enabled = enabled
        self._version = version
        self.name = name
        #: the consensus version at the last validation during fit (None: none yet)
        self.validated_version: int | None = None
        #: validations skipped in this fit
        self.skipped = 0

    def reset(self) -> None:
        """A new ``fit``."""
        self.validated_version, self.skipped = None, 0

    def unchanged(self) -> bool:
        """Whether a validation now would score the consensus the last one scored."""
        return (
            self.enabled and self.validated_version is not None and self.validated_version == self._version()
        )

    def note_validation(self, trainer: Trainer | None) -> None:
        """At the start of a validation during fit: remember which consensus it scores."""
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.validated_version = self._version()

    def install(
        self, trainer: Trainer, patches: LightningPatches, rank: int, step: Callable[[], int]
    ) -> None:
        """Wrap the fit loop's validation check (through ``patches``, removed at teardown)."""
        loop = trainer.fit_loop.epoch_loop
        original = getattr(loop, "_should_check_val_fx", None)
        if original is None or patches.is_replaced(loop, "_should_check_val_fx"):
            return

        def should_check_val(data_fetcher: Any) -> bool:
            run = bool(original(data_fetcher))
            if run and self.unchanged():
                self.skipped += 1
                if self.skipped == 1 and rank == 0:
                    log.warning(
                        "lightning_fedopt: %s: validation at step %d skipped: the consensus model has not "
                        "changed since the last validation (it changes at outer steps only), so it would "
                        "score the same model again (and EarlyStopping would count that as no improvement). "
                        "Validate on sync steps (val_check_interval a multiple of sync_every) or pass "
                        "skip_unchanged_validation=False; this is reported once",
                        self.name,
                        step(),
                    )
                return False
            return run

        patches.replace(loop, "_should_check_val_fx", should_check_val)
