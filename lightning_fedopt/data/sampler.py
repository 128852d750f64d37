"""A replica's sampler and resumable loader: its own partition, equal-length epochs, curricula.

:class:`PartitionSampler` is a :class:`torch.utils.data.DistributedSampler` (so Lightning, which
injects its own ``DistributedSampler`` only into loaders that do not have one, leaves it in place
even with ``use_distributed_sampler=True``) that draws rank ``r``'s samples from part ``r`` of a
:class:`~lightning_fedopt.data.partition.Partition`:

* every replica's epoch has the same number of batches (``epoch_length="equal"``: the data set's
  size over the number of replicas), because the replicas meet at the same steps; a replica whose
  part is smaller cycles through it (re-shuffled on every pass), a larger one sees a different
  subset every epoch;
* the batch ``b`` of epoch ``e`` is a pure function of ``(seed, rank, e, b)`` and, under a
  curriculum, of the ordering and the pacing function, so a resumed run draws exactly the batches
  the uninterrupted one draws;
* under a curriculum (set by :class:`~lightning_fedopt.callbacks.Curriculum`), batch ``b`` at
  training batch ``t`` is drawn uniformly without replacement from the first ``g(t)`` samples of
  the replica's ordering (Wu et al., "When Do Curricula Work?", ICLR 2021).

:class:`PartitionDataLoader` is a :class:`~torch.utils.data.DataLoader` with Lightning's
``state_dict``/``load_state_dict`` interface: Lightning stores the loader's position (epoch and
batches consumed) in the checkpoint and hands it back on resume, so a run resumed from the middle
of an epoch continues with the batch it would have drawn next. :func:`partition_dataloader` builds
one from a data set and a partitioner, inside ``train_dataloader``::

    def train_dataloader(self):
        return lf.data.partition_dataloader(
            self.train_set, lf.data.Dirichlet(alpha=0.1), trainer=self.trainer, batch_size=32
        )
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sized
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_choice, check_int, check_seed
from lightning_fedopt.data.pacing import Pacing
from lightning_fedopt.data.partition import Partition, Partitioner, as_labels, get_partitioner

__all__ = ["PartitionDataLoader", "PartitionSampler", "infer_labels", "partition_dataloader"]

log = logging.getLogger("lightning_fedopt")


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (deterministic, the same in every process)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def infer_labels(dataset: Any) -> np.ndarray:
    """The integer class label of every sample of ``dataset``.

    Reads ``TensorDataset.tensors[1]``, a ``targets`` or ``labels`` attribute (torchvision style),
    looks through ``Subset``, and otherwise reads ``dataset[i][1]`` for every ``i``.
    """
    if isinstance(dataset, Subset):
        return infer_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return as_labels(dataset.tensors[1])
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return as_labels(getattr(dataset, attr))
    try:
        return as_labels([int(dataset[i][1]) for i in range(len(dataset))])
    except (TypeError, IndexError, ValueError) as err:
        raise ValueError(
            "could not read the samples' labels from the data set (no `targets`/`labels` attribute, and "
            "samples are not (input, label) pairs); pass `labels=` explicitly"
        ) from err


class PartitionSampler(DistributedSampler):
    """Rank ``rank``'s sampler over its part of ``partition``; every epoch ``len(self)`` samples.

    Args:
        dataset: the data set the partition indexes.
        partition: a :class:`~lightning_fedopt.data.partition.Partition` of ``dataset``.
        rank: this replica's index in the partition (the global rank).
        batch_size: the loader's batch size: epochs are whole batches, and curricula draw by batch.
        shuffle: shuffle the part every pass (without a curriculum); False: the part in index order.
        seed: seed of the shuffles and curriculum draws.
        epoch_length: ``"equal"`` (default: ``len(dataset) // num_replicas`` samples for every
            replica, so all take the same number of steps), ``"own"`` (the part's own size; only for
            runs where replicas do not meet, e.g. one process) or a number of samples.

    Raises:
        ValueError: for a rank outside the partition, a batch size < 1, an epoch shorter than one
            batch, or a partition that does not match the data set.

    Example:
        >>> from lightning_fedopt.data import IID
        >>> data = list(range(20))
        >>> s = PartitionSampler(data, IID(seed=0).split(20, 2), rank=1, batch_size=4)
        >>> len(s), set(s) <= set(IID(seed=0).split(20, 2)[1].tolist())
        (8, True)
    """

    def __init__(
        self,
        dataset: Dataset | Any,
        partition: Partition,
        rank: int,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epoch_length: str | int = "equal",
    ) -> None:
        if not isinstance(partition, Partition):
            raise ValueError(f"`partition` must be a Partition, got {type(partition).__name__}")
        sized = cast(Sized, dataset)  # typing only: a data set without `len` fails here as before
        if partition.num_samples != len(sized):
            raise ValueError(
                f"the partition covers {partition.num_samples} samples, the data set has {len(sized)}"
            )
        rank = check_int("rank", rank, low=0, high=partition.num_replicas - 1)
        batch_size = check_int("batch_size", batch_size, low=1)
        shuffle = check_bool("shuffle", shuffle)
        seed = check_seed("seed", seed)
        try:
            if isinstance(epoch_length, str):
                check_choice("epoch_length", epoch_length, ("equal", "own"))
            else:
                epoch_length = check_int("epoch_length", epoch_length, low=1)
        except ValueError:
            raise ValueError(
                f"`epoch_length` must be 'equal', 'own' or an integer >= 1, got {epoch_length!r}"
            ) from None
        super().__init__(
            dataset,
            num_replicas=partition.num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.partition = partition
        self.part = torch.as_tensor(partition[rank], dtype=torch.int64)
        self.batch_size = batch_size
        if epoch_length == "equal":
            samples = len(sized) // partition.num_replicas
        elif epoch_length == "own":
            if partition.num_replicas > 1:
                raise ValueError(
                    "`epoch_length='own'` gives the replicas epochs of different lengths, but they must take "
                    "the same number of steps: use 'equal' (or a number of samples) with more than one replica"
                )
            samples = len(self.part)
        else:
            assert isinstance(epoch_length, int)  # check_int above returned an int
            samples = epoch_length
        self.num_batches = samples // batch_size
        if self.num_batches < 1:
            raise ValueError(
                f"an epoch of {samples} samples holds no full batch of {batch_size}; lower `batch_size` "
                f"or raise `epoch_length`"
            )
        self.num_samples = self.total_size = self.num_batches * batch_size
        self._order: torch.Tensor | None = None  # curriculum: positions in `part`, first = first visible
        self._pacing: Pacing | None = None
        self._total_batches = 0
        self._batches_per_epoch = self.num_batches
        self._resume: tuple[int, int] | None = None
        self._stream: tuple[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ curriculum
    def set_curriculum(
        self,
        order: torch.Tensor | None,
        pacing: Pacing | None,
        total_batches: int,
        batches_per_epoch: int | None = None,
    ) -> None:
        """Draw batches from the first ``pacing.visible(t)`` samples of ``order`` (positions in the
        part, easiest first for a curriculum); ``order=None`` returns to plain shuffling.

        ``t = epoch * batches_per_epoch + b`` counts training batches out of ``total_batches``;
        ``batches_per_epoch`` is the number the Trainer really takes per epoch (fewer than the
        sampler's with ``limit_train_batches``), default the sampler's own.
        """
        if order is not None:
            order = torch.as_tensor(order, dtype=torch.int64)
            if sorted(order.tolist()) != list(range(len(self.part))):
                raise ValueError(f"`order` must be a permutation of the part's {len(self.part)} positions")
            if pacing is None:
                raise ValueError("a curriculum order needs a pacing function")
        self._order, self._pacing, self._total_batches = order, pacing, int(total_batches)
        self._batches_per_epoch = int(batches_per_epoch) if batches_per_epoch else self.num_batches

    @property
    def curriculum(self) -> bool:
        """Whether a curriculum ordering is in force."""
        return self._order is not None

    def visible(self, t: int) -> int:
        """How many samples of the ordering are visible at training batch ``t`` (the whole part
        without a curriculum)."""
        if self._order is None or self._pacing is None:
            return len(self.part)
        return self._pacing.visible(t, self._total_batches, len(self.part), floor=self.batch_size)

    # ------------------------------------------------------------------ batches
    def _epoch_stream(self, epoch: int) -> torch.Tensor:
        if self._stream is not None and self._stream[0] == epoch:
            return self._stream[1]
        n, need = len(self.part), self.total_size
        passes = []
        for p in range(math.ceil(need / n)):
            if self.shuffle:
                g = torch.Generator().manual_seed(_mix(self.seed, self.rank, epoch, p))
                passes.append(torch.randperm(n, generator=g))
            else:
                passes.append(torch.arange(n))
        stream = torch.cat(passes)[:need]
        self._stream = (epoch, stream)
        return stream

    def batch_positions(self, epoch: int, b: int) -> torch.Tensor:
        """Positions in the part of batch ``b`` of epoch ``epoch`` (a pure function of its inputs)."""
        if self._order is None:
            return self._epoch_stream(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
        v = self.visible(self.step_of(epoch, b))
        g = torch.Generator().manual_seed(_mix(self.seed, self.rank, epoch, b, 1))
        if v >= self.batch_size:
            pick = torch.randperm(v, generator=g)[: self.batch_size]
        else:  # a part smaller than one batch
            pick = torch.randint(v, (self.batch_size,), generator=g)
        return self._order[pick]

    def step_of(self, epoch: int, b: int) -> int:
        """The training batch ``t`` of batch ``b`` of epoch ``epoch`` (the pacing's clock)."""
        return epoch * self._batches_per_epoch + b

    def batch_indices(self, epoch: int, b: int) -> torch.Tensor:
        """Data-set indices of batch ``b`` of epoch ``epoch``."""
        return self.part[self.batch_positions(epoch, b)]

    def resume(self, epoch: int, batches_done: int) -> None:
        """Start the next iteration at batch ``batches_done`` of epoch ``epoch`` (then from 0)."""
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(batches_done))

    @property
    def pending_resume(self) -> tuple[int, int] | None:
        """``(epoch, batches done)`` of a :meth:`resume` the next iteration will start from, if any."""
        return self._resume

    def _start_batch(self) -> int:
        if self._resume is None:
            return 0
        epoch, done = self._resume
        self._resume = None
        return done if epoch == self.epoch else 0

    @override
    def __iter__(self) -> Iterator[int]:
        start = self._start_batch()
        epoch = self.epoch
        for b in range(start, self.num_batches):
            yield from self.batch_indices(epoch, b).tolist()

    @override
    def __len__(self) -> int:
        return self.num_samples

    def label_histogram(self, labels: Any, num_classes: int | None = None) -> np.ndarray:
        """This replica's label counts (its whole part)."""
        y = as_labels(labels)
        c = int(y.max()) + 1 if num_classes is None else int(num_classes)
        return np.bincount(y[self.part.numpy()], minlength=c)


class PartitionDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` over a :class:`PartitionSampler` that Lightning can
    checkpoint: ``state_dict()`` is the epoch and the number of batches handed out in it, and
    ``load_state_dict()`` makes the next iteration continue from there.

    Lightning saves the state of rank 0's loader; the position is the same on every rank (the
    replicas step together), and each rank's own order follows from its rank and seed (and, under
    a curriculum, from the :class:`~lightning_fedopt.callbacks.Curriculum` state in its replica
    shard).

    With a Trainer attached (:func:`partition_dataloader` with ``trainer=``, or :meth:`attach`),
    each iteration draws the epoch ``trainer.current_epoch`` (Lightning's own ``set_epoch`` value
    runs one ahead after some resumes), and ``epoch_hook(epoch)`` — set by the
    :class:`~lightning_fedopt.callbacks.Curriculum` — runs before the epoch's first batch is drawn,
    on every rank at the same point, whether the epoch starts afresh or resumes.
    """

    def __init__(self, dataset: Dataset | Any, *, sampler: PartitionSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, PartitionSampler):
            raise ValueError(
                f"`sampler` must be a PartitionSampler, got {type(sampler).__name__} (Lightning replaces the "
                "sampler with a SequentialSampler under `overfit_batches`, which a partition loader does not support)"
            )
        kwargs.setdefault("batch_size", sampler.batch_size)
        if kwargs["batch_size"] != sampler.batch_size:
            raise ValueError(
                f"`batch_size` ({kwargs['batch_size']}) differs from the sampler's ({sampler.batch_size})"
            )
        kwargs["drop_last"] = True
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._yielded = 0
        self._iter_epoch = 0
        self._trainer_ref: Callable[[], Any] | None = None
        #: called with the epoch before the epoch's first batch is drawn (the Curriculum's hook)
        self.epoch_hook: Callable[[int], None] | None = None

    def attach(self, trainer: Any) -> None:
        """Draw the Trainer's ``current_epoch`` at every iteration (kept as a weak reference)."""
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None

    @property
    def partition_sampler(self) -> PartitionSampler:
        assert isinstance(self.sampler, PartitionSampler)
        return self.sampler

    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.partition_sampler
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
        if self.epoch_hook is not None:
            self.epoch_hook(sampler.epoch)
        resume = sampler.pending_resume
        self._iter_epoch = sampler.epoch
        self._yielded = resume[1] if resume is not None and resume[0] == sampler.epoch else 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The position: epoch and batches handed out in it."""
        return {"epoch": int(self._iter_epoch), "batches": int(self._yielded)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` at the next iteration."""
        self.partition_sampler.resume(state["epoch"], state["batches"])
        self._iter_epoch, self._yielded = int(state["epoch"]), int(state["batches"])


def partition_dataloader(
    dataset: Dataset | Any,
    partition: Partition | Partitioner | str,
    *,
    batch_size: int,
    trainer: Any = None,
    rank: int | None = None,
    num_replicas: int | None = None,
    labels: Any = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch_length: str | int = "equal",
    **loader_kwargs: Any,
) -> PartitionDataLoader:
    """A resumable loader over this rank's part of ``dataset``.

    Args:
        dataset: the (training) data set.
        partition: a :class:`Partition`, a partitioner (``Dirichlet(alpha=0.1)``, ``Shards(2)``, ...)
            or a partitioner name (``"iid"``).
        batch_size: per-replica batch size.
        trainer: take ``rank`` and ``num_replicas`` from it (``global_rank``, ``world_size``).
        rank, num_replicas: explicitly (default 0 and 1, or the trainer's).
        labels: the samples' class labels for label-skew partitioners (default: read from ``dataset``).
            Rank 0 logs every replica's label histogram (``logging`` at INFO, logger
            ``"lightning_fedopt"``).
        shuffle, seed, epoch_length: see :class:`PartitionSampler`.
        **loader_kwargs: passed to the :class:`~torch.utils.data.DataLoader` (``num_workers``, ...).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_fedopt.data import Dirichlet
        >>> data = TensorDataset(torch.randn(100, 3), torch.arange(100) % 4)
        >>> loader = partition_dataloader(data, Dirichlet(alpha=0.5, min_size=5), batch_size=8,
        ...                               rank=0, num_replicas=2)
        >>> len(loader)
        6
    """
    if trainer is not None:
        rank = trainer.global_rank if rank is None else rank
        num_replicas = trainer.world_size if num_replicas is None else num_replicas
    rank = check_int("rank", 0 if rank is None else rank, low=0)
    num_replicas = check_int("num_replicas", 1 if num_replicas is None else num_replicas, low=1)
    if isinstance(partition, (Partitioner, str)):
        partitioner = get_partitioner(partition)
        source: np.ndarray | int
        if partitioner.needs_labels:
            source = infer_labels(dataset) if labels is None else as_labels(labels)
        else:
            source = len(cast(Sized, dataset))
        partition = partitioner.split(source, num_replicas)
        if rank == 0 and num_replicas > 1 and partitioner.needs_labels:
            log.info(
                "lightning_fedopt: %r over %d replicas:\n%s",
                partitioner,
                num_replicas,
                partition.report(source),
            )
    elif not isinstance(partition, Partition):
        raise ValueError(f"`partition` must be a Partition, a Partitioner or a name, got {partition!r}")
    if partition.num_replicas != num_replicas:
        raise ValueError(
            f"the partition has {partition.num_replicas} parts, but there are {num_replicas} replicas"
        )
    sampler = PartitionSampler(
        dataset, partition, rank, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch_length=epoch_length
    )
    loader = PartitionDataLoader(dataset, sampler=sampler, **loader_kwargs)
    loader.attach(trainer)
    return loader
