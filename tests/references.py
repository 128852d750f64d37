"""Single-process references of the replicas' math: Local SGD (with its variants) replayed on the
same known batches as :class:`modules.KnownBatchModule`. DiLoCo/CO2/NoLoCo: ``reference_outer.py``;
gossip: ``gossip_reference.py``; the compressed all-reduce: ``compressed_reference.py``."""

from __future__ import annotations

from typing import Any

import torch
from modules import make_batch, make_net
from torch import nn


def reference_local_sgd(
    n_replicas: int,
    steps: int,
    schedule: Any,
    *,
    lr: float = 0.1,
    seed: int = 0,
    optimizer: str = "sgd",
    nan_at: tuple[int, int] | None = None,
    init_offset: float = 0.0,
    batch_sizes: list[int] | None = None,
    participants_fn: Any = None,
    fedau_cutoff: int | bool | None = False,
    server_lr: float = 1.0,
    average_optimizer_state: bool = False,
    final_average: bool = True,
    select_fn: Any = None,
) -> list[dict[str, torch.Tensor]]:
    """Single-process reference of Local SGD / FedAvg / FedAU on ``n_replicas`` copies.

    Replica ``r`` takes optimizer steps on :func:`make_batch` ``(r, step)``. After each step that
    ``schedule.should_sync`` names, the participants (``participants_fn(round)``, default all)
    are averaged, weighted by the samples they saw since the last average when ``batch_sizes``
    is given (uniform otherwise), or combined by FedAU (``fedau_cutoff`` not False); replicas with
    non-finite weights are left out; everyone continues from the result. At the end, unless the
    last step was a sync, all replicas are averaged once more (the strategy's final sync).
    ``select_fn(round, step, mean_losses)`` chooses the participants from every replica's mean
    training loss in the round instead (loss-based replica selection).
    """
    nets = [make_net(seed) for _ in range(n_replicas)]
    with torch.no_grad():
        for n in nets:
            for p in n.parameters():
                p.add_(init_offset)
    if optimizer == "adam":
        opts = [torch.optim.Adam(n.parameters(), lr=lr) for n in nets]
    else:
        opts = [torch.optim.SGD(n.parameters(), lr=lr) for n in nets]
    params = [list(n.parameters()) for n in nets]
    global_x = [p.detach().clone() for p in params[0]]
    # FedAU bookkeeping, written out independently of the package's FedAUState
    since = [0] * n_replicas
    intervals: list[list[int]] = [[] for _ in range(n_replicas)]
    samples = [0] * n_replicas
    rounds = 0
    synced_last = False
    round_losses: list[list[float]] = [[] for _ in range(n_replicas)]

    def finite(r: int) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in params[r])

    def weight(r: int) -> float:
        return float(samples[r]) if batch_sizes is not None and samples[r] > 0 else 1.0

    def average(members: list[int]) -> list[torch.Tensor] | None:
        ok = [r for r in members if finite(r)]
        if not ok:
            return None
        total = sum(weight(r) for r in ok)
        return [sum(params[r][i] * weight(r) for r in ok) / total for i in range(len(params[0]))]

    for step in range(steps):
        for r, (net, opt) in enumerate(zip(nets, opts)):
            x, y = make_batch(r, step)
            loss = nn.functional.mse_loss(net(x), y)
            if nan_at is not None and (r, step) == tuple(nan_at):
                loss = loss * float("nan")
            round_losses[r].append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            samples[r] += batch_sizes[r] if batch_sizes is not None else 1
        synced_last = False
        if not schedule.should_sync(step + 1):
            continue
        if select_fn is not None:
            means = [sum(v) / len(v) for v in round_losses]
            members = select_fn(rounds, step + 1, means)
        else:
            members = participants_fn(rounds) if participants_fn is not None else list(range(n_replicas))
        round_losses = [[] for _ in range(n_replicas)]
        was_finite = [finite(r) for r in range(n_replicas)]
        with torch.no_grad():
            if fedau_cutoff is not False:
                omega = [sum(iv) / len(iv) if iv else 1.0 for iv in intervals]
                new = [
                    global_x[i]
                    + server_lr
                    / n_replicas
                    * sum(
                        (omega[r] * (params[r][i] - global_x[i]) for r in members if was_finite[r]),
                        torch.zeros(()),
                    )
                    for i in range(len(global_x))
                ]
                for r in range(n_replicas):
                    if r in members:
                        intervals[r].append(since[r] + 1)
                        since[r] = 0
                    else:
                        since[r] += 1
                        if fedau_cutoff is not None and since[r] >= fedau_cutoff:
                            intervals[r].append(since[r])
                            since[r] = 0
            else:
                # nobody took part: everyone restarts from the last round's result
                new = average(members) if members else [g.clone() for g in global_x]
                assert new is not None
            if average_optimizer_state:
                ok = [r for r in members if was_finite[r]]
                for i in range(len(params[0])):
                    states = [opts[r].state[params[r][i]] for r in ok]
                    for key in states[0]:
                        mean = sum(s[key] for s in states) / len(states)
                        for r in range(n_replicas):
                            opts[r].state[params[r][i]][key] = mean.clone()
            for r in range(n_replicas):
                for p, v in zip(params[r], new):
                    p.copy_(v)
                if not was_finite[r]:
                    opts[r].state.clear()
            global_x = [v.clone() for v in new]
        rounds += 1
        samples = [0] * n_replicas
        synced_last = True
    if final_average and not synced_last:
        new = average(list(range(n_replicas)))
        with torch.no_grad():
            for r in range(n_replicas):
                for p, v in zip(params[r], new):
                    p.copy_(v)
    return [{f"net.{k}": v.detach().clone() for k, v in n.state_dict().items()} for n in nets]
