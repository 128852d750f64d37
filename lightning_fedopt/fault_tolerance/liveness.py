"""A lost replica: a clear error within a deadline instead of a hang or a raw transport error.

Without this, a replica that dies (``kill -9``, a lost node) or stalls (``kill -STOP``, a network
partition, a hung device) shows on its peers as gloo's or NCCL's raw ``Connection closed by peer``
at their next collective, or as a wait for the process group's timeout (30 minutes by default).

:class:`Liveness` keeps two things in the job's rendezvous store (the ``TCPStore`` the process
group was created from: rank 0's under Lightning's launchers, the agent's under ``torchrun``),
through its own client connections:

* a **heartbeat**: a daemon thread increments ``hb/<rank>`` every ``period`` seconds (a few bytes
  to the store, no collective);
* an **arrival record** at every meeting point of the ranks (before each synchronisation and
  Lightning's barriers during ``fit``): ``at<n>/<rank>``. A rank waits for every other rank's record
  before the collective, for as long as the missing ranks' heartbeats advance. A long compute phase
  between synchronisations is therefore not a failure; a rank whose heartbeat has not advanced for
  ``stale_after`` seconds is.

The synchronisation traffic itself runs on a process group whose timeout is the strategy's
``sync_timeout``. When a collective fails (a peer closed the connection) or times out, the
survivors look at the heartbeats to tell which ranks are gone and raise :class:`ReplicaLostError`,
naming them, the step and the synchronisation. A rank that hosted the store (rank 0 under
Lightning's launchers) and died shows as the store becoming unreachable; it is named as such.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from lightning_fedopt import comm as _comm
from lightning_fedopt.errors import ReplicaLostError

log = logging.getLogger("lightning_fedopt")

__all__ = ["Liveness", "ReplicaLostError"]


def _period(sync_timeout: float) -> float:
    return min(0.5, max(0.05, sync_timeout / 10))


class Liveness:
    """Heartbeats and arrival records of one ``fit`` in the rendezvous store (module doc).

    Args:
        rank, world_size: this process's global rank and the number of processes.
        sync_timeout: seconds; the deadline of the synchronisation traffic.
        prefix: a key prefix unique to this ``fit`` (the same on every rank).
    """

    def __init__(self, rank: int, world_size: int, sync_timeout: float, prefix: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.sync_timeout = float(sync_timeout)
        self.period = _period(self.sync_timeout)
        #: a rank whose heartbeat has not advanced for this long is lost
        self.stale_after = min(self.sync_timeout, max(3.0, 6 * self.period))
        self.prefix = prefix
        self._store = self._connect()
        self._beat_store = self._connect()
        self._meetings = 0
        self._seen: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        self.store_lost = False
        self._thread: threading.Thread | None = None
        if self._store is not None:
            self._beat()
            self._thread = threading.Thread(
                target=self._beat_loop, name="lightning_fedopt-heartbeat", daemon=True
            )
            self._thread.start()

    # ------------------------------------------------------------------ store
    def _connect(self) -> Any:
        tcp = _comm.default_tcp_store()
        if tcp is None:
            return None
        timeout = timedelta(seconds=max(self.sync_timeout, 1.0))
        return _comm.prefixed_store_client(tcp, self.prefix, timeout)

    @property
    def available(self) -> bool:
        """Whether the process group was created from a TCP store (else only the deadline works)."""
        return self._store is not None

    def _beat(self) -> None:
        self._beat_store.add(f"hb/{self.rank}", 1)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._beat()
            except Exception:  # the store is gone: the peers will say so; nothing to beat into
                self.store_lost = True
                return

    def close(self) -> None:
        """Stop the heartbeat (end of ``fit``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.period + 1)
            self._thread = None

    # ------------------------------------------------------------------ who is gone
    def request_stop(self, target: int) -> int:
        """Ask every rank to stop after synchronisation ``target`` (for strategies without a global
        meeting point, NoLoCo); the first request wins. Returns the agreed target."""
        return int(self._store.compare_set("stop", "", str(int(target))))

    def stop_target(self) -> int | None:
        """The synchronisation after which every rank stops (None: no rank asked)."""
        if self._store is None or not self._store.check(["stop"]):
            return None
        return int(self._store.get("stop"))

    def announce_abort(self) -> None:
        """Tell the others this rank is alive but giving up (after it found a peer lost), so that
        its silence from now on is not mistaken for a loss."""
        with contextlib.suppress(Exception):
            self._store.set(f"abort/{self.rank}", b"1")

    def _aborted(self, ranks: list[int]) -> set[int]:
        return {r for r in ranks if self._store.check([f"abort/{r}"])}

    def _heartbeats(self, ranks: list[int]) -> dict[int, int]:
        return {r: int(self._store.add(f"hb/{r}", 0)) for r in ranks if r != self.rank}

    def stale_ranks(self, candidates: list[int] | None = None) -> list[int]:
        """The ranks among ``candidates`` whose heartbeat has not advanced for ``stale_after``
        seconds by this rank's observation (one look; call it repeatedly)."""
        now = time.monotonic()
        lost = []
        for r, value in self._heartbeats(
            list(range(self.world_size)) if candidates is None else candidates
        ).items():
            last = self._seen.get(r)
            if last is None or last[0] != value:
                self._seen[r] = (value, now)
            elif now - last[1] >= self.stale_after:
                lost.append(r)
        aborted = self._aborted(lost) if lost else set()
        return [r for r in lost if r not in aborted]

    def diagnose(self, candidates: list[int] | None = None, patience: float | None = None) -> list[int]:
        """Watch the heartbeats for up to ``patience`` seconds (default ``stale_after`` plus two
        periods) and return the ranks among ``candidates`` found stale (``[]``: all alive).
        Raises :class:`_StoreLost` when the store cannot be reached."""
        if self._store is None:
            return []
        end = time.monotonic() + (patience if patience is not None else self.stale_after + 2 * self.period)
        try:
            while True:
                lost = self.stale_ranks(candidates)
                if lost or time.monotonic() >= end:
                    return lost
                time.sleep(self.period / 2)
        except Exception as exc:  # the store host is gone (or stopped)
            raise _StoreLost(str(exc)) from None

    # ------------------------------------------------------------------ meeting points
    def arrive(self, on_lost: Callable[[list[int], str], BaseException]) -> None:
        """Record this rank's arrival at the next meeting point and wait for every other rank's,
        for as long as their heartbeats advance; ``on_lost(ranks, detail)`` builds the error to
        raise when some are found stale or the store is gone."""
        if self._store is None:
            return
        n = self._meetings
        self._meetings += 1
        keys = [f"at{n}/{r}" for r in range(self.world_size)]
        try:
            self._store.set(keys[self.rank], b"1")
            if n >= 2:
                self._store.delete_key(f"at{n - 2}/{self.rank}")
            delay, next_look = 0.0002, time.monotonic() + self.period
            while not self._store.check(keys):  # polled: a store ``wait`` that times out logs warnings
                time.sleep(delay)
                delay = min(2 * delay, self.period / 4)
                if time.monotonic() >= next_look:  # not everyone yet: are the missing ones alive?
                    next_look = time.monotonic() + self.period
                    missing = [r for r, k in enumerate(keys) if not self._store.check([k])]
                    lost = self.stale_ranks(missing)
                    if lost:
                        raise on_lost(lost, f"no heartbeat for {self.stale_after:g} s") from None
        except (_comm.DistNetworkError, _comm.DistStoreError) as exc:
            raise on_lost(self.store_host_ranks(), f"the rendezvous store is unreachable ({exc})") from None

    def store_host_ranks(self) -> list[int]:
        """The ranks that die with the store: rank 0 (Lightning's launchers, and ``torchrun`` with
        ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), none when a ``torchrun`` agent hosts it."""
        return [] if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else [0]

    def explain(
        self, exc: BaseException, on_lost: Callable[[list[int], str], BaseException]
    ) -> BaseException | None:
        """After a failed collective: the error to raise instead of ``exc`` (None: ``exc`` is not a
        lost peer, raise it as it is)."""
        transport = (
            isinstance(exc, _comm.DistError) or "gloo" in str(exc).lower() or "timed out" in str(exc).lower()
        )
        if not transport:
            return None
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        try:
            lost = self.diagnose()
        except _StoreLost as store_exc:
            return on_lost(
                self.store_host_ranks(), f"{detail}; the rendezvous store is unreachable ({store_exc})"
            )
        return on_lost(lost, detail)


class _StoreLost(RuntimeError):
    """The rendezvous store cannot be reached."""


def close_quietly(liveness: Liveness | None) -> None:
    """:meth:`Liveness.close` that never raises (teardown)."""
    if liveness is not None:
        with contextlib.suppress(Exception):
            liveness.close()
