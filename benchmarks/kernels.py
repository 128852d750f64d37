"""Bandwidth of the compression kernels on a CUDA GPU, against a device-to-device copy and the torch reference.

    python -m benchmarks.kernels                      # 2^24 and 2^26 fp32 values, N=8 chunks
    python -m benchmarks.kernels --sizes 28 --reps 50

For each kernel it reports the effective bandwidth ``(bytes read + bytes written) / time`` as a
fraction of the bandwidth of ``dst.copy_(src)`` on the same number of fp32 values measured in the
same run, and the speed-up over the pure-torch reference (the same function of
``lightning_fedopt.compression.kernels.reference`` on the same CUDA tensors). It also checks that
the Triton result equals the reference bit for bit (deterministic kernels). Goals (issue 4):
>= 0.8 of the copy for the elementwise kernels, >= 0.7 for the per-block reductions, >= 3x the
reference. Writes ``benchmarks/results/kernels.csv`` and ``kernels.png``.

Without a CUDA GPU (or without triton) it prints why and exits with status 1: nothing is
measured. ``--cpu-smoke`` runs every code path on tiny CPU tensors under ``TRITON_INTERPRET=1``
(to test the script itself; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import DEFAULT_OUT, write_csv


def _timer(device: str) -> Callable[[Callable[[], Any], int], float]:
    import torch

    def cuda_time(fn: Callable[[], Any], reps: int) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)

    def cpu_time(fn: Callable[[], Any], reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return cuda_time if device == "cuda" else cpu_time


def same(a: Any, b: Any) -> bool:
    """Whether two kernel results (a tensor or a tuple of tensors) are equal bit for bit."""
    import torch

    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return all(torch.equal(u, v) for u, v in zip(a, b))


def cases(n: int, chunks: int, block: int, device: str) -> list[dict[str, Any]]:
    """Every kernel: its Triton and reference calls, the bytes it must move, its kind, a check."""
    import torch

    from lightning_fedopt.compression.kernels import reference as ref
    from lightning_fedopt.compression.kernels import triton_impl as tri

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device, generator=g)
    err = torch.randn(n, device=device, generator=g) * 0.01
    nb = -(-n // block)
    c8, s8 = ref.quantize_blockwise(x, 8, block)
    c4, s4 = ref.quantize_blockwise(x, 4, block)
    codes8, scales8 = c8.repeat(chunks, 1), s8.repeat(chunks, 1)
    codes4, scales4 = c4.repeat(chunks, 1), s4.repeat(chunks, 1)
    scale = (x.norm() / n**0.5).reshape(1)
    bits = ref.sign_pack(x, scale).repeat(chunks, 1)
    sscales = scale.repeat(chunks)
    thr = float(x.abs().kthvalue(n - max(1, n // 1000)).values)  # ~0.1% pass
    k = int((x.abs() >= thr).sum())
    e1, e2 = err.clone(), err.clone()

    return [
        {
            "kernel": "quantize int8 (blockwise absmax)",
            "kind": "per-block reduction",
            "bytes": 4 * n + n + 4 * nb,
            "triton": lambda: tri.quantize_blockwise(x, 8, block),
            "torch": lambda: ref.quantize_blockwise(x, 8, block),
        },
        {
            "kernel": "quantize int8 + error feedback",
            "kind": "per-block reduction",
            "bytes": 8 * n + n + 4 * nb + 4 * n,
            "triton": lambda: tri.quantize_blockwise(x, 8, block, e1),
            "torch": lambda: ref.quantize_blockwise(x, 8, block, e2),
            "check": lambda: same(
                tri.quantize_blockwise(x, 8, block, err.clone()),
                ref.quantize_blockwise(x, 8, block, err.clone()),
            ),
        },
        {
            "kernel": "quantize int8 stochastic (tl.rand)",
            "kind": "per-block reduction",
            "bytes": 4 * n + n + 4 * nb,
            "triton": lambda: tri.quantize_blockwise(x, 8, block, stochastic=True, seed=1),
            "torch": lambda: ref.quantize_blockwise(x, 8, block, stochastic=True, seed=1),
            "check": None,
        },
        {
            "kernel": "quantize int4 (packed)",
            "kind": "per-block reduction",
            "bytes": 4 * n + n // 2 + 4 * nb,
            "triton": lambda: tri.quantize_blockwise(x, 4, block),
            "torch": lambda: ref.quantize_blockwise(x, 4, block),
        },
        {
            "kernel": f"dequantize+accumulate int8, {chunks} chunks",
            "kind": "elementwise",
            "bytes": chunks * (n + 4 * nb) + 4 * n,
            "triton": lambda: tri.dequantize_accumulate(codes8, scales8, n, 8, block),
            "torch": lambda: ref.dequantize_accumulate(codes8, scales8, n, 8, block),
        },
        {
            "kernel": f"dequantize+accumulate int4, {chunks} chunks",
            "kind": "elementwise",
            "bytes": chunks * (n // 2 + 4 * nb) + 4 * n,
            "triton": lambda: tri.dequantize_accumulate(codes4, scales4, n, 4, block),
            "torch": lambda: ref.dequantize_accumulate(codes4, scales4, n, 4, block),
        },
        {
            "kernel": "sign pack + error update",
            "kind": "elementwise",
            "bytes": 4 * n + n // 8 + 4 * n,
            "triton": lambda: tri.sign_pack(x, scale, e1),
            "torch": lambda: ref.sign_pack(x, scale, e2),
            "check": lambda: same(tri.sign_pack(x, scale, err.clone()), ref.sign_pack(x, scale, err.clone())),
        },
        {
            "kernel": f"sign unpack+accumulate, {chunks} chunks",
            "kind": "elementwise",
            "bytes": chunks * (n // 8) + 4 * n,
            "triton": lambda: tri.sign_unpack_accumulate(bits, sscales, n),
            "torch": lambda: ref.sign_unpack_accumulate(bits, sscales, n),
        },
        {
            "kernel": "top-k threshold compaction (0.1%)",
            "kind": "elementwise",
            "bytes": 8 * n + 12 * k,  # two passes over x (count, compact), index + value out
            "triton": lambda: tri.compact_above(x, thr),
            "torch": lambda: ref.compact_above(x, thr),
        },
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="24,26", help="log2 of the number of fp32 values, comma separated")
    p.add_argument("--chunks", type=int, default=8, help="N chunks for the accumulate kernels")
    p.add_argument("--block", type=int, default=256, help="quantization block")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        sizes, device, reps = [1 << 12], "cpu", 1
    else:
        sizes, reps = [1 << int(s) for s in args.sizes.split(",")], args.reps
        device = "cuda"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py: no CUDA GPU on this machine (torch.cuda.is_available() is False); the Triton "
            "kernels' bandwidth can only be measured on a GPU. Nothing was measured. (--cpu-smoke checks the "
            "script itself under TRITON_INTERPRET=1.)",
            file=sys.stderr,
        )
        return 1
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py: triton is not installed; nothing was measured.", file=sys.stderr)
        return 1
    timer = _timer(device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (TRITON_INTERPRET=1 smoke run)"
    rows = []
    for n in sizes:
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        t_copy = timer(lambda dst=dst, src=src: dst.copy_(src), reps)
        copy_bw = 8 * n / t_copy
        print(f"\n{gpu}: n = {n:,} fp32 values; device-to-device copy {copy_bw / 1e9:.1f} GB/s")
        print(
            f"{'kernel':<42} {'kind':<20} {'GB/s':>8} {'of copy':>8} {'torch GB/s':>10} {'speed-up':>8} {'exact':>6}"
        )
        for case in cases(n, args.chunks, args.block, device):
            t_tri = timer(case["triton"], reps)
            t_ref = timer(case["torch"], max(1, reps // 3))
            check = case.get("check", "auto")
            if check == "auto":
                exact = same(case["triton"](), case["torch"]())
            else:
                exact = None if check is None else bool(check())
            bw = case["bytes"] / t_tri
            row = {
                "device": gpu,
                "n": n,
                "kernel": case["kernel"],
                "kind": case["kind"],
                "bytes": case["bytes"],
                "triton_s": t_tri,
                "torch_s": t_ref,
                "copy_s": t_copy,
                "triton_GBps": bw / 1e9,
                "torch_GBps": case["bytes"] / t_ref / 1e9,
                "copy_GBps": copy_bw / 1e9,
                "fraction_of_copy": bw / copy_bw,
                "speedup_vs_torch": t_ref / t_tri,
                "goal_fraction": 0.8 if case["kind"] == "elementwise" else 0.7,
                "bit_exact": exact,
            }
            rows.append(row)
            print(
                f"{case['kernel']:<42} {case['kind']:<20} {bw / 1e9:>8.1f} {bw / copy_bw:>8.2f} "
                f"{row['torch_GBps']:>10.1f} {row['speedup_vs_torch']:>7.1f}x {exact!s:>6}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_cpu_smoke" if args.cpu_smoke else "kernels"
    write_csv(out / f"{stem}.csv", rows)
    _plot(rows, out / f"{stem}.png", gpu)
    met = [r for r in rows if r["fraction_of_copy"] >= r["goal_fraction"] and r["speedup_vs_torch"] >= 3]
    print(
        f"\ngoals met (fraction of copy and >= 3x torch) by {len(met)}/{len(rows)} rows; wrote {out / stem}.csv/.png"
    )
    return 0


def _plot(rows: list[dict[str, Any]], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n"] for r in rows})
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / len(sizes)
    for i, n in enumerate(sizes):
        rs = {r["kernel"]: r for r in rows if r["n"] == n}
        xs = [j + i * width for j in range(len(kernels))]
        axes[0].bar(
            xs, [rs[k]["fraction_of_copy"] for k in kernels], width, label=f"n = 2^{n.bit_length() - 1}"
        )
        axes[1].bar(
            xs, [rs[k]["speedup_vs_torch"] for k in kernels], width, label=f"n = 2^{n.bit_length() - 1}"
        )
    axes[0].axhline(0.8, color="0.3", linestyle="--", linewidth=0.8)
    axes[0].axhline(0.7, color="0.5", linestyle=":", linewidth=0.8)
    axes[0].set_ylabel("bandwidth / device-to-device copy")
    axes[1].axhline(3.0, color="0.3", linestyle="--", linewidth=0.8)
    axes[1].set_ylabel("speed-up over the torch reference")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kernels))])
        ax.set_xticklabels(kernels, rotation=35, ha="right", fontsize=7)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"compression kernels on {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
