"""GossipStrategy on real processes (fork, gloo) against the single-process reference of theta <- W theta."""

from __future__ import annotations

import pytest
import torch
from gossip_helpers import PAYLOAD, SaveHistory, ring_matrix
from gossip_reference import reference_gossip
from modules import KnownBatchModule, make_net
from runners import TIMEOUT, CountDistCalls, assert_close_state, fit_fork

import lightning_fedopt as lf
from lightning_fedopt.callbacks import CommunicationMonitor


def gossip(*args, **kw):
    return lf.GossipStrategy(*args, start_method="fork", timeout=TIMEOUT, **kw)


def test_ring_four_processes_matches_reference_point_to_point_only(tmp_path):
    """4 ranks on a ring, gossip every 2 steps for 10 steps: every rank equals the reference
    theta <- W theta to 1e-5, and the gossip rounds used point-to-point transfers only."""
    tmp_path.mkdir(exist_ok=True)
    ranks = fit_fork(
        tmp_path / "out",
        KnownBatchModule(),
        gossip("ring", gossip_every=2, final_sync=False),
        n=4,
        max_steps=10,
        callbacks=[CountDistCalls(tmp_path)],
    )
    ref = reference_gossip(4, 10, lambda s: s % 2 == 0, lambda t: ring_matrix(4))
    for r in range(4):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    # the replicas really differ (no hidden global averaging)
    assert not torch.allclose(ranks[0]["state_dict"]["net.0.weight"], ranks[2]["state_dict"]["net.0.weight"])
    for r in range(4):
        rec = torch.load(tmp_path / f"calls{r}.pt", weights_only=False)
        calls = rec["calls"]
        # 5 gossip rounds: one batched send/recv each, and the 16-byte step/stop-flag rendezvous
        # (an all-reduce) before each round; no other collective
        assert calls["batch_isend_irecv"] == 5
        assert calls["all_reduce"] == 5 and calls["all_gather"] == 0 and calls["reduce_scatter"] == 0
        assert calls["broadcast"] == 0
        assert sum(calls.values()) == 10
        after, before = rec["after"]["by_op"], rec["before"]["by_op"]
        # ring all-reduce of 16 B on 4 ranks: 2 (N-1)/N x 16 = 24 B per rank and round
        rendezvous = (
            after["all_reduce"]["bytes_sent"] - before.get("all_reduce", {"bytes_sent": 0})["bytes_sent"]
        )
        assert rendezvous == 5 * 24
        # each round: the model to both ring neighbours
        sent = after["send"]["bytes_sent"] - before.get("send", {"bytes_sent": 0})["bytes_sent"]
        assert sent == 5 * 2 * PAYLOAD
        assert (
            after["recv"]["bytes_received"] - before.get("recv", {"bytes_received": 0})["bytes_received"]
            == sent
        )


def test_custom_matrix_sam_multi_gossip_steps_and_final_merge(tmp_path):
    """2 ranks, W = [[.75, .25], [.25, .75]], DFedSAM (rho=0.05) local steps, Q=2 gossip steps
    every 3 steps, final global merge; with the CommunicationMonitor's metrics."""
    w = torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)
    monitor = CommunicationMonitor()
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        gossip(w, gossip_every=3, gossip_steps=2, sam_rho=0.05),
        max_steps=8,
        callbacks=[monitor],
    )
    ref = reference_gossip(
        2, 8, lambda s: s % 3 == 0, lambda t: w, gossip_steps=2, sam_rho=0.05, final_average=True
    )
    plain = reference_gossip(2, 8, lambda s: s % 3 == 0, lambda t: w, gossip_steps=2, final_average=True)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    assert not torch.allclose(plain[0]["net.0.weight"], ref[0]["net.0.weight"], atol=1e-4)  # SAM mattered
    assert ranks[0]["sync_count"] == 2 + 1


def test_merge_from_switches_to_global_merges(tmp_path):
    """A Single Merging Suffices, truncate schedule: gossip on a custom ring until 60% of training,
    then every round is a global merge (the replicas are identical after it)."""
    w = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]], dtype=torch.float64)
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        gossip(w, gossip_every=2, merge_from=0.6, final_sync=False),
        n=3,
        max_steps=10,
    )
    ref = reference_gossip(3, 10, lambda s: s % 2 == 0, lambda t: w, global_merge_from=6)
    for r in range(3):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    torch.testing.assert_close(ranks[0]["state_dict"], ranks[2]["state_dict"], rtol=0, atol=0)


def sign_flip(model, last):
    return [2 * a - b for a, b in zip(last, model)]  # last - (model - last): the round's update negated


