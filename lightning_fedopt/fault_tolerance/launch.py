"""Start a lighthouse and N replica groups on this machine, and restart a group whose process dies.

Usage::

    python -m lightning_fedopt.fault_tolerance.launch --groups 3 -- python train.py --max-steps 600
    python -m lightning_fedopt.fault_tolerance.launch --groups 2 -- torchrun --nproc-per-node 2 train.py

Each group is one command (a single process, or ``torchrun`` running ``group_size`` processes that do
DDP inside the group) started with ``REPLICA_GROUP_ID`` (0..N-1), ``TORCHFT_LIGHTHOUSE``
(``http://<bind>:<port>``), ``LIGHTNING_FEDOPT_FT_HOST`` (``<bind>``: where the group's own servers
listen), ``LIGHTNING_FEDOPT_FT_RESTARTS`` (how many times it was restarted) and
``LIGHTNING_FEDOPT_FT_GROUPS`` (N: a quorum of more groups than that holds a stray client, and the
strategy does not apply its round) in its environment.
Membership is the lighthouse's business (torchft's quorum): this launcher only starts processes,
restarts one that exits with an error (at most ``--max-restarts`` times per group) and forwards
SIGTERM/SIGINT to every group. It prints one line per start, death and restart, and exits with 0
when every group exited with 0, 1 when a group used up its restarts (the others are stopped), and
``128 + signal`` after a forwarded signal.

The lighthouse runs inside this process (``torchft.coordination.LighthouseServer``), bound to
``--bind`` (default ``127.0.0.1``: only this machine can reach it). It accepts anyone who reaches
its port, including a call that kills a group: bind it to a private network only.

For several hosts, run the lighthouse on one of them (``torchft_lighthouse --bind <private
address>:29510 --min_replicas 1``) and on every site ``torchrun ... train.py`` with
``TORCHFT_LIGHTHOUSE=http://<lighthouse>:29510``, ``REPLICA_GROUP_ID=<site>`` and
``LIGHTNING_FEDOPT_FT_HOST=<this site's private address>``, under the site's own supervisor.

This module imports nothing from ``lightning_fedopt`` so that it stays light.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_fedopt.fault_tolerance._servers import url_host

__all__ = ["main"]

POLL_S = 0.05


def _log(msg: str) -> None:
    print(f"[ft-launch {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


@dataclass
class _Group:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    done: bool = False
    pids: list[int] = field(default_factory=list)


class _Launcher:
    def __init__(self, args: argparse.Namespace, command: list[str]) -> None:
        self.args = args
        self.command = command
        self.groups = [_Group(i) for i in range(args.groups)]
        self.stop_signal: int | None = None
        self.lighthouse: Any = None
        self.address = ""
        self._events = open(args.events, "a") if args.events else None

    def event(self, **kw: Any) -> None:
        if self._events is not None:
            self._events.write(json.dumps({**kw, "time": time.time()}) + "\n")
            self._events.flush()

    def start_lighthouse(self) -> None:
        from torchft.coordination import LighthouseServer

        self.lighthouse = LighthouseServer(
            bind=f"{url_host(self.args.bind)}:{self.args.lighthouse_port}",
            min_replicas=self.args.min_replicas,
            join_timeout_ms=self.args.join_timeout_ms,
            quorum_tick_ms=self.args.quorum_tick_ms,
            heartbeat_timeout_ms=self.args.heartbeat_timeout_ms,
        )
        port = int(str(self.lighthouse.address()).rsplit(":", 1)[1])  # it advertises the hostname
        self.address = f"http://{url_host(self.args.bind)}:{port}"
        _log(f"lighthouse on {self.address} (min_replicas={self.args.min_replicas})")
        self.event(event="lighthouse", address=self.address, pid=os.getpid())

    def spawn(self, g: _Group) -> None:
        env = dict(os.environ)
        env.update(
            {
                "REPLICA_GROUP_ID": str(g.index),
                "TORCHFT_LIGHTHOUSE": self.address,
                "LIGHTNING_FEDOPT_FT_HOST": self.args.bind,
                "LIGHTNING_FEDOPT_FT_RESTARTS": str(g.restarts),
                # how many groups this run has: a larger quorum holds a stray client (not applied)
                "LIGHTNING_FEDOPT_FT_GROUPS": str(len(self.groups)),
            }
        )
        # its own process group: a signal reaches every process of the group (torchrun's workers too)
        g.proc = subprocess.Popen(self.command, env=env, start_new_session=True)
        g.started = time.monotonic()
        g.pids.append(g.proc.pid)
        self.event(event="start", group=g.index, pid=g.proc.pid, restart=g.restarts)

    def signal_all(self, sig: int) -> None:
        for g in self.groups:
            if g.proc is not None and g.proc.poll() is None:
                try:
                    os.killpg(g.proc.pid, sig)
                except ProcessLookupError:
                    pass

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            _log(f"received {signal.Signals(signum).name}: forwarding it to every replica group")
            self.event(event="signal", signal=signum)
        self.signal_all(signum)

    def stop_all(self, grace: float) -> None:
        """SIGTERM to the groups still running (unless a signal was forwarded already), SIGKILL
        after ``grace`` seconds."""
        if self.stop_signal is None:
            self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            g.proc is not None and g.proc.poll() is None for g in self.groups
        ):
            time.sleep(POLL_S)
        self.signal_all(signal.SIGKILL)
        for g in self.groups:
            if g.proc is not None:
                g.proc.wait()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self.start_lighthouse()
            for g in self.groups:
                self.spawn(g)
                _log(f"group {g.index} started (pid {g.pids[-1]})")
            return self._supervise()
        except (OSError, RuntimeError) as exc:  # the command cannot start; the port is taken (Rust)
            _log(f"error: {exc}")
            return 1
        finally:
            self.stop_all(self.args.grace)
            if self.stop_signal is not None:
                _log("stopped: every group has exited")
            if self.lighthouse is not None:
                self.lighthouse.shutdown()
            if self._events is not None:
                self._events.close()

    def _supervise(self) -> int:
        while True:
            if self.stop_signal is not None:  # run()'s stop_all waits for the groups, then kills
                return 128 + self.stop_signal
            for g in self.groups:
                if g.done or g.proc is None:
                    continue
                rc = g.proc.poll()
                if rc is None:
                    continue
                lived = time.monotonic() - g.started
                self.event(event="exit", group=g.index, pid=g.proc.pid, returncode=rc, seconds=lived)
                if rc == 0:
                    g.done = True
                    _log(f"group {g.index} (pid {g.proc.pid}) finished after {lived:.1f} s")
                    continue
                if self.stop_signal is not None:
                    continue
                if any(other.done for other in self.groups):
                    # the run is over for the others: a restart now would train a new run alone
                    g.done = True
                    _log(
                        f"group {g.index} (pid {g.proc.pid}) died ({_describe(rc)}) after {lived:.1f} s, "
                        "after another group finished the run: not restarted"
                    )
                    self.event(event="not_restarted", group=g.index)
                    continue
                if g.restarts >= self.args.max_restarts:
                    _log(
                        f"group {g.index} (pid {g.proc.pid}) died ({_describe(rc)}) after {lived:.1f} s; "
                        f"no restart left ({self.args.max_restarts} used): stopping every group"
                    )
                    self.event(event="give_up", group=g.index)
                    return 1
                old = g.proc.pid
                g.restarts += 1
                if self.args.restart_delay > 0:
                    time.sleep(self.args.restart_delay)
                self.spawn(g)
                _log(
                    f"group {g.index} (pid {old}) died ({_describe(rc)}) after {lived:.1f} s; "
                    f"restart {g.restarts}/{self.args.max_restarts} as pid {g.pids[-1]}"
                )
            if all(g.done for g in self.groups):
                _log("every group finished")
                return 0
            time.sleep(POLL_S)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_fedopt.fault_tolerance.launch",
        description="Start a torchft lighthouse and N replica groups; restart a group that dies.",
    )
    p.add_argument("--groups", type=int, required=True, help="number of replica groups (>= 1)")
    p.add_argument("--bind", default="127.0.0.1", help="address of the lighthouse and the groups' servers")
    p.add_argument("--lighthouse-port", type=int, default=29510, help="0: any free port")
    p.add_argument("--min-replicas", type=int, default=1, help="fewest groups in a quorum")
    p.add_argument(
        "--join-timeout-ms",
        type=int,
        default=60000,
        help="how long a quorum waits for live groups that have not arrived yet: keep it above the time "
        "between synchronisations (a dead group stops heartbeating and is not waited for; a short one "
        "leaves a group a few ms late out of every round, which then heals and loses its steps)",
    )
    p.add_argument("--heartbeat-timeout-ms", type=int, default=1000, help="a silent group is dead after this")
    p.add_argument("--quorum-tick-ms", type=int, default=100)
    p.add_argument("--max-restarts", type=int, default=3, help="restarts per group")
    p.add_argument("--restart-delay", type=float, default=0.0, help="seconds before a restart")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL at the end")
    p.add_argument("--events", default=None, help="append one JSON line per start/exit/restart to this file")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command of one group")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("give the command of one group after --")
    for name, low in (
        ("groups", 1),
        ("lighthouse_port", 0),
        ("min_replicas", 1),
        ("join_timeout_ms", 0),
        ("heartbeat_timeout_ms", 1),
        ("quorum_tick_ms", 1),
        ("max_restarts", 0),
    ):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.lighthouse_port > 65535:
        parser.error(f"--lighthouse-port must be <= 65535, got {args.lighthouse_port}")
    if args.restart_delay < 0 or args.grace < 0:
        parser.error("--restart-delay and --grace must be >= 0")
    if args.min_replicas > args.groups:
        parser.error(f"--min-replicas ({args.min_replicas}) must be <= --groups ({args.groups})")
    try:
        ip = ipaddress.ip_address(args.bind)
        if ip.is_unspecified:
            _log(
                f"warning: --bind {args.bind} exposes the lighthouse and every group's servers on every "
                "interface; anyone who reaches them can join a quorum or kill a group"
            )
    except ValueError:
        pass
    return _Launcher(args, command).run()


if __name__ == "__main__":
    sys.exit(main())
