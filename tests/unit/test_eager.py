"""Eager updates (Kale, Douillard & Donchev 2025, arXiv 2502.12996) without processes: a
single-process reference of the rule, written from the paper's formula independently of the
package's code (the real processes compare against it: tests/multiprocess/test_eager.py), its
properties, and the strategy's argument checks.

The rule, for replica ``m`` of ``M`` at the end of round ``t``:
``g_m = (1/M) Delta_m^t + (1/M) sum_{k != m} Delta_k^{t-1}``, stepped by the replica's own outer
optimizer on its own outer weights; ``Delta_m^t = phi_m - theta_m`` is sent at once and arrives a
round later.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor, nn

from lightning_fedopt.strategies.diloco.eager import (
    DEFAULT_SYNC_EVERY,
    EagerDiLoCoStrategy,
    EagerOuterOptimizer,
    eager_outer_gradients,
)


def total(tensors: list[Tensor]) -> Tensor:
    """The sum of equally shaped tensors, left to right (as a sum over ranks adds them)."""
    out = tensors[0].clone()
    for t in tensors[1:]:
        out = out + t
    return out


def nesterov_outer(params: list[Tensor]) -> torch.optim.Optimizer:
    """The strategy's default outer optimizer for two replicas (Nesterov SGD, momentum 0.9, lr 0.4)."""
    return torch.optim.SGD(params, lr=0.4, momentum=0.9, nesterov=True)


def reference_eager(
    nets: list[nn.Module],
    inner: Callable[[int, int], None],
    steps: int,
    sync_every: int,
    *,
    outer: Callable[[list[Tensor]], torch.optim.Optimizer] = nesterov_outer,
    final_sync: bool = True,
    nan_at: tuple[int, int] | None = None,
    trace: list[dict[str, object]] | None = None,
) -> None:
    """Eager DiLoCo on ``M = len(nets)`` simulated replicas (parameters only), in place.

    ``inner(r, s)`` takes replica ``r``'s optimizer step ``s``. Every ``sync_every`` steps each
    replica computes ``Delta_r = phi_r - theta_r`` (zeros if its weights are not finite) and sends
    it; the mean over the finite replicas arrives at the next synchronisation. Replica ``r`` then
    steps its own outer optimizer with ``(1/M) Delta_r^t + (1/M) sum_{k != r} Delta_k^{t-1}``
    (``Delta^0 = 0``), the paper's form: the others' contributions of the round before are that
    round's mean times ``M`` minus replica ``r``'s own; every replica restarts from its outer weights.
    The end: the round in flight arrives (the proxy ``Delta_r / M`` is replaced by the mean) and the
    partial round's mean is added, in one outer step; if a round was in flight every replica then
    takes the mean of the replicas' outer weights. ``nan_at`` (replica, step): its weights become
    NaN after that step. ``trace`` receives, per synchronisation, the outer weights and the fresh
    pseudo-gradients after it.
    """
    m = len(nets)
    params = [list(net.parameters()) for net in nets]
    phi = [[p.detach().clone() for p in ps] for ps in params]
    opts = [outer(phi[r]) for r in range(m)]
    own = [[torch.zeros_like(p) for p in ps] for ps in phi]  # Delta_r of the round in flight
    sent: list[Tensor] | None = None  # the mean in flight (the contributions of every replica)

    def finite(r: int) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in params[r])

    def fresh_and_mean() -> tuple[list[list[Tensor]], list[Tensor]]:
        ok = [finite(r) for r in range(m)]
        fresh = [
            [(g - p.detach()) if ok[r] else torch.zeros_like(g) for g, p in zip(phi[r], params[r])]
            for r in range(m)
        ]
        good = [r for r in range(m) if ok[r]]
        mean = [total([fresh[r][i] for r in good]) / len(good) for i in range(len(phi[0]))]
        return fresh, mean

    def outer_step(r: int, grads: list[Tensor]) -> None:
        for g, d in zip(phi[r], grads):
            g.grad = d.clone()
        opts[r].step()
        opts[r].zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, g in zip(params[r], phi[r]):
                p.copy_(g)  # (a poisoned replica restarts from its outer weights too)

    since = 0
    for step in range(steps):
        for r in range(m):
            inner(r, step)
            if nan_at is not None and (r, step) == tuple(nan_at):
                with torch.no_grad():
                    for p in params[r]:
                        p.fill_(float("nan"))
        since += 1
        if (step + 1) % sync_every:
            continue
        fresh, mean = fresh_and_mean()
        for r in range(m):
            if sent is None:
                others = [torch.zeros_like(g) for g in phi[r]]
            else:  # sum_{k != r} Delta_k^{t-1} = M * mean - Delta_r^{t-1}
                others = [m * x - o for x, o in zip(sent, own[r])]
            outer_step(r, [f / m + x / m for f, x in zip(fresh[r], others)])
            own[r] = fresh[r]
        sent, since = mean, 0
        if trace is not None:
            trace.append({"phi": [[g.clone() for g in ps] for ps in phi], "fresh": fresh, "mean": mean})
    if not final_sync:
        return
    partial = fresh_and_mean()[1] if since else None
    if sent is None and partial is None:
        return
    for r in range(m):
        grads = [torch.zeros_like(g) for g in phi[r]]
        if sent is not None:
            grads = [x - o / m for x, o in zip(sent, own[r])]
        if partial is not None:
            grads = [g + x for g, x in zip(grads, partial)]
        outer_step(r, grads)
    if sent is not None:
        mean_phi = [total([phi[r][i] for r in range(m)]) / m for i in range(len(phi[0]))]
        with torch.no_grad():
            for r in range(m):
                for p, g, x in zip(params[r], phi[r], mean_phi):
                    g.copy_(x)
                    p.copy_(x)


