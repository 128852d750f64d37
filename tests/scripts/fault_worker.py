"""One rank of a job that loses a replica: run by tests/multiprocess/test_failures.py (Lightning's
launcher or torchrun).

Environment:
  FT_OUT: output folder (``rank<r>.json`` at the end, ``events.jsonl`` for the injection times)
  FT_STRATEGY: local_sgd | diloco | noloco | gossip;  FT_NODES: ranks, one process each ("nodes":
  started one by one with NODE_RANK/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, as on separate machines)
  FT_MODE: none | kill | stop | sigterm | slow;  FT_VICTIM: the rank;  FT_AT: after this step
  FT_STEPS: max_steps;  FT_TIMEOUT: sync_timeout;  FT_ELASTIC: "1" for elastic=True
  FT_RESUME: a ckpt_path for fit;  FT_SLEEP: seconds of the "slow" replica's pause
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from typing import Any

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning_fedopt as lf
from tests.modules import KnownBatchModule

OUT = os.environ.get("FT_OUT", ".")
MODE = os.environ.get("FT_MODE", "none")
VICTIM = int(os.environ.get("FT_VICTIM", "-1"))
AT = int(os.environ.get("FT_AT", "6"))
ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def _event(**kw: Any) -> None:
    with open(os.path.join(OUT, "events.jsonl"), "a") as f:
        f.write(json.dumps({**kw, "time": time.time()}) + "\n")


class Inject(L.Callback):
    """At the end of step ``FT_AT`` on rank ``FT_VICTIM`` (first attempt only): the failure."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.global_rank != VICTIM or trainer.global_step != AT or ATTEMPT != "0" or MODE == "none":
            return
        _event(mode=MODE, rank=VICTIM, pid=os.getpid(), step=AT)
        if MODE == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif MODE == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif MODE == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif MODE == "slow":
            time.sleep(float(os.environ.get("FT_SLEEP", "8")))


def _strategy() -> Any:
    kw: dict[str, Any] = {
        "sync_timeout": float(os.environ.get("FT_TIMEOUT", "5")),
        "elastic": os.environ.get("FT_ELASTIC") == "1",
    }
    name = os.environ.get("FT_STRATEGY", "local_sgd")
    if name == "local_sgd":
        return lf.LocalSGDStrategy(sync_every=4, **kw)
    if name == "diloco":
        return lf.DiLoCoStrategy(sync_every=4, **kw)
    if name == "noloco":
        return lf.NoLoCoStrategy(sync_every=4, **kw)
    if name == "gossip":
        return lf.GossipStrategy(gossip_every=4, **kw)
    raise ValueError(name)


def _digest(model: torch.nn.Module) -> str:
    return hashlib.sha256(
        b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())
    ).hexdigest()


def main() -> None:
    torch.manual_seed(0)
    model = KnownBatchModule(lr=0.05)
    elastic = "TORCHELASTIC_RUN_ID" in os.environ
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if elastic else 1,
        num_nodes=lf.elastic.num_nodes() if elastic else int(os.environ.get("FT_NODES", "3")),
        strategy=_strategy(),
        max_steps=int(os.environ.get("FT_STEPS", "16")),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[Inject()],
        default_root_dir=OUT,
    )
    result: dict[str, Any] = {"attempt": ATTEMPT}
    try:
        trainer.fit(model, ckpt_path=os.environ.get("FT_RESUME") or None)
        result.update(ok=True)
    except BaseException as exc:  # recorded, then raised: the exit status is part of the test
        result.update(ok=False, type=type(exc).__name__, message=str(exc), time=time.time())
        if isinstance(exc, lf.ReplicaLostError):
            result.update(lost=exc.ranks)
        raise
    finally:
        result.update(step=trainer.global_step, world_size=trainer.world_size, digest=_digest(model))
        with open(os.path.join(OUT, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
