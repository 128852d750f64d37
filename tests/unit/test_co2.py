"""CO2 without processes: the outer optimizer's clipping, the adaptive gap penalty and argument
checks (the real processes: tests/multiprocess/test_co2.py)."""

from __future__ import annotations

import pytest
import torch

import lightning_fedopt as lf
from lightning_fedopt.strategies.diloco.co2 import CO2OuterOptimizer


def test_outer_optimizer_clips_and_keeps_the_clip():
    p = torch.zeros(2)
    opt = CO2OuterOptimizer([p], lr=0.5, momentum=0.5, clip=1.0)
    for _ in range(3):
        p.grad = torch.tensor([10.0, -0.1])
        opt.step()
    m = opt.state[p]["momentum_buffer"]
    assert m[0] == 1.0  # clamped every time, never above the bound
    assert torch.allclose(m[1], torch.tensor(-0.1 - 0.05 - 0.025))
    assert torch.allclose(p, torch.tensor([-1.5, 0.5 * (0.1 + 0.15 + 0.175)]))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"sync_every": 0}, "sync_every"),
        ({"outer_lr": 0.0}, "outer_lr"),
        ({"outer_momentum": 1.0}, "outer_momentum"),
        ({"gap_penalty": -1.0}, "gap_penalty"),
        ({"clip": 0.0}, "clip"),
        ({"gap_penalty": "fixed"}, "gap_penalty"),
        ({"gap_penalty": float("nan")}, "gap_penalty"),
        ({"group_size": 0}, "group_size"),
        ({"fragment_layout": "strided"}, "fragment_layout"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lf.CO2Strategy(**kwargs)


def test_compressor_is_refused_because_it_would_block():
    """The compressed all-reduce is synchronous: CO2 with a compressor would silently lose its
    overlap (it used to be accepted and ran the transfer blocking), so it is refused, saying why."""
    with pytest.raises(ValueError, match=r"`compressor`.*synchronous"):
        lf.CO2Strategy(compressor="int8")
    lf.CO2Strategy(compressor=None)  # explicitly none is fine


def test_adaptive_gap_penalty_formula():
    """gap_penalty="adaptive": per tensor Lambda_t = 1 + ||x_t - x_{t-1}|| / ||1|| (the paper's
    staleness-gap penalty), x_t - x_{t-1} being how far the last outer step moved the weights;
    Lambda is 1 before any step. Written out by hand for two tensors over three steps."""
    a, b = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([3.0])
    opt = CO2OuterOptimizer([a, b], lr=0.8, momentum=0.5, gap_penalty="adaptive", clip=None)
    grads = [
        (torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([-2.0])),
        (torch.tensor([0.3, -0.2, 0.1, 0.0]), torch.tensor([1.0])),
        (torch.tensor([-1.0, 0.5, 0.5, 2.0]), torch.tensor([0.25])),
    ]
    x = [a.clone(), b.clone()]
    prev = [a.clone(), b.clone()]  # x_{t-1}: no step yet, so the first gap is 0
    m = [torch.zeros(4), torch.zeros(1)]
    for ga, gb in grads:
        lams = [1.0 + float((x[i] - prev[i]).norm()) / x[i].numel() ** 0.5 for i in range(2)]
        prev = [t.clone() for t in x]
        for i, g in enumerate((ga, gb)):
            m[i] = 0.5 * m[i] + g / lams[i]
            x[i] = x[i] - 0.8 * m[i]
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
        assert torch.allclose(a, x[0], atol=1e-6) and torch.allclose(b, x[1], atol=1e-6)
    assert lams[0] > 1.0 and lams[1] > 1.0, "the penalty grew once the weights moved"
    # a constant penalty of 1 ends elsewhere
    c = torch.tensor([0.5, -1.0, 2.0, 0.0])
    plain = CO2OuterOptimizer([c], lr=0.8, momentum=0.5, gap_penalty=1.0, clip=None)
    for ga, _ in grads:
        c.grad = ga.clone()
        plain.step()
    assert (c - a).abs().max() > 1e-3
