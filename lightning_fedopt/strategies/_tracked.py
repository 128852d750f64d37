"""The tensors a replica strategy keeps in agreement, and the module state dict built from them.

:class:`TrackedTensors` is a mixin of :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`.
The tracked tensors are the module's floating-point parameters (frozen ones too unless
``include_frozen=False``) and floating-point buffers, collected when ``fit`` starts; algorithms
address them by position (``_tracked_ids`` maps a tensor's ``id`` to it, ``_tracked_names`` gives
its name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fedopt.strategies._reduce import all_finite

__all__ = ["TrackedTensors"]


class TrackedTensors:
    """Mixin: the tracked tensors of the strategy's ``lightning_module``."""

    include_frozen: bool
    _tracked_names: list[str]
    _tracked: list[Tensor]
    #: ``id(tensor)`` -> its position among the tracked tensors
    _tracked_ids: dict[int, int]
    #: ``id`` of the module the tensors were collected from
    _tracked_module: int | None

    def _reset_tracked(self) -> None:
        self._tracked_names, self._tracked, self._tracked_ids = [], [], {}
        self._tracked_module = None

    def tracked_named_tensors(self) -> list[tuple[str, Tensor]]:
        """The tensors the algorithm keeps in agreement: floating-point parameters and buffers.

        Parameters frozen when ``fit`` starts are included unless ``include_frozen=False`` (they
        may be unfrozen later, e.g. by Lightning's ``BackboneFinetuning``).
        """
        return list(zip(self._tracked_names, self._tracked))

    def tracked_tensors(self) -> list[Tensor]:
        """The tracked tensors (see :meth:`tracked_named_tensors`), in a new list."""
        return list(self._tracked)

    def is_finite(self, tensors: list[Tensor] | None = None) -> bool:
        """Whether all of ``tensors`` (default: the tracked ones) are finite."""
        return all_finite(self._tracked if tensors is None else tensors)

    def _collect_tracked(self) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        assert module is not None
        names, tensors, ids = [], [], {}
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
        self._tracked_names, self._tracked, self._tracked_ids = names, tensors, ids
        self._tracked_module = id(module)

    def _state_dict_with(self, values: list[Tensor]) -> dict[str, Any]:
        """The module's state dict with every tracked tensor replaced by ``values`` (by tensor
        identity, so tied weights and non-persistent buffers come out right)."""
        module = self.lightning_module  # type: ignore[attr-defined]
        assert module is not None
        out = {}
        for key, value in module.state_dict(keep_vars=True).items():
            i = self._tracked_ids.get(id(value))
            out[key] = (values[i] if i is not None else value).detach().clone()
        return out

    def _module_state_tensors(self) -> list[Tensor]:
        """Every parameter and buffer of the module (what the initial synchronisation makes equal)."""
        module = self.lightning_module  # type: ignore[attr-defined]
        assert module is not None
        return [p.data for p in module.parameters()] + list(module.buffers())
