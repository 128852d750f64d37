"""Eager updates (EagerDiLoCoStrategy) on real processes against the single-process reference of
tests/unit/test_eager.py: the trajectory, the consensus used by validation, the all-reduce left in
flight across the next round, the bytes, a NaN replica, a resume with a round in flight, one
replica of two processes (plain DiLoCo) and a trained module fit again."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from modules import KnownBatchModule, make_batch, make_net
from reference_outer import local_step, make_replicas, reference_diloco, run_and_resume, states
from runners import assert_close_state, fit_fork
from unit.test_eager import reference_eager

import lightning_fedopt as lf
from lightning_fedopt.strategies.diloco.eager import EagerDiLoCoStrategy


def eager(**kw):
    return EagerDiLoCoStrategy(start_method="fork", **kw)


def reference(n, steps, sync_every, *, optimizer="sgd", lr=0.1, nan_at=None, trace=None):
    """What every rank ends with under the reference (KnownBatchModule's batches, inner SGD/Adam,
    the default outer optimizer for two replicas: Nesterov, momentum 0.9, lr 0.6)."""
    nets, opts = make_replicas(n, optimizer, lr)
    reference_eager(
        nets,
        lambda r, s: local_step(nets[r], opts[r], r, s),
        steps,
        sync_every,
        nan_at=nan_at,
        trace=trace,
    )
    return states(nets)


def _val_loss(params: list[torch.Tensor], batches: int) -> float:
    net = make_net(0)
    with torch.no_grad():
        for p, v in zip(net.parameters(), params):
            p.copy_(v)
        losses = [
            float(torch.nn.functional.mse_loss(net(x), y))
            for x, y in map(lambda i: make_batch(99, i), range(batches))
        ]
    return sum(losses) / batches


@pytest.mark.parametrize("steps", [13, 12])
def test_eager_matches_reference_and_validates_the_mean_of_the_outer_weights(tmp_path, steps):
    """H=3 on two ranks: four eager rounds, then the end (13 steps: the round in flight and a
    partial round of one step; 12: the round in flight alone). Every rank ends on the reference's
    weights. The validation at step 10 (a round in flight) scores the mean of the replicas' outer
    weights after the round at step 9."""
    trace: list[dict] = []
    ref = reference(2, steps, 3, trace=trace)
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        eager(sync_every=3),
        max_steps=steps,
        limit_val_batches=2,
        val_check_interval=5,
    )
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-6)
    assert_close_state(ranks[0]["state_dict"], ranks[1]["state_dict"], atol=0.0)
    phi = trace[2]["phi"]  # after the sync at step 9
    consensus = [(a + b) / 2 for a, b in zip(phi[0], phi[1])]
    assert ranks[0]["callback_metrics"]["val_loss"] == pytest.approx(_val_loss(consensus, 2), abs=1e-5)


def test_a_round_costs_diloco_bytes(tmp_path):
    """13 steps of H=3: DiLoCo all-reduces its pseudo-gradients 5 times (4 rounds, the partial one);
    eager updates the same 5 times and, at the end, the replicas' outer weights once (the same
    size): 6/5 of DiLoCo's synchronisation bytes, in 6 rounds."""
    ours = fit_fork(tmp_path / "e", KnownBatchModule(), eager(sync_every=3), max_steps=13)
    theirs = fit_fork(
        tmp_path / "d", KnownBatchModule(), lf.DiLoCoStrategy(sync_every=3, start_method="fork"), max_steps=13
    )
    e, d = ours[0]["comm"]["by_purpose"]["sync"], theirs[0]["comm"]["by_purpose"]["sync"]
    assert (e["rounds"], d["rounds"]) == (6, 5), (e, d)
    assert e["bytes_sent"] * 5 == d["bytes_sent"] * 6, (e, d)


class WatchInflight(L.Callback):
    """After every training step: whether a round is in flight and whether it was waited for (the
    strategy's public ``in_flight``); keeps the round launched at the first sync."""

    def __init__(self, out):
        self.out, self.rows, self.first = out, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = trainer.strategy
        f = s.in_flight
        if f is not None and self.first is None:
            self.first = f
        self.rows.append(
            {
                "step": s.replica_step,
                "inflight": f is not None,
                "unwaited": f is not None and f.result is None,
                "first_done": None if self.first is None else self.first.result is not None,
            }
        )

    def on_train_end(self, trainer, pl_module):
        torch.save(self.rows, self.out / f"inflight{trainer.global_rank}.pt")


