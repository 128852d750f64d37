"""The one door to the network.

Every collective or point-to-point transfer that ``lightning_fedopt`` makes goes through a
:class:`Communicator`, which calls :mod:`torch.distributed` and records, per rank, how many bytes
were sent and received, how many collective calls ("rounds") were made and how many seconds the
caller spent blocked on them. Strategies never call :mod:`torch.distributed` themselves.

Cost model (bytes counted per rank for a payload of ``B`` bytes on ``N`` ranks). It follows the
bandwidth-optimal algorithms that NCCL and gloo use for large messages, so a count is what a
replica puts on (and takes off) its network link, independent of the backend's actual choice:

==================  =============================  =============================
operation           sent                           received
==================  =============================  =============================
``all_reduce``      ``2 (N-1)/N * B`` (ring)        ``2 (N-1)/N * B``
``all_gather``      ``(N-1) * B`` (B = own part)    ``(N-1) * B``
``reduce_scatter``  ``(N-1)/N * B`` (B = input)     ``(N-1)/N * B``
``all_to_all``      ``(N-1)/N * B``                 ``(N-1)/N * B``
``broadcast``       ``B`` on the source, else 0     ``B`` on every other rank
``send`` / ``recv`` ``B`` / 0                       0 / ``B``
``barrier``         0                               0
plain values        their JSON bytes and an 8-byte length, as the tensor ops they use
==================  =============================  =============================

The compressed all-reduce (:func:`lightning_fedopt.compression.collective.all_reduce_compressed`)
is built on these primitives and counted as the operations it is made of, at the compressed sizes:
an ``all_to_all`` of ``N`` compressed chunks and an ``all_gather`` of one re-compressed chunk per
rank (about ``2 (N-1)/N`` compressed sizes per rank), or an ``all_gather`` of whole compressed
tensors (top-k), or an ``all_reduce`` of the payload (random projection). Its byte totals belong to
the compression layer (a compressor's ``totals``), not to the communicator.

Seconds are wall-clock time the calling thread was blocked: the whole call for a blocking
operation, the time inside :meth:`Handle.wait` for an asynchronous one. On CUDA the wait includes
a device synchronisation so the time covers the transfer itself.

Every call carries a ``purpose`` label (``"setup"``, ``"sync"``, ``"consensus"``, ``"metrics"``,
``"control"``, ...) and the statistics are kept per purpose and per operation as well as in total.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_fedopt._comm_stats import CommCounter, CommStats
from lightning_fedopt._flat import flatten, group_by_dtype, unflatten_into
from lightning_fedopt._plain import PlainValueError, decode_plain, encode_plain

__all__ = [
    "CommCounter",
    "CommStats",
    "Communicator",
    "DistError",
    "DistNetworkError",
    "DistStoreError",
    "GradBucket",
    "Handle",
    "cost_model",
    "default_tcp_store",
    "destroy_process_group",
    "host_store",
    "init_process_group_per_attempt",
    "prefixed_store_client",
    "process_group_initialized",
]

#: torch.distributed's errors (a failed collective, a store that cannot be reached, a store timeout)
DistError = dist.DistError
DistNetworkError = dist.DistNetworkError
DistStoreError = dist.DistStoreError
#: ``on_failure(exc, op, purpose)``: called with a collective's exception; raises the error to show
#: instead, or returns to let ``exc`` propagate
FailureHandler = Callable[[BaseException, str, str], None]

#: DDP's gradient bucket (what a communication hook receives), re-exported so that hooks
#: annotate with it without importing :mod:`torch.distributed` themselves
GradBucket = dist.GradBucket

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "mean": dist.ReduceOp.SUM,  # divided afterwards: gloo has no AVG
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}


def process_group_initialized() -> bool:
    """Whether :mod:`torch.distributed` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def destroy_process_group() -> None:
    """Destroy the default process group if there is one (a no-op otherwise)."""
    if process_group_initialized():
        dist.destroy_process_group()


