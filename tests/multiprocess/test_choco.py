"""Compressed gossip (CHOCO-gossip, ``GossipStrategy(compressor=...)``) on real processes (fork, gloo)
against the single-process reference of CHOCO-SGD in gossip_reference.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from gossip_helpers import PAYLOAD, Exact, SaveHistory, ring_matrix
from gossip_reference import reference_choco, reference_gossip
from modules import KnownBatchModule, make_net
from runners import TIMEOUT, CountDistCalls, assert_close_state, fit_fork

import lightning_fedopt as lf
from lightning_fedopt.compression import (
    Compressor,
    Int8,
    Sign,
    TopK,
)

SIZES = [p.numel() for p in make_net().parameters()]


def gossip(*args, **kw):
    return lf.GossipStrategy(*args, start_method="fork", timeout=TIMEOUT, **kw)


def message_nbytes(comp: Compressor) -> int:
    """Bytes of one compressed gossip message of the test network: the payloads and a finite flag."""
    return sum(comp.compressed_nbytes(n) for n in SIZES) + 1


class SaveRatio(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        torch.save(trainer.strategy.compression_ratio, self.out / f"ratio{trainer.global_rank}.pt")


def sent_bytes(rank: dict, op: str = "send") -> int:
    return rank["comm"]["by_op"].get(op, {"bytes_sent": 0})["bytes_sent"]


def test_ring_four_processes_int8_matches_reference_point_to_point_only(tmp_path):
    """4 ranks on a ring, stochastic int8 messages (block 16), gamma 0.5, gossip every 2 steps for
    10 steps: every rank equals the CHOCO reference to 1e-5, only compressed bytes travelled, and
    only point-to-point (plus rank 0's stop flag before each round)."""
    tmp_path.mkdir(exist_ok=True)

    def comp():
        return Int8(block=16, rounding="stochastic")

    ranks = fit_fork(
        tmp_path / "out",
        KnownBatchModule(),
        gossip("ring", gossip_every=2, compressor=comp(), consensus_lr=0.5, final_sync=False),
        n=4,
        max_steps=10,
        callbacks=[CountDistCalls(tmp_path)],
    )
    ref = reference_choco(4, 10, lambda s: s % 2 == 0, ring_matrix(4), comp, 0.5)
    for r in range(4):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    assert not torch.allclose(ranks[0]["state_dict"]["net.0.weight"], ranks[2]["state_dict"]["net.0.weight"])
    # the compression was real: CHOCO with exact messages ends elsewhere
    exact = reference_choco(4, 10, lambda s: s % 2 == 0, ring_matrix(4), Exact, 0.5)
    assert (exact[0]["net.0.weight"] - ref[0]["net.0.weight"]).abs().max() > 1e-5
    per_message = message_nbytes(comp())
    assert per_message == 126 and PAYLOAD == 388  # 97 int8 codes + 7 fp32 scales + 1 flag vs 97 fp32
    for r in range(4):
        rec = torch.load(tmp_path / f"calls{r}.pt", weights_only=False)
        calls = rec["calls"]
        assert calls["batch_isend_irecv"] == 5 and calls["all_reduce"] == 5, calls  # + the rendezvous
        assert sum(calls.values()) == 10, calls
        after, before = rec["after"]["by_op"], rec["before"]["by_op"]
        sent = after["send"]["bytes_sent"] - before.get("send", {"bytes_sent": 0})["bytes_sent"]
        assert sent == 5 * 2 * per_message  # 5 rounds, to both ring neighbours
        received = (
            after["recv"]["bytes_received"] - before.get("recv", {"bytes_received": 0})["bytes_received"]
        )
        assert received == sent
        assert 5 * 2 * PAYLOAD / sent == pytest.approx(388 / 126)  # 3.08x less than exact gossip


@pytest.mark.parametrize(
    ("comp", "n", "topology", "w"),
    [
        # directed: rank i receives from i-1, i-2 and sends to i+1, i+2
        (
            lambda: TopK(density=0.25, error_feedback=False),
            4,
            "exponential",
            lf.topology.exponential(4).matrix(),
        ),
        (
            lambda: Sign(error_feedback=False),
            3,
            [[0.5, 0.3, 0.2], [0.3, 0.4, 0.3], [0.2, 0.3, 0.5]],
            torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.4, 0.3], [0.2, 0.3, 0.5]], dtype=torch.float64),
        ),
    ],
    ids=["topk-exponential4", "sign-custom3"],
)
def test_topk_and_sign_two_gossip_steps_and_final_merge(tmp_path, comp, n, topology, w):
    """Top-k (25%) on the directed exponential graph and scaled sign on a custom 3x3 matrix, Q=2
    gossip steps every 3 steps, gamma 0.3, and the exact final merge: every rank equals the reference."""
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        gossip(topology, gossip_every=3, gossip_steps=2, compressor=comp(), consensus_lr=0.3),
        n=n,
        max_steps=8,
    )
    ref = reference_choco(n, 8, lambda s: s % 3 == 0, w, comp, 0.3, gossip_steps=2, final_average=True)
    for r in range(n):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    outs = len(lf.topology.make_topology(topology, n).out_neighbors(0))
    assert sent_bytes(ranks[0]) == 2 * 2 * outs * message_nbytes(comp())  # 2 rounds x Q=2
    assert ranks[0]["sync_count"] == 2 + 1


