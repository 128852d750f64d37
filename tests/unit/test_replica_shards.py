"""The checkpoint shard module (``strategies/_shards.py``): the on-disk counters, and shard removal
shared by the replica strategies and CompressedDDPStrategy."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_fedopt.runtime.run import Counters
from lightning_fedopt.runtime.shards import (
    CHECKPOINT_FORMAT,
    load_shard,
    remove_with_shard,
    replica_shard_path,
    save_shard,
    shard_exists,
)


def test_counters_round_trip_as_plain_ints():
    """The shards keep a plain dict of ints (format 1); an older shard without ``effective_steps``
    still loads, and a replica restarting from the meta entry starts a fresh round."""
    c = Counters(replica_step=7, steps_since_sync=3, sync_count=2, samples_since_sync=24, effective_steps=3)
    d = c.as_dict()
    assert d == {
        "replica_step": 7,
        "steps_since_sync": 3,
        "sync_count": 2,
        "samples_since_sync": 24,
        "effective_steps": 3,
    }
    assert all(type(v) is int for v in d.values())
    assert Counters.from_shard(d) == c
    old = {k: v for k, v in d.items() if k != "effective_steps"}
    assert Counters.from_shard(old) == Counters(7, 3, 2, 24, 0)
    assert Counters.from_meta(d) == Counters(replica_step=7, sync_count=2)
    assert CHECKPOINT_FORMAT == 2


def test_shard_save_load_and_remove_through_a_link(tmp_path):
    """Shards sit next to the checkpoint they belong to; removing a link (``save_last="link"``)
    leaves the linked checkpoint's shards, removing the checkpoint takes its shard and folder."""
    io = TorchCheckpointIO()
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"x")
    link = tmp_path / "last.ckpt"
    os.symlink(ckpt, link)
    save_shard(io, {"v": torch.arange(3)}, ckpt, rank=1)
    assert (
        replica_shard_path(link, 1)
        == replica_shard_path(ckpt, 1)
        == f"{os.path.realpath(ckpt)}.replicas/rank1.pt"
    )
    assert shard_exists(link, 1) and not shard_exists(ckpt, 0)
    assert torch.equal(load_shard(io, link, 1)["v"], torch.arange(3))
    remove_with_shard(io, link, 1, lambda p: os.unlink(p))
    assert not link.exists() and shard_exists(ckpt, 1)
    remove_with_shard(io, ckpt, 1, lambda p: os.unlink(p))
    assert sorted(os.listdir(tmp_path)) == []


class _Crafted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling it would create the file
        return (open, (self.marker, "w"))


def test_load_shard_refuses_a_crafted_pickle_by_default(tmp_path):
    """A shard is read with ``weights_only=True`` unless the caller says otherwise: a pickle that
    would run code on loading is refused before it runs."""
    io, ckpt, marker = TorchCheckpointIO(), tmp_path / "c.ckpt", tmp_path / "ran"
    save_shard(io, {"x": _Crafted(str(marker))}, ckpt, 0)
    with pytest.raises(pickle.UnpicklingError):
        load_shard(io, ckpt, 0)
    assert not marker.exists()