# ---------------------------------------------------------------------------------- plain tensors
class Point(nn.Module):
    """One parameter vector: a replica as plain tensors."""

    def __init__(self, start: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(start.clone())


def quadratic_replicas(m: int, dim: int = 5, lr: float = 0.05, seed: int = 0):
    """``m`` replicas of one vector, each with its own quadratic ``0.5 ||A_r w - b_r||^2`` whose
    batches are drawn by (replica, step); inner plain SGD."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(dim, generator=g)
    a = [torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=g) for _ in range(m)]
    b = [torch.randn(dim, generator=g) for _ in range(m)]
    nets = [Point(start) for _ in range(m)]
    opts = [torch.optim.SGD(n.parameters(), lr=lr) for n in nets]

    def inner(r: int, step: int) -> None:
        noise = torch.randn(dim, generator=torch.Generator().manual_seed(1000 * r + step))
        loss = 0.5 * ((a[r] @ nets[r].w - b[r] - 0.1 * noise) ** 2).sum()
        opts[r].zero_grad()
        loss.backward()
        opts[r].step()

    return nets, inner


def sgd_outer(lr: float) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr)


def test_the_package_rule_is_the_papers_formula():
    """``mean^{t-1} - Delta_m^{t-1}/M + Delta_m^t/M`` (the package) equals the paper's
    ``(1/M) Delta_m^t + (1/M) sum_{k != m} Delta_k^{t-1}`` for every replica."""
    g = torch.Generator().manual_seed(3)
    m = 3
    before = [torch.randn(4, generator=g) for _ in range(m)]
    now = [torch.randn(4, generator=g) for _ in range(m)]
    mean_before = total(before) / m
    for r in range(m):
        paper = now[r] / m + total([before[k] for k in range(m) if k != r]) / m
        (ours,) = eager_outer_gradients([mean_before], [before[r]], [now[r]], m)
        assert torch.allclose(ours, paper, atol=1e-6)


def test_one_replica_is_diloco():
    """With M = 1 the proxy is the average: eager updates are DiLoCo (Nesterov outer, 23 steps of
    H = 5: four rounds and a partial one)."""
    nets, inner = quadratic_replicas(1)
    reference_eager(nets, inner, 23, 5)
    plain, plain_inner = quadratic_replicas(1)
    phi = plain[0].w.detach().clone()
    opt = nesterov_outer([phi])
    for step in range(23):
        plain_inner(0, step)
        if (step + 1) % 5 == 0 or step == 22:
            phi.grad = phi.detach() - plain[0].w.detach()
            opt.step()
            with torch.no_grad():
                plain[0].w.copy_(phi)
    assert torch.allclose(nets[0].w, plain[0].w, atol=1e-6)


def test_proxies_cancel_and_replicas_agree_at_the_end():
    """Outer SGD without momentum (lr 0.7): between rounds two replicas differ by exactly their last
    proxies, ``phi_a - phi_b = -(lr/M) (Delta_a^t - Delta_b^t)`` (nothing accumulates); at the end
    every replica holds ``phi_0 - lr * sum_t mean_t``: each proxy entered once and left once."""
    lr, m = 0.7, 3
    nets, inner = quadratic_replicas(m)
    start = nets[0].w.detach().clone()
    trace: list[dict] = []
    reference_eager(nets, inner, 32, 4, outer=sgd_outer(lr), trace=trace)
    assert len(trace) == 8
    for row in trace:
        phi, fresh = row["phi"], row["fresh"]
        for a in range(m):
            for b in range(m):
                expected = -(lr / m) * (fresh[a][0] - fresh[b][0])
                assert torch.allclose(phi[a][0] - phi[b][0], expected, atol=1e-5)
    applied = total([row["mean"][0] for row in trace])
    for net in nets:
        assert torch.allclose(net.w, start - lr * applied, atol=1e-5)


def test_replicas_do_not_drift_apart_under_nesterov():
    """Nesterov momentum 0.9, lr 0.4, 60 rounds on replicas with different minima: the replicas'
    outer weights differ by the momentum-filtered difference of their proxies only, so the spread
    stays within ``lr P (1 + b/(1-b) + 2 b^2/(1-b)^2)``, ``P`` the largest proxy difference
    ``||Delta_a - Delta_b|| / M`` so far, and does not grow; taking the proxy out again is what
    keeps it there (never taken out, ``g = mean^{t-1} + Delta_m^t / M``, it settles several times wider)."""
    m, lr, b = 2, 0.4, 0.9

    def spread(correct: bool) -> tuple[list[float], list[float]]:
        nets, inner = quadratic_replicas(m, lr=0.02)
        trace: list[dict] = []
        if correct:
            reference_eager(nets, inner, 240, 4, trace=trace, final_sync=False)
        else:  # the uncorrected variant, written out
            params = [list(n.parameters()) for n in nets]
            phi = [[p.detach().clone() for p in ps] for ps in params]
            opts = [nesterov_outer(phi[r]) for r in range(m)]
            sent = None
            for step in range(240):
                for r in range(m):
                    inner(r, step)
                if (step + 1) % 4:
                    continue
                fresh = [[g - p.detach() for g, p in zip(phi[r], params[r])] for r in range(m)]
                for r in range(m):
                    before = sent if sent is not None else torch.zeros_like(phi[r][0])
                    phi[r][0].grad = before + fresh[r][0] / m
                    opts[r].step()
                    with torch.no_grad():
                        params[r][0].copy_(phi[r][0])
                sent = total([fresh[r][0] for r in range(m)]) / m
                trace.append({"phi": [[g.clone() for g in ps] for ps in phi], "fresh": fresh})
        gaps = [float((row["phi"][0][0] - row["phi"][1][0]).norm()) for row in trace]
        proxies = [float((row["fresh"][0][0] - row["fresh"][1][0]).norm()) / m for row in trace]
        return gaps, proxies

    eager, proxies = spread(True)
    bound = lr * (1 + b / (1 - b) + 2 * b**2 / (1 - b) ** 2)
    for t, gap in enumerate(eager):
        assert gap <= bound * max(proxies[: t + 1]) + 1e-6, (t, gap)
    assert max(eager[30:]) <= 1.5 * max(eager[:30]), "the eager spread does not grow"
    uncorrected, _ = spread(False)
    assert min(uncorrected[30:]) > 4 * max(eager[30:]), (uncorrected[-1], eager[-1])


def test_a_poisoned_replica_does_not_reach_the_others():
    nets, inner = quadratic_replicas(3)
    reference_eager(nets, inner, 20, 4, nan_at=(1, 5))
    assert all(bool(torch.isfinite(n.w).all()) for n in nets)


# ---------------------------------------------------------------------------------- the strategy
@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"sync_every": 0}, "sync_every"),
        ({"sync_every": "often"}, "sync_every"),
        ({"outer_kwargs": {"lr": float("nan")}}, "outer_kwargs"),
        ({"outer_kwargs": {"momentum": 1.5}}, "outer_kwargs"),
        ({"offload_global": "yes"}, "offload_global"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"group_size": 0}, "group_size"),
        ({"fragments": 2}, "fragments"),
        ({"fragment_layout": "strided"}, "fragment_layout"),
        ({"sync_delay": 1}, "sync_delay"),
        ({"mixing": 0.5}, "mixing"),
        ({"compressor": "int8"}, "compressor"),
        ({"round_seconds": 1.0}, "round_seconds"),
        ({"fault_tolerance": "torchft"}, "fault_tolerance"),
        ({"no_such_argument": 1}, "no_such_argument"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EagerDiLoCoStrategy(**kwargs)


def test_defaults_and_registration():
    s = EagerDiLoCoStrategy()
    assert s.sync_every == DEFAULT_SYNC_EVERY == 30
    assert (s.fragments, s.sync_delay, s.mixing, s.compressor) == (1, 0, 0.0, None)
    assert repr(s.outer_factory) == (
        "EagerOuterOptimizer(SGD, lr=0.4 up to 2 replicas, else 0.2, momentum=0.9, nesterov=True)"
    )
    EagerDiLoCoStrategy(compressor=None)  # explicitly none is fine
    EagerDiLoCoStrategy.register_strategies(StrategyRegistry)
    for name in ("eager_diloco", "eager_diloco_spawn", "eager_diloco_fork"):
        assert name in StrategyRegistry
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="eager_diloco_fork", logger=False)
    assert isinstance(trainer.strategy, EagerDiLoCoStrategy)


@pytest.mark.parametrize(("replicas", "lr"), [(1, 0.4), (2, 0.4), (3, 0.2), (4, 0.2), (8, 0.2)])
def test_default_outer_learning_rate_by_replicas(replicas, lr):
    """Nesterov SGD, momentum 0.9: lr 0.4 up to two replicas, 0.2 from three (most of an eager step
    is one round old; DiLoCo's 0.6 diverged from four replicas on in this package's measurement)."""
    s = EagerDiLoCoStrategy()
    assert isinstance(s.outer_factory, EagerOuterOptimizer)
    s.outer_factory.strategy = SimpleNamespace(outer_world_size=replicas, global_rank=1, fault_tolerance=None)
    opt = s.outer_factory([torch.zeros(2, requires_grad=True)])
    assert opt.defaults["lr"] == lr and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]


def test_an_explicit_outer_optimizer_wins():
    assert EagerDiLoCoStrategy(outer_kwargs={"lr": 0.7}).outer_factory([torch.zeros(1)]).defaults["lr"] == 0.7
    slow = EagerDiLoCoStrategy(outer_kwargs={"momentum": 0.5}).outer_factory
    assert isinstance(slow, EagerOuterOptimizer) and slow([torch.zeros(1)]).defaults["momentum"] == 0.5
    adam = EagerDiLoCoStrategy(outer_optimizer="Adam", outer_kwargs={"lr": 0.1}).outer_factory
    assert type(adam([torch.zeros(1)])).__name__ == "Adam"
