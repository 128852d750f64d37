"""A private, rate-limited network of "hosts" made of Linux network namespaces (root only).

Layout (``N`` hosts, nothing is created in the root namespace except the namespace names)::

    namespace <tag>-br:  bridge "br0"  +  veth "fo-b<r>" for every host r   (the switch)
    namespace <tag>-h<r>: veth "fo-r<r>" with address 10.213.0.<r+1>/24    (host r)

Every veth end (both directions of every host's link) gets
``tc qdisc add dev <veth> root handle 1: tbf rate <rate> burst 32kbit latency 400ms``, so each
host has a full-duplex link of ``rate`` to the switch. An added delay needs ``netem``; where the
kernel lacks it the delay is reported as not applied and everything else goes on.

The addresses exist only inside these namespaces, which have no route anywhere else.

Example::

    with Network(2, rate="100mbit") as net:
        proc = net.popen(0, ["python", "-c", "print('hello from host 0')"])
        proc.wait()

Self-test (creates two hosts, measures the shaped link, tears everything down)::

    sudo python -m benchmarks.netns --rate 100mbit
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["NetnsError", "Network", "cleanup_stale", "netns_unavailable_reason"]

PREFIX = "fobench"
SUBNET = "10.213.0"  # a private /24, used only inside the namespaces created here


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up."""


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, ``ip``/``tc`` missing), or None if they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (install iproute2, e.g. `apt-get install -y iproute2`)"
    return None


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Delete namespaces left by earlier runs of this module whose process no longer exists."""
    removed = []
    for ns in _list_namespaces():
        parts = ns.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if os.path.exists(f"/proc/{parts[1]}"):
            continue  # its creator is still running
        _run(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    return removed


class Network:
    """``n_hosts`` namespaces joined through a bridge, every link shaped to ``rate``.

    Args:
        n_hosts: number of hosts (1..253).
        rate: ``tc`` rate of every link direction, e.g. ``"100mbit"``, ``"1gbit"``; None: unshaped.
        delay: one-way delay added with ``netem`` on each host's outgoing link (e.g. ``"5ms"``);
            None for none. If ``netem`` is not available it is not applied and
            :attr:`delay_applied` is False (see :attr:`notes`).
        tag: prefix of the namespace names (default ``fobench-<pid>``).
    """

    def __init__(
        self, n_hosts: int, rate: str | None = "100mbit", delay: str | None = None, tag: str | None = None
    ):
        if not 1 <= n_hosts <= 253:
            raise ValueError(f"`n_hosts` must be in [1, 253], got {n_hosts}")
        self.n_hosts = n_hosts
        self.rate = rate
        self.delay = delay
        self.tag = tag or f"{PREFIX}-{os.getpid()}"
        self.bridge_ns = f"{self.tag}-br"
        self.delay_applied = False
        self.notes: list[str] = []
        self._created: list[str] = []

    # ------------------------------------------------------------------ names
    def namespace(self, rank: int) -> str:
        return f"{self.tag}-h{rank}"

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    def ifname(self, rank: int) -> str:
        """The host's interface name inside its namespace (for ``GLOO_SOCKET_IFNAME``)."""
        return f"fo-r{rank}"

    # ------------------------------------------------------------------ life cycle
    def _shape(self, ns: str, dev: str, with_delay: bool) -> None:
        def qdisc(*spec: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            return _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *spec], check=check)

        if self.rate:
            qdisc("root", "handle", "1:", "tbf", "rate", self.rate, "burst", "32kbit", "latency", "400ms")
        if with_delay and self.delay:
            parent = ["parent", "1:1", "handle", "10:"] if self.rate else ["root", "handle", "10:"]
            proc = qdisc(*parent, "netem", "delay", self.delay, check=False)
            if proc.returncode == 0:
                self.delay_applied = True
            elif not self.notes:
                self.notes.append(
                    f"delay {self.delay} could NOT be applied (tc netem: {proc.stderr.strip()})"
                )

    def create(self) -> Network:
        """Create the namespaces, links, addresses and qdiscs (tears down what it made on error)."""
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsError(reason)
        try:
            _run(["ip", "netns", "add", self.bridge_ns])
            self._created.append(self.bridge_ns)
            _run(["ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.bridge_ns, "link", "set", "br0", "up"])
            for r in range(self.n_hosts):
                ns, dev, peer = self.namespace(r), self.ifname(r), f"fo-b{r}"
                _run(["ip", "netns", "add", ns])
                self._created.append(ns)
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(
                    [
                        "ip",
                        "-n",
                        ns,
                        "link",
                        "add",
                        dev,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        peer,
                        "netns",
                        self.bridge_ns,
                    ]
                )
                _run(["ip", "-n", self.bridge_ns, "link", "set", peer, "master", "br0"])
                _run(["ip", "-n", self.bridge_ns, "link", "set", peer, "up"])
                _run(["ip", "-n", ns, "addr", "add", f"{self.address(r)}/24", "dev", dev])
                _run(["ip", "-n", ns, "link", "set", dev, "up"])
                self._shape(ns, dev, with_delay=True)  # what host r sends
                self._shape(self.bridge_ns, peer, with_delay=False)  # what host r receives
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Delete every namespace this object created (their veths go with them). Idempotent."""
        while self._created:
            _run(["ip", "netns", "del", self._created.pop()], check=False)

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(self, *exc: Any) -> None:
        self.destroy()

    # ------------------------------------------------------------------ running things
    def command(self, rank: int, cmd: Sequence[str]) -> list[str]:
        """``cmd`` prefixed so that it runs on host ``rank``."""
        return ["ip", "netns", "exec", self.namespace(rank), *cmd]

    def popen(
        self, rank: int, cmd: Sequence[str], env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen:
        """Start ``cmd`` on host ``rank`` (``ip netns exec`` execs it: the Popen's pid is the command's)."""
        return subprocess.Popen(self.command(rank, cmd), env=dict(env) if env is not None else None, **kwargs)

    def describe(self) -> str:
        hosts = ", ".join(
            f"{self.namespace(r)}={self.address(r)}({self.ifname(r)})" for r in range(self.n_hosts)
        )
        shaping = (
            f"tbf rate {self.rate} burst 32kbit latency 400ms each direction" if self.rate else "unshaped"
        )
        delay = (
            f", delay {self.delay} {'applied' if self.delay_applied else 'NOT applied'}" if self.delay else ""
        )
        return f"{self.n_hosts} hosts via bridge in {self.bridge_ns}: {hosts}; {shaping}{delay}"

    def measure_throughput(
        self, src: int = 1, dst: int = 0, nbytes: int = 4_000_000, port: int = 29400
    ) -> float:
        """Send ``nbytes`` over TCP from host ``src`` to host ``dst``; returns the measured Mbit/s."""
        receiver = (
            "import socket,sys,time\n"
            "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(({self.address(dst)!r},{port})); s.listen(1); print('ready', flush=True)\n"
            "c,_=s.accept(); n=0; t0=None\n"
            "while True:\n"
            "    b=c.recv(1<<16)\n"
            "    if t0 is None: t0=time.perf_counter()\n"
            "    if not b: break\n"
            "    n+=len(b)\n"
            "print(n, time.perf_counter()-t0, flush=True)\n"
        )
        sender = (
            "import socket\n"
            f"c=socket.create_connection(({self.address(dst)!r},{port})); buf=bytes(1<<16); left={nbytes}\n"
            "while left>0:\n"
            "    k=min(left,len(buf)); c.sendall(buf[:k]); left-=k\n"
            "c.close()\n"
        )
        recv = self.popen(dst, [sys.executable, "-c", receiver], stdout=subprocess.PIPE, text=True)
        try:
            assert recv.stdout is not None
            if recv.stdout.readline().strip() != "ready":
                raise NetnsError("throughput receiver did not start")
            send = self.popen(src, [sys.executable, "-c", sender])
            send.wait(timeout=120)
            out, _ = recv.communicate(timeout=120)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        n, seconds = out.split()
        return int(n) * 8 / float(seconds) / 1e6

    def measure_both_ways(
        self, a: int = 0, b: int = 1, nbytes: int = 4_000_000, port: int = 29410
    ) -> tuple[float, float]:
        """Send ``nbytes`` over TCP from ``a`` to ``b`` and from ``b`` to ``a`` at once, as a ring
        all-reduce loads a link; returns the Mbit/s of each direction (``a -> b``, ``b -> a``).

        Each direction's rate counts the bytes that arrived while both flows were running (the
        window from the later flow's first byte to the earlier flow's last, its first and last
        tenth left out), so neither flow is timed while it had the link to itself. With both
        directions busy, each host's outgoing queue also carries the other flow's ACKs behind its
        own data, which slows both (the two-way traffic effect of TCP); a one-way measurement does
        not see that.
        """
        receiver = (
            "import socket,time,json\n"
            "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind((@ADDR@,@PORT@)); s.listen(1); print('ready', flush=True)\n"
            "c,_=s.accept(); n=0; marks=[]\n"
            "while True:\n"
            "    b=c.recv(1<<16)\n"
            "    if not b: break\n"
            "    n+=len(b); marks.append((time.time(), n))\n"
            "print(json.dumps(marks), flush=True)\n"
        )
        sender = (
            "import socket,sys\n"
            "sys.stdin.readline()\n"  # the go signal: both senders start together
            f"c=socket.create_connection((@ADDR@,@PORT@)); buf=bytes(1<<16); left={nbytes}\n"
            "while left>0:\n"
            "    k=min(left,len(buf)); c.sendall(buf[:k]); left-=k\n"
            "c.close()\n"
        )
        pairs = [(a, b, port), (b, a, port + 1)]
        recvs, sends = [], []
        try:
            for _, dst, p in pairs:
                code = receiver.replace("@ADDR@", repr(self.address(dst))).replace("@PORT@", str(p))
                recv = self.popen(dst, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                recvs.append(recv)
                assert recv.stdout is not None
                if recv.stdout.readline().strip() != "ready":
                    raise NetnsError("throughput receiver did not start")
            for src, dst, p in pairs:
                code = sender.replace("@ADDR@", repr(self.address(dst))).replace("@PORT@", str(p))
                sends.append(self.popen(src, [sys.executable, "-c", code], stdin=subprocess.PIPE, text=True))
            for send in sends:
                assert send.stdin is not None
                send.stdin.write("go\n")
                send.stdin.flush()
            for send in sends:
                send.wait(timeout=300)
            marks = [json.loads(recv.communicate(timeout=300)[0]) for recv in recvs]
        finally:
            for proc in recvs + sends:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        start = max(m[0][0] for m in marks)
        end = min(m[-1][0] for m in marks)
        if end <= start:
            raise NetnsError("the two flows did not overlap")
        start, end = start + 0.1 * (end - start), end - 0.1 * (end - start)
        rates = []
        for m in marks:
            times = [t for t, _ in m]
            counts = [n for _, n in m]
            received = _interp(end, times, counts) - _interp(start, times, counts)
            rates.append(received * 8 / (end - start) / 1e6)
        return rates[0], rates[1]


def _interp(t: float, times: list[float], counts: list[int]) -> float:
    """Bytes received by time ``t`` (linear between the receiver's marks)."""
    i = bisect.bisect_left(times, t)
    if i == 0:
        return float(counts[0])
    if i >= len(times):
        return float(counts[-1])
    t0, t1 = times[i - 1], times[i]
    return counts[i - 1] + (counts[i] - counts[i - 1]) * (t - t0) / max(t1 - t0, 1e-12)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Self-test of the namespace network: build it, measure it, remove it"
    )
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--delay", default=None)
    parser.add_argument("--bytes", type=int, default=4_000_000)
    args = parser.parse_args(argv)
    reason = netns_unavailable_reason()
    if reason:
        sys.exit(f"netns self-test skipped: {reason}")
    stale = cleanup_stale()
    if stale:
        print(f"removed stale namespaces: {stale}")
    t0 = time.perf_counter()
    with Network(args.hosts, rate=args.rate, delay=args.delay) as net:
        print(f"created in {time.perf_counter() - t0:.2f}s: {net.describe()}")
        for note in net.notes:
            print(f"note: {note}")
        mbit = net.measure_throughput(src=1 % args.hosts, dst=0, nbytes=args.bytes)
        print(f"TCP host1 -> host0: {mbit:.1f} Mbit/s measured (rate {args.rate})")
        if args.hosts > 1:
            there, back = net.measure_both_ways(0, 1, nbytes=args.bytes)
            print(
                f"TCP both ways at once: host0 -> host1 {there:.1f}, host1 -> host0 {back:.1f} Mbit/s "
                f"(mean {(there + back) / 2:.1f})"
            )
    left = [ns for ns in _list_namespaces() if ns.startswith(net.tag)]
    print("torn down" if not left else f"LEFT OVER: {left}")


if __name__ == "__main__":
    main()
