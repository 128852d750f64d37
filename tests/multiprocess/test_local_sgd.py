"""Local SGD / FedAvg on real processes (fork, gloo) against the single-process reference."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from modules import KnownBatchModule, make_batch, make_net
from references import reference_local_sgd
from runners import TIMEOUT, CountDistCalls, assert_close_state, fit_fork
from torch.utils.data import DataLoader

import lightning_fedopt as lf
from lightning_fedopt.strategies.local_sgd.local_sgd import choose_participants


def local_sgd(**kw):
    return lf.LocalSGDStrategy(start_method="fork", timeout=TIMEOUT, **kw)


def test_matches_reference_h4(tmp_path):
    """Two replicas, known per-rank batches, SGD, H=4: every rank equals the reference to 1e-6.

    14 steps = 3 full rounds and a half round closed by the final sync. Different initial weights
    per rank also check that rank 0's weights are broadcast at the start.
    """
    ranks = fit_fork(
        tmp_path, KnownBatchModule(init_seed_per_rank=True), local_sgd(sync_every=4), max_steps=14
    )
    ref = reference_local_sgd(2, 14, lf.Periodic(4), init_offset=1.0)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-6)
    # the half round was real: without the final sync the replicas would differ
    ref_no_final = reference_local_sgd(2, 14, lf.Periodic(4), init_offset=1.0, final_average=False)
    diff = (ref_no_final[0]["net.0.weight"] - ref_no_final[1]["net.0.weight"]).abs().max()
    assert diff > 1e-4
    assert ranks[0]["replica_step"] == 14
    assert ranks[0]["sync_count"] == 3 + 1  # 3 scheduled + the final one


@pytest.mark.parametrize("per_rank_init", [False, True])
def test_initial_sync_check_broadcasts_only_when_replicas_differ(tmp_path, per_rank_init):
    """``initial_sync="check"``: replicas that start from the same weights exchange only their
    32-byte digests (no broadcast); replicas that differ still get rank 0's weights. Either way every
    rank ends as the reference does."""
    module = KnownBatchModule(init_seed_per_rank=per_rank_init)
    ranks = fit_fork(tmp_path, module, local_sgd(sync_every=4, initial_sync="check"), max_steps=8)
    ref = reference_local_sgd(2, 8, lf.Periodic(4), init_offset=1.0 if per_rank_init else 0.0)
    n_bytes = 4 * sum(v.numel() for v in ref[0].values())
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-6)
        setup = ranks[r]["comm"]["by_purpose"]["setup"]  # start-up traffic: digests (+ broadcast)
        if per_rank_init:  # rank 0 sends the model, rank 1 receives it
            assert setup["bytes_sent" if r == 0 else "bytes_received"] == 32 + n_bytes
        else:  # one digest out, one in
            assert setup["bytes_sent"] == 32 and setup["bytes_received"] == 32


def test_post_local_sgd_warmup_matches_reference(tmp_path):
    ranks = fit_fork(tmp_path, KnownBatchModule(), local_sgd(sync_every=5, warmup_steps=3), max_steps=13)
    ref = reference_local_sgd(2, 13, lf.Periodic(5, warmup_steps=3))
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r])
    assert ranks[0]["sync_count"] == len(lf.Periodic(5, 3).sync_steps(13))  # 1,2,3,8,13


def test_schedule_object_and_no_final_sync(tmp_path):
    sched = lf.Explicit([2, 9])
    ranks = fit_fork(
        tmp_path, KnownBatchModule(), local_sgd(sync_every=sched, final_sync=False), max_steps=12
    )
    ref = reference_local_sgd(2, 12, sched, final_average=False)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r])
    # without the final sync the replicas keep their own weights
    assert not torch.equal(ranks[0]["state_dict"]["net.0.weight"], ranks[1]["state_dict"]["net.0.weight"])


def test_nan_replica_is_excluded_and_reset(tmp_path):
    """Rank 1's loss turns NaN at step 5: the average of round 2 is rank 0's own weights, rank 1 is
    reset to it, and training then continues exactly as the reference that skips the NaN replica."""
    module = KnownBatchModule(nan_at=(1, 5))
    ranks = fit_fork(tmp_path, module, local_sgd(sync_every=4), max_steps=12)
    ref = reference_local_sgd(2, 12, lf.Periodic(4), nan_at=(1, 5))
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r])
        assert all(torch.isfinite(v).all() for v in ranks[r]["state_dict"].values())
        events = ranks[r]["nonfinite_events"]
        assert [(e["step"], e["excluded"]) for e in events] == [(8, 1)]
    assert ranks[1]["nonfinite_events"][0]["local"] == 1 and ranks[0]["nonfinite_events"][0]["local"] == 0
    # and the healthy replica's result is what it would have been on its own for that round
    clean = reference_local_sgd(2, 12, lf.Periodic(4))
    assert not torch.allclose(clean[0]["net.0.weight"], ref[0]["net.0.weight"])


class UnevenBatches(KnownBatchModule):
    """Rank r's loader yields batches of r+1 samples (the model still trains on make_batch)."""

    def train_dataloader(self):
        return DataLoader(list(range(64)), batch_size=1 + self.global_rank)


