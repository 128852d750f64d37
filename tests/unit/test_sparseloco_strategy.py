"""SparseLoCoStrategy (``strategy="sparseloco"``): the authors' defaults, the registered name, and
two real gloo ranks against single-process references written from the paper's update rule:
the default compressor and outer SGD (lr 1, no momentum) on the test net, and a BatchNorm net whose
running statistics must travel exact (averaged), not through the compressor."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_fedopt as lf
from lightning_fedopt import strategies
from lightning_fedopt.compression import SparseLoCo

# the authors' run (module doc of lightning_fedopt/strategies/diloco/sparseloco.py)
TOPK, CHUNK, BETA, BITS = 128, 4096, 0.95, 2


# ---------------------------------------------------------------------- defaults and arguments
def test_defaults_are_the_authors():
    s = lf.SparseLoCoStrategy()
    c = s.compressor
    assert isinstance(c, SparseLoCo)
    assert (c.topk, c.chunk, c.beta, c.bits, c.average, c.error_feedback) == (
        TOPK,
        CHUNK,
        BETA,
        BITS,
        "replicas",
        True,
    )
    assert s.sync_every == 15 and s.fragments == 1 and s.sync_delay == 0
    outer = s.outer_factory([torch.zeros(2)])
    assert type(outer) is torch.optim.SGD
    d = outer.defaults
    assert (d["lr"], d["momentum"], d["nesterov"]) == (1.0, 0.0, False)
    # the outer lr does not follow the replicas here: the error-feedback buffer is the momentum
    assert "ScalingLaw" not in repr(s.outer_factory)


def test_a_fresh_compressor_per_strategy_and_overrides():
    a, b = lf.SparseLoCoStrategy(), lf.SparseLoCoStrategy()
    assert a.compressor is not b.compressor  # error-feedback buffers are one replica's own
    mine = SparseLoCo(topk=4, chunk=16)
    assert lf.SparseLoCoStrategy(compressor=mine).compressor is mine
    assert isinstance(lf.SparseLoCoStrategy(compressor="sparseloco").compressor, SparseLoCo)
    d = lf.SparseLoCoStrategy(outer_kwargs={"lr": 0.7}).outer_factory([torch.zeros(1)]).defaults
    assert (d["lr"], d["momentum"], d["nesterov"]) == (0.7, 0.0, False)
    adam = lf.SparseLoCoStrategy(outer_optimizer="Adam", outer_kwargs={"lr": 0.1}).outer_factory(
        [torch.zeros(1)]
    )
    assert type(adam) is torch.optim.Adam
    assert lf.SparseLoCoStrategy(sync_every=30).sync_every == 30


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"compressor": "int8"}, "compressor"),
        ({"compressor": "no_such"}, "compressor"),
        ({"sync_every": 0}, "sync_every"),
        ({"outer_kwargs": {"lr": float("nan")}}, "outer_kwargs"),
        ({"outer_kwargs": [("lr", 1.0)]}, "outer_kwargs"),
        ({"fragments": 2}, "fragments"),
        ({"sync_delay": 1}, "sync_delay"),
        ({"mixing": 0.5}, "mixing"),
        ({"fragment_layout": "strided"}, "fragment_layout"),
        ({"fault_tolerance": "torchft"}, "fault_tolerance"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}"):
        lf.SparseLoCoStrategy(**kwargs)


def test_registered_name_and_exports():
    assert "SparseLoCoStrategy" in lf.__all__ and "SparseLoCoStrategy" in strategies.__all__
    assert lf.SparseLoCoStrategy is strategies.SparseLoCoStrategy
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="sparseloco", logger=False)
    assert type(trainer.strategy) is lf.SparseLoCoStrategy and trainer.strategy.sync_every == 15
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="sparseloco_fork", logger=False)
    assert trainer.strategy._start_method == "fork"


# ---------------------------------------------------------------------- 2 real ranks vs the reference


def test_the_streaming_arguments_at_their_defaults_are_accepted():
    """LightningCLI passes every argument of the class, at its default when the user set none."""
    s = lf.SparseLoCoStrategy(fragments=1, fragment_layout="auto", sync_delay=0, mixing=0.0)
    assert s.fragments == 1 and s.sync_delay == 0 and s.mixing == 0.0
    with pytest.raises(ValueError, match="mixing"):
        lf.SparseLoCoStrategy(mixing=0.5)
