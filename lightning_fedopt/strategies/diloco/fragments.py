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

import bisect
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_int
from lightning_fedopt.runtime.reduce import MaskedSum, PendingSum, all_finite
from lightning_fedopt.schedules import AutoSync, SyncSchedule, streaming_sync_every

__all__ = [
    "LAYOUTS",
    "AutoFragmentEvents",
    "Fragment",
    "FragmentEvents",
    "InFlight",
    "RoundClock",
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
#: DiLoCo's streaming arguments at their defaults: every tensor synchronised every ``H`` steps
WHOLE_MODEL: dict[str, Any] = {"fragments": 1, "fragment_layout": "auto", "sync_delay": 0, "mixing": 0.0}


def refuse_streaming(owner: str, variant: str, given: dict[str, Any]) -> None:
    """For a strategy whose rounds are whole-model (SparseLoCo, MuLoCo): every streaming argument in
    ``given`` must be its default, a plain value (Lightning's CLI passes every argument, filled in
    with its default); else ``ValueError`` naming it and ``variant``, the streaming alternative."""
    for name, default in WHOLE_MODEL.items():
        if name not in given:
            continue
        value = given[name]
        if not (isinstance(value, (int, float, str)) and not isinstance(value, bool) and value == default):
            raise ValueError(
                f"{owner} does not take `{name}`: every tensor is synchronised every H steps "
                f"(use {variant} for a streaming variant)"
            )


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

    def events(self, step: int) -> tuple[int | None, int | None]:
        """``(launch, apply)`` after optimizer step ``step`` (:func:`fragment_events`)."""
        return fragment_events(step, self.sync_every, self.fragments, self.delay)

    @override
    def __repr__(self) -> str:
        return f"FragmentEvents(H={self.sync_every}, F={self.fragments}, tau={self.delay})"


class AutoFragmentEvents(AutoSync):
    """Streaming DiLoCo's ``sync_every="auto"``: the fragment events of :class:`FragmentEvents`
    with a period ``H`` chosen from measurements, as :class:`~lightning_fedopt.schedules.AutoSync`
    chooses it for a round of every tensor.

    ``H`` starts at ``max(probe, F (tau + 1))``. At the end of the first full round (the step at
    which fragment ``F - 1`` is launched; with ``F = 1`` the second, when a fragment round has
    completed) and every ``remeasure_every`` rounds after it, the strategy measures and
    :meth:`decide` sets ``H`` for the steps after it (:func:`~lightning_fedopt.schedules.streaming_sync_every`,
    bounded below by ``F (tau + 1)``). A new ``H`` starts only at a round boundary, so the fragment
    launched there is applied ``tau`` steps later as before, and the next round's offsets count
    from the boundary: fragment ``p`` launches ``(p + 1) H // F`` steps after it. Within a segment
    of one ``H`` the events are those of :func:`fragment_events`.

    Args:
        auto: the bounds, budget, probe and re-measurement of ``sync_every`` (``low`` is raised to
            ``F (tau + 1)``; ``high`` must be at least that).
        fragments: ``F`` (>= 1).
        delay: ``tau`` (>= 0).

    Example:
        >>> events = AutoFragmentEvents(AutoSync(probe=4), fragments=2, delay=1)
        >>> events.sync_steps(4)          # H = 4: launch 0 at 2, apply at 3; launch 1 at 4 (a round's end)
        [2, 3, 4]
        >>> events.measures_at(4, sync_count=3), events.measures_at(8, sync_count=7)  # rounds 1 and 2
        (True, False)
        >>> events.decide(step=4, step_seconds=0.1, sync_seconds=0.23)  # 0.015 s exposed a fragment
        6
        >>> [s for s in range(5, 18) if events.should_sync(s)]   # 1's apply at 5; then H = 6 from 4
        [5, 7, 8, 10, 11, 13, 14, 16, 17]
    """

    def __init__(self, auto: AutoSync, fragments: int, delay: int) -> None:
        self.fragments = check_int("fragments", fragments, low=1)
        self.delay = check_int("sync_delay", delay, low=0)
        least = self.fragments * (self.delay + 1)
        if auto.high < least:
            raise ValueError(
                f"`high` of sync_every='auto' must be >= F (tau + 1) = {least} with fragments={fragments}, "
                f"sync_delay={delay} (the fragment period H // F must exceed `sync_delay`), got {auto.high}"
            )
        super().__init__(
            auto.budget,
            low=max(auto.low, least),
            high=auto.high,
            probe=max(auto.probe, least),
            remeasure_every=auto.remeasure_every,
            min_rounds=auto.min_rounds,
        )

    def _segment(self, step: int) -> tuple[int, int]:
        """``(start, H)`` of the decision that applies to step ``step`` (>= 1)."""
        starts = [s for s, _ in self.decisions]
        return self.decisions[bisect.bisect_left(starts, step) - 1]

    def launched(self, step: int) -> int | None:
        """The fragment launched after optimizer step ``step`` (None if none)."""
        if step <= 0:
            return None
        start, every = self._segment(step)
        position = (step - start) % every
        for p in range(self.fragments):
            if ((p + 1) * every // self.fragments) % every == position:
                return p
        return None

    def events(self, step: int) -> tuple[int | None, int | None]:
        """``(launch, apply)`` after optimizer step ``step``, as :func:`fragment_events`: a fragment
        is applied ``tau`` steps after its launch (``tau = 0``: at its launch, reported as launched)."""
        apply = self.launched(step - self.delay) if self.delay > 0 else None
        return self.launched(step), apply

    @override
    def should_sync(self, step: int) -> bool:
        return self.events(step) != (None, None)

    @override
    def round_ends(self, step: int) -> bool:
        """Whether step ``step`` ends a full round (fragment ``F - 1`` is launched after it)."""
        if step <= 0:
            return False
        start, every = self._segment(step)
        return (step - start) % every == 0

    def rounds_done(self, step: int) -> int:
        """Full rounds ended at or before step ``step``."""
        done = 0
        for i, (start, every) in enumerate(self.decisions):
            end = self.decisions[i + 1][0] if i + 1 < len(self.decisions) else step
            if step <= start:
                break
            done += (min(step, end) - start) // every
        return done

    @override
    def measures_at(self, step: int, sync_count: int) -> bool:
        """At the end of the first full round (with ``F = 1``: the second, the first to hold a
        completed fragment round) and every ``remeasure_every`` rounds after it."""
        if not self.round_ends(step):
            return False
        rounds = self.rounds_done(step) - (1 if self.fragments == 1 else 0)
        return rounds >= 1 and self.wants_measurement(rounds)

    @override
    def decide(
        self,
        step: int,
        step_seconds: float,
        sync_seconds: float,
        *,
        overlapped: bool = True,
        total_steps: int | None = None,
    ) -> int:
        """Set ``H`` for the steps after ``step`` (a round boundary) from the agreed step seconds and
        the seconds of a round's ``F`` fragment transfers (:func:`~lightning_fedopt.schedules.streaming_sync_every`).
        ``overlapped`` (default): each fragment's transfer hides behind ``tau`` steps; False: nothing
        is counted hidden (the blocking rule; the strategy's choice where the transfers share the
        compute's cores), ``H`` still at least ``F (tau + 1)``; at most :meth:`ceiling` of
        ``total_steps`` (the run's steps, where known)."""
        if not self.round_ends(step):
            raise RuntimeError(f"AutoFragmentEvents: step {step} does not end a round; H changes only there")
        every = streaming_sync_every(
            max(step_seconds, 1e-9),
            max(sync_seconds, 0.0),
            self.fragments,
            self.delay if overlapped else 0,
            budget=self.budget,
            low=max(self.low, self.fragments * (self.delay + 1)),
            high=self.ceiling(total_steps),
        )
        return self.record(step, every)

    @override
    def load_state_dict(self, state: dict[str, list[list[int]]]) -> None:
        super().load_state_dict(state)
        least = self.fragments * (self.delay + 1)
        if any(h < least for _, h in self.decisions):
            raise ValueError(f"AutoFragmentEvents: a period below F (tau + 1) = {least} in {state!r}")


class RoundClock:
    """When a round's all-reduce was launched and when it completed (``time.perf_counter`` of this
    process): ``sync_every="auto"`` of an overlapped round (CO2, streaming DiLoCo) measures its
    transfer time ``completed - launched``, not the part of it the training waited for.

    The completion is the first of: the all-reduce's futures completing (CPU tensors: a gloo
    work's future completes, and runs its callbacks, on gloo's thread as the transfer ends), a
    :meth:`poll` that finds it complete, the end of the wait for it (:meth:`done`). A CUDA work's
    future completes when the work is enqueued, not done, so on CUDA only the polls (one per
    step) and the wait count: the time is then an upper bound, to within a step.
    """

    def __init__(self, launched: float | None = None) -> None:
        #: when the all-reduce was launched
        self.launched = time.perf_counter() if launched is None else launched
        #: when it completed (None: not known yet)
        self.completed: float | None = None
        self._lock = threading.Lock()
        self._remaining = 0

    def watch(self, pending: PendingSum) -> None:
        """Take the completion from ``pending``'s futures where they tell it (see the class doc)."""
        futures = pending.futures()
        if futures is None:  # CUDA, or a backend without futures: polls and the wait tell it
            return
        if not futures:  # synchronous (compressed, one process): complete already
            self.done()
            return
        self._remaining = len(futures)
        for future in futures:
            future.add_done_callback(self._one_done)

    def _one_done(self, _future: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            self._remaining -= 1
            if self._remaining == 0:
                self._set(now)

    def _set(self, now: float) -> None:
        self.completed = now if self.completed is None else min(self.completed, now)

    def poll(self, pending: PendingSum) -> None:
        """Note the completion if ``pending`` has completed (never blocks)."""
        if self.completed is None and pending.is_completed():
            with self._lock:
                self._set(time.perf_counter())

    def done(self) -> None:
        """The all-reduce is complete (its wait returned): an upper bound of its completion."""
        with self._lock:
            self._set(time.perf_counter())

    @property
    def seconds(self) -> float | None:
        """``completed - launched`` (None before the completion is known)."""
        return None if self.completed is None else max(0.0, self.completed - self.launched)


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
    #: when the all-reduce was launched and completed (None: not timed, e.g. restored from a checkpoint)
    clock: RoundClock | None = None

    @property
    def seconds(self) -> float | None:
        """The all-reduce's transfer time, launch to completion (None: not known)."""
        return None if self.clock is None else self.clock.seconds

    def poll(self) -> None:
        """Note the completion time if the all-reduce has completed (never blocks)."""
        if self.clock is not None:
            self.clock.poll(self.pending)

    def wait(self) -> MaskedSum:
        """Complete the all-reduce (idempotent), adding :attr:`shift` to the mean pseudo-gradients."""
        if self.result is None:
            result = self.pending.wait()
            if self.clock is not None:
                self.clock.done()
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