def test_exact_compressor_with_gamma_one_is_plain_gossip(tmp_path):
    """CHOCO with messages that lose nothing and gamma = 1 is theta <- W theta."""
    w = torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        gossip(w, gossip_every=3, compressor=Exact(), final_sync=False),
        max_steps=8,
    )
    plain = reference_gossip(2, 8, lambda s: s % 3 == 0, lambda t: w)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], plain[r], atol=1e-5)
    assert sent_bytes(ranks[0]) == 2 * (PAYLOAD + 1)


def test_merge_from_switches_to_exact_global_merges_and_monitor_reports_the_ratio(tmp_path):
    """A Single Merging Suffices with compressed gossip: int4 CHOCO rounds until 60% of training,
    then exact global merges; the CommunicationMonitor logs the messages' compression ratio."""
    from lightning_fedopt.callbacks import CommunicationMonitor
    from lightning_fedopt.compression import Int4

    w = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]], dtype=torch.float64)
    monitor = CommunicationMonitor()
    ranks = fit_fork(
        tmp_path / "out",
        KnownBatchModule(),
        gossip(
            w, gossip_every=2, compressor=Int4(block=16), consensus_lr=0.8, merge_from=0.6, final_sync=False
        ),
        n=3,
        max_steps=10,
        callbacks=[monitor, SaveHistory(monitor, tmp_path / "hist")],
    )
    ref = reference_choco(3, 10, lambda s: s % 2 == 0, w, lambda: Int4(block=16), 0.8, global_merge_from=6)
    for r in range(3):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    torch.testing.assert_close(ranks[0]["state_dict"], ranks[2]["state_dict"], rtol=0, atol=0)
    per_message = message_nbytes(Int4(block=16))  # 32 + 8 + 8 + 1 code bytes, 7 scales, 1 flag
    assert per_message == 78
    assert sent_bytes(ranks[0]) == 2 * 2 * per_message  # 2 compressed rounds to 2 neighbours
    rows = [
        h
        for h in torch.load(tmp_path / "hist" / "hist0.pt", weights_only=False)
        if "comm/compression_ratio" in h
    ]
    assert rows and rows[-1]["comm/compression_ratio"] == pytest.approx(388 / 78)


