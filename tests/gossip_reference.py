"""Single-process reference of gossip: N copies of the test network, theta <- W theta with local steps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from modules import make_batch, make_net
from torch import nn


def _loss(net: nn.Module, ranks: list[int], step: int) -> torch.Tensor:
    """The mean of the losses of ``ranks`` on their batches of ``step`` (a hierarchical group's
    gradient is its members' mean gradient; one rank: its own loss)."""
    loss = 0.0
    for r in ranks:
        x, y = make_batch(r, step)
        loss = loss + nn.functional.mse_loss(net(x), y) / len(ranks)
    return loss


def _finish(
    nets: list, params: list[list[torch.Tensor]], final_average: bool
) -> list[dict[str, torch.Tensor]]:
    """The replicas' state dicts, after one global average of their parameters if ``final_average``."""
    if final_average:
        with torch.no_grad():
            n = len(params)
            mean = [sum(params[r][i] for r in range(n)) / n for i in range(len(params[0]))]
            for r in range(n):
                for p, v in zip(params[r], mean):
                    p.copy_(v)
    return [{f"net.{k}": v.detach().clone() for k, v in m.state_dict().items()} for m in nets]


def reference_gossip(
    n_replicas: int,
    steps: int,
    should_gossip: Callable[[int], bool],
    mixing: Callable[[int], torch.Tensor],
    *,
    gossip_steps: int = 1,
    lr: float = 0.1,
    sam_rho: float | None = None,
    global_merge_from: int | None = None,
    combine: Callable[[int, list[torch.Tensor], list[list[torch.Tensor]]], list[torch.Tensor]] | None = None,
    message: Callable[[int, list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]] | None = None,
    final_average: bool = False,
    members: list[list[int]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Replica ``r`` takes SGD steps on ``make_batch(r, step)`` (SAM steps with ``sam_rho``); after
    each step ``s`` (1-based) for which ``should_gossip(s)``: ``gossip_steps`` times
    ``theta_i <- sum_j W_ij(t) theta_j`` with ``t`` the running gossip-step count, or, from step
    ``global_merge_from`` on, the plain mean of all replicas.

    ``combine(i, own, received_by_sender)`` replaces the weighted mean (robust merges: it gets every
    replica's message, ordered by rank, and ``own``). ``message(i, model, model_at_last_round)`` is what replica
    ``i`` sends (default: its model). With ``members`` (hierarchical groups) replica ``r`` stands for the
    ranks ``members[r]`` and steps on the mean of their losses.
    """
    who = members if members is not None else [[r] for r in range(n_replicas)]
    nets = [make_net(0) for _ in range(n_replicas)]
    opts = [torch.optim.SGD(n.parameters(), lr=lr) for n in nets]
    params = [list(n.parameters()) for n in nets]
    t = 0
    last = [[p.detach().clone() for p in ps] for ps in params]
    for step in range(steps):
        for r, (net, opt) in enumerate(zip(nets, opts)):
            opt.zero_grad()
            _loss(net, who[r], step).backward()
            if sam_rho is not None:
                g = torch.cat([p.grad.reshape(-1) for p in params[r]])
                eps = [p.grad * (sam_rho / (g.norm() + 1e-12)) for p in params[r]]
                with torch.no_grad():
                    for p, e in zip(params[r], eps):
                        p.add_(e)
                opt.zero_grad()
                _loss(net, who[r], step).backward()
                with torch.no_grad():
                    for p, e in zip(params[r], eps):
                        p.sub_(e)
            opt.step()
        if not should_gossip(step + 1):
            continue
        rounds = 1 if global_merge_from is not None and step + 1 >= global_merge_from else gossip_steps
        for _ in range(rounds):
            with torch.no_grad():
                models = [[p.detach().clone() for p in ps] for ps in params]
                sent = [message(r, models[r], last[r]) if message else models[r] for r in range(n_replicas)]
                if global_merge_from is not None and step + 1 >= global_merge_from:
                    new = [[sum(m[i] for m in sent) / n_replicas for i in range(len(sent[0]))]] * n_replicas
                elif combine is not None:
                    new = [combine(r, models[r], sent) for r in range(n_replicas)]
                    t += 1
                else:
                    w = mixing(t).to(torch.float32)
                    new = [
                        [
                            sum(w[r, j] * (models[j] if j == r else sent[j])[i] for j in range(n_replicas))
                            for i in range(len(models[0]))
                        ]
                        for r in range(n_replicas)
                    ]
                    t += 1
                for r in range(n_replicas):
                    for p, v in zip(params[r], new[r]):
                        p.copy_(v)
                last = [[p.detach().clone() for p in ps] for ps in params]
    return _finish(nets, params, final_average)


def reference_choco(
    n_replicas: int,
    steps: int,
    should_gossip: Callable[[int], bool],
    w: torch.Tensor,
    make_compressor: Callable[[], object],
    gamma: float,
    *,
    gossip_steps: int = 1,
    lr: float = 0.1,
    nan_at: tuple[int, int] | None = None,
    global_merge_from: int | None = None,
    final_average: bool = False,
    members: list[list[int]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """CHOCO-SGD (Koloskova et al., ICML 2019, Algorithm 2), written out with one public copy
    ``x_hat[j]`` per replica (every holder of a copy has the same one, so one list stands for them
    all), all starting at the initial model. After each step ``s`` with ``should_gossip(s)``,
    ``gossip_steps`` times: ``q_j = C_j(x_j - x_hat_j)`` for every replica (its own compressor
    ``C_j``, salt ``j``, key ``"gossip/net.<name>"``), ``x_hat_j += q_j``, then
    ``x_i += gamma * sum_j W_ij (x_hat_j - x_hat_i)``.

    ``nan_at=(r, s)``: replica ``r``'s loss is NaN at step ``s``; until it is reset it sends no
    message (its copy stays) and it restarts from ``x_hat_r + gamma * sum_j W_rj (x_hat_j - x_hat_r)``.
    From step ``global_merge_from`` on a round is the exact mean of all replicas, and every copy
    restarts from it. ``members``: as for :func:`reference_gossip` (replica ``j`` is a group, its
    compressor's salt ``j``).
    """
    who = members if members is not None else [[r] for r in range(n_replicas)]
    nets = [make_net(0) for _ in range(n_replicas)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in nets]
    params = [list(m.parameters()) for m in nets]
    names = [f"gossip/net.{k}" for k, _ in nets[0].named_parameters()]
    comps = [make_compressor() for _ in range(n_replicas)]
    hat = [[p.detach().clone() for p in params[0]] for _ in range(n_replicas)]
    w = w.to(torch.float32)
    for step in range(steps):
        for r in range(n_replicas):
            opts[r].zero_grad()
            loss = _loss(nets[r], who[r], step)
            if nan_at is not None and (r, step) == tuple(nan_at):
                loss = loss * float("nan")
            loss.backward()
            opts[r].step()
        if not should_gossip(step + 1):
            continue
        if global_merge_from is not None and step + 1 >= global_merge_from:
            with torch.no_grad():
                mean = [sum(params[r][i] for r in range(n_replicas)) / n_replicas for i in range(len(names))]
                for r in range(n_replicas):
                    for p, v in zip(params[r], mean):
                        p.copy_(v)
                hat = [[v.clone() for v in mean] for _ in range(n_replicas)]
            continue
        for _ in range(gossip_steps):
            with torch.no_grad():
                ok = [all(bool(torch.isfinite(p).all()) for p in params[r]) for r in range(n_replicas)]
                for j in range(n_replicas):
                    for i, name in enumerate(names):
                        # every compressor is called at every step (a diverged replica compresses zeros)
                        diff = (params[j][i] - hat[j][i]) if ok[j] else torch.zeros_like(hat[j][i])
                        q = comps[j].decompress(comps[j].compress(diff.reshape(-1), name, salt=j))
                        if ok[j]:
                            hat[j][i] = hat[j][i] + q.view(hat[j][i].shape)
                for r in range(n_replicas):
                    base = params[r] if ok[r] else hat[r]
                    new = [
                        base[i]
                        + gamma
                        * sum(
                            (
                                w[r, j] * (hat[j][i] - hat[r][i])
                                for j in range(n_replicas)
                                if j != r and w[r, j] > 0
                            ),
                            torch.zeros_like(hat[r][i]),
                        )
                        for i in range(len(names))
                    ]
                    for p, v in zip(params[r], new):
                        p.copy_(v)
                    if not ok[r]:
                        opts[r].state.clear()
    return _finish(nets, params, final_average)