class SignFlipper(lf.GossipStrategy):
    """Rank 3 sends its round's update sign-flipped (a Byzantine replica); it merges honestly itself."""

    def setup_algorithm(self):
        super().setup_algorithm()
        self._last = [t.detach().clone() for t in self.tracked_tensors()]

    def outgoing_message(self, values):
        return sign_flip(values, self._last) if self.global_rank == 3 else values

    def gossip_step(self):
        out = super().gossip_step()
        self._last = [t.detach().clone() for t in self.tracked_tensors()]
        return out


def test_trimmed_mean_full_topology_with_a_byzantine_replica(tmp_path):
    """4 ranks fully connected, merge='trimmed_mean' (f=1), rank 3 sends sign-flipped updates:
    every rank equals the reference that trims coordinate-wise over {own} + the 3 messages."""
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        SignFlipper(
            "fully_connected", 2, merge="trimmed_mean", final_sync=False, start_method="fork", timeout=TIMEOUT
        ),
        n=4,
        max_steps=6,
    )

    def combine(r, own, sent):
        models = [own if j == r else sent[j] for j in range(4)]
        return [torch.stack([m[i] for m in models]).sort(0).values[1:3].mean(0) for i in range(len(own))]

    ref = reference_gossip(
        4,
        6,
        lambda s: s % 2 == 0,
        None,
        combine=combine,
        message=lambda r, m, last: sign_flip(m, last) if r == 3 else m,
    )
    for r in range(4):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    comm = ranks[0]["comm"]["by_op"]
    assert comm["send"]["bytes_sent"] == 3 * 3 * PAYLOAD  # 3 rounds, to 3 peers
    assert (
        "all_reduce" not in comm
        or comm["all_reduce"]["rounds"] == 0
        or "metrics" in ranks[0]["comm"]["by_purpose"]
    )


def test_topology_needing_more_ranks_and_robust_merge_on_a_ring(tmp_path):
    with pytest.raises(Exception, match=r"ValueError: `topology` ring\(4\) needs 4 replicas but there are 2"):
        fit_fork(tmp_path, KnownBatchModule(), gossip(lf.topology.ring(4)), max_steps=2)
    with pytest.raises(Exception, match=r"ValueError: `merge` .*trimmed_mean.* needs 3 models"):
        fit_fork(tmp_path, KnownBatchModule(), gossip("ring", merge="trimmed_mean"), max_steps=2)
    module = KnownBatchModule()
    module.net = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Tanh()), torch.nn.Linear(4, 1)
    )
    with pytest.raises(Exception, match=r"ValueError: DIMAT cannot permute layer 1 \(Sequential\)"):
        fit_fork(tmp_path, module, gossip("ring", align="dimat"), max_steps=2)


PERM = torch.tensor([3, 1, 4, 0, 5, 9, 2, 6, 8, 7, 10, 11, 12, 13, 15, 14])


