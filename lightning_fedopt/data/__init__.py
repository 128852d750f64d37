"""Which data each replica sees, and in what order.

* :mod:`~lightning_fedopt.data.partition`: IID, Dirichlet label skew, shards and quantity-skew
  partitions of a data set across replicas, deterministic by seed, with label histograms.
* :mod:`~lightning_fedopt.data.sampler`: :class:`PartitionSampler` (a ``DistributedSampler`` that
  Lightning leaves in place) and the resumable :class:`PartitionDataLoader`;
  :func:`partition_dataloader` builds one inside ``train_dataloader``.
* :mod:`~lightning_fedopt.data.pacing`: curriculum orderings, pacing functions and
  :class:`ReplicaSelection` (pure functions, used by :class:`~lightning_fedopt.callbacks.Curriculum`
  and :class:`~lightning_fedopt.strategies.LocalSGDStrategy`).
"""

from lightning_fedopt.data.pacing import ORDERINGS, PACINGS, Pacing, ReplicaSelection, order_by_scores
from lightning_fedopt.data.partition import (
    IID,
    Dirichlet,
    Partition,
    Partitioner,
    QuantitySkew,
    Shards,
    as_labels,
    get_partitioner,
)
from lightning_fedopt.data.sampler import (
    PartitionDataLoader,
    PartitionSampler,
    infer_labels,
    partition_dataloader,
)

__all__ = [
    "IID",
    "ORDERINGS",
    "PACINGS",
    "Dirichlet",
    "Pacing",
    "Partition",
    "PartitionDataLoader",
    "PartitionSampler",
    "Partitioner",
    "QuantitySkew",
    "ReplicaSelection",
    "Shards",
    "as_labels",
    "get_partitioner",
    "infer_labels",
    "order_by_scores",
    "partition_dataloader",
]
