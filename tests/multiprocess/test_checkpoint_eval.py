"""Checkpoints carry every replica and resume exactly; evaluation runs on the consensus model."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from modules import KnownBatchModule, make_batch
from references import reference_local_sgd
from runners import TIMEOUT, SaveFinal, assert_close_state, fit_fork, load_ranks, trainer_kwargs

import lightning_fedopt as lf
from lightning_fedopt.strategies.replica import replica_shard_path


def local_sgd(**kw):
    return lf.LocalSGDStrategy(start_method="fork", timeout=TIMEOUT, **kw)


def adam_module():
    return KnownBatchModule(optimizer="adam", lr=0.01)


def test_resume_mid_round_is_exact(tmp_path):
    """14 uninterrupted steps == 6 steps, checkpoint (mid-round: H=4), resume to 14 — bit for bit,
    per replica (Adam state included), with the final sync off so the replicas can be compared."""
    full = fit_fork(tmp_path / "full", adam_module(), local_sgd(sync_every=4, final_sync=False), max_steps=14)

    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1, filename="mid")
    fit_fork(
        tmp_path / "first",
        adam_module(),
        local_sgd(sync_every=4, final_sync=False),
        max_steps=6,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    path = ckpt_dir / "mid.ckpt"
    assert path.exists()
    for r in range(2):
        assert (ckpt_dir / "mid.ckpt.replicas" / f"rank{r}.pt").exists()

    trainer = L.Trainer(
        strategy=local_sgd(sync_every=4, final_sync=False),
        callbacks=[SaveFinal(tmp_path / "resumed")],
        **trainer_kwargs(max_steps=14),
    )
    trainer.fit(adam_module(), ckpt_path=str(path))
    resumed = load_ranks(tmp_path / "resumed", 2)
    for r in range(2):
        assert_close_state(resumed[r]["state_dict"], full[r]["state_dict"], atol=0.0)
        assert resumed[r]["replica_step"] == 14 and resumed[r]["sync_count"] == full[r]["sync_count"] == 3
        # the byte counters continue across the resume (the resumed run adds one consensus for the
        # checkpoint, nothing else)
        assert resumed[r]["comm"]["by_purpose"]["sync"] == pytest.approx(
            {
                **full[r]["comm"]["by_purpose"]["sync"],
                "seconds": resumed[r]["comm"]["by_purpose"]["sync"]["seconds"],
            }
        )
    assert not torch.equal(full[0]["state_dict"]["net.0.weight"], full[1]["state_dict"]["net.0.weight"])


def checkpoint_at_step_6(tmp_path):
    """Two replicas, H=4, a checkpoint at step 6 (mid-round) in ``tmp_path/ckpt/c.ckpt``; training
    goes on to step 7 (at the last step every replica takes the consensus before checkpoints)."""
    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1, filename="c")
    fit_fork(
        tmp_path / "run",
        KnownBatchModule(),
        local_sgd(sync_every=4),
        max_steps=7,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    return ckpt_dir


def test_checkpoint_state_dict_is_the_consensus(tmp_path):
    ckpt_dir = checkpoint_at_step_6(tmp_path)
    checkpoint = torch.load(ckpt_dir / "c.ckpt", weights_only=False)
    shards = [torch.load(replica_shard_path(ckpt_dir / "c.ckpt", r), weights_only=False) for r in range(2)]
    ref = reference_local_sgd(2, 6, lf.Periodic(4), final_average=False)
    for r in range(2):
        assert_close_state(shards[r]["module"], ref[r])
    consensus = {k: (ref[0][k] + ref[1][k]) / 2 for k in ref[0]}
    assert_close_state(checkpoint["state_dict"], consensus)
    # plain PyTorch / Lightning can load it
    plain = KnownBatchModule()
    plain.load_state_dict(checkpoint["state_dict"])
    meta = checkpoint["lightning_fedopt"]
    assert (
        meta["world_size"] == 2
        and meta["counters"]["replica_step"] == 6
        and meta["strategy"] == "LocalSGDStrategy"
    )


def test_resume_with_other_world_size_starts_from_consensus(tmp_path, caplog):
    ckpt_dir = checkpoint_at_step_6(tmp_path)
    checkpoint = torch.load(ckpt_dir / "c.ckpt", weights_only=False)
    trainer = L.Trainer(
        strategy=local_sgd(sync_every=4),
        callbacks=[SaveFinal(tmp_path / "three")],
        **trainer_kwargs(max_steps=6, devices=3),
    )
    trainer.fit(KnownBatchModule(), ckpt_path=str(ckpt_dir / "c.ckpt"))
    ranks = load_ranks(tmp_path / "three", 3)
    for r in range(3):
        assert_close_state(ranks[r]["state_dict"], checkpoint["state_dict"], atol=0.0)


def test_missing_shard_is_a_clear_error(tmp_path):
    ckpt_dir = checkpoint_at_step_6(tmp_path)
    (ckpt_dir / "c.ckpt.replicas" / "rank1.pt").unlink()
    trainer = L.Trainer(strategy=local_sgd(sync_every=4), **trainer_kwargs(max_steps=8))
    # every rank learns that rank 1's shard is missing and stops: none is left waiting in a collective
    # until the process-group timeout (TIMEOUT = 120 s)
    start = time.monotonic()
    with pytest.raises(Exception, match=r"shard\(s\) of rank\(s\) \[1\] .* missing"):
        trainer.fit(KnownBatchModule(), ckpt_path=str(ckpt_dir / "c.ckpt"))
    assert time.monotonic() - start < 60


def _val_loss(state: dict[str, torch.Tensor], batches: int = 2) -> float:
    module = KnownBatchModule()
    module.load_state_dict(state)
    with torch.no_grad():
        losses = [
            torch.nn.functional.mse_loss(module.net(x), y)
            for x, y in (make_batch(99, i) for i in range(batches))
        ]
    return float(sum(losses) / len(losses))


@pytest.mark.parametrize("evaluate", ["consensus", "local"])
def test_validation_runs_on_consensus_and_restores_replicas(tmp_path, evaluate):
    """Validation at step 6 (mid-round) sees the consensus (or each local replica); afterwards every
    replica continues from its own weights, so the run equals the reference without validation."""
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        local_sgd(sync_every=4, final_sync=False, evaluate=evaluate),
        max_steps=6,
        limit_val_batches=2,
        val_check_interval=6,
        check_val_every_n_epoch=None,
    )
    ref = reference_local_sgd(2, 6, lf.Periodic(4), final_average=False)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r])
    if evaluate == "consensus":
        expected = _val_loss({k: (ref[0][k] + ref[1][k]) / 2 for k in ref[0]})
    else:
        expected = (_val_loss(ref[0]) + _val_loss(ref[1])) / 2
    for r in range(2):
        assert ranks[r]["callback_metrics"]["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_top_k_rotation_removes_replica_shards(tmp_path):
    """ModelCheckpoint keeping only the newest checkpoint also removes the older replica shards."""
    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=1, filename="{step}")
    fit_fork(
        tmp_path / "run",
        KnownBatchModule(),
        local_sgd(sync_every=4),
        max_steps=9,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["step=9.ckpt", "step=9.ckpt.replicas"], names
    assert sorted(p.name for p in (ckpt_dir / "step=9.ckpt.replicas").iterdir()) == ["rank0.pt", "rank1.pt"]
