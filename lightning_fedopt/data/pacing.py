"""Curriculum orderings and pacing functions (pure functions; no Lightning, no processes).

A curriculum has two parts (Wu, Dyer & Neyshabur, "When Do Curricula Work?", ICLR 2021; in
federated learning: Vahidian et al., "When Do Curricula Work in Federated Learning?", ICCV 2023):

* an **ordering** of the ``N`` samples by a difficulty score: ``"curriculum"`` (easiest, i.e.
  lowest score, first), ``"anti"`` (hardest first) or ``"random"``;
* a **pacing function** ``g(t)``: how many of the ordered samples are visible at step ``t`` of
  ``T``. With start fraction ``b`` and saturation at step ``aT``:

  ============  ==========================================================
  ``linear``    ``bN + (N - bN) * t / (aT)``
  ``quad``      ``bN + (N - bN) * (t / (aT))**2``
  ``root``      ``bN + (N - bN) * sqrt(t / (aT))``
  ``step``      ``bN + N * floor(t / (aT))``
  ``exp``       ``bN + (N - bN) * (exp(c t / (aT)) - 1) / (exp(c) - 1)``, ``c = 10``
  ``log``       ``bN + (N - bN) * (1 + log(t / (aT) + exp(-c)) / c)``, ``c = 10``
  ============  ==========================================================

  clipped to ``[floor, N]`` where ``floor`` is one batch: a batch is drawn from the first
  ``g(t)`` samples of the ordering, so the visible set grows from the easiest ``bN`` samples to the
  whole data set at ``t = aT``.

:class:`ReplicaSelection` applies the same two ideas to replicas: order them by their mean loss
and let a pacing function decide how many of them are eligible to take part in a round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lightning_fedopt._validate import check_choice, check_float, check_int, check_seed

__all__ = [
    "ORDERINGS",
    "PACINGS",
    "Pacing",
    "ReplicaSelection",
    "order_by_scores",
]

ORDERINGS = ("curriculum", "anti", "random")
PACINGS = ("linear", "quad", "root", "step", "exp", "log")
_C = 10.0


def _check_pacing_parameter(name: str, value: float, **bounds: Any) -> float:
    try:
        return check_float(name, value, **bounds)
    except ValueError as err:  # "pacing parameter `a` must be ...": the name alone says little
        raise ValueError(f"pacing parameter {err}") from None


class Pacing:
    """A pacing function ``g(t)``: the number of visible samples at step ``t`` of ``total_steps``.

    Args:
        name: one of ``"linear"``, ``"quad"``, ``"root"``, ``"step"``, ``"exp"``, ``"log"``.
        a: fraction of training at which the whole data set is visible (> 0; above 1 it never is).
        b: fraction of the data set visible at ``t = 0``, in (0, 1].

    Raises:
        ValueError: for an unknown name or ``a``/``b`` out of range.

    Example:
        >>> p = Pacing("linear", a=0.5, b=0.25)
        >>> p.fraction(0, 100), p.fraction(25, 100), p.fraction(50, 100), p.fraction(90, 100)
        (0.25, 0.625, 1.0, 1.0)
        >>> p.visible(25, 100, n=1000, floor=32)
        625
    """

    def __init__(self, name: str = "linear", a: float = 0.8, b: float = 0.2) -> None:
        self.name = check_choice("pacing", name, PACINGS)
        self.a = _check_pacing_parameter("a", a, low=0, low_open=True)
        self.b = _check_pacing_parameter("b", b, low=0, high=1, low_open=True)

    def fraction(self, t: float, total_steps: float) -> float:
        """``g(t) / N``, clipped to at most 1 (before the one-batch floor)."""
        if total_steps <= 0:
            return 1.0
        x = max(float(t), 0.0) / (self.a * float(total_steps))  # t / (aT)
        b = self.b
        if self.name == "linear":
            g = b + (1 - b) * x
        elif self.name == "quad":
            g = b + (1 - b) * x**2
        elif self.name == "root":
            g = b + (1 - b) * math.sqrt(x)
        elif self.name == "step":
            g = b + math.floor(x)
        elif self.name == "exp":
            g = b + (1 - b) * math.expm1(_C * min(x, 1.0)) / math.expm1(_C)
        else:  # log
            g = b + (1 - b) * (1 + math.log(x + math.exp(-_C)) / _C)
        return min(max(g, 0.0), 1.0)

    def visible(self, t: float, total_steps: float, n: int, floor: int = 1) -> int:
        """``g(t)`` as a number of samples: ``floor(N * fraction)``, at least ``floor``, at most ``N``."""
        return int(min(n, max(min(floor, n), math.floor(n * self.fraction(t, total_steps) + 1e-9))))

    def __repr__(self) -> str:
        return f"Pacing({self.name!r}, a={self.a}, b={self.b})"


def order_by_scores(
    scores: torch.Tensor, ordering: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Positions ``0..N-1`` sorted for ``ordering``: ascending scores (``"curriculum"``),
    descending (``"anti"``) or a random permutation (``"random"``, from ``generator``).

    Ties keep their original order (a stable sort), so the result is deterministic. NaN scores
    sort last under both curriculum and anti-curriculum.

    Example:
        >>> s = torch.tensor([0.3, 0.1, 0.9, 0.5])
        >>> order_by_scores(s, "curriculum").tolist(), order_by_scores(s, "anti").tolist()
        ([1, 0, 3, 2], [2, 3, 0, 1])
    """
    check_choice("ordering", ordering, ORDERINGS)
    try:
        scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"`scores` must be a tensor or sequence of numbers, got {scores!r}") from None
    if ordering == "random":
        return torch.randperm(len(scores), generator=generator)
    key = scores if ordering == "curriculum" else -scores
    key = torch.nan_to_num(key, nan=math.inf)
    return torch.sort(key, stable=True).indices


