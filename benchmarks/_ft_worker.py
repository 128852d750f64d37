"""One replica group of a fault-tolerant run (:mod:`benchmarks.faults` ``--ft``): the digits task (or,
with ``--task lm``, the language model) under ``DiLoCoStrategy(fault_tolerance="torchft")``, started
and restarted by the library's launcher::

    python -m lightning_fedopt.fault_tolerance.launch --groups 3 --lighthouse-port 0 ... \\
        -- python benchmarks/_ft_worker.py --dir DIR --groups 3 --steps 600 [--task lm]

Each group is its own Lightning world (``Trainer(devices=1)``, :func:`benchmarks._worker.digits_trainer`)
that trains the task of the torchrun rows (:func:`benchmarks._elastic_worker.make_task`) on its own
shard of the training data, the one of its ``REPLICA_GROUP_ID`` among ``--groups`` (the shard a
torchrun rank of the same index gets in the other rows: same batch size, same per-step work):

* ``digits`` (default): the benchmarks' digits MLP (``examples.digits``, batch 32, AdamW 1e-3), the
  ``DistributedSampler`` slice of the group's index;
* ``lm``: the byte-level GPT of ``examples/lm.py`` at ``benchmarks/lm.py``'s size (d_model 64, 2
  layers, 2 heads, seq_len 128; AdamW lr 2e-3, 64 warm-up steps then a cosine, gradient clipping at
  1; batch 8), on the group's block of packages of ``examples.lm_data.StdlibText``
  (``replica_shares(train, --groups)[REPLICA_GROUP_ID]``); validation loss in nats per byte and
  bits per byte.

The strategy is the ``diloco`` row of the fault benchmark (H=32, outer Nesterov lr 0.5 momentum
0.5) with ``fault_tolerance="torchft"`` instead of ``elastic=True``. A restarted group heals the
global weights, the outer optimizer's state and the step count from a live peer; its inner
optimizer state, its learning-rate schedule (``lm``: the warm-up again) and its data order start
afresh.

Outputs under ``DIR``, keyed by the group (``<g>``) and appended by every life of it
(``LIGHTNING_FEDOPT_FT_RESTARTS`` is the life):

* ``events/group<g>.jsonl``: ``exec`` (process start, from ``/proc``; the imports' end), ``fit_start``,
  one ``sync`` line per synchronisation (wall time, step, the step's seconds, the strategy's
  ``last_sync``: quorum size, contributors, healed, committed, quorum and sync seconds, round; and the
  cumulative bytes this life sent/received with purpose ``heal``), ``end`` and ``late`` (a restart
  that came after the run had finished: it exits at once);
* ``steps/group<g>.jsonl``: one line per optimizer step (wall time at its end, seconds, step, life);
* ``rows/group<g>.jsonl``: one line per validation (wall time, step, loss; ``lm``: bits per byte);
* ``progress/group<g>.json``: the last step, pid, life and whether this life has had a committed
  synchronisation yet (read by the chaos controller);
* ``results/group<g>.json``: at the end, the final validation loss on the whole validation set
  (``lm``: and bits per byte), SHA-256 of the final weights, bytes by purpose, the strategy's
  fault-tolerance totals;
* ``done``: written by the first group to finish (a group restarted after it exits at once instead
  of training a new run alone).
"""

from __future__ import annotations

import time

_T_IMPORT = time.time()  # before torch and Lightning: the imports are part of a restart's cost

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

