"""The compressed all-reduce: tensors averaged (or summed) over the ranks, travelling compressed.

:func:`all_reduce_compressed` is the entry point. The compressor's :attr:`~Compressor.collective`
names the scheme (:data:`SCHEMES`) that moves it, each one small class built only on the public
primitives of :class:`~lightning_fedopt.comm.Communicator` (which counts the bytes at the
compressed sizes) and on the one wire format of :mod:`lightning_fedopt.compression.wire`:

* :class:`ChunkedScheme` (casts, int8/int4, sign): the tensors of one call are packed into one
  flat buffer per dtype (as DDP's buckets are), so small tensors share blocks instead of each
  being padded to a block per rank. The buffer is split into ``N`` chunks of ``ceil(numel / N)``
  values; chunk ``j`` of every rank is compressed (worker state under ``"<name>/w"``) and sent to
  rank ``j`` in one all-to-all; rank ``j`` decodes the ``N`` chunks, averages them in fp32,
  compresses the mean again (server state under ``"<name>/s"``) and one all-gather returns every
  chunk to every rank. Per-rank traffic: about ``2 (N-1)/N`` compressed sizes, independent of N.
  Error-feedback state stays per tensor name (full-size buffers, see
  :meth:`~lightning_fedopt.compression.Compressor.compress_packed`), so it does not depend on the
  packing: checkpoints round-trip and DDP may rebuild its buckets;
* :class:`GatherScheme` (top-k, EControl): every rank compresses each tensor whole (state under
  ``"<name>"``) and the payloads are all-gathered;
* :class:`LinearScheme` (random projection): the payloads are summed by an all-reduce and
  decompressed once.

A buffer (chunked) or a tensor (gather, linear) whose compressed form would not be smaller than
its dense bytes travels dense, in its own dtype, through the same messages: compression never
costs more than not compressing.

A rank whose tensors hold NaN/Inf contributes nothing (its flag travels in the same message), the
result is over the others, and the call's :class:`~lightning_fedopt.compression.base.CompressionTotals`
(returned) says in ``excluded_nonfinite`` how many ranks were left out; if no rank is finite every
rank raises. The bytes are the compression layer's to count, not the network's: every call adds
its uncompressed and compressed bytes to the compressor's :attr:`~Compressor.totals` (or to the
``totals`` the caller passes), whose ``ratio`` is the compression ratio so far.

Example (one process: the "mean" of one rank is its own value, compressed and decompressed):

    >>> import torch
    >>> from lightning_fedopt.comm import Communicator
    >>> from lightning_fedopt.compression import Int8
    >>> comm, t, c = Communicator(), torch.tensor([0.0, -2.0, 254.0]), Int8(block=8)
    >>> call = all_reduce_compressed(comm, [t], c, names=["w"])
    >>> t.tolist(), c.totals.ratio      # 12 bytes sent as 3 codes + 1 scale
    ([0.0, -2.0, 254.0], 1.7142857142857142)
    >>> call.raw_bytes, call.compressed_bytes, call.excluded_nonfinite
    (12, 7, 0)
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._flat import flatten, group_by_dtype, unflatten
from lightning_fedopt._validate import check_choice
from lightning_fedopt.comm import Communicator
from lightning_fedopt.compression import wire
from lightning_fedopt.compression.base import CompressionTotals, Compressor, Payload

__all__ = [
    "SCHEMES",
    "ChunkedScheme",
    "CompressionTotals",
    "GatherScheme",
    "LinearScheme",
    "Scheme",
    "all_reduce_compressed",
    "communicator_totals",
    "travels_compressed",
]


def travels_compressed(compressor: Compressor, numel: int, dtype: torch.dtype) -> bool:
    """Whether ``numel`` values of ``dtype`` are smaller compressed than dense (else they go dense)."""
    return compressor.compressed_nbytes(numel) < numel * torch.empty((), dtype=dtype).element_size()


def _dense(x: Tensor, dtype: torch.dtype) -> Payload:
    """A "payload" that is the values themselves, in ``dtype``."""
    v = x.detach().reshape(-1).to(dtype).contiguous()
    return Payload((v,), v.numel(), v.shape, dtype)


def _dense_sum(payloads: list[Payload], numel: int, device: torch.device) -> Tensor:
    """Sum of dense payloads, in float64 for float64 values and float32 otherwise."""
    acc_dtype = torch.float64 if payloads and payloads[0].dtype == torch.float64 else torch.float32
    acc = torch.zeros(numel, dtype=acc_dtype, device=device)
    for p in payloads:
        acc += p.tensors[0].to(acc_dtype)
    return acc


class Scheme:
    """One compressed all-reduce call: :meth:`run` returns each tensor's mean over the valid ranks
    and the number of valid ranks (0: nothing was averaged); ``raw``/``compressed`` count bytes."""

    def __init__(self, comm: Communicator, compressor: Compressor, purpose: str) -> None:
        self.comm = comm
        self.compressor = compressor
        self.purpose = purpose
        self.raw = 0
        self.compressed = 0

    def run(self, tensors: list[Tensor], names: list[str], valid: bool) -> tuple[list[Tensor], int]:
        raise NotImplementedError

    def _payloads(
        self, tensors: list[Tensor], names: list[str], valid: bool, dtype: torch.dtype | None = None
    ) -> tuple[list[Payload], list[bool]]:
        """Each tensor whole as a payload (zeros when this rank is not valid): compressed, or dense
        in ``dtype`` (default: the tensor's own) where compressing would not shrink it; the bytes
        are counted. Returns the payloads and which of them are dense."""
        comp, rank, dev = self.compressor, self.comm.rank, tensors[0].device
        dense = [not travels_compressed(comp, t.numel(), t.dtype) for t in tensors]
        pays = []
        for name, t, d in zip(names, tensors, dense):
            dt = dtype or t.dtype
            x = t.detach().reshape(-1).to(dt) if valid else torch.zeros(t.numel(), dtype=dt, device=dev)
            pays.append(_dense(x, dt) if d else comp.compress(x.float(), name, salt=rank, check_finite=False))
        self.raw += sum(t.numel() * t.element_size() for t in tensors)
        self.compressed += sum(p.nbytes for p in pays)
        return pays, dense


@dataclass
class _Pack:
    """The tensors of one dtype, packed: ``chunk`` values per rank, compressed unless ``dense``."""

    idx: list[int]
    names: list[str]
    tensors: list[Tensor]
    numel: int
    chunk: int
    dense: bool
    worker: list[Payload]


class ChunkedScheme(Scheme):
    """Packed buffers, compressed chunk by chunk: all-to-all to the chunk owners, re-compressed
    means all-gathered (see the module doc). :meth:`run` is :meth:`pack`, :meth:`exchange` and
    :meth:`unpack`."""

    @override
    def run(self, tensors: list[Tensor], names: list[str], valid: bool) -> tuple[list[Tensor], int]:
        packs = self.pack(tensors, names, valid)
        gathered = self.exchange(packs, valid, tensors[0].device)
        return self.unpack(packs, gathered, len(tensors))

    def pack(self, tensors: list[Tensor], names: list[str], valid: bool) -> list[_Pack]:
        """One :class:`_Pack` per dtype: the tensors flattened into ``N`` chunks of
        ``ceil(numel / N)`` values (zeros when this rank is not valid), each chunk compressed with
        the worker state (or kept dense when that would not be smaller); the bytes are counted."""
        comm, comp = self.comm, self.compressor
        n, rank = comm.world_size, comm.rank
        dev = tensors[0].device
        packs = []
        for idx in group_by_dtype(tensors):
            ts = [tensors[i] for i in idx]
            numel = sum(t.numel() for t in ts)
            chunk = -(-numel // n)
            dense = not travels_compressed(comp, chunk, ts[0].dtype)
            flat = torch.zeros(n * chunk, dtype=ts[0].dtype if dense else torch.float32, device=dev)
            if valid:
                flat[:numel] = flatten(ts, flat.dtype)
            ns = [names[i] for i in idx]
            if dense:
                worker = [_dense(flat[j * chunk : (j + 1) * chunk], flat.dtype) for j in range(n)]
            else:
                sizes = [t.numel() for t in ts]
                worker = comp.compress_packed(
                    flat, [f"{x}/w" for x in ns], sizes, parts=n, tag="w", salt=rank
                )
            packs.append(_Pack(idx, ns, ts, numel, chunk, dense, worker))
            self.raw += numel * ts[0].element_size()
            self.compressed += sum(p.nbytes for p in worker)
        return packs

    def exchange(
        self, packs: list[_Pack], valid: bool, device: torch.device
    ) -> list[tuple[int, list[Payload]]]:
        """The two messages: chunk ``j`` of every pack to rank ``j`` (all-to-all, with this rank's
        valid flag), this rank's chunks averaged over the valid ranks and re-compressed with the
        server state (:meth:`_serve`), then every rank's chunks to everyone (all-gather, with the
        number of valid ranks). Returns each rank's ``(n_valid, payloads)``, in rank order."""
        comm, rank, n = self.comm, self.comm.rank, self.comm.world_size
        rows = torch.stack(
            [wire.encode([p.worker[j] for p in packs], int(valid), device=device) for j in range(n)]
        )
        received = [
            wire.decode(row, [p.worker[rank] for p in packs])
            for row in comm.all_to_all(rows, purpose=self.purpose)
        ]
        n_valid, servers = self._serve(packs, received, device)
        own = wire.encode(servers, n_valid, header_dtype=torch.int32, device=device)
        gathered = torch.stack(comm.all_gather(own, purpose=self.purpose).wait())
        return [wire.decode(row, servers, header_dtype=torch.int32) for row in gathered]

    def _serve(
        self, packs: list[_Pack], received: list[tuple[int, list[Payload]]], device: torch.device
    ) -> tuple[int, list[Payload]]:
        """This rank's chunk of every pack: the mean of the valid ranks' chunks, compressed again
        (server state under ``"<name>/s"``) or dense in the tensors' dtype."""
        comp, rank = self.compressor, self.comm.rank
        n_valid = sum(flag for flag, _ in received)
        servers: list[Payload] = []
        for g, p in enumerate(packs):
            mine = [pays[g] for flag, pays in received if flag]
            if p.dense:
                total = _dense_sum(mine, p.chunk, device)
                servers.append(_dense(total / max(n_valid, 1), p.tensors[0].dtype))
            else:
                total = comp.decompress_sum(mine) if mine else torch.zeros(p.chunk, device=device)
                sizes = [t.numel() for t in p.tensors]
                keys = [f"{x}/s" for x in p.names]
                servers += comp.compress_packed(
                    total / max(n_valid, 1), keys, sizes, offset=rank * p.chunk, tag="s", salt=rank
                )
        return n_valid, servers

    def unpack(
        self, packs: list[_Pack], gathered: list[tuple[int, list[Payload]]], count: int
    ) -> tuple[list[Tensor], int]:
        """Every rank's chunks decoded, concatenated and cut back into the ``count`` tensors
        (flat, in their call order); the number of valid ranks the chunks' owners averaged."""
        comp = self.compressor
        out: list[Tensor] = [torch.empty(0)] * count
        n_valid = gathered[-1][0] if gathered else 0  # the same count in every row
        parts: list[list[Tensor]] = [[] for _ in packs]
        for _, pays in gathered:
            for g, (p, pay) in enumerate(zip(packs, pays)):
                parts[g].append(pay.tensors[0] if p.dense else comp.decompress_sum([pay]))
        for p, chunks in zip(packs, parts):
            flat = torch.cat(chunks)[: p.numel]
            for i, r in zip(p.idx, unflatten(flat, p.tensors)):
                out[i] = r
        return out, n_valid


