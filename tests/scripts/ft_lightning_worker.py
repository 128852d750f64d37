"""One replica group of a fault-tolerant DiLoCo run: a Lightning Trainer on one process whose
strategy is ``DiLoCoStrategy(fault_tolerance="torchft")`` (``FTL_STRATEGY``: ``local_sgd``, ``co2``, or
``streaming``: 2 fragments, ``sync_delay=1``, mixing 0.5), started (and restarted) by
``python -m lightning_fedopt.fault_tolerance.launch``.

Environment: ``FTL_OUT`` (folder for the logs), ``FTL_STEPS``, ``FTL_H``, ``FTL_SLEEP`` (seconds
per step), ``FTL_KILL_GROUP``/``FTL_KILL_AT_STEP`` (that group SIGKILLs itself at that step, on
its first life only), ``FTL_PAUSE_GROUP``/``FTL_PAUSE_AT_STEP``/``FTL_PAUSE_SECONDS`` (that
group is stopped with SIGSTOP at that step and continued that many seconds later), plus the launcher's ``REPLICA_GROUP_ID`` and ``TORCHFT_LIGHTHOUSE``.
Each life appends JSON lines to ``<out>/group<g>.jsonl``; the final weights go to ``final<g>.pt``.

``FTL_DEVICES=2`` (run under ``torchrun --nproc-per-node 2``): the group is a Lightning world of two
processes (DDP inside it), each training on its own batches (by group and rank); ``FTL_KILL_RANK``
picks the one that kills itself; rank ``r > 0`` writes ``final<g>_r<r>.pt``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modules import KnownBatchModule, make_batch

import lightning_fedopt as lf

OUT = Path(os.environ["FTL_OUT"])
GROUP = int(os.environ["REPLICA_GROUP_ID"])
LIFE = int(os.environ.get("LIGHTNING_FEDOPT_FT_RESTARTS", "0"))
DEVICES = int(os.environ.get("FTL_DEVICES", "1"))
RANK = int(os.environ.get("RANK", "0"))


def note(event: str, **data: Any) -> None:
    with open(OUT / f"group{GROUP}.jsonl", "a") as f:
        f.write(
            json.dumps(
                {"event": event, "pid": os.getpid(), "rank": RANK, "life": LIFE, "time": time.time(), **data}
            )
            + "\n"
        )


class GroupModule(KnownBatchModule):
    """Each replica group trains on its own batches (by its group id; and rank, in a group of several)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = make_batch(GROUP + 100 * RANK, self.global_step)
        return nn.functional.mse_loss(self.net(x), y)


class Recorder(L.Callback):
    def __init__(self, kill_at: int | None, sleep: float, pause_at: int | None = None) -> None:
        self.kill_at, self.sleep, self.seen, self.pause_at = kill_at, sleep, 0, pause_at

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        s = trainer.strategy
        if s.sync_count != self.seen:
            self.seen = s.sync_count
            note("sync", **s.last_sync)
        # at the first step at or after the one named (a group that started late may heal past it)
        if self.kill_at is not None and s.replica_step >= self.kill_at:
            note("killed", step=s.replica_step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.pause_at is not None and s.replica_step >= self.pause_at:
            self.pause_at = None  # once
            # kill -STOP, and a kill -CONT from another process after FTL_PAUSE_SECONDS
            seconds = float(os.environ["FTL_PAUSE_SECONDS"])
            subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -CONT {os.getpid()}"])
            note("stopped", step=s.replica_step)
            os.kill(os.getpid(), signal.SIGSTOP)
            note("continued", step=s.replica_step)
        time.sleep(self.sleep)


def main() -> None:
    note("start", step=0)
    kill_at = (
        int(os.environ["FTL_KILL_AT_STEP"])
        if os.environ.get("FTL_KILL_GROUP") == str(GROUP)
        and LIFE == 0
        and int(os.environ.get("FTL_KILL_RANK", str(RANK))) == RANK
        else None
    )
    pause_at = (
        int(os.environ["FTL_PAUSE_AT_STEP"]) if os.environ.get("FTL_PAUSE_GROUP") == str(GROUP) else None
    )
    algorithm = {
        "diloco": lf.DiLoCoStrategy,
        "local_sgd": lf.LocalSGDStrategy,
        "co2": lf.CO2Strategy,
        "streaming": lambda sync_every, **kw: lf.DiLoCoStrategy(
            sync_every, fragments=2, sync_delay=1, mixing=0.5, **kw
        ),
    }[os.environ.get("FTL_STRATEGY", "diloco")]
    strategy = algorithm(sync_every=int(os.environ["FTL_H"]), fault_tolerance="torchft", sync_timeout=20.0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=DEVICES,
        strategy=strategy,
        max_steps=int(os.environ["FTL_STEPS"]),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(OUT / f"root{GROUP}"),
        callbacks=[Recorder(kill_at, float(os.environ["FTL_SLEEP"]), pause_at)],
    )
    model = GroupModule(seed=GROUP)  # different initial weights: the first quorum makes them one
    trainer.fit(model)
    final = OUT / (f"final{GROUP}.pt" if RANK == 0 else f"final{GROUP}_r{RANK}.pt")
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, final)
    note("end", step=strategy.replica_step, syncs=strategy.sync_count, global_step=trainer.global_step)


if __name__ == "__main__":
    main()
