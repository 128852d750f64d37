"""Trust nothing that arrives (issue 12): no pickle from a peer or a shard runs, ranks configured
differently stop before the first step, shards prove which checkpoint and rank they belong to, and
a replica whose weights went NaN under compressed DDP is reset from a healthy one. Real processes
over gloo."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from modules import KnownBatchModule
from runners import TIMEOUT, fit_fork, trainer_kwargs
from trust_helpers import Payload

import lightning_fedopt as lf
from lightning_fedopt._plain import PlainValueError
from lightning_fedopt.comm import Communicator
from lightning_fedopt.runtime.handshake import AgreementError
from lightning_fedopt.runtime.shards import CHECKPOINT_KEY, replica_shard_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- a crafted peer
def _peer_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    comm = Communicator()
    marker = os.path.join(out, f"ran{rank}")
    res: dict[str, str] = {}
    # 1. rank 1 asks the library to send an object that is not plain: refused on every rank
    for name, call in (
        ("broadcast", lambda: comm.broadcast_object(Payload(marker) if rank == 1 else None, src=1)),
        ("gather", lambda: comm.all_gather_object(Payload(marker) if rank == 1 else 0)),
    ):
        try:
            call()
            res[name] = "accepted"
        except PlainValueError as err:
            res[name] = str(err)
    # 2. rank 1 puts a pickle on the wire itself, in the library's framing (length, then bytes)
    evil = pickle.dumps(Payload(marker))
    length = torch.tensor([len(evil)], dtype=torch.int64)
    try:
        if rank == 1:
            comm.broadcast([length], src=1)
            comm.broadcast([torch.frombuffer(bytearray(evil), dtype=torch.uint8)], src=1)
            res["raw"] = "sent"
        else:
            comm.broadcast_object(None, src=1)
            res["raw"] = "accepted"
    except PlainValueError as err:
        res["raw"] = str(err)
    # 3. what is plain still travels
    res["plain"] = repr(comm.all_gather_object({"rank": rank, "path": Path(f"/r{rank}")}))
    dist.barrier()
    dist.destroy_process_group()
    torch.save(res, os.path.join(out, f"res{rank}.pt"))


def test_a_crafted_object_from_a_peer_runs_no_code(tmp_path):
    """Rank 1 sends a pickle whose loading would create a file, through broadcast_object /
    all_gather_object and as raw bytes in their framing: every receiver refuses it, nothing ran."""
    mp = torch.multiprocessing.get_context("fork")
    port = _free_port()
    procs = [mp.Process(target=_peer_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    res = [torch.load(tmp_path / f"res{r}.pt") for r in range(2)]
    assert not list(tmp_path.glob("ran*"))
    for r in range(2):
        assert "cannot travel" in res[r]["broadcast"] and "cannot travel" in res[r]["gather"]
        assert res[r]["plain"] == repr([{"rank": 0, "path": Path("/r0")}, {"rank": 1, "path": Path("/r1")}])
    assert "not plain JSON" in res[0]["raw"] and res[1]["raw"] == "sent"


# ---------------------------------------------------------------------------- shards
def local_sgd(**kw: Any) -> lf.LocalSGDStrategy:
    return lf.LocalSGDStrategy(start_method="fork", timeout=TIMEOUT, **kw)


def _checkpoints(tmp_path: Path, name: str, strategy: Any, steps: int = 4, every: int = 2) -> Path:
    ckpt_dir = tmp_path / name
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1, filename="{step}")
    fit_fork(
        tmp_path / f"{name}_out",
        KnownBatchModule(),
        strategy,
        max_steps=steps,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    return ckpt_dir


def _resume(strategy: Any, ckpt: Path, max_steps: int = 6) -> None:
    trainer = L.Trainer(strategy=strategy, **trainer_kwargs(max_steps=max_steps))
    trainer.fit(KnownBatchModule(), ckpt_path=str(ckpt))


def test_shards_that_do_not_belong_are_refused_on_every_rank(tmp_path):
    """Swapped, stale (an older checkpoint's), foreign (another run's), truncated and crafted shards
    are each refused with an error naming the file; nothing of them is loaded and no code runs."""
    ckpt_dir = _checkpoints(tmp_path, "a", local_sgd(sync_every=2))
    other = _checkpoints(tmp_path, "b", local_sgd(sync_every=2), steps=2)
    target = ckpt_dir / "step=4.ckpt"
    shards = Path(f"{target}.replicas")
    good = {r: (shards / f"rank{r}.pt").read_bytes() for r in range(2)}
    marker = tmp_path / "ran"

    def swapped() -> None:
        (shards / "rank0.pt").write_bytes(good[1])
        (shards / "rank1.pt").write_bytes(good[0])

    def stale() -> None:
        shutil.copy(replica_shard_path(ckpt_dir / "step=2.ckpt", 1), shards / "rank1.pt")

    def foreign() -> None:
        meta = torch.load(target, weights_only=True)[CHECKPOINT_KEY]
        # another run's shard of the checkpoint at the same step
        shutil.copy(replica_shard_path(other / "step=2.ckpt", 1), shards / "rank1.pt")
        assert torch.load(shards / "rank1.pt", weights_only=True)["checkpoint_id"] != meta["checkpoint_id"]

    def truncated() -> None:
        (shards / "rank1.pt").write_bytes(good[1][: len(good[1]) // 2])

    def crafted() -> None:
        shard = torch.load(shards / "rank1.pt", weights_only=True)
        shard["replica"] = {"x": Payload(str(marker))}
        torch.save(shard, shards / "rank1.pt")

    cases = {
        swapped: r"rank0\.pt: it holds rank 1's state",
        stale: r"rank1\.pt: it belongs to another checkpoint",
        foreign: r"rank1\.pt: it belongs to another checkpoint",
        truncated: r"rank1\.pt: unreadable",
        crafted: r"rank1\.pt: unreadable \(UnpicklingError",
    }
    for damage, message in cases.items():
        for r in range(2):
            (shards / f"rank{r}.pt").write_bytes(good[r])
        damage()
        with pytest.raises(Exception, match=message):
            _resume(local_sgd(sync_every=2), target)
        assert not marker.exists()
    # intact shards resume
    for r in range(2):
        (shards / f"rank{r}.pt").write_bytes(good[r])
    _resume(local_sgd(sync_every=2), target)
    # another strategy is refused before anything is loaded
    with pytest.raises(Exception, match="written by LocalSGDStrategy; it cannot resume under DiLoCoStrategy"):
        _resume(lf.DiLoCoStrategy(sync_every=2, start_method="fork", timeout=TIMEOUT), target)


def compressed(**kw: Any) -> lf.CompressedDDPStrategy:
    return lf.CompressedDDPStrategy(start_method="fork", timeout=TIMEOUT, **kw)


def test_compressed_ddp_shard_is_checked_and_never_unpickled(tmp_path):
    """CompressedDDPStrategy's shard: a crafted pickle runs no code on resume (refused, naming the
    file) nor on validate(ckpt_path) (which reads no shard); a swapped shard is refused."""
    ckpt_dir = _checkpoints(tmp_path, "c", compressed(compressor="sign"), steps=2)
    target = ckpt_dir / "step=2.ckpt"
    shards = Path(f"{target}.replicas")
    good = {r: (shards / f"rank{r}.pt").read_bytes() for r in range(2)}
    marker = tmp_path / "ran"
    shard = torch.load(shards / "rank1.pt", weights_only=True)
    shard["compressor"] = {"net.0.weight": {"x": Payload(str(marker))}}
    torch.save(shard, shards / "rank1.pt")
    with pytest.raises(Exception, match=r"rank1\.pt: unreadable \(UnpicklingError"):
        _resume(compressed(compressor="sign"), target, max_steps=4)
    trainer = L.Trainer(strategy=compressed(compressor="sign"), **trainer_kwargs(limit_val_batches=1))
    trainer.validate(KnownBatchModule(), ckpt_path=str(target))
    assert not marker.exists()
    (shards / "rank0.pt").write_bytes(good[1])
    (shards / "rank1.pt").write_bytes(good[0])
    with pytest.raises(Exception, match=r"rank0\.pt: it holds rank 1's state"):
        _resume(compressed(compressor="sign"), target, max_steps=4)


# ---------------------------------------------------------------------------- the handshake
def _rank_worker(rank: int, world: int, port: int, out: str, case: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
    )
    hidden = 16
    if case == "sync_every":
        strategy: Any = lf.LocalSGDStrategy(sync_every=4 if rank == 0 else 8, timeout=TIMEOUT)
    elif case == "outer_lr":
        strategy = lf.DiLoCoStrategy(
            sync_every=2, outer_kwargs={"lr": 0.7 if rank == 0 else 0.5}, timeout=TIMEOUT
        )
    elif case == "strategy":
        cls = lf.LocalSGDStrategy if rank == 0 else lf.DiLoCoStrategy
        strategy = cls(sync_every=2, timeout=TIMEOUT)
    elif case == "hidden":
        strategy, hidden = lf.LocalSGDStrategy(sync_every=2, timeout=TIMEOUT), 32 + rank
    else:  # the compressor
        strategy = lf.CompressedDDPStrategy(compressor="int8" if rank == 0 else "sign", timeout=TIMEOUT)
    try:
        trainer = L.Trainer(strategy=strategy, **trainer_kwargs(max_steps=4))
        trainer.fit(KnownBatchModule(hidden=hidden))
        result = f"trained {trainer.global_step} steps"
    except AgreementError as err:
        result = f"AgreementError: {err}"
    except Exception as err:
        result = f"{type(err).__name__}: {err}"
    Path(out, f"res{rank}.txt").write_text(result)
    os._exit(0)  # the group may be half torn down after the error: exit without finalisation


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("sync_every", "schedule differs: rank(s) [0]: Periodic(every=4"),
        ("outer_lr", "outer_factory differs"),
        ("strategy", "strategy differs"),
        ("hidden", "tensor net.0.weight differs"),
        ("compressor", "compressor differs"),
    ],
)
def test_ranks_configured_differently_stop_before_the_first_step(tmp_path, case, field):
    """Each rank builds its own Trainer (as under torchrun); a difference in the schedule, the outer
    optimizer, the strategy class, the model or the compressor is one clear ValueError on every
    rank, naming the field and the ranks, before any step."""
    mp = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [mp.Process(target=_rank_worker, args=(r, 2, port, str(tmp_path), case)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    for p in procs:
        if p.is_alive():
            p.kill()
    results = [
        (tmp_path / f"res{r}.txt").read_text() if (tmp_path / f"res{r}.txt").exists() else ""
        for r in range(2)
    ]
    for r in range(2):
        assert results[r].startswith("AgreementError:"), (r, results[r])
        assert field in results[r] and "rank(s) [0]" in results[r] and "rank(s) [1]" in results[r]
    assert results[0] == results[1]


# ---------------------------------------------------------------------------- NaN recovery
class PoisonWeights(L.Callback):
    """Sets one weight of rank ``rank`` to NaN before step ``step``."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("nan")


