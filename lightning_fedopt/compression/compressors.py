"""The compressors: casts, blockwise int8/int4, 1-bit sign, EControl, random projection (top-k:
:mod:`.topk`; SparseLoCo's chunked top-k with 2-bit values: :mod:`.sparseloco`).

Formulas and references: ``docs/algorithms.md`` (Compression). All of them compress a flat fp32 copy
of the input and decompress to the input's shape and dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_choice, check_float, check_seed
from lightning_fedopt.compression import kernels
from lightning_fedopt.compression.base import Compressor, Payload, check_block, check_unit, stable_seed
from lightning_fedopt.compression.sparseloco import SparseLoCo
from lightning_fedopt.compression.statquant import StatQuant
from lightning_fedopt.compression.topk import TopK

__all__ = [
    "BF16",
    "COMPRESSORS",
    "FP16",
    "ErrorControl",
    "Int4",
    "Int8",
    "RandomProjection",
    "Sign",
    "SparseLoCo",
    "StatQuant",
    "TopK",
    "get_compressor",
]


# ====================================================================== casts
class _Cast(Compressor):
    _dtype: torch.dtype = torch.float16

    def __init__(self, error_feedback: bool = False) -> None:
        super().__init__()
        self.error_feedback = check_bool("error_feedback", error_feedback)

    @override
    def _repr_args(self) -> dict[str, Any]:
        return {"error_feedback": self.error_feedback}

    @override
    def _compress(self, x: Tensor, key: str, salt: int) -> tuple[list[Tensor], None]:
        if self.error_feedback:
            e = self._buffer(key, "error", x)
            x = x + e
        if self._dtype == torch.float16:
            x = x.clamp(-65504.0, 65504.0)  # beyond fp16's range: saturate, never Inf
        y = x.to(self._dtype)
        if self.error_feedback:
            e.copy_(x - y.float())
        return [y], None

    @override
    def _decompress_sum(self, payloads: list[Payload]) -> Tensor:
        acc = torch.zeros(payloads[0].numel, dtype=torch.float32, device=payloads[0].tensors[0].device)
        for p in payloads:
            acc += p.tensors[0].float()
        return acc

    @override
    def compressed_nbytes(self, numel: int) -> int:
        return 2 * numel


class FP16(_Cast):
    """Cast to float16 (values beyond ±65504 saturate). Optional error feedback.

    Example:
        >>> x = torch.tensor([1.0, 1e-4, 3.14159])
        >>> FP16().decompress(FP16().compress(x))
        tensor([1.0000e+00, 1.0002e-04, 3.1406e+00])
    """

    name = "fp16"
    _dtype = torch.float16


class BF16(_Cast):
    """Cast to bfloat16 (fp32's range, 8 bits of mantissa). Optional error feedback.

    Example:
        >>> BF16().compressed_nbytes(1000)
        2000
    """

    name = "bf16"
    _dtype = torch.bfloat16


# ====================================================================== blockwise quantization
_ROUNDING = ("nearest", "stochastic")


class _Blockwise(Compressor):
    bits: int = 8

    def __init__(
        self, block: int = 256, rounding: str = "nearest", error_feedback: bool = False, seed: int = 0
    ) -> None:
        super().__init__()
        self.block = check_block(block)
        self.rounding = check_choice("rounding", rounding, _ROUNDING)
        self.error_feedback = check_bool("error_feedback", error_feedback)
        self.seed = check_seed("seed", seed)

    @override
    def _repr_args(self) -> dict[str, Any]:
        return {"block": self.block, "rounding": self.rounding, "error_feedback": self.error_feedback}

    @override
    def _compress(self, x: Tensor, key: str, salt: int) -> tuple[list[Tensor], None]:
        err = self._buffer(key, "error", x) if self.error_feedback else None
        stochastic = self.rounding == "stochastic"
        seed = stable_seed(self.seed, key, salt, self._count(key)) if stochastic else 0
        codes, scales = kernels.quantize_blockwise(
            x, self.bits, self.block, err, stochastic=stochastic, seed=seed
        )
        return [codes, scales], None

    @override
    def _decompress_sum(self, payloads: list[Payload]) -> Tensor:
        n = payloads[0].numel
        codes = torch.stack([p.tensors[0] for p in payloads])
        scales = torch.stack([p.tensors[1] for p in payloads])
        return kernels.dequantize_accumulate(codes, scales, n, self.bits, self.block)

    @override
    def compressed_nbytes(self, numel: int) -> int:
        code_bytes = numel if self.bits == 8 else -(-numel // 2)
        return code_bytes + 4 * -(-numel // self.block)


class Int8(_Blockwise):
    """Blockwise absmax int8: per block of ``block`` values, ``scale = max|x| / 127``, one byte per value.

    Round-trip error per value is at most ``scale / 2`` (nearest) or ``< scale`` (stochastic,
    unbiased). Reference: Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR
    2022); the compressed all-reduce follows torchft's ``allreduce_quantized``.

    Args:
        block: values per scale, a power of two in [8, 16384].
        rounding: ``"nearest"`` or ``"stochastic"`` (round up with probability = fractional part).
        error_feedback: add the previous call's error (per key) before quantizing.
        seed: base seed of stochastic rounding.

    Example:
        >>> c = Int8(block=128)
        >>> x = torch.linspace(-1, 1, 300)
        >>> err = (c.decompress(c.compress(x)) - x).abs().max()
        >>> bool(err <= 1 / 127 / 2 + 1e-7), c.compressed_nbytes(300)
        (True, 312)
    """

    name = "int8"
    bits = 8


class Int4(_Blockwise):
    """Blockwise absmax int4: ``scale = max|x| / 7``, two values per byte (codes ``q + 8``).

    These are block *integers*: per block of ``block`` values one fp32 scale and symmetric 4-bit
    integers ``q`` in [-7, 7] (uniform levels ``q * scale``), not the 4-bit floating-point
    formats (FP4, e.g. E3M0 / E2M1, with exponent bits and non-uniform levels) of the low-precision
    communication papers; a result measured with FP4 there does not carry over to this compressor
    as is.

    Same arguments as :class:`Int8`. Round-trip error per value at most ``scale / 2`` (nearest).

    Example:
        >>> Int4(block=64).compressed_nbytes(1024)   # 512 bytes of codes + 16 scales
        576
    """

    name = "int4"
    bits = 4


# ====================================================================== 1-bit sign
class Sign(Compressor):
    """1-bit sign with a scale and error feedback (1-bit Adam, Tang et al., arXiv 2102.02888).

    ``x = t + e``; ``scale = ||x||_2 / sqrt(n)``; ``sign(x)`` (0 counts as +) is sent as bits;
    ``e <- x - scale * sign(x)``. In the compressed all-reduce the chunk owner compresses the
    average again with its own (server) error buffer, as 1-bit Adam does.

    Args:
        error_feedback: keep the per-key error ``e`` (default True; False gives plain scaled sign).

    Example:
        >>> c = Sign()
        >>> x = torch.tensor([0.5, -2.0, 0.0, 1.5])
        >>> p = c.compress(x)
        >>> p.nbytes                                  # 1 byte of bits + 1 fp32 scale
        5
        >>> c.decompress(p)
        tensor([ 1.2748, -1.2748,  1.2748,  1.2748])
    """

    name = "sign"

    def __init__(self, error_feedback: bool = True) -> None:
        super().__init__()
        self.error_feedback = check_bool("error_feedback", error_feedback)

    @override
    def _repr_args(self) -> dict[str, Any]:
        return {"error_feedback": self.error_feedback}

    @override
    def _compress(self, x: Tensor, key: str, salt: int) -> tuple[list[Tensor], None]:
        if self.error_feedback:
            e = self._buffer(key, "error", x)
            e.add_(x)  # e now holds x + e, overwritten by the kernel with the new error
            x = e
        scale = (torch.linalg.vector_norm(x) / math.sqrt(x.numel())).reshape(1)
        bits = kernels.sign_pack(x, scale, e if self.error_feedback else None)
        return [bits, scale], None

    @override
    def _decompress_sum(self, payloads: list[Payload]) -> Tensor:
        bits = torch.stack([p.tensors[0] for p in payloads])
        scales = torch.cat([p.tensors[1] for p in payloads])
        return kernels.sign_unpack_accumulate(bits, scales, payloads[0].numel)

    @override
    def compressed_nbytes(self, numel: int) -> int:
        return -(-numel // 8) + 4


# ====================================================================== EControl
class ErrorControl(Compressor):
    """EControl error control around any contractive compressor (Gao et al., arXiv 2311.05645).

        Per key (replica side): ``delta = C(eta * e + g - h)``; ``e <- e + g - h - delta``;
        ``h <- h + delta``. The receivers keep the shared estimate ``H <- H + mean_i delta_i`` and use
        ``H`` (:meth:`aggregate`). ``eta = 0`` gives EF21; the paper's analysis takes ``eta`` of the order
    of the inner compressor's contraction ``delta`` (e.g. the density of top-k): with ``eta = 1`` the
    error can grow without bound (measured here with top-k at 20%), hence the default 0.2. The inner
        compressor runs without its own error feedback. In the compressed all-reduce the deltas are
        all-gathered (no re-compression, which would break ``H = mean_i h_i``).

        Args:
            compressor: the inner compressor (object or name; its error feedback is switched off).
            eta: EControl's ``eta`` in [0, 1] (default 0.2).

        Example:
            >>> c = ErrorControl(TopK(density=0.5), eta=0.5)
            >>> g = torch.tensor([1.0, -2.0, 3.0, 0.5])
            >>> c.aggregate("default", c.decompress(c.compress(g))).tolist()   # one replica
            [0.0, -2.0, 3.0, 0.0]
    """

    name = "errorcontrol"
    collective = "gather"

    def __init__(self, compressor: Compressor | str = "topk", eta: float = 0.2) -> None:
        super().__init__()
        inner = get_compressor(compressor)
        if inner is None or isinstance(inner, ErrorControl):
            raise ValueError(f"`compressor` must be a (non-EControl) compressor, got {compressor!r}")
        if hasattr(inner, "error_feedback"):
            inner.error_feedback = False
        self.eta = check_float("eta", eta, low=0.0, high=1.0)
        self.inner = inner

    @override
    def _repr_args(self) -> dict[str, Any]:
        return {"compressor": self.inner, "eta": self.eta}

    @override
    def _compress(self, x: Tensor, key: str, salt: int) -> tuple[list[Tensor], dict[str, Any] | None]:
        e = self._buffer(key, "e", x)
        h = self._buffer(key, "h", x)
        p = self.inner.compress(self.eta * e + x - h, key, salt=salt, check_finite=False)
        delta = self.inner.decompress(p).reshape(-1).float()
        e.add_(x - h - delta)
        h.add_(delta)
        return list(p.tensors), p.meta

    @override
    def _decompress_sum(self, payloads: list[Payload]) -> Tensor:
        return self.inner.decompress_sum(payloads)

    @override
    def set_world_size(self, world_size: int) -> None:
        super().set_world_size(world_size)
        self.inner.set_world_size(world_size)

    @override
    def aggregate(self, key: str, mean: Tensor) -> Tensor:
        hg = self._buffer(key, "H", mean)
        hg.add_(mean.reshape(-1).float())
        return hg.clone().view(mean.shape)

    @override
    def compressed_nbytes(self, numel: int) -> int:
        return self.inner.compressed_nbytes(numel)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"self": super().state_dict(), "inner": self.inner.state_dict()}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state["self"])
        self.inner.load_state_dict(state["inner"])


# ====================================================================== shared-seed projection
class RandomProjection(Compressor):
    """Projection onto ``k`` random directions from a shared seed: only ``k`` scalars travel.

    ``y = P x`` with ``P`` a ``k x n`` Gaussian matrix with entries ``N(0, 1/k)`` regenerated from
    ``(seed, key, call)`` by every replica, so ``E[P^T P] = I`` and ``P^T y`` is an unbiased estimate
    of ``x`` (Ferret, arXiv 2409.06277; "Just One Byte (per gradient)", Zelikman et al., arXiv 2306.10015). The
    directions depend on the call number of the key, not on the replica, so at a given round all
    replicas share them and the payloads can simply be all-reduced.

    Args:
        ratio: ``k = max(1, ceil(ratio * n))``, ratio in (0, 1].
        seed: base seed of the directions.

    Example:
        >>> c = RandomProjection(ratio=0.1)
        >>> p = c.compress(torch.randn(1000))
        >>> p.nbytes
        400
    """

    name = "randomprojection"
    collective = "linear"
    _ROWS_PER_PIECE = 1 << 22  # entries of P generated at once

    def __init__(self, ratio: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        # the argument's name is public API; the instance attribute shadows Compressor.ratio(),
        # which this class does not use (its payload size comes from _k)
        self.ratio = check_unit("ratio", ratio)  # type: ignore[method-assign, assignment]
        self.seed = check_seed("seed", seed)

    @override
    def _repr_args(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "seed": self.seed}

    def _k(self, n: int) -> int:
        return max(1, math.ceil(float(self.ratio) * n))  # type: ignore[arg-type]

    def _pieces(self, n: int, seed: int, device: torch.device):
        k = self._k(n)
        rows = max(1, self._ROWS_PER_PIECE // n)
        gen = torch.Generator().manual_seed(seed)
        for r0 in range(0, k, rows):
            r1 = min(k, r0 + rows)
            p = torch.randn(r1 - r0, n, generator=gen) / math.sqrt(k)
            yield r0, r1, p.to(device)

    @override
    def _compress(self, x: Tensor, key: str, salt: int) -> tuple[list[Tensor], dict[str, Any]]:
        seed = stable_seed(self.seed, key, self._count(key))
        y = torch.empty(self._k(x.numel()), dtype=torch.float32, device=x.device)
        for r0, r1, p in self._pieces(x.numel(), seed, x.device):
            y[r0:r1] = p @ x
        return [y], {"seed": seed}

    @override
    def _decompress_sum(self, payloads: list[Payload]) -> Tensor:
        n = payloads[0].numel
        acc = torch.zeros(n, dtype=torch.float32, device=payloads[0].tensors[0].device)
        for pl in payloads:
            assert pl.meta is not None
            for r0, r1, p in self._pieces(n, pl.meta["seed"], acc.device):
                acc += p.T @ pl.tensors[0][r0:r1].float()
        return acc

    @override
    def compressed_nbytes(self, numel: int) -> int:
        return 4 * self._k(numel)


# ====================================================================== by name
#: lowercase class name -> class, what :func:`get_compressor` accepts
COMPRESSORS: dict[str, type[Compressor]] = {
    c.name: c
    for c in (FP16, BF16, Int8, Int4, Sign, TopK, ErrorControl, RandomProjection, SparseLoCo, StatQuant)
}


def get_compressor(spec: Any) -> Compressor | None:
    """A compressor from ``spec``: None, a :class:`Compressor` (returned as is) or a lowercase
    class name (a new instance with default arguments).

    Raises:
        ValueError: for an unknown name or any other kind of value (the message lists the names).
    """
    if spec is None or isinstance(spec, Compressor):
        return spec
    if isinstance(spec, str) and spec in COMPRESSORS:
        return COMPRESSORS[spec]()
    raise ValueError(
        f"`compressor` must be None, a lightning_fedopt.compression.Compressor or one of "
        f"{sorted(COMPRESSORS)}, got {spec!r}"
    )
