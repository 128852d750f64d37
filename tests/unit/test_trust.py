"""Trust nothing that arrives (issue 12), in one process: the plain codec refuses a pickle, and the
agreement fields are the same in every process (peers, shards, the handshake and NaN recovery on
real processes: tests/multiprocess/test_trust.py)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from trust_helpers import Payload

import lightning_fedopt as lf
from lightning_fedopt._plain import PlainValueError, decode_plain, encode_plain
from lightning_fedopt.runtime.handshake import agreement_fields


# ---------------------------------------------------------------------------- the plain codec
def test_plain_values_round_trip_and_a_pickle_is_refused(tmp_path):
    value = {"path": Path("/a/b.ckpt"), "step": 3, "nan": float("nan"), "shape": (2, 3), 1: [None, True]}
    back = decode_plain(encode_plain(value))
    assert back.keys() == value.keys() and back["shape"] == (2, 3) and back["path"] == Path("/a/b.ckpt")
    assert back["nan"] != back["nan"] and back[1] == [None, True]
    assert torch.equal(decode_plain(encode_plain(torch.tensor([[1.5, 2.0]]))), torch.tensor([[1.5, 2.0]]))
    marker = tmp_path / "ran"
    with pytest.raises(PlainValueError, match="not plain JSON"):
        decode_plain(pickle.dumps(Payload(str(marker))))
    with pytest.raises(PlainValueError, match="Payload cannot travel"):
        encode_plain(Payload(str(marker)))
    for bad in (b'{"x": 1, "y": 2}', b'{"T": ["float32", [3], [1, 2]]}', b'{"T": ["Tensor", [1], [1]]}'):
        with pytest.raises(PlainValueError, match="malformed"):
            decode_plain(bad)
    assert not marker.exists()


def test_agreement_fields_are_the_same_in_every_process():
    """The derived fields hold no object address or other per-process text."""
    a = agreement_fields(lf.DiLoCoStrategy(sync_every=4, outer_kwargs={"lr": 0.5}))
    assert a["sync_every"] == "4" and "lr=0.5" in a["outer_factory"] and "0x" not in "".join(a.values())
    assert a["strategy"] == "lightning_fedopt.strategies.diloco.diloco.DiLoCoStrategy"
    assert agreement_fields(lf.CompressedDDPStrategy(compressor="sign"))["compressor"].startswith("Sign(")
