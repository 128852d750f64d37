"""Fault tolerance across replica groups on torchft without processes: the environment, the
manager's arguments, the refusals, and the rounds of one group around an in-process lighthouse."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torchft_helpers import lighthouse as _lighthouse
from torchft_helpers import one_group as _one_group

pytest.importorskip("torchft")

from lightning_fedopt.fault_tolerance import _torchft as ft
from lightning_fedopt.fault_tolerance._servers import bound_http_transport


# --------------------------------------------------------------------------- without processes
def test_environment_is_read_and_checked() -> None:
    env = ft.ReplicaGroupEnv.from_env(
        {"TORCHFT_LIGHTHOUSE": "http://127.0.0.1:29510", "REPLICA_GROUP_ID": "1", "RANK": "0"}
    )
    assert (env.replica_id, env.group_rank, env.group_world_size, env.host) == (1, 0, 1, "127.0.0.1")
    assert env.store_addr is None  # a one-process group hosts its own store
    group = ft.ReplicaGroupEnv.from_env(
        {
            "TORCHFT_LIGHTHOUSE": "http://10.0.0.1:29510",
            "REPLICA_GROUP_ID": "0",
            "RANK": "1",
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.2",
            "MASTER_PORT": "29400",
            "LIGHTNING_FEDOPT_FT_HOST": "10.0.0.2",
        }
    )
    assert (group.store_addr, group.store_port, group.group_rank, group.host) == (
        "10.0.0.2",
        29400,
        1,
        "10.0.0.2",
    )
    bad = [
        ({"REPLICA_GROUP_ID": "0"}, "TORCHFT_LIGHTHOUSE"),
        ({"TORCHFT_LIGHTHOUSE": "127.0.0.1:29510", "REPLICA_GROUP_ID": "0"}, "TORCHFT_LIGHTHOUSE"),
        ({"TORCHFT_LIGHTHOUSE": "http://127.0.0.1:1"}, "REPLICA_GROUP_ID"),
        ({"TORCHFT_LIGHTHOUSE": "http://127.0.0.1:1", "REPLICA_GROUP_ID": "-1"}, "REPLICA_GROUP_ID"),
        ({"TORCHFT_LIGHTHOUSE": "http://127.0.0.1:1", "REPLICA_GROUP_ID": "x"}, "REPLICA_GROUP_ID"),
        (
            {
                "TORCHFT_LIGHTHOUSE": "http://127.0.0.1:1",
                "REPLICA_GROUP_ID": "0",
                "RANK": "2",
                "WORLD_SIZE": "2",
            },
            "RANK",
        ),
        (
            {"TORCHFT_LIGHTHOUSE": "http://127.0.0.1:1", "REPLICA_GROUP_ID": "0", "WORLD_SIZE": "2"},
            "MASTER_ADDR",
        ),
        ({"TORCHFT_LIGHTHOUSE": "http://10.0.0.1:1", "REPLICA_GROUP_ID": "0"}, "LIGHTNING_FEDOPT_FT_HOST"),
    ]
    for environ, name in bad:
        with pytest.raises(ValueError, match=name):
            ft.ReplicaGroupEnv.from_env(environ)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_replica_size": 0}, "min_replica_size"),
        ({"min_replica_size": True}, "min_replica_size"),
        ({"timeout": 0}, "timeout"),
        ({"quorum_timeout": -1.0}, "quorum_timeout"),
        ({"connect_timeout": float("nan")}, "connect_timeout"),
        ({"pg_timeout": "5"}, "pg_timeout"),
        ({"quorum_retries": -1}, "quorum_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"init_sync": 1}, "init_sync"),
    ],
)
def test_build_manager_names_the_bad_argument(kwargs: dict[str, Any], name: str) -> None:
    env = ft.ReplicaGroupEnv(lighthouse="http://127.0.0.1:1", replica_id=0)
    with pytest.raises(ValueError, match=f"`{name}`"):
        ft.build_manager(env, **kwargs)


class _StubManager:
    """Enough of a torchft Manager to construct a ManagedCommunicator without a network."""

    def __init__(self, use_async_quorum: bool = False) -> None:
        self._use_async_quorum = use_async_quorum
        self.registered: list[str] = []

    def register_state_dict_fn(self, key: str, load: Any, save: Any) -> None:
        self.registered.append(key)


def test_refuses_what_torchft_does_not_fault_manage() -> None:
    comm = ft.ManagedCommunicator(_StubManager())
    t = torch.ones(3)
    for call in (
        lambda: comm.broadcast([t]),
        lambda: comm.all_gather(t),
        lambda: comm.all_to_all(t),
        lambda: comm.send(t, 1),
        lambda: comm.recv(t, 1),
        lambda: comm.exchange({1: t}, {}),
        lambda: comm.barrier(),
        lambda: comm.split([[0]]),
        lambda: comm.broadcast_object(1),
        lambda: comm.all_gather_object(1),
        lambda: comm.all_reduce_future(t),
        lambda: comm.with_deadline(5.0),
    ):
        with pytest.raises(ft.NotFaultManagedError, match="fault-manages the all-reduce only"):
            call()
    for op in ("max", "min", "product"):
        with pytest.raises(ValueError, match="'mean' or 'sum'"):
            comm.all_reduce([t], op)
    with pytest.raises(RuntimeError, match="start_round"):
        comm.all_reduce([t], "mean")
    with pytest.raises(RuntimeError, match="start_round"):
        comm.commit()
    with pytest.raises(ValueError, match="use_async_quorum=False"):
        ft.ManagedCommunicator(_StubManager(use_async_quorum=True))
    with pytest.raises(ValueError, match="both or neither"):
        ft.ManagedCommunicator(_StubManager(), state_dict=dict)


def test_rounds_of_one_group() -> None:
    """In this process (threads only): a lighthouse and one group."""
    server, address = _lighthouse()
    comm, _ = _one_group(address)
    try:
        for i in range(3):
            info = comm.start_round()
            assert (info.step, info.participants, info.index, info.healed) == (i, 1, 0, False)
            x, n = torch.full((4,), float(i + 1), dtype=torch.float64), torch.tensor([3], dtype=torch.int64)
            handle = comm.all_reduce([x, n], "sum")
            assert handle.wait() and handle.contributors == 1
            assert torch.equal(x, torch.full((4,), float(i + 1), dtype=torch.float64)) and int(n) == 3
            assert comm.commit()
        assert [ok for _, ok in comm.history] == [True] * 3
        assert comm.stats.by_op["quorum"].rounds == 3 and comm.stats.by_op["should_commit"].rounds == 3
        assert comm.stats.purpose("sync").rounds == 6 and comm.stats.bytes_sent == 0  # alone: no traffic
        comm.start_round()
        with pytest.raises(RuntimeError, match="commit"):
            comm.start_round()
        with pytest.raises(ValueError, match="floating-point"):
            comm.all_reduce([torch.ones(2, dtype=torch.int64)], "mean")
        assert comm.commit()
    finally:
        comm.close()
        server.shutdown()


def test_the_checkpoint_transport_counts_the_bytes_it_serves_and_fetches() -> None:
    """Heal traffic on the wire: the server counts each response (once per healer: the status line,
    the headers and the body), the fetcher the body it read."""
    import time
    from datetime import timedelta

    transport = bound_http_transport(timedelta(seconds=5), "127.0.0.1")
    try:
        state = {"w": torch.arange(100, dtype=torch.float32), "step": 7}
        transport.send_checkpoint([1, 2], step=3, state_dict=state, timeout=timedelta(seconds=5))
        for _ in range(2):  # two healers fetch the same checkpoint
            got = transport.recv_checkpoint(0, transport.metadata(), 3, timedelta(seconds=5))
            assert torch.equal(got["w"], state["w"]) and got["step"] == 7
        fetched = transport.last_fetch_bytes
        assert fetched is not None and fetched >= 400  # the tensor and its serialisation
        served, deadline = 0, time.monotonic() + 5
        while served < 2 * fetched and time.monotonic() < deadline:  # the handler counts after its reply
            served += transport.take_served()
            time.sleep(0.01)
        time.sleep(0.05)
        served += transport.take_served()
        assert 2 * fetched <= served <= 2 * (fetched + 512)  # two bodies and two short header blocks
        assert transport.take_served() == 0  # taken once
    finally:
        transport.shutdown()
