"""The Triton kernels against their torch references, compiled on a CUDA machine (``gpu`` tests;
skipped without CUDA). On CPU they run interpreted, in a subprocess:
tests/multiprocess/test_kernels.py."""

from __future__ import annotations

import pytest
import torch
from kernels_helpers import HAS_TRITON

from lightning_fedopt.compression import Int4, Int8, Sign, TopK
from lightning_fedopt.compression.kernels import reference

# ---------------------------------------------------------------------- CUDA (skipped without a GPU)
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_kernels_match_reference(bits):
    from lightning_fedopt.compression.kernels import triton_impl as tri

    g = torch.Generator().manual_seed(0)
    for n, block in ((1_000_003, 256), (4097, 64)):
        x = torch.randn(n, generator=g)
        e = torch.randn(n, generator=g) * 0.01
        e_ref, e_gpu = e.clone(), e.cuda()
        c1, s1 = reference.quantize_blockwise(x, bits, block, e_ref)
        c2, s2 = tri.quantize_blockwise(x.cuda(), bits, block, e_gpu)
        assert torch.equal(c1, c2.cpu()) and torch.equal(s1, s2.cpu()) and torch.equal(e_ref, e_gpu.cpu())
        codes, scales = torch.stack([c1, c1]), torch.stack([s1, s1])
        a1 = reference.dequantize_accumulate(codes, scales, n, bits, block)
        a2 = tri.dequantize_accumulate(codes.cuda(), scales.cuda(), n, bits, block)
        assert torch.equal(a1, a2.cpu())
        scale = x.norm().reshape(1) / n**0.5
        assert torch.equal(reference.sign_pack(x, scale), tri.sign_pack(x.cuda(), scale.cuda()).cpu())
        i1, v1 = reference.compact_above(x, 2.5)
        i2, v2 = tri.compact_above(x.cuda(), 2.5)
        assert torch.equal(i1, i2.cpu()) and torch.equal(v1, v2.cpu())


@pytest.mark.gpu
@gpu
def test_cuda_compressors_round_trip():
    x = torch.randn(100_000, device="cuda")
    for c in (Int8(), Int4(), Sign(), TopK(density=0.01)):
        p = c.compress(x)
        y = c.decompress(p)
        assert y.is_cuda and y.shape == x.shape and p.nbytes == c.compressed_nbytes(x.numel())
