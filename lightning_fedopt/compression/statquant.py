"""Dense statistical quantization with error feedback (:class:`StatQuant`): MuLoCo's 2-bit message.

Thérien, Huang, Rish & Belilovsky, "MuLoCo: Muon is a practical inner optimizer for DiLoCo"
(arXiv 2505.23725): DiLoCo with Muon as the inner optimizer and an error-feedback accumulator
compresses the pseudo-gradient "to 2-bits with next to no performance degradation" (abstract,
v1; Figure 1: 2-bit quantization with error feedback, K = 8 workers, H = 30). The authors'
summary of their compression study (bentherien/muloco-1, ``muloco-1.md``): "4-bit quantization is
effectively lossless", "2-bit statistical quantization works well; 2-bit linear quantization
degrades". Per replica and tensor (``x`` the pseudo-gradient, ``e`` the replica's buffer)::

    e    <- beta * e + x           error feedback (beta = 1: the classic accumulator)
    m     = Q(e)                   every value coded to one of 2**bits statistical levels
    e    <- e - m                  the quantization error stays in the buffer
    send m

``Q`` is a statistical quantizer of the kind the same group's SparseLoCo uses
(:mod:`.sparseloco`: bins from the mean and standard deviation, each code decoded to the mean of
its values), applied to every value instead of a top-k. With ``B = 2**bits`` levels, ``mu`` the
mean of the tensor and ``s`` the unbiased standard deviation of ``e - mu``, the ``B`` bins of
width ``h = range_sigmas * s / B`` (``h = 1`` when ``s`` is 0) are centred on ``mu`` (the outer
two open-ended): a value's code is ``clamp(floor((e - mu) / h + B / 2), 0, B - 1)``, and code
``b`` decodes to ``mu + mean{e - mu : code b}`` (the mean of the values that got it, in float64,
rounded once to float32). SparseLoCo's rule ``round((e - mu) / h + B // 2)`` centres a bin on
``mu`` instead, which leaves the positive tail one level and, at ``B = 2``, codes every value
alike; centring the bins makes 1 bit the sign around the mean and 2 bits two levels a side. A
"linear" quantizer (absmax blocks, :class:`~lightning_fedopt.compression.Int4`) spaces its levels
evenly between the extremes instead.

Wire, per tensor of ``n`` values (exactly :meth:`StatQuant.compressed_nbytes`): the ``n`` codes
packed ``8 // bits`` to a byte (``ceil(n bits / 8)`` bytes) and the ``B`` float32 levels
(``4 B`` bytes); no indices. Messages travel through the compressed all-reduce's ``"gather"``
scheme: every replica's message is all-gathered and every rank averages the decoded messages,
``mean_r m_r``, as the paper's update has it (no second quantization of the mean). A tensor whose
message would not be smaller than its dense bytes (fewer than ~5 values at 2 bits) travels dense
and exact.

Example:
    >>> c = StatQuant(bits=2)
    >>> x = torch.tensor([0.1, -3.0, 0.2, 2.0, 0.0, 0.3, -0.4, 0.5])
    >>> p = c.compress(x, "w")
    >>> p.nbytes == c.compressed_nbytes(8) == 2 + 4 * 4       # 8 codes in 2 bytes, 4 levels
    True
    >>> sent = c.decompress(p)
    >>> [round(v, 4) for v in sent.tolist()]     # two levels below the mean, one above (used)
    [0.5167, -3.0, 0.5167, 0.5167, 0.5167, 0.5167, -0.4, 0.5167]
    >>> bool(torch.allclose(c.state_dict()["w"]["error"], x - sent))   # the error stays
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_choice, check_float
from lightning_fedopt.compression.base import Compressor, Payload, pack_codes, unpack_codes

__all__ = ["BITS", "StatQuant", "statistical_quantize"]

#: the code widths :class:`StatQuant` accepts (a whole number of codes per byte)
BITS = (1, 2, 4, 8)


def statistical_quantize(v: Tensor, bits: int, range_sigmas: float) -> tuple[Tensor, Tensor]:
    """Codes (``uint8`` in ``[0, 2**bits)``, one per value of flat fp32 ``v``) and the ``2**bits``
    float32 levels they stand for (module doc; an unused level is ``mu``).

    Example:
        >>> codes, levels = statistical_quantize(torch.tensor([1.0, 1.0, 5.0, 5.0]), 1, 6.0)
        >>> codes.tolist(), levels.tolist()
        ([0, 0, 1, 1], [1.0, 5.0])
    """
    b = 1 << bits
    mu = v.mean()
    c = v - mu
    n = v.numel()
    s = c.norm() / math.sqrt(n - 1) if n > 1 else torch.zeros((), device=v.device)
    step = range_sigmas * s / b
    step = torch.where(torch.isfinite(step) & (step > 0), step, torch.ones_like(step))
    codes = torch.floor(c / step + b / 2).clamp(0, b - 1).to(torch.uint8)
    idx = codes.long()
    sums = torch.zeros(b, dtype=torch.float64, device=v.device).index_add_(0, idx, c.double())
    counts = torch.zeros(b, dtype=torch.float64, device=v.device).index_add_(
        0, idx, torch.ones(n, dtype=torch.float64, device=v.device)
    )
    table = torch.where(counts > 0, sums / counts.clamp(min=1.0), torch.zeros_like(sums)).float()
    return codes, table + mu


class StatQuant(Compressor):
    """Dense statistical quantization with error feedback (module doc): ``e <- beta e + x``,
    every value of ``e`` coded to one of ``2**bits`` levels, ``e <- e - sent`` (per key).

    Args:
        bits: bits per value, 1, 2, 4 or 8 (MuLoCo's headline setting: 2).
        beta: decay of the error-feedback buffer in [0, 1] (1: the classic accumulator of
            Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019, which the MuLoCo paper
            cites for its accumulator).
        range_sigmas: width of the ``2**bits`` bins together, in standard deviations (> 0; the
            same group's SparseLoCo code: 6).
        error_feedback: keep the buffer ``e`` (default True; False: each call quantizes its input).

    Example:
        >>> StatQuant().compressed_nbytes(1000)          # 250 bytes of 2-bit codes + 4 fp32 levels
        266
        >>> round(StatQuant().ratio(1 << 20), 2)          # vs fp32
        16.0
    """

    name = "statquant"
    collective = "gather"

    def __init__(
        self,
        bits: int = 2,
        *,
        beta: float = 1.0,
        range_sigmas: float = 6.0,
        error_feedback: bool = True,
    ) -> None:
        super().__init__()
        self.bits = check_choice("bits", bits, BITS)
        self.beta = check_float("beta", beta, low=0.0, high=1.0)
        self.range_sigmas = check_float("range_sigmas", range_sigmas, low=0.0, low_open=True)
        self.error_feedback = check_bool("error_feedback", error_feedback)

    @property
    def levels(self) -> int:
        """Quantization levels ``B = 2**bits``."""
        return 1 << self.bits

    @override
    def _repr_args(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "beta": self.beta,
            "range_sigmas": self.range_sigmas,
            "error_feedback": self.error_feedback,
        }

    # ------------------------------------------------------------------ packing
    def pack(self, codes: Tensor) -> Tensor:
        """Codes (``uint8``, each below ``2**bits``) packed ``8 // bits`` to a byte, the first code
        in the lowest bits; the last byte is padded with zero codes."""
        return pack_codes(codes, self.bits)

    def unpack(self, packed: Tensor, n: int) -> Tensor:
        """The first ``n`` codes of :meth:`pack`'s bytes, as int64."""
        return unpack_codes(packed, n, self.bits)

    # ------------------------------------------------------------------ Compressor
    @override
    def _compress(self, x: Tensor, key: str, salt: int) -> tuple[list[Tensor], None]:
        if self.error_feedback:
            e = self._buffer(key, "error", x)
            e.mul_(self.beta).add_(x)
            a = e
        else:
            a = x
        codes, levels = statistical_quantize(a, self.bits, self.range_sigmas)
        if self.error_feedback:
            a.sub_(levels[codes.long()])
        return [self.pack(codes), levels], None

    @override
    def _decompress_sum(self, payloads: list[Payload]) -> Tensor:
        n, dev = payloads[0].numel, payloads[0].tensors[0].device
        acc = torch.zeros(n, dtype=torch.float32, device=dev)
        for p in payloads:
            packed, levels = p.tensors
            acc += levels.float()[self.unpack(packed, n)]
        return acc

    @override
    def compressed_nbytes(self, numel: int) -> int:
        return -(-numel * self.bits // 8) + 4 * self.levels
