"""The wire format of compressed messages, in one place: a header and payloads in one ``uint8`` buffer.

A message is the header (one scalar of ``header_dtype``: a flag byte by default, e.g. "my
tensors are finite", or an ``int32`` count) followed by the bytes of every payload tensor, in
order, with nothing in between. The receiver knows the layout because it built payloads of the
same shapes itself (``like``): every rank compresses tensors of the same sizes with the same
compressor, so only the values travel.

Used by :mod:`lightning_fedopt.compression.collective` (all-to-all and all-gather rows) and meant
for point-to-point compressed messages as well (gossip):

    >>> import torch
    >>> from lightning_fedopt.compression import Int8
    >>> c = Int8(block=8)
    >>> pays = [c.compress(torch.ones(8)), c.compress(torch.tensor([0.0, -2.0, 254.0]))]
    >>> buf = encode(pays, header=1)
    >>> buf.dtype, buf.numel()                     # 1 flag byte + (8 + 4) + (3 + 4)
    (torch.uint8, 20)
    >>> flag, got = decode(buf, pays)
    >>> flag, c.decompress(got[1]).tolist()
    (1, [0.0, -2.0, 254.0])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_fedopt.compression.base import Payload

__all__ = ["decode", "encode", "header_nbytes"]


def header_nbytes(header_dtype: torch.dtype = torch.uint8) -> int:
    """Bytes the header of a message takes."""
    return torch.empty((), dtype=header_dtype).element_size()


def encode(
    payloads: Sequence[Payload],
    header: int = 1,
    *,
    header_dtype: torch.dtype = torch.uint8,
    device: torch.device | str | None = None,
) -> Tensor:
    """``header`` then every payload's bytes, as one flat ``uint8`` tensor.

    Args:
        payloads: what to send (their tensors are written in order).
        header: an integer sent first (a flag, a count).
        header_dtype: how the header travels (``torch.uint8``: one byte; ``torch.int32``: four).
        device: where the buffer lives (default: the first payload tensor's device, else CPU).
    """
    if device is None:
        device = next((t.device for p in payloads for t in p.tensors), torch.device("cpu"))
    head = torch.tensor([header], dtype=header_dtype, device=device).view(torch.uint8)
    parts = [head, *[t.contiguous().reshape(-1).view(torch.uint8) for p in payloads for t in p.tensors]]
    return torch.cat([p.to(device) for p in parts])


def decode(
    buf: Tensor, like: Sequence[Payload], *, header_dtype: torch.dtype = torch.uint8
) -> tuple[int, list[Payload]]:
    """The header and the payloads of a message made by :func:`encode` (layouts taken from ``like``)."""
    h = header_nbytes(header_dtype)
    header = int(buf[:h].clone().view(header_dtype)[0])
    out, off = [], h
    for p in like:
        out.append(p.unpack_like(buf[off : off + p.nbytes]))
        off += p.nbytes
    return header, out
