"""Traffic counters of :mod:`lightning_fedopt.comm` (re-exported there): bytes, rounds and seconds,
in total and per purpose and operation, checkpointable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CommCounter", "CommStats"]


@dataclass
class CommCounter:
    """Bytes, rounds and seconds for one slice of the traffic."""

    bytes_sent: int = 0
    bytes_received: int = 0
    rounds: int = 0
    seconds: float = 0.0

    def add(self, sent: int, received: int, rounds: int, seconds: float) -> None:
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)
        self.rounds += int(rounds)
        self.seconds += float(seconds)

    def as_dict(self) -> dict[str, float]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "rounds": self.rounds,
            "seconds": self.seconds,
        }


@dataclass
class CommStats(CommCounter):
    """Totals of one rank's traffic, with breakdowns by purpose and by operation.

    ``bytes_sent``, ``bytes_received``, ``rounds`` and ``seconds`` are the totals over all
    purposes. ``by_purpose["sync"]`` is the traffic of the algorithm's synchronisations alone.
    """

    by_purpose: dict[str, CommCounter] = field(default_factory=dict)
    by_op: dict[str, CommCounter] = field(default_factory=dict)

    def record(self, op: str, purpose: str, sent: int, received: int, rounds: int, seconds: float) -> None:
        self.add(sent, received, rounds, seconds)
        self.by_purpose.setdefault(purpose, CommCounter()).add(sent, received, rounds, seconds)
        self.by_op.setdefault(op, CommCounter()).add(sent, received, rounds, seconds)

    def add_seconds(self, op: str, purpose: str, seconds: float) -> None:
        self.record(op, purpose, 0, 0, 0, seconds)

    def purpose(self, name: str) -> CommCounter:
        """The counter of one purpose (zeros if that purpose never communicated)."""
        return self.by_purpose.get(name, CommCounter())

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.rounds = 0
        self.seconds = 0.0
        self.by_purpose.clear()
        self.by_op.clear()

    def state_dict(self) -> dict[str, Any]:
        return {
            "total": self.as_dict(),
            "by_purpose": {k: v.as_dict() for k, v in self.by_purpose.items()},
            "by_op": {k: v.as_dict() for k, v in self.by_op.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        CommCounter.add(
            self, *(state["total"][k] for k in ("bytes_sent", "bytes_received", "rounds", "seconds"))
        )
        for name, table in (("by_purpose", self.by_purpose), ("by_op", self.by_op)):
            for key, val in state[name].items():
                table[key] = CommCounter(**val)
