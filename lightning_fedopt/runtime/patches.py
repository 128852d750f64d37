"""Every change the replica strategies make to Lightning's objects, in one registry.

:class:`LightningPatches` (a part of :class:`~lightning_fedopt.strategies.ReplicaStrategy`,
``strategy.patches``) records each change as it is made and undoes all of them with one
:meth:`~LightningPatches.remove_all` at teardown. This file is the one to check on a Lightning
upgrade; the private attributes of Lightning that the library replaces are listed in
:data:`LIGHTNING_PRIVATES`:

* ``fit_loop.epoch_loop._broadcast_sigterm_tensor``: Lightning broadcasts a SIGTERM flag from rank
  0 before *every* training batch, which puts the replicas in lockstep and costs a network round
  trip per step; it becomes one check before each synchronisation step, where the replicas meet
  anyway (``fault_tolerance.faults``);
* ``fit_loop.epoch_loop._should_check_val_fx``: a validation of an unchanged consensus is skipped
  (``runtime.fit_end``);
* ``_signal_connector._sigterm_notifier_fn``: Lightning's SIGTERM notifier broadcasts inside the
  signal handler; it becomes one that only records the signal (``fault_tolerance.faults``);
* ``_checkpoint_connector.resume_start``: an elastic restart resumes from the latest sync point;
* the fit loop's optimizer-step progress (:func:`set_global_step`): a replica group that healed
  from a live peer (``fault_tolerance="torchft"``) takes the peer's step count.

Callbacks the strategy puts into ``trainer.callbacks`` are registered here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

__all__ = [
    "LIGHTNING_PRIVATES",
    "LightningPatches",
    "ManualOptimizationHooks",
    "callbacks_of",
    "set_global_step",
]

#: the Lightning attributes replaced through :meth:`LightningPatches.replace` (owner, attribute)
LIGHTNING_PRIVATES = (
    ("fit_loop.epoch_loop", "_broadcast_sigterm_tensor"),
    ("fit_loop.epoch_loop", "_should_check_val_fx"),
    ("_signal_connector", "_sigterm_notifier_fn"),
    ("_checkpoint_connector", "resume_start"),
)


def callbacks_of(trainer: Trainer) -> list[Callback]:
    """``trainer.callbacks`` (set by Lightning's callback connector, so invisible to type checkers)."""
    callbacks: list[Callback] = vars(trainer)["callbacks"]
    return callbacks


def set_global_step(trainer: Trainer, step: int, *, in_step: bool) -> None:
    """Make Lightning's ``global_step`` ``step`` (a group that healed takes its peers' step count, so
    that it stops at ``max_steps`` with them). ``in_step``: called inside an automatic optimizer
    step, which Lightning counts as completed only after the strategy returns."""
    loop = trainer.fit_loop.epoch_loop
    module = trainer.lightning_module
    if module is None or module.automatic_optimization:
        total = loop.automatic_optimization.optim_progress.optimizer.step.total
        total.ready, total.completed = step, step - 1 if in_step else step
    else:
        total = loop.manual_optimization.optim_step_progress.total
        total.ready, total.completed = step, step


class LightningPatches:
    """A registry of (install, remove) pairs with one :meth:`remove_all`."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._at_fit_end: list[tuple[Trainer, Callback]] = []

    def replace(self, owner: Any, name: str, value: Any) -> None:
        """Set ``owner.<name> = value`` as an instance attribute (it shadows the class's method);
        :meth:`remove_all` deletes it again. A second replacement of the same attribute keeps the
        first undo (the original is what comes back)."""
        key = f"{id(owner)}.{name}"
        setattr(owner, name, value)
        if any(k == key for k, _ in self._undo):
            return

        def undo() -> None:
            owner.__dict__.pop(name, None)

        self._undo.append((key, undo))

    def is_replaced(self, owner: Any, name: str) -> bool:
        """Whether ``owner.<name>`` is replaced through this registry."""
        return any(k == f"{id(owner)}.{name}" for k, _ in self._undo)

    def add_callback(
        self, trainer: Trainer, callback: Callback, index: int = 0, *, until_fit_end: bool = False
    ) -> None:
        """Insert ``callback`` into ``trainer.callbacks`` at ``index`` (once); removed by
        :meth:`remove_all`, or with ``until_fit_end`` by :meth:`remove_at_fit_end` (Lightning calls
        ``on_fit_end`` after the strategy's teardown; a fit that failed leaves it in place, inert,
        for the next fit of the Trainer)."""
        callbacks = callbacks_of(trainer)
        if callback in callbacks:
            return
        callbacks.insert(index, callback)
        if until_fit_end:
            self._at_fit_end.append((trainer, callback))
            return

        def undo() -> None:
            if callback in callbacks:
                callbacks.remove(callback)

        self._undo.append((f"callback.{id(callback)}", undo))

    def remove_at_fit_end(self) -> None:
        """At ``on_fit_end``: remove the callbacks added ``until_fit_end``. Lightning is iterating
        over ``trainer.callbacks`` then, so the list is replaced, not changed in place."""
        while self._at_fit_end:
            trainer, callback = self._at_fit_end.pop()
            vars(trainer)["callbacks"] = [c for c in callbacks_of(trainer) if c is not callback]

    def remove_all(self) -> None:
        """Undo every change, newest first."""
        while self._undo:
            _, undo = self._undo.pop()
            undo()

    def __len__(self) -> int:
        return len(self._undo)


class ManualOptimizationHooks(Callback):
    """Internal: the batch-end point of the loop, needed only under manual optimization.

    With automatic optimization a step ends inside the strategy's ``optimizer_step``. With
    manual optimization a batch may step several optimizers, so the step ends at batch end; this
    callback is then put first in ``trainer.callbacks`` so that the callbacks after it
    (checkpointing, monitors) see the state after synchronisation.

    Args:
        end_of_batch: what to run at batch end (the strategy closes the step if one stepped).
    """

    def __init__(self, end_of_batch: Callable[[], None]) -> None:
        self.end_of_batch = end_of_batch

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.end_of_batch()
