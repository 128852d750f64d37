"""The compressed all-reduce (compression.collective.all_reduce_compressed) in one process, and its
argument checks (the real processes: tests/multiprocess/test_compressed_comm.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_fedopt.comm import Communicator
from lightning_fedopt.compression import (
    get_compressor,
)
from lightning_fedopt.compression.collective import (
    CompressionTotals,
    all_reduce_compressed,
    communicator_totals,
)


def test_single_process_goes_through_the_compressor():
    """Without a process group the 'mean' of one rank is its own value, compressed and decompressed
    (so a 1-device run sees the same quantization as a multi-rank one), and no byte is counted."""
    comm = Communicator()
    x = torch.randn(100)
    y = x.clone()
    c = get_compressor("int4")
    assert comm.compression_ratio is None and comm.last_compressed == {}  # nothing compressed yet
    call = all_reduce_compressed(comm, [y], c)
    assert not torch.equal(x, y) and float((x - y).abs().max()) <= 2 * float(x.abs().max()) / 7
    # 100 values, no padding: 50 bytes of codes + one fp32 scale (a partial block of 256)
    assert comm.stats.bytes_sent == 0 and c.totals.ratio == pytest.approx(400 / (50 + 4))
    assert (call.raw_bytes, call.compressed_bytes, call.excluded_nonfinite) == (400, 54, 0)
    assert c.world_size == 1
    # the communicator's deprecated read-only view delegates to the compression layer
    assert comm.compression_ratio == c.totals.ratio and comm.last_compressed == {"excluded_nonfinite": 0}
    assert comm.compression_totals == {"raw_bytes": 400, "compressed_bytes": 54}
    with pytest.raises(AttributeError):
        comm.compression_totals = {}  # type: ignore[misc]
    # a caller may count into its own totals instead of the compressor's
    mine = CompressionTotals()
    all_reduce_compressed(comm, [y], c, totals=mine)
    assert mine.calls == 1 and c.totals.calls == 1 and communicator_totals(comm).calls == 2


def test_bad_arguments():
    comm = Communicator()
    with pytest.raises(ValueError, match="names"):
        all_reduce_compressed(comm, [torch.ones(3)], get_compressor("int8"), names=["a", "b"])
    with pytest.raises(ValueError, match="floating-point"):
        all_reduce_compressed(comm, [torch.ones(3, dtype=torch.int64)], get_compressor("int8"))
    with pytest.raises(ValueError, match="non-empty"):
        all_reduce_compressed(comm, [torch.ones(0)], get_compressor("sign"))
    with pytest.raises(ValueError, match="`op`"):
        all_reduce_compressed(comm, [torch.ones(3)], get_compressor("int8"), op="max")
    assert not hasattr(comm, "all_reduce_compressed")  # one way down to the wire: the collective module
