"""One synchronisation as a torchft round, for the strategies whose round is "every replica group
sends ``global - local``, the mean moves the global weights" (DiLoCo, Local SGD).

:func:`torchft_round`: the quorum (a group that is behind heals here, through the strategy's heal
state), one managed *sum* of the finite, non-healing groups' pseudo-gradients with a count element
(so the mean is over the groups that computed it, and a healer never counts), torchft's commit vote,
then ``apply`` (the strategy's outer step) only when the round committed and its count is one the
groups can have sent. Every group then restarts from the global weights: the new ones, or, when the
round did not commit, those before it (its local steps are dropped; never a partial average). The
global weights change only after the vote: torchft serves them by reference to healers until then.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_fedopt.fault_tolerance.faults import FaultHandler

__all__ = ["torchft_round"]


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
    managed = faults.managed
    assert managed is not None, "the torchft communicator is not open"
    info = managed.start_round()
    allowed = faults.quorum_allowed(info, step)
    contribute = contribute and allowed and not info.healed
    local_nonfinite = contribute and not all(bool(torch.isfinite(t).all()) for t in tensors)
    finite = contribute and not local_nonfinite
    with torch.no_grad():
        if finite:
            deltas = [
                (phi.to(t.device) - t) if param else t.detach().clone()
                for t, phi, param in zip(tensors, global_weights, is_param)
            ]
        else:
            deltas = [torch.zeros_like(t) for t in tensors]
        count = torch.tensor([1.0 if finite else 0.0], dtype=tensors[0].dtype, device=tensors[0].device)
    reduced = managed.all_reduce([*deltas, count], "sum").wait()
    committed = managed.commit() and reduced and allowed  # the vote always runs
    n_valid = round(float(count)) if reduced else 0
    if reduced and not faults.contributors_allowed(float(count), info, step):
        committed, n_valid = False, 0
    if committed and n_valid > 0:
        apply(deltas, n_valid)
    with torch.no_grad():
        for t, phi in zip(tensors, global_weights):
            t.copy_(phi.to(t.device))
    faults.note_round(info, committed, step)
    numbers = {
        "quorum_size": float(info.participants),
        "contributors": float(n_valid),
        "healed": float(info.healed),
        "committed": float(committed),
        "quorum_seconds": float(info.seconds),
        "quorum_id": float(info.quorum_id),
        "round": float(info.step),
    }
    return numbers, local_nonfinite
