"""Defaults from the evidence (issue 22): DiLoCo's outer learning rate by number of replicas
("Scaling Laws for DiLoCo", arXiv 2503.09799, Figure 7), CO2's outer momentum by world size (the
authors' fairseq-CO2 rule), streaming DiLoCo's strided layout (the paper deals transformer blocks;
the embeddings go with the first fragment, the final norm and head with the last), FedSpeed's
defaults (the authors' FL-Simulator code). Without processes, except the two marked ``multiprocess``
that fit on two gloo ranks against the single-process references."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

import lightning_fedopt as lf
from lightning_fedopt.runtime.handshake import agreement_fields
from lightning_fedopt.strategies.diloco.co2 import CO2OuterFactory, co2_outer_momentum
from lightning_fedopt.strategies.diloco.fragments import (
    assign_fragments,
    repeated_blocks,
    resolve_layout,
    split_fragments,
    strided_fragments,
)
from lightning_fedopt.strategies.diloco.outer import (
    SCALING_LAW_OUTER_LR,
    ScalingLawOuterOptimizer,
    outer_factory,
    replica_count,
    scaling_law_outer_lr,
)


def _built(strategy, devices: int) -> torch.optim.Optimizer:
    """The outer optimizer ``strategy`` builds once a Trainer of ``devices`` processes owns it
    (the world size is known from then on; nothing is started)."""
    L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False)
    return strategy.outer_factory([torch.zeros(2)])


# ---------------------------------------------------------------------- DiLoCo's outer learning rate
def test_scaling_law_values():
    """Figure 7 (N >= 335M, H = 30, Nesterov momentum 0.9): 0.4 / 0.6 / 0.6 / 0.8 for M = 1 / 2 / 4
    / 8; between measured M the next M up; beyond 8 the M = 8 value; unknown M: 0.7 (DiLoCo's)."""
    assert SCALING_LAW_OUTER_LR == {1: 0.4, 2: 0.6, 4: 0.6, 8: 0.8}
    got = {m: scaling_law_outer_lr(m) for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 1000)}
    assert got == {1: 0.4, 2: 0.6, 3: 0.6, 4: 0.6, 5: 0.8, 6: 0.8, 7: 0.8, 8: 0.8, 9: 0.8, 1000: 0.8}
    assert scaling_law_outer_lr(None) == 0.7
    with pytest.raises(ValueError, match="`replicas`"):
        scaling_law_outer_lr(0)


@pytest.mark.parametrize(
    ("devices", "group_size", "lr"),
    [(1, 1, 0.4), (2, 1, 0.6), (3, 1, 0.6), (4, 1, 0.6), (8, 1, 0.8), (4, 2, 0.6), (8, 4, 0.6), (8, 8, 0.4)],
)
def test_diloco_outer_lr_follows_the_replicas(devices, group_size, lr):
    """Resolved from the number of replicas (a group of ``group_size`` processes is one), with
    Nesterov momentum 0.9; the same value on every rank (a function of the world size alone)."""
    s = lf.DiLoCoStrategy(group_size=group_size)
    assert isinstance(s.outer_factory, ScalingLawOuterOptimizer)
    opt = _built(s, devices)
    assert type(opt) is torch.optim.SGD
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["nesterov"]) == (lr, 0.9, True)
    assert s.outer_factory.lr == lr
    streaming = lf.StreamingDiLoCoStrategy(sync_every=40, group_size=group_size)
    assert _built(streaming, devices).defaults["lr"] == lr


def test_an_explicit_outer_lr_always_wins():
    s = lf.DiLoCoStrategy(outer_kwargs={"lr": 0.3})
    assert _built(s, 8).defaults["lr"] == 0.3
    s = lf.DiLoCoStrategy(outer_kwargs={"momentum": 0.5})  # no lr: still by replicas
    d = _built(s, 8).defaults
    assert (d["lr"], d["momentum"], d["nesterov"]) == (0.8, 0.5, True)
    assert type(_built(lf.DiLoCoStrategy(outer_optimizer="SGD"), 8)) is torch.optim.SGD  # torch's defaults
    assert _built(lf.DiLoCoStrategy(outer_optimizer="SGD"), 8).defaults["lr"] == 1e-3
    with pytest.raises(ValueError, match="`outer_optimizer`"):
        outer_factory(None, {"momentum": 0.0})  # Nesterov needs a momentum


