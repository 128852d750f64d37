"""The worker ``torchrun`` starts in a fault-tolerance run (:mod:`benchmarks.faults`, :mod:`benchmarks._agents`).

One process per node: it trains the benchmarks' digits MLP (``examples.digits``: scikit-learn's
bundled digits, nothing downloaded) or, with ``--task lm``, the byte-level GPT of ``examples/lm.py``
at the size of ``benchmarks/lm.py`` (``examples.lm_data.StdlibText``: the standard library's source,
one block of packages per rank) with one strategy on ``WORLD_SIZE`` nodes of one CPU device each,
whatever size the rendezvous formed, and records what the fault benchmark measures::

    python -m torch.distributed.run ... benchmarks/_elastic_worker.py --strategy local_sgd --dir DIR

The task (:func:`make_task`; its flags: :func:`benchmarks.faults.add_task_args`) is shared with
:mod:`benchmarks._ft_worker`.

Strategies (``--strategy``):

* ``ddp``: Lightning's ``DDPStrategy`` (gloo) with ``ModelCheckpoint(save_last=True,
  every_n_train_steps=--ckpt-every)`` and ``fit(ckpt_path="last")``: a restarted worker resumes from
  the last checkpoint (the baseline).
* ``local_sgd``, ``diloco``, ``noloco``, ``gossip``: the library's strategy with
  ``sync_timeout=--sync-timeout`` and, with ``--elastic`` (the default where the library has it),
  ``elastic=True``: the strategy checkpoints at every synchronisation into
  ``<DIR>/root/elastic/<TORCHELASTIC_RUN_ID>/`` and resumes from the latest on a restart.

Outputs, all under ``DIR`` and keyed by the *agent* index (``FEDOPT_AGENT_INDEX``; ranks change
across restarts):

* ``progress/agent<i>.json``: the last completed global step (:func:`benchmarks._agents.write_progress`);
* ``events/agent<i>.jsonl``: one line per incarnation at ``on_train_start`` (``event="start"``, the
  step it resumes from) and at its first completed step (``event="first_step"``);
* ``rows/agent<i>.jsonl``: one line per validation (wall time ``time.time()``, step, world size,
  rank, restart count, validation loss of the consensus model; ``lm``: and its bits per byte);
* ``results/agent<i>.json``: at the end, the final validation loss of this rank's model (after the
  final synchronisation: the consensus; ``lm``: nats per token, and bits per byte), steps, SHA-256
  of the final weights, world size, restart count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

import lightning_fedopt as lf
from benchmarks._agents import ENV_AGENT, process_start_time, write_progress
from benchmarks._worker import digits_trainer, one_thread
from benchmarks.faults import TASKS, add_task_args, task_defaults
from examples.digits import DigitsClassifier, DigitsDataModule
from examples.lm_data import StdlibText

__all__ = [
    "STRATEGIES",
    "FaultRecorder",
    "ShardedDigits",
    "final_metrics",
    "main",
    "make_strategy",
    "make_task",
    "supports_elastic",
    "task_trainer_kwargs",
    "weights_sha256",
]

#: the strategies a fault run compares; ``ddp`` is Lightning's own, restarted from ``last.ckpt``
STRATEGIES = ("ddp", "local_sgd", "diloco", "noloco", "gossip")


class ShardedDigits(DigitsDataModule):
    """The digits data, training on the ``DistributedSampler`` slice ``index`` of ``count``
    (Lightning's sampler settings: the slice a rank of that index gets in a world of ``count``).

    Args:
        shard: ``(index, count)``.
        kwargs: :class:`~examples.digits.DigitsDataModule`'s.
    """

    def __init__(self, shard: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shard = shard

    @override
    def train_dataloader(self) -> DataLoader:
        index, count = self.shard
        sampler: DistributedSampler[Any] = DistributedSampler(
            self.train_set, num_replicas=count, rank=index, shuffle=True, seed=self.seed
        )
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)


def make_task(
    args: argparse.Namespace, shard: tuple[int, int] | None = None
) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The model and the data of ``args.task`` (after seeding: the model's initialisation draws).

    ``shard``: ``(index, count)``: train on that shard of the training data (a replica group of the
    fault-tolerant rows, its own Lightning world of one process); ``None``: the data module's own
    split by Lightning's rank and world size (the torchrun rows: Lightning's ``DistributedSampler``
    for digits, a block of packages per rank for ``lm``)."""
    model: L.LightningModule
    data: L.LightningDataModule
    if args.task == "digits":
        model = DigitsClassifier(hidden=args.hidden, lr=args.lr)
        kw: dict[str, Any] = {"batch_size": args.batch_size, "seed": args.seed}
        data = DigitsDataModule(**kw) if shard is None else ShardedDigits(shard, **kw)
        return model, data
    if args.task != "lm":
        raise ValueError(f"unknown task {args.task!r}; one of {TASKS}")
    from examples.lm import LanguageModel

    model = LanguageModel(
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup,
    )
    kw = {
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "max_bytes": args.max_bytes,
        "val_bytes": args.val_bytes,
    }
    data = StdlibText(**kw, share=shard)
    return model, data


def task_trainer_kwargs(task: str) -> dict[str, Any]:
    """The task's ``Trainer`` settings on top of :func:`benchmarks._worker.digits_trainer`'s
    (``lm``: gradient clipping at norm 1, as examples/lm.py and benchmarks/lm.py)."""
    return {"gradient_clip_val": 1.0} if task == "lm" else {}


def supports_elastic() -> bool:
    """Whether this ``lightning_fedopt`` has the elastic mode (``LocalSGDStrategy(elastic=True)``)."""
    try:
        lf.LocalSGDStrategy(elastic=True)
    except (TypeError, ValueError):
        return False
    return True


def make_strategy(args: argparse.Namespace) -> Any:
    """The strategy ``args.strategy`` (``sync_timeout``/``elastic`` for the library's ones)."""
    if args.strategy == "ddp":
        return "ddp"
    kwargs: dict[str, Any] = {"sync_timeout": args.sync_timeout}
    if args.elastic:
        kwargs["elastic"] = True
    h = args.sync_every
    if args.strategy == "local_sgd":
        return lf.LocalSGDStrategy(sync_every=h or 8, **kwargs)
    if args.strategy == "diloco":
        outer = {"lr": 0.5, "momentum": 0.5, "nesterov": True}  # the benchmarks' diloco row
        return lf.DiLoCoStrategy(sync_every=h or 32, outer_kwargs=outer, **kwargs)
    if args.strategy == "noloco":
        return lf.NoLoCoStrategy(sync_every=h or 32, **kwargs)
    if args.strategy == "gossip":
        return lf.GossipStrategy("ring", gossip_every=h or 4, **kwargs)
    raise ValueError(f"unknown strategy {args.strategy!r}; one of {STRATEGIES}")


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over the module's state dict (names and float32 bytes, in order)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


class FaultRecorder(Callback):
    """Progress after every step, an event per incarnation, a row per validation (see the module doc).

    Args:
        directory: the job directory.
    """

    def __init__(self, directory: str | Path, step_sleep: float = 0.0) -> None:
        self.dir = Path(directory)
        self.step_sleep = step_sleep
        self.agent = int(os.environ.get(ENV_AGENT, "0"))
        self.restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self._first = True

    def _event(self, trainer: L.Trainer, event: str, **extra: Any) -> None:
        _append(
            self.dir / "events" / f"agent{self.agent}.jsonl",
            {
                "event": event,
                "time": time.time(),
                "step": int(trainer.global_step),
                "agent": self.agent,
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "restart": self.restart,
                "pid": os.getpid(),
                **extra,
            },
        )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write_progress(trainer.global_step, phase="start")
        self._event(trainer, "start", exec_time=process_start_time())

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        write_progress(trainer.global_step)
        if self.step_sleep:  # a slower step (tests: time for a node to join while the job runs)
            time.sleep(self.step_sleep)
        if self._first:
            self._first = False
            self._event(trainer, "first_step")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        _append(
            self.dir / "rows" / f"agent{self.agent}.jsonl",
            {
                "time": time.time(),
                "step": int(trainer.global_step),
                "world_size": trainer.world_size,
                "restart": self.restart,
                "rank": trainer.global_rank,
                "agent": self.agent,
                "val_loss": float(trainer.callback_metrics["val_loss"]),
                **_bpb_row(trainer),
            },
        )


def _bpb_row(trainer: L.Trainer) -> dict[str, float]:
    """``{"val_bpb": ...}`` when the model logs bits per byte (``lm``), else nothing."""
    bpb = trainer.callback_metrics.get("val_bpb")
    return {} if bpb is None else {"val_bpb": float(bpb)}


@torch.no_grad()
def _val_loss(model: L.LightningModule, data: L.LightningDataModule) -> float:
    """Cross-entropy of ``model`` on the whole validation set (this process only, no collectives):
    per example (digits: ``(x, y)`` batches) or per predicted token (``lm``: windows of tokens)."""
    model.eval()
    total, n = 0.0, 0
    for batch in data.val_dataloader():
        if isinstance(batch, torch.Tensor):  # windows: predict tokens 1.. from 0..
            logits = model(batch[:, :-1])
            target = batch[:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), target.flatten(), reduction="sum"
                )
            )
            n += target.numel()
        else:
            x, y = batch
            total += float(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"))
            n += len(y)
    return total / n


def final_metrics(model: L.LightningModule, data: L.LightningDataModule) -> dict[str, float]:
    """``final_val_loss`` on the whole validation set (:func:`_val_loss`) and, for text, the bits
    per byte (``final_val_bpb``: nats per token / ln 2 / the data's bytes per token)."""
    loss = _val_loss(model, data)
    out = {"final_val_loss": loss}
    if isinstance(data, StdlibText):
        out["final_val_bpb"] = loss / (math.log(2) * data.bytes_per_token)
    return out


def _bytes_by_purpose(strategy: Any) -> dict[str, int]:
    """Bytes this incarnation sent, by purpose (empty for a strategy that counts nothing: ddp)."""
    stats = getattr(strategy, "comm_stats", None)
    if stats is None:
        return {}
    return {k: int(v.bytes_sent) for k, v in stats.by_purpose.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=STRATEGIES, required=True)
    p.add_argument("--dir", required=True, help="the job directory")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--val-every", type=int, default=40)
    p.add_argument("--ckpt-every", type=int, default=16, help="ddp: ModelCheckpoint every_n_train_steps")
    p.add_argument("--sync-every", type=int, default=0, help="H of the strategy (0: its default here)")
    p.add_argument("--sync-timeout", type=float, default=10.0)
    p.add_argument("--elastic", action=argparse.BooleanOptionalAction, default=None,
                   help="elastic=True for the library's strategies (default: if the library has it)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds added to every step (tests)")
    add_task_args(p)
    args = task_defaults(p.parse_args(argv))
    if args.elastic is None:
        args.elastic = args.strategy != "ddp" and supports_elastic()
    return args


def main(argv: list[str] | None = None) -> None:
    """Train once (this incarnation), resuming where the strategy or the checkpoint says."""
    args = parse_args(argv)
    one_thread()
    L.seed_everything(args.seed, workers=True, verbose=False)
    directory = Path(args.dir)
    root = directory / "root"
    callbacks: list[Callback] = [FaultRecorder(directory, args.step_sleep)]
    ddp = args.strategy == "ddp"
    if ddp:
        callbacks.append(
            ModelCheckpoint(
                dirpath=root / "checkpoints",
                save_last=True,
                save_top_k=0,
                every_n_train_steps=args.ckpt_every,
            )
        )
    t0 = time.time()
    # digits_trainer's settings (benchmarks._worker), with checkpointing on for the ddp baseline
    trainer = digits_trainer(
        strategy=make_strategy(args),
        devices=1,
        steps=args.steps,
        val_every=args.val_every,
        callbacks=callbacks,
        root=str(root),
        num_nodes=int(os.environ.get("WORLD_SIZE", "1")),
        enable_checkpointing=ddp,
        **task_trainer_kwargs(args.task),
    )
    model, data = make_task(args)
    trainer.fit(model, data, ckpt_path="last" if ddp else None)
    write_progress(trainer.global_step, phase="end")
    data.setup("validate")
    result = {
        "strategy": args.strategy,
        "task": args.task,
        "elastic": bool(args.elastic),
        "agent": int(os.environ.get(ENV_AGENT, "0")),
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "steps": int(trainer.global_step),
        **final_metrics(model, data),
        "sha256": weights_sha256(model),
        "bytes_by_purpose": _bytes_by_purpose(trainer.strategy),
        "seconds": time.time() - t0,
        "time": time.time(),
    }
    out = directory / "results" / f"agent{result['agent']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
