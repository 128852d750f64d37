"""How contributions merge: merge operators as pure functions of a set of contributions.

A :class:`Contribution` is one replica's model (a list of tensors) at one version, keyed by
``(replica, version)``. Contributions form a :class:`ContributionSet`: adding the same key twice
changes nothing and the union of two sets is commutative, associative and idempotent, as in a
state-based CRDT ("Conflict-Free Replicated Data Types for Neural Network Model Merging"). A
merge is a pure function of the set: contributions are taken in canonical (sorted key) order, so
the result does not depend on the order or grouping in which they arrived, and any randomness
(DARE's drop masks) comes from a generator seeded with a hash of the set's keys.

Operators (``Merge(method, ...)``; formulas as in mergekit's documentation):

=======================  ==========================================================================
``mean``                 weighted mean ``sum_k w_k theta_k / sum_k w_k`` (``weighted``: same)
``slerp``                spherical interpolation of two models (lerp when ``|cos| > 0.9995``), ``t``
``task_arithmetic``      ``base + scale * sum_k w_k (theta_k - base)`` (Ilharco et al., 2023)
``ties``                 trim each delta to its top ``density`` by magnitude, elect the sign of
                         ``sum_k w_k delta_k``, average the agreeing entries (Yadav et al., 2023)
``dare``                 drop delta entries with probability ``1 - density``, rescale survivors by
                         ``1/density``, then task arithmetic (Yu et al., 2024)
``model_stock``          ``t mean_k theta_k + (1 - t) base``, ``t = N cos / (1 + (N-1) cos)`` per
                         tensor, ``cos`` the mean pairwise cosine of the deltas (Jang et al., 2024)
``variance_corrected``   the mean, rescaled per tensor to the mean variance of the inputs (arXiv
                         2404.04616); scalars and BatchNorm running statistics are left as the mean
``median``               coordinate-wise median
``trimmed_mean``         coordinate-wise mean after dropping the ``f`` smallest and ``f`` largest
``nna``                  mean of the ``N - f`` models nearest to a ``reference`` (your own model);
                         MoNNA is NNA with local momentum (Farhadkhani et al., ICML 2023)
``krum``                 the model (``m > 1``: mean of ``m`` models) with the smallest sum of squared
                         distances to its ``N - f - 2`` nearest others (Blanchard et al., 2017)
=======================  ==========================================================================

Weights ``w_k`` are each contribution's ``weight`` (1 by default); the robust operators ignore them.
``task_arithmetic`` and ``dare`` *add* the weighted deltas, as merging different tasks' vectors
needs; to average N replicas' updates instead, give weights that sum to 1 (as
:class:`~lightning_fedopt.strategies.LocalSGDStrategy`'s merged rounds do).
Non-floating tensors (e.g. BatchNorm's ``num_batches_tracked``) are taken from the first contribution.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_fedopt._merge_ops import (
    Context,
    op_dare,
    op_krum,
    op_mean,
    op_median,
    op_model_stock,
    op_nna,
    op_slerp,
    op_task_arithmetic,
    op_ties,
    op_trimmed_mean,
    op_variance_corrected,
)
from lightning_fedopt._validate import check_float, check_int

__all__ = [
    "MERGES",
    "ROBUST",
    "Contribution",
    "ContributionSet",
    "Merge",
    "as_merge",
    "merge",
]

Model = Sequence[Tensor]


@dataclass(frozen=True)
class Contribution:
    """One replica's model at one version.

    Args:
        replica: the replica (rank) that produced it.
        version: its version (e.g. the gossip round or optimizer step).
        tensors: the model's tensors, in a fixed order shared by all contributions.
        weight: its weight in weighted operators (> 0).
    """

    replica: int
    version: int
    tensors: tuple[Tensor, ...] = field(compare=False)
    weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        try:
            check_float("weight", self.weight, low=0, low_open=True)
        except ValueError as e:
            raise ValueError(f"contribution {self.key}: {e}") from None

    @property
    def key(self) -> tuple[int, int]:
        return (int(self.replica), int(self.version))

    def same_content(self, other: Contribution) -> bool:
        return (
            self.weight == other.weight
            and len(self.tensors) == len(other.tensors)
            and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.tensors, other.tensors))
        )


class ContributionSet:
    """A set of contributions keyed by ``(replica, version)``: a grow-only CRDT.

    ``a | b`` is the union. Adding a key that is already present with the same content changes
    nothing (duplicated delivery); the same key with different content is an error.

    Example:
        >>> a = Contribution(0, 1, (torch.tensor([1.0, 3.0]),))
        >>> b = Contribution(1, 1, (torch.tensor([3.0, 5.0]),))
        >>> s = ContributionSet([b]) | ContributionSet([a, a])
        >>> s.keys()
        [(0, 1), (1, 1)]
        >>> Merge("mean")(s)
        [tensor([2., 4.])]
    """

    def __init__(self, contributions: Iterable[Contribution] = ()) -> None:
        self._items: dict[tuple[int, int], Contribution] = {}
        for c in contributions:
            self._add(c)

    def _add(self, c: Contribution) -> None:
        old = self._items.get(c.key)
        if old is None:
            self._items[c.key] = c
        elif old is not c and not old.same_content(c):
            raise ValueError(f"contribution {c.key} delivered twice with different content")

    def add(self, c: Contribution) -> ContributionSet:
        """A new set with ``c`` added."""
        return self | ContributionSet([c])

    def union(self, other: ContributionSet) -> ContributionSet:
        out = ContributionSet()
        out._items = dict(self._items)
        for c in other._items.values():
            out._add(c)
        return out

    __or__ = union

    def keys(self) -> list[tuple[int, int]]:
        """The keys in canonical (sorted) order."""
        return sorted(self._items)

    def __iter__(self) -> Iterator[Contribution]:
        return (self._items[k] for k in self.keys())

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ContributionSet) or self.keys() != other.keys():
            return False
        return all(self._items[k].same_content(other._items[k]) for k in self.keys())

    def __hash__(self) -> int:  # sets are compared by content; the digest identifies the keys
        return self.digest()

    def digest(self) -> int:
        """A 63-bit hash of the canonical keys and weights, the same in every process (seeds DARE)."""
        h = hashlib.sha256()
        for k in self.keys():
            h.update(struct.pack("<qqd", k[0], k[1], self._items[k].weight))
        return int.from_bytes(h.digest()[:8], "little") >> 1

    def __repr__(self) -> str:
        return f"ContributionSet({self.keys()})"


#: name -> (operator, allowed parameters)
MERGES: dict[str, tuple[Callable[..., list[Tensor]], tuple[str, ...]]] = {
    "mean": (op_mean, ()),
    "weighted": (op_mean, ()),
    "slerp": (op_slerp, ("t",)),
    "task_arithmetic": (op_task_arithmetic, ("scale",)),
    "ties": (op_ties, ("density", "scale")),
    "dare": (op_dare, ("density", "scale", "seed")),
    "model_stock": (op_model_stock, ()),
    "variance_corrected": (op_variance_corrected, ("eps",)),
    "median": (op_median, ()),
    "trimmed_mean": (op_trimmed_mean, ("f",)),
    "nna": (op_nna, ("f",)),
    "krum": (op_krum, ("f", "m")),
}
#: operators that must see every contribution (an all-reduce cannot compute them)
ROBUST = ("median", "trimmed_mean", "nna", "krum")
# the parameters' ranges (check_float / check_int keywords)
_FLOAT_PARAMS: dict[str, dict[str, Any]] = {
    "density": {"low": 0, "high": 1, "low_open": True},
    "t": {"low": 0, "high": 1},
    "scale": {},
    "eps": {"low": 0, "low_open": True},
}
_INT_PARAMS = {"f": 0, "m": 1, "seed": 0}


class Merge:
    """A merge operator with its parameters, validated at construction.

    Args:
        method: a name in :data:`MERGES`.
        **params: the operator's parameters: ``t`` in [0, 1] (slerp), ``scale`` (task arithmetic,
            TIES, DARE), ``density`` in (0, 1] (TIES, DARE), ``seed`` (DARE, mixed with the set's
            hash), ``eps`` > 0 (variance_corrected), ``f`` >= 0 (trimmed_mean, nna, krum), ``m`` >= 1 (krum).

    Raises:
        ValueError: unknown method, unknown parameter or a parameter out of range.

    Example:
        >>> s = ContributionSet(Contribution(r, 0, (torch.tensor([float(r)]),)) for r in range(5))
        >>> Merge("trimmed_mean", f=1)(s)
        [tensor([2.])]
        >>> Merge("ties", density=1.5)
        Traceback (most recent call last):
        ...
        ValueError: merge 'ties': `density` must be a finite number in (0, 1], got 1.5
    """

    def __init__(self, method: str = "mean", **params: Any) -> None:
        if not isinstance(method, str) or method not in MERGES:
            raise ValueError(f"`merge` must be one of {sorted(MERGES)}, got {method!r}")
        allowed = MERGES[method][1]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"merge {method!r}: unknown parameter(s) {unknown}; allowed: {list(allowed)}")
        self.method = method
        self.params = dict(params)
        self._check()

    def _check(self) -> None:
        try:
            for name, value in self.params.items():
                if name in _INT_PARAMS:
                    check_int(name, value, low=_INT_PARAMS[name])
                else:
                    check_float(name, value, **_FLOAT_PARAMS[name])
        except ValueError as e:
            raise ValueError(f"merge {self.method!r}: {e}") from None

    @property
    def robust(self) -> bool:
        """Whether the operator needs every contribution (not expressible as an all-reduce)."""
        return self.method in ROBUST

    @property
    def linear(self) -> bool:
        """Whether the operator is the weighted mean (an all-reduce computes it)."""
        return self.method in ("mean", "weighted")

    def min_contributions(self) -> int:
        f = self.params.get("f", 1)
        return {"trimmed_mean": 2 * f + 1, "nna": f + 1, "krum": 2 * f + 3, "slerp": 2, "model_stock": 2}.get(
            self.method, 1
        )

    def __call__(
        self,
        contributions: ContributionSet | Iterable[Contribution],
        *,
        base: Model | None = None,
        reference: Model | None = None,
        names: Sequence[str] | None = None,
    ) -> list[Tensor]:
        """Merge a set of contributions (a pure function of the set).

        Args:
            contributions: the set (an iterable of contributions is turned into a set first).
            base: the model deltas are taken from (task_arithmetic, ties, dare, model_stock).
            reference: the merging replica's own model (nna).
            names: the tensors' names (variance_corrected skips BatchNorm running statistics).
        """
        if not isinstance(contributions, ContributionSet):
            items = list(contributions) if isinstance(contributions, Iterable) else None
            if (
                items is None
                or isinstance(contributions, (str, bytes, Tensor))
                or not all(isinstance(c, Contribution) for c in items)
            ):
                raise ValueError(
                    f"`contributions` must be a ContributionSet or an iterable of Contribution, got {contributions!r}"
                )
            contributions = ContributionSet(items)
        s = contributions
        if len(s) == 0:
            raise ValueError("`contributions`: cannot merge an empty set of contributions")
        items = list(s)
        n_t = len(items[0].tensors)
        if any(len(c.tensors) != n_t for c in items):
            raise ValueError("`contributions`: every contribution must hold the same number of tensors")
        first = items[0].tensors
        is_float = [torch.is_floating_point(t) for t in first]
        fidx = [i for i, f in enumerate(is_float) if f]

        def f64(ts: Sequence[Tensor]) -> list[Tensor]:
            return [ts[i].detach().to(torch.float64) for i in fidx]

        models = [f64(c.tensors) for c in items]
        ctx = Context(
            seed=(s.digest() ^ int(self.params.get("seed", 0)) * 0x9E3779B97F4A7C15) % (2**63 - 1),
            names=[names[i] for i in fidx] if names is not None else None,
            base=f64(base) if base is not None else None,
            reference=f64(reference) if reference is not None else None,
        )
        op = MERGES[self.method][0]
        params = {k: v for k, v in self.params.items() if k != "seed"}
        merged = op(models, [c.weight for c in items], ctx, **params) if fidx else []
        out: list[Tensor] = []
        it = iter(merged)
        for i, t in enumerate(first):
            out.append(next(it).to(t.dtype) if is_float[i] else t.clone())
        return out

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"Merge({self.method!r}{args})"


def as_merge(merge: str | Merge) -> Merge:
    """``merge=`` argument of a strategy: a name or a :class:`Merge`."""
    if isinstance(merge, Merge):
        return merge
    if isinstance(merge, str):
        return Merge(merge)
    raise ValueError(f"`merge` must be a merge name or a Merge, got {merge!r}")


def merge(
    contributions: ContributionSet | Iterable[Contribution], method: str = "mean", **kwargs: Any
) -> list[Tensor]:
    """Functional form: ``Merge(method, **params)(contributions, base=..., reference=..., names=...)``.

    Example:
        >>> c = [Contribution(r, 0, (torch.tensor([1.0, -2.0]) * (r + 1),)) for r in range(2)]
        >>> merge(c, "task_arithmetic", base=[torch.zeros(2)], scale=0.5)
        [tensor([ 1.5000, -3.0000])]
    """
    call_kw = {k: kwargs.pop(k) for k in ("base", "reference", "names") if k in kwargs}
    return Merge(method, **kwargs)(contributions, **call_kw)
