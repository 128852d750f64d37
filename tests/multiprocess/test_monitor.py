"""CommunicationMonitor logs to real Lightning loggers (CSV, and wandb in offline mode)."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from modules import KnownBatchModule
from references import reference_local_sgd
from runners import TIMEOUT, KeepHistory, fit_fork

import lightning_fedopt as lf
from lightning_fedopt.callbacks import CommunicationMonitor


def _consensus_distance(replicas):
    keys = list(replicas[0])
    mean = {k: sum(r[k] for r in replicas) / len(replicas) for k in keys}
    norm = torch.sqrt(sum((mean[k].double() ** 2).sum() for k in keys))
    dists = [torch.sqrt(sum(((r[k].double() - mean[k].double()) ** 2).sum() for k in keys)) for r in replicas]
    return float(sum(dists) / len(dists) / norm)


def test_monitor_csv_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monitor = CommunicationMonitor()
    loggers = [
        CSVLogger(tmp_path / "csv", name="run"),
        WandbLogger(project="lightning_fedopt_test", save_dir=str(tmp_path / "wb"), offline=True),
    ]
    ranks = fit_fork(
        tmp_path / "out",
        KnownBatchModule(),
        lf.LocalSGDStrategy(sync_every=4, start_method="fork", timeout=TIMEOUT),
        callbacks=[monitor, KeepHistory(monitor, tmp_path / "hist")],
        max_steps=12,
        logger=loggers,
    )
    hist = [torch.load(tmp_path / "hist" / f"hist{r}.pt", weights_only=False) for r in range(2)]

    # one row per sync (steps 4, 8, 12) and a final one after fit
    rows = hist[0]["history"]
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 12]
    assert [int(r["comm/sync_count"]) for r in rows] == [1, 2, 3, 3]
    sent = [r["comm/bytes_sent"] for r in rows]
    assert sent == sorted(sent) and sent[-1] == ranks[0]["comm"]["total"]["bytes_sent"]
    # consensus distance at step 4 equals the reference replicas' distance just before averaging
    before = reference_local_sgd(2, 4, lf.Periodic(100), final_average=False)
    assert rows[0]["comm/consensus_distance"] == pytest.approx(_consensus_distance(before), rel=1e-4)
    assert rows[0]["comm/consensus_distance"] > 0
    # both ranks measured the same (it is a collective)
    assert hist[1]["history"][0]["comm/consensus_distance"] == pytest.approx(
        rows[0]["comm/consensus_distance"]
    )

    # CSV logger: the columns are there, with the same numbers
    files = list((tmp_path / "csv").rglob("metrics.csv"))
    assert len(files) == 1
    with open(files[0]) as f:
        table = [r for r in csv.DictReader(f) if r.get("comm/bytes_sent")]
    assert [int(r["step"]) for r in table] == [4, 8, 12, 12]
    assert float(table[-1]["comm/bytes_sent"]) == sent[-1]
    assert float(table[0]["comm/consensus_distance"]) == pytest.approx(rows[0]["comm/consensus_distance"])

    # wandb (offline): the run received the metrics and wrote them to its local run file
    summary = hist[0]["summary"]
    assert summary["comm/bytes_sent"] == sent[-1] and summary["comm/sync_count"] == 3
    run_files = list((tmp_path / "wb").rglob("*.wandb"))
    assert run_files and b"comm/consensus_distance" in run_files[0].read_bytes()


def test_monitor_on_metered_ddp_logs_every_n_steps(tmp_path):
    monitor = CommunicationMonitor(log_every_n_steps=5)
    fit_fork(
        tmp_path / "out",
        KnownBatchModule(),
        lf.MeteredDDPStrategy(start_method="fork", timeout=TIMEOUT),
        callbacks=[monitor, KeepHistory(monitor, tmp_path / "hist")],
        max_steps=10,
    )
    rows = torch.load(tmp_path / "hist" / "hist0.pt", weights_only=False)["history"]
    assert [int(r["step"]) for r in rows] == [5, 10, 10]
    assert "comm/consensus_distance" not in rows[0]
    assert rows[1]["comm/sync_bytes_sent"] == 2 * rows[0]["comm/sync_bytes_sent"] > 0
