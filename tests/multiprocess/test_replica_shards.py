"""The checkpoint shard module (``strategies/_shards.py``): the on-disk counters, and shard removal
shared by the replica strategies and CompressedDDPStrategy."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from modules import KnownBatchModule
from runners import TIMEOUT, fit_fork

import lightning_fedopt as lf


def test_compressed_ddp_top_k_rotation_removes_shard_folders(tmp_path):
    """Defect (fixed): CompressedDDPStrategy removed an old checkpoint's shard files but left its
    empty ``<checkpoint>.replicas`` folder behind, one per rotated checkpoint. It now removes
    shards as the replica strategies do (``_shards.remove_with_shard``)."""
    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=1, filename="{step}")
    fit_fork(
        tmp_path / "run",
        KnownBatchModule(),
        lf.CompressedDDPStrategy("int8", start_method="fork", timeout=TIMEOUT),
        max_steps=9,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["step=9.ckpt", "step=9.ckpt.replicas"], names
    assert sorted(p.name for p in (ckpt_dir / "step=9.ckpt.replicas").iterdir()) == ["rank0.pt", "rank1.pt"]
