"""GossipStrategy's argument checks and registered names, without processes (the real processes:
tests/multiprocess/test_gossip.py)."""

from __future__ import annotations

import pytest

import lightning_fedopt as lf


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"topology": "star"}, "topology"),
        ({"topology": [[0.9, 0.2], [0.1, 0.8]]}, "doubly stochastic"),
        ({"topology": [[1.0, 0.0], [0.0, 1.0]]}, "not connected"),
        ({"gossip_every": 0}, "gossip_every"),
        ({"gossip_steps": 0}, "gossip_steps"),
        ({"merge": "avg"}, "merge"),
        ({"merge": "ties"}, "merge"),
        ({"sam_rho": 0.0}, "sam_rho"),
        ({"merge_from": 1.5}, "merge_from"),
        ({"merge_from": 0}, "merge_from"),
        ({"topology_seed": -1}, "topology_seed"),
        ({"align": "zipit"}, "align"),
        ({"gossip_evry": 2}, "gossip_evry"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lf.GossipStrategy(**kwargs)


def test_registered_names():
    from lightning.pytorch.strategies import StrategyRegistry

    assert {"gossip", "gossip_fork", "gossip_spawn"} <= set(StrategyRegistry)


def test_dimat_refuses_group_size():
    with pytest.raises(ValueError, match="group_size"):
        lf.GossipStrategy("ring", align="dimat", group_size=2)
