"""SparseLoCo's message: error feedback, chunked top-k and 2-bit values (:class:`SparseLoCo`).

Sarfi, Thérien, Lidin & Belilovsky, "Communication Efficient LLM Pre-training with SparseLoCo"
(arXiv 2508.15706). SparseLoCo is DiLoCo whose global outer momentum is replaced by a
per-replica error-feedback buffer ``e_r``, through which the pseudo-gradient travels sparse and
quantized. One outer round, for every replica ``r`` (``phi``: the outer weights)::

    Delta_r = phi - theta_r                 pseudo-gradient after H inner steps
    e_r    <- beta * e_r + Delta_r          error feedback (the local "outer momentum")
    m_r     = Q(TopK(e_r))                  top-k of every chunk, values quantized to 2 bits
    e_r    <- e_r - m_r                     what was sent leaves the buffer, the rest stays
    phi    <- phi - lr * mean_r m_r         outer SGD without momentum

The compressor is the three middle lines: it is used through the compressed all-reduce's
``"gather"`` scheme (each rank's message all-gathered, decoded and averaged by every rank), so
``DiLoCoStrategy(compressor=SparseLoCo(), outer_optimizer="SGD", outer_kwargs={"lr": 1.0})`` runs
the algorithm (plain SGD: the error-feedback buffer takes the place of DiLoCo's Nesterov momentum).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_choice, check_float, check_int
from lightning_fedopt.compression.base import Compressor, Payload, pack_codes, unpack_codes

__all__ = ["SparseLoCo"]

#: chunk-local indices travel as int16
MAX_CHUNK = 32768
#: what :attr:`SparseLoCo.average` may be
AVERAGES = ("replicas", "senders")
_BITS = (1, 2, 4, 8)


class SparseLoCo(Compressor):
    """SparseLoCo's compressor: ``e <- beta e + x``, chunked top-k of ``e``, values quantized to
    ``bits`` bits, ``e <- e - sent`` (per key; module doc for the algorithm around it).

    Each tensor is flattened and cut into runs of ``chunk`` values (the last run may be shorter);
    from every run of ``L`` values the ``k = max(1, round(L * topk / chunk))`` (at most ``L``)
    largest ``|e|`` are selected: ``topk`` per full chunk, a density of ``topk / chunk``. The
    selected values of the whole tensor are quantized together, as in the authors' code: with
    ``B = 2**bits`` levels, ``mu`` their mean and ``s`` the unbiased standard deviation of
    ``v - mu``, a value's code is ``clamp(round((v - mu) / h + B // 2), 0, B - 1)`` for a step
    ``h = range_sigmas * s / B`` (``h = 1`` when ``s`` is 0), and code ``b`` stands for
    ``mu + mean{v - mu : code b}`` (the mean of the values that got it, not the bin's centre).
    What was sent is decoded the same way by the sender and subtracted from ``e``, so the
    quantization error stays in the buffer as well.

    Wire (per tensor, exactly :meth:`compressed_nbytes`): ``K`` chunk-local int16 indices, ``K``
    codes packed ``8 // bits`` to a byte, and ``B`` fp32 levels: ``2K + ceil(K bits / 8) + 4B``
    bytes for ``K`` selected values. Every replica selects the same number of values, so the
    messages have one size and are all-gathered.

    Compared with the authors' code (``SparseLoCo`` in ``src/tplr/sparseloco.py`` of
    tplr-ai/SparseLoCo):

    * chunks are runs of the flattened tensor; theirs are 2-D tiles (a matrix split into tiles of
      ``h x w`` values, ``h`` and ``w`` the largest divisors of its sides up to 64, so 64 x 64 =
      4096 values when the sides are multiples of 64; a vector into runs of at most 64 values)
      with ``k = max(1, round(tile * top_k / 64**2))``: the same density per chunk;
    * ``average="replicas"`` (default) is the paper's outer update, ``mean_r m_r`` (a coordinate
      sent by one replica of ``R`` counts ``1/R``); their all-gather decodes with
      ``scatter_reduce(reduce="mean", include_self=False)``, i.e. each coordinate is the mean over
      the replicas that *sent* it: ``average="senders"``;
    * their buffer adds ``lr * Delta`` with the outer SGD's ``lr`` and the outer step multiplies by
      ``lr`` again; with their ``lr = 1`` this is the paper's ``e <- beta e + Delta`` used here;
    * their simulation all-gathers int64 indices and a byte per code; here indices are int16 and
      codes are packed, and the bytes counted are the bytes sent;
    * a tensor whose message would not be smaller than its dense bytes (a handful of values)
      travels dense and exact through the compressed all-reduce, without error feedback.

    Args:
        topk: values selected per full chunk (1 <= topk <= chunk); the authors' run: 128.
        chunk: values per chunk (1 <= chunk <= 32768); the authors' run: 4096 (64 x 64 tiles).
        beta: decay of the error-feedback buffer in [0, 1] (the authors' ``error_decay``: 0.95 in
            their SparseLoCo run, 0.999 their code's default).
        bits: bits per selected value, 1, 2, 4 or 8 (the authors' run: 2, i.e. 4 bins).
        range_sigmas: width of the ``B`` bins together, in standard deviations (> 0; theirs: 6).
        average: ``"replicas"`` (the paper) or ``"senders"`` (the authors' code), see above.
        error_feedback: keep the buffer ``e`` (default True; False: each call sends the top-k of
            its own input, e.g. for CHOCO-gossip, which is its own error feedback).

    Example:
        >>> c = SparseLoCo(topk=2, chunk=4, beta=0.5)
        >>> x = torch.tensor([0.1, -3.0, 0.2, 2.0, 0.0, 0.3, -0.4, 0.5])
        >>> p = c.compress(x, "w")          # -3, 2 from the first chunk, -0.4, 0.5 from the second
        >>> p.nbytes == c.compressed_nbytes(8) == 2 * 4 + 1 + 4 * 4
        True
        >>> [round(v, 4) for v in c.decompress(p).tolist()]   # -0.4 and 0.5 share a level
        [0.0, -3.0, 0.0, 2.0, 0.0, 0.0, 0.05, 0.05]
        >>> [round(v, 4) for v in c.state_dict()["w"]["error"].tolist()]   # x minus what was sent
        [0.1, 0.0, 0.2, 0.0, 0.0, 0.3, -0.45, 0.45]
    """

    name = "sparseloco"
    collective = "gather"

    def __init__(
        self,
        topk: int = 128,
        chunk: int = 4096,
        *,
        beta: float = 0.95,
        bits: int = 2,
        range_sigmas: float = 6.0,
        average: str = "replicas",
        error_feedback: bool = True,
    ) -> None:
        super().__init__()
        self.chunk = check_int("chunk", chunk, low=1, high=MAX_CHUNK)
        self.topk = check_int("topk", topk, low=1)
        if self.topk > self.chunk:
            raise ValueError(f"`topk` must be at most `chunk` ({self.chunk}), got {topk!r}")
        self.beta = check_float("beta", beta, low=0.0, high=1.0)
        self.bits = check_choice("bits", bits, _BITS)
        self.range_sigmas = check_float("range_sigmas", range_sigmas, low=0.0, low_open=True)
        self.average = check_choice("average", average, AVERAGES)
        self.error_feedback = check_bool("error_feedback", error_feedback)

    @property
    def density(self) -> float:
        """Fraction of a full chunk that is sent: ``topk / chunk``."""
        return self.topk / self.chunk

    @property
    def levels(self) -> int:
        """Quantization levels ``B = 2**bits``."""
        return 1 << self.bits

    @override
    def _repr_args(self) -> dict[str, Any]:
        return {
            "topk": self.topk,
            "chunk": self.chunk,
            "beta": self.beta,
            "bits": self.bits,
            "range_sigmas": self.range_sigmas,
            "average": self.average,
            "error_feedback": self.error_feedback,
        }

    # ------------------------------------------------------------------ layout
    def k_for(self, length: int) -> int:
        """Values selected from a chunk of ``length`` values."""
        return min(length, max(1, round(length * self.topk / self.chunk)))

    def selected(self, numel: int) -> int:
        """``K``: values selected from a tensor of ``numel`` values."""
        full, tail = divmod(numel, self.chunk)
        return full * self.k_for(self.chunk) + (self.k_for(tail) if tail else 0)

    def _chunk_starts(self, numel: int, device: torch.device) -> Tensor:
        """The start of the chunk of each selected value, in message order (int64, ``K`` values)."""
        full, tail = divmod(numel, self.chunk)
        kf = self.k_for(self.chunk)
        starts = torch.arange(full, device=device, dtype=torch.int64).repeat_interleave(kf) * self.chunk
        if tail:
            starts = torch.cat([starts, torch.full((self.k_for(tail),), full * self.chunk, device=device)])
        return starts

    def _select(self, a: Tensor) -> Tensor:
        """Chunk-local indices of the top-k of ``|a|`` in every chunk (ascending within a chunk,
        chunks in order), int64."""
        full, tail = divmod(a.numel(), self.chunk)
        parts = []
        if full:
            blocks = a[: full * self.chunk].view(full, self.chunk).abs()
            idx = torch.topk(blocks, self.k_for(self.chunk), dim=1, sorted=False).indices
            parts.append(idx.sort(dim=1).values.reshape(-1))
        if tail:
            idx = torch.topk(a[full * self.chunk :].abs(), self.k_for(tail), sorted=False).indices
            parts.append(idx.sort().values)
        return torch.cat(parts)

    # ------------------------------------------------------------------ quantization
    def _quantize(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Codes (uint8 in ``[0, B)``, one per value) and the ``B`` fp32 levels they stand for."""
        b = self.levels
        mu = v.mean()
        c = v - mu
        n = v.numel()
        std = c.norm() / math.sqrt(n - 1) if n > 1 else torch.zeros((), device=v.device)
        step = self.range_sigmas * std / b
        step = torch.where(torch.isfinite(step) & (step > 0), step, torch.ones_like(step))
        codes = (c / step + b // 2).round().clamp(0, b - 1).to(torch.uint8)
        sums = torch.zeros(b, device=v.device).scatter_add_(0, codes.long(), c)
        counts = torch.zeros(b, device=v.device).scatter_add_(0, codes.long(), torch.ones_like(c))
        table = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        return codes, table + mu

    # ------------------------------------------------------------------ Compressor
    @override
    def _compress(self, x: Tensor, key: str, salt: int) -> tuple[list[Tensor], None]:
        if self.error_feedback:
            e = self._buffer(key, "error", x)
            e.mul_(self.beta).add_(x)
            a = e
        else:
            a = x
        local = self._select(a)
        pos = self._chunk_starts(a.numel(), a.device) + local
        codes, levels = self._quantize(a[pos])
        if self.error_feedback:
            a[pos] -= levels[codes.long()]
        return [local.to(torch.int16), pack_codes(codes, self.bits), levels], None

    def _decoded(self, p: Payload, starts: Tensor) -> tuple[Tensor, Tensor]:
        """Positions (int64) and values (fp32) of one message."""
        local, packed, levels = p.tensors
        pos = starts + local.long()
        return pos, levels.float()[unpack_codes(packed, local.numel(), self.bits)]

    @override
    def _decompress_sum(self, payloads: list[Payload]) -> Tensor:
        n, dev = payloads[0].numel, payloads[0].tensors[0].device
        starts = self._chunk_starts(n, dev)
        acc = torch.zeros(n, dtype=torch.float32, device=dev)
        for p in payloads:
            pos, vals = self._decoded(p, starts)
            acc.index_add_(0, pos, vals)
        return acc

    @override
    def decompress_mean(self, payloads: list[Payload]) -> Tensor:
        """``"replicas"``: the sum of the messages over their number; ``"senders"``: each coordinate
        over the number of messages that hold it (0 where none does)."""
        if self.average == "replicas":
            return super().decompress_mean(payloads)
        n, dev = payloads[0].numel, payloads[0].tensors[0].device
        starts = self._chunk_starts(n, dev)
        acc = torch.zeros(n, dtype=torch.float32, device=dev)
        count = torch.zeros(n, dtype=torch.float32, device=dev)
        for p in payloads:
            pos, vals = self._decoded(p, starts)
            acc.index_add_(0, pos, vals)
            count.index_add_(0, pos, torch.ones_like(vals))
        return acc / count.clamp(min=1.0)

    @override
    def compressed_nbytes(self, numel: int) -> int:
        k = self.selected(numel)
        return 2 * k + -(-k * self.bits // 8) + 4 * self.levels
