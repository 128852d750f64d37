"""Averaging the optimizers' per-parameter statistics across replicas (Local SGD's
``average_optimizer_state=True``): momentum buffers and Adam's moments, weighted like the model."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fedopt.comm import Communicator
from lightning_fedopt.runtime.reduce import masked_sum

__all__ = ["average_optimizer_state", "optimizer_state_tensors"]


def optimizer_state_tensors(optimizers: Sequence[Any]) -> list[Tensor]:
    """The optimizers' per-parameter statistics: floating state tensors shaped like their
    parameter (momentum, Adam's moments), in a fixed order. Step counters and other scalars are
    left out."""
    out = []
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p, {})
                for key in sorted(state):
                    v = state[key]
                    if isinstance(v, Tensor) and torch.is_floating_point(v) and v.shape == p.shape:
                        out.append(v)
    return out


def average_optimizer_state(comm: Communicator, optimizers: Sequence[Any], weight: float) -> None:
    """Replace every replica's optimizer statistics by their weighted mean over the replicas with
    finite statistics and ``weight > 0`` (one all-reduce, purpose ``"sync"``); nothing changes
    when no replica qualifies.

    Raises:
        RuntimeError: the replicas' optimizer states differ in structure (one small all-gather checks it).
    """
    tensors = optimizer_state_tensors(optimizers)
    # a SHA-256 of the structure, 32 uint8 per rank: fixed layout, nothing for a peer to unpickle
    signature = ";".join(f"{tuple(t.shape)}{t.dtype}" for t in tensors)
    digest = torch.frombuffer(bytearray(hashlib.sha256(signature.encode()).digest()), dtype=torch.uint8)
    digests = comm.all_gather(digest, purpose="control").wait()
    if any(not torch.equal(d, digests[0]) for d in digests):
        raise RuntimeError(
            "average_optimizer_state: the replicas' optimizer states differ in structure "
            "(e.g. a parameter that received no gradient on some ranks); cannot average them"
        )
    if not tensors:
        return
    s = masked_sum(comm, tensors, weight=weight, purpose="sync").wait()
    if s.weight <= 0:
        return
    with torch.no_grad():
        for t, mean in zip(tensors, s.mean()):
            t.copy_(mean)