class SaveRecoveries(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        torch.save(trainer.strategy.recoveries, self.out / f"recoveries{trainer.global_rank}.pt")


@pytest.mark.parametrize(("preset", "rank"), [("compressed_ddp", 1), ("dgc", 0)])
def test_a_replica_with_nan_weights_is_reset_from_a_healthy_one(tmp_path, preset, rank):
    """Rank ``rank``'s weights go NaN before step 3: that step averages the healthy rank alone, then
    the NaN rank gets its weights back, so the run equals the reference in which rank ``rank``'s
    gradients alone were NaN at step 3 (left out once), and the checkpoint at step 4 is finite."""
    reference = fit_fork(
        tmp_path / "ref", KnownBatchModule(nan_at=(rank, 3)), compressed(preset=preset), max_steps=6
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="c")
    ranks = fit_fork(
        tmp_path / "run",
        KnownBatchModule(),
        compressed(preset=preset),
        max_steps=6,
        callbacks=[PoisonWeights(rank, 3), SaveRecoveries(tmp_path), ckpt],
        enable_checkpointing=True,
    )
    for r in range(2):
        assert ranks[r]["nonfinite_events"] == [{"step": 3, "excluded": 1}]
        assert torch.load(tmp_path / f"recoveries{r}.pt") == [
            {"step": 4, "ranks": [rank], "source": 1 - rank}
        ]
        for k, v in reference[r]["state_dict"].items():
            assert torch.equal(ranks[r]["state_dict"][k], v), k
    saved = torch.load(tmp_path / "ckpt" / "c.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in saved.values())