class GatherScheme(Scheme):
    """Each tensor compressed whole, all payloads all-gathered, decoded and averaged by everyone
    (:meth:`~Compressor.decompress_mean`); the compressor's :meth:`~Compressor.aggregate` makes the
    result (EControl's shared estimate)."""

    @override
    def run(self, tensors: list[Tensor], names: list[str], valid: bool) -> tuple[list[Tensor], int]:
        comm, comp, dev = self.comm, self.compressor, tensors[0].device
        pays, dense = self._payloads(tensors, names, valid)
        own = wire.encode(pays, int(valid), device=dev)
        received = [wire.decode(row, pays) for row in comm.all_gather(own, purpose=self.purpose).wait()]
        n_valid = sum(flag for flag, _ in received)
        out = []
        for g, (name, t, d) in enumerate(zip(names, tensors, dense)):
            got = [p[g] for flag, p in received if flag]
            if not n_valid:
                out.append(torch.zeros(t.numel(), device=dev))
            elif d:
                out.append(_dense_sum(got, t.numel(), dev) / n_valid)
            else:
                out.append(comp.aggregate(name, comp.decompress_mean(got)))
        return out, n_valid


class LinearScheme(Scheme):
    """Payloads that add up (float32 only) summed by one all-reduce, with the valid flag as its
    last value; each tensor is decompressed once from the mean payload."""

    @override
    def run(self, tensors: list[Tensor], names: list[str], valid: bool) -> tuple[list[Tensor], int]:
        comm, comp, dev = self.comm, self.compressor, tensors[0].device
        pays, dense = self._payloads(tensors, names, valid, torch.float32)
        if any(v.dtype != torch.float32 for p in pays for v in p.tensors):
            raise ValueError(f"{type(comp).__name__}: a linear payload must be float32")
        buf = torch.cat(
            [*[v.reshape(-1) for p in pays for v in p.tensors], torch.tensor([float(valid)], device=dev)]
        )
        comm.all_reduce([buf], "sum", purpose=self.purpose)
        n_valid = round(float(buf[-1]))
        out, off = [], 0
        for name, p, d in zip(names, pays, dense):
            mean = []
            for v in p.tensors:
                mean.append(buf[off : off + v.numel()].view(v.shape) / max(n_valid, 1))
                off += v.numel()
            if d:
                out.append(mean[0])
            else:
                avg = Payload(tuple(mean), p.numel, p.shape, p.dtype, p.meta)
                out.append(comp.aggregate(name, comp.decompress_sum([avg])))
        return out, n_valid