class ReplicaSelection:
    """Choose a round's participating replicas by their mean loss, with an ordering and pacing.

    The replicas are ordered by mean loss (``"curriculum"``: lowest loss first; ``"anti"``: highest
    first; ``"random"``: a round-seeded permutation), the pacing function says how many of the
    ordered replicas are eligible at step ``t`` of ``T`` (at least ``k``), and ``k`` participants are
    drawn uniformly from the eligible ones with an RNG seeded by the round — a deterministic
    function of (losses, round, step), so every rank that holds the same losses agrees.

    Args:
        ordering: ``"curriculum"``, ``"anti"`` or ``"random"``.
        pacing: a :class:`Pacing` or a pacing name.
        a, b: the pacing parameters when ``pacing`` is a name.
        seed: seed of the round-seeded draw.

    Example:
        >>> sel = ReplicaSelection("curriculum", pacing="linear", a=1.0, b=0.5)
        >>> sel.select([0.9, 0.1, 0.5, 0.7], k=2, round_index=0, step=0, total_steps=100)
        [1, 2]
        >>> sel.select([0.9, 0.1, 0.5, 0.7], k=4, round_index=0, step=0, total_steps=100)
        [0, 1, 2, 3]
    """

    def __init__(
        self,
        ordering: str = "curriculum",
        pacing: str | Pacing = "linear",
        a: float = 0.8,
        b: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.ordering = check_choice("ordering", ordering, ORDERINGS)
        self.pacing = pacing if isinstance(pacing, Pacing) else Pacing(pacing, a=a, b=b)
        self.seed = check_seed("seed", seed)

    def _generator(self, round_index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + int(round_index) * 7919 + 29) % 2**64)

    def eligible(
        self, losses: Sequence[float], k: int, round_index: int, step: int, total_steps: int
    ) -> list[int]:
        """The ordered replicas that are eligible this round (the first ``g(t)`` of the ordering)."""
        n = len(losses)
        gen = self._generator(round_index)
        order = order_by_scores(torch.tensor([float(x) for x in losses]), self.ordering, generator=gen)
        m = self.pacing.visible(step, total_steps, n, floor=k)
        return order[:m].tolist()

    def select(
        self, losses: Sequence[float], k: int, round_index: int, step: int, total_steps: int
    ) -> list[int]:
        """``k`` participants (sorted replica ids) for this round."""
        k = check_int("k", k, low=1, high=len(losses))
        pool = self.eligible(losses, k, round_index, step, total_steps)
        gen = self._generator(round_index + 1_000_000)
        pick = torch.randperm(len(pool), generator=gen)[:k].tolist()
        return sorted(pool[i] for i in pick)

    def __repr__(self) -> str:
        return f"ReplicaSelection({self.ordering!r}, pacing={self.pacing!r}, seed={self.seed})"