def test_sample_weighting(tmp_path):
    ranks = fit_fork(tmp_path, UnevenBatches(), local_sgd(sync_every=4, weighting="samples"), max_steps=10)
    ref = reference_local_sgd(2, 10, lf.Periodic(4), batch_sizes=[1, 2])
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r])
    uniform = reference_local_sgd(2, 10, lf.Periodic(4))
    assert not torch.allclose(uniform[0]["net.0.weight"], ref[0]["net.0.weight"])


def test_partial_participation_three_ranks(tmp_path):
    fraction = 2 / 3
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        local_sgd(sync_every=3, participation=fraction, participation_seed=5),
        n=3,
        max_steps=12,
    )
    ref = reference_local_sgd(
        3, 12, lf.Periodic(3), participants_fn=lambda k: choose_participants(k, 3, fraction, seed=5)
    )
    for r in range(3):
        assert_close_state(ranks[r]["state_dict"], ref[r])
    chosen = [choose_participants(k, 3, fraction, seed=5) for k in range(4)]
    assert all(len(c) == 2 for c in chosen) and len({tuple(c) for c in chosen}) > 1


def test_fedau_bernoulli_participation(tmp_path):
    probs = [0.9, 0.3]
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        local_sgd(sync_every=2, participation=probs, adaptive_weights=True, server_lr=1.0, fedau_cutoff=3),
        max_steps=16,
    )
    ref = reference_local_sgd(
        2, 16, lf.Periodic(2), participants_fn=lambda k: choose_participants(k, 2, probs), fedau_cutoff=3
    )
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    draws = [choose_participants(k, 2, probs) for k in range(8)]
    assert any(1 not in d for d in draws) and any(1 in d for d in draws)  # rank 1 really is intermittent


def test_optimizer_state_averaging_adam(tmp_path):
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(optimizer="adam", lr=0.01),
        local_sgd(sync_every=4, average_optimizer_state=True),
        max_steps=8,
    )
    ref = reference_local_sgd(2, 8, lf.Periodic(4), optimizer="adam", lr=0.01, average_optimizer_state=True)
    plain = reference_local_sgd(2, 8, lf.Periodic(4), optimizer="adam", lr=0.01)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r])
    assert not torch.allclose(plain[0]["net.0.weight"], ref[0]["net.0.weight"])


class AccumulatingModule(KnownBatchModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) / 2


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    ranks = fit_fork(
        tmp_path, AccumulatingModule(), local_sgd(sync_every=3), max_steps=6, accumulate_grad_batches=2
    )
    assert ranks[0]["replica_step"] == 6 and ranks[1]["replica_step"] == 6
    assert ranks[0]["sync_count"] == 2
    torch.testing.assert_close(ranks[0]["state_dict"], ranks[1]["state_dict"], rtol=0, atol=0)


