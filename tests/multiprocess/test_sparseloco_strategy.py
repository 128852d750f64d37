"""``strategy="sparseloco"`` on 2 real gloo ranks against the single-process reference; BatchNorm
buffers travel exact."""

from __future__ import annotations

import copy

import pytest
import torch
from modules import KnownBatchModule, make_batch
from reference_outer import reference_diloco
from runners import TIMEOUT, assert_close_state, fit_fork
from sparseloco_reference import RefSparseLoCo, ref_nbytes
from torch import nn

import lightning_fedopt as lf

# the authors' run (module doc of lightning_fedopt/strategies/diloco/sparseloco.py)
TOPK, CHUNK, BETA, BITS = 128, 4096, 0.95, 2


# ---------------------------------------------------------------------- defaults and arguments
def _compress_mean(replicas, per_rank, names):
    """The mean of the replicas' SparseLoCo messages per tensor (a tensor whose message would not be
    smaller than its dense bytes travels dense and exact)."""
    out = []
    for i, name in enumerate(names):
        shape, n = per_rank[0][i].shape, per_rank[0][i].numel()
        if ref_nbytes(n, TOPK, CHUNK, BITS) >= 4 * n:
            out.append(sum(d[i] for d in per_rank) / len(per_rank))
            continue
        sent = [rep.send(name, d[i]) for rep, d in zip(replicas, per_rank)]
        out.append((sum(sent) / len(sent)).view(shape))
    return out


@pytest.mark.multiprocess
def test_two_ranks_match_the_reference(tmp_path):
    """Defaults except H=4 (12 steps: three rounds) on 2 gloo ranks: every rank equals the
    single-process DiLoCo whose mean pseudo-gradient is the mean of the two reference replicas'
    SparseLoCo messages (128 of every 4096 values: the net's small tensors send one or two values,
    2 bits each), with outer SGD lr 1 and no momentum."""
    strategy = lf.SparseLoCoStrategy(sync_every=4, start_method="fork", timeout=TIMEOUT)
    ranks = fit_fork(tmp_path, KnownBatchModule(), strategy, max_steps=12)
    replicas = [RefSparseLoCo(TOPK, CHUNK, BETA, BITS) for _ in range(2)]
    ref = reference_diloco(
        2,
        12,
        4,
        outer=lambda p: torch.optim.SGD(p, lr=1.0),
        compress=lambda per_rank, names: _compress_mean(replicas, per_rank, names),
    )
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    plain = reference_diloco(2, 12, 4, outer=lambda p: torch.optim.SGD(p, lr=1.0))
    assert (ref[0]["net.0.weight"] - plain[0]["net.0.weight"]).abs().max() > 1e-4, "compression is real"


class BNModule(KnownBatchModule):
    """The test net with a BatchNorm layer: its running statistics are floating-point buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = bn_net()


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))


def reference_bn(steps: int, sync_every: int, buffers_compressed: bool) -> list[dict[str, torch.Tensor]]:
    """Two replicas of :func:`bn_net` (SGD lr 0.1 on ``make_batch(r, s)``, train mode); every H
    steps the parameters' pseudo-gradients go through the replicas' SparseLoCo references and outer
    SGD (lr 1); the running statistics are averaged exactly, or (``buffers_compressed``) sent
    through the compressor as values, as DiLoCoStrategy(compressor=...) does."""
    nets = [bn_net() for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets]
    replicas = [RefSparseLoCo(TOPK, CHUNK, BETA, BITS) for _ in range(2)]
    outer_net = copy.deepcopy(nets[0])
    outer = torch.optim.SGD(outer_net.parameters(), lr=1.0)
    param_names = [n for n, _ in outer_net.named_parameters()]
    buffer_names = [n for n, b in outer_net.named_buffers() if b.is_floating_point()]
    for step in range(steps):
        for r in range(2):
            x, y = make_batch(r, step)
            loss = nn.functional.mse_loss(nets[r](x), y)
            opts[r].zero_grad()
            loss.backward()
            opts[r].step()
        if (step + 1) % sync_every:
            continue
        local = [dict(m.named_parameters()) for m in nets]
        phi = dict(outer_net.named_parameters())
        deltas = [[(phi[n] - local[r][n]).detach() for n in param_names] for r in range(2)]
        for n, d in zip(param_names, _compress_mean(replicas, deltas, [f"net.{n}" for n in param_names])):
            phi[n].grad = d.clone()
        outer.step()
        outer.zero_grad(set_to_none=True)
        bufs = [dict(m.named_buffers()) for m in nets]
        outer_bufs = dict(outer_net.named_buffers())
        values = [[bufs[r][n].clone() for n in buffer_names] for r in range(2)]
        if buffers_compressed:
            means = _compress_mean(replicas, values, [f"net.{n}" for n in buffer_names])
        else:
            means = [(values[0][i] + values[1][i]) / 2 for i in range(len(buffer_names))]
        with torch.no_grad():
            for n, mean in zip(buffer_names, means):
                outer_bufs[n].copy_(mean)
            for m in nets:
                for n, p in m.named_parameters():
                    p.copy_(phi[n])
                for n in buffer_names:
                    dict(m.named_buffers())[n].copy_(outer_bufs[n])
    return [{f"net.{k}": v.detach().clone() for k, v in m.state_dict().items()} for m in nets]


@pytest.mark.multiprocess
def test_batchnorm_statistics_travel_exact(tmp_path):
    """A BatchNorm net on 2 gloo ranks, H=4, 12 steps, no re-estimation of the statistics: the
    parameters equal the SparseLoCo reference and the running statistics the replicas' exact
    mean; sending them through the compressor (what DiLoCoStrategy(compressor=SparseLoCo()) does)
    ends elsewhere."""
    strategy = lf.SparseLoCoStrategy(sync_every=4, bn_recalibration=0, start_method="fork", timeout=TIMEOUT)
    ranks = fit_fork(tmp_path, BNModule(), strategy, max_steps=12)
    ref = reference_bn(12, 4, buffers_compressed=False)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    corrupted = reference_bn(12, 4, buffers_compressed=True)
    diff = (corrupted[0]["net.1.running_var"] - ref[0]["net.1.running_var"]).abs().max()
    assert diff > 1e-3, "the compressor would have changed the statistics"