GROUP = int(os.environ.get("REPLICA_GROUP_ID", "0"))
LIFE = int(os.environ.get("LIGHTNING_FEDOPT_FT_RESTARTS", "0"))


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="the job directory")
    p.add_argument("--groups", type=int, required=True, help="replica groups (data shards)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--sync-every", type=int, default=32, help="DiLoCo's H")
    p.add_argument("--sync-timeout", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds added to every step")
    from benchmarks.faults import add_task_args, task_defaults  # no torch, no Lightning

    add_task_args(p)  # --task and its model's and data's flags: the torchrun worker's
    return task_defaults(p.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    directory = Path(args.dir)
    from benchmarks._agents import process_start_time

    exec_time = process_start_time()
    if (directory / "done").exists():
        # the run finished while this group was down: there is no peer left to heal from, and a
        # group alone would train a whole new run from its initial weights
        _append(
            directory / "events" / f"group{GROUP}.jsonl",
            {"event": "late", "time": time.time(), "pid": os.getpid(), "life": LIFE, "exec_time": exec_time},
        )
        return

    import lightning as L
    from lightning.pytorch import Callback
    from typing_extensions import override

    import lightning_fedopt as lf
    from benchmarks._elastic_worker import final_metrics, make_task, task_trainer_kwargs, weights_sha256
    from benchmarks._worker import digits_trainer, one_thread

    events = directory / "events" / f"group{GROUP}.jsonl"

    def event(name: str, **extra: Any) -> None:
        _append(events, {"event": name, "time": time.time(), "pid": os.getpid(), "life": LIFE, **extra})

    event("exec", exec_time=exec_time, imported=time.time(), import_start=_T_IMPORT)
    if (directory / "done").exists():  # the run finished during the imports
        event("late", exec_time=exec_time, step=0)
        return

    def heal_bytes(strategy: Any) -> tuple[int, int]:
        c = strategy.comm_stats.purpose("heal")
        return int(c.bytes_sent), int(c.bytes_received)

    class Recorder(Callback):
        def __init__(self) -> None:
            self.seen = 0
            self.trained = False
            self.tb = 0.0
            self.steps = open(directory / "steps" / f"group{GROUP}.jsonl", "a", buffering=1)
            self.progress = directory / "progress" / f"group{GROUP}.json"

        def _progress(self, step: int) -> None:
            tmp = self.progress.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "step": step,
                        "pid": os.getpid(),
                        "life": LIFE,
                        "trained": self.trained,
                        "time": time.time(),
                    }
                )
            )
            os.replace(tmp, self.progress)

        @override
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            s: Any = trainer.strategy
            # the join round ran in setup: a late or restarted group has healed there
            self.seen = s.sync_count
            sent, recv = heal_bytes(s)
            committed = bool(s.last_sync.get("committed", 0.0))
            self.trained = committed
            event(
                "fit_start",
                step=int(trainer.global_step),
                join=dict(s.last_sync),
                heal_sent=sent,
                heal_recv=recv,
            )
            self._progress(int(trainer.global_step))

        @override
        def on_train_batch_start(
            self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            self.tb = time.perf_counter()

        @override
        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if args.step_sleep:  # the rest of a heavier step (a GPU's), as in the torchrun rows
                time.sleep(args.step_sleep)
            now = time.time()
            seconds = time.perf_counter() - self.tb
            s: Any = trainer.strategy
            step = int(trainer.global_step)
            synced = s.sync_count != self.seen
            self.steps.write(
                json.dumps({"time": now, "step": step, "seconds": seconds, "life": LIFE, "sync": int(synced)})
                + "\n"
            )
            if (directory / "done").exists() and step < args.steps:
                # the others finished while this group was joining (it found no peer to heal from
                # and started a run of its own): the run is over, leave instead of training alone
                event("late", step=step)
                os._exit(0)
            if synced:
                self.seen = s.sync_count
                info = s.last_sync
                self.trained = self.trained or bool(info.get("committed", 0.0))
                sent, recv = heal_bytes(s)
                event(
                    "sync",
                    **{**info, "step": step, "step_seconds": seconds, "heal_sent": sent, "heal_recv": recv},
                )
            self._progress(step)

        @override
        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
                return
            _append(
                directory / "rows" / f"group{GROUP}.jsonl",
                {
                    "time": time.time(),
                    "step": int(trainer.global_step),
                    "group": GROUP,
                    "life": LIFE,
                    "val_loss": float(trainer.callback_metrics["val_loss"]),
                    **(
                        {"val_bpb": float(trainer.callback_metrics["val_bpb"])}
                        if "val_bpb" in trainer.callback_metrics
                        else {}
                    ),
                },
            )

    for sub in ("steps", "progress", "rows", "results"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    one_thread()
    L.seed_everything(args.seed, workers=True, verbose=False)
    strategy = lf.DiLoCoStrategy(
        sync_every=args.sync_every,
        outer_kwargs={"lr": 0.5, "momentum": 0.5, "nesterov": True},  # the benchmarks' diloco row
        fault_tolerance="torchft",
        sync_timeout=args.sync_timeout,
    )
    recorder = Recorder()
    trainer = digits_trainer(
        strategy=strategy,
        devices=1,
        steps=args.steps,
        val_every=args.val_every,
        callbacks=[recorder],
        root=str(directory / "root" / f"group{GROUP}"),
        **task_trainer_kwargs(args.task),
    )
    # the task's model, and its data: this group's shard among the groups
    model, data = make_task(args, shard=(GROUP, args.groups))
    t0 = time.time()
    trainer.fit(model, data)
    end = time.time()
    (directory / "done").touch()
    data.setup("validate")
    stats = strategy.comm_stats
    result = {
        "group": GROUP,
        "task": args.task,
        "life": LIFE,
        "pid": os.getpid(),
        "steps": int(trainer.global_step),
        "syncs": int(strategy.sync_count),
        **final_metrics(model, data),
        "sha256": weights_sha256(model),
        "bytes_by_purpose": {k: int(v.bytes_sent) for k, v in stats.by_purpose.items()},
        "heal_sent": heal_bytes(strategy)[0],
        "heal_recv": heal_bytes(strategy)[1],
        "ft_stats": strategy.fault_tolerance_stats,
        "fit_seconds": end - t0,
        "time": end,
    }
    (directory / "results" / f"group{GROUP}.json").write_text(json.dumps(result))
    event("end", step=int(trainer.global_step), syncs=int(strategy.sync_count))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages
    main()
