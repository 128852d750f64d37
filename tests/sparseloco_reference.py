"""A single-process reference of SparseLoCo's message (chunked top-k, 2-bit levels, error feedback)."""

from __future__ import annotations

import math

import torch


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- the reference
def ref_k(length: int, topk: int, chunk: int) -> int:
    return min(length, max(1, round(length * topk / chunk)))


def ref_message(e: torch.Tensor, topk: int, chunk: int, bits: int = 2, sigmas: float = 6.0) -> torch.Tensor:
    """What a replica with buffer ``e`` (flat fp32) sends, as a dense vector (zeros elsewhere)."""
    pos = []
    for start in range(0, e.numel(), chunk):
        piece = e[start : start + chunk]
        pos += (torch.topk(piece.abs(), ref_k(piece.numel(), topk, chunk)).indices + start).tolist()
    pos_t = torch.tensor(sorted(pos))
    v = e[pos_t]
    b = 2**bits
    mu = v.mean()
    c = v - mu
    s = float(c.norm()) / math.sqrt(v.numel() - 1) if v.numel() > 1 else 0.0
    h = sigmas * s / b if s > 0 else 1.0
    codes = torch.clamp(torch.round(c / torch.tensor(h, dtype=torch.float32) + b // 2), 0, b - 1).long()
    values = torch.empty_like(v)
    for code in codes.unique().tolist():
        hit = codes == code
        values[hit] = mu + c[hit].mean()
    out = torch.zeros_like(e)
    out[pos_t] = values
    return out


def ref_nbytes(numel: int, topk: int, chunk: int, bits: int) -> int:
    """``K`` int16 indices + ``K`` codes of ``bits`` bits packed into bytes + ``2**bits`` fp32 levels."""
    full, tail = divmod(numel, chunk)
    k = full * ref_k(chunk, topk, chunk) + (ref_k(tail, topk, chunk) if tail else 0)
    return 2 * k + math.ceil(k * bits / 8) + 4 * 2**bits


class RefSparseLoCo:
    """One replica's error-feedback buffers (per name) and its messages."""

    def __init__(self, topk: int, chunk: int, beta: float, bits: int = 2) -> None:
        self.topk, self.chunk, self.beta, self.bits = topk, chunk, beta, bits
        self.e: dict[str, torch.Tensor] = {}

    def send(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        e = self.e.setdefault(name, torch.zeros(delta.numel()))
        e.mul_(self.beta).add_(delta.reshape(-1).float())
        sent = ref_message(e, self.topk, self.chunk, self.bits)
        e.sub_(sent)
        return sent


# ---------------------------------------------------------------------- compressor vs reference
