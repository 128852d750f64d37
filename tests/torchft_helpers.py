"""Shared by the torchft tests: a lighthouse in this process and one replica group around it."""

from __future__ import annotations

from typing import Any

import torch

from lightning_fedopt.fault_tolerance import _torchft as ft


def lighthouse(min_replicas: int = 1) -> tuple[Any, str]:
    from torchft.coordination import LighthouseServer

    server = LighthouseServer(
        bind="127.0.0.1:0",
        min_replicas=min_replicas,
        join_timeout_ms=100,
        quorum_tick_ms=20,
        heartbeat_timeout_ms=500,
    )
    return server, f"http://127.0.0.1:{int(server.address().rsplit(':', 1)[1])}"


def one_group(address: str, **kwargs: Any) -> tuple[ft.ManagedCommunicator, torch.Tensor]:
    w = torch.zeros(4, dtype=torch.float64)
    comm = ft.ManagedCommunicator.from_env(
        env=ft.ReplicaGroupEnv(lighthouse=address, replica_id=0),
        state_dict=lambda: {"w": w},
        load_state_dict=lambda s: w.copy_(s["w"]),
        **{"timeout": 5.0, "quorum_timeout": 3.0, "connect_timeout": 2.0, **kwargs},
    )
    return comm, w


def dead_lighthouse_check(port: int, unused_port: int, lighthouse_pid: int) -> dict[str, Any]:
    """In a fresh (spawned) process, so that no torchft thread lives in pytest's process, which
    later tests fork: one group fails to reach a lighthouse that is not there, then runs a round
    with the one at ``port``, kills it (``lighthouse_pid``) and times the next round's error."""
    import os
    import signal
    import time

    out: dict[str, Any] = {}
    try:
        one_group(f"http://127.0.0.1:{unused_port}", connect_timeout=0.5)
        out["unreachable"] = "no error"
    except ft.QuorumError as err:
        out["unreachable"] = str(err)
    comm, _ = one_group(f"http://127.0.0.1:{port}")
    try:
        comm.start_round()
        out["committed"] = comm.commit()
        os.kill(lighthouse_pid, signal.SIGKILL)
        time.sleep(0.2)
        t0 = time.monotonic()
        try:
            comm.start_round()
            out["after"] = "no error"
        except ft.QuorumError as err:
            out["after"] = str(err)
        out["elapsed"] = time.monotonic() - t0
    finally:
        comm.close()
    return out
