"""Runs every Triton kernel under TRITON_INTERPRET=1 on CPU tensors next to its torch reference and
prints one JSON line of findings (used by tests/multiprocess/test_kernels.py, which asserts on them)."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    # only when run as a script: pytest's doctest collection imports this module too, and the
    # interpreter mode must not leak into the test process
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from lightning_fedopt.compression.kernels import reference as ref
    from lightning_fedopt.compression.kernels import triton_impl as tri

    out: dict[str, object] = {}
    g = torch.Generator().manual_seed(0)
    for bits in (8, 4):
        for n, block in ((1000, 64), (77, 32), (256, 256), (5003, 8)):
            x = torch.randn(n, generator=g) * 3
            x[5] = 0.0
            e1 = torch.randn(n, generator=g) * 0.01
            e2 = e1.clone()
            c1, s1 = ref.quantize_blockwise(x, bits, block, e1)
            c2, s2 = tri.quantize_blockwise(x, bits, block, e2)
            key = f"quant{bits}_n{n}_b{block}"
            out[key] = bool(torch.equal(c1, c2) and torch.equal(s1, s2) and torch.equal(e1, e2))
            # dequantize-and-accumulate of 3 chunks
            chunks = [ref.quantize_blockwise(torch.randn(n, generator=g), bits, block) for _ in range(3)]
            codes = torch.stack([c for c, _ in chunks])
            scales = torch.stack([s for _, s in chunks])
            a1 = ref.dequantize_accumulate(codes, scales, n, bits, block)
            a2 = tri.dequantize_accumulate(codes, scales, n, bits, block)
            out[f"deq{bits}_n{n}_b{block}"] = bool(torch.equal(a1, a2))
        # stochastic rounding: same distribution (mean of the decoded value, and P(round up))
        x = torch.full((4096,), 0.3)
        x[0] = 1.0  # scale = 1/qmax -> x / scale = 0.3 * qmax
        qmax = (1 << (bits - 1)) - 1
        ups = []
        for impl in (ref, tri):
            codes, scales = impl.quantize_blockwise(x, bits, 4096, stochastic=True, seed=7)
            dec = ref.dequantize_accumulate(codes, scales, 4096, bits, 4096)
            frac = 0.3 * qmax - int(0.3 * qmax)
            up = float((dec[1:] * qmax > int(0.3 * qmax) + 0.5).float().mean())
            ups.append(up)
            out[f"stoch{bits}_{impl.__name__.rsplit('.', 1)[-1]}_mean_err"] = float(dec[1:].mean() - 0.3)
        out[f"stoch{bits}_p_up"] = ups
        out[f"stoch{bits}_p_expected"] = frac
    # sign pack / unpack
    for n in (1000, 13):
        x = torch.randn(n, generator=g)
        x[3] = 0.0
        scale = x.norm() / n**0.5
        e1, e2 = torch.zeros(n), torch.zeros(n)
        b1 = ref.sign_pack(x, scale, e1)
        b2 = tri.sign_pack(x, scale, e2)
        out[f"signpack_n{n}"] = bool(torch.equal(b1, b2) and torch.equal(e1, e2))
        bits = torch.stack([b1, ref.sign_pack(-x, scale)])
        scales = torch.tensor([scale, 2 * scale])
        out[f"signunpack_n{n}"] = bool(
            torch.equal(
                ref.sign_unpack_accumulate(bits, scales, n), tri.sign_unpack_accumulate(bits, scales, n)
            )
        )
    # top-k threshold compaction
    for n in (5000, 100):
        x = torch.randn(n, generator=g)
        i1, v1 = ref.compact_above(x, 1.5)
        i2, v2 = tri.compact_above(x, 1.5)
        out[f"compact_n{n}"] = bool(torch.equal(i1, i2) and torch.equal(v1, v2)) and len(i1) > 0
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
