"""Hard-batch selection: train on the highest-loss candidate mini-batches of a pool."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_fedopt._validate import check_float, check_int, check_str
from lightning_fedopt.callbacks._scoring import (
    ScoreFn,
    batch_size_of,
    check_scores,
    log_every_n_steps,
    log_metrics,
    resolve_score_fn,
    slice_batch,
)

__all__ = ["HardBatchSelection", "select_hard_batches"]


def select_hard_batches(losses: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` candidates with the highest loss, in candidate order (ties: lower index).

    Example:
        >>> select_hard_batches(torch.tensor([0.2, 0.9, 0.5, 0.9]), 2).tolist()
        [1, 3]
    """
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"`losses` must be a non-empty 1-D tensor, got {losses!r}")
    keep = check_int("keep", keep, low=1, high=losses.numel())
    order = torch.sort(-losses.to(torch.float64), stable=True).indices
    return torch.sort(order[:keep]).values


class HardBatchSelection(Callback):
    """Train only on the hardest candidate mini-batches of each pool (Sahayam, Zakkam & Jayaraman,
    "Can we learn better with hard samples?", arXiv 2304.03486).

    Every training batch the loader yields is a *pool* of ``pool`` candidate mini-batches (make the
    DataLoader's batch size ``pool`` times the mini-batch size). Before the training step, the
    callback computes each candidate's mean loss with a forward pass only (eval mode, no
    gradients), keeps the ``ceil(fraction * pool)`` candidates with the highest loss, and the
    module's ``training_step`` receives their concatenation instead of the whole pool. The extra
    forward work is counted and logged: ``hard_batch/extra_forward_samples`` (total samples scored),
    ``hard_batch/extra_forward_seconds``, ``hard_batch/extra_forward_ratio`` (scored samples per
    trained sample) and the mean loss of the pool and of the kept candidates.

    Per-sample losses come from ``score_fn(model, batch)``, default the module's
    ``score_samples(batch)`` if defined, else per-sample cross-entropy for ``(x, y)`` batches.

    Args:
        pool: candidate mini-batches per training batch (>= 2).
        fraction: fraction ``delta`` of the candidates trained on, in (0, 1].
        score_fn: per-sample loss function.
        prefix: metric name prefix.

    Raises:
        ValueError: for ``pool`` < 2, ``fraction`` outside (0, 1], a batch that does not split into
            ``pool`` equal candidates, or a score function that returns the wrong shape.

    Example:
        >>> cb = HardBatchSelection(pool=4, fraction=0.5)   # DataLoader(batch_size=4 * 32)
        >>> cb.keep
        2
    """

    def __init__(
        self,
        pool: int = 4,
        fraction: float = 0.5,
        score_fn: ScoreFn | None = None,
        prefix: str = "hard_batch/",
    ) -> None:
        self.pool = check_int("pool", pool, low=2)
        self.fraction = check_float("fraction", fraction, low=0, high=1, low_open=True)
        self.keep = max(1, math.ceil(self.fraction * self.pool - 1e-9))
        self.score_fn = score_fn
        self.prefix = check_str("prefix", prefix)
        self.extra_forward_samples = 0
        self.trained_samples = 0
        self.extra_forward_seconds = 0.0
        self.history: list[dict[str, float]] = []
        self._last: dict[str, float] = {}
        self._module: LightningModule | None = None
        self._original: Any = None

    # ------------------------------------------------------------------ the selection
    @torch.no_grad()
    def candidate_losses(self, pl_module: LightningModule, batch: Any) -> torch.Tensor:
        """Mean loss of each of the ``pool`` candidate mini-batches of ``batch`` (forward only)."""
        n = batch_size_of(batch)
        if n % self.pool:
            raise ValueError(
                f"a training batch of {n} samples does not split into pool={self.pool} equal candidate "
                f"mini-batches; make the DataLoader's batch size a multiple of {self.pool}"
            )
        score_fn = resolve_score_fn(self.score_fn, pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            scores = check_scores(score_fn(pl_module, batch), n, "HardBatchSelection's score function")
        finally:
            pl_module.train(was_training)
        return scores.view(self.pool, n // self.pool).mean(1)

    def select(self, pl_module: LightningModule, batch: Any) -> Any:
        """The concatenation of the hardest candidates of ``batch``."""
        start = time.perf_counter()
        losses = self.candidate_losses(pl_module, batch)
        n = batch_size_of(batch)
        per = n // self.pool
        kept = select_hard_batches(losses, self.keep)
        index = (kept[:, None] * per + torch.arange(per)[None, :]).flatten()
        self.extra_forward_seconds += time.perf_counter() - start
        self.extra_forward_samples += n
        self.trained_samples += len(index)
        self._last = {
            "pool_loss": float(losses.mean()),
            "selected_loss": float(losses[kept].mean()),
        }
        return slice_batch(batch, index)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._original is not None:
            return
        # the module's own training_step receives the selected candidates; the wrapper is an
        # instance attribute, removed again in teardown
        original = pl_module.training_step

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            return original(self.select(pl_module, batch), *args, **kwargs)

        self._module, self._original = pl_module, original
        pl_module.training_step = training_step  # type: ignore[method-assign]

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._module is not None and self._original is not None:
            self._module.__dict__.pop("training_step", None)
        self._module, self._original = None, None

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % log_every_n_steps(trainer):
            return
        row = {
            "extra_forward_samples": float(self.extra_forward_samples),
            "extra_forward_seconds": self.extra_forward_seconds,
            "extra_forward_ratio": self.extra_forward_samples / max(self.trained_samples, 1),
            **self._last,
        }
        log_metrics(trainer, self.history, {self.prefix + k: v for k, v in row.items()})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "extra_forward_samples": self.extra_forward_samples,
            "trained_samples": self.trained_samples,
            "extra_forward_seconds": self.extra_forward_seconds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.extra_forward_samples = int(state_dict["extra_forward_samples"])
        self.trained_samples = int(state_dict["trained_samples"])
        self.extra_forward_seconds = float(state_dict["extra_forward_seconds"])