#: :attr:`Compressor.collective` -> the scheme that moves it
SCHEMES: dict[str, type[Scheme]] = {"chunked": ChunkedScheme, "gather": GatherScheme, "linear": LinearScheme}


#: compatibility view for :class:`~lightning_fedopt.comm.Communicator`'s deprecated read-only
#: ``compression_totals`` / ``last_compressed`` / ``compression_ratio``: the calls made through
#: each communicator (comm.py imports nothing from compression; this module registers the view)
_BY_COMM: weakref.WeakKeyDictionary[Communicator, CompressionTotals] = weakref.WeakKeyDictionary()


def communicator_totals(comm: Communicator) -> CompressionTotals:
    """The compressed all-reduces made through ``comm``, every compressor together (a copy).

    Kept for :class:`~lightning_fedopt.comm.Communicator`'s deprecated ``compression_ratio``;
    read a compressor's :attr:`~Compressor.totals` instead."""
    t = _BY_COMM.get(comm)
    return CompressionTotals() if t is None else CompressionTotals(**vars(t))


Communicator._compression_totals_view = communicator_totals


def all_reduce_compressed(
    comm: Communicator,
    tensors: Sequence[Tensor],
    compressor: Compressor,
    *,
    names: Sequence[str] | None = None,
    purpose: str = "sync",
    op: str = "mean",
    totals: CompressionTotals | None = None,
) -> CompressionTotals:
    """Average (``op="mean"``) or sum (``op="sum"``) ``tensors`` over the ranks **in place**,
    sending them compressed by the scheme of ``compressor.collective`` (module doc).

    Every rank ends with the same values (the decompressed result, not its own exact mean). With
    ``op="sum"`` the result is the mean times the number of ranks averaged (a rank with NaN/Inf
    is left out of both). Bytes are counted under ``purpose`` at the compressed sizes; the time
    the call takes beyond its transfers (compression) under the operation
    ``"all_reduce_compressed"``. The compressor is told the world size first
    (:meth:`~Compressor.set_world_size`).

    Args:
        comm: the communicator.
        tensors: floating-point tensors, reduced in place (any shapes and float dtypes).
        compressor: the :class:`~lightning_fedopt.compression.Compressor` (its state persists).
        names: one key per tensor for the compressor's state (default: the position).
        purpose: traffic label.
        op: ``"mean"`` or ``"sum"``.
        totals: where the call's bytes and excluded ranks are added (default: ``compressor.totals``).

    Returns:
        this call alone: its uncompressed and compressed bytes and the ranks it left out.

    Raises:
        ValueError: for non-float tensors, empty tensors, ``names`` of the wrong length or an
            unknown ``op`` / ``compressor.collective``.
        RuntimeError: when every rank's tensors hold NaN/Inf.
    """
    check_choice("op", op, ("mean", "sum"))
    tensors = list(tensors)
    names = [str(i) for i in range(len(tensors))] if names is None else [str(x) for x in names]
    if len(names) != len(tensors) or len(set(names)) != len(names):
        raise ValueError(
            f"all_reduce_compressed: `names` must be {len(tensors)} distinct names, got {names!r}"
        )
    for name, t in zip(names, tensors):
        if not torch.is_floating_point(t) or t.numel() == 0:
            raise ValueError(
                f"all_reduce_compressed: tensor {name!r} must be a non-empty floating-point tensor, "
                f"got dtype {t.dtype} with {t.numel()} values"
            )
    scheme_cls = SCHEMES.get(compressor.collective)
    if scheme_cls is None:
        raise ValueError(
            f"all_reduce_compressed: unknown compressor.collective {compressor.collective!r} "
            f"(one of {sorted(SCHEMES)})"
        )
    call = CompressionTotals()
    if not tensors:
        return call
    t0, seconds0 = time.perf_counter(), comm.stats.seconds
    valid = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())  # one device sync
    compressor.set_world_size(comm.world_size)
    scheme = scheme_cls(comm, compressor, purpose)
    results, n_valid = scheme.run(tensors, names, valid)
    if n_valid == 0:
        raise RuntimeError(
            "all_reduce_compressed: every rank's tensors hold NaN/Inf; there is nothing to average"
        )
    with torch.no_grad():
        for t, r in zip(tensors, results):
            t.copy_(r.view(t.shape))
            if op == "sum":
                t.mul_(n_valid)
    call.record(scheme.raw, scheme.compressed, comm.world_size - n_valid)
    for owner in (
        compressor.totals if totals is None else totals,
        _BY_COMM.setdefault(comm, CompressionTotals()),
    ):
        owner.record(call.raw_bytes, call.compressed_bytes, call.excluded_nonfinite)
    # the transfers counted their own time: add the rest (compression, decoding)
    elapsed = time.perf_counter() - t0 - (comm.stats.seconds - seconds0)
    comm.stats.add_seconds("all_reduce_compressed", purpose, max(0.0, elapsed))
    return call
