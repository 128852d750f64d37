"""DIMAT alignment inside gossip (``GossipStrategy(align="dimat")``): the adapter between the
strategy's flat list of tracked tensors and :mod:`lightning_fedopt.dimat`, which permutes an
``nn.Sequential``.

Before merging, every received model's hidden units are permuted to match this replica's by
activation matching on the gossip step's training batch; after merging, BatchNorm statistics are
re-estimated on it (Saadati et al., "DIMAT", CVPR 2024).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fedopt.dimat import align, check_permutable, recompute_batchnorm
from lightning_fedopt.runtime.reduce import all_finite

__all__ = ["DimatAligner"]


class DimatAligner:
    """Aligns received models to this replica's ``nn.Sequential`` ``seq`` (module attribute ``prefix``).

    Build it with :meth:`for_module`. :meth:`capture` keeps the input of the training batch of
    a gossip step, :meth:`align_received` permutes the received models, :meth:`recompute_batchnorm`
    re-estimates the merged model's BatchNorm statistics.
    """

    def __init__(self, seq: nn.Sequential, prefix: str) -> None:
        self.seq = seq
        self.prefix = prefix
        self.inputs: Tensor | None = None

    @classmethod
    def for_module(cls, module: nn.Module, align_module: str | None) -> DimatAligner:
        """The aligner of ``module``'s ``nn.Sequential`` at attribute path ``align_module`` (default:
        its only ``nn.Sequential`` child).

        Raises:
            ValueError: no unique ``nn.Sequential`` child, or one DIMAT cannot permute.
        """
        if align_module is None:
            found = [n for n, m in module.named_children() if isinstance(m, nn.Sequential)]
            if len(found) != 1:
                raise ValueError(
                    f"`align='dimat'`: cannot tell which nn.Sequential to permute (children: {found}); pass `align_module`"
                )
            name = found[0]
        else:
            name = align_module
        seq = module.get_submodule(name)
        check_permutable(seq)  # a clear ValueError for an architecture DIMAT cannot permute
        return cls(seq, name + ".")  # type: ignore[arg-type]

    def capture(self, batch: Any) -> None:
        """Keep the input of ``batch`` (its first element) for the next alignment.

        Raises:
            ValueError: the batch's first element is not a tensor.
        """
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(x, Tensor):
            raise ValueError(
                "`align='dimat'` needs the first element of a training batch to be the input tensor"
            )
        self.inputs = x.detach().clone()

    def align_received(self, names: list[str], received: dict[int, list[Tensor]]) -> dict[int, list[Tensor]]:
        """Each finite received model (tensors in the order of ``names``) with its hidden units
        permuted to match this replica's on the captured batch (unchanged before any capture)."""
        if self.inputs is None:
            return received
        prefix = self.prefix
        out = {}
        for j, model in received.items():
            if not all_finite(model):
                out[j] = model
                continue
            theirs = copy.deepcopy(self.seq)
            state = theirs.state_dict()
            with torch.no_grad():
                for n, v in zip(names, model):
                    if n.startswith(prefix) and n[len(prefix) :] in state:
                        state[n[len(prefix) :]].copy_(v)
            aligned = align(self.seq, theirs, self.inputs).state_dict()
            out[j] = [
                aligned[n[len(prefix) :]].detach().clone()
                if n.startswith(prefix) and n[len(prefix) :] in aligned
                else v
                for n, v in zip(names, model)
            ]
        return out

    def recompute_batchnorm(self) -> None:
        """Re-estimate the BatchNorm statistics of the (merged) model on the captured batch."""
        if self.inputs is not None:
            recompute_batchnorm(self.seq, self.inputs)