class TwoOptimizers(L.LightningModule):
    """Manual optimization with two optimizers and an LR scheduler (a GAN-like loop)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = make_net(1), make_net(2)

    def training_step(self, batch, batch_idx):
        from modules import make_batch

        opt_a, opt_b = self.optimizers()
        x, y = make_batch(self.global_rank, batch_idx)
        for net, opt in ((self.a, opt_a), (self.b, opt_b)):
            loss = torch.nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt_a = torch.optim.SGD(self.a.parameters(), lr=0.1)
        opt_b = torch.optim.SGD(self.b.parameters(), lr=0.05)
        return [opt_a, opt_b], [torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)]

    def train_dataloader(self):
        return DataLoader(list(range(20)), batch_size=1)


def test_manual_optimization_two_optimizers(tmp_path):
    ranks = fit_fork(tmp_path, TwoOptimizers(), local_sgd(sync_every=4), max_epochs=1, max_steps=-1)
    # 10 batches per rank, each stepping two optimizers: 10 replica steps (not 20)
    assert ranks[0]["replica_step"] == 10
    assert ranks[0]["sync_count"] == 2 + 1
    torch.testing.assert_close(ranks[0]["state_dict"], ranks[1]["state_dict"], rtol=0, atol=0)


def test_bytes_are_one_eighth_of_ddp(tmp_path):
    """Local SGD with H=8 sends 1/8 of DDP's bytes for the same 64 steps (cost model of comm.py)."""
    steps, hidden = 64, 1024
    ddp = fit_fork(
        tmp_path / "ddp",
        KnownBatchModule(hidden=hidden, lr=0.01),
        lf.MeteredDDPStrategy(start_method="fork", timeout=TIMEOUT),
        max_steps=steps,
    )
    lsgd = fit_fork(
        tmp_path / "lsgd", KnownBatchModule(hidden=hidden, lr=0.01), local_sgd(sync_every=8), max_steps=steps
    )
    payload = sum(p.numel() for p in make_net(hidden=hidden).parameters()) * 4
    for r in range(2):
        ddp_c, lsgd_c = ddp[r]["comm"], lsgd[r]["comm"]
        # DDP: one bucket per step, the model's gradients (ring all-reduce: 2(N-1)/N of the payload)
        assert ddp_c["by_purpose"]["sync"]["bytes_sent"] == steps * payload
        # Local SGD: weights + [weight, valid, invalid] scalars, every 8th step
        assert lsgd_c["by_purpose"]["sync"]["bytes_sent"] == (steps // 8) * (payload + 3 * 4)
        # the 16-byte step/stop-flag rendezvous before each sync and once at the end of training
        # (ring all-reduce of 16 B: 16 B per rank with N=2); the start-up broadcast is the same for both
        assert lsgd_c["by_purpose"]["control"]["bytes_sent"] == 16 * (steps // 8 + 1)
        assert ddp_c["by_purpose"]["setup"]["bytes_sent"] == lsgd_c["by_purpose"]["setup"]["bytes_sent"]

        def after_setup(c):
            return c["total"]["bytes_sent"] - c["by_purpose"]["setup"]["bytes_sent"]

        assert after_setup(lsgd_c) / after_setup(ddp_c) == pytest.approx(1 / 8, rel=0.01)
    assert lsgd[0]["comm"]["by_op"].keys() >= {"all_reduce", "broadcast"}


def test_bad_participation_length_and_sync_batchnorm(tmp_path):
    # raised inside the worker processes, which re-raise it as ProcessRaisedException
    with pytest.raises(Exception, match=r"ValueError: `participation` lists 3 probabilities but there are 2"):
        fit_fork(tmp_path, KnownBatchModule(), local_sgd(participation=[0.5, 0.5, 0.5]), max_steps=2)
    with pytest.raises(Exception, match=r"ValueError: .*sync_batchnorm"):
        fit_fork(tmp_path, KnownBatchModule(), local_sgd(), max_steps=2, sync_batchnorm=True)


def test_no_collective_between_sync_points(tmp_path):
    """20 steps with H=5: the only collectives during training are the 4 averages and the 4
    stop-flag checks before them; Lightning's per-step SIGTERM broadcast is gone."""
    tmp_path.mkdir(exist_ok=True)
    fit_fork(
        tmp_path / "out",
        KnownBatchModule(),
        local_sgd(sync_every=5),
        max_steps=20,
        callbacks=[CountDistCalls(tmp_path)],
    )
    for r in range(2):
        rec = torch.load(tmp_path / f"calls{r}.pt", weights_only=False)
        # 4 averages and 4 step/stop-flag rendezvous (16-byte all-reduces), nothing else
        assert rec["calls"]["all_reduce"] == 8
        assert rec["calls"]["broadcast"] == 0
        assert sum(rec["calls"].values()) == 8
        rounds = {
            op: rec["after"]["by_op"][op]["rounds"] - rec["before"]["by_op"].get(op, {"rounds": 0})["rounds"]
            for op in ("all_reduce", "broadcast")
        }
        assert rounds == {"all_reduce": 8, "broadcast": 0}  # and comm.py counted each of them


def test_round_without_participants_restarts_from_last_result(tmp_path):
    """Bernoulli participation where some rounds draw nobody: those rounds discard the local work
    and every replica restarts from the previous round's result (FedAvg's server model)."""
    probs = [0.4, 0.4]
    draws = [choose_participants(k, 2, probs, seed=3) for k in range(6)]
    assert [] in draws and any(draws)  # the seed gives both kinds of rounds
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        local_sgd(sync_every=2, participation=probs, participation_seed=3),
        max_steps=11,
    )
    ref = reference_local_sgd(
        2, 11, lf.Periodic(2), participants_fn=lambda k: choose_participants(k, 2, probs, seed=3)
    )
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r])
    torch.testing.assert_close(ranks[0]["state_dict"], ranks[1]["state_dict"], rtol=0, atol=0)


