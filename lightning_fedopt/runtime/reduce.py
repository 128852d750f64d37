"""One finite-masked weighted reduce, used by every strategy that averages replicas.

A replica whose tensors hold NaN/Inf (or whose weight is 0) contributes zeros; the counts of
valid and of non-finite contributors travel in the **same** all-reduce as the tensors (one extra
small tensor), so every rank learns how many replicas were averaged without another round trip.
:func:`masked_sum` starts that all-reduce (optionally asynchronously, as DiLoCo's streaming
fragments and CO2 need) and :meth:`PendingSum.wait` returns a :class:`MaskedSum`; its
:meth:`~MaskedSum.mean` raises :class:`NoFiniteReplicaError` when nothing finite is left.

Example (single process, a world of one)::

    >>> import torch
    >>> from lightning_fedopt.comm import Communicator
    >>> s = masked_sum(Communicator(), [torch.ones(3)], weight=2.0, purpose="sync").wait()
    >>> s.weight, s.valid, s.invalid, s.mean()[0].tolist()
    (2.0, 1, 0, [1.0, 1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_fedopt.comm import Communicator, Handle
from lightning_fedopt.errors import NoFiniteReplicaError

__all__ = ["MaskedSum", "NoFiniteReplicaError", "PendingSum", "all_finite", "masked_sum"]


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite (no NaN, no Inf)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def scalar_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype the counters travel in: the tensors' float32 when all are float32 (one
    coalesced all-reduce), float64 otherwise (exact counts next to low-precision weights)."""
    return torch.float32 if tensors and all(t.dtype == torch.float32 for t in tensors) else torch.float64


@dataclass
class MaskedSum:
    """What a :func:`masked_sum` delivered on every rank.

    Attributes:
        sums: per tensor, the sum over valid replicas of ``weight * (t - base)``.
        weight: the summed weight of the valid replicas.
        valid: how many replicas contributed.
        invalid: how many replicas had non-finite tensors (and a weight > 0).
        extras: the ``extra`` numbers, summed over the valid replicas.
    """

    sums: list[Tensor]
    weight: float
    valid: int
    invalid: int
    extras: list[float] = field(default_factory=list)

    def mean(self, *, step: int | None = None, what: str = "average") -> list[Tensor]:
        """``sums / weight``; :class:`NoFiniteReplicaError` when no replica contributed."""
        if self.valid == 0 or self.weight <= 0:
            raise NoFiniteReplicaError(step, what=what)
        return [s / self.weight for s in self.sums]


class PendingSum:
    """A :func:`masked_sum` in flight; :meth:`wait` completes it (idempotent)."""

    def __init__(self, sums: list[Tensor], scalars: Tensor, handle: Handle | None, n_extra: int) -> None:
        self.sums = sums
        self.scalars = scalars
        self._handle = handle
        self._n_extra = n_extra
        self._result: MaskedSum | None = None

    def is_completed(self) -> bool:
        return self._handle is None or self._handle.is_completed()

    def futures(self) -> list[Any] | None:
        """The futures of the sum's transfer (:meth:`lightning_fedopt.comm.Handle.futures`; ``[]``
        when it has completed or was synchronous)."""
        return [] if self._handle is None else self._handle.futures()

    def wait(self) -> MaskedSum:
        if self._result is None:
            if self._handle is not None:
                self._handle.wait()
                self._handle = None
            s = self.scalars
            self._result = MaskedSum(
                self.sums,
                float(s[0]),
                round(float(s[1])),
                round(float(s[2])),
                [float(x) for x in s[3 : 3 + self._n_extra]],
            )
        return self._result


def masked_contribution(
    tensors: Sequence[Tensor], weight: float = 1.0, base: Sequence[Tensor] | None = None
) -> tuple[list[Tensor], bool, bool]:
    """``weight * (t - base)`` (fresh tensors), or zeros when a tensor is not finite or ``weight`` is 0.

    Returns ``(contribution, valid, finite)``.
    """
    finite = all_finite(tensors)
    valid = finite and weight > 0
    with torch.no_grad():
        if valid:
            if base is None:
                contrib = [t.detach() * weight for t in tensors]
            else:
                contrib = [(t.detach() - b.to(t.device)) * weight for t, b in zip(tensors, base)]
        else:
            contrib = [torch.zeros_like(t) for t in tensors]
    return contrib, valid, finite


def masked_sum(
    comm: Communicator,
    tensors: Sequence[Tensor],
    *,
    weight: float = 1.0,
    base: Sequence[Tensor] | None = None,
    extra: Sequence[float] = (),
    purpose: str = "sync",
    async_op: bool = False,
    contribution: tuple[list[Tensor], bool, bool] | None = None,
    counters_dtype: torch.dtype | None = None,
    device: Any = None,
    compressor: Any = None,
    names: Sequence[str] | None = None,
) -> PendingSum:
    """Sum ``weight * (t - base)`` over the replicas whose ``tensors`` are all finite.

    The counters ``[weight, valid, invalid, *extra]`` ride in the same all-reduce (``extra`` is
    zeroed on an invalid replica). ``contribution`` passes a precomputed
    :func:`masked_contribution` (e.g. a pseudo-gradient already divided by a step count).
    With ``async_op`` the all-reduce overlaps with what the caller does next.

    With a ``compressor`` the counters are all-reduced exactly first and the contributions then
    travel through the compressed all-reduce (``names`` key its error-feedback state); the sums are
    the decompressed result, the same on every rank. The compressed path is synchronous.
    """
    contrib, valid, finite = (
        masked_contribution(tensors, weight, base) if contribution is None else contribution
    )
    dev = device if device is not None else (contrib[0].device if contrib else torch.device("cpu"))
    counters = [weight if valid else 0.0, float(valid), float(weight > 0 and not finite)]
    counters += [float(x) if valid else 0.0 for x in extra]
    scalars = torch.tensor(counters, dtype=counters_dtype or scalar_dtype(contrib), device=dev)
    if compressor is not None:
        from lightning_fedopt.compression.collective import all_reduce_compressed

        comm.all_reduce([scalars], "sum", purpose=purpose)
        all_reduce_compressed(comm, contrib, compressor, names=names, purpose=purpose, op="sum")
        return PendingSum(contrib, scalars, None, len(extra))
    handle = comm.all_reduce([*contrib, scalars], "sum", purpose=purpose, async_op=async_op)
    return PendingSum(contrib, scalars, handle if async_op else None, len(extra))
