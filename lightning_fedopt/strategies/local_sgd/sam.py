"""The SAM perturbation (Foret et al., 2021), shared by DFedSAM gossip and FedSpeed.

SAM evaluates the gradient at ``y + rho g / ||g||`` (``g``: the gradient at ``y``) and takes the
step at ``y``. :func:`sam_offsets` computes the ascent offsets (the norm over every parameter's
gradient together, in float64) and :func:`perturbed` moves the parameters there for the block
and back afterwards.

Example:
    >>> import torch
    >>> p = torch.zeros(2)
    >>> eps = sam_offsets([torch.tensor([3.0, 4.0])], rho=1.0)
    >>> with perturbed([p], eps):
    ...     print(p.tolist())
    [0.6000000238418579, 0.800000011920929]
    >>> p.tolist()
    [0.0, 0.0]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["perturbed", "sam_offsets"]


def sam_offsets(grads: Sequence[Tensor], rho: float) -> list[Tensor]:
    """``rho * g / (||g|| + 1e-12)`` per tensor, ``||g||`` the global 2-norm of all of ``grads``."""
    with torch.no_grad():
        norm = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads))
        scale = rho / (norm + 1e-12)
        return [g.detach() * scale for g in grads]


@contextlib.contextmanager
def perturbed(params: Sequence[Tensor], offsets: Sequence[Tensor]) -> Iterator[None]:
    """Add ``offsets`` to ``params`` in place for the block, subtract them again after it."""
    with torch.no_grad():
        for p, e in zip(params, offsets):
            p.add_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, e in zip(params, offsets):
                p.sub_(e)