class TiedAndNonPersistent(KnownBatchModule):
    """A module with a tied weight (two names, one tensor) and a non-persistent float buffer."""

    def __init__(self):
        super().__init__()
        self.extra = torch.nn.Linear(4, 4, bias=False)
        self.alias = self.extra  # the same parameter under a second name in state_dict
        self.register_buffer("cache", torch.ones(3), persistent=False)

    def training_step(self, batch, batch_idx):
        x, _ = make_batch(self.global_rank, self.global_step)
        return super().training_step(batch, batch_idx) + self.extra(x).pow(2).mean() * 0.1


def test_checkpoint_state_dict_tied_weights_and_non_persistent_buffers(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="c")
    ranks = fit_fork(
        tmp_path / "run",
        TiedAndNonPersistent(),
        local_sgd(sync_every=4, final_sync=False),
        max_steps=6,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    checkpoint = torch.load(tmp_path / "ckpt" / "c.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    fresh = TiedAndNonPersistent()
    assert set(state) == set(fresh.state_dict())  # no "cache": loads strictly
    fresh.load_state_dict(state, strict=True)
    mean = (ranks[0]["state_dict"]["extra.weight"] + ranks[1]["state_dict"]["extra.weight"]) / 2
    assert not torch.equal(ranks[0]["state_dict"]["extra.weight"], ranks[1]["state_dict"]["extra.weight"])
    # both names of the tied weight hold the consensus
    torch.testing.assert_close(state["extra.weight"], mean)
    torch.testing.assert_close(state["alias.weight"], mean)


class FreezesThenUnfreezes(KnownBatchModule):
    """Like Lightning's BackboneFinetuning: the first layer is frozen when fit starts, unfrozen at step 4."""

    def setup(self, stage):
        self.net[0].requires_grad_(False)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 4:
            self.net[0].requires_grad_(True)


@pytest.mark.parametrize("include_frozen", [True, False])
def test_parameters_unfrozen_later_are_synchronised(tmp_path, include_frozen):
    ranks = fit_fork(
        tmp_path, FreezesThenUnfreezes(), local_sgd(sync_every=3, include_frozen=include_frozen), max_steps=10
    )
    same = torch.equal(ranks[0]["state_dict"]["net.0.weight"], ranks[1]["state_dict"]["net.0.weight"])
    assert same is include_frozen  # with include_frozen=False the user promised it stays frozen
    torch.testing.assert_close(ranks[0]["state_dict"]["net.2.weight"], ranks[1]["state_dict"]["net.2.weight"])


def test_round_seconds_with_optimizer_state_averaging(tmp_path):
    """``round_seconds`` with ``average_optimizer_state=True`` used to crash at the first round
    (the optimizer-state weight was never set on the FedNova path). With a budget nobody exhausts,
    every replica takes all H steps, the normalised average is the plain mean and the optimizer
    statistics are averaged uniformly: the reference's numbers."""
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(optimizer="adam", lr=0.01),
        local_sgd(sync_every=4, round_seconds=600.0, average_optimizer_state=True),
        max_steps=8,
    )
    ref = reference_local_sgd(2, 8, lf.Periodic(4), optimizer="adam", lr=0.01, average_optimizer_state=True)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
