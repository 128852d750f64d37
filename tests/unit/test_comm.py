"""comm.py in one process: a counted no-op, the documented cost model's table, the stats' state
(the real collectives between processes: tests/multiprocess/test_comm.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_fedopt.comm import CommStats, Communicator, cost_model


def test_single_process_is_a_counted_noop():
    comm = Communicator()
    t = torch.ones(3)
    comm.all_reduce([t], "mean").wait()
    comm.broadcast([t])
    assert torch.equal(t, torch.ones(3))
    assert comm.world_size == 1 and comm.rank == 0
    assert comm.stats.bytes_sent == 0 and comm.stats.rounds == 0
    assert comm.all_gather(t).wait()[0].equal(t)
    assert comm.all_gather_object(5) == [5]
    assert comm.all_to_all(t[None]).equal(t[None])
    with pytest.raises(ValueError, match="op"):
        comm.all_reduce([t], "average")


def test_cost_model_table():
    assert cost_model("all_reduce", 1000, 4) == (1500, 1500)
    assert cost_model("all_reduce", 1000, 1) == (0, 0)
    assert cost_model("all_gather", 100, 4) == (300, 300)
    assert cost_model("reduce_scatter", 1000, 4) == (750, 750)
    assert cost_model("broadcast", 100, 4, is_source=True) == (100, 0)
    assert cost_model("broadcast", 100, 4) == (0, 100)
    assert cost_model("send", 10, 2) == (10, 0) and cost_model("recv", 10, 2) == (0, 10)
    with pytest.raises(ValueError, match="unknown op"):
        cost_model("scatter", 1, 2)


def test_stats_state_roundtrip():
    s = CommStats()
    s.record("all_reduce", "sync", 10, 20, 1, 0.5)
    s.record("broadcast", "setup", 5, 0, 1, 0.1)
    t = CommStats()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    assert t.bytes_sent == 15 and t.purpose("sync").bytes_received == 20 and t.purpose("nothing").rounds == 0
