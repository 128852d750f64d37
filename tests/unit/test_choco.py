"""Compressed gossip (CHOCO-gossip, ``GossipStrategy(compressor=...)``) in one process: the
single-process reference of CHOCO-SGD against plain gossip, ChocoCopies in a checkpoint, compressor
names and argument checks (the real processes: tests/multiprocess/test_choco.py)."""

from __future__ import annotations

import pytest
import torch
from gossip_helpers import Exact, ring_matrix
from gossip_reference import reference_choco, reference_gossip
from runners import assert_close_state

import lightning_fedopt as lf
from lightning_fedopt.compression import (
    FP16,
    ErrorControl,
    Int8,
    RandomProjection,
    Sign,
    TopK,
)
from lightning_fedopt.strategies.gossip.gossip import ChocoCopies, choco_compressor


def test_reference_fp16_with_gamma_one_is_close_to_plain_gossip():
    """Single process: fp16 messages with gamma 1 stay within fp16's rounding of the differences of
    plain gossip (not equal: the rounding is real); small gamma mixes more slowly."""
    w = ring_matrix(4)
    plain = reference_gossip(4, 12, lambda s: s % 2 == 0, lambda t: w)
    fp16 = reference_choco(4, 12, lambda s: s % 2 == 0, w, FP16, 1.0)
    exact = reference_choco(4, 12, lambda s: s % 2 == 0, w, Exact, 1.0)
    for r in range(4):
        assert_close_state(exact[r], plain[r], atol=1e-6)
        assert_close_state(fp16[r], plain[r], atol=1e-3)
    assert max((fp16[0][k] - plain[0][k]).abs().max() for k in plain[0]) > 0
    slow = reference_choco(4, 12, lambda s: s % 2 == 0, w, Exact, 0.1)

    def spread(states):
        return sum((states[0][k] - states[2][k]).norm() for k in states[0])

    assert spread(slow) > spread(plain)


def test_choco_copies_checkpoint_round_trip():
    c = ChocoCopies([torch.ones(3)], holders=[2, 0, 1])
    c.receive(1, [torch.tensor([1.0, 2.0, 3.0])])
    d = ChocoCopies([torch.zeros(3)], holders=[0, 1, 2])
    d.load_state_dict(c.state_dict())
    assert torch.equal(d.hat[1][0], torch.tensor([2.0, 3.0, 4.0])) and torch.equal(d.hat[0][0], torch.ones(3))
    with pytest.raises(ValueError, match="CHOCO copies"):
        ChocoCopies([torch.zeros(3)], holders=[0, 1]).load_state_dict(c.state_dict())


def test_names_make_compressors_without_error_feedback():
    assert choco_compressor("sign").error_feedback is False
    assert choco_compressor("topk").error_feedback is False
    assert isinstance(choco_compressor("int8"), Int8)
    assert lf.GossipStrategy("ring", compressor="int4").compression_ratio is None  # nothing sent yet


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"compressor": "int8", "consensus_lr": 0}, "consensus_lr"),
        ({"compressor": "int8", "consensus_lr": 1.5}, "consensus_lr"),
        ({"compressor": "int8", "consensus_lr": float("nan")}, "consensus_lr"),
        ({"compressor": "int8", "consensus_lr": True}, "consensus_lr"),
        ({"compressor": "int8", "consensus_lr": "0.5"}, "consensus_lr"),
        ({"consensus_lr": 0.5}, "consensus_lr"),  # without a compressor
        ({"compressor": "zip"}, "compressor"),
        ({"compressor": 8}, "compressor"),
        ({"compressor": Sign()}, "compressor.*error_feedback=False"),
        ({"compressor": Int8(error_feedback=True)}, "compressor.*error_feedback=False"),
        ({"compressor": TopK(momentum=0.9, error_feedback=False)}, "compressor.*momentum"),
        ({"compressor": RandomProjection(0.1)}, "compressor.*contractive"),
        ({"compressor": ErrorControl("topk")}, "compressor.*contractive"),
        ({"compressor": "int8", "merge": "median"}, "compressor"),
        ({"compressor": "int8", "align": "dimat"}, "compressor"),
        ({"compressor": "int8", "topology": "one_peer_exponential"}, "topology.*static"),
        ({"compressor": "int8", "topology": "random_matching"}, "topology.*static"),
        ({"compressor": "int8", "topology": lf.topology.one_peer_exponential(8)}, "topology.*static"),
        (
            {
                "compressor": "int8",
                "topology": [torch.eye(2) * 0.5 + 0.25, torch.tensor([[0.9, 0.1], [0.1, 0.9]])],
            },
            "topology.*static",
        ),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lf.GossipStrategy(**kwargs)