def test_all_reduce_stays_in_flight_across_the_next_rounds_steps(tmp_path):
    """H=3, 9 steps: the all-reduce launched at step 3 is not waited for during steps 3-5 (the next
    round's local steps run while it is in flight) and is received by the sync at step 6, which
    leaves its own round in flight in turn; the last step closes what is left."""
    tmp_path.mkdir(exist_ok=True)
    fit_fork(
        tmp_path / "out",
        KnownBatchModule(),
        eager(sync_every=3),
        callbacks=[WatchInflight(tmp_path)],
        max_steps=9,
    )
    for r in range(2):
        rows = {row["step"]: row for row in torch.load(tmp_path / f"inflight{r}.pt", weights_only=False)}
        assert sorted(rows) == list(range(1, 10))
        assert not rows[1]["inflight"] and not rows[2]["inflight"]
        for step in range(3, 9):
            assert rows[step]["inflight"] and rows[step]["unwaited"], (r, rows[step])
        assert not rows[9]["inflight"], (r, rows[9])
        assert rows[5]["first_done"] is False and rows[6]["first_done"] is True


def test_nan_replica_is_excluded_and_reset(tmp_path):
    """Rank 1's loss is NaN at step 5 (round 2 of H=4): it counts zero progress, restarts from its
    outer weights at step 8, and round 2's average (received at step 12) is rank 0's alone. Every
    rank equals the reference; no NaN reaches rank 0."""
    ranks = fit_fork(tmp_path, KnownBatchModule(nan_at=(1, 5)), eager(sync_every=4), max_steps=12)
    ref = reference(2, 12, 4, nan_at=(1, 5))
    for r in range(2):
        assert all(torch.isfinite(v).all() for v in ranks[r]["state_dict"].values())
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    ev0, ev1 = ranks[0]["nonfinite_events"], ranks[1]["nonfinite_events"]
    assert {"step": 8, "local": 1} in [{"step": e["step"], "local": e["local"]} for e in ev1], ev1
    assert [e["excluded"] for e in ev0 if e["step"] == 12] == [1], ev0


def test_resume_with_round_in_flight_is_exact(tmp_path):
    """A checkpoint after step 6 (H=3, inner Adam): round 2's all-reduce in flight (in the meta
    entry), each replica's own outer weights, outer momentum and previous pseudo-gradient (in its
    shard). Resumed to step 11 it equals the uninterrupted run bit for bit (``final_sync=False``:
    the first run's last step, 6, would otherwise close training before its checkpoint)."""

    def module():
        return KnownBatchModule(optimizer="adam", lr=0.01)

    full, resumed, path = run_and_resume(
        tmp_path, module, lambda: eager(sync_every=3, final_sync=False), total=11, at=6
    )
    meta = torch.load(path, weights_only=False)["lightning_fedopt"]["algorithm"]
    assert meta["inflight"] is not None
    shard = torch.load(f"{path}.replicas/rank1.pt", weights_only=True)
    own = shard["replica"]["eager"]
    assert own["outer"][0]["state"] and any(bool(t.abs().sum() > 0) for t in own["own_previous"])
    for r in range(2):
        assert_close_state(resumed[r]["state_dict"], full[r]["state_dict"], atol=0.0)


def test_one_replica_of_two_processes_is_diloco(tmp_path):
    """group_size=2 on two ranks is one replica (M = 1): the proxy is the average, so eager updates
    are DiLoCo (outer lr 0.4 for one replica), their transfer still overlapping the next round."""
    ranks = fit_fork(tmp_path, KnownBatchModule(), eager(sync_every=3, group_size=2), max_steps=13)

    def outer(params):
        return torch.optim.SGD(params, lr=0.4, momentum=0.9, nesterov=True)

    ref = reference_diloco(1, 13, 3, members=[[0, 1]], outer=outer)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[0], atol=1e-5)


def _held_out_loss(module: KnownBatchModule) -> float:
    with torch.no_grad():
        batches = [make_batch(99, i, 64) for i in range(4)]
        return sum(float(torch.nn.functional.mse_loss(module.net(x), y)) for x, y in batches) / 4


def test_trained_module_fit_again_does_not_diverge(tmp_path):
    """A module trained for 40 steps, then fit again for 20 by a new Trainer and a new strategy
    (H=8): the new fit's first round starts from the trained weights and applies its own progress
    once (a 1/M share), so the held-out loss does not jump (the CO2 refit bug of issue 22)."""
    module = KnownBatchModule()
    fit_fork(tmp_path / "first", module, eager(sync_every=8), max_steps=40)
    before = _held_out_loss(module)
    fit_fork(tmp_path / "again", module, eager(sync_every=8), max_steps=20)
    after = _held_out_loss(module)
    assert after < 1.25 * before, (before, after)
