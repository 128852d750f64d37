"""Making the replicas identical when ``fit`` starts: a broadcast, or a digest check first.

With ``initial_sync="check"`` the ranks all-gather a 32-byte SHA-256 :func:`state_digest` of their
weights and buffers and rank 0 broadcasts only if some rank differs, so a model that every site
loaded (or seeded) the same way never crosses the slow link at start-up.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import Tensor

from lightning_fedopt.comm import Communicator

log = logging.getLogger("lightning_fedopt")

__all__ = ["INITIAL_SYNC", "start_identical", "state_digest"]

#: the accepted values of ``initial_sync``
INITIAL_SYNC = ("broadcast", "check")


def state_digest(tensors: list[Tensor]) -> Tensor:
    """SHA-256 of the tensors' dtypes, shapes and bytes, as 32 ``uint8`` values on the CPU.

    Two replicas have the same digest when their tensors are bit-for-bit equal (up to SHA-256
    collisions); ``-0.0`` and ``0.0`` or two NaN payloads count as different, as they are.
    """
    h = hashlib.sha256()
    for t in tensors:
        data = t.detach().contiguous().cpu()
        h.update(f"{data.dtype}{tuple(data.shape)};".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def start_identical(comm: Communicator, tensors: list[Tensor], mode: str, device: torch.device) -> None:
    """Give every rank rank 0's ``tensors`` (a collective call; counted under purpose ``"setup"``).

    ``mode`` is ``"broadcast"`` (always broadcast) or ``"check"`` (compare digests first and
    broadcast only if some rank differs). ``device``: where the digest travels when ``tensors``
    is empty.
    """
    if mode == "check" and comm.available and comm.world_size > 1:
        where = tensors[0].device if tensors else device
        digests = comm.all_gather(state_digest(tensors).to(where), purpose="setup").wait()
        differ = [r for r, d in enumerate(digests) if not torch.equal(d, digests[0])]
        if not differ:
            log.info(
                "lightning_fedopt: all %d replicas start from the same weights; nothing broadcast",
                comm.world_size,
            )
            return
        log.info(
            "lightning_fedopt: ranks %s start from other weights than rank 0: broadcasting rank 0's",
            differ,
        )
    comm.broadcast(tensors, src=0, purpose="setup")
