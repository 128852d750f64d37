"""Top-k sparsification with Deep Gradient Compression's machinery (:class:`TopK`).

Formulas and references: ``docs/algorithms.md`` (Compression).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_float, check_int, check_seed
from lightning_fedopt.compression import kernels
from lightning_fedopt.compression.base import Compressor, Payload, check_unit, stable_seed

__all__ = ["TopK"]


# ====================================================================== top-k / DGC
class TopK(Compressor):
    """Top-k sparsification with Deep Gradient Compression's machinery (Lin et al., arXiv 1712.01887).

    Per key: optional local gradient clipping (``||g|| <= clip_norm / sqrt(N)``), momentum correction
    ``u <- m u + g; v <- v + u`` (``momentum=0``: plain error accumulation ``v <- v + g``), a
    threshold from the top-k of a strided random sample of ``|v|`` (``sample_fraction`` of the
    entries; lowered x0.8 up to 10 times while fewer than k entries pass, exact top-k among the
    candidates when more pass), then momentum factor masking ``v[idx] = u[idx] = 0``. Exactly
    ``k = ceil(density * n)`` values and int32 indices travel, so every replica's payload has the
    same size. A warm-up schedule lowers the density stage by stage (``warmup_densities``, each for
    ``warmup_steps`` calls of that key). With momentum correction the optimizer itself should run
    without momentum (DGC's recipe).

    Args:
        density: fraction of values sent, in (0, 1].
        momentum: DGC's momentum ``m`` in [0, 1).
        clip_norm: the global gradient clipping norm (> 0) or None. As in DGC ("local gradient
            clipping ... we scale the threshold by N^-1/2", N the number of training nodes), each
            rank clips its own gradient at ``clip_norm / sqrt(N)``, so that N independent
            gradients of that norm add up to about ``clip_norm``. N is the world size of the
            compressed all-reduce, which tells the compressor (:meth:`set_world_size`); used on
            its own (e.g. by CHOCO-gossip, outside that collective) N is 1 and the threshold is
            ``clip_norm`` itself.
        sample_fraction: fraction of entries sampled for the threshold, in (0, 1].
        warmup_densities: densities of the warm-up stages (each in (0, 1]), e.g.
            ``(0.25, 0.063, 0.015, 0.004)``.
        warmup_steps: calls per warm-up stage (>= 1).
        error_feedback: accumulate what was not sent (DGC: True); False is plain top-k.
        seed: base seed of the sample positions.

    Example:
        >>> c = TopK(density=0.25, error_feedback=False)
        >>> p = c.compress(torch.tensor([0.1, -3.0, 0.2, 2.0, 0.0, 0.3, -0.4, 0.5]))
        >>> p.tensors[1].tolist(), c.decompress(p).tolist()
        ([1, 3], [0.0, -3.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    """

    name = "topk"
    collective = "gather"

    def __init__(
        self,
        density: float = 0.001,
        *,
        momentum: float = 0.0,
        clip_norm: float | None = None,
        sample_fraction: float = 0.01,
        warmup_densities: Sequence[float] = (),
        warmup_steps: int = 1,
        error_feedback: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.density = check_unit("density", density)
        self.momentum = check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.clip_norm = check_float("clip_norm", clip_norm, low=0.0, low_open=True, allow_none=True)
        self.sample_fraction = check_unit("sample_fraction", sample_fraction)
        if isinstance(warmup_densities, (str, bytes)) or not isinstance(warmup_densities, Sequence):
            raise ValueError(
                f"`warmup_densities` must be a sequence of numbers in (0, 1], got {warmup_densities!r}"
            )
        self.warmup_densities = tuple(
            check_unit(f"warmup_densities[{i}]", d) for i, d in enumerate(warmup_densities)
        )
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        self.error_feedback = check_bool("error_feedback", error_feedback)
        self.seed = check_seed("seed", seed)

    @override
    def _repr_args(self) -> dict[str, Any]:
        return {"density": self.density, "momentum": self.momentum, "error_feedback": self.error_feedback}

    @property
    def local_clip_norm(self) -> float | None:
        """The threshold each rank clips at: ``clip_norm / sqrt(world_size)`` (None: no clipping)."""
        if self.clip_norm is None:
            return None
        return self.clip_norm / math.sqrt(max(1, self.world_size))

    def density_at(self, call: int) -> float:
        """Density of the ``call``-th compression of a key (warm-up stages, then ``density``)."""
        stage = call // self.warmup_steps
        return self.warmup_densities[stage] if stage < len(self.warmup_densities) else self.density

    def k_for(self, numel: int, call: int = 1 << 62) -> int:
        return max(1, math.ceil(self.density_at(call) * numel))

    def _select(self, v: Tensor, k: int, seed: int) -> Tensor:
        n = v.numel()
        a = v.abs()
        n_s = int(n * self.sample_fraction)
        if k >= n:
            return torch.arange(n, device=v.device)
        if n_s < 16 or k * 4 >= n:  # too small to sample: exact top-k
            return torch.topk(a, k, sorted=False).indices.sort().values
        gen = torch.Generator().manual_seed(seed)
        stride = n // n_s
        start = int(torch.randint(stride, (1,), generator=gen))
        sample = a[start::stride][:n_s]
        k_s = max(1, math.ceil(k / n * n_s))
        thr = float(torch.topk(sample, k_s, sorted=False).values.min())
        idx = None
        for _ in range(10):
            idx, vals = kernels.compact_above(v, thr)
            if idx.numel() >= k:
                break
            thr *= 0.8
        if idx is None or idx.numel() < k:
            return torch.topk(a, k, sorted=False).indices.sort().values
        if idx.numel() > k:  # DGC: exact top-k among the candidates (also when <= 1.3k: k is fixed)
            idx = idx[torch.topk(vals.abs(), k, sorted=False).indices].sort().values
        return idx

    @override
    def _compress(self, x: Tensor, key: str, salt: int) -> tuple[list[Tensor], None]:
        call = self._count(key)
        k = self.k_for(x.numel(), call)
        threshold = self.local_clip_norm
        if threshold is not None:
            norm = float(torch.linalg.vector_norm(x))
            if norm > threshold:
                x = x * (threshold / norm)
        if self.error_feedback:
            v = self._buffer(key, "v", x)
            if self.momentum > 0:
                u = self._buffer(key, "u", x)
                u.mul_(self.momentum).add_(x)
                v.add_(u)
            else:
                v.add_(x)
        else:
            v = x
        idx = self._select(v, k, stable_seed(self.seed, key, salt, call))
        values = v[idx].clone()
        if self.error_feedback:
            v[idx] = 0.0
            if self.momentum > 0:
                self._state[key]["u"][idx] = 0.0
        return [values, idx.to(torch.int32)], None

    @override
    def _decompress_sum(self, payloads: list[Payload]) -> Tensor:
        acc = torch.zeros(payloads[0].numel, dtype=torch.float32, device=payloads[0].tensors[0].device)
        for p in payloads:
            acc.index_add_(0, p.tensors[1].long(), p.tensors[0].float())
        return acc

    @override
    def compressed_nbytes(self, numel: int) -> int:
        return 8 * self.k_for(numel)