def test_unknown_replicas_and_torchft():
    """Under torchft the quorum's size changes during the run: the DiLoCo paper's 0.7."""
    assert replica_count(None) is None
    assert replica_count(SimpleNamespace(fault_tolerance="torchft", outer_world_size=4)) is None
    assert replica_count(SimpleNamespace(fault_tolerance=None, outer_world_size=4)) == 4
    make = ScalingLawOuterOptimizer({"momentum": 0.9, "nesterov": True})
    assert make([torch.zeros(1)]).defaults["lr"] == 0.7
    make.strategy = SimpleNamespace(fault_tolerance="torchft", outer_world_size=4, global_rank=0)
    assert make([torch.zeros(1)]).defaults["lr"] == 0.7


def test_resolved_value_is_logged_once(caplog):
    make = ScalingLawOuterOptimizer({"momentum": 0.9, "nesterov": True})
    make.strategy = SimpleNamespace(fault_tolerance=None, outer_world_size=4, global_rank=0)
    with caplog.at_level(logging.INFO, logger="lightning_fedopt"):
        for _ in range(3):  # e.g. one build per streaming fragment
            make([torch.zeros(1)])
    lines = [r.getMessage() for r in caplog.records if "outer learning rate" in r.getMessage()]
    assert len(lines) == 1 and "0.6 for 4 replica(s)" in lines[0] and "2503.09799" in lines[0]
    caplog.clear()
    other_rank = ScalingLawOuterOptimizer({"momentum": 0.9, "nesterov": True})
    other_rank.strategy = SimpleNamespace(fault_tolerance=None, outer_world_size=4, global_rank=1)
    with caplog.at_level(logging.INFO, logger="lightning_fedopt"):
        other_rank([torch.zeros(1)])
    assert not [r for r in caplog.records if "outer learning rate" in r.getMessage()]


def test_agreement_fields_describe_the_rule_alike_in_every_process():
    """The start-up handshake compares the factory's text: the rule, no object address, no
    strategy; the same for two strategies built alike; an explicit lr shows as a value."""
    a = agreement_fields(lf.DiLoCoStrategy(sync_every=4))["outer_factory"]
    b = agreement_fields(lf.DiLoCoStrategy(sync_every=4))["outer_factory"]
    assert a == b and "0x" not in a and "by replicas" in a and "momentum=0.9" in a
    assert "lr=0.5" in agreement_fields(lf.DiLoCoStrategy(outer_kwargs={"lr": 0.5}))["outer_factory"]
    co2 = agreement_fields(lf.CO2Strategy())["outer_factory"]
    assert "by world size" in co2 and "0x" not in co2
    assert "momentum=0.5" in agreement_fields(lf.CO2Strategy(outer_momentum=0.5))["outer_factory"]


# ---------------------------------------------------------------------- CO2's outer momentum
def test_co2_outer_momentum_by_world_size():
    """fairseq-CO2: 0 up to 16 processes, 0.2 up to 32, 0.5 up to 64, 0.6 above."""
    table = {n: co2_outer_momentum(n) for n in (1, 2, 4, 16, 17, 32, 33, 64, 65, 512)}
    assert table == {1: 0.0, 2: 0.0, 4: 0.0, 16: 0.0, 17: 0.2, 32: 0.2, 33: 0.5, 64: 0.5, 65: 0.6, 512: 0.6}
    make = CO2OuterFactory(lr=1.0, momentum=None, gap_penalty=1.0, clip=1.0)
    make.strategy = SimpleNamespace(world_size=40, global_rank=0)
    assert make([torch.zeros(1)]).defaults["momentum"] == 0.5


