"""One synchronisation as a torchft round, for the strategies whose round is "every replica group
sends ``global - local``, the mean moves the global weights" (DiLoCo, streaming DiLoCo, CO2, Local SGD).

:func:`torchft_round`: the quorum (a group that is behind heals here, through the strategy's heal
state), one managed *sum* of the finite, non-healing groups' pseudo-gradients with a count element
(so the mean is over the groups that computed it, and a healer never counts), torchft's commit vote,
then ``apply`` (the strategy's outer step) only when the round committed and its count is one the
groups can have sent. Every group then restarts from the global weights: the new ones, or, when the
round did not commit, those before it (its local steps are dropped; never a partial average). The
global weights change only after the vote: torchft serves them by reference to healers until then.

A round can also be split in two (:func:`launch_torchft_round`, then :func:`finish_torchft_round`
some steps later) for the strategies whose all-reduce overlaps local steps (CO2, streaming DiLoCo
with ``sync_delay``): the quorum and the all-reduce start at the launch, the wait and the vote come
at the finish, and a failure in between surfaces there (the round is not committed). One round is
in flight at a time, and the caller moves its global weights only at a finish, never between a
quorum and its vote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_fedopt.fault_tolerance.faults import FaultHandler

__all__ = ["PendingRound", "finish_torchft_round", "launch_torchft_round", "pseudo_deltas", "torchft_round"]


def pseudo_deltas(
    tensors: list[Tensor], global_weights: list[Tensor], is_param: list[bool]
) -> tuple[list[Tensor], bool]:
    """A group's contribution to a round: ``global - local`` per parameter, the value per buffer
    (new tensors), and whether every local tensor is finite."""
    finite = all(bool(torch.isfinite(t).all()) for t in tensors)
    with torch.no_grad():
        deltas = [
            (phi.to(t.device) - t) if param else t.detach().clone()
            for t, phi, param in zip(tensors, global_weights, is_param)
        ]
    return deltas, finite


@dataclass
class PendingRound:
    """A torchft round between its launch and its finish (:func:`launch_torchft_round`).

    Attributes:
        info: the quorum's :class:`~lightning_fedopt.fault_tolerance._torchft.RoundInfo`.
        allowed: whether the quorum is one this run can have (no stray client).
        local_nonfinite: this group had non-finite weights and sent nothing.
        sums: the sent contributions, the sums once finished.
        count: the contributor count travelling with them.
        handle: the managed all-reduce in flight.
        step: the replica step of the launch (for the log lines).
    """

    info: Any
    allowed: bool
    local_nonfinite: bool
    sums: list[Tensor]
    count: Tensor
    handle: Any
    step: int


def launch_torchft_round(
    faults: FaultHandler,
    contribution: Callable[[], tuple[list[Tensor], bool]],
    step: int,
    *,
    contribute: bool = True,
) -> PendingRound:
    """The first half of a round: the quorum (a group that is behind heals here, before this returns),
    then the managed sum of the contribution with a count element starts, asynchronously.

    ``contribution()`` is called after the quorum (so a group that healed there builds it from its
    peer's state: its step, hence which tensors the round carries) and returns the tensors to sum
    (:func:`pseudo_deltas`; new tensors: they become the round's buffers, possibly none) and whether
    they are finite. They are zeroed when this group does not contribute (``contribute=False``, it
    healed now, they are not finite, or a stray client is in the quorum)."""
    managed = faults.managed
    assert managed is not None, "the torchft communicator is not open"
    info = managed.start_round()
    allowed = faults.quorum_allowed(info, step)
    deltas, finite = contribution()
    contribute = contribute and allowed and not info.healed
    local_nonfinite = contribute and not finite
    sends = contribute and finite
    with torch.no_grad():
        if not sends:
            for d in deltas:
                d.zero_()
        like = deltas[0] if deltas else torch.zeros(())
        count = torch.tensor([1.0 if sends else 0.0], dtype=like.dtype, device=like.device)
    handle = managed.all_reduce([*deltas, count], "sum", async_op=True)
    return PendingRound(info, allowed, local_nonfinite, deltas, count, handle, step)


def finish_torchft_round(faults: FaultHandler, pending: PendingRound) -> tuple[int, dict[str, float]]:
    """The second half: wait for the sum, the commit vote (it always runs), the checks of the count.
    Returns the number of groups whose contributions are in ``pending.sums`` (0: apply nothing:
    not committed, a failure, a stray client, or nobody contributed) and the round's numbers."""
    managed = faults.managed
    assert managed is not None, "the torchft communicator is not open"
    info = pending.info
    reduced = pending.handle.wait()
    committed = managed.commit() and reduced and pending.allowed
    n_valid = round(float(pending.count)) if reduced else 0
    if reduced and not faults.contributors_allowed(float(pending.count), info, pending.step):
        committed, n_valid = False, 0
    faults.note_round(info, committed, pending.step)
    numbers = {
        "quorum_size": float(info.participants),
        "contributors": float(n_valid),
        "healed": float(info.healed),
        "committed": float(committed),
        "quorum_seconds": float(info.seconds),
        "quorum_id": float(info.quorum_id),
        "round": float(info.step),
    }
    return (n_valid if committed else 0), numbers


def torchft_round(
    faults: FaultHandler,
    tensors: list[Tensor],
    global_weights: list[Tensor],
    is_param: list[bool],
    step: int,
    *,
    apply: Callable[[list[Tensor], int], None],
    contribute: bool = True,
) -> tuple[dict[str, float], bool]:
    """Run one round (module doc) over the tracked ``tensors`` and their ``global_weights``.

    Args:
        faults: the strategy's fault handler (its managed communicator must be open).
        tensors: the replica's tracked tensors (restarted from ``global_weights`` at the end).
        global_weights: the global (outer) weights, one per tracked tensor.
        is_param: per tracked tensor: a parameter (its pseudo-gradient travels) or a buffer (its value).
        step: the replica step (for the log lines).
        apply: ``apply(sums, n)``: the outer step from the sums of ``n`` groups' contributions.
        contribute: False to take part with no weight (a group joining the others).

    Returns:
        The round's numbers (quorum size, contributors, healed, committed, quorum seconds, quorum
        id, torchft's round index) and whether this replica was left out for non-finite weights.
    """
    pending = launch_torchft_round(
        faults, lambda: pseudo_deltas(tensors, global_weights, is_param), step, contribute=contribute
    )
    n_valid, numbers = finish_torchft_round(faults, pending)
    if n_valid > 0:
        apply(pending.sums, n_valid)
    with torch.no_grad():
        for t, phi in zip(tensors, global_weights):
            t.copy_(phi.to(t.device))
    return numbers, pending.local_nonfinite
