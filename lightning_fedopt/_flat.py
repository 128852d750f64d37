"""Flat buffers: many tensors in one contiguous buffer and back, the one implementation.

Collectives move one buffer per dtype (as DDP's buckets do) instead of one message per tensor;
compression packs a whole call before chunking. Every module that packs tensors uses these.

Example:
    >>> import torch
    >>> a, b = torch.ones(2, 2), torch.zeros(3)
    >>> flat = flatten([a, b])
    >>> flat.tolist()
    [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    >>> [t.shape for t in unflatten(flat, [a, b])]
    [torch.Size([2, 2]), torch.Size([3])]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["flatten", "group_by_dtype", "unflatten", "unflatten_into"]


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """The tensors' values, detached, in one new 1-D tensor (cast to ``dtype`` when given).

    Always a fresh buffer, so the caller may modify it (e.g. as a collective's output).
    """
    parts = [t.detach().reshape(-1) if dtype is None else t.detach().reshape(-1).to(dtype) for t in tensors]
    if not parts:
        return torch.empty(0, dtype=dtype or torch.float32)
    if len(parts) == 1:
        return parts[0].clone()
    return torch.cat(parts)


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split ``flat`` into views shaped like ``like`` (cast to each one's dtype where it differs)."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        piece = flat[offset : offset + n].view_as(t)
        out.append(piece if piece.dtype == t.dtype else piece.to(t.dtype))
        offset += n
    return out


def unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy ``flat`` back into ``tensors`` in place (the inverse of :func:`flatten`)."""
    for t, piece in zip(tensors, unflatten(flat, tensors)):
        t.copy_(piece)


def group_by_dtype(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), in order of first appearance."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return list(groups.values())
