"""Robust merging against a Byzantine replica: 1 of 4 replicas sends sign-flipped or huge updates.

A single-process simulation of fully connected gossip on the digits task with the package's merge
operators (the multi-process path is checked against the same math in test_gossip.py, and
``python -m benchmarks.gossip --robust`` runs the experiment on real processes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fedopt.merging import Contribution, ContributionSet, Merge


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: torch's intra-op threads only fight over the shared cores (20x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


N, ATTACKER, STEPS, EVERY = 4, 3, 160, 4
ATTACKS = {
    "none": lambda model, last: model,
    # the round's update negated and amplified
    "sign_flip": lambda model, last: [a - 4 * (m - a) for m, a in zip(model, last)],
    # the round's update blown up
    "huge": lambda model, last: [a + 100 * (m - a) for m, a in zip(model, last)],
}


def simulate(method: str, attack: str, seed: int = 0) -> float:
    """Validation loss of the honest replicas' models (their mean loss) after training."""
    from examples.digits import load_digits_tensors

    train, val = load_digits_tensors(0)
    (x, y), (xv, yv) = train.tensors, val.tensors
    torch.manual_seed(seed)
    init = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    nets = [nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)) for _ in range(N)]
    for n in nets:
        n.load_state_dict(init.state_dict())
    opts = [torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9) for n in nets]
    parts = torch.arange(len(x)).chunk(N)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(N)]
    merge = Merge(method, **({"f": 1} if method in ("trimmed_mean", "nna") else {}))
    last = [[p.detach().clone() for p in n.parameters()] for n in nets]
    for step in range(STEPS):
        for r in range(N):
            idx = parts[r][torch.randint(0, len(parts[r]), (32,), generator=gens[r])]
            opts[r].zero_grad()
            nn.functional.cross_entropy(nets[r](x[idx]), y[idx]).backward()
            opts[r].step()
        if (step + 1) % EVERY:
            continue
        with torch.no_grad():
            models = [[p.detach().clone() for p in n.parameters()] for n in nets]
            sent = [ATTACKS[attack](models[r], last[r]) if r == ATTACKER else models[r] for r in range(N)]
            new = []
            for i in range(N):
                cs = ContributionSet(
                    Contribution(j, step, tuple(models[i] if j == i else sent[j])) for j in range(N)
                )
                new.append(merge(cs, reference=models[i]))
            for n, v in zip(nets, new):
                for p, t in zip(n.parameters(), v):
                    p.copy_(t)
            last = [[p.detach().clone() for p in n.parameters()] for n in nets]
    with torch.no_grad():
        losses = [float(nn.functional.cross_entropy(nets[r](xv), yv)) for r in range(N) if r != ATTACKER]
    return sum(losses) / len(losses)


def test_trimmed_mean_and_nna_against_a_byzantine_replica():
    """Measured (160 steps, 4 replicas, 1 attacker): no attack 0.0798 (mean) / 0.0821 (nna);
    huge updates: mean diverges, trimmed mean 0.0792, nna 0.0890; sign-flipped (x4) updates: mean
    diverges, nna 0.0890 (+8% over its own no-attack run), trimmed mean 0.128 (+60%: with N=4 and
    f=1 the coordinate-wise trim keeps the two honest values nearest the attacker's side, which
    shrinks every honest update; a known weakness of trimmed mean at this ratio, reported, not hidden)."""
    clean = simulate("mean", "none")
    clean_nna = simulate("nna", "none")
    results = {(m, a): simulate(m, a) for m in ("mean", "trimmed_mean", "nna") for a in ("huge", "sign_flip")}
    print(f"\nno attack: mean {clean:.4f}, nna {clean_nna:.4f}")
    for (m, a), loss in results.items():
        print(f"{m:>13} {a:>9}: {loss:.4g} ({loss / clean - 1:+.1%} vs no-attack mean)")
    assert clean_nna <= 1.10 * clean
    # huge updates: both robust operators stay within 10% of the no-attack run; the mean diverges
    assert results[("trimmed_mean", "huge")] <= 1.10 * clean
    assert results[("nna", "huge")] <= 1.10 * clean_nna
    assert results[("mean", "huge")] > 100 * clean
    # sign-flipped updates: NNA stays within 10% of its no-attack run; the mean diverges
    assert results[("nna", "sign_flip")] <= 1.10 * clean_nna
    assert results[("mean", "sign_flip")] > 100 * clean
    # trimmed mean degrades (see the docstring) but by far less than the mean
    assert results[("trimmed_mean", "sign_flip")] < 2 * clean
