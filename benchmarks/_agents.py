"""One job as N ``torchrun`` agents on this machine: every agent is a "node" with one worker.

:class:`Agents` starts a standalone rendezvous store host (a ``TCPStore`` in its own process, so the
store does not die with any node), then ``N`` elastic agents
(``python -m torch.distributed.run --nnodes=MIN:MAX --nproc-per-node=1 --rdzv-backend=c10d ...``),
each in its own session, so that one replica (:meth:`Agents.kill_worker`) or one whole node, agent
and worker (:meth:`Agents.kill_node`), can be lost independently; :meth:`Agents.add_node` starts a
late joiner. Nothing here imports torch: the harness stays light and the workers do the training.

How the processes hang together (torch 2.13)::

    harness ── store host  (TCPStore, is_master, multi_tenant; prints its port)
            ├─ agent 0 (own session) ── worker (own session: torchrun's start_new_session=True)
            ├─ agent 1 (own session) ── worker
            └─ ...

* **Finding a worker**: the *current* worker of agent ``i`` is the live child of the agent's pid
  whose environment holds ``TORCHELASTIC_RESTART_COUNT`` (set by the agent for its workers only),
  found by scanning ``/proc`` (no psutil). Ranks are reassigned at every re-rendezvous, so the
  harness never identifies a worker by rank, only by the agent that started it.
* **Clean-up**: every process of the job carries ``FEDOPT_ELASTIC_JOB=<token>`` in its environment
  (the agents inherit it, torchrun passes it to the workers). :meth:`Agents.close` kills every
  agent's process group, every worker's (a worker is its own session leader), then kills whatever
  process of the job ``/proc`` still shows, orphans and stopped (SIGSTOP) processes included, until
  none is left; then the store host. ``with Agents(...) as job:`` does it on any exit.
* **Progress channel**: inside a worker, :func:`write_progress` atomically (``os.replace``) writes
  ``<dir>/progress/agent<i>.json`` (global step, rank, world size, restart count, pid, time);
  :meth:`Agents.progress` reads it and :meth:`Agents.wait_for_step` polls it with a deadline, so a
  failure can be injected at a chosen step.

Rendezvous settings (``--rdzv-conf``, see :class:`Rendezvous`): the c10d backend re-forms a round
only once every participant of the previous round has left it (a killed node is dropped when its
keep-alive expires: ``keep_alive_interval * keep_alive_max_attempt`` seconds, 5 x 3 = 15 s by
default, 1 x 3 = 3 s here), then waits ``last_call_timeout`` (30 s by default, 3 s here) after
``min_nodes`` joined for more nodes, unless ``max_nodes`` join first (then it completes at once).
A join polls the store once a second (fixed in torch), so a re-rendezvous costs ~1-2 s even when
nothing waits. ``last_call_timeout`` must still cover how long the slowest healthy agent needs to
stop its worker and rejoin, or the round completes without it and it forces one more round from
the wait list. The agents use ``--local-addr=127.0.0.1`` (no host-name lookups) and
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: by default torch 2.13 hosts the *workers'* store in the
rank-0 agent and the other agents cache its address across rounds, which breaks when that agent's
node is lost (measured: the two survivors were given different worker-store ports and their
workers hung at start-up); with sharing off, every round's rank-0 worker hosts a fresh store.
``--monitor-interval`` is 0.2 s here (torch 2.13's default is 0.1 s): how often an agent looks at
its worker and at the rendezvous' wait list.

What the agents do on a failure (torch 2.13, measured with this harness):

* A worker dies: its agent restarts it (one of its ``--max-restarts``; ``TORCHELASTIC_RESTART_COUNT``
  counts *that agent's* restarts only) and joins the next round's wait list; the other agents see
  a node waiting and restart their own workers (free, their restart count stays put) unless their
  workers failed first on the dead peer (then it counts on them too).
* A node is lost (agent and worker killed): the other agents notice *nothing* by themselves; only
  their workers failing (a collective with the dead peer, the library's ``ReplicaLostError``) makes
  them re-rendezvous, on the survivors once the lost node's keep-alive expired.
* A worker is stopped (SIGSTOP): its agent still sees it as healthy. When the others re-form, it
  stops it with SIGTERM and waits 30 s before SIGKILL (``_stop_workers`` ignores
  ``--shutdown-timeout``); the round, which needs every previous participant gone, waits as long.
* A node joins (:meth:`Agents.add_node`, with ``max_nodes`` not reached): it waits in the wait list,
  every agent restarts its worker (free) and the job continues at the larger world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

from benchmarks.harness import clean_env, tail

__all__ = [
    "ENV_AGENT",
    "ENV_DIR",
    "ENV_JOB",
    "Agents",
    "Progress",
    "Rendezvous",
    "job_pids",
    "process_start_time",
    "read_progress",
    "write_progress",
]

#: every process of a job carries this variable (its value: the job's token); clean-up finds them by it
ENV_JOB = "FEDOPT_ELASTIC_JOB"
#: the index of the agent ("node") that started a worker, stable across restarts (ranks are not)
ENV_AGENT = "FEDOPT_AGENT_INDEX"
#: the job's directory (progress files, logs, the worker script's outputs)
ENV_DIR = "FEDOPT_ELASTIC_DIR"
_WORKER_MARK = b"TORCHELASTIC_RESTART_COUNT="  # in a worker's environment, never in its agent's
_POLL = 0.01  # seconds between two looks at /proc or the progress files

# the store host: a TCPStore server alone in its process; prints its port once it listens
_STORE_CODE = (
    "import sys, time, torch.distributed as d\n"
    "s = d.TCPStore('127.0.0.1', int(sys.argv[1]), is_master=True, multi_tenant=True, wait_for_workers=False)\n"
    "print(s.port, flush=True)\n"
    "time.sleep(1e9)\n"
)


# ====================================================================== worker side
@dataclasses.dataclass(frozen=True)
class Progress:
    """What a worker last reported (:func:`write_progress`).

    Attributes:
        agent: index of the agent that started the worker.
        step: the global (optimizer) step the worker has completed.
        rank: its global rank in the current round.
        world_size: the world size of the current round.
        restart: ``TORCHELASTIC_RESTART_COUNT`` of the worker: restarts *of its own agent*, which
            does not count restarts it made because another node joined or left.
        pid: the worker's pid.
        time: ``time.time()`` when it was written.
        started: ``time.time()`` when the worker process started (:func:`process_start_time`).
        phase: ``"start"`` (written at ``on_train_start``, ``step`` = the step training resumes
            from), ``"train"`` (after a step) or ``"end"``.
    """

    agent: int
    step: int
    rank: int
    world_size: int
    restart: int
    pid: int
    time: float
    started: float
    phase: str = "train"


def write_progress(step: int, phase: str = "train") -> Progress | None:
    """In a worker started by :class:`Agents`: atomically write ``<dir>/progress/agent<i>.json``.

    Returns what was written, or ``None`` outside such a job (no ``FEDOPT_ELASTIC_DIR``).
    """
    directory = os.environ.get(ENV_DIR)
    if not directory:
        return None
    p = Progress(
        agent=int(os.environ.get(ENV_AGENT, "0")),
        step=int(step),
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        pid=os.getpid(),
        time=time.time(),
        started=_started(),
        phase=phase,
    )
    folder = Path(directory, "progress")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".agent{p.agent}.{p.pid}.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(p)))
    os.replace(tmp, folder / f"agent{p.agent}.json")
    return p


def process_start_time(pid: int | str = "self") -> float:
    """When process ``pid`` started, on the ``time.time()`` scale (from ``/proc``; NaN if unknown)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return math.nan
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


