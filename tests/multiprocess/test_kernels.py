"""The Triton kernels against their torch references.

On CPU they run under ``TRITON_INTERPRET=1``, which must be set before triton is imported, so they
run in a subprocess (tests/scripts/kernels_interpret.py) and this module asserts on its findings.
On a CUDA machine the same comparison runs compiled: tests/unit/test_kernels.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernels_helpers import HAS_TRITON

from lightning_fedopt.compression import kernels
from lightning_fedopt.compression.kernels import reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "kernels_interpret.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_kernel_bit_exact(interpreted, bits):
    """Blockwise quantization with fused error feedback, several sizes (tails included): the codes,
    scales and updated error buffers are bit-identical to the reference."""
    keys = [k for k in interpreted if k.startswith(f"quant{bits}_")]
    assert len(keys) == 4 and all(interpreted[k] is True for k in keys), {k: interpreted[k] for k in keys}


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_accumulate_kernel_bit_exact(interpreted, bits):
    keys = [k for k in interpreted if k.startswith(f"deq{bits}_")]
    assert len(keys) == 4 and all(interpreted[k] is True for k in keys)


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_same_distribution(interpreted, bits):
    """tl.rand vs torch's generator: the same probability of rounding up (4095 draws, p ~ 0.1,
    std ~ 0.005) and an unbiased mean."""
    p_ref, p_tri = interpreted[f"stoch{bits}_p_up"]
    expected = interpreted[f"stoch{bits}_p_expected"]
    assert abs(p_ref - expected) < 0.025 and abs(p_tri - expected) < 0.025 and abs(p_ref - p_tri) < 0.025
    assert abs(interpreted[f"stoch{bits}_triton_impl_mean_err"]) < 0.02
    assert abs(interpreted[f"stoch{bits}_reference_mean_err"]) < 0.02


def test_sign_kernels_bit_exact(interpreted):
    for n in (1000, 13):
        assert interpreted[f"signpack_n{n}"] is True and interpreted[f"signunpack_n{n}"] is True


def test_topk_compaction_kernel_exact(interpreted):
    assert interpreted["compact_n5000"] is True and interpreted["compact_n100"] is True


def test_cpu_tensors_use_the_reference_and_import_needs_no_triton():
    assert kernels.backend_for(torch.ones(1)) is reference
    code = (
        "import sys; sys.modules['triton'] = None\n"  # as if triton were not installed
        "import torch, lightning_fedopt\n"
        "from lightning_fedopt.compression import Int8, kernels\n"
        "assert not kernels.triton_available()\n"
        "print(Int8().compress(torch.randn(10)).nbytes)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.strip() == "14", out.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_kernel_benchmark_says_why_without_a_gpu():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "no CUDA GPU" in out.stderr and "Nothing was measured" in out.stderr
