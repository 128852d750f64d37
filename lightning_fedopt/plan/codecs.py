"""What a compressor puts on the wire: exact bytes per round, mirroring the library's compressors.

A :class:`Codec` is the planner's picture of a compressor of :mod:`lightning_fedopt.compression`
(without importing it, or torch): :meth:`Codec.nbytes` is the compressor's ``compressed_nbytes``,
and :func:`wire_bytes` the bytes one replica sends in one compressed all-reduce of
:func:`lightning_fedopt.compression.collective.all_reduce_compressed`, as
:class:`~lightning_fedopt.comm.Communicator` counts them:

==============  =========================================  ===============================================
codec           bytes of ``n`` values (``nbytes``)          one round, ``N`` replicas, ``P`` values
==============  =========================================  ===============================================
``none``        ``4 n`` (the tensors' own dtype)           all-reduce: ``2 (N-1)/N * 4 P``
``fp16/bf16``   ``2 n``                                    chunked: ``(N-1) (2 nbytes(ceil(P/N)) + 5)``
``int8``        ``n + 4 ceil(n / block)``                  chunked
``int4``        ``ceil(n / 2) + 4 ceil(n / block)``        chunked
``sign``        ``ceil(n / 8) + 4``                        chunked
``topk``        ``8 max(1, ceil(d n))`` (fp32 + int32)     all-gather: ``(N-1) (1 + sum_t nbytes(n_t))``
``sparseloco``  ``2 K + ceil(K bits / 8) + 4 * 2**bits``   all-gather
==============  =========================================  ===============================================

(``sparseloco``: ``K`` values selected, ``topk`` per full chunk of ``chunk`` values, int16
chunk-local indices, codes of ``bits`` bits packed, ``2**bits`` fp32 levels per tensor: the
library's :class:`~lightning_fedopt.compression.SparseLoCo`.)

The chunked scheme (casts, int8/int4, sign) splits the packed buffer into ``N`` chunks: an
all-to-all of one compressed chunk per rank (plus a flag byte a row), then an all-gather of the
re-compressed means (plus an int32 header): about ``2 (N-1)/N`` compressed sizes per replica,
whatever ``N``. The gather scheme (top-k) all-gathers every replica's whole compressed tensors: the
per-replica bytes grow with ``N - 1``. A buffer or tensor whose compressed form would not be smaller
than its dense bytes travels dense (as the library does).

Example:
    >>> int8 = parse_codec("int8")
    >>> int8.nbytes(300), parse_codec("int4:64").nbytes(1024)
    (308.0, 576.0)
    >>> wire_bytes(int8, [1_000_000], 4)            # ~ 1.5 x 1.0156 MB
    1523463.0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from lightning_fedopt._validate import check_choice, check_float, check_int

__all__ = [
    "CODECS",
    "SCHEMES",
    "TOPOLOGY_DEGREES",
    "Codec",
    "gossip_degree",
    "message_bytes",
    "parse_codec",
    "wire_bytes",
]

#: codec name -> the scheme that moves it ("dense": a plain all-reduce)
CODECS: dict[str, str] = {
    "none": "dense",
    "fp16": "chunked",
    "bf16": "chunked",
    "int8": "chunked",
    "int4": "chunked",
    "sign": "chunked",
    "topk": "gather",
    "sparseloco": "gather",
}
SCHEMES = ("dense", "chunked", "gather")
_ALIASES = {"fp32": "none", "dense": "none"}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Codec:
    """A compressor's size on the wire.

    Args:
        name: one of :data:`CODECS`.
        density: ``topk``: the share of values sent, in (0, 1] (the library's default: 0.001).
        block: ``int8``/``int4``: values per float32 scale (a power of two, library default 256).
        topk: ``sparseloco``: values selected per full chunk (library default 128).
        chunk: ``sparseloco``: values per chunk (library default 4096).
        bits: ``sparseloco``: bits per selected value, 1, 2, 4 or 8 (library default 2).
    """

    name: str
    density: float = 1.0
    block: int = 256
    topk: int = 128
    chunk: int = 4096
    bits: int = 2

    def __post_init__(self) -> None:
        check_choice("compressor", self.name, tuple(CODECS))
        check_float("density", self.density, low=0.0, high=1.0, low_open=True)
        check_int("block", self.block, low=1)
        check_int("chunk", self.chunk, low=1, high=32768)
        check_int("topk", self.topk, low=1, high=self.chunk)
        check_choice("bits", self.bits, (1, 2, 4, 8))

    @property
    def scheme(self) -> str:
        """How the library moves it: ``"dense"``, ``"chunked"`` or ``"gather"`` (module doc)."""
        return CODECS[self.name]

    @property
    def label(self) -> str:
        """A short name for tables: ``int8``, ``int4/b64``, ``topk 1%``, ``sparseloco 128/4096``."""
        if self.name == "topk":
            return f"topk {100 * self.density:.3g}%"
        if self.name == "sparseloco":
            return f"sparseloco {self.topk}/{self.chunk}" + (f"/{self.bits}b" if self.bits != 2 else "")
        if self.name in ("int8", "int4") and self.block != 256:
            return f"{self.name}/b{self.block}"
        return self.name

    def _k_for(self, length: int) -> int:
        # SparseLoCo.k_for (Python's round: halves to even)
        return min(length, max(1, round(length * self.topk / self.chunk)))

    def selected(self, numel: int) -> int:
        """``sparseloco``: values selected from a tensor of ``numel`` values (``K``)."""
        full, tail = divmod(int(numel), self.chunk)
        return full * self._k_for(self.chunk) + (self._k_for(tail) if tail else 0)

    def nbytes(self, numel: int, dense_bytes: float = 4.0) -> float:
        """Bytes ``numel`` values travel as (the library compressor's ``compressed_nbytes``; for
        ``none``, ``numel * dense_bytes``)."""
        n = int(numel)
        if n <= 0:
            return 0.0
        if self.name == "none":
            return n * dense_bytes
        if self.name in ("fp16", "bf16"):
            return 2.0 * n
        if self.name == "int8":
            return float(n + 4 * _ceil_div(n, self.block))
        if self.name == "int4":
            return float(_ceil_div(n, 2) + 4 * _ceil_div(n, self.block))
        if self.name == "sign":
            return float(_ceil_div(n, 8) + 4)
        if self.name == "topk":
            return 8.0 * max(1, math.ceil(self.density * n))
        # sparseloco: int16 chunk-local indices, packed codes, 2**bits fp32 levels
        k = self.selected(n)
        return float(2 * k + _ceil_div(k * self.bits, 8) + 4 * (1 << self.bits))

    def bytes_per_value(self, dense_bytes: float = 4.0) -> float:
        """Asymptotic bytes per value of a large tensor (the ``bytes_per_value`` of a
        :class:`~lightning_fedopt.plan.cost.Spec`)."""
        if self.name == "none":
            return dense_bytes
        if self.name in ("fp16", "bf16"):
            return 2.0
        if self.name == "int8":
            return 1.0 + 4.0 / self.block
        if self.name == "int4":
            return 0.5 + 4.0 / self.block
        if self.name == "sign":
            return 1.0 / 8
        if self.name == "topk":
            return 8.0 * self.density
        return self._k_for(self.chunk) * (2 + self.bits / 8) / self.chunk


def parse_codec(text: str | Codec | None) -> Codec:
    """A :class:`Codec` from ``"none"`` (or ``"fp32"``, None), ``"fp16"``, ``"bf16"``,
    ``"int8"``, ``"int8:128"`` (block), ``"int4"``, ``"int4:64"``, ``"sign"``, ``"topk"`` (density
    0.001, the library's default), ``"topk:0.01"``, ``"sparseloco"`` (128 of every 4096 values, 2-bit,
    the library's defaults), ``"sparseloco:64"`` (``topk``), ``"sparseloco:64/2048"``
    (``topk/chunk``).

    Raises:
        ValueError: naming ``compressor`` and the allowed names, or the option out of its range.

    Example:
        >>> parse_codec("topk:0.01").label, parse_codec("int8:128").bytes_per_value()
        ('topk 1%', 1.03125)
    """
    if isinstance(text, Codec):
        return text
    if text is None:
        return Codec("none")
    name, _, option = str(text).strip().lower().partition(":")
    name = _ALIASES.get(name, name)
    if name not in CODECS:
        raise ValueError(
            f"`compressor` must be one of {[*CODECS, *_ALIASES]} (topk:<density>, sparseloco:<topk>[/<chunk>], "
            f"int8:<block>, int4:<block>), got {text!r}"
        )
    if name == "topk":
        try:
            density = float(option) if option else 0.001
        except ValueError:
            raise ValueError(f"`density` of topk must be a number in (0, 1], got {option!r}") from None
        return Codec(name, density=density)
    if name == "sparseloco":
        top, _, chunk = option.partition("/")
        try:
            return Codec(name, topk=int(top) if top else 128, chunk=int(chunk) if chunk else 4096)
        except ValueError as e:
            if "`" in str(e):
                raise
            raise ValueError(
                f"`compressor` sparseloco takes sparseloco:<topk> or sparseloco:<topk>/<chunk> (integers, "
                f"1 <= topk <= chunk <= 32768), got {text!r}"
            ) from None
    if name in ("int8", "int4") and option:
        try:
            block = int(option)
        except ValueError:
            block = -1
        if block < 8 or block > 16384 or block & (block - 1):
            raise ValueError(f"`block` of {name} must be a power of two in [8, 16384], got {option!r}")
        return Codec(name, block=block)
    if option:
        raise ValueError(f"`compressor` {name!r} takes no option, got {text!r}")
    return Codec(name)


def wire_bytes(codec: Codec, sizes: Sequence[int], replicas: int, dense_bytes: float = 4.0) -> float:
    """Bytes one replica sends in one all-reduce of tensors of ``sizes`` values through ``codec``
    (the library's schemes, module doc; ``dense_bytes``: bytes per value of the uncompressed
    tensors).

    Example:
        >>> wire_bytes(parse_codec("none"), [1_000_000], 2)
        4000000.0
        >>> wire_bytes(parse_codec("topk:0.01"), [1_000_000], 4)   # 3 x (1 + 8 x 10000)
        240003.0
    """
    n = int(replicas)
    if n <= 1:
        return 0.0
    numel = sum(int(s) for s in sizes)
    if codec.scheme == "dense":
        return 2 * (n - 1) / n * numel * dense_bytes
    if codec.scheme == "chunked":
        chunk = _ceil_div(numel, n)
        c = codec.nbytes(chunk, dense_bytes)
        if c >= chunk * dense_bytes:  # not smaller compressed: the chunks travel dense
            c = chunk * dense_bytes
        # all-to-all: a row of (1 flag byte + one chunk) to each other rank; all-gather: own chunk
        # (int32 header + the re-compressed mean) to each other rank
        return (n - 1) * (2 * c + 1 + 4)
    # gather: every tensor compressed whole (dense where that is not smaller), one flag byte
    per = sum(min(codec.nbytes(int(s), dense_bytes), int(s) * dense_bytes) for s in sizes)
    return (n - 1) * (1 + per)


def message_bytes(codec: Codec, sizes: Sequence[int], dense_bytes: float = 4.0) -> float:
    """Bytes of one point-to-point model message (gossip): the tensors dense, or (CHOCO-gossip)
    each compressed with a leading flag byte."""
    if codec.name == "none":
        return sum(int(s) for s in sizes) * dense_bytes
    return 1 + sum(codec.nbytes(int(s), dense_bytes) for s in sizes)


#: topology name -> out-neighbours of a replica per gossip step, for ``n`` replicas
TOPOLOGY_DEGREES = (
    "ring",
    "torus",
    "exponential",
    "one_peer_exponential",
    "random_matching",
    "fully_connected",
)


def gossip_degree(topology: str, replicas: int) -> int:
    """How many replicas each replica sends its model to in one gossip step of ``topology``
    (as :mod:`lightning_fedopt.topology` builds it; the largest over replicas and rounds).

    Example:
        >>> [gossip_degree("ring", n) for n in (2, 3, 8)], gossip_degree("exponential", 8)
        ([1, 2, 2], 3)
    """
    check_choice("topology", topology, TOPOLOGY_DEGREES)
    n = check_int("replicas", replicas, low=1)
    if n == 1:
        return 0
    if topology == "ring":
        return len({1 % n, (n - 1) % n} - {0})
    if topology == "torus":
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
        cols = n // rows
        near = {(0, 1 % cols), (0, (cols - 1) % cols), (1 % rows, 0), ((rows - 1) % rows, 0)}
        return len(near - {(0, 0)})
    if topology == "exponential":
        offsets = {2**k % n for k in range(max(1, math.ceil(math.log2(n))))} - {0}
        return len(offsets)
    if topology == "fully_connected":
        return n - 1
    return 1  # one_peer_exponential, random_matching: one partner a round
