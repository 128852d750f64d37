"""Which strategies take ``fault_tolerance="torchft"``: the ones that do, and each refusal's reason."""

from __future__ import annotations

import pytest

import lightning_fedopt as lf


def test_diloco_streaming_co2_and_local_sgd_take_it():
    assert lf.DiLoCoStrategy(fault_tolerance="torchft").fault_tolerance == "torchft"
    assert lf.StreamingDiLoCoStrategy(fault_tolerance="torchft").fault_tolerance == "torchft"
    assert lf.CO2Strategy(fault_tolerance="torchft").fault_tolerance == "torchft"
    assert lf.LocalSGDStrategy(fault_tolerance="torchft").fault_tolerance == "torchft"
    assert lf.DiLoCoStrategy().fault_tolerance is None


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: lf.SparseLoCoStrategy(fault_tolerance="torchft"), "does not fault-manage"),
        (lambda: lf.DiLoCoStrategy(compressor="int8", fault_tolerance="torchft"), "does not fault-manage"),
        (lambda: lf.DiLoCoStrategy(round_seconds=1.0, fault_tolerance="torchft"), "round_seconds"),
        (lambda: lf.LocalSGDStrategy(participation=0.5, fault_tolerance="torchft"), "participation"),
        (lambda: lf.LocalSGDStrategy(compressor="int8", fault_tolerance="torchft"), "compressor"),
        (lambda: lf.FedSpeedStrategy(fault_tolerance="torchft"), "not a torchft round"),
        (lambda: lf.NoLoCoStrategy(fault_tolerance="torchft"), "not a quorum round"),
        (lambda: lf.GossipStrategy(fault_tolerance="torchft"), "not a quorum round"),
        (lambda: lf.DiLoCoStrategy(fault_tolerance="torchft", elastic=True), "exclude each other"),
        (lambda: lf.DiLoCoStrategy(fault_tolerance="torchft", group_size=2), "group_size=1"),
        (lambda: lf.DiLoCoStrategy(fault_tolerance="torchft", sync_every="auto"), "sync_every='auto'"),
        (lambda: lf.DiLoCoStrategy(fault_tolerance="torchfts"), "fault_tolerance"),
    ],
)
def test_refusals_say_why(build, reason):
    with pytest.raises(ValueError, match="fault_tolerance") as err:
        build()
    assert reason in str(err.value), str(err.value)
