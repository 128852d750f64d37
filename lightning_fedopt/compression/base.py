"""The compressor interface: a tensor becomes a :class:`Payload` of tensors and back.

A :class:`Compressor` may keep state between calls (error-feedback buffers, momentum, counters),
stored per *key* so that several tensors (parameters, chunks of a collective, buckets) are
compressed independently; :meth:`Compressor.state_dict` / :meth:`Compressor.load_state_dict`
checkpoint it. :meth:`Compressor.compressed_nbytes` says how many bytes a tensor of ``n`` values
travels as, :attr:`Payload.nbytes` how many a given payload takes.

How a compressor takes part in the compressed all-reduce
(:func:`lightning_fedopt.compression.collective.all_reduce_compressed`) is its
:attr:`Compressor.collective`, the name of a scheme of that module:

* ``"chunked"``: the tensors of a call are packed into one flat buffer per dtype, each rank
  compresses ``N`` chunks of it, an all-to-all delivers chunk ``j`` of every rank to rank ``j``,
  which decodes and sums them in fp32, re-compresses the result with its own (server) state, and
  an all-gather returns every chunk to everyone — per-rank traffic ``~2 (N-1)/N`` compressed
  sizes, independent of ``N`` (1-bit Adam's and torchft's scheme);
* ``"gather"``: each tensor is compressed whole and the payloads are all-gathered (top-k's
  sparse values + indices, EControl);
* ``"linear"``: the payloads themselves can be summed (random projection with shared directions),
  so they are all-reduced.

What went through the compressed all-reduce is counted by the compression layer, not by the
network: every call adds its uncompressed and compressed bytes (and how many ranks it left out for
NaN/Inf) to a :class:`CompressionTotals`, by default the compressor's own :attr:`Compressor.totals`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_fedopt._validate import check_float, check_int

__all__ = [
    "CompressionTotals",
    "Compressor",
    "Payload",
    "check_block",
    "check_input",
    "check_unit",
    "pack_codes",
    "stable_seed",
    "unpack_codes",
]


@dataclass
class Payload:
    """What travels for one compressed tensor: ``tensors`` plus what is needed to rebuild it.

    Attributes:
        tensors: the compressed data (codes, scales, indices, ...).
        numel: number of values of the original tensor.
        shape: its shape.
        dtype: its dtype (the decompressed tensor has it).
        meta: small per-payload numbers that are not sent (known to every receiver).
    """

    tensors: tuple[Tensor, ...]
    numel: int
    shape: torch.Size
    dtype: torch.dtype
    meta: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes that travel: the sum of the payload tensors' sizes."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def pack(self) -> Tensor:
        """All payload tensors as one flat ``uint8`` buffer (for collectives)."""
        return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in self.tensors])

    def unpack_like(self, buf: Tensor) -> Payload:
        """A payload of the same layout as this one with its bytes read from ``buf``."""
        out, off = [], 0
        for t in self.tensors:
            nb = t.numel() * t.element_size()
            out.append(buf[off : off + nb].clone().view(t.dtype).view(t.shape))
            off += nb
        return Payload(tuple(out), self.numel, self.shape, self.dtype, self.meta)


@dataclass
class CompressionTotals:
    """What went through the compressed all-reduce for one owner (a compressor's
    :attr:`Compressor.totals`, or whatever the caller of
    :func:`~lightning_fedopt.compression.collective.all_reduce_compressed` passed as ``totals``).

    Attributes:
        raw_bytes: bytes of the tensors in their own dtype, over every call.
        compressed_bytes: bytes of the payloads this rank compressed (each tensor once, as a
            worker; re-compressed server chunks are not counted), over every call.
        excluded_nonfinite: ranks the **last** call left out because their tensors held NaN/Inf.
        calls: compressed all-reduces counted.

    Example:
        >>> t = CompressionTotals()
        >>> t.record(400, 54, excluded_nonfinite=0)
        >>> t.ratio, t.calls
        (7.407407407407407, 1)
    """

    raw_bytes: int = 0
    compressed_bytes: int = 0
    excluded_nonfinite: int = 0
    calls: int = 0

    @property
    def ratio(self) -> float | None:
        """``raw_bytes / compressed_bytes`` (None before anything was compressed)."""
        return self.raw_bytes / self.compressed_bytes if self.compressed_bytes else None

    def record(self, raw_bytes: int, compressed_bytes: int, excluded_nonfinite: int = 0) -> None:
        """Add one call: its bytes add up, ``excluded_nonfinite`` becomes the call's."""
        self.raw_bytes += int(raw_bytes)
        self.compressed_bytes += int(compressed_bytes)
        self.excluded_nonfinite = int(excluded_nonfinite)
        self.calls += 1

    @classmethod
    def combined(cls, totals: Iterable[CompressionTotals]) -> CompressionTotals:
        """The sum of several owners' totals (``excluded_nonfinite``: the sum of their last calls')."""
        out = cls()
        for t in totals:
            out.raw_bytes += t.raw_bytes
            out.compressed_bytes += t.compressed_bytes
            out.excluded_nonfinite += t.excluded_nonfinite
            out.calls += t.calls
        return out


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Codes (``uint8``, each below ``2**bits``; ``bits`` 1, 2, 4 or 8) packed ``8 // bits`` to a
    byte, the first code in the lowest bits; the last byte is padded with zero codes.

    Example:
        >>> pack_codes(torch.tensor([1, 2, 3, 0, 1], dtype=torch.uint8), 2)
        tensor([57,  1], dtype=torch.uint8)
    """
    per = 8 // bits
    if per == 1:
        return codes
    pad = -codes.numel() % per
    q = torch.cat([codes, codes.new_zeros(pad)]).view(-1, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (q << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: Tensor, n: int, bits: int) -> Tensor:
    """The first ``n`` codes of :func:`pack_codes`'s bytes, as int64."""
    per = 8 // bits
    if per == 1:
        return packed[:n].long()
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    q = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(-1)[:n].long()


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from ``parts`` that is the same in every process (no Python ``hash``)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def check_block(block: Any, name: str = "block", low: int = 8, high: int = 16384) -> int:
    """``block`` if it is a power of two in ``[low, high]``, else ``ValueError`` naming it."""
    msg = f"`{name}` must be a power of two in [{low}, {high}], got {block!r}"
    try:
        value = check_int(name, block, low=low, high=high)
    except ValueError:
        raise ValueError(msg) from None
    if value & (value - 1):
        raise ValueError(msg)
    return value


