"""What the gossip and CHOCO-gossip tests share (tests/unit/ and tests/multiprocess/ test_gossip.py,
test_choco.py): the ring's mixing matrix, the exact-gossip message size, a history callback, and a
compressor that sends values as they are."""

from __future__ import annotations

import lightning as L
import torch
from modules import make_net

from lightning_fedopt.compression import Compressor, Payload


def ring_matrix(n: int) -> torch.Tensor:
    """Written out by hand: 1/3 on the diagonal and to both ring neighbours."""
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in (i - 1, i, i + 1):
            w[i, j % n] = 1 / 3
    return w


PAYLOAD = sum(p.numel() for p in make_net().parameters()) * 4


class SaveHistory(L.Callback):
    def __init__(self, monitor, out):
        self.monitor, self.out = monitor, out

    def on_fit_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.monitor.history, self.out / f"hist{trainer.global_rank}.pt")


class Exact(Compressor):
    """Sends fp32 values as they are: CHOCO with it (and gamma = 1) is plain gossip."""

    name = "exact"

    def _compress(self, x, key, salt):
        return [x.clone()], None

    def _decompress_sum(self, payloads: list[Payload]) -> torch.Tensor:
        return sum(p.tensors[0].float() for p in payloads)

    def compressed_nbytes(self, numel: int) -> int:
        return 4 * numel