_STARTED: dict[int, float] = {}


def _started() -> float:
    """:func:`process_start_time` of this process, looked up once."""
    pid = os.getpid()
    if pid not in _STARTED:
        _STARTED[pid] = process_start_time()
    return _STARTED[pid]


def read_progress(directory: str | Path, agent: int) -> Progress | None:
    """Agent ``agent``'s last :class:`Progress` in the job directory ``directory`` (``None``: none yet)."""
    try:
        return Progress(**json.loads(Path(directory, "progress", f"agent{agent}.json").read_text()))
    except FileNotFoundError:
        return None


# ====================================================================== /proc
def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, pgid)`` of ``pid`` from ``/proc/<pid>/stat``; ``None`` if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()  # the command name may hold spaces and brackets
    return fields[0].decode(), int(fields[1]), int(fields[2])


def _environ(pid: int) -> bytes:
    """The environment ``pid`` was started with (empty if unreadable: gone, a zombie, not ours)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a stopped process is alive)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    out = []
    for child in _pids():
        st = _stat(child)
        if st is not None and st[1] == pid and st[0] not in ("Z", "X"):
            out.append(child)
    return out


def job_pids(token: str) -> list[int]:
    """Every live process whose environment holds ``FEDOPT_ELASTIC_JOB=<token>``."""
    needle = f"{ENV_JOB}={token}".encode()
    own = os.getpid()
    return [pid for pid in _pids() if pid != own and needle in _environ(pid).split(b"\0") and _alive(pid)]


def _kill(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``'s process group if it leads one, else to ``pid``; ignore if gone."""
    st = _stat(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if st is not None and st[2] == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


# ====================================================================== the job
@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """``--rdzv-conf`` of the c10d rendezvous (all in whole seconds: torch parses them as ints).

    Attributes:
        join_timeout: how long an agent may wait for a round to form before it gives up.
        last_call_timeout: after ``min_nodes`` joined, how long to wait for more (default 30 s in
            torch; short here so that a lost node costs little, long enough that the healthy
            agents rejoin after stopping their workers).
        close_timeout: how long closing the rendezvous may take at the end.
        keep_alive_interval: seconds between an agent's heartbeats (default 5).
        keep_alive_max_attempt: missed heartbeats after which a node is dead (default 3); a lost
            node blocks the next round for ``keep_alive_interval * keep_alive_max_attempt`` s.
        read_timeout: timeout of one store operation.
    """

    join_timeout: int = 120
    last_call_timeout: int = 3
    close_timeout: int = 10
    keep_alive_interval: int = 1
    keep_alive_max_attempt: int = 3
    read_timeout: int = 60

    def conf(self) -> str:
        """The ``--rdzv-conf`` value; ``is_host=false``: the store is the harness's store host."""
        return "is_host=false," + ",".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


class Agents:
    """One elastic job: a store host and ``nodes`` torchrun agents with one worker each.

    Args:
        script: the training script (a path) or, with ``module=True``, a module name.
        args: the script's arguments.
        directory: the job directory (``None``: a fresh temporary one, kept): agents' logs in
            ``logs/agent<i>.log``, progress in ``progress/``; the workers get it as
            ``FEDOPT_ELASTIC_DIR``.
        nodes: agents started by :meth:`start`.
        min_nodes, max_nodes: ``--nnodes=MIN:MAX`` (default: ``nodes:nodes``).
        max_restarts: ``--max-restarts`` of every agent. An agent spends one when *its* worker
            fails (a dead peer makes the others' workers fail too); joins and leaves of other
            nodes are free.
        monitor_interval: ``--monitor-interval`` (seconds between an agent's checks of its worker
            and of the rendezvous' wait list: the detection latency).
        rendezvous: the ``--rdzv-conf`` settings.
        run_id: ``--rdzv-id`` (the workers see it as ``TORCHELASTIC_RUN_ID``); default: a new
            unique id.
        module: run ``script`` as ``python -m script``.
        env: extra environment of the agents and their workers.
        agent_args: extra torchrun options.
    """

    def __init__(
        self,
        script: str | Path,
        args: Sequence[str] = (),
        directory: str | Path | None = None,
        *,
        nodes: int = 3,
        min_nodes: int | None = None,
        max_nodes: int | None = None,
        max_restarts: int = 10,
        monitor_interval: float = 0.2,
        rendezvous: Rendezvous | None = None,
        run_id: str | None = None,
        module: bool = False,
        env: Mapping[str, str] | None = None,
        agent_args: Sequence[str] = (),
    ) -> None:
        self.script = str(script)
        self.args = [str(a) for a in args]
        self.dir = (
            Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="fedopt-elastic-"))
        )
        self.nodes = nodes
        self.min_nodes = nodes if min_nodes is None else min_nodes
        self.max_nodes = nodes if max_nodes is None else max_nodes
        if not 1 <= self.min_nodes <= self.max_nodes:
            raise ValueError(f"need 1 <= min_nodes <= max_nodes, got {self.min_nodes}:{self.max_nodes}")
        self.max_restarts = max_restarts
        self.monitor_interval = monitor_interval
        self.rendezvous = rendezvous or Rendezvous()
        self.run_id = run_id or f"fedopt-{uuid.uuid4().hex[:12]}"
        self.module = module
        self.extra_env = dict(env or {})
        self.agent_args = list(agent_args)
        self.token = uuid.uuid4().hex
        self.port: int | None = None
        self._store: subprocess.Popen[bytes] | None = None
        self._agents: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.started_at: list[float] = []  # time.time() at which each agent was started

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> Agents:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def env(self, index: int) -> dict[str, str]:
        """The environment of agent ``index`` (and of its workers)."""
        return clean_env(
            {
                ENV_JOB: self.token,
                ENV_AGENT: str(index),
                ENV_DIR: str(self.dir),
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
            }
        )

    def command(self) -> list[str]:
        """The agents' command line."""
        if self.port is None:
            raise RuntimeError("the store host is not started")
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.min_nodes}:{self.max_nodes}",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{self.port}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf={self.rendezvous.conf()}",
            f"--max-restarts={self.max_restarts}",
            f"--monitor-interval={self.monitor_interval}",
            "--local-addr=127.0.0.1",
            *self.agent_args,
            *(["-m"] if self.module else []),
            self.script,
            *self.args,
        ]

    def start_store(self, timeout: float = 60.0) -> int:
        """Start the store host on a free port (chosen by the OS) and return the port."""
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        err = open(self.dir / "logs" / "store.log", "wb")
        self._logs.append(err)
        self._store = subprocess.Popen(
            [sys.executable, "-c", _STORE_CODE, "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=clean_env({ENV_JOB: self.token}),
            start_new_session=True,
        )
        assert self._store.stdout is not None
        # the one line it prints is its port; it prints it once the server listens
        line = _readline(self._store, timeout)
        if not line.strip().isdigit():
            raise RuntimeError(f"the store host did not start:\n{tail(self.dir / 'logs' / 'store.log')}")
        self.port = int(line)
        return self.port

    def start(self) -> None:
        """Start the store host and the ``nodes`` agents (stale progress files of an earlier job
        in the same directory are removed first)."""
        if self._agents:
            raise RuntimeError("already started")
        shutil.rmtree(self.dir / "progress", ignore_errors=True)
        self.start_store()
        for _ in range(self.nodes):
            self.add_node()

    def add_node(self) -> int:
        """Start one more agent (a late joiner once the job runs) and return its index."""
        index = len(self._agents)
        log = open(self.dir / "logs" / f"agent{index}.log", "wb")
        self._logs.append(log)
        self._agents.append(
            subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(index),
                cwd=Path(__file__).resolve().parent.parent,
                start_new_session=True,
            )
        )
        self.started_at.append(time.time())
        return index

    def close(self) -> None:
        """Kill everything of the job (agents, workers, orphans, stopped ones, the store host)."""
        for proc in self._agents:
            if proc.poll() is None:
                _kill(proc.pid, signal.SIGSTOP)  # no new worker from here on
                for child in _children(proc.pid):
                    _kill(child, signal.SIGKILL)
                _kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30.0
        while True:
            left = job_pids(self.token)
            for pid in left:
                _kill(pid, signal.SIGKILL)
            if not left or time.monotonic() > deadline:
                break
            time.sleep(_POLL)
        for proc in [*self._agents, *([self._store] if self._store else [])]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if self._store is not None and self._store.stdout is not None:
            self._store.stdout.close()
        for fh in self._logs:
            fh.close()
        self._logs.clear()

    # ------------------------------------------------------------------ looking
    def __len__(self) -> int:
        return len(self._agents)

    def agent_pid(self, index: int) -> int:
        """The pid of agent ``index`` (its process group's id too)."""
        return self._agents[index].pid

    def returncode(self, index: int) -> int | None:
        """Agent ``index``'s exit code (``None`` while it runs; ``-9``: killed)."""
        return self._agents[index].poll()

    def running(self) -> list[int]:
        """Indices of the agents still running."""
        return [i for i, p in enumerate(self._agents) if p.poll() is None]

    def worker_pid(self, index: int) -> int | None:
        """The pid of agent ``index``'s current worker (``None``: it has none right now, e.g. while
        it re-rendezvouses, or the agent is gone)."""
        if self._agents[index].poll() is not None:
            return None
        workers = [c for c in _children(self.agent_pid(index)) if _WORKER_MARK in _environ(c)]
        return min(workers) if workers else None

    def wait_for_worker(self, index: int, timeout: float, other_than: Iterable[int] = ()) -> int:
        """Poll until agent ``index`` has a worker whose pid is not in ``other_than``; its pid."""
        exclude = set(other_than)
        deadline = time.monotonic() + timeout
        while True:
            pid = self.worker_pid(index)
            if pid is not None and pid not in exclude:
                return pid
            if self._agents[index].poll() is not None:
                raise RuntimeError(f"agent {index} exited ({self.returncode(index)}) without a new worker")
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {index} started no new worker within {timeout}s")
            time.sleep(_POLL)

    def progress(self, index: int) -> Progress | None:
        """Agent ``index``'s last :class:`Progress` (``None``: its workers reported nothing yet)."""
        return read_progress(self.dir, index)

    def progress_all(self) -> dict[int, Progress]:
        """``agent -> Progress`` of every agent that reported."""
        return {i: p for i in range(len(self._agents)) if (p := self.progress(i)) is not None}

    def wait_for_step(
        self,
        step: int,
        timeout: float,
        agents: Iterable[int] | None = None,
        every: bool = False,
        started_after: float | None = None,
    ) -> dict[int, Progress]:
        """Poll the progress files until one of ``agents`` (default: all; ``every=True``: each of
        them) reports ``step`` or more; return :meth:`progress_all` at that moment.

        ``started_after``: count only workers started after this ``time.time()`` (e.g. a
        failure's: the restarted workers, not the killed ones' stale files nor survivors that have
        not noticed the failure yet). Raises ``TimeoutError`` after ``timeout`` seconds and
        ``RuntimeError`` if every agent exited first.
        """
        chosen = list(range(len(self._agents)) if agents is None else agents)
        since = -math.inf if started_after is None else started_after
        deadline = time.monotonic() + timeout
        while True:
            now = self.progress_all()
            reached = [i in now and now[i].step >= step and now[i].started > since for i in chosen]
            if all(reached) if every else any(reached):
                return now
            if not self.running():
                raise RuntimeError(f"every agent exited before step {step} (exit codes {self.returncodes()})")
            if time.monotonic() > deadline:
                seen = {i: p.step for i, p in now.items()}
                raise TimeoutError(f"step {step} not reached within {timeout}s (progress {seen})")
            time.sleep(_POLL)

    def returncodes(self) -> list[int | None]:
        """Every agent's exit code, ``None`` for those still running."""
        return [p.poll() for p in self._agents]

    def wait(self, timeout: float) -> list[int | None]:
        """Wait until every agent has exited; their exit codes (``TimeoutError`` after ``timeout``
        seconds, the job left running: :meth:`close` stops it)."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents {self.running()} still running after {timeout}s")
            time.sleep(_POLL * 5)
        return self.returncodes()

    def log(self, index: int, lines: int = 40) -> str:
        """The last ``lines`` lines of agent ``index``'s log (its worker's output included)."""
        return tail(self.dir / "logs" / f"agent{index}.log", lines)

    # ------------------------------------------------------------------ failures
    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` (SIGKILL, SIGSTOP, SIGCONT, SIGTERM, ...) to agent ``index``'s current
        worker (its whole process group); returns the worker's pid (``LookupError``: none now)."""
        pid = self.worker_pid(index)
        if pid is None:
            raise LookupError(f"agent {index} has no worker right now")
        _kill(pid, sig)
        return pid

    def kill_node(self, index: int) -> list[int]:
        """Lose node ``index``: SIGKILL its agent and its worker; returns the pids killed."""
        proc = self._agents[index]
        if proc.poll() is not None:
            return []
        _kill(proc.pid, signal.SIGSTOP)  # frozen: it cannot start a worker while we look
        killed = [*_children(proc.pid), proc.pid]
        for pid in killed:
            _kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return killed


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of ``proc``'s stdout within ``timeout`` seconds (empty if it exits or times out)."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                break
            buf += chunk
    finally:
        sel.close()
    return buf.decode(errors="replace")
