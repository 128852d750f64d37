"""Local SGD / FedAvg without processes: FedAU's state by hand, the choice of participants, argument
checks (the real processes: tests/multiprocess/test_local_sgd.py)."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_fedopt as lf
from lightning_fedopt.strategies.local_sgd.local_sgd import FedAUState, choose_participants


def test_initial_sync_bad_value():
    with pytest.raises(ValueError, match="`initial_sync`"):
        lf.LocalSGDStrategy(initial_sync="skip")


def test_fedau_state_hand_computed():
    s = FedAUState(3, cutoff=2)
    # round 0: replicas 0 and 1 take part
    assert s.step([0, 1]) == [1.0, 1.0, 1.0]
    # replica 2 has missed 1 round; round 1: only 0
    assert s.step([0]) == [1.0, 1.0, 1.0]
    # replica 2 hit the cutoff (2 missed rounds) and recorded 2; replica 1 missed 1
    assert s.weights() == [1.0, 1.0, 2.0]
    assert s.step([1, 2]) == [1.0, 1.0, 2.0]
    # replica 1 recorded interval 2 -> mean(1, 2); replica 2 recorded 0+1 -> mean(2, 1)
    assert s.weights() == [1.0, 1.5, 1.5]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sync_every": 0}, "sync_every"),
        ({"sync_every": -3}, "sync_every"),
        ({"sync_every": 2.5}, "sync_every"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"participation": 0.0}, "participation"),
        ({"participation": 1.5}, "participation"),
        ({"participation": [0.5, 1.2]}, "participation"),
        ({"participation": "all"}, "participation"),
        ({"weighting": "size"}, "weighting"),
        ({"evaluate": "global"}, "evaluate"),
        ({"server_lr": 0}, "server_lr"),
        ({"fedau_cutoff": 0}, "fedau_cutoff"),
        ({"adaptive_weights": True, "weighting": "samples"}, "adaptive_weights"),
        ({"start_method": "thread"}, "start_method"),
        ({"sync_evry": 4}, "sync_evry"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lf.LocalSGDStrategy(**kwargs)


def test_choose_participants_is_deterministic():
    a = [choose_participants(k, 10, 0.3, seed=1) for k in range(20)]
    b = [choose_participants(k, 10, 0.3, seed=1) for k in range(20)]
    assert a == b and all(len(x) == 3 for x in a)
    counts = torch.zeros(10)
    for k in range(400):
        counts[choose_participants(k, 10, 0.3)] += 1
    assert counts.min() > 0.2 * 400 and counts.max() < 0.4 * 400
    assert math.isclose(float(counts.sum()), 400 * 3)
