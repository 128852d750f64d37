"""Replica groups that die, come back and heal from a live peer, on torchft (``pip install lightning_fedopt[ft]``).

Each replica group is its own world (one process, or ``group_size`` processes doing DDP inside the
group under ``torchrun``); torchft carries the synchronisation traffic *across* groups. A
lighthouse (``python -m lightning_fedopt.fault_tolerance.launch`` starts one, or
``torchft_lighthouse``) forms the quorums; every group runs one torchft ``Manager``.

One synchronisation is a **round** of :class:`ManagedCommunicator`:

1. :meth:`ManagedCommunicator.start_round` — a quorum at the lighthouse. The groups present form
   the round; a group that is behind (it restarted, started late, or did not commit the last
   round) first receives the registered state from a live peer (over HTTP) and is marked
   ``healed``.
2. :meth:`ManagedCommunicator.all_reduce` — ``"mean"`` or ``"sum"`` over torchft's managed
   all-reduce. A group that healed in this round contributes **zero weight** (its tensors are
   zeroed before sending and a weight of 0 travels in the same buffer), so the mean is over the
   groups that did the round's work and a peer's contribution is never counted twice. On a
   failure the caller's tensors are left as they were.
3. :meth:`ManagedCommunicator.commit` — torchft's ``should_commit`` vote. ``False`` means the
   round failed somewhere in this group (a peer died mid all-reduce, the heal failed, too few
   groups): the caller must not apply the result and rolls back to its saved global state. A
   group that did not commit is behind and heals at its next quorum.

Only the all-reduce is fault-managed in torchft 0.2.0. Broadcast, all-gather, all-to-all and
point-to-point go to the underlying process group without fault handling; this communicator
refuses them with :class:`NotFaultManagedError` instead of offering a collective that would hang
or fail on the first lost group.

Environment read by :func:`build_manager` / :meth:`ManagedCommunicator.from_env` (see
:class:`ReplicaGroupEnv`): ``TORCHFT_LIGHTHOUSE`` (``http://host:port``), ``REPLICA_GROUP_ID``,
``RANK``/``WORLD_SIZE`` inside the group (torchrun's; absent: a group of one process),
``MASTER_ADDR``/``MASTER_PORT`` (the group's store when it has several processes) and
``LIGHTNING_FEDOPT_FT_HOST`` (the address this group's servers bind to and advertise; default
``127.0.0.1`` when the lighthouse is on the loopback, required otherwise).

Trust boundary: the lighthouse, the manager's gRPC server (it has a ``kill`` call), the group's
``TCPStore`` and the checkpoint HTTP server accept anyone who reaches their ports, and gloo
traffic is neither authenticated nor encrypted. The manager and checkpoint servers are bound to
``LIGHTNING_FEDOPT_FT_HOST`` here (torchft binds them to every interface); the ``TCPStore``
listens on every interface (torch offers no bind address); gloo listens on the interface of the
machine's hostname (or ``GLOO_SOCKET_IFNAME``). Keep every port on a private network.
Healing loads the peer's checkpoint with ``torch.load(weights_only=True)`` (torchft uses
``weights_only=False``, i.e. unpickling what the peer sends).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor

from lightning_fedopt._comm_stats import CommStats
from lightning_fedopt._flat import flatten, group_by_dtype, unflatten_into
from lightning_fedopt._validate import check_float, check_int, check_str
from lightning_fedopt.comm import cost_model, host_store
from lightning_fedopt.fault_tolerance._servers import bound_http_transport, manager_server_bound_to

log = logging.getLogger("lightning_fedopt")

__all__ = [
    "ENV_HOST",
    "ENV_LIGHTHOUSE",
    "ENV_REPLICA_ID",
    "ENV_RESTARTS",
    "ManagedCommunicator",
    "ManagedHandle",
    "NotFaultManagedError",
    "QuorumError",
    "ReplicaGroupEnv",
    "RoundInfo",
    "build_manager",
]

#: the lighthouse's address, ``http://host:port`` (torchft's own variable)
ENV_LIGHTHOUSE = "TORCHFT_LIGHTHOUSE"
#: this replica group's id (an integer: it names the group's data shard and its rank order)
ENV_REPLICA_ID = "REPLICA_GROUP_ID"
#: the address this group's servers (manager, checkpoint, store) bind to and advertise
ENV_HOST = "LIGHTNING_FEDOPT_FT_HOST"
#: how many times the launcher restarted this group (0 on the first start; informational)
ENV_RESTARTS = "LIGHTNING_FEDOPT_FT_RESTARTS"

#: the key under which :class:`ManagedCommunicator` registers its state with the manager
STATE_KEY = "lightning_fedopt"

#: torchft's environment variables that silently override the Manager's timeout arguments
_TORCHFT_TIMEOUT_ENVS = ("TORCHFT_TIMEOUT_SEC", "TORCHFT_QUORUM_TIMEOUT_SEC", "TORCHFT_CONNECT_TIMEOUT_SEC")


def _import_torchft() -> Any:
    try:
        import torchft
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(
            "lightning_fedopt's fault-tolerant mode needs torchft (Linux x86_64 wheels): "
            "pip install 'lightning_fedopt[ft]'"
        ) from err
    return torchft


class NotFaultManagedError(RuntimeError):
    """An operation that torchft does not fault-manage was asked of a :class:`ManagedCommunicator`."""

    def __init__(self, op: str) -> None:
        self.op = op
        super().__init__(
            f"lightning_fedopt: `{op}` is not available across fault-tolerant replica groups: torchft "
            "(0.2.0) fault-manages the all-reduce only; its other collectives go to the process group "
            "without quorum, error handling or healing, so a lost group would hang or break them. "
            "Use all_reduce (mean or sum), or run this exchange inside a replica group"
        )


class QuorumError(RuntimeError):
    """No quorum could be formed (the lighthouse is unreachable or dead, or too few groups came
    within the quorum timeout).

    It is final for this manager: torchft keeps the failed quorum and raises it again at the next
    ``start_quorum``. The group should exit; its supervisor restarts it and it heals from a peer.
    """


# --------------------------------------------------------------------------- environment
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _env_int(environ: Mapping[str, str], name: str, default: int | None, low: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(
                f"lightning_fedopt: environment variable {name} is required (an integer >= {low})"
            )
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"lightning_fedopt: environment variable {name} must be an integer, got {raw!r}"
        ) from None
    if value < low:
        raise ValueError(f"lightning_fedopt: environment variable {name} must be >= {low}, got {value}")
    return value


@dataclass(frozen=True)
class ReplicaGroupEnv:
    """Where one replica group finds the lighthouse and its own store (read by :meth:`from_env`).

    Attributes:
        lighthouse: ``http://host:port`` of the lighthouse.
        replica_id: this group's id (an integer >= 0).
        group_rank, group_world_size: this process's rank in its group and the group's size.
        host: the address the group's manager, checkpoint server and store bind to and advertise.
        store_addr, store_port: the group's ``TCPStore`` (None: a one-process group hosts its own).
        restarts: how many times the launcher restarted this group.
    """

    lighthouse: str
    replica_id: int
    group_rank: int = 0
    group_world_size: int = 1
    host: str = "127.0.0.1"
    store_addr: str | None = None
    store_port: int | None = None
    restarts: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ReplicaGroupEnv:
        """Read the variables of the module doc; ``ValueError`` naming the variable that is wrong.

        Example:
            >>> env = ReplicaGroupEnv.from_env({"TORCHFT_LIGHTHOUSE": "http://127.0.0.1:29510",
            ...                                 "REPLICA_GROUP_ID": "2"})
            >>> env.replica_id, env.group_world_size, env.host
            (2, 1, '127.0.0.1')
        """
        env = os.environ if environ is None else environ
        lighthouse = env.get(ENV_LIGHTHOUSE, "")
        parts = urlsplit(lighthouse)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(
                f"lightning_fedopt: environment variable {ENV_LIGHTHOUSE} must be the lighthouse's "
                f"http://host:port, got {lighthouse!r}"
            )
        replica_id = _env_int(env, ENV_REPLICA_ID, None, 0)
        world = _env_int(env, "WORLD_SIZE", 1, 1)
        rank = _env_int(env, "RANK", 0, 0)
        if rank >= world:
            raise ValueError(f"lightning_fedopt: RANK ({rank}) must be below WORLD_SIZE ({world})")
        host = env.get(ENV_HOST, "")
        if not host:
            if not _is_loopback(parts.hostname):
                raise ValueError(
                    f"lightning_fedopt: set {ENV_HOST} to this machine's address on the private network "
                    f"that the other replica groups reach (the lighthouse {lighthouse} is not on this "
                    "machine, and no server of this group is bound to every interface by default)"
                )
            host = "127.0.0.1"
        store_addr = store_port = None
        if world > 1:
            store_addr = env.get("MASTER_ADDR") or None
            store_port = _env_int(env, "MASTER_PORT", None, 1) if store_addr else None
            if store_addr is None:
                raise ValueError(
                    "lightning_fedopt: a replica group of several processes needs its store in "
                    "MASTER_ADDR/MASTER_PORT (run the group under torchrun)"
                )
        return cls(
            lighthouse=lighthouse,
            replica_id=replica_id,
            group_rank=rank,
            group_world_size=world,
            host=host,
            store_addr=store_addr,
            store_port=store_port,
            restarts=_env_int(env, ENV_RESTARTS, 0, 0),
        )


@contextlib.contextmanager
def _lighthouse_errors(env: ReplicaGroupEnv, connect_timeout: float) -> Any:
    try:
        yield
    except RuntimeError as exc:
        if "failed to connect" not in str(exc):
            raise
        raise QuorumError(
            f"lightning_fedopt: replica group {env.replica_id} cannot reach the lighthouse at {env.lighthouse} "
            f"within connect_timeout={connect_timeout} s (is it running, and is {ENV_LIGHTHOUSE} right?): {exc}"
        ) from exc


def _seconds(name: str, value: Any) -> timedelta:
    return timedelta(seconds=check_float(name, value, low=0.0, low_open=True))


def build_manager(
    env: ReplicaGroupEnv | None = None,
    *,
    min_replica_size: int = 1,
    timeout: float = 30.0,
    quorum_timeout: float = 600.0,
    connect_timeout: float = 10.0,
    pg_timeout: float | None = None,
    init_sync: bool = True,
    quorum_retries: int = 0,
    max_retries: int | None = None,
    heartbeat_interval: float = 0.1,
) -> tuple[Any, Any]:
    """A torchft ``Manager`` for this replica group, over ``ProcessGroupGloo``, quorum synchronous.

    Args:
        env: where the lighthouse and the group's store are (default: :meth:`ReplicaGroupEnv.from_env`).
        min_replica_size: the fewest groups that may commit a round.
        timeout: seconds for the managed all-reduce, the commit vote and the checkpoint transfer.
        quorum_timeout: seconds a group waits for a quorum (at least the time between syncs).
        connect_timeout: seconds to reach the lighthouse and the managers.
        pg_timeout: seconds of the cross-group gloo process group (default: ``timeout``).
        init_sync: every group but one heals at the first quorum (the initial state of one group).
        quorum_retries: quorum attempts to retry when the lighthouse fails.
        max_retries: uncommitted rounds in a row before the manager raises (None: never).
        heartbeat_interval: seconds between the manager's heartbeats to the lighthouse.

    Returns:
        ``(manager, store)``: ``store`` is the ``TCPStore`` this process hosts for a one-process
        group (keep it alive as long as the manager), or None when the group's store is torchrun's.

    ``ProcessGroupBabyGloo`` is not offered: its reconfiguration timed out on this project's test
    machine. The quorum is synchronous (``use_async_quorum=False``): a group that heals applies the
    received state before :meth:`ManagedCommunicator.start_round` returns.
    """
    _import_torchft()
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    min_replica_size = check_int("min_replica_size", min_replica_size, low=1)
    t_op = _seconds("timeout", timeout)
    t_quorum = _seconds("quorum_timeout", quorum_timeout)
    t_connect = _seconds("connect_timeout", connect_timeout)
    t_pg = t_op if pg_timeout is None else _seconds("pg_timeout", pg_timeout)
    quorum_retries = check_int("quorum_retries", quorum_retries, low=0)
    max_retries = check_int("max_retries", max_retries, low=0, allow_none=True)
    t_beat = _seconds("heartbeat_interval", heartbeat_interval)
    if not isinstance(init_sync, bool):
        raise ValueError(f"`init_sync` must be True or False, got {init_sync!r}")
    env = ReplicaGroupEnv.from_env() if env is None else env
    overridden = [v for v in _TORCHFT_TIMEOUT_ENVS if os.environ.get(v)]
    if overridden:
        log.warning("lightning_fedopt: %s set in the environment override torchft's timeouts", overridden)

    store = None
    store_addr, store_port = env.store_addr, env.store_port
    if store_addr is None:
        store = host_store(env.host, 0)
        store_addr, store_port = env.host, int(store.port)
    with manager_server_bound_to(env.host), _lighthouse_errors(env, connect_timeout):
        manager = Manager(
            pg=ProcessGroupGloo(timeout=t_pg),
            load_state_dict=None,
            state_dict=None,
            min_replica_size=min_replica_size,
            use_async_quorum=False,
            timeout=t_op,
            quorum_timeout=t_quorum,
            connect_timeout=t_connect,
            rank=env.group_rank,
            world_size=env.group_world_size,
            store_addr=store_addr,
            store_port=store_port,
            lighthouse_addr=env.lighthouse,
            replica_id=str(env.replica_id),
            hostname=env.host,
            heartbeat_interval=t_beat,
            checkpoint_transport=bound_http_transport(t_op, env.host),
            init_sync=init_sync,
            max_retries=max_retries,
            quorum_retries=quorum_retries,
        )
    return manager, store


# --------------------------------------------------------------------------- rounds
@dataclass(frozen=True)
class RoundInfo:
    """What :meth:`ManagedCommunicator.start_round` found.

    Attributes:
        quorum_id: the lighthouse's quorum id (it changes when the membership changes).
        step: rounds committed so far (torchft's step; after a heal, the peer's).
        participants: groups in this round (healing ones included).
        index: this group's index among them (ordered by replica id).
        healed: this group received its state from a peer in this quorum (it contributes zero
            weight to this round's reductions).
        healed_from_step: the step of the state received (None without a heal).
        heal_bytes: bytes received to heal: the checkpoint's response body (0 without a heal).
        heal_fetch_seconds: seconds of the checkpoint's transfer from the peer (None without a heal).
        errored: the quorum's reconfiguration or the heal failed: this round will not commit.
        seconds: wall time of the quorum (and the heal).
    """

    quorum_id: int
    step: int
    participants: int
    index: int | None
    healed: bool
    healed_from_step: int | None
    heal_bytes: int
    heal_fetch_seconds: float | None
    errored: bool
    seconds: float


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class ManagedHandle:
    """An in-flight managed all-reduce; :meth:`wait` completes it.

    ``wait()`` returns True when the reduction succeeded and the caller's tensors hold the result,
    False when it failed (they are unchanged; the round will not commit).
    """

    def __init__(self, finish: Callable[[], bool] | None, ok: bool = True) -> None:
        self._finish = finish
        self._result: bool | None = None if finish is not None else ok
        #: groups whose tensors counted in the reduction (None before wait / without a float tensor)
        self.contributors: int | None = None

    def is_completed(self) -> bool:
        """Whether :meth:`wait` has run (a managed all-reduce gives no progress without waiting)."""
        return self._result is not None

    def wait(self) -> bool:
        if self._result is None:
            assert self._finish is not None
            self._result = self._finish()
        return self._result


class ManagedCommunicator:
    """The fault-tolerant outer communicator: quorum, managed all-reduce, commit vote (module doc).

    It has :class:`~lightning_fedopt.comm.Communicator`'s ``all_reduce`` (``"mean"``/``"sum"``,
    counted in :attr:`stats` under the same cost model, over the round's participants) and refuses
    what torchft does not fault-manage.

    Args:
        manager: a torchft ``Manager`` with ``use_async_quorum=False`` that has not formed a
            quorum yet (from :func:`build_manager`).
        state_dict, load_state_dict: the state a behind group receives from a peer at its quorum
            (global weights, outer optimizer, schedule position, ...): tensors and plain Python
            values only (it is loaded with ``torch.load(weights_only=True)``; anything else fails
            the heal, and the round). ``state_dict()`` is called in the quorum thread while the
            caller waits in :meth:`start_round`; the tensors it returns are served by reference
            until the commit vote, so they must not change in between (they are the global state:
            they change only after a committed round).
        stats: where to count traffic (a new :class:`CommStats` by default).
        store: an object to keep alive with the manager (:func:`build_manager`'s store).
    """

    def __init__(
        self,
        manager: Any,
        *,
        state_dict: Callable[[], Any] | None = None,
        load_state_dict: Callable[[Any], object] | None = None,
        stats: CommStats | None = None,
        store: Any = None,
    ) -> None:
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError(
                "`manager` must be built with use_async_quorum=False: with the asynchronous quorum a "
                "healing group trains on stale weights and torchft counts it as a non-participant"
            )
        if (state_dict is None) != (load_state_dict is None):
            raise ValueError("`state_dict` and `load_state_dict` go together (both or neither)")
        self.manager = manager
        self.stats = stats if stats is not None else CommStats()
        self._store = store
        self._user_state_dict = state_dict
        self._user_load_state_dict = load_state_dict
        self._in_round = False
        self._healed_from: int | None = None
        self._heal_bytes = 0
        self._round: RoundInfo | None = None
        #: every round's info and outcome: ``(RoundInfo, committed)``, the last 1000
        self.history: list[tuple[RoundInfo, bool]] = []
        manager.register_state_dict_fn(STATE_KEY, self._load, self._save)

    @classmethod
    def from_env(
        cls,
        *,
        state_dict: Callable[[], Any] | None = None,
        load_state_dict: Callable[[Any], object] | None = None,
        stats: CommStats | None = None,
        env: ReplicaGroupEnv | None = None,
        **manager_kwargs: Any,
    ) -> ManagedCommunicator:
        """Build the manager from the environment (:func:`build_manager`'s arguments) and wrap it."""
        manager, store = build_manager(env, **manager_kwargs)
        return cls(manager, state_dict=state_dict, load_state_dict=load_state_dict, stats=stats, store=store)

    # ----------------------------------------------------------------- healing state
    def _save(self) -> dict[str, Any]:
        user = self._user_state_dict() if self._user_state_dict is not None else None
        return {"step": int(self.manager.current_step()), "user": user}

    def _count_served(self) -> None:
        """Count what the checkpoint server sent to healers since the last call: the bytes on the
        wire, once per healer (torchft builds the state once and serves it to every healer)."""
        take = getattr(self.manager._checkpoint_transport, "take_served", None)
        served = int(take()) if take is not None else 0
        if served:
            self.stats.record("heal_send", "heal", served, 0, 1, 0.0)

    def _load(self, state: dict[str, Any]) -> None:
        self._healed_from = int(state["step"])
        # the bytes on the wire (as the sender counts them), else the tensors' bytes
        fetched = getattr(self.manager._checkpoint_transport, "last_fetch_bytes", None)
        self._heal_bytes = int(fetched) if fetched else _tensor_bytes(state["user"])
        if self._user_load_state_dict is not None:
            self._user_load_state_dict(state["user"])

    # ----------------------------------------------------------------- topology of the round
    @property
    def available(self) -> bool:
        return True

    @property
    def world_size(self) -> int:
        """Groups in the current round (0 before the first quorum)."""
        return int(self.manager.num_participants()) if self._round is not None else 0

    @property
    def rank(self) -> int:
        """This group's index in the current round."""
        r = self._round.index if self._round is not None else None
        return 0 if r is None else int(r)

    @property
    def round(self) -> RoundInfo | None:
        """The current (or last) round's :class:`RoundInfo`."""
        return self._round

    # ----------------------------------------------------------------- the round
    def start_round(self, timeout: float | None = None) -> RoundInfo:
        """Form a quorum (and heal from a peer when this group is behind); see :class:`RoundInfo`.

        Raises :class:`QuorumError` when no quorum forms (lighthouse gone, quorum timeout).
        """
        if self._in_round:
            raise RuntimeError("start_round: the previous round is not finished: call commit() first")
        t = None if timeout is None else _seconds("timeout", timeout)
        self._healed_from, self._heal_bytes = None, 0
        t0 = time.perf_counter()
        try:
            self.manager.start_quorum(allow_heal=True, timeout=t)
        except Exception as exc:
            raise QuorumError(
                f"lightning_fedopt: no quorum for replica group {self.manager._replica_id} at step "
                f"{self.manager.current_step()}: {type(exc).__name__}: {exc}"
            ) from exc
        seconds = time.perf_counter() - t0
        self._count_served()
        self._in_round = True
        errored = self.manager.errored() is not None
        healed = self._healed_from is not None
        info = RoundInfo(
            quorum_id=int(self.manager._quorum_id),
            step=int(self.manager.current_step()),
            participants=int(self.manager.num_participants()),
            index=self.manager.participating_rank(),
            healed=healed,
            healed_from_step=self._healed_from,
            heal_bytes=self._heal_bytes,
            heal_fetch_seconds=getattr(self.manager._checkpoint_transport, "last_fetch_seconds", None)
            if healed
            else None,
            errored=errored,
            seconds=seconds,
        )
        self._round = info
        self.stats.record("quorum", "control", 0, 0, 1, seconds)
        if healed:
            self.stats.record("heal_recv", "heal", 0, info.heal_bytes, 1, 0.0)
        return info

    def all_reduce(
        self,
        tensors: Tensor | Sequence[Tensor],
        op: str = "sum",
        *,
        purpose: str = "sync",
        async_op: bool = False,
    ) -> ManagedHandle:
        """Reduce ``tensors`` in place across the round's groups (one managed all-reduce per dtype).

        ``"mean"`` divides by the number of groups that contributed (a group that healed in this
        round contributes zeros and no weight); ``"sum"`` adds the contributions. ``"mean"``
        needs floating-point tensors. Must be called between :meth:`start_round` and
        :meth:`commit`, in the same order on every group.
        """
        check_str("purpose", purpose)
        if op not in ("mean", "sum"):
            raise ValueError(
                f"all_reduce: op must be 'mean' or 'sum' across fault-tolerant replica groups, got {op!r} "
                "(a group that healed this round contributes zeros, which max/min/product would count)"
            )
        if not self._in_round:
            raise RuntimeError("all_reduce: call start_round() first (the quorum decides who takes part)")
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        if not tensors:
            return ManagedHandle(None)
        # torch's ReduceOp as torchft imports it (only lightning_fedopt/comm.py imports torch.distributed)
        from torchft.manager import ReduceOp

        contributes = self._healed_from is None
        n = max(int(self.manager.num_participants()), 1)
        t0 = time.perf_counter()
        pending: list[tuple[Any, Tensor, list[Tensor], bool]] = []
        for idx in group_by_dtype(tensors):
            group = [tensors[i] for i in idx]
            weighted = group[0].is_floating_point()
            if op == "mean" and not weighted:
                raise ValueError(f"all_reduce: 'mean' needs floating-point tensors, got {group[0].dtype}")
            flat = flatten(group)
            if weighted:
                flat = torch.cat([flat, flat.new_ones(1)])
            if not contributes:
                flat.zero_()
            nbytes = flat.numel() * flat.element_size()
            sent, received = cost_model("all_reduce", nbytes, n)
            self.stats.record("all_reduce", purpose, sent, received, 1, 0.0)
            pending.append((self.manager.allreduce(flat, reduce_op=ReduceOp.SUM), flat, group, weighted))
        self.stats.add_seconds("all_reduce", purpose, time.perf_counter() - t0)
        handle: ManagedHandle

        def finish() -> bool:
            t1 = time.perf_counter()
            try:
                for work, *_ in pending:
                    work.wait()
                if self.manager.errored() is not None:
                    return False  # the caller's tensors stay as they were; the round will not commit
                weights = [float(flat[-1]) for _, flat, _, weighted in pending if weighted]
                if weights:
                    handle.contributors = round(weights[0])
                    if min(weights) <= 0.0:
                        self.manager.report_error(
                            RuntimeError("no replica group contributed to the all-reduce")
                        )
                        return False
                for _, flat, group, weighted in pending:
                    data = flat[:-1] if weighted else flat
                    if op == "mean":
                        data.div_(flat[-1])
                    unflatten_into(data, group)
                return True
            finally:
                self.stats.add_seconds("all_reduce", purpose, time.perf_counter() - t1)

        handle = ManagedHandle(finish)
        if not async_op:
            handle.wait()
        return handle

    def commit(self) -> bool:
        """The round's vote (torchft's ``should_commit``): True when every process of this group
        succeeded and enough groups took part. Apply the round's result only when True; otherwise
        restore the saved global state (this group heals at its next quorum if others committed)."""
        if not self._in_round:
            raise RuntimeError("commit: no round in progress (call start_round() first)")
        t0 = time.perf_counter()
        try:
            ok = bool(self.manager.should_commit())
        finally:
            self._in_round = False
            self.stats.record("should_commit", "control", 0, 0, 1, time.perf_counter() - t0)
            self._count_served()  # healers fetch while the round runs, until the vote
        if self._round is not None:
            self.history.append((self._round, ok))
            del self.history[:-1000]
        return ok

    def close(self) -> None:
        """Stop the manager's servers (this group leaves; the lighthouse notices by its heartbeats)."""
        with contextlib.suppress(Exception):
            self.manager.shutdown(wait=False)
        self._store = None

    # ----------------------------------------------------------------- counting
    def account(
        self, op: str, nbytes: int, *, purpose: str, is_source: bool = False, seconds: float = 0.0
    ) -> None:
        """Count an ``op`` of ``nbytes`` made outside this communicator (as ``Communicator.account``)."""
        sent, received = cost_model(op, nbytes, max(self.world_size, 1), is_source=is_source)
        self.stats.record(op, purpose, sent, received, 1, seconds)

    # ----------------------------------------------------------------- not fault-managed
    def all_reduce_future(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("all_reduce_future")

    def broadcast(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("broadcast")

    def all_gather(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("all_gather")

    def all_to_all(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("all_to_all")

    def send(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("send")

    def recv(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("recv")

    def exchange(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("exchange (point-to-point)")

    def barrier(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("barrier")

    def split(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("split (sub-groups)")

    def with_deadline(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("with_deadline (torchft's timeouts apply: build_manager's timeout)")

    def broadcast_object(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("broadcast_object")

    def all_gather_object(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFaultManagedError("all_gather_object")
