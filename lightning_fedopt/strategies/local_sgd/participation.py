"""Who takes part in a Local SGD round, and with what weight.

* :func:`choose_participants`: the round-seeded draw every rank agrees on without communicating.
* :class:`FedAUState`: FedAU's online estimate of each replica's aggregation weight (Wang & Ji,
  "A Lightweight Method for Tackling Unknown Participation Statistics in Federated Averaging",
  ICLR 2024).
* :class:`RoundLosses`: the running training loss of a round, all-gathered at its end so that
  loss-based :class:`~lightning_fedopt.data.ReplicaSelection` makes the same choice on every rank.
* :func:`check_participation`: the ``participation`` / ``selection`` arguments, validated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fedopt._validate import check_float
from lightning_fedopt.comm import Communicator
from lightning_fedopt.data.pacing import ReplicaSelection

__all__ = [
    "FedAUState",
    "RoundLosses",
    "check_participation",
    "check_participation_length",
    "choose_participants",
]

log = logging.getLogger("lightning_fedopt")


def choose_participants(
    round_index: int, world_size: int, participation: float | Sequence[float], seed: int = 0
) -> list[int]:
    """The replicas that take part in round ``round_index`` — the same answer on every rank.

    ``participation`` is either a fraction ``p`` in (0, 1] (exactly ``max(1, round(p N))``
    replicas, chosen uniformly) or one probability per replica (independent Bernoulli draws,
    possibly none).

    Example:
        >>> choose_participants(0, 4, 1.0)
        [0, 1, 2, 3]
        >>> len(choose_participants(3, 10, 0.3))
        3
    """
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(round_index) * 7919 + 17) % 2**64)
    if isinstance(participation, (int, float)):
        if participation >= 1.0:
            return list(range(world_size))
        k = max(1, round(participation * world_size))
        return sorted(torch.randperm(world_size, generator=gen)[:k].tolist())
    probs = torch.tensor(list(participation), dtype=torch.float64)
    draws = torch.rand(world_size, generator=gen, dtype=torch.float64)
    return [i for i in range(world_size) if bool(draws[i] < probs[i])]


def check_participation(
    participation: Any, selection: Any = None, group_size: Any = 1
) -> float | list[float]:
    """``participation`` as a fraction in (0, 1] or a list of probabilities in [0, 1]; with a
    ``selection``, also that it is a fraction below 1 and that replicas are not grouped.

    Raises:
        ValueError: naming the argument at fault.
    """
    is_number = isinstance(participation, (int, float)) and not isinstance(participation, bool)
    if selection is not None:
        if not isinstance(selection, ReplicaSelection):
            raise ValueError(
                f"`selection` must be a lightning_fedopt.data.ReplicaSelection or None, got {selection!r}"
            )
        if not is_number or not (0.0 < float(participation) < 1.0):
            raise ValueError(
                f"`selection` chooses a fraction of the replicas: `participation` must be in (0, 1), "
                f"got {participation!r}"
            )
        if group_size != 1:
            raise ValueError(
                "`selection` with `group_size` > 1 is not supported: the members of a group hold "
                "different data, so they would pick different participants and the group would diverge"
            )
    if is_number:
        return check_float("participation", participation, low=0.0, high=1.0, low_open=True)
    if isinstance(participation, Sequence) and not isinstance(participation, str):
        probs = [
            check_float(f"participation[{i}]", p, low=0.0, high=1.0) for i, p in enumerate(participation)
        ]
        if not any(p > 0 for p in probs):
            # no replica could ever take part: the model would never change
            raise ValueError(
                f"`participation` probabilities must each be in [0, 1], at least one > 0, got {probs!r}"
            )
        return probs
    raise ValueError(
        f"`participation` must be a number in (0, 1] or a sequence of probabilities, got {participation!r}"
    )


def check_participation_length(participation: float | list[float], world_size: int) -> None:
    """A list of probabilities must name one per replica (checked once the world is known)."""
    if isinstance(participation, list) and len(participation) != world_size:
        raise ValueError(
            f"`participation` lists {len(participation)} probabilities but there are {world_size} replicas"
        )


class FedAUState:
    """FedAU's online estimate of each replica's aggregation weight ``omega_n``.

    Per replica ``n``: ``S_n`` rounds counted since its last recorded interval and the mean
    ``Omega_n`` of its ``M_n`` recorded intervals. In a round, a participant uses
    ``omega_n = Omega_n`` (1 while ``M_n = 0``); then it records the interval ``S_n + 1`` and
    ``S_n`` restarts at 0. A non-participant increments ``S_n`` and, on reaching the cutoff ``K``,
    records an interval of ``K``. This follows the authors' reference implementation.

    Example:
        >>> s = FedAUState(2, cutoff=None)
        >>> [s.step([0]) for _ in range(3)][-1]   # replica 1 never takes part
        [1.0, 1.0]
        >>> s.step([1])   # replica 1's first participation is unscaled
        [1.0, 1.0]
        >>> s.weights()   # its interval of 4 rounds is now on record
        [1.0, 4.0]
    """

    def __init__(self, world_size: int, cutoff: int | None = None) -> None:
        self.world_size = world_size
        self.cutoff = cutoff
        self.since = [0] * world_size
        self.count = [0] * world_size
        self.mean = [1.0] * world_size

    def weights(self) -> list[float]:
        """``omega_n`` for every replica, from the intervals recorded so far."""
        return [self.mean[n] if self.count[n] > 0 else 1.0 for n in range(self.world_size)]

    def _record(self, n: int, interval: int) -> None:
        self.mean[n] = (
            (self.count[n] * self.mean[n] + interval) / (self.count[n] + 1)
            if self.count[n]
            else float(interval)
        )
        self.count[n] += 1

    def step(self, participants: Sequence[int]) -> list[float]:
        """Advance one round; returns the weights used *in* this round (before its intervals)."""
        used = self.weights()
        part = set(participants)
        for n in range(self.world_size):
            if n in part:
                self._record(n, self.since[n] + 1)
                self.since[n] = 0
            else:
                self.since[n] += 1
                if self.cutoff is not None and self.since[n] >= self.cutoff:
                    self._record(n, self.since[n])
                    self.since[n] = 0
        return used

    def state_dict(self) -> dict[str, Any]:
        """The per-replica counters (plain lists), for the strategy's checkpoint."""
        return {"since": list(self.since), "count": list(self.count), "mean": list(self.mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; statistics recorded for another number of
        replicas are dropped (with a warning) and start afresh."""
        if len(state["since"]) != self.world_size:
            log.warning(
                "lightning_fedopt: FedAU participation statistics were recorded for %d replicas, "
                "now there are %d; they start afresh",
                len(state["since"]),
                self.world_size,
            )
            return
        self.since, self.count, self.mean = list(state["since"]), list(state["count"]), list(state["mean"])


class RoundLosses:
    """This replica's training losses in the current round: a running sum on the device (no
    per-step synchronisation) and a count; :meth:`gather` exchanges every replica's mean."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0
        self._warned = False

    def add(self, out: Any) -> None:
        """Record a ``training_step`` output (a scalar loss, or a dict with one under ``"loss"``)."""
        loss = out.get("loss") if isinstance(out, dict) else out
        if isinstance(loss, Tensor) and loss.numel() == 1:
            value = loss.detach().reshape(()).to(torch.float64)
            self.total = value if self.total is None else self.total + value
            self.count += 1

    def gather(self, comm: Communicator, device: Any) -> list[float]:
        """Every replica's mean loss this round (one all-gather, purpose ``"control"``; NaN for a
        replica that saw no loss), then a fresh round."""
        if self.total is None or self.count == 0:
            mine = torch.full((1,), math.nan, dtype=torch.float64, device=device)
        else:
            mine = (self.total / self.count).reshape(1)
        gathered = comm.all_gather(mine, purpose="control").wait()
        self.total, self.count = None, 0
        losses = [float(g[0]) for g in gathered]
        if all(math.isnan(x) for x in losses) and not self._warned:
            self._warned = True
            log.warning(
                "lightning_fedopt: replica selection saw no training loss this round (training_step returned "
                "no scalar loss, e.g. under manual optimization); participants are chosen in rank order"
            )
        return losses

    def state(self) -> tuple[Tensor | None, int]:
        """The running sum (on the CPU) and count, for the replica's checkpoint shard."""
        return (None if self.total is None else self.total.cpu(), self.count)

    def load_state(self, state: tuple[Tensor | None, int], device: Any) -> None:
        """Restore what :meth:`state` returned, the sum moved to ``device``."""
        total, self.count = state
        self.total = None if total is None else total.to(device)
