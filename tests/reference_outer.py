"""Single-process references of the outer-optimizer algorithms (DiLoCo, streaming DiLoCo, CO2,
NoLoCo), written from the papers' update rules independently of the package's code.

Replica ``r`` takes its optimizer step ``s`` on :func:`modules.make_batch` ``(r, s)``, exactly as
:class:`modules.KnownBatchModule` does under the strategies.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from modules import make_batch, make_net
from torch import nn


def make_replicas(n: int, optimizer: str, lr: float, seed: int = 0):
    nets = [make_net(seed) for _ in range(n)]
    if optimizer == "adam":
        opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in nets]
    else:
        opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in nets]
    return nets, opts


def local_step(net: nn.Module, opt: torch.optim.Optimizer, rank: int | list[int], step: int) -> None:
    """One optimizer step on ``make_batch(rank, step)``; for a group of ranks (hierarchical
    training) on the mean of their losses, i.e. the mean of their gradients."""
    ranks = [rank] if isinstance(rank, int) else rank
    loss = 0.0
    for r in ranks:
        x, y = make_batch(r, step)
        loss = loss + nn.functional.mse_loss(net(x), y) / len(ranks)
    opt.zero_grad()
    loss.backward()
    opt.step()


def states(nets: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{f"net.{k}": v.detach().clone() for k, v in m.state_dict().items()} for m in nets]


def default_outer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    # DiLoCoStrategy's default for 2 replicas (Scaling Laws for DiLoCo, Figure 7)
    return torch.optim.SGD(params, lr=0.6, momentum=0.9, nesterov=True)


def reference_diloco(
    n: int,
    steps: int,
    sync_every: int,
    *,
    fragments: list[list[int]] | None = None,
    delay: int = 0,
    alpha: float = 0.0,
    optimizer: str = "sgd",
    lr: float = 0.1,
    outer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] = default_outer,
    final_sync: bool = True,
    members: list[list[int]] | None = None,
    compress: Callable[[list[list[torch.Tensor]], list[str]], list[torch.Tensor]] | None = None,
    nan_at: tuple[int, int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """DiLoCo (fragments None) or streaming DiLoCo with the given fragments (lists of parameter
    indices in ``net.parameters()`` order). With ``members`` (hierarchical groups), replica ``k``
    stands for the ranks ``members[k]`` and steps on the mean of their gradients. ``compress``
    replaces the exact mean of the pseudo-gradients: it gets every replica's list and the names.

    Fragment ``p`` of ``F`` launches after steps ``k H + ((p + 1) H // F) mod H`` (> 0): the mean
    pseudo-gradient ``phi_p - mean_i theta_{i,p}`` is taken then, and applied ``delay`` steps later:
    the outer optimizer of fragment ``p`` steps ``phi_p``; every replica's fragment becomes
    ``phi + alpha (theta - phi)``. The end of training applies a fragment still in flight, then
    takes one outer step of every fragment unless the replicas already hold the global weights.

    ``nan_at`` (replica, step): that replica's weights become NaN after that step. A fragment's
    mean is over the replicas whose fragment was finite when it launched; on apply, a replica that
    was not finite then, or is not finite now anywhere, restarts from the outer weights of every
    fragment (plain SGD: no optimizer state to clear).
    """
    nets, opts = make_replicas(n, optimizer, lr)
    who = members if members is not None else list(range(n))
    params = [list(m.parameters()) for m in nets]
    n_params = len(params[0])
    streaming = fragments is not None
    frags = fragments if fragments is not None else [list(range(n_params))]
    phi = [p.detach().clone() for p in params[0]]
    outers = [outer([phi[i] for i in f]) for f in frags]
    pending: dict[int, tuple[int, list[torch.Tensor]]] = {}  # fragment -> (apply step, mean delta)

    names = [f"net.{k}" for k, _ in nets[0].named_parameters()]

    def finite(r: int, idx: list[int]) -> bool:
        return all(bool(torch.isfinite(params[r][i]).all()) for i in idx)

    def mean_delta(f: list[int]) -> tuple[list[torch.Tensor], list[bool]]:
        ok = [finite(r, f) for r in range(n)]
        if compress is not None:
            return compress(
                [[phi[i] - params[r][i].detach() for i in f] for r in range(n)], [names[i] for i in f]
            ), ok
        good = [r for r in range(n) if ok[r]]
        return [sum(phi[i] - params[r][i].detach() for r in good) / len(good) for i in f], ok

    def apply(p: int, launched: tuple[list[torch.Tensor], list[bool]], a: float) -> None:
        delta, ok = launched
        for i, d in zip(frags[p], delta):
            phi[i].grad = d.clone()
        outers[p].step()
        outers[p].zero_grad(set_to_none=True)
        with torch.no_grad():
            for r in range(n):
                if not ok[r] or not finite(r, list(range(n_params))):
                    for i in range(n_params):  # a poisoned replica restarts from phi everywhere
                        params[r][i].copy_(phi[i])
                    continue
                for i in frags[p]:
                    params[r][i].copy_(phi[i] + a * (params[r][i] - phi[i]))

    at_global = True
    for step in range(steps):
        for r in range(n):
            local_step(nets[r], opts[r], who[r], step)
            if nan_at is not None and (r, step) == tuple(nan_at):
                with torch.no_grad():
                    for p_ in params[r]:
                        p_.fill_(float("nan"))
        at_global = False
        s = step + 1
        for p in list(pending):
            if pending[p][0] == s:
                apply(p, pending.pop(p)[1], alpha if streaming else 0.0)
        for p, f in enumerate(frags):
            offset = ((p + 1) * sync_every // len(frags)) % sync_every
            if s % sync_every == offset:
                delta = mean_delta(f)
                if delay == 0:
                    apply(p, delta, alpha if streaming else 0.0)
                    at_global = not streaming or alpha == 0.0
                    at_global = at_global and len(frags) == 1
                else:
                    pending[p] = (s + delay, delta)
    if final_sync:
        for p in list(pending):
            apply(p, pending.pop(p)[1], alpha if streaming else 0.0)
        if not at_global:
            for p, f in enumerate(frags):
                apply(p, mean_delta(f), 0.0)
    return states(nets)


def reference_noloco(
    n: int,
    steps: int,
    sync_every: int,
    groups_fn: Callable[[int], list[list[int]]],
    *,
    alpha: float = 0.7,
    beta: float = 0.5,
    lr: float = 0.1,
    final_sync: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """NoLoCo: every H steps each group G of ``groups_fn(round)`` computes
    g = mean_G(theta_j - phi_j), phi_bar = mean_G phi_j; m_i <- beta m_i + alpha g + alpha (phi_bar - phi_i);
    phi_i <- phi_i + m_i; theta_i <- phi_i. The end of training averages all replicas."""
    nets, opts = make_replicas(n, "sgd", lr)
    params = [list(m.parameters()) for m in nets]
    phi = [[p.detach().clone() for p in params[r]] for r in range(n)]
    mom = [[torch.zeros_like(p) for p in params[r]] for r in range(n)]
    rounds = 0
    for step in range(steps):
        for r in range(n):
            local_step(nets[r], opts[r], r, step)
        if (step + 1) % sync_every:
            continue
        with torch.no_grad():
            new_phi = [[None] * len(phi[0]) for _ in range(n)]
            for group in groups_fn(rounds):
                for i in range(len(phi[0])):
                    g = sum(params[j][i] - phi[j][i] for j in group) / len(group)
                    phi_bar = sum(phi[j][i] for j in group) / len(group)
                    for r in group:
                        mom[r][i] = beta * mom[r][i] + alpha * g + alpha * (phi_bar - phi[r][i])
                        new_phi[r][i] = phi[r][i] + mom[r][i]
            for r in range(n):
                for i, p in enumerate(params[r]):
                    phi[r][i] = new_phi[r][i]
                    p.copy_(phi[r][i])
        rounds += 1
        synced_last = True
    if (final_sync and not synced_last) or (final_sync and n > 1):
        with torch.no_grad():
            for i in range(len(params[0])):
                mean = sum(params[r][i] for r in range(n)) / n
                for r in range(n):
                    params[r][i].copy_(mean)
    return states(nets)


def reference_co2(
    n: int,
    steps: int,
    sync_every: int,
    *,
    alpha: float = 1.0,
    beta: float = 0.5,
    gap_penalty: float | str = 1.0,
    clip: float | None = 1.0,
    lr: float = 0.1,
    optimizer: str = "sgd",
    final_sync: bool = True,
    members: list[list[int]] | None = None,
    nan_at: tuple[int, int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """CO2 with one round of staleness. At the end of round t the mean pseudo-gradient
    d_t = phi_t - mean_i theta_i is *sent*; the outer step uses d_{t-1} (sent a round earlier):
    m <- beta m + d_{t-1} / gap_penalty; m <- clamp(m, -clip, clip); phi <- phi - alpha m.
    Every replica restarts each round from phi. The end of training applies the pending d, then
    the partial round's pseudo-gradient if steps were taken since. With ``nan_at`` (replica, step)
    that replica's weights become NaN after that step; the means are over the finite replicas, and
    the restart from phi resets it. With ``gap_penalty="adaptive"`` (the paper's staleness-gap
    penalty) each tensor's divisor is Lambda = 1 + ||phi_now - phi_then|| / ||1||, phi_then the
    global weights d was computed against and ||1|| = sqrt(numel) (the norm of an all-ones tensor).
    The round launched at the second sync (or the partial round after a single sync) started from
    the same phi as the first: its d is shifted by the first outer step, i.e. taken against the
    phi it is applied to."""
    nets, opts = make_replicas(n, optimizer, lr)
    who = members if members is not None else list(range(n))
    params = [list(m.parameters()) for m in nets]
    phi = [p.detach().clone() for p in params[0]]
    mom = [torch.zeros_like(p) for p in phi]
    # (mean pseudo-gradient, the global weights it was computed against)
    pending: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def mean_delta() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ok = [r for r in range(n) if all(bool(torch.isfinite(p).all()) for p in params[r])]
        d = [sum(phi[i] - params[r][i].detach() for r in ok) / len(ok) for i in range(len(phi))]
        return d, [g.clone() for g in phi]

    def penalty(i: int, phi_then: list[torch.Tensor]) -> float:
        if gap_penalty != "adaptive":
            return float(gap_penalty)
        return 1.0 + float((phi[i] - phi_then[i]).norm()) / math.sqrt(phi[i].numel())

    def outer(sent: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
        d, phi_then = sent
        lams = [penalty(i, phi_then) for i in range(len(phi))]
        for i in range(len(phi)):
            mom[i] = beta * mom[i] + d[i] / lams[i]
            if clip is not None:
                mom[i] = mom[i].clamp(-clip, clip)
            phi[i] = phi[i] - alpha * mom[i]

    def restart() -> None:
        with torch.no_grad():
            for r in range(n):
                for p, g in zip(params[r], phi):
                    p.copy_(g)

    def outer_shifting(stale, later):
        """outer(stale); ``later`` started from the weights ``stale`` did when nothing had been
        applied before it (the fit's second or partial round after one sync): shift its pseudo-gradient
        by the step just taken, i.e. take it against the weights it is applied to."""
        before = [g.clone() for g in phi]
        outer(stale)
        if later is None or syncs != 1:
            return later
        d, phi_then = later
        return [x + (g - b) for x, g, b in zip(d, phi, before)], phi_then

    since = syncs = 0
    for step in range(steps):
        for r in range(n):
            local_step(nets[r], opts[r], who[r], step)
            if nan_at is not None and (r, step) == tuple(nan_at):
                with torch.no_grad():
                    for p in params[r]:
                        p.fill_(float("nan"))
        since += 1
        if (step + 1) % sync_every:
            continue
        sent = mean_delta()
        if pending is not None:
            sent = outer_shifting(pending, sent)
        pending = sent
        restart()
        since = 0
        syncs += 1
    if final_sync:
        partial = mean_delta() if since else None  # against the weights the partial round started from
        if pending is not None:
            partial = outer_shifting(pending, partial)
        if partial is not None:
            outer(partial)
        restart()
    return states(nets)


def reference_fedspeed(
    n: int,
    steps: int,
    sync_every: int,
    *,
    rho: float,
    alpha: float,
    lam: float,
    lr: float = 0.1,
    final_sync: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """FedSpeed with SGD: g1 = grad f(x); g2 = grad f(x + rho g1/||g1||) on the same batch;
    x <- x - lr ((1-alpha) g1 + alpha g2 - g_hat + (x - x_t)/lam). Every H steps:
    g_hat <- g_hat - (x - x_t)/lam; x_t <- mean_i (x_i - lam g_hat_i); every x_i <- x_t."""
    nets = [make_net(0) for _ in range(n)]
    params = [list(m.parameters()) for m in nets]
    x_t = [p.detach().clone() for p in params[0]]
    g_hat = [[torch.zeros_like(p) for p in params[0]] for _ in range(n)]

    def grads(r: int, step: int) -> list[torch.Tensor]:
        x, y = make_batch(r, step)
        loss = nn.functional.mse_loss(nets[r](x), y)
        return list(torch.autograd.grad(loss, params[r]))

    def round_end() -> None:
        with torch.no_grad():
            sent = []
            for r in range(n):
                for i, p in enumerate(params[r]):
                    g_hat[r][i] = g_hat[r][i] - (p - x_t[i]) / lam
                sent.append([p - lam * g_hat[r][i] for i, p in enumerate(params[r])])
            for i in range(len(x_t)):
                x_t[i] = sum(sent[r][i] for r in range(n)) / n
            for r in range(n):
                for i, p in enumerate(params[r]):
                    p.copy_(x_t[i])

    since = 0
    for step in range(steps):
        for r in range(n):
            g1 = grads(r, step)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in g1))
            with torch.no_grad():
                for p, g in zip(params[r], g1):
                    p.add_(rho * g / norm)
            g2 = grads(r, step)
            with torch.no_grad():
                for p, g in zip(params[r], g1):
                    p.sub_(rho * g / norm)
                for i, p in enumerate(params[r]):
                    d = (1 - alpha) * g1[i] + alpha * g2[i] - g_hat[r][i] + (p - x_t[i]) / lam
                    p.sub_(lr * d)
        since += 1
        if (step + 1) % sync_every == 0:
            round_end()
            since = 0
    if final_sync and since:
        round_end()
    return states(nets)


def run_and_resume(
    tmp_path, module_factory, strategy_factory, total: int, at: int, n: int = 2, resumed_callbacks=()
):
    """On ``n`` ranks: fit ``total`` steps uninterrupted; fit ``at`` steps with a checkpoint at step
    ``at``; resume from it to ``total`` (with ``resumed_callbacks`` as well). Returns (uninterrupted
    ranks, resumed ranks, checkpoint path)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from runners import SaveFinal, fit_fork, load_ranks, trainer_kwargs

    full = fit_fork(tmp_path / "full", module_factory(), strategy_factory(), n=n, max_steps=total)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=at, save_top_k=-1, filename="mid")
    fit_fork(
        tmp_path / "first",
        module_factory(),
        strategy_factory(),
        n=n,
        max_steps=at,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    path = tmp_path / "ckpt" / "mid.ckpt"
    trainer = L.Trainer(
        strategy=strategy_factory(),
        callbacks=[SaveFinal(tmp_path / "resumed"), *resumed_callbacks],
        **trainer_kwargs(devices=n, max_steps=total),
    )
    trainer.fit(module_factory(), ckpt_path=str(path))
    return full, load_ranks(tmp_path / "resumed", n), path
