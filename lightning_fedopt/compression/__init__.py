"""Compressed communication: compressors, error feedback, kernels (Triton on GPU, torch on CPU).

Any strategy that takes ``compressor=`` accepts a :class:`Compressor` object, a lowercase class
name (:func:`get_compressor`), or None (no compression). The compressed all-reduce is
:func:`lightning_fedopt.compression.collective.all_reduce_compressed` (also exported here); the
wire format of compressed messages is :mod:`lightning_fedopt.compression.wire`.

Example:
    >>> from lightning_fedopt.compression import get_compressor
    >>> get_compressor("int8")
    Int8(block=256, rounding='nearest', error_feedback=False)
    >>> get_compressor(None) is None
    True
"""

from __future__ import annotations

from lightning_fedopt.compression.base import Compressor, Payload
from lightning_fedopt.compression.collective import all_reduce_compressed
from lightning_fedopt.compression.compressors import (
    BF16,
    COMPRESSORS,
    FP16,
    ErrorControl,
    Int4,
    Int8,
    RandomProjection,
    Sign,
    SparseLoCo,
    StatQuant,
    TopK,
    get_compressor,
)
from lightning_fedopt.compression.onebit_adam import OneBitAdam

__all__ = [
    "BF16",
    "COMPRESSORS",
    "FP16",
    "Compressor",
    "ErrorControl",
    "Int4",
    "Int8",
    "OneBitAdam",
    "Payload",
    "RandomProjection",
    "Sign",
    "SparseLoCo",
    "StatQuant",
    "TopK",
    "all_reduce_compressed",
    "get_compressor",
]
