"""comm.py: real collectives between processes over gloo, counted by the documented cost model."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_fedopt.comm import Communicator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    comm = Communicator()
    res = {}
    # all_reduce of two tensors of different dtypes, mean
    a = torch.full((5,), float(rank + 1))
    b = torch.full((3,), float(rank), dtype=torch.float64)
    comm.all_reduce([a, b], "mean", purpose="sync")
    res["a"], res["b"] = a.clone(), b.clone()
    res["after_allreduce"] = comm.stats.state_dict()
    # async all_reduce: result only after wait
    c = torch.full((4,), float(rank))
    h = comm.all_reduce(c, "sum", purpose="sync", async_op=True)
    h.wait()
    res["c"] = c.clone()
    # broadcast from the last rank
    d = torch.full((6,), float(rank))
    comm.broadcast([d], src=world - 1, purpose="setup")
    res["d"] = d.clone()
    # all_gather
    g = comm.all_gather(torch.tensor([rank, rank * 10]), purpose="sync").wait()
    res["g"] = torch.stack(g)
    # all_to_all: row j goes to rank j
    rows = torch.tensor([[float(rank), float(j)] for j in range(world)])
    res["a2a"] = comm.all_to_all(rows, purpose="a2a")
    # point-to-point ring exchange
    right, left = (rank + 1) % world, (rank - 1) % world
    inbox = torch.empty(3)
    comm.exchange({right: torch.full((3,), float(rank))}, {left: inbox}, purpose="gossip").wait()
    res["inbox"] = inbox.clone()
    # objects and the barrier
    res["obj"] = comm.broadcast_object({"hello": rank}, src=0)
    res["objs"] = comm.all_gather_object(rank * 2)
    comm.barrier()
    # a future (the DDP comm hook path)
    f = comm.all_reduce_future(torch.full((2,), float(rank)), op="mean").wait()
    res["f"] = f.clone()
    res["stats"] = comm.stats.state_dict()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_and_byte_counts(tmp_path, world):
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    mean_a = sum(r + 1 for r in range(world)) / world
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["a"], torch.full((5,), mean_a))
        torch.testing.assert_close(res["b"], torch.full((3,), sum(range(world)) / world, dtype=torch.float64))
        torch.testing.assert_close(res["c"], torch.full((4,), float(sum(range(world)))))
        torch.testing.assert_close(res["d"], torch.full((6,), float(world - 1)))
        torch.testing.assert_close(res["g"], torch.tensor([[r, r * 10] for r in range(world)]))
        torch.testing.assert_close(res["inbox"], torch.full((3,), float((rank - 1) % world)))
        torch.testing.assert_close(res["a2a"], torch.tensor([[float(i), float(rank)] for i in range(world)]))
        assert res["obj"] == {"hello": 0} and res["objs"] == [2 * r for r in range(world)]
        torch.testing.assert_close(res["f"], torch.full((2,), sum(range(world)) / world))

        # bytes: the float32 and float64 groups are two all-reduces
        ar = lambda n: 2 * (world - 1) * n // world  # noqa: E731
        after = res["after_allreduce"]
        assert after["total"]["bytes_sent"] == ar(5 * 4) + ar(3 * 8)
        assert after["total"]["rounds"] == 2
        stats = res["stats"]
        sync = stats["by_purpose"]["sync"]
        expected_sync = ar(20) + ar(24) + ar(16) + (world - 1) * 16 + ar(8)
        assert sync["bytes_sent"] == expected_sync and sync["bytes_received"] == expected_sync
        setup = stats["by_purpose"]["setup"]
        assert setup["bytes_sent"] == (24 if rank == world - 1 else 0)
        assert setup["bytes_received"] == (0 if rank == world - 1 else 24)
        gossip = stats["by_purpose"]["gossip"]
        assert gossip["bytes_sent"] == 12 and gossip["bytes_received"] == 12
        assert stats["by_op"]["barrier"]["rounds"] == 1
        a2a = stats["by_purpose"]["a2a"]  # (N-1)/N of the N rows of 2 fp32 values
        assert a2a["bytes_sent"] == a2a["bytes_received"] == (world - 1) * 8 and a2a["rounds"] == 1
        assert stats["total"]["seconds"] > 0
