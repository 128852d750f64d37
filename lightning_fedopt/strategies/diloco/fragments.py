"""Fragments of the tracked tensors and the rounds of pseudo-gradients in flight (DiLoCo, streaming
DiLoCo, CO2).

A :class:`Fragment` owns the indices of its tensors and its outer optimizer over the outer weights
``phi`` of those tensors (plain DiLoCo and CO2: one fragment of everything; streaming DiLoCo: ``F``
fragments synchronised in turn). An :class:`InFlight` is one launched all-reduce of pseudo-gradients
waiting to be applied. Which fragment is launched or applied after a step is a pure function of
the step count (:func:`fragment_events`), so every rank agrees without talking.

Two layouts assign tensors to fragments:

* ``"contiguous"`` (:func:`split_fragments`): consecutive tensors, in module order, in groups of
  roughly equal size; a layer's weight and bias may land in different fragments.
* ``"strided"`` (:func:`strided_fragments`): the model's repeated blocks (:func:`repeated_blocks`:
  the children of its largest numbered container, e.g. a transformer's ``h.0``, ``h.1``, ...) dealt
  round-robin, block ``j`` to fragment ``j mod F``, as in the streaming DiLoCo paper (Douillard et
  al. 2025, arXiv 2501.18512, section 2.2: "the simple partition of our network into P fragments
  made of several transformer blocks ... 2) strided where each fragment is composed of interleaved
  transformer blocks"). The rest travels with the nearest block: what comes before the first block
  (the embeddings) with fragment 0, what comes after the last (the final norm, the head) with
  fragment ``F - 1``, anything between two blocks with the block before it. A model without a
  numbered container deals its modules (:func:`layer_keys`) round-robin instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_int
from lightning_fedopt.runtime.reduce import MaskedSum, PendingSum, all_finite
from lightning_fedopt.schedules import SyncSchedule

__all__ = [
    "LAYOUTS",
    "Fragment",
    "FragmentEvents",
    "InFlight",
    "assign_fragments",
    "fragment_events",
    "layer_keys",
    "pseudo_gradients",
    "repeated_blocks",
    "resolve_layout",
    "split_fragments",
    "strided_fragments",
]

#: the ways tensors are assigned to fragments
LAYOUTS = ("auto", "contiguous", "strided")

#: the counters a checkpointed round's last reduced tensor holds (masked_sum's order)
_COUNTERS = ("weight", "valid", "invalid")

_NUMBERED = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def split_fragments(numels: list[int], fragments: int) -> list[list[int]]:
    """Split tensors (given by their sizes, in module order) into ``fragments`` contiguous,
    non-empty groups of roughly equal total size.

    Example:
        >>> split_fragments([10, 10, 10, 10], 2)
        [[0, 1], [2, 3]]
        >>> split_fragments([100, 1, 1, 1], 2)
        [[0], [1, 2, 3]]
    """
    n = len(numels)
    if not 1 <= fragments <= n:
        raise ValueError(f"`fragments` must be in [1, {n}] (the number of tensors), got {fragments}")
    cumulative = [0]
    for size in numels:
        cumulative.append(cumulative[-1] + size)
    total = cumulative[-1]
    bounds = [0]
    for k in range(1, fragments):
        target = k * total / fragments
        # the boundary whose cumulative size is closest to the target, keeping every group non-empty
        b = min(range(1, n), key=lambda i: (abs(cumulative[i] - target), i))
        b = max(b, bounds[-1] + 1)
        b = min(b, n - (fragments - k))
        bounds.append(b)
    bounds.append(n)
    return [list(range(bounds[k], bounds[k + 1])) for k in range(fragments)]


def layer_keys(names: list[str]) -> list[str]:
    """The layer each tensor (by its qualified name) belongs to: the first numbered block on its
    path (an ``nn.ModuleList``/``nn.Sequential`` child such as ``transformer.h.3``), or else the
    module that owns it (``embed`` for ``embed.weight``). A module's weight and bias, and every
    tensor of one transformer block, share a layer.

    Example:
        >>> layer_keys(["embed.weight", "h.0.attn.weight", "h.0.mlp.bias", "h.1.ln.weight", "head.bias"])
        ['embed', 'h.0', 'h.0', 'h.1', 'head']
    """
    keys = []
    for name in names:
        numbered = _NUMBERED.match(name)
        keys.append(numbered.group(1) if numbered else (name.rsplit(".", 1)[0] if "." in name else name))
    return keys


def repeated_blocks(names: list[str]) -> list[int | None]:
    """The repeated block each tensor (by its qualified name) belongs to, numbered in order of
    first appearance, or ``None`` for a tensor outside every block. The blocks are the numbered
    children (:func:`layer_keys`) of the model's numbered container with the most of them (the
    first such container on a tie), e.g. ``transformer.h`` of a GPT: its ``h.0``, ``h.1``, ...
    The embeddings, the final norm, a numbered head of fewer entries are outside.

    Example:
        >>> repeated_blocks(["wte.weight", "h.0.attn.weight", "h.0.mlp.bias", "h.1.ln.weight", "ln_f.bias"])
        [None, 0, 0, 1, None]
        >>> repeated_blocks(["fc1.weight", "fc2.weight"])
        [None, None]
    """
    keys = [_NUMBERED.match(name) for name in names]
    children: dict[str, list[str]] = {}  # container -> its numbered children, in order
    for match in keys:
        if match is None:
            continue
        container = match.group(1).rsplit(".", 1)[0]
        known = children.setdefault(container, [])
        if match.group(1) not in known:
            known.append(match.group(1))
    if not children:
        return [None] * len(names)
    best = max(children, key=lambda c: len(children[c]))  # max keeps the first on a tie
    number = {block: j for j, block in enumerate(children[best])}
    return [None if match is None else number.get(match.group(1)) for match in keys]


def _strided_units(names: list[str]) -> tuple[list[int | None], int]:
    """Per tensor, the unit dealt round-robin (a repeated block, or without blocks the module
    that owns it), and the number of units."""
    blocks = repeated_blocks(names)
    if any(b is not None for b in blocks):
        return blocks, 1 + max(b for b in blocks if b is not None)
    units: dict[str, int] = {}
    for key in layer_keys(names):
        units.setdefault(key, len(units))
    return [units[key] for key in layer_keys(names)], len(units)


def strided_fragments(names: list[str], fragments: int) -> list[list[int]]:
    """The paper's strided layout: the repeated blocks (:func:`repeated_blocks`) dealt to
    ``fragments`` groups round-robin (block ``j`` to fragment ``j mod fragments``); a tensor before
    the first block joins fragment 0, after the last block fragment ``fragments - 1``, between two
    blocks the fragment of the block before it. A model without repeated blocks deals its modules
    (:func:`layer_keys`, in order of first appearance) round-robin. Returns each fragment's tensor
    indices, ascending.

    Example:
        >>> gpt = ["wte.weight", "h.0.w", "h.1.w", "h.2.w", "h.3.w", "ln_f.weight", "head.weight"]
        >>> strided_fragments(gpt, 2)   # embeddings with h.0 (fragment 0), norm and head with h.3 (1)
        [[0, 1, 3], [2, 4, 5, 6]]
        >>> strided_fragments(["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight"], 2)
        [[0, 1, 4], [2, 3]]
    """
    units, count = _strided_units(names)
    what = "repeated blocks" if any(b is not None for b in repeated_blocks(names)) else "layers"
    if not 1 <= fragments <= count:
        raise ValueError(
            f"`fragments` must be in [1, {count}] (the number of {what}) with fragment_layout='strided', "
            f"got {fragments}"
        )
    inside = [i for i, u in enumerate(units) if u is not None]
    first, last = (inside[0], inside[-1]) if inside else (0, len(names) - 1)
    groups: list[list[int]] = [[] for _ in range(fragments)]
    current = 0  # the fragment of the last block seen
    for i, unit in enumerate(units):
        if unit is not None:
            current = unit % fragments
            groups[current].append(i)
        elif i < first:
            groups[0].append(i)
        elif i > last:
            groups[fragments - 1].append(i)
        else:
            groups[current].append(i)
    return groups


def resolve_layout(names: list[str], fragments: int, layout: str) -> str:
    """``"auto"`` is ``"strided"`` when the model has at least ``fragments`` repeated blocks
    (:func:`repeated_blocks`; without any: modules, :func:`layer_keys`), else ``"contiguous"``;
    the other layouts are returned as they are.

    Example:
        >>> resolve_layout(["a.weight", "a.bias", "b.weight"], 2, "auto")
        'strided'
        >>> resolve_layout(["a.weight", "a.bias", "b.weight"], 3, "auto")
        'contiguous'
        >>> resolve_layout(["emb.weight", "h.0.w", "h.1.w", "ln_f.weight"], 3, "auto")   # 2 blocks
        'contiguous'
    """
    if layout != "auto":
        return layout
    return "strided" if fragments <= _strided_units(names)[1] else "contiguous"


def assign_fragments(names: list[str], numels: list[int], fragments: int, layout: str) -> list[list[int]]:
    """The tensor indices of each fragment under ``layout`` (one of :data:`LAYOUTS`)."""
    if resolve_layout(names, fragments, layout) == "strided":
        return strided_fragments(names, fragments)
    return split_fragments(numels, fragments)


def fragment_events(step: int, sync_every: int, fragments: int, delay: int) -> tuple[int | None, int | None]:
    """``(launch, apply)``: the fragment whose all-reduce is launched after optimizer step ``step``
    and the fragment applied after it (``None`` if none; with ``delay=0`` a fragment is applied
    at its launch, and reported as launched only). Fragment ``p`` launches at steps
    ``k H + ((p + 1) H // F) mod H`` (``> 0``) and is applied ``delay`` steps later.

    Example:
        >>> [fragment_events(s, 4, 2, 1) for s in range(1, 7)]
        [(None, None), (0, None), (None, 0), (1, None), (None, 1), (0, None)]
    """
    launch = apply = None
    for p in range(fragments):
        offset = ((p + 1) * sync_every // fragments) % sync_every
        if step > 0 and step % sync_every == offset:
            launch = p
        s = step - delay
        if delay > 0 and s > 0 and s % sync_every == offset:
            apply = p
    return launch, apply


class FragmentEvents(SyncSchedule):
    """The steps at which something happens: a fragment is launched or applied."""

    def __init__(self, sync_every: int, fragments: int, delay: int) -> None:
        self.sync_every = check_int("sync_every", sync_every, low=1)
        self.fragments = check_int("fragments", fragments, low=1)
        self.delay = check_int("sync_delay", delay, low=0)

    @override
    def should_sync(self, step: int) -> bool:
        return fragment_events(step, self.sync_every, self.fragments, self.delay) != (None, None)

    @override
    def __repr__(self) -> str:
        return f"FragmentEvents(H={self.sync_every}, F={self.fragments}, tau={self.delay})"


@dataclass
class Fragment:
    """Tracked tensors synchronised together, with the outer optimizer of their outer weights.

    Attributes:
        index: the fragment's number (0 for the single fragment of plain DiLoCo).
        indices: the tracked tensors it holds (ascending).
        outer: the outer optimizer over the outer weights of its parameters (buffers are averaged,
            not stepped).
    """

    index: int
    indices: list[int]
    outer: torch.optim.Optimizer

    @classmethod
    def build(
        cls,
        index: int,
        indices: list[int],
        outer_weights: list[Tensor],
        is_param: list[bool],
        factory: Callable[..., torch.optim.Optimizer],
    ) -> Fragment:
        """The fragment of ``indices``, its optimizer built by ``factory`` over their outer weights."""
        params = [outer_weights[i] for i in indices if is_param[i]]
        if not params:  # only buffers: an optimizer over a placeholder, so every fragment has one
            params = [torch.zeros(1, device=outer_weights[indices[0]].device)]
        return cls(index, list(indices), factory(params))

    def step(self) -> None:
        """One outer step on the gradients already set on the outer weights; clears them."""
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)


def pseudo_gradients(
    local: list[Tensor], outer_weights: list[Tensor], is_param: list[bool], steps: int
) -> tuple[list[Tensor], bool, bool]:
    """This replica's contribution for :func:`~lightning_fedopt.runtime.reduce.masked_sum`:
    ``(phi - theta) / steps`` for a parameter (the pseudo-gradient, per step taken), the value
    itself for a buffer, all zeros when ``local`` is not finite or no step was taken.

    Returns ``(contribution, valid, finite)``.
    """
    finite = all_finite(local)
    valid = finite and steps > 0
    with torch.no_grad():
        if valid:
            contribution = [
                (phi.to(t.device, non_blocking=True) - t) / steps if param else t.clone()
                for t, phi, param in zip(local, outer_weights, is_param)
            ]
        else:
            contribution = [torch.zeros_like(t) for t in local]
    return contribution, valid, finite


@dataclass
class InFlight:
    """A launched all-reduce of pseudo-gradients, applied at ``apply_step``.

    Attributes:
        fragment: the fragment it carries, or ``None`` for every fragment at once.
        indices: the tracked tensors it carries (ascending).
        apply_step: the replica step after which it is applied.
        pending: the all-reduce (:func:`~lightning_fedopt.runtime.reduce.masked_sum`).
        local_finite: whether this replica's tensors were finite at launch.
        result: what the all-reduce delivered, once waited for (None before).
        shift: how far the outer weights moved since launch, added on completion (None: nothing).
    """

    fragment: int | None
    indices: list[int]
    apply_step: int
    pending: PendingSum
    local_finite: bool
    result: MaskedSum | None = None
    #: per carried tensor, how far the outer weights moved after these pseudo-gradients were
    #: computed (None for a buffer); added to the mean pseudo-gradient when the all-reduce completes,
    #: so the round is applied against the outer weights it lands on (CO2's second round of a fit)
    shift: list[Tensor | None] | None = None

    def wait(self) -> MaskedSum:
        """Complete the all-reduce (idempotent), adding :attr:`shift` to the mean pseudo-gradients."""
        if self.result is None:
            result = self.pending.wait()
            if self.shift is not None and result.valid > 0 and result.weight > 0:
                # the outer step takes (sum / valid) * (weight / valid): move that by `shift`
                alpha = result.valid * result.valid / result.weight
                for s, d in zip(result.sums, self.shift):
                    if d is not None:
                        s.add_(d.to(s.device, s.dtype), alpha=alpha)
            self.shift = None
            self.result = result
        return self.result

    def state_dict(self) -> dict[str, Any]:
        """The completed round for a checkpoint (its sums and counters, on the CPU)."""
        self.wait()
        reduced = [*self.pending.sums, self.pending.scalars]
        return {
            "fragment": self.fragment,
            "apply_step": self.apply_step,
            "reduced": [t.detach().cpu().clone() for t in reduced],
            "counters": list(_COUNTERS),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], indices: list[int], device: torch.device) -> InFlight:
        """The completed round :meth:`state_dict` saved (this replica counted as finite until
        :meth:`~lightning_fedopt.strategies.diloco.DiLoCoStrategy.load_replica_state_dict` says)."""
        *sums, scalars = [t.to(device) for t in state["reduced"]]
        if "counters" not in state:  # saved before masked_sum: [valid, invalid, summed steps]
            scalars = scalars[[2, 0, 1]]
        return cls(state["fragment"], indices, state["apply_step"], PendingSum(sums, scalars, None, 0), True)
