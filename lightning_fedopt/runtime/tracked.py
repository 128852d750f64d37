"""The tensors a replica strategy keeps in agreement, and the module state dict built from them.

:class:`TrackedTensors` is a part of :class:`~lightning_fedopt.strategies.ReplicaStrategy`
(``strategy.tracked``): the module's floating-point parameters (frozen ones too unless
``include_frozen=False``) and floating-point buffers, collected when ``fit`` starts (and again for
an evaluation after it: teardown may have moved the module). Algorithms address them by position:
:attr:`~TrackedTensors.ids` maps a tensor's ``id`` to it, :attr:`~TrackedTensors.names` gives its name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_fedopt.runtime.reduce import all_finite

__all__ = ["TrackedTensors"]


class TrackedTensors:
    """The tracked tensors of one module (see the module doc).

    Args:
        include_frozen: also track parameters that do not require gradients.
    """

    def __init__(self, include_frozen: bool = True) -> None:
        self.include_frozen = include_frozen
        self.names: list[str] = []
        self.tensors: list[Tensor] = []
        #: ``id(tensor)`` -> its position among the tracked tensors
        self.ids: dict[int, int] = {}
        #: ``id`` of the module the tensors were collected from (None: none yet)
        self.module_id: int | None = None

    def reset(self) -> None:
        """Forget the tensors (a new ``fit``)."""
        self.names, self.tensors, self.ids, self.module_id = [], [], {}, None

    def collect(self, module: nn.Module) -> None:
        """Track ``module``'s floating-point parameters and buffers."""
        names: list[str] = []
        tensors: list[Tensor] = []
        ids: dict[int, int] = {}
        for name, p in module.named_parameters():
            if torch.is_floating_point(p) and (p.requires_grad or self.include_frozen):
                ids[id(p)] = len(tensors)
                names.append(name)
                tensors.append(p.data)
        for name, b in module.named_buffers():
            if torch.is_floating_point(b):
                ids[id(b)] = len(tensors)
                names.append(name)
                tensors.append(b)
        self.names, self.tensors, self.ids = names, tensors, ids
        self.module_id = id(module)

    def named(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` of every tracked tensor, in a new list."""
        return list(zip(self.names, self.tensors))

    def is_finite(self, tensors: list[Tensor] | None = None) -> bool:
        """Whether all of ``tensors`` (default: the tracked ones) are finite."""
        return all_finite(self.tensors if tensors is None else tensors)

    def load(self, values: list[Tensor]) -> None:
        """Copy ``values`` into the tracked tensors."""
        with torch.no_grad():
            for t, v in zip(self.tensors, values):
                t.copy_(v)

    def snapshot(self) -> list[Tensor]:
        """Detached copies of the tracked tensors."""
        return [t.detach().clone() for t in self.tensors]

    def state_dict_with(self, module: nn.Module, values: list[Tensor]) -> dict[str, Any]:
        """``module``'s state dict with every tracked tensor replaced by ``values`` (by tensor
        identity, so tied weights and non-persistent buffers come out right)."""
        out = {}
        for key, value in module.state_dict(keep_vars=True).items():
            i = self.ids.get(id(value))
            out[key] = (values[i] if i is not None else value).detach().clone()
        return out

    @staticmethod
    def module_state_tensors(module: nn.Module) -> list[Tensor]:
        """Every parameter and buffer of ``module`` (what the initial synchronisation makes equal)."""
        return [p.data for p in module.parameters()] + list(module.buffers())