class ShufflesHiddenUnits(KnownBatchModule):
    """Trains on the batches its loader yields (make_batch(rank, step)); rank 1 reorders its hidden
    units after step 2 (the same function, different unit order), so plain averaging mixes unrelated units."""

    def train_dataloader(self):
        from modules import make_batch

        return torch.utils.data.DataLoader(
            [make_batch(self.global_rank, s) for s in range(64)], batch_size=None
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 2:
            from lightning_fedopt.dimat import permute_hidden_units

            self.net.load_state_dict(permute_hidden_units(self.net, [PERM]).state_dict())


def reference_dimat_gossip(w, steps, every, align_on):
    from modules import make_batch

    from lightning_fedopt.dimat import align, permute_hidden_units

    nets = [make_net(0) for _ in range(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    for step in range(steps):
        if step == 2:
            nets[1].load_state_dict(permute_hidden_units(nets[1], [PERM]).state_dict())
        for r in range(2):
            x, y = make_batch(r, step)
            opts[r].zero_grad()
            torch.nn.functional.mse_loss(nets[r](x), y).backward()
            opts[r].step()
        if (step + 1) % every:
            continue
        states = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
        for i in range(2):
            j = 1 - i
            other = make_net(0)
            other.load_state_dict(states[j])
            if align_on:
                other = align(nets[i], other, make_batch(i, step)[0])
            mixed = {k: w[i][i] * states[i][k] + w[i][j] * other.state_dict()[k] for k in states[i]}
            nets[i].load_state_dict(mixed)
    return [{f"net.{k}": v for k, v in n.state_dict().items()} for n in nets]


def test_dimat_gossip_aligns_neighbours_before_merging(tmp_path):
    w = [[0.75, 0.25], [0.25, 0.75]]
    ranks = fit_fork(
        tmp_path,
        ShufflesHiddenUnits(),
        gossip(w, gossip_every=3, align="dimat", final_sync=False),
        max_steps=9,
        use_distributed_sampler=False,
    )
    ref = reference_dimat_gossip(w, 9, 3, align_on=True)
    unaligned = reference_dimat_gossip(w, 9, 3, align_on=False)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    assert (ref[0]["net.0.weight"] - unaligned[0]["net.0.weight"]).abs().max() > 1e-2


def test_monitor_logs_consensus_distance_and_spectral_gap(tmp_path):
    """At each gossip round the CommunicationMonitor logs the spectral gap of W and the consensus
    distance mean_i ||theta_i - mean|| / ||mean|| measured just before the replicas mix."""
    w = torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)  # eigenvalues 1, 0.5
    monitor = CommunicationMonitor()
    fit_fork(
        tmp_path / "out",
        KnownBatchModule(),
        gossip(w, gossip_every=3, final_sync=False),
        max_steps=6,
        callbacks=[monitor, SaveHistory(monitor, tmp_path / "hist")],
    )
    hist = torch.load(tmp_path / "hist" / "hist0.pt", weights_only=False)
    rows = {int(r["step"]): r for r in hist}
    assert rows[3]["comm/spectral_gap"] == pytest.approx(0.5)
    pre = reference_gossip(2, 3, lambda s: False, lambda t: w)  # the replicas just before the first gossip
    keys = list(pre[0])
    mean = {k: (pre[0][k] + pre[1][k]) / 2 for k in keys}
    norm = torch.sqrt(sum((mean[k].double() ** 2).sum() for k in keys))
    dist = (
        sum(torch.sqrt(sum(((p[k].double() - mean[k].double()) ** 2).sum() for k in keys)) for p in pre) / 2
    )
    assert rows[3]["comm/consensus_distance"] == pytest.approx(float(dist / norm), rel=1e-4)
    assert rows[3]["comm/consensus_distance"] > 0


def test_resume_mid_round_is_exact_with_time_varying_topology(tmp_path):
    """10 uninterrupted steps == 4 steps, checkpoint (mid-round), resume to 10: the round counter of a
    time-varying topology (a cycle of two matrices) and every replica are restored exactly."""
    from reference_outer import run_and_resume

    cycle = [torch.tensor([[0.75, 0.25], [0.25, 0.75]]), torch.tensor([[0.9, 0.1], [0.1, 0.9]])]
    full, resumed, _ = run_and_resume(
        tmp_path, KnownBatchModule, lambda: gossip(cycle, 3, final_sync=False), total=10, at=4
    )
    ref = reference_gossip(2, 10, lambda s: s % 3 == 0, lambda t: cycle[t % 2].double())
    for r in range(2):
        assert_close_state(full[r]["state_dict"], ref[r], atol=1e-5)
        assert_close_state(resumed[r]["state_dict"], full[r]["state_dict"], atol=0.0)


def test_nonfinite_replica_does_not_poison_its_neighbours(tmp_path):
    """Rank 1's weights turn NaN at step 5: at the gossip round after step 6 rank 0 leaves it out
    (its own weight renormalised to 1) and rank 1 is reset to the merge of its finite neighbours."""
    w = torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)
    ranks = fit_fork(
        tmp_path, KnownBatchModule(nan_at=(1, 4)), gossip(w, gossip_every=3, final_sync=False), max_steps=6
    )
    expected = reference_gossip(2, 6, lambda s: s == 3, lambda t: w)[0]  # rank 0 alone in round 2
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], expected, atol=1e-5)
        assert [(e["step"], e["excluded"], e["local"]) for e in ranks[r]["nonfinite_events"]] == [(6, 1, r)]


def test_group_size_gossips_between_groups_and_members_stay_identical(tmp_path):
    """Hierarchical gossip, 4 ranks, group_size=2: groups {0, 1} and {2, 3} all-reduce their gradients
    at every step; the gossip (W over the 2 groups, DFedSAM local steps) runs between the groups, rank
    j of one group with rank j of the other. The members of a group end bitwise identical and every
    rank equals the reference in which a group is one replica stepping on its members' mean gradient.
    (It was a defect: the topology was built over the 4 ranks, so the members of a group gossiped
    with different neighbours and drifted apart; this 2 x 2 matrix was refused outright.)"""
    w = torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        gossip(w, gossip_every=2, sam_rho=0.05, group_size=2, final_sync=False),
        n=4,
        max_steps=7,
    )
    ref = reference_gossip(2, 7, lambda s: s % 2 == 0, lambda t: w, sam_rho=0.05, members=[[0, 1], [2, 3]])
    for r in range(4):
        assert_close_state(ranks[r]["state_dict"], ref[r // 2], atol=1e-5)
    torch.testing.assert_close(ranks[0]["state_dict"], ranks[1]["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[2]["state_dict"], ranks[3]["state_dict"], rtol=0, atol=0)
    assert not torch.allclose(ranks[0]["state_dict"]["net.0.weight"], ranks[2]["state_dict"]["net.0.weight"])
    for r in range(4):
        # 3 gossip rounds, each the model to the other group's rank j only
        assert ranks[r]["comm"]["by_op"]["send"]["bytes_sent"] == 3 * PAYLOAD
