"""Curriculum, anti-curriculum and random ordering of each replica's own partition, with pacing."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from lightning_fedopt._validate import (
    check_bool,
    check_choice,
    check_finite_values,
    check_int,
    check_seed,
    check_str,
)
from lightning_fedopt.callbacks._scoring import (
    ScoreFn,
    batch_size_of,
    check_scores,
    log_every_n_steps,
    log_metrics,
    resolve_score_fn,
)
from lightning_fedopt.data.pacing import ORDERINGS, Pacing, order_by_scores
from lightning_fedopt.data.sampler import PartitionDataLoader, PartitionSampler, _mix

__all__ = ["Curriculum", "find_partition_sampler"]

log = logging.getLogger("lightning_fedopt")

_SCORE_BY = ("local", "consensus", "reference", "given")


def find_partition_sampler(trainer: Trainer) -> tuple[PartitionDataLoader, PartitionSampler]:
    """The training loader that samples with a :class:`~lightning_fedopt.data.PartitionSampler`."""
    loaders: Any = trainer.train_dataloader
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, Sequence):
        loaders = [loaders]
    for loader in loaders:
        if isinstance(loader, PartitionDataLoader):
            return loader, loader.partition_sampler
    raise ValueError(
        "this callback orders each replica's partition, so the training DataLoader must be a "
        "lightning_fedopt.data.PartitionDataLoader: return `lightning_fedopt.data.partition_dataloader(dataset, "
        "partitioner, trainer=self.trainer, batch_size=...)` from `train_dataloader` "
        "(partitioner `IID()` for IID data)"
    )


class Curriculum(Callback):
    """Order every replica's own partition by per-sample difficulty and pace what it may see.

    Each replica scores the samples of its partition, orders them (``"curriculum"``: lowest score
    first; ``"anti"``: highest first; ``"random"``), and from then on draws each training batch
    uniformly from the first ``g(t)`` samples of that ordering, where ``g`` is the pacing function
    (:class:`~lightning_fedopt.data.Pacing`: ``linear``, ``quad``, ``root``, ``step``, ``exp``,
    ``log`` with parameters ``a``, ``b``) and ``t`` counts training batches out of the run's total
    (Wu et al., "When Do Curricula Work?", ICLR 2021; Vahidian et al., "When Do Curricula Work in
    Federated Learning?", ICCV 2023).

    Difficulty (``score_by``):

    * ``"local"``: the score under the replica's current model;
    * ``"consensus"``: under the consensus/global model (the strategy's consensus: DiLoCo's global
      weights, the average for Local SGD — one collective, all ranks score together);
    * ``"reference"``: under a fixed ``reference`` model (an "expert");
    * ``"given"``: ``scores`` the user supplies, one per sample of the data set.

    The score of a batch is ``score_fn(model, batch)``, default the module's ``score_samples(batch)``
    if it defines one, else the per-sample cross-entropy of ``(x, y)`` batches; it must return one
    value per sample. Scoring runs in eval mode without gradients on the replica's own partition,
    shows a progress bar on rank 0, and its cost is logged (``curriculum/score_seconds``,
    ``curriculum/score_samples``) together with the visible fraction. With ``rescore_every=k`` the
    replica re-scores at the start of every ``k``-th epoch.

    The training loader must be a :class:`~lightning_fedopt.data.PartitionDataLoader` (build it with
    :func:`~lightning_fedopt.data.partition_dataloader`). Scoring runs when the loader starts an
    epoch, before its first batch is drawn — on every rank at the same point, also when a resumed
    run enters an epoch mid-way. Each replica's scores, ordering and counters are checkpointed in
    its own replica shard (under a :class:`~lightning_fedopt.strategies.ReplicaStrategy`;
    ``per_replica_state``), and the loader's position in the checkpoint's loop state, so a resumed
    run continues with the same batches. Resuming, the ranks agree whether the saved state fits
    every one of them (same rank, world size and partition); if not, all of them re-score.

    Args:
        score_by: ``"local"``, ``"consensus"``, ``"reference"`` or ``"given"``.
        ordering: ``"curriculum"``, ``"anti"`` or ``"random"``.
        pacing: pacing function name, or a :class:`~lightning_fedopt.data.Pacing`.
        a: fraction of training after which all data is visible (> 0).
        b: fraction visible at the start, in (0, 1].
        rescore_every: re-score every this many epochs (>= 1); None: score once, at the start of fit.
        scores: per-sample scores for ``score_by="given"`` (length of the training data set).
        reference: the fixed model for ``score_by="reference"``.
        score_fn: ``score_fn(model, batch) -> Tensor[batch_size]``.
        total_steps: training batches the pacing spans (default: the Trainer's estimate).
        batch_size: batch size of the scoring pass.
        seed: seed of the ``"random"`` ordering.
        progress_bar: show a progress bar while scoring (rank 0, when the Trainer has one).
        prefix: metric name prefix.

    Raises:
        ValueError: for unknown names, parameters out of range, a missing ``scores``/``reference``,
            or a score function that returns the wrong shape.

    Example:
        >>> import lightning_fedopt as lf
        >>> cb = lf.callbacks.Curriculum(score_by="consensus", ordering="curriculum", pacing="root", a=0.5, b=0.1)
        >>> cb.pacing
        Pacing('root', a=0.5, b=0.1)
    """

    #: the state differs between replicas: a ReplicaStrategy keeps each rank's copy in its shard
    per_replica_state = True

    def __init__(
        self,
        score_by: str = "local",
        ordering: str = "curriculum",
        pacing: str | Pacing = "linear",
        a: float = 0.8,
        b: float = 0.2,
        *,
        rescore_every: int | None = None,
        scores: Any = None,
        reference: nn.Module | None = None,
        score_fn: ScoreFn | None = None,
        total_steps: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
        progress_bar: bool = True,
        prefix: str = "curriculum/",
    ) -> None:
        check_choice("score_by", score_by, _SCORE_BY)
        check_choice("ordering", ordering, ORDERINGS)
        self.pacing = pacing if isinstance(pacing, Pacing) else Pacing(pacing, a=a, b=b)
        rescore_every = check_int("rescore_every", rescore_every, low=1, allow_none=True)
        if score_by == "given":
            if scores is None:
                raise ValueError(
                    "`score_by='given'` needs `scores` (pass scores=, one score per training sample)"
                )
            scores = check_finite_values("scores", scores)
            if rescore_every is not None:
                raise ValueError(
                    "`rescore_every` has no meaning with `score_by='given'` (the scores are fixed)"
                )
        elif scores is not None:
            raise ValueError(f"`scores` is only used with `score_by='given'`, not {score_by!r}")
        if score_by == "reference" and not isinstance(reference, nn.Module):
            raise ValueError("`score_by='reference'` needs `reference=` (a torch.nn.Module)")
        self.score_by, self.ordering = score_by, ordering
        self.rescore_every = rescore_every
        self.given_scores: Tensor | None = scores
        self.reference = reference
        self.score_fn = score_fn
        self.total_steps = check_int("total_steps", total_steps, low=1, allow_none=True)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.seed = check_seed("seed", seed)
        self.progress_bar = check_bool("progress_bar", progress_bar)
        self.prefix = check_str("prefix", prefix)
        self.history: list[dict[str, float]] = []
        self._reset()

    def _reset(self) -> None:
        self.scores: Tensor | None = None  # this replica's scores, by position in its part
        self.order: Tensor | None = None
        self.scored_epoch: int | None = None
        self.prepared_epoch: int | None = None
        self.n_scorings = 0
        self.score_seconds = 0.0
        self.score_samples = 0
        self._restored: dict[str, Any] | None = None
        self._sampler: PartitionSampler | None = None
        self._loader: PartitionDataLoader | None = None
        self._total_batches = 0
        self._batches_per_epoch = 0
        self._fp: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            score_by=self.score_by, ordering=self.ordering, pacing=repr(self.pacing)
        )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            restored = self._restored
            self._reset()
            self._restored = restored

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # restored state is for the fit it was restored for (not for a later fresh fit)
        self._restored = None
        if self._loader is not None:
            self._loader.epoch_hook = None
        if self._sampler is not None:
            self._sampler.set_curriculum(None, None, 0)  # the loader is plain again outside this fit

    def _attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader, sampler = find_partition_sampler(trainer)
        if loader is self._loader:
            return
        reloaded = self._loader is not None
        if self._loader is not None:  # i.e. reloaded
            self._loader.epoch_hook = None
        self._loader, self._sampler = loader, sampler
        self._fp = self._fingerprint(trainer)
        loader.attach(trainer)
        # the epoch's scoring runs when the loader starts the epoch: on every rank at the same point,
        # whether the epoch starts afresh or a resumed run enters it mid-way
        loader.epoch_hook = lambda epoch: self._prepare_epoch(trainer, pl_module, epoch)
        per_epoch = trainer.num_training_batches
        self._batches_per_epoch = int(per_epoch) if np.isfinite(per_epoch) else sampler.num_batches
        if reloaded:  # new data (every rank reloads at the same epoch): every replica re-scores
            self.order, self.scored_epoch, self.prepared_epoch = None, None, None

    def _fingerprint(self, trainer: Trainer) -> dict[str, Any]:
        sampler = self._sampler
        assert sampler is not None
        part = sampler.part
        digest = int(torch.sum(part * (torch.arange(len(part)) % 9973 + 1)).item()) if len(part) else 0
        return {"rank": trainer.global_rank, "world_size": trainer.world_size, "part": (len(part), digest)}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._loader = self._sampler = None
        self._attach(trainer, pl_module)
        assert self._sampler is not None
        if self.given_scores is not None and len(self.given_scores) != len(self._sampler.dataset):
            raise ValueError(
                f"`scores` has {len(self.given_scores)} entries, the training data set {len(self._sampler.dataset)}"
            )
        if self.total_steps is not None:
            self._total_batches = self.total_steps
        else:
            est = trainer.estimated_stepping_batches
            if not np.isfinite(est):
                raise ValueError("the pacing needs a finite run: set max_steps/max_epochs or `total_steps=`")
            self._total_batches = int(est) * trainer.accumulate_grad_batches
        state, self._restored = self._restored, None
        if trainer.ckpt_path is None:
            return
        # every rank agrees whether the checkpoint's state fits all of them (else all re-score: the
        # consensus scoring is a collective, so no rank may do it alone)
        fits = state is not None and state.get("fingerprint") == self._fp
        fits_everywhere = trainer.strategy.reduce_boolean_decision(fits, all=True)
        if fits_everywhere and state is not None:
            self.scores, self.order = state["scores"], state["order"]
            self.scored_epoch, self.prepared_epoch = state["scored_epoch"], state["prepared_epoch"]
            self.n_scorings = state["n_scorings"]
            self.score_seconds, self.score_samples = state["score_seconds"], state["score_samples"]
            self._apply()
        elif state is not None:
            log.warning(
                "lightning_fedopt: the Curriculum state in the checkpoint does not fit every replica (written "
                "by another rank or world size, or for another partition; per-rank state needs a "
                "ReplicaStrategy): every replica re-scores its partition"
            )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(trainer, pl_module)  # a reloaded loader (reload_dataloaders_every_n_epochs)

    def _prepare_epoch(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """Score (when due) and hand the order to the sampler before epoch ``epoch`` draws a batch."""
        if self.prepared_epoch == epoch:
            return
        due = self.scored_epoch is None or (
            self.rescore_every is not None and epoch - self.scored_epoch >= self.rescore_every
        )
        if due:
            self.rescore(trainer, pl_module)
            self.scored_epoch = epoch
        self.prepared_epoch = epoch

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sampler = self._sampler
        if sampler is None or not trainer.loggers or trainer.global_step % log_every_n_steps(trainer):
            return
        t = sampler.step_of(trainer.current_epoch, batch_idx)
        self._log(trainer, {"visible_fraction": sampler.visible(t) / len(sampler.part)})

    # ------------------------------------------------------------------ scoring
    def _scoring_model(self, pl_module: LightningModule) -> nn.Module:
        if self.score_by == "reference":
            assert self.reference is not None
            return self.reference.to(pl_module.device)
        return pl_module

    @torch.no_grad()
    def compute_scores(self, trainer: Trainer, pl_module: LightningModule) -> Tensor:
        """Scores of this replica's partition (by position in the part) under ``score_by``."""
        sampler, loader = self._sampler, self._loader
        assert sampler is not None and loader is not None
        if self.given_scores is not None:
            return self.given_scores[sampler.part].clone()
        model = self._scoring_model(pl_module)
        score_fn = resolve_score_fn(self.score_fn, model)
        data = DataLoader(
            Subset(loader.dataset, sampler.part.tolist()),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )
        batches: Any = data
        if self.progress_bar and trainer.is_global_zero and trainer.progress_bar_callback is not None:
            from tqdm.auto import tqdm

            batches = tqdm(data, desc=f"Curriculum: scoring {len(sampler.part)} samples", leave=False)
        was_training = model.training
        model.eval()
        out = []
        try:
            with trainer.strategy.precision_plugin.forward_context():
                for batch in batches:
                    batch = trainer.strategy.batch_to_device(batch)
                    n = batch_size_of(batch)
                    out.append(check_scores(score_fn(model, batch), n, "the curriculum's score function"))
        finally:
            model.train(was_training)
        return torch.cat(out)

    def rescore(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score this replica's partition, order it and hand the ordering to its sampler."""
        start = time.perf_counter()
        strategy: Any = trainer.strategy
        if self.score_by == "consensus" and hasattr(strategy, "consensus_swapped"):
            with strategy.consensus_swapped():
                scores = self.compute_scores(trainer, pl_module)
        else:
            scores = self.compute_scores(trainer, pl_module)
        seconds = time.perf_counter() - start
        assert self._sampler is not None
        gen = torch.Generator().manual_seed(_mix(self.seed, self._sampler.rank, self.n_scorings, 7))
        self.scores = scores
        self.order = order_by_scores(scores, self.ordering, generator=gen)
        self.n_scorings += 1
        counted = 0 if self.given_scores is not None else len(scores)
        self.score_seconds += seconds
        self.score_samples += counted
        self._apply()
        self._log(
            trainer,
            {
                "score_seconds": self.score_seconds,
                "score_samples": float(self.score_samples),
                "scorings": float(self.n_scorings),
            },
        )

    def _apply(self) -> None:
        assert self._sampler is not None
        self._sampler.set_curriculum(self.order, self.pacing, self._total_batches, self._batches_per_epoch)

    def _log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        log_metrics(trainer, self.history, {self.prefix + k: float(v) for k, v in metrics.items()})

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self._fp,
            "scores": self.scores,
            "order": self.order,
            "scored_epoch": self.scored_epoch,
            "prepared_epoch": self.prepared_epoch,
            "n_scorings": self.n_scorings,
            "score_seconds": self.score_seconds,
            "score_samples": self.score_samples,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict.get("order") is not None else None
