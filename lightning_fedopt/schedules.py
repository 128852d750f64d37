"""When replicas talk: synchronisation schedules.

A schedule answers one question, :meth:`SyncSchedule.should_sync`, for the number of optimizer
steps completed so far (1 after the first step). Schedules are pure functions of that step
count, so every rank reaches the same answer and a resumed run needs nothing but the counter.

* :class:`Periodic` — every ``H`` steps, optionally after a warm-up of ``W`` steps with ``H=1``
  (post-local SGD, Lin et al., "Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020).
* :class:`Increasing` — the period grows geometrically as training proceeds.
* :class:`LateBudget` — a fixed budget of ``K`` synchronisations over ``T`` steps, concentrated
  towards the end (in the spirit of "A Single Merging Suffices", arXiv 2507.06542).
* :class:`Explicit` — synchronise at the listed steps.
* :class:`AutoSync` (``sync_every="auto"``) — ``H`` chosen from measurements: after the first
  synchronisation (and every ``remeasure_every`` after it) the ranks agree on the slowest measured
  compute time per step and the synchronisation time, and ``H`` becomes the smallest period whose
  exposed synchronisation takes at most ``budget`` of the wall time
  (:func:`lightning_fedopt.plan.choose_sync_every`; for streaming DiLoCo
  :func:`streaming_sync_every`). The decisions are state (saved with the
  checkpoint), so the schedule is still a pure function of the step count and what was agreed.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable

from typing_extensions import override

from lightning_fedopt._validate import check_float, check_int

__all__ = [
    "AutoSync",
    "Explicit",
    "Increasing",
    "LateBudget",
    "Periodic",
    "SyncSchedule",
    "as_schedule",
]


class SyncSchedule(ABC):
    """Decides at which optimizer steps the replicas synchronise."""

    @abstractmethod
    def should_sync(self, step: int) -> bool:
        """Whether to synchronise right after optimizer step number ``step`` (1-based)."""

    def sync_steps(self, up_to: int) -> list[int]:
        """All sync steps in ``[1, up_to]`` (for plots, tests and cost estimates)."""
        return [s for s in range(1, up_to + 1) if self.should_sync(s)]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Periodic(SyncSchedule):
    """Every ``every`` steps; every step during the first ``warmup_steps`` steps (post-local SGD).

    Args:
        every: the period ``H`` (>= 1).
        warmup_steps: steps at the start that each end with a synchronisation (>= 0).

    Example:
        >>> Periodic(4, warmup_steps=2).sync_steps(12)
        [1, 2, 6, 10]
    """

    def __init__(self, every: int, warmup_steps: int = 0) -> None:
        self.every = check_int("sync_every", every, low=1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=0)

    @override
    def should_sync(self, step: int) -> bool:
        if step <= self.warmup_steps:
            return True
        return (step - self.warmup_steps) % self.every == 0


class _PointSchedule(SyncSchedule):
    """A schedule given by a lazily generated, strictly increasing list of sync steps."""

    def __init__(self) -> None:
        self._points: list[int] = []

    @abstractmethod
    def _next_point(self, index: int, last: int) -> int | None:
        """The ``index``-th sync step (0-based) given the previous one (0 if none); None if no more."""

    def _extend_to(self, step: int) -> None:
        while not self._points or self._points[-1] < step:
            last = self._points[-1] if self._points else 0
            nxt = self._next_point(len(self._points), last)
            if nxt is None:
                return
            if nxt <= last:
                raise RuntimeError(f"{type(self).__name__}: sync steps must increase ({last} -> {nxt})")
            self._points.append(nxt)

    @override
    def should_sync(self, step: int) -> bool:
        self._extend_to(step)
        i = bisect.bisect_left(self._points, step)
        return i < len(self._points) and self._points[i] == step


class Increasing(_PointSchedule):
    """A period that grows geometrically: ``H_k = min(max_every, start * factor**(k // rounds_per_stage))``.

    ``k`` counts the synchronisations done so far. Communicating often early and rarely later
    suits the fast early drift of replicas.

    Args:
        start: the first period (>= 1).
        factor: growth per stage (>= 1).
        rounds_per_stage: synchronisations at each period before it grows (>= 1).
        max_every: the largest period (default: unbounded).

    Example:
        >>> Increasing(start=1, factor=2.0, rounds_per_stage=2).sync_steps(20)
        [1, 2, 4, 6, 10, 14]
    """

    def __init__(
        self, start: int = 1, factor: float = 2.0, rounds_per_stage: int = 4, max_every: int | None = None
    ) -> None:
        super().__init__()
        self.start = check_int("start", start, low=1)
        self.factor = check_float("factor", factor, low=1)
        self.rounds_per_stage = check_int("rounds_per_stage", rounds_per_stage, low=1)
        self.max_every = check_int("max_every", max_every, low=self.start, allow_none=True)
        self._last_stage = None if self.max_every is None else self._capped_stage(self.max_every)

    def _capped_stage(self, max_every: int) -> int | None:
        """A stage from which on the period is ``max_every``: ``start * factor**stage >= max_every``.

        Later stages use this one's exponent, so ``factor`` is never raised to a power large enough
        to overflow a float (``2.0**1024``: step 65,215 of ``Increasing(1, 2.0, 1, max_every=64)``).
        None where even that stage's period is beyond a float (the cap then never applies).
        """
        if self.factor == 1.0:
            return 0
        ratio = math.log(max_every) - math.log(self.start)
        stage = max(0, math.ceil(ratio / math.log(self.factor)))
        try:
            while self.start * self.factor**stage < max_every:  # (in case the logarithms round down)
                stage += 1
        except OverflowError:
            return None
        return stage

    @override
    def _next_point(self, index: int, last: int) -> int:
        stage = index // self.rounds_per_stage
        if self._last_stage is not None:
            stage = min(stage, self._last_stage)
        period = self.start * self.factor**stage
        if self.max_every is not None:
            period = min(period, self.max_every)
        return last + max(1, round(period))


class LateBudget(_PointSchedule):
    """``num_syncs`` synchronisations in ``total_steps`` steps, denser towards the end.

    The k-th sync (k = 1..K) happens at ``ceil(T * (k / K) ** (1 / power))``; ``power = 1`` spaces
    them evenly, larger powers push them late. The last one is always at step ``T``.

    Args:
        total_steps: ``T``, the planned number of optimizer steps (>= 1).
        num_syncs: ``K``, the budget (1 <= K <= T).
        power: concentration (>= 1).

    Example:
        >>> LateBudget(total_steps=100, num_syncs=4, power=2.0).sync_steps(100)
        [50, 71, 87, 100]
    """

    def __init__(self, total_steps: int, num_syncs: int, power: float = 2.0) -> None:
        super().__init__()
        self.total_steps = check_int("total_steps", total_steps, low=1)
        self.num_syncs = check_int("num_syncs", num_syncs, low=1)
        if num_syncs > total_steps:
            raise ValueError(f"`num_syncs` must be <= `total_steps` ({total_steps}), got {num_syncs}")
        self.power = check_float("power", power, low=1)

    @override
    def _next_point(self, index: int, last: int) -> int | None:
        k = index + 1
        if k > self.num_syncs:
            return None
        point = math.ceil(self.total_steps * (k / self.num_syncs) ** (1.0 / self.power) - 1e-9)
        # keep the points distinct while leaving room for the ones still to come
        return min(max(point, last + 1), self.total_steps - (self.num_syncs - k))


class Explicit(SyncSchedule):
    """Synchronise exactly after the listed optimizer steps.

    Example:
        >>> Explicit([3, 10]).sync_steps(12)
        [3, 10]
    """

    def __init__(self, steps: Iterable[int]) -> None:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise ValueError(f"`steps` must be an iterable of integers >= 1, got {steps!r}")
        points = sorted({check_int("steps", s, low=1) for s in steps})
        if not points:
            raise ValueError("`steps` must list at least one step")
        self.steps = points
        self._set = set(points)

    @override
    def should_sync(self, step: int) -> bool:
        return step in self._set


class AutoSync(SyncSchedule):
    """``sync_every="auto"``: the period ``H`` that keeps synchronisation within ``budget`` of the
    wall time, from the compute time per step and the synchronisation time the ranks measured.

    The first ``probe`` steps run with ``H = probe``; at that synchronisation (and every
    ``remeasure_every`` synchronisations after it, since links change) the strategy calls
    :meth:`decide` with the slowest rank's numbers (agreed through one 32-byte all-reduce), and
    from the next step on ``H`` is ``choose_sync_every(step_seconds, sync_seconds, budget, low,
    high)``. :attr:`decisions` (``(first step, H)`` pairs) is the state; every rank holds the same.

    Which rule applies is the strategy's: a blocking round (Local SGD, DiLoCo) exposes all of it;
    CO2's round overlaps the next ``H`` steps (``decide(..., overlapped=True)``, measured one
    synchronisation later, when the round has completed); streaming DiLoCo takes
    :class:`~lightning_fedopt.strategies.diloco.fragments.AutoFragmentEvents`, built from this
    schedule's arguments (:func:`streaming_sync_every`).

    **At least ``min_rounds`` rounds.** Where the run's length is known (``max_steps``, or the
    steps of its epochs), ``H`` is also at most ``steps // min_rounds`` (and at least ``low``), even
    when that spends more than ``budget``: an outer optimizer needs rounds to work with (Nesterov
    momentum 0.9 averages over ~10 of them), and the budget rule on a slow link and a short run
    would leave only a handful. On the netns language model at 10 Mbit/s (4096 steps), the budget
    alone chose ``H`` ≈ 600 (7 rounds): the fixed ``H`` of 128 to 512 (8 to 28 rounds) ended lower at the
    same wall-clock time, and one round fewer (``H`` 576 against 512, the same 4096 steps) cost
    1.5%. In the equal-wall sweeps at 10, 100 and 1000 Mbit/s the fixed ``H`` with the lowest mean
    loss gave 29 to 33 rounds, whatever the link: hence 32 (docs/planning.md). The ranks agree on
    the steps (the largest any rank knows).

    Args:
        budget: the largest share of the wall time spent in synchronisation, in (0, 1).
        low, high: bounds of ``H`` (``1 <= low <= high``).
        probe: ``H`` until the first measurement (>= 1).
        remeasure_every: synchronisations between measurements (None: once); default 4: the first
            measurement holds the link's and the loop's warm-up, and links change.
        min_rounds: the fewest rounds over the run's steps, where they are known (>= 1; None:
            the budget alone decides). Default 32.

    Example:
        >>> auto = AutoSync(budget=0.05, probe=4)
        >>> auto.sync_steps(8)
        [4, 8]
        >>> auto.decide(step=8, step_seconds=0.08, sync_seconds=0.322)
        77
        >>> auto.sync_steps(90)[-2:]
        [8, 85]
    """

    def __init__(
        self,
        budget: float = 0.05,
        *,
        low: int = 1,
        high: int = 1000,
        probe: int = 8,
        remeasure_every: int | None = 4,
        min_rounds: int | None = 32,
    ) -> None:
        self.budget = check_float("budget", budget, low=0.0, high=1.0, low_open=True, high_open=True)
        self.low = check_int("low", low, low=1, high=10**6)
        self.high = check_int("high", high, low=1, high=10**6)
        if self.high < self.low:
            raise ValueError(f"`high` ({self.high}) must be >= `low` ({self.low})")
        self.probe = check_int("probe", probe, low=1, high=10**6)
        self.remeasure_every = check_int(
            "remeasure_every", remeasure_every, low=1, high=10**6, allow_none=True
        )
        self.min_rounds = check_int("min_rounds", min_rounds, low=1, high=10**6, allow_none=True)
        #: ``(first step, H)``: H applies to the steps after ``first step``
        self.decisions: list[tuple[int, int]] = [(0, self.probe)]
        self._measurements = 0

    @property
    def every(self) -> int:
        """The current period ``H``."""
        return self.decisions[-1][1]

    @override
    def should_sync(self, step: int) -> bool:
        starts = [s for s, _ in self.decisions]
        start, every = self.decisions[bisect.bisect_left(starts, step) - 1]
        return (step - start) % every == 0

    def wants_measurement(self, sync_count: int) -> bool:
        """Whether the synchronisation number ``sync_count`` (1-based) is measured."""
        if sync_count == 1:
            return True
        return self.remeasure_every is not None and (sync_count - 1) % self.remeasure_every == 0

    def measures_at(self, step: int, sync_count: int) -> bool:
        """Whether the synchronisation number ``sync_count`` (1-based), after step ``step``, is
        measured (:meth:`wants_measurement`; a streaming schedule counts rounds instead)."""
        return self.wants_measurement(sync_count)

    def round_ends(self, step: int) -> bool:
        """Whether a synchronisation after step ``step`` ends a round (every one does here; a
        streaming schedule's fragment events within a round do not)."""
        return True

    def ceiling(self, total_steps: int | None = None) -> int:
        """The largest ``H`` allowed: ``high``, and at most ``total_steps // min_rounds`` where the
        run's steps are known (never below ``low``).

        Example:
            >>> AutoSync(low=2, high=1000).ceiling(4096), AutoSync().ceiling(None)
            (128, 1000)
        """
        from lightning_fedopt.plan.cost import rounds_ceiling

        return rounds_ceiling(total_steps, self.min_rounds, self.low, self.high)

    def decide(
        self,
        step: int,
        step_seconds: float,
        sync_seconds: float,
        *,
        overlapped: bool = False,
        total_steps: int | None = None,
    ) -> int:
        """Set ``H`` from the agreed measurements, for the steps after ``step``; returns it.

        Args:
            step: the synchronisation's step; the new ``H`` applies to the steps after it.
            step_seconds: compute (wall) seconds of one step.
            sync_seconds: seconds of one round: what the training waited for (a blocking round), or
                the round's transfer time from launch to completion (``overlapped``).
            overlapped: the round overlaps the next ``H`` steps (CO2): only ``max(0, R - H c)`` is
                exposed (:func:`~lightning_fedopt.plan.choose_sync_every` with ``overlapped=True``).
            total_steps: the run's steps, where known: ``H`` at most :meth:`ceiling`.
        """
        from lightning_fedopt.plan.cost import choose_sync_every

        every = choose_sync_every(
            max(step_seconds, 1e-9),
            max(sync_seconds, 0.0),
            budget=self.budget,
            low=self.low,
            high=self.ceiling(total_steps),
            overlapped=overlapped,
        )
        return self.record(step, every)

    def record(self, step: int, every: int) -> int:
        """Append the decision ``(step, every)`` if it changes ``H``; returns ``every``."""
        if every != self.every:
            self.decisions.append((int(step), int(every)))
        return every

    def state_dict(self) -> dict[str, list[list[int]]]:
        """The decisions (plain values: saved in the checkpoint's meta entry)."""
        return {"decisions": [[s, h] for s, h in self.decisions]}

    def load_state_dict(self, state: dict[str, list[list[int]]]) -> None:
        """Restore :meth:`state_dict`."""
        decisions = [(int(s), int(h)) for s, h in state["decisions"]]
        if not decisions or decisions[0][0] != 0 or any(h < 1 for _, h in decisions):
            raise ValueError(f"AutoSync: not a schedule's state: {state!r}")
        self.decisions = decisions


def streaming_sync_every(
    step_seconds: float,
    round_seconds: float,
    fragments: int,
    delay: int,
    *,
    budget: float = 0.05,
    low: int = 1,
    high: int = 1000,
) -> int:
    """Streaming DiLoCo's ``H`` for ``sync_every="auto"``: the smallest ``H`` in
    ``[max(low, F (tau + 1)), high]`` whose exposed share of the wall time is at most ``budget``
    (``high`` when none is), under the planner's streaming model
    (:func:`~lightning_fedopt.plan.exposed_seconds` of ``Spec("streaming")``): each of the ``F``
    fragments of a round is an all-reduce of about ``round_seconds / F`` hidden behind ``tau``
    (``delay``) steps of compute, so a round exposes ``F * max(0, round_seconds / F - tau * c)``
    (``tau = 0``: all of it). ``F (tau + 1)`` is the smallest ``H`` whose fragment period
    ``H // F`` exceeds ``tau``.

    Args:
        step_seconds: ``c``, seconds of one step (> 0).
        round_seconds: ``R`` (>= 0), seconds of one round's transfers, all ``F`` fragments together.
        fragments: ``F`` (>= 1).
        delay: ``tau`` (>= 0).
        budget: the largest acceptable exposed share, in (0, 1).
        low, high: bounds of ``H`` (``1 <= low <= high``); ``high`` must be >= ``F (tau + 1)``.

    Example:
        >>> streaming_sync_every(0.1, 0.8, 4, 1)     # 0.1 s exposed a fragment: 0.4 s a round -> H = 76
        76
        >>> streaming_sync_every(0.1, 0.4, 4, 1)     # hidden behind tau = 1 step: the lower bound
        8
        >>> streaming_sync_every(0.1, 0.4, 2, 0)     # blocking (tau = 0): as choose_sync_every(0.1, 0.4)
        76
    """
    from lightning_fedopt.plan.cost import Spec, smallest_every

    step_seconds = check_float("step_seconds", step_seconds, low=0.0, low_open=True)
    round_seconds = check_float("round_seconds", round_seconds, low=0.0)
    fragments = check_int("fragments", fragments, low=1, high=10**6)
    delay = check_int("delay", delay, low=0, high=10**6)
    budget = check_float("budget", budget, low=0.0, high=1.0, low_open=True, high_open=True)
    high = check_int("high", high, low=1)
    low = check_int("low", low, low=1, high=high)
    least = fragments * (delay + 1)
    if high < least:
        raise ValueError(
            f"`high` must be >= F (tau + 1) = {least} (the fragment period H // F must exceed "
            f"`sync_delay`), got {high}"
        )
    spec = Spec("streaming", every=least, fragments=fragments, delay=delay)
    found = smallest_every(spec, round_seconds, step_seconds, budget, low=max(low, least), high=high)
    return high if found is None else found


def as_schedule(sync_every: int | str | SyncSchedule, warmup_steps: int = 0) -> SyncSchedule:
    """Turn a strategy's ``sync_every``/``warmup_steps`` arguments into a schedule
    (``"auto"``: an :class:`AutoSync` with its defaults)."""
    if isinstance(sync_every, str):
        if sync_every != "auto":
            raise ValueError(
                f"`sync_every` must be an integer >= 1, 'auto' or a SyncSchedule, got {sync_every!r}"
            )
        sync_every = AutoSync()
    if isinstance(sync_every, SyncSchedule):
        if warmup_steps:
            raise ValueError("`warmup_steps` cannot be combined with a SyncSchedule object; build it in")
        return sync_every
    return Periodic(sync_every, warmup_steps)
