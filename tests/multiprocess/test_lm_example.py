"""examples/lm.py: the byte-level language model on the standard library's source.

The example itself, run from the command line (the script launcher, 2 real gloo ranks) under two
strategies (the data split and the model, checked in one process: tests/unit/test_lm_example.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# the example, from the command line, on 2 real ranks


class RecordRun(L.Callback):
    """Passed on the example's command line: writes each rank's training losses, validation
    results, data files and final weights to ``<out>/rank<r>.pt``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.losses: list[float] = []
        self.val: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_validation_end(self, trainer, pl_module):  # the sanity check: the initial weights
        step = -1 if trainer.sanity_checking else trainer.global_step
        m = trainer.callback_metrics
        self.val.append((step, float(m["val_loss"]), float(m["val_bpb"])))

    def teardown(self, trainer, pl_module, stage):  # after fit, and after the validation that follows
        stats = getattr(trainer.strategy, "comm_stats", None)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "losses": self.losses,
                "val": self.val,
                "train_files": trainer.datamodule.train_files,
                "val_files": trainer.datamodule.val_files,
                "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                "bytes_sent": stats.bytes_sent if stats is not None else None,
                "global_step": trainer.global_step,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def _run_example(out: Path, strategy_args: list[str]) -> subprocess.CompletedProcess:
    here = str(Path(__file__).resolve().parent)  # for --trainer.callbacks+=test_lm_example.RecordRun
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), here, os.environ.get("PYTHONPATH", "")]))
    for var in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(var, None)
    args = [
        "examples/lm.py",
        "fit",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.max_steps=24",
        "--trainer.val_check_interval=12",
        "--trainer.limit_val_batches=4",
        "--trainer.num_sanity_val_steps=4",  # validate the initial weights on the same 4 batches
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={out}",
        "--trainer.callbacks+=test_lm_example.RecordRun",
        f"--trainer.callbacks.out={out}",
        "--model.d_model=48",
        "--model.n_layers=1",
        "--model.n_heads=2",
        "--model.seq_len=64",
        "--model.lr=3e-3",
        "--model.warmup_steps=4",
        "--data.batch_size=16",
        "--data.max_bytes=1000000",
        "--data.val_bytes=65536",
        *strategy_args,
    ]
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "strategy_args",
    [
        ["--trainer.strategy=lightning_fedopt.LocalSGDStrategy", "--trainer.strategy.sync_every=5"],
        ["--trainer.strategy=lightning_fedopt.DiLoCoStrategy", "--trainer.strategy.sync_every=5"],
    ],
    ids=["local_sgd", "diloco"],
)
def test_example_trains_on_two_ranks_and_ends_in_consensus(tmp_path, strategy_args):
    proc = _run_example(tmp_path, strategy_args)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert "parameters=" in proc.stdout and "val_bpb=" in proc.stdout
    for rank in ranks:
        assert rank["global_step"] == 24 and len(rank["losses"]) == 24
        first, last = sum(rank["losses"][:3]) / 3, sum(rank["losses"][-3:]) / 3
        assert first > math.log(256) - 0.3 and last < first - 0.5, rank["losses"]
        assert rank["bytes_sent"] > 0
        # validated before training (about 8 bits per byte: uniform) and at steps 12 and 24
        assert [v[0] for v in rank["val"]] == [-1, 12, 24]
        (_, before, bpb_before), _, (_, after, bpb_after) = rank["val"]
        assert bpb_before > 7.5 and after < before - 1.0 and bpb_after < 6.5, rank["val"]
        assert bpb_after == pytest.approx(after / math.log(2), rel=1e-5)
    # each replica trained on its own files, validated on the same ones, and they end in agreement
    assert not {f for f, _ in ranks[0]["train_files"]} & {f for f, _ in ranks[1]["train_files"]}
    assert ranks[0]["val_files"] == ranks[1]["val_files"]
    assert ranks[0]["val"] == ranks[1]["val"]
    torch.testing.assert_close(ranks[0]["state_dict"], ranks[1]["state_dict"], rtol=0, atol=0)
