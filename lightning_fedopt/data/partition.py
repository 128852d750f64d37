"""Partitions of a data set across replicas: IID, Dirichlet label skew, shards, quantity skew.

A partitioner is a small object with one method, ``split(labels_or_size, num_replicas)``, that
returns a :class:`Partition`: one sorted index array per replica, together covering every sample
exactly once. Splits are deterministic functions of the partitioner's ``seed`` (NumPy's
``default_rng``), so every rank computes the same partition without communicating.

* :class:`IID` — a random permutation cut into near-equal parts.
* :class:`Dirichlet` — label skew (Hsu et al., "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", 2019): for every class, the proportions of
  its samples that go to each replica are drawn from ``Dirichlet(alpha)``; small ``alpha`` gives
  each replica few classes, large ``alpha`` approaches IID. Resampled until every part has at
  least ``min_size`` samples.
* :class:`Shards` — the pathological split of McMahan et al. (2017): samples sorted by label, cut
  into ``num_replicas * shards_per_replica`` shards, each replica gets ``shards_per_replica``.
* :class:`QuantitySkew` — IID labels, unequal sizes: the part sizes are proportional to a
  ``Dirichlet(beta)`` draw (at least ``min_size`` each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from typing_extensions import override

from lightning_fedopt._validate import check_choice, check_float, check_int, check_seed

__all__ = [
    "IID",
    "Dirichlet",
    "Partition",
    "Partitioner",
    "QuantitySkew",
    "Shards",
    "as_labels",
    "get_partitioner",
]

_MAX_TRIES = 1000


def as_labels(labels: Any) -> np.ndarray:
    """``labels`` (a sequence, NumPy array or tensor of integer class labels) as a 1-D int64 array."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    try:
        arr = np.asarray(labels)
    except (TypeError, ValueError):  # a ragged nesting
        raise ValueError(f"`labels` must be one integer label per sample (1-D), got {labels!r}") from None
    if arr.ndim != 1:
        raise ValueError(f"`labels` must be one integer label per sample (1-D), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        kind_ok = np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_
        if not kind_ok or not np.all(np.isfinite(arr)) or not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError("`labels` must be integer class labels")
        if np.abs(arr).max() >= 2**63:
            raise ValueError("`labels` must be integer class labels that fit int64")
    return arr.astype(np.int64)


def _check_replicas(num_replicas: int, n: int) -> None:
    check_int("num_replicas", num_replicas, low=1)
    if num_replicas > n:
        raise ValueError(
            f"`num_replicas` ({num_replicas}) is larger than the number of samples ({n}): "
            "every replica needs at least one sample"
        )


@dataclass(frozen=True)
class Partition:
    """One index array per replica (sorted, disjoint, covering ``range(num_samples)``).

    Example:
        >>> p = IID(seed=0).split(10, 3)
        >>> [len(part) for part in p.parts]
        [4, 3, 3]
        >>> sorted(int(i) for part in p.parts for i in part) == list(range(10))
        True
    """

    parts: tuple[np.ndarray, ...]
    num_samples: int

    def __post_init__(self) -> None:
        seen = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int64)
        if len(seen) != self.num_samples or not np.array_equal(np.sort(seen), np.arange(self.num_samples)):
            raise ValueError("a partition must assign every sample to exactly one replica")

    @classmethod
    def from_parts(cls, parts: Sequence[Sequence[int]], num_samples: int | None = None) -> Partition:
        """A partition from explicit index lists (validated)."""
        arrays = tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)
        if not arrays or any(len(a) == 0 for a in arrays):
            raise ValueError("every replica's part must hold at least one sample")
        total = sum(len(a) for a in arrays) if num_samples is None else num_samples
        return cls(arrays, int(total))

    @property
    def num_replicas(self) -> int:
        return len(self.parts)

    def __getitem__(self, rank: int) -> np.ndarray:
        return self.parts[rank]

    def sizes(self) -> list[int]:
        """Number of samples of every replica."""
        return [len(p) for p in self.parts]

    def label_histogram(self, labels: Any, num_classes: int | None = None) -> np.ndarray:
        """``[num_replicas, num_classes]`` counts of each label in each replica's part."""
        y = as_labels(labels)
        if len(y) != self.num_samples:
            raise ValueError(f"`labels` has {len(y)} entries, the partition {self.num_samples} samples")
        c = int(y.max()) + 1 if num_classes is None else int(num_classes)
        return np.stack([np.bincount(y[p], minlength=c) for p in self.parts])

    def label_divergence(self, labels: Any, metric: str = "tv") -> float:
        """Mean over replicas of the distance between a replica's label distribution and the whole
        set's: ``"tv"`` total variation in [0, 1], ``"kl"`` KL(replica || whole) in nats.

        0 for a perfectly IID split; grows with label skew (Dirichlet ``alpha`` -> 0).
        """
        check_choice("metric", metric, ("tv", "kl"))
        hist = self.label_histogram(labels).astype(np.float64)
        p = hist / hist.sum(1, keepdims=True)
        q = hist.sum(0) / hist.sum()
        if metric == "tv":
            return float(0.5 * np.abs(p - q).sum(1).mean())
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p / q), 0.0)
        return float(terms.sum(1).mean())

    def report(self, labels: Any) -> str:
        """A text table of every replica's size and label histogram, with the label divergence."""
        hist = self.label_histogram(labels)
        head = "replica  samples  " + " ".join(f"{c:>5d}" for c in range(hist.shape[1]))
        rows = [
            f"{r:>7d}  {int(h.sum()):>7d}  " + " ".join(f"{int(v):>5d}" for v in h)
            for r, h in enumerate(hist)
        ]
        tail = f"label divergence from the whole set: TV {self.label_divergence(labels, 'tv'):.3f}"
        return "\n".join([head, *rows, tail])


