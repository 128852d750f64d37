"""Local SGD rounds that combine the replicas with a merge operator instead of the mean.

Every replica's model travels in one all-gather (:func:`gather_models`), and every rank applies
the same pure merge to the same set (:func:`merge_round`), so all ranks agree on the result.

Inside a round the contributions carry equal weights **that sum to 1**. The operators that sum
weighted task vectors (``task_arithmetic``, ``dare``) are written for merging *different* tasks'
vectors, where adding them up is the point; a Local SGD round instead averages N estimates of one
update, so each delta must count ``1/N``: with N identical replicas that moved by 1 the round moves
by 1, as the mean and TIES do (not by N). Operators that normalise by the weights (mean, TIES,
variance-corrected) or ignore them (model stock, the robust ones) are unaffected.

Example (single process: four replicas that each moved by 1 from the last round's result)::

    >>> import torch
    >>> from lightning_fedopt.merging import Merge
    >>> models = [[torch.ones(2)] for _ in range(4)]
    >>> merged, n_bad = merge_round(Merge("task_arithmetic"), models, 0, base=[torch.zeros(2)])
    >>> merged[0].tolist(), n_bad
    ([1.0, 1.0], 0)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_fedopt._flat import flatten, group_by_dtype, unflatten
from lightning_fedopt.comm import Communicator
from lightning_fedopt.merging import Contribution, ContributionSet, Merge
from lightning_fedopt.runtime.reduce import NoFiniteReplicaError, all_finite

__all__ = ["check_merge_options", "check_merge_world", "gather_models", "merge_round"]


def check_merge_options(merge: Merge, **in_use: bool) -> None:
    """Refuse a merge other than the mean together with an option that only the mean supports
    (``in_use``: option name -> whether it is set, e.g. ``participation=True`` for partial participation).

    Raises:
        ValueError: naming the merge and the options in use.
    """
    used = [name for name, on in in_use.items() if on]
    if not merge.linear and used:
        raise ValueError(
            f"`merge={merge.method!r}` needs full participation, uniform weighting, no FedAU, no "
            f"round_seconds and no compressor (only the mean combines with those); got {', '.join(used)}"
        )


def check_merge_world(merge: Merge, world_size: int) -> None:
    """Refuse, at set-up, a merge that cannot run on ``world_size`` replicas.

    A robust operator needs enough models (``Merge("krum", f=5)`` needs 13); with fewer it would
    only ever fall back to the mean. ``slerp`` interpolates exactly two models.

    Raises:
        ValueError: naming the merge, what it needs and how many replicas there are.
    """
    if world_size <= 1:
        return
    if merge.method == "slerp" and world_size != 2:
        raise ValueError(
            f"`merge` {merge!r} interpolates exactly 2 models but there are {world_size} replicas"
        )
    need = merge.min_contributions()
    if world_size < need:
        raise ValueError(
            f"`merge` {merge!r} needs {need} models per merge but there are only {world_size} replicas; "
            "use more replicas or a smaller `f`"
        )


def gather_models(comm: Communicator, tensors: Sequence[Tensor], purpose: str) -> list[list[Tensor]]:
    """Every replica's ``tensors`` (one all-gather per dtype), by rank."""
    tensors = [t.detach() for t in tensors]
    models: list[list[Tensor | None]] = [[None] * len(tensors) for _ in range(comm.world_size)]
    for idx in group_by_dtype(tensors):
        like = [tensors[i] for i in idx]
        for r, part in enumerate(comm.all_gather(flatten(like), purpose=purpose).wait()):
            for i, piece in zip(idx, unflatten(part, like)):
                models[r][i] = piece
    return [[t for t in m if t is not None] for m in models]


def merge_round(
    merge: Merge,
    models: Sequence[Sequence[Tensor]],
    version: int,
    *,
    base: Sequence[Tensor] | None = None,
    names: Sequence[str] | None = None,
    step: int | None = None,
) -> tuple[list[Tensor], int]:
    """One Local SGD round's merge of the replicas' ``models`` (by rank), the same on every rank.

    Replicas with non-finite tensors are left out; the others enter as contributions keyed by
    ``(replica, version)`` with equal weights summing to 1. When fewer are left than the operator
    needs, the survivors are averaged. Deltas (TIES, DARE, ...) are taken from ``base``; NNA's
    reference is the coordinate-wise median, so that every rank agrees.

    Returns:
        The merged tensors and the number of replicas left out.

    Raises:
        NoFiniteReplicaError: no replica has finite tensors.
    """
    finite = [r for r, m in enumerate(models) if all_finite(m)]
    if not finite:
        raise NoFiniteReplicaError(step, what="merge")
    weight = 1.0 / len(finite)
    ok = ContributionSet(Contribution(r, version, tuple(models[r]), weight) for r in finite)
    n_bad = len(models) - len(finite)
    if len(finite) < merge.min_contributions():
        return Merge("mean")(ok), n_bad
    reference = Merge("median")(ok) if merge.method == "nna" else None
    return merge(ok, base=base, reference=reference, names=names), n_bad