def check_unit(name: str, value: Any) -> float:
    """``value`` as a float in (0, 1] (a density, a ratio), else ``ValueError`` naming ``name``."""
    try:
        return check_float(name, value, low=0.0, high=1.0, low_open=True)
    except ValueError:
        raise ValueError(f"`{name}` must be in (0, 1], got {value!r}") from None


def check_input(tensor: Any, who: str, check_finite: bool = True) -> Tensor:
    """Validate a tensor to compress: a non-empty floating-point tensor without NaN/Inf."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{who}: `tensor` must be a torch.Tensor, got {type(tensor).__name__}")
    if not torch.is_floating_point(tensor):
        raise ValueError(f"{who}: `tensor` must be floating point, got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"{who}: cannot compress an empty tensor (shape {tuple(tensor.shape)})")
    if check_finite and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{who}: `tensor` contains {bad} NaN/Inf value(s); refusing to compress it (the scale of "
            "its block would turn every value of the block into garbage)"
        )
    return tensor


class Compressor:
    """Base class: a tensor in, a :class:`Payload` out, and back.

    Subclasses implement :meth:`_compress` (on a flat fp32 copy) and :meth:`_decompress_sum`, and
    set :attr:`name` (the lowercase class name accepted by
    :func:`~lightning_fedopt.compression.get_compressor`).

    Example:
        >>> from lightning_fedopt.compression import Int8
        >>> c = Int8(block=64)
        >>> x = torch.randn(1000)
        >>> p = c.compress(x)
        >>> p.nbytes, c.compressed_nbytes(1000)   # 1000 codes + 16 fp32 scales
        (1064, 1064)
        >>> bool((c.decompress(p) - x).abs().max() <= x.abs().max() / 127)
        True
    """

    name: ClassVar[str] = "compressor"
    #: the scheme of :mod:`lightning_fedopt.compression.collective` that moves it (module doc)
    collective: ClassVar[str] = "chunked"

    def __init__(self) -> None:
        self._state: dict[str, dict[str, Any]] = {}
        #: bytes of the compressed all-reduces that used this compressor (not checkpointed, not
        #: cleared by :meth:`reset_state`)
        self.totals = CompressionTotals()
        #: ranks of the compressed all-reduce this compressor last took part in (set by the
        #: collective through :meth:`set_world_size`; 1 outside one)
        self.world_size = 1

    # ------------------------------------------------------------------ public API
    def compress(
        self, tensor: Tensor, key: str = "default", *, salt: int = 0, check_finite: bool = True
    ) -> Payload:
        """Compress ``tensor`` (any shape, floating point, non-empty, finite).

        Args:
            tensor: what to compress (not modified).
            key: whose state (error feedback, momentum) to use and update.
            salt: mixed into the seed of stochastic choices (e.g. the rank).
            check_finite: refuse NaN/Inf (a device synchronisation on GPU; the compressed
                all-reduce checks once per call and passes False).

        Raises:
            ValueError: for a non-float, empty or (with ``check_finite``) non-finite tensor.
        """
        check_input(tensor, type(self).__name__, check_finite)
        x = tensor.detach().reshape(-1).to(torch.float32)
        if x.data_ptr() == tensor.data_ptr():
            x = x.clone()
        tensors, meta = self._compress(x, key, salt)
        return Payload(tuple(tensors), tensor.numel(), tensor.shape, tensor.dtype, meta)

    def compress_packed(
        self,
        x: Tensor,
        keys: Sequence[str],
        sizes: Sequence[int],
        *,
        offset: int = 0,
        parts: int = 1,
        tag: str = "packed",
        salt: int = 0,
    ) -> list[Payload]:
        """Compress a slice of a packed buffer as ``parts`` equal chunks, with per-tensor state.

        The packed buffer holds the tensors ``keys`` (``sizes[i]`` values each) one after the
        other; ``x`` (flat) is its values ``[offset, offset + x.numel())`` (positions past the
        last tensor are padding). Elementwise state (error-feedback buffers: every state tensor
        shaped like the input) stays per key, as full-size buffers of each key, so it does not
        depend on how tensors are packed or chunked (DDP rebuilding its buckets, another world
        size): for chunk ``j`` the slices of the keys' buffers are assembled, the chunk is
        compressed with them under the temporary key ``f"{keys[0]}#{tag}{j}"`` (which seeds
        stochastic choices together with ``salt`` and the call count), and the buffers are
        written back. The call count is the first key's and is stored on every key touched.

        Used by the chunked compressed all-reduce; inputs are not validated.

        Returns:
            one payload per chunk (each standing for ``x.numel() // parts`` fp32 values).
        """
        x = x.detach().reshape(-1).to(torch.float32)
        total = x.numel()
        chunk = total // parts
        starts, pos = [], 0
        for n in sizes:
            starts.append(pos)
            pos += n
        # (key index, start in x, start in the key, length) of every key overlapping x
        spans = []
        for i, (s0, n) in enumerate(zip(starts, sizes)):
            lo, hi = max(s0, offset), min(s0 + n, offset + total)
            if lo < hi:
                spans.append((i, lo - offset, lo - s0, hi - lo))
        if not spans:  # padding only: no state to carry
            return [
                self._compress_temp(x[j * chunk : (j + 1) * chunk], {}, f"pad#{tag}{j}", salt)[0]
                for j in range(parts)
            ]
        first = self._state.get(keys[spans[0][0]], {})
        calls = first.get("calls", 0)
        flat: dict[str, Tensor] = {}
        for i, at, k0, n in spans:
            for name, v in self._state.get(keys[i], {}).items():
                if isinstance(v, Tensor) and v.numel() == sizes[i]:
                    buf = flat.setdefault(name, torch.zeros(total, dtype=torch.float32, device=x.device))
                    buf[at : at + n] = v.reshape(-1)[k0 : k0 + n].to(buf.device)
        out = []
        for j in range(parts):
            st: dict[str, Any] = {
                "calls": calls,
                **{k: v[j * chunk : (j + 1) * chunk] for k, v in flat.items()},
            }
            payload, st = self._compress_temp(
                x[j * chunk : (j + 1) * chunk], st, f"{keys[spans[0][0]]}#{tag}{j}", salt
            )
            out.append(payload)
            calls = st.get("calls", calls)
            for name, v in st.items():
                if isinstance(v, Tensor) and v.numel() == chunk:
                    buf = flat.setdefault(name, torch.zeros(total, dtype=torch.float32, device=x.device))
                    piece = buf[j * chunk : (j + 1) * chunk]
                    if v.data_ptr() != piece.data_ptr():
                        piece.copy_(v.reshape(-1))
        for i, at, k0, n in spans:
            if not flat and not calls and "calls" not in self._state.get(keys[i], {}):
                continue  # stateless (no feedback, no counter): keep no entry
            st = self._state.setdefault(keys[i], {})
            for name, buf in flat.items():
                own = st.get(name)
                if own is None or own.numel() != sizes[i]:
                    own = torch.zeros(sizes[i], dtype=torch.float32, device=x.device)
                elif own.device != x.device:  # e.g. loaded from a checkpoint on CPU
                    own = own.to(x.device)
                st[name] = own
                own.reshape(-1)[k0 : k0 + n] = buf[at : at + n]
            if calls or "calls" in st:
                st["calls"] = calls
        return out

    def _compress_temp(
        self, x: Tensor, state: dict[str, Any], key: str, salt: int
    ) -> tuple[Payload, dict[str, Any]]:
        """Compress flat fp32 ``x`` with ``state`` standing in for the state of ``key``."""
        saved = self._state.get(key)
        self._state[key] = state
        try:
            tensors, meta = self._compress(x, key, salt)
        finally:
            state = self._state.pop(key)
            if saved is not None:
                self._state[key] = saved
        return Payload(tuple(tensors), x.numel(), torch.Size([x.numel()]), torch.float32, meta), state

    def decompress(self, payload: Payload) -> Tensor:
        """The tensor a payload stands for (original shape and dtype)."""
        flat = self._decompress_sum([payload])
        return flat.view(payload.shape).to(payload.dtype)

    def decompress_sum(self, payloads: list[Payload]) -> Tensor:
        """``sum_i decompress(payloads[i])`` as a flat fp32 tensor (one fused pass where a kernel exists)."""
        return self._decompress_sum(list(payloads))

    def decompress_mean(self, payloads: list[Payload]) -> Tensor:
        """What the all-gather of ``payloads`` (one per valid rank) averages to, flat fp32: by
        default ``decompress_sum(payloads) / len(payloads)``."""
        return self.decompress_sum(payloads) / len(payloads)

    def set_world_size(self, world_size: int) -> None:
        """Told by the compressed all-reduce how many ranks take part (e.g. DGC's clipping scales
        with it)."""
        self.world_size = int(world_size)

    def aggregate(self, key: str, mean: Tensor) -> Tensor:
        """What the receivers use after a collective averaged the decompressed payloads of ``key``
        (identity, except for compressors that keep a shared estimate such as EControl)."""
        return mean

    def compressed_nbytes(self, numel: int) -> int:
        """Bytes a tensor of ``numel`` values travels as."""
        raise NotImplementedError

    def ratio(self, numel: int, dtype: torch.dtype = torch.float32) -> float:
        """Uncompressed bytes / compressed bytes for a tensor of ``numel`` values of ``dtype``."""
        return numel * torch.empty((), dtype=dtype).element_size() / max(1, self.compressed_nbytes(numel))

    def state_dict(self) -> dict[str, Any]:
        """Per-key state (tensors on CPU) for a checkpoint."""
        return {
            k: {n: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for n, v in st.items()}
            for k, st in self._state.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors move to the device at their next use)."""
        self._state = {
            k: {n: (v.clone() if isinstance(v, Tensor) else v) for n, v in st.items()}
            for k, st in state.items()
        }

    def reset_state(self) -> None:
        self._state.clear()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ for subclasses
    def _repr_args(self) -> dict[str, Any]:
        return {}

    def _compress(self, x: Tensor, key: str, salt: int) -> tuple[list[Tensor], dict[str, Any] | None]:
        raise NotImplementedError

    def _decompress_sum(self, payloads: list[Payload]) -> Tensor:
        raise NotImplementedError

    def _buffer(self, key: str, name: str, like: Tensor) -> Tensor:
        """The state tensor ``name`` of ``key`` shaped like ``like`` (zeros when new or when the
        tensor behind ``key`` changed size, e.g. DDP rebuilding its buckets after the first step)."""
        st = self._state.setdefault(key, {})
        buf = st.get(name)
        if buf is None or buf.shape != like.shape:
            buf = torch.zeros_like(like, dtype=torch.float32)
        elif buf.device != like.device:
            buf = buf.to(like.device)
        st[name] = buf
        return buf

    def _count(self, key: str) -> int:
        """Calls so far for ``key`` (then incremented)."""
        st = self._state.setdefault(key, {})
        c = int(st.get("calls", 0))
        st["calls"] = c + 1
        return c