def test_co2_strategy_resolves_beta_at_set_up():
    s = lf.CO2Strategy()
    assert s.outer_momentum is None
    opt = _built(s, 2)
    assert opt.defaults["momentum"] == 0.0 and s.effective_outer_momentum == 0.0
    assert (opt.defaults["lr"], opt.defaults["clip"], opt.defaults["gap_penalty"]) == (1.0, 1.0, 1.0)
    explicit = lf.CO2Strategy(outer_momentum=0.5)
    assert _built(explicit, 2).defaults["momentum"] == 0.5 and explicit.effective_outer_momentum == 0.5
    with pytest.raises(ValueError, match="`outer_momentum`"):
        lf.CO2Strategy(outer_momentum=1.0)


# ---------------------------------------------------------------------- streaming DiLoCo's layout
class TinyGPT(nn.Module):
    """Embeddings, four blocks, final norm and head: the shape of examples/lm.py's GPT."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(8, 4), nn.Embedding(4, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(4))
        self.ln_f = nn.LayerNorm(4)
        self.head = nn.Linear(4, 8)


def _names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters()]


def test_strided_deals_the_blocks_and_attaches_the_rest():
    names = _names(TinyGPT())
    # tok_emb, pos_emb, blocks.j.0.{weight,bias}, blocks.j.1.{weight,bias} (j = 0..3), ln_f x2, head x2
    assert repeated_blocks(names) == [
        None,
        None,
        *[j for j in range(4) for _ in range(4)],
        None,
        None,
        None,
        None,
    ]
    emb, tail = [0, 1], list(range(18, 22))
    block = {j: list(range(2 + 4 * j, 6 + 4 * j)) for j in range(4)}
    assert strided_fragments(names, 2) == [emb + block[0] + block[2], block[1] + block[3] + tail]
    assert strided_fragments(names, 4) == [emb + block[0], block[1], block[2], block[3] + tail]
    assert strided_fragments(names, 3) == [emb + block[0] + block[3], block[1], block[2] + tail]
    assert strided_fragments(names, 1) == [list(range(len(names)))]
    with pytest.raises(ValueError, match=r"`fragments`.*4.*repeated blocks"):
        strided_fragments(names, 5)  # only 4 blocks: the embeddings and head are not layers of their own
    assert resolve_layout(names, 4, "auto") == "strided" and resolve_layout(names, 5, "auto") == "contiguous"
    # contiguous is unchanged: runs of about equal size
    numels = [p.numel() for p in TinyGPT().parameters()]
    assert assign_fragments(names, numels, 5, "auto") == split_fragments(numels, 5)
    assert assign_fragments(names, numels, 2, "contiguous") == split_fragments(numels, 2)


def test_strided_edge_cases():
    # a tensor between two blocks goes with the block before it; a shorter numbered container
    # (a head of two Linear) is not the repeated blocks
    names = ["emb.w", "h.0.w", "mid.w", "h.1.w", "h.2.w", "head.0.w", "head.2.w"]
    assert repeated_blocks(names) == [None, 0, None, 1, 2, None, None]
    assert strided_fragments(names, 2) == [[0, 1, 2, 4], [3, 5, 6]]
    # no numbered container: the modules are dealt round-robin, as before
    flat = ["fc1.weight", "fc1.bias", "fc2.weight", "fc3.weight"]
    assert repeated_blocks(flat) == [None] * 4
    assert strided_fragments(flat, 2) == [[0, 1, 3], [2]]
    # an MLP in one nn.Sequential: its Linear layers are the blocks (the digits benchmark's layout)
    mlp = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"]
    assert strided_fragments(mlp, 3) == [[0, 1], [2, 3], [4, 5]]


# ---------------------------------------------------------------------- FedSpeed
def test_fedspeed_defaults_are_the_authors():
    """FL-Simulator: --rho 0.1; ESAM.step(alpha=1.) uses the perturbed gradient alone; --lamb 0.1
    is 1/lambda; their clipping at 10 is Trainer(gradient_clip_val=10.0) here."""
    s = lf.FedSpeedStrategy()
    assert (s.rho, s.perturb_alpha, s.prox_lambda) == (0.1, 1.0, 10.0)


# ---------------------------------------------------------------------- two real ranks