def default_tcp_store() -> Any:
    """The ``TCPStore`` the default process group was created from (None without one, or when the
    group came from another kind of store, e.g. a ``FileStore``)."""
    if not process_group_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:
        return None
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store if isinstance(store, dist.TCPStore) else None


def prefixed_store_client(tcp: Any, prefix: str, timeout: timedelta) -> Any:
    """A new client connection to the ``TCPStore`` ``tcp`` (its own socket, so a thread can use it),
    whose keys live under ``prefix`` and whose operations give up after ``timeout``."""
    client = dist.TCPStore(tcp.host, tcp.port, is_master=False, timeout=timeout, use_libuv=tcp.libuvBackend)
    return dist.PrefixStore(prefix, client)


def init_process_group_per_attempt(backend: str, rank: int, world_size: int, timeout: timedelta) -> None:
    """``init_process_group`` for a worker that ``torchrun``'s agent started with its own store
    (``TORCHELASTIC_USE_AGENT_STORE=True``): the keys go under ``/worker/attempt_<restart count>/``.

    torch (2.13) connects every attempt's workers to the agent's one store without a per-attempt
    prefix, so after a restart gloo reads the previous attempt's addresses and fails with
    ``connectFullMesh ... Connection refused``; a prefix per attempt avoids the stale keys.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    store = dist.PrefixStore(f"/worker/attempt_{attempt}/", client)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def host_store(host: str, port: int) -> Any:
    """Host a ``TCPStore`` (multi-tenant, not waiting for clients) on ``host:port``; it lives as
    long as the returned object."""
    return dist.TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False)


def cost_model(op: str, nbytes: int, world_size: int, *, is_source: bool = False) -> tuple[int, int]:
    """Bytes ``(sent, received)`` by one rank for ``op`` on a payload of ``nbytes`` (see module doc)."""
    n = world_size
    if n <= 1:
        return 0, 0
    if op == "all_reduce":
        v = 2 * (n - 1) * nbytes // n
        return v, v
    if op == "all_gather":
        v = (n - 1) * nbytes
        return v, v
    if op in ("reduce_scatter", "all_to_all"):
        v = (n - 1) * nbytes // n
        return v, v
    if op == "broadcast":
        return (nbytes, 0) if is_source else (0, nbytes)
    if op == "send":
        return nbytes, 0
    if op == "recv":
        return 0, nbytes
    if op == "barrier":
        return 0, 0
    raise ValueError(f"cost_model: unknown op {op!r}")


class Handle:
    """An in-flight asynchronous operation; :meth:`wait` completes it and returns its result."""

    def __init__(
        self,
        works: Sequence[Any],
        finish: Callable[[], Any] | None,
        stats: CommStats,
        op: str,
        purpose: str,
        cuda: bool,
        guard: Callable[[str, str], contextlib.AbstractContextManager[None]] | None = None,
    ) -> None:
        self._works = list(works)
        self._guard = guard
        self._finish = finish
        self._stats = stats
        self._op = op
        self._purpose = purpose
        self._cuda = cuda
        self._done = False
        self._result: Any = None

    def is_completed(self) -> bool:
        """Whether the transfer has finished (never blocks)."""
        return self._done or all(w.is_completed() for w in self._works)

    def futures(self) -> list[Any] | None:
        """The futures of the operation's works, which complete when the transfer has (CPU
        backends: gloo); ``[]`` when it has completed already; None where they do not tell it
        (CUDA: a NCCL work's future completes when the work is queued) or the backend has none."""
        if self._done or not self._works:
            return []
        if self._cuda:
            return None
        try:
            return [w.get_future() for w in self._works]
        except (AttributeError, RuntimeError):
            return None

    def wait(self) -> Any:
        """Block until the operation is complete; idempotent."""
        if self._done:
            return self._result
        t0 = time.perf_counter()
        with self._guard(self._op, self._purpose) if self._guard is not None else contextlib.nullcontext():
            for w in self._works:
                w.wait()
        if self._cuda:
            torch.cuda.synchronize()
        self._result = self._finish() if self._finish is not None else None
        self._stats.add_seconds(self._op, self._purpose, time.perf_counter() - t0)
        self._done = True
        return self._result


class Communicator:
    """Counted wrapper over :mod:`torch.distributed` for one process group.

    Without an initialised process group (a single process) every operation is a local no-op
    that moves no bytes, so algorithms run unchanged on one device.

    Args:
        group: the process group (default: the world).
        stats: where to count traffic (a new :class:`CommStats` by default).

    Example:
        >>> comm = Communicator()
        >>> t = torch.ones(4)
        >>> comm.all_reduce([t], op="mean", purpose="sync").wait()
        >>> comm.stats.bytes_sent  # 0 without a process group
        0
    """

    def __init__(
        self,
        group: Any | None = None,
        stats: CommStats | None = None,
        *,
        timeout: timedelta | None = None,
        on_failure: FailureHandler | None = None,
    ) -> None:
        self.group = group
        self.stats = stats if stats is not None else CommStats()
        #: the deadline of every operation on :attr:`group` (None: the default group's timeout)
        self.timeout = timeout
        #: what a failed operation becomes (see :data:`FailureHandler`); inherited by :meth:`split`
        self.on_failure = on_failure
        #: set after a peer was lost: every later operation raises it at once, without the network
        self.failed: BaseException | None = None

    # ----------------------------------------------------------------- topology of the group
    @property
    def available(self) -> bool:
        return process_group_initialized()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.available else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.available else 0

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None or not self.available:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def _record(
        self, op: str, purpose: str, nbytes: int, seconds: float = 0.0, is_source: bool = False
    ) -> None:
        sent, received = cost_model(op, nbytes, self.world_size, is_source=is_source)
        self.stats.record(op, purpose, sent, received, 1, seconds)

    def account(
        self, op: str, nbytes: int, *, purpose: str, is_source: bool = False, seconds: float = 0.0
    ) -> None:
        """Count one ``op`` of ``nbytes`` that torch made without this communicator (e.g. the
        broadcast inside ``DistributedDataParallel``'s constructor), under the same cost model."""
        self._record(op, purpose, nbytes, seconds, is_source=is_source)

    @contextlib.contextmanager
    def _guarded(self, op: str, purpose: str) -> Iterator[None]:
        """Around every call into :mod:`torch.distributed`: after a loss, fail at once; on an
        exception, let :attr:`on_failure` turn it into the library's error."""
        if self.failed is not None:
            raise self.failed
        try:
            yield
        except Exception as exc:
            if self.on_failure is None:
                raise
            self.on_failure(exc, op, purpose)
            raise

    def with_deadline(self, seconds: float, on_failure: FailureHandler | None = None) -> Communicator:
        """A communicator over a new process group of the same ranks whose operations time out
        after ``seconds`` (the synchronisation deadline), counting into the same statistics.
        Collective: every rank of the world calls it."""
        timeout = timedelta(seconds=seconds)
        if not self.available or self.group is not None:
            return Communicator(self.group, self.stats, timeout=timeout, on_failure=on_failure)
        group = dist.new_group(timeout=timeout)
        return Communicator(group, self.stats, timeout=timeout, on_failure=on_failure)

    # ----------------------------------------------------------------- collectives
    def all_reduce(
        self,
        tensors: Tensor | Sequence[Tensor],
        op: str = "sum",
        *,
        purpose: str = "sync",
        async_op: bool = False,
    ) -> Handle:
        """All-reduce ``tensors`` in place (coalesced into one flat buffer per dtype).

        ``op`` is ``"sum"``, ``"mean"``, ``"max"``, ``"min"`` or ``"product"``. Returns a
        :class:`Handle`; with ``async_op=False`` it is already complete.
        """
        if op not in _REDUCE_OPS:
            raise ValueError(f"all_reduce: op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        n = self.world_size
        if not self.available or n == 1 or not tensors:
            return Handle([], None, self.stats, "all_reduce", purpose, False)
        t0 = time.perf_counter()
        works, pending = [], []
        for idx in group_by_dtype(tensors):
            group = [tensors[i] for i in idx]
            flat = flatten(group)
            self._record("all_reduce", purpose, flat.numel() * flat.element_size())
            with self._guarded("all_reduce", purpose):
                works.append(dist.all_reduce(flat, op=_REDUCE_OPS[op], group=self.group, async_op=True))
            pending.append((flat, group))

        def finish() -> None:
            for flat, group in pending:
                if op == "mean":
                    flat.div_(n)
                unflatten_into(flat, group)

        handle = Handle(works, finish, self.stats, "all_reduce", purpose, tensors[0].is_cuda, self._guarded)
        self.stats.add_seconds("all_reduce", purpose, time.perf_counter() - t0)  # the launch itself
        if not async_op:
            handle.wait()
        return handle

    def all_reduce_future(
        self, tensor: Tensor, *, op: str = "mean", purpose: str = "sync"
    ) -> torch.futures.Future:
        """All-reduce one tensor and return a :class:`torch.futures.Future` (for DDP comm hooks)."""
        n = self.world_size
        if not self.available or n == 1:
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(tensor)
            return fut
        self._record("all_reduce", purpose, tensor.numel() * tensor.element_size())
        with self._guarded("all_reduce", purpose):
            work = dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=self.group, async_op=True)

        def done(f: torch.futures.Future) -> Tensor:
            out = f.value()[0]
            return out.div_(n) if op == "mean" else out

        return work.get_future().then(done)

    def broadcast(
        self,
        tensors: Tensor | Sequence[Tensor],
        src: int = 0,
        *,
        purpose: str = "setup",
        async_op: bool = False,
    ) -> Handle:
        """Broadcast ``tensors`` in place from group rank ``src`` (coalesced per dtype)."""
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        if not self.available or self.world_size == 1 or not tensors:
            return Handle([], None, self.stats, "broadcast", purpose, False)
        t0 = time.perf_counter()
        works, pending = [], []
        is_src = self.rank == src
        for idx in group_by_dtype(tensors):
            group = [tensors[i] for i in idx]
            flat = flatten(group)
            self._record("broadcast", purpose, flat.numel() * flat.element_size(), is_source=is_src)
            with self._guarded("broadcast", purpose):
                works.append(
                    dist.broadcast(flat, src=self._global_rank(src), group=self.group, async_op=True)
                )
            pending.append((flat, group))

        def finish() -> None:
            for flat, group in pending:
                unflatten_into(flat, group)

        handle = Handle(works, finish, self.stats, "broadcast", purpose, tensors[0].is_cuda, self._guarded)
        self.stats.add_seconds("broadcast", purpose, time.perf_counter() - t0)
        if not async_op:
            handle.wait()
        return handle

    def all_gather(self, tensor: Tensor, *, purpose: str = "sync", async_op: bool = False) -> Handle:
        """Gather ``tensor`` (same shape on every rank); the handle's result is a list by rank."""
        n = self.world_size
        if not self.available or n == 1:
            h = Handle([], lambda: [tensor.clone()], self.stats, "all_gather", purpose, False)
            h.wait()
            return h
        out = [torch.empty_like(tensor) for _ in range(n)]
        self._record("all_gather", purpose, tensor.numel() * tensor.element_size())
        with self._guarded("all_gather", purpose):
            work = dist.all_gather(out, tensor.contiguous(), group=self.group, async_op=True)
        handle = Handle([work], lambda: out, self.stats, "all_gather", purpose, tensor.is_cuda, self._guarded)
        if not async_op:
            handle.wait()
        return handle

    def all_to_all(self, send: Tensor, *, purpose: str = "sync") -> Tensor:
        """Row ``j`` of ``send`` (``[N, ...]``, same shape on every rank) goes to group rank ``j``;
        row ``i`` of the result came from rank ``i``. Blocking; counted as ``all_to_all`` of ``send``."""
        if not self.available or self.world_size == 1:
            return send.clone()
        t0 = time.perf_counter()
        out = torch.empty_like(send)
        with self._guarded("all_to_all", purpose):
            dist.all_to_all_single(out, send.contiguous(), group=self.group)
        self._record("all_to_all", purpose, send.numel() * send.element_size(), time.perf_counter() - t0)
        return out

    def send(self, tensor: Tensor, dst: int, *, purpose: str = "sync") -> None:
        """Blocking point-to-point send to group rank ``dst``."""
        self.exchange({dst: tensor}, {}, purpose=purpose).wait()

    def recv(self, tensor: Tensor, src: int, *, purpose: str = "sync") -> None:
        """Blocking point-to-point receive into ``tensor`` from group rank ``src``."""
        self.exchange({}, {src: tensor}, purpose=purpose).wait()

    def exchange(
        self, sends: dict[int, Tensor], recvs: dict[int, Tensor], *, purpose: str = "sync"
    ) -> Handle:
        """Post all ``sends`` (peer -> tensor) and ``recvs`` (peer -> buffer) at once, point-to-point.

        Peers are group ranks. Returns a handle; waiting on it completes every transfer.
        """
        if not self.available or self.world_size == 1 or (not sends and not recvs):
            return Handle([], None, self.stats, "p2p", purpose, False)
        ops = []
        cuda = False
        for peer, t in sorted(sends.items()):
            self._record("send", purpose, t.numel() * t.element_size())
            ops.append(dist.P2POp(dist.isend, t.contiguous(), self._global_rank(peer), group=self.group))
            cuda = cuda or t.is_cuda
        for peer, t in sorted(recvs.items()):
            self._record("recv", purpose, t.numel() * t.element_size())
            ops.append(dist.P2POp(dist.irecv, t, self._global_rank(peer), group=self.group))
            cuda = cuda or t.is_cuda
        with self._guarded("p2p", purpose):
            works = dist.batch_isend_irecv(ops)
        return Handle(works, None, self.stats, "p2p", purpose, cuda, self._guarded)

    def barrier(self, *, purpose: str = "control", device_ids: list[int] | None = None) -> None:
        if not self.available or self.world_size == 1:
            return
        t0 = time.perf_counter()
        with self._guarded("barrier", purpose):
            if device_ids is not None and dist.get_backend(self.group) == "nccl":
                dist.barrier(group=self.group, device_ids=device_ids)
            else:
                dist.barrier(group=self.group)
        self.stats.record("barrier", purpose, 0, 0, 1, time.perf_counter() - t0)

    # ----------------------------------------------------------------- sub-groups
    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        """Create one process group per list of ranks and return the communicator of the group
        that holds this rank, counting into the same :class:`CommStats`.

        Collective: every rank of this communicator calls it with the same ``groups``, which must
        partition the ranks (this communicator must be the world). Without a process group the
        result is a one-process communicator.
        """
        if not self.available:
            return Communicator(stats=self.stats)
        flat = sorted(r for g in groups for r in g)
        if flat != list(range(self.world_size)) or self.world_size != dist.get_world_size():
            raise ValueError(f"split: groups {groups} must partition the ranks of the world")
        mine, _ = dist.new_subgroups_by_enumeration([list(g) for g in groups], timeout=self.timeout)
        return Communicator(group=mine, stats=self.stats, timeout=self.timeout, on_failure=self.on_failure)

    # ----------------------------------------------------------------- compression (deprecated view)
    #: registered by :mod:`lightning_fedopt.compression.collective` when it is imported (this module
    #: imports nothing from compression): ``comm -> CompressionTotals`` of the compressed
    #: all-reduces made through ``comm``. The totals are the compression layer's state; the three
    #: read-only properties below only delegate, for callers not yet reading a compressor's ``totals``.
    _compression_totals_view: ClassVar[Callable[[Communicator], Any] | None] = None

    def _compression_totals(self) -> Any:
        view = Communicator._compression_totals_view
        return None if view is None else view(self)

    @property
    def compression_totals(self) -> dict[str, int]:
        """Deprecated, read-only: ``{"raw_bytes", "compressed_bytes"}`` of the compressed
        all-reduces made through this communicator (read ``compressor.totals`` instead)."""
        t = self._compression_totals()
        if t is None:
            return {"raw_bytes": 0, "compressed_bytes": 0}
        return {"raw_bytes": t.raw_bytes, "compressed_bytes": t.compressed_bytes}

    @property
    def last_compressed(self) -> dict[str, int]:
        """Deprecated, read-only: ``{"excluded_nonfinite": ranks}`` of the last compressed
        all-reduce made through this communicator, ``{}`` before one (read the record
        ``all_reduce_compressed`` returns instead)."""
        t = self._compression_totals()
        return {} if t is None or not t.calls else {"excluded_nonfinite": t.excluded_nonfinite}

    @property
    def compression_ratio(self) -> float | None:
        """Deprecated, read-only: uncompressed / compressed bytes of the compressed all-reduces made
        through this communicator (None before one; read ``compressor.totals.ratio`` instead)."""
        t = self._compression_totals()
        return None if t is None else t.ratio

    # ----------------------------------------------------------------- plain values
    def broadcast_object(self, obj: Any, src: int = 0, *, purpose: str = "control") -> Any:
        """Broadcast a plain value (see :mod:`lightning_fedopt._plain`) from group rank ``src``.

        It travels as JSON bytes in a ``uint8`` tensor after an ``int64`` length (two broadcasts,
        counted at their sizes); receivers decode JSON, never a pickle, so nothing a peer sends
        can run code. A value outside the plain types raises :class:`~lightning_fedopt._plain.PlainValueError`
        on every rank (the source announces the failure instead of leaving the others waiting).
        """
        if not self.available or self.world_size == 1:
            return obj
        is_src = self.rank == src
        payload, error = b"", None
        if is_src:
            try:
                payload = encode_plain(obj)
            except PlainValueError as err:
                error = err
        length = torch.tensor([-1 if error is not None else len(payload)], dtype=torch.int64)
        self.broadcast([length], src=src, purpose=purpose)
        n = int(length.item())
        if n < 0:
            raise (
                error
                if error is not None
                else PlainValueError(
                    f"broadcast_object: rank {src} had a value that cannot travel as a plain control message"
                )
            )
        buf = _bytes_tensor(payload) if is_src else torch.empty(n, dtype=torch.uint8)
        self.broadcast([buf], src=src, purpose=purpose)
        return obj if is_src else decode_plain(buf.numpy().tobytes())

    def all_gather_object(self, obj: Any, *, purpose: str = "control") -> list[Any]:
        """Gather one plain value per rank (JSON bytes in ``uint8`` tensors, as :meth:`broadcast_object`).

        Raises :class:`~lightning_fedopt._plain.PlainValueError` on every rank when any rank's value
        is not plain, and on a rank that receives bytes that do not decode to a plain value.
        """
        if not self.available or self.world_size == 1:
            return [obj]
        payload, error = b"", None
        try:
            payload = encode_plain(obj)
        except PlainValueError as err:
            error = err
        length = torch.tensor([-1 if error is not None else len(payload)], dtype=torch.int64)
        lengths = [int(t.item()) for t in self.all_gather(length, purpose=purpose).wait()]
        if min(lengths) < 0:
            bad = [r for r, n in enumerate(lengths) if n < 0]
            raise (
                error
                if error is not None
                else PlainValueError(
                    f"all_gather_object: rank(s) {bad} had a value that cannot travel as a plain control message"
                )
            )
        buf = torch.zeros(max(lengths), dtype=torch.uint8)
        buf[: len(payload)] = _bytes_tensor(payload)
        parts = self.all_gather(buf, purpose=purpose).wait()
        return [
            obj if r == self.rank else decode_plain(part[:n].numpy().tobytes())
            for r, (part, n) in enumerate(zip(parts, lengths))
        ]


def _bytes_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def tensors_nbytes(tensors: Iterable[Tensor]) -> int:
    """Total bytes of ``tensors``' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)
