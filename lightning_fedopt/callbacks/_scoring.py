"""Per-sample scores for data-order callbacks: the score function, batch splitting, shape checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = [
    "ScoreFn",
    "batch_size_of",
    "check_scores",
    "cross_entropy_scores",
    "log_every_n_steps",
    "resolve_score_fn",
    "slice_batch",
]

#: ``score_fn(model, batch) -> Tensor`` of shape ``[batch_size]``: a difficulty per sample
ScoreFn = Callable[[nn.Module, Any], Tensor]


def cross_entropy_scores(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample cross-entropy of ``model(x)`` against ``y`` for an ``(x, y)`` batch.

    The default difficulty score when the module has no ``score_samples(batch)`` method.
    """
    if not (isinstance(batch, Sequence) and len(batch) == 2 and isinstance(batch[1], Tensor)):
        raise ValueError(
            "the default score (per-sample cross-entropy) needs (input, target) batches; define "
            "`score_samples(self, batch) -> Tensor[batch_size]` on the LightningModule or pass `score_fn=`"
        )
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def resolve_score_fn(score_fn: ScoreFn | None, model: nn.Module) -> ScoreFn:
    """``score_fn``, else the model's ``score_samples(batch)``, else :func:`cross_entropy_scores`."""
    if score_fn is not None:
        return score_fn
    if callable(getattr(model, "score_samples", None)):
        return lambda m, batch: cast("Callable[[Any], Tensor]", m.score_samples)(batch)
    return cross_entropy_scores


def batch_size_of(batch: Any) -> int:
    """The number of samples in a batch (the first dimension of its first tensor)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for v in batch.values():
            return batch_size_of(v)
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        for v in batch:
            return batch_size_of(v)
    raise ValueError(f"cannot tell the batch size of a {type(batch).__name__} batch")


def slice_batch(batch: Any, index: Tensor) -> Any:
    """The samples ``index`` of a batch (tensors, and tuples/lists/dicts of them)."""
    if isinstance(batch, Tensor):
        return batch[index.to(batch.device)]
    if isinstance(batch, Mapping):
        return cast("Callable[[dict[Any, Any]], Any]", type(batch))(
            {k: slice_batch(v, index) for k, v in batch.items()}
        )
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(v, index) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, index) for v in batch)
    return batch


def check_scores(scores: Any, n: int, where: str) -> Tensor:
    """``scores`` as a float tensor of shape ``[n]``, or a clear error naming ``where`` they came from."""
    if not isinstance(scores, Tensor):
        raise ValueError(f"{where} must return a Tensor of shape ({n},), got {type(scores).__name__}")
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (n,):
        raise ValueError(
            f"{where} returned scores of shape {tuple(scores.shape)} for a batch of {n} samples; "
            f"it must return one score per sample, shape ({n},)"
        )
    return scores.detach().to(dtype=torch.float64, device="cpu")


def log_metrics(trainer: Any, history: list[dict[str, float]], row: dict[str, float]) -> None:
    """Append ``row`` (with the step) to ``history`` on every rank; log it to every logger from rank 0."""
    history.append({"step": float(trainer.global_step), **row})
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)


class _LoggingTrainer(Protocol):
    log_every_n_steps: int


def log_every_n_steps(trainer: Trainer) -> int:
    """``trainer.log_every_n_steps``, typed.

    Lightning sets it on the instance in ``Trainer.__init__`` (through its logger connector), so the
    ``Trainer`` class does not declare it and type checkers do not see it. Plain attribute access:
    the value (``0`` under ``barebones=True``) and any error are exactly the trainer's.
    """
    return cast(_LoggingTrainer, trainer).log_every_n_steps
