"""A gossip replica that lies: the attacker of ``python -m benchmarks.gossip --robust``.

Imported only by the factories of :data:`benchmarks.gossip.EXTRA_STRATEGIES`, i.e. inside a worker.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import override

from lightning_fedopt import GossipStrategy

__all__ = ["ByzantineGossip"]


class ByzantineGossip(GossipStrategy):
    """Rank ``attacker`` sends its round's update multiplied by ``factor``; it merges honestly.

    What the attacker sends is ``last + factor * (values - last)``, ``last`` its model after the
    previous round (``factor=-4``: sign-flipped x4; ``factor=100``: blown up). Every other rank,
    and every rank when ``factor`` is ``None``, is a plain :class:`lightning_fedopt.GossipStrategy`.

    Args:
        *args: :class:`lightning_fedopt.GossipStrategy`'s arguments.
        factor: the multiplier of the attacker's update, ``None`` for no attack.
        attacker: the global rank that attacks.
        **kwargs: :class:`lightning_fedopt.GossipStrategy`'s keyword arguments.
    """

    def __init__(self, *args: Any, factor: float | None, attacker: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.factor = factor
        self.attacker = attacker
        self._last: list[Tensor] = []

    @override
    def setup_algorithm(self) -> None:
        super().setup_algorithm()
        self._last = [t.detach().clone() for t in self.tracked_tensors()]

    @override
    def outgoing_message(self, values: list[Tensor]) -> list[Tensor]:
        if self.global_rank != self.attacker or self.factor is None:
            return values
        c = self.factor
        return [a + c * (v - a) for v, a in zip(values, self._last)]

    @override
    def gossip_step(self) -> dict[str, float]:
        out = super().gossip_step()
        self._last = [t.detach().clone() for t in self.tracked_tensors()]
        return out
