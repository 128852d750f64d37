"""CHOCO-gossip: compressed gossip messages for :class:`~lightning_fedopt.strategies.gossip.GossipStrategy`.

Koloskova, Stich & Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with
Compressed Communication", ICML 2019, Algorithm 2 (CHOCO-SGD). Replica ``i`` keeps public copies
``x_hat_j`` of itself and of its in-neighbours (they start at the common initial model, so every
holder of ``x_hat_j`` has the same one). A gossip step is::

    q_i      = C(x_i - x_hat_i)                    # compressed, sent to the out-neighbours
    x_hat_j <- x_hat_j + q_j    for j in N(i) + {i} # every holder applies the same decoded q_j
    x_i     <- x_i + gamma * sum_j W_ij (x_hat_j - x_hat_i)

with the consensus step size ``gamma = consensus_lr`` in (0, 1]. Only ``q_i`` travels (at the
compressor's size, one byte of finite-flag per message). The copies follow each neighbour's model,
so what was not sent is sent later (CHOCO is its own error feedback: the compressor's must be off).
The copies and the compressor's state (per tensor name, under ``"gossip/<name>"``) are per-replica
state in the replica shards, so a resume continues exactly. The topology must be static: with a
time-varying one a replica's copy of a neighbour would miss the messages sent to others. A replica
whose model is not finite sends nothing that round (every copy of it stays), and restarts from its
own public copy mixed with its neighbours'.

* :func:`choco_compressor` makes/validates the compressor of the messages;
* :func:`check_choco` refuses what CHOCO cannot be combined with;
* :class:`ChocoCopies` holds the public copies (pure arithmetic, no communication);
* :class:`ChocoGossip` is one replica's CHOCO state: it encodes, exchanges and decodes a round's
  messages and mixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fedopt.comm import Communicator
from lightning_fedopt.compression import (
    COMPRESSORS,
    Compressor,
    ErrorControl,
    Payload,
    RandomProjection,
    TopK,
)
from lightning_fedopt.compression.wire import decode, encode
from lightning_fedopt.merging import Merge
from lightning_fedopt.runtime.reduce import all_finite
from lightning_fedopt.topology import Topology

__all__ = ["TIME_VARYING", "ChocoCopies", "ChocoGossip", "check_choco", "choco_compressor"]

#: topologies whose mixing matrix changes between rounds (CHOCO needs a static one)
TIME_VARYING = ("one_peer_exponential", "random_matching")


def choco_compressor(spec: Any) -> Compressor:
    """The compressor of CHOCO-gossip's messages, from a :class:`~lightning_fedopt.compression.Compressor`
    or a name (made with its error feedback off).

    CHOCO's public copies already carry what a message left out into the next ones, so the
    compressor's own error feedback must be off (a second accumulation of the same residual
    overshoots); DGC's momentum correction is for gradients; EControl keeps a shared estimate
    of its own, and a random projection is not contractive (``||C(x) - x||`` can exceed ``||x||``),
    which CHOCO's consensus needs.

    Raises:
        ValueError: naming ``compressor``, for any other value or one of the options above.

    Example:
        >>> choco_compressor("sign")
        Sign(error_feedback=False)
    """
    if isinstance(spec, str):
        if spec not in COMPRESSORS:
            raise ValueError(
                f"`compressor` must be a Compressor or one of {sorted(COMPRESSORS)}, got {spec!r}"
            )
        comp = COMPRESSORS[spec]()
        if getattr(comp, "error_feedback", False):
            vars(comp)["error_feedback"] = False  # CHOCO keeps its own estimate: no error feedback
    elif isinstance(spec, Compressor):
        comp = spec
    else:
        raise ValueError(
            f"`compressor` must be a Compressor, one of {sorted(COMPRESSORS)} or None, got {spec!r}"
        )
    if isinstance(comp, (ErrorControl, RandomProjection)):
        raise ValueError(
            f"`compressor` {comp!r} cannot compress CHOCO-gossip messages: it needs a contractive compressor "
            "without a shared estimate of its own (fp16, bf16, int8, int4, sign, topk)"
        )
    if getattr(comp, "error_feedback", False):
        raise ValueError(
            f"`compressor` {comp!r}: CHOCO-gossip is its own error feedback (the public copies carry what a "
            "message left out); pass the compressor with error_feedback=False"
        )
    if isinstance(comp, TopK) and comp.momentum > 0:
        raise ValueError(
            f"`compressor` {comp!r}: DGC's momentum correction is for gradients; CHOCO-gossip needs momentum=0"
        )
    return comp


def check_choco(topology: str | Topology, merge: Merge, align: str | None) -> None:
    """Refuse what CHOCO-gossip cannot be combined with: a time-varying ``topology``, a robust
    ``merge`` (CHOCO mixes with the weights ``W_ij``) and DIMAT alignment (it sends differences).

    Raises:
        ValueError: naming the argument.
    """
    if (isinstance(topology, str) and topology in TIME_VARYING) or (
        isinstance(topology, Topology) and topology.time_varying
    ):
        name = topology if isinstance(topology, str) else topology.name
        raise ValueError(
            f"`topology` {name} changes between rounds, and CHOCO-gossip (`compressor`) needs a static "
            "one: a replica's copy of a neighbour would miss the messages that neighbour sent to others"
        )
    if not merge.linear:
        raise ValueError(
            f"`compressor` (CHOCO-gossip) mixes with the weights W_ij; it cannot be combined with "
            f"`merge={merge.method!r}`"
        )
    if align is not None:
        raise ValueError(
            "`compressor` (CHOCO-gossip) sends compressed differences, not models: it cannot be "
            "combined with `align='dimat'`"
        )


class ChocoCopies:
    """CHOCO-gossip's public copies ``x_hat_j`` held by one replica (pure: no communication).

    ``hat[j]`` is replica ``j``'s public copy, for this replica and its in-neighbours, in float32.
    All start at the same model (the replicas' common initial weights), and every holder of
    ``x_hat_j`` adds the same decoded messages, so the copies agree across replicas.

    Example:
        >>> import torch
        >>> c = ChocoCopies([torch.zeros(2)], holders=[0, 1])
        >>> c.residual(0, [torch.tensor([1.0, 2.0])])
        [tensor([1., 2.])]
        >>> c.receive(0, [torch.tensor([1.0, 2.0])])          # an exact message
        >>> c.mix([torch.tensor([1.0, 2.0])], 0, {0: 0.5, 1: 0.5}, gamma=1.0)
        [tensor([0.5000, 1.0000])]
    """

    def __init__(self, values: list[Tensor], holders: list[int]) -> None:
        self.hat: dict[int, list[Tensor]] = {}
        self.reset(values, holders)

    def reset(self, values: list[Tensor], holders: list[int] | None = None) -> None:
        """Every copy := ``values`` (the replicas agree on them: at the start, after a global merge)."""
        holders = sorted(self.hat) if holders is None else sorted(holders)
        self.hat = {j: [v.detach().float().clone() for v in values] for j in holders}

    def residual(self, rank: int, values: list[Tensor]) -> list[Tensor]:
        """``x_i - x_hat_i``: what replica ``rank`` compresses and sends."""
        return [v.detach().float() - h for v, h in zip(values, self.hat[rank])]

    def receive(self, j: int, q: list[Tensor]) -> None:
        """``x_hat_j <- x_hat_j + q_j`` (``q_j`` decoded, the same bits on every holder)."""
        for h, d in zip(self.hat[j], q):
            h.add_(d.reshape(h.shape).float())

    def mix(self, values: list[Tensor], rank: int, weights: dict[int, float], gamma: float) -> list[Tensor]:
        """``x_i + gamma * sum_j W_ij (x_hat_j - x_hat_i)`` over ``weights`` = ``{j: W_ij}`` (``j != i``)."""
        own = self.hat[rank]
        out = []
        for k, v in enumerate(values):
            acc = torch.zeros_like(own[k])
            for j in sorted(weights):
                if j != rank:
                    acc.add_(self.hat[j][k] - own[k], alpha=weights[j])
            out.append((v.detach().float() + gamma * acc).to(v.dtype))
        return out

    def state_dict(self) -> dict[int, list[Tensor]]:
        """The copies, on the CPU, by replica."""
        return {j: [h.detach().cpu().clone() for h in hs] for j, hs in self.hat.items()}

    def load_state_dict(self, state: dict[int, list[Tensor]], device: torch.device | None = None) -> None:
        """Restore :meth:`state_dict` (for the same holders).

        Raises:
            ValueError: the checkpoint's copies are for other replicas.
        """
        if sorted(state) != sorted(self.hat) or any(len(state[j]) != len(self.hat[j]) for j in state):
            raise ValueError(
                f"CHOCO copies in the checkpoint are for replicas {sorted(state)}, this replica holds "
                f"{sorted(self.hat)}"
            )
        for j, hs in state.items():
            for dst, src in zip(self.hat[j], hs):
                dst.copy_(src.to(dst.device))


class ChocoGossip:
    """One replica's CHOCO-gossip state: the message compressor, the public copies and the byte counts.

    Args:
        compressor: from :func:`choco_compressor` (its state is reset).
        gamma: the consensus step size in (0, 1].
        values: the model every copy starts at (the replicas are identical when this is made).
        holders: the replicas whose copies this one keeps: itself and its in-neighbours.

    A round is :meth:`residual`, :meth:`exchange` (through the strategy's ``gossip_exchange``),
    then :meth:`mix`.
    """

    def __init__(
        self, compressor: Compressor, gamma: float, values: list[Tensor], holders: list[int]
    ) -> None:
        self.compressor = compressor
        self.gamma = gamma
        self.copies = ChocoCopies(values, holders)
        self.compressor.reset_state()
        #: uncompressed / compressed bytes of the messages sent so far
        self.message_bytes = {"raw_bytes": 0, "compressed_bytes": 0}

    def reset(self, values: list[Tensor]) -> None:
        """Every copy := ``values`` (after a global merge: every replica holds them)."""
        self.copies.reset(values)

    def residual(self, rank: int, values: list[Tensor]) -> list[Tensor]:
        """``x_i - x_hat_i``: this replica's message before compression."""
        return self.copies.residual(rank, values)

    def exchange(
        self,
        comm: Communicator,
        message: list[Tensor],
        names: Sequence[str],
        rank: int,
        sends_to: list[int],
        receives_from: list[int],
        raw_nbytes: int,
    ) -> dict[int, list[Tensor]]:
        """Compress ``message`` tensor by tensor (state under ``"gossip/<name>"``, salt ``rank``) into
        one byte buffer with a leading finite flag (:mod:`~lightning_fedopt.compression.wire`), send
        it to ``sends_to`` and receive one from each of ``receives_from`` over ``comm``; return every
        message decoded, this replica's own (as its receivers decode it) under ``rank``. A message
        that is not finite travels as zeros with the flag down and is decoded as NaN.
        ``raw_nbytes``: what exact gossip would have sent.
        """
        comp = self.compressor
        finite = all_finite(message)
        dev = message[0].device
        pays = [
            comp.compress(
                m.detach().reshape(-1).float() if finite else torch.zeros(m.numel(), device=dev),
                f"gossip/{name}",
                salt=rank,
                check_finite=False,
            )
            for name, m in zip(names, message)
        ]
        buf = encode(pays, header=int(finite), device=dev)
        recvs = {j: torch.empty_like(buf) for j in receives_from}
        comm.exchange(dict.fromkeys(sends_to, buf), recvs, purpose="sync").wait()
        self.message_bytes["raw_bytes"] += len(sends_to) * raw_nbytes
        self.message_bytes["compressed_bytes"] += len(sends_to) * buf.numel()

        def values(flag: int, got: Sequence[Payload]) -> list[Tensor]:
            if not flag:
                return [torch.full(m.shape, float("nan"), device=dev) for m in message]
            return [comp.decompress_sum([q]).view(m.shape) for q, m in zip(got, message)]

        decoded = {j: values(*decode(b, pays)) for j, b in recvs.items()}
        decoded[rank] = values(int(finite), pays)  # what the receivers decode of this replica's message
        return decoded

    def mix(
        self,
        own: list[Tensor],
        own_finite: bool,
        decoded: dict[int, list[Tensor]],
        rank: int,
        weights: dict[int, float],
    ) -> tuple[list[Tensor], int]:
        """Apply the finite ``decoded`` messages to the copies and mix: ``(new model, replicas left out)``.

        A neighbour whose message is not finite keeps its copy (it rejoins with its next finite
        message); a replica whose own model is not finite restarts from its public copy.
        """
        bad = 0 if own_finite else 1
        for j in sorted(decoded):
            if all_finite(decoded[j]):
                self.copies.receive(j, decoded[j])
            elif j != rank:
                bad += 1
        base = own if own_finite else self.copies.hat[rank]
        return self.copies.mix(base, rank, weights, self.gamma), bad

    @property
    def compression_ratio(self) -> float | None:
        """Uncompressed / compressed bytes of the messages sent so far (None before any)."""
        b = self.message_bytes
        return b["raw_bytes"] / b["compressed_bytes"] if b["compressed_bytes"] else None

    def state_dict(self) -> dict[str, Any]:
        """The copies, the compressor's state and the byte counts (they differ between replicas)."""
        return {
            "copies": self.copies.state_dict(),
            "compressor": self.compressor.state_dict(),
            "message_bytes": dict(self.message_bytes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.copies.load_state_dict(state["copies"])
        self.compressor.load_state_dict(state["compressor"])
        self.message_bytes = dict(state["message_bytes"])