class Partitioner:
    """Base class: ``split(labels_or_size, num_replicas) -> Partition``, deterministic by ``seed``."""

    needs_labels = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_seed("seed", seed)

    def split(self, labels: Any, num_replicas: int) -> Partition:
        """Partition the samples described by ``labels`` (or a sample count) over ``num_replicas``."""
        if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool):
            if self.needs_labels:
                raise ValueError(f"{type(self).__name__} needs the samples' labels, not only their number")
            n, y = int(labels), None
        else:
            y = as_labels(labels)
            n = len(y)
        _check_replicas(num_replicas, n)
        parts = self._split(n, y, num_replicas, np.random.default_rng(self.seed))
        return Partition(tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts), n)

    def _split(self, n: int, labels: np.ndarray | None, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class IID(Partitioner):
    """A uniformly random split into near-equal parts.

    Example:
        >>> IID(seed=1).split(7, 2).sizes()
        [4, 3]
    """

    needs_labels = False

    @override
    def _split(self, n: int, labels: np.ndarray | None, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        return np.array_split(rng.permutation(n), k)


class Dirichlet(Partitioner):
    """Dirichlet label skew: per class, the replicas' shares are drawn from ``Dirichlet(alpha)``.

    Args:
        alpha: concentration (> 0); small values give each replica few classes.
        min_size: resample until every part has at least this many samples (>= 1).
        seed: split seed.

    Example:
        >>> y = [0] * 50 + [1] * 50
        >>> p = Dirichlet(alpha=0.1, min_size=5, seed=0).split(y, 2)
        >>> sum(p.sizes()), min(p.sizes()) >= 5
        (100, True)
    """

    def __init__(self, alpha: float, min_size: int = 10, seed: int = 0) -> None:
        super().__init__(seed)
        self.alpha = check_float("alpha", alpha, low=0, low_open=True)
        self.min_size = check_int("min_size", min_size, low=1)

    @override
    def _split(self, n: int, labels: np.ndarray | None, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        assert labels is not None
        if self.min_size * k > n:
            raise ValueError(
                f"`min_size` ({self.min_size}) x `num_replicas` ({k}) is more than the {n} samples"
            )
        classes = np.unique(labels)
        for _ in range(_MAX_TRIES):
            parts: list[list[np.ndarray]] = [[] for _ in range(k)]
            for c in classes:
                idx = rng.permutation(np.flatnonzero(labels == c))
                cuts = (np.cumsum(rng.dirichlet([self.alpha] * k)) * len(idx)).astype(int)[:-1]
                for r, chunk in enumerate(np.split(idx, cuts)):
                    parts[r].append(chunk)
            out = [np.concatenate(p) for p in parts]
            if min(len(p) for p in out) >= self.min_size:
                return out
        raise ValueError(
            f"Dirichlet(alpha={self.alpha}) found no split of {n} samples into {k} parts of >= "
            f"{self.min_size} samples in {_MAX_TRIES} draws; lower `min_size` or raise `alpha`"
        )


class Shards(Partitioner):
    """McMahan et al.'s pathological split: label-sorted shards, ``shards_per_replica`` each.

    Example:
        >>> y = [0] * 10 + [1] * 10 + [2] * 10 + [3] * 10
        >>> p = Shards(shards_per_replica=1, seed=0).split(y, 4)
        >>> [len(set(int(y[i]) for i in part)) for part in p.parts]
        [1, 1, 1, 1]
    """

    def __init__(self, shards_per_replica: int = 2, seed: int = 0) -> None:
        super().__init__(seed)
        self.shards_per_replica = check_int("shards_per_replica", shards_per_replica, low=1)

    @override
    def _split(self, n: int, labels: np.ndarray | None, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        assert labels is not None
        n_shards = k * self.shards_per_replica
        if n_shards > n:
            raise ValueError(
                f"`shards_per_replica` ({self.shards_per_replica}) x `num_replicas` ({k}) shards need at "
                f"least as many samples, got {n}"
            )
        # sort by label, ties broken randomly, so that a shard's samples are a random draw of its labels
        order = np.lexsort((rng.random(n), labels))
        shards = np.array_split(order, n_shards)
        assign = rng.permutation(n_shards).reshape(k, self.shards_per_replica)
        return [np.concatenate([shards[s] for s in row]) for row in assign]


class QuantitySkew(Partitioner):
    """Unequal part sizes, proportional to a ``Dirichlet(beta)`` draw; labels stay IID.

    Args:
        beta: concentration (> 0); small values give very unequal sizes.
        min_size: every part gets at least this many samples (>= 1).
        seed: split seed.

    Example:
        >>> p = QuantitySkew(beta=0.5, min_size=2, seed=0).split(100, 4)
        >>> sum(p.sizes()), min(p.sizes()) >= 2
        (100, True)
    """

    needs_labels = False

    def __init__(self, beta: float = 0.5, min_size: int = 10, seed: int = 0) -> None:
        super().__init__(seed)
        self.beta = check_float("beta", beta, low=0, low_open=True)
        self.min_size = check_int("min_size", min_size, low=1)

    @override
    def _split(self, n: int, labels: np.ndarray | None, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        if self.min_size * k > n:
            raise ValueError(
                f"`min_size` ({self.min_size}) x `num_replicas` ({k}) is more than the {n} samples"
            )
        spare = n - self.min_size * k
        shares = rng.dirichlet([self.beta] * k)
        extra = np.floor(shares * spare).astype(int)
        extra[np.argsort(-(shares * spare - extra))[: spare - int(extra.sum())]] += 1  # largest remainders
        sizes = extra + self.min_size
        return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


_NAMES: dict[str, type[Partitioner]] = {
    "iid": IID,
    "dirichlet": Dirichlet,
    "shards": Shards,
    "quantity": QuantitySkew,
    "quantity_skew": QuantitySkew,
}


def get_partitioner(spec: str | Partitioner, **kwargs: Any) -> Partitioner:
    """A partitioner from a name (``"iid"``, ``"dirichlet"``, ``"shards"``, ``"quantity"``) or as given.

    Example:
        >>> get_partitioner("dirichlet", alpha=0.5)
        Dirichlet(seed=0, alpha=0.5, min_size=10)
    """
    if isinstance(spec, Partitioner):
        if kwargs:
            raise ValueError("keyword arguments are only accepted with a partitioner name")
        return spec
    if not isinstance(spec, str) or spec.lower() not in _NAMES:
        raise ValueError(
            f"`partition` must be a Partitioner or one of {sorted(_NAMES)}, got {spec!r} (unknown partitioner)"
        )
    try:
        return _NAMES[spec.lower()](**kwargs)
    except TypeError as err:
        raise ValueError(
            f"partitioner {spec!r}: {err} (e.g. get_partitioner('dirichlet', alpha=0.1))"
        ) from err
