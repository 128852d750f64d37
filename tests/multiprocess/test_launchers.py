"""The strategies under every launcher a user meets: the script launcher, spawn, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from runners import load_ranks

import lightning_fedopt as lf

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_unmodified_module_with_registered_name(tmp_path):
    """BoringModel + Trainer(strategy="local_sgd", devices=2): two real processes from the script
    launcher, different seeds per rank, identical final weights on every rank."""
    _run(["tests/scripts/user_module.py", str(tmp_path)])
    ranks = load_ranks(tmp_path, 2)
    assert all(r["strategy"] == "LocalSGDStrategy" for r in ranks)
    assert ranks[0]["replica_step"] == 21 and ranks[0]["sync_count"] == 21 // 8 + 1
    torch.testing.assert_close(ranks[0]["state_dict"], ranks[1]["state_dict"], rtol=0, atol=0)
    assert ranks[0]["bytes"]["by_purpose"]["sync"]["bytes_sent"] > 0
    # trainer.validate after fit ran in the same processes (BoringModel logs no metric)
    assert ranks[0]["val"] == {} and ranks[1]["val"] == {}


def test_spawn_start_method(tmp_path):
    """Spawned workers (fresh interpreters, so Python's str hashes differ between ranks) with Adam
    and optimizer-state averaging, against the single-process reference."""
    from modules import KnownBatchModule
    from references import reference_local_sgd
    from runners import SaveFinal, assert_close_state

    strategy = lf.LocalSGDStrategy(sync_every=4, average_optimizer_state=True, start_method="spawn")
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveFinal(tmp_path)],
    )
    model = KnownBatchModule(optimizer="adam", lr=0.01)
    trainer.fit(model)
    ranks = load_ranks(tmp_path, 2)
    assert ranks[0]["replica_step"] == 10
    ref = reference_local_sgd(2, 10, lf.Periodic(4), optimizer="adam", lr=0.01, average_optimizer_state=True)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r])
    # spawn hands rank 0's final (consensus) weights back to the main process
    torch.testing.assert_close(dict(model.state_dict()), ranks[0]["state_dict"])


def test_cli_example_with_strategy_arguments(tmp_path):
    """examples/digits.py through LightningCLI, choosing the strategy and its arguments on the command line."""
    common = [
        "fit",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.max_steps=24",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.limit_val_batches=1",
    ]
    _run(["examples/digits.py", *common, "--trainer.strategy=fedavg"])
    proc = _run(
        [
            "examples/digits.py",
            *common,
            "--trainer.strategy=lightning_fedopt.LocalSGDStrategy",
            "--trainer.strategy.sync_every=4",
            "--trainer.strategy.warmup_steps=2",
            "--trainer.use_distributed_sampler=false",
            "--data.alpha=0.5",
        ]
    )
    assert "Traceback" not in proc.stderr


def test_evaluation_after_fit_in_the_same_processes(tmp_path):
    """After fit (final sync off, replicas differ) trainer.validate runs on the consensus and leaves
    each replica's weights alone; validating two checkpoints in turn evaluates each one. At exit
    the strategy has destroyed the gloo group on every rank (an alive one can abort the exit)."""
    from modules import make_batch

    _run(["tests/scripts/eval_after_fit.py", str(tmp_path)])
    assert [(tmp_path / f"exit{r}.txt").read_text() for r in range(2)] == ["False", "False"]
    ranks = [torch.load(tmp_path / f"eval{r}.pt", weights_only=False) for r in range(2)]

    def loss(state):
        net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
        with torch.no_grad():
            return float(
                sum(torch.nn.functional.mse_loss(net(x), y) for x, y in (make_batch(99, i) for i in range(2)))
                / 2
            )

    a, b = (
        torch.load(tmp_path / "ckpt" / f"step={s}.ckpt", weights_only=False)["state_dict"] for s in (3, 6)
    )
    consensus = {k: (ranks[0]["local_before"][k] + ranks[1]["local_before"][k]) / 2 for k in a}
    assert not torch.equal(ranks[0]["local_before"]["net.0.weight"], ranks[1]["local_before"]["net.0.weight"])
    for rank in ranks:
        torch.testing.assert_close(rank["local_after"], rank["local_before"], rtol=0, atol=0)
        assert rank["after_fit"] == pytest.approx(loss(consensus), rel=1e-5)
        assert rank["a"] == pytest.approx(loss(a), rel=1e-5)
        assert rank["b"] == pytest.approx(loss(b), rel=1e-5)
    assert loss(a) != pytest.approx(loss(b), rel=1e-3)