def test_resume_mid_round_is_exact(tmp_path):
    """10 uninterrupted steps == 4 steps, checkpoint (mid-round), resume to 10: the public copies,
    the stochastic rounding's call counters and the byte counts are in the replica shards."""
    from reference_outer import run_and_resume

    from lightning_fedopt.strategies.replica import replica_shard_path

    def strategy():
        return gossip(
            "ring", 3, compressor=Int8(block=16, rounding="stochastic"), consensus_lr=0.7, final_sync=False
        )

    w = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)  # ring(2): each other's only neighbour
    full, resumed, path = run_and_resume(
        tmp_path,
        KnownBatchModule,
        strategy,
        total=10,
        at=4,
        resumed_callbacks=[SaveRatio(tmp_path / "resumed")],
    )
    ref = reference_choco(2, 10, lambda s: s % 3 == 0, w, lambda: Int8(block=16, rounding="stochastic"), 0.7)
    shard = torch.load(replica_shard_path(path, 1), weights_only=False)["replica"]["choco"]
    assert sorted(shard["copies"]) == [0, 1]
    assert shard["compressor"]["gossip/net.0.weight"]["calls"] == 1  # one round before step 4
    for r in range(2):
        assert_close_state(full[r]["state_dict"], ref[r], atol=1e-5)
        assert_close_state(resumed[r]["state_dict"], full[r]["state_dict"], atol=0.0)
        for key in ("bytes_sent", "rounds"):
            assert resumed[r]["comm"]["by_op"]["send"][key] == full[r]["comm"]["by_op"]["send"][key]
        # 3 rounds (steps 3, 6, 9), 1 before the checkpoint: the ratio counts all of them
        assert torch.load(tmp_path / "resumed" / f"ratio{r}.pt") == pytest.approx(388 / 126)


def test_nonfinite_replica_sends_nothing_and_restarts_from_its_copy(tmp_path):
    """Rank 1's weights turn NaN at step 4: at the round after step 6 it sends no message (rank 0
    keeps its copy of it), is reset to its public copy mixed with rank 0's, and both go on as the reference."""
    w = torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(nan_at=(1, 4)),
        gossip(w, gossip_every=3, compressor=Int8(block=16), consensus_lr=0.5, final_sync=False),
        max_steps=9,
    )
    ref = reference_choco(2, 9, lambda s: s % 3 == 0, w, lambda: Int8(block=16), 0.5, nan_at=(1, 4))
    for r in range(2):
        assert all(torch.isfinite(v).all() for v in ranks[r]["state_dict"].values())
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
        assert [(e["step"], e["excluded"], e["local"]) for e in ranks[r]["nonfinite_events"]] == [(6, 1, r)]


def test_group_size_compressed_gossip_between_groups(tmp_path):
    """CHOCO-gossip with group_size=2 on 4 ranks: "ring" over the 2 groups (rank j of a group holds
    the copies of rank j of the other; the stochastic rounding is salted with the group's index),
    exact global merges over the groups from 60% of training on. The members of a group end bitwise
    identical and equal the reference of 2 replicas stepping on their members' mean gradients.
    (It was a defect: the ring was built over the 4 ranks and the members of a group drifted apart.)"""

    def comp():
        return Int8(block=16, rounding="stochastic")

    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        gossip(
            "ring",
            gossip_every=2,
            group_size=2,
            compressor=comp(),
            consensus_lr=0.5,
            merge_from=0.6,
            final_sync=False,
        ),
        n=4,
        max_steps=9,
    )
    w = lf.topology.ring(2).matrix()
    ref = reference_choco(
        2, 9, lambda s: s % 2 == 0, w, comp, 0.5, global_merge_from=6, members=[[0, 1], [2, 3]]
    )
    for r in range(4):
        assert_close_state(ranks[r]["state_dict"], ref[r // 2], atol=1e-5)
    torch.testing.assert_close(ranks[0]["state_dict"], ranks[1]["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[2]["state_dict"], ranks[3]["state_dict"], rtol=0, atol=0)
    assert not torch.allclose(ranks[0]["state_dict"]["net.0.weight"], ranks[2]["state_dict"]["net.0.weight"])
    for r in range(4):
        assert sent_bytes(ranks[r]) == 2 * message_nbytes(comp())  # 2 compressed rounds, to 1 neighbour
