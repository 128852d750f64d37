"""Strategies with ``compressor=``: presets and argument checks, without processes (the real
processes: tests/multiprocess/test_compressed_strategies.py)."""

from __future__ import annotations

import pytest
import torch

import lightning_fedopt as lf


def test_presets_and_bad_arguments():
    assert isinstance(lf.CompressedDDPStrategy(preset="dgc").compressor, lf.compression.TopK)
    a, b = lf.CompressedDDPStrategy(preset="dgc"), lf.CompressedDDPStrategy(preset="dgc")
    assert a.compressor is not b.compressor
    with pytest.raises(ValueError, match="`preset`"):
        lf.CompressedDDPStrategy(preset="fast")
    with pytest.raises(ValueError, match="`compressor`"):
        lf.CompressedDDPStrategy(compressor="int2")
    with pytest.raises(ValueError, match="`warmup_steps`"):
        lf.compression.OneBitAdam([torch.nn.Parameter(torch.ones(1))], warmup_steps=0)
