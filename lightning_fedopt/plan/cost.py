"""The cost model: bytes, seconds and exposed communication of one strategy's rounds.

Pure Python (no torch). A strategy is described by a :class:`Spec`: how its rounds travel (a ring
all-reduce, an all-gather, point-to-point messages), how often (``every = H`` optimizer steps) and
how much of a round the training waits for. For ``N`` replicas and a payload of ``B`` bytes a round
sends, per replica, what :func:`lightning_fedopt.comm.cost_model` counts:

* ring all-reduce: ``2 (N-1)/N * B`` bytes, ``2 (N-1)`` latency hops;
* all-gather of every replica's payload (top-k): ``(N-1) * B`` bytes, ``N-1`` hops;
* point-to-point (NoLoCo's partner, gossip's neighbours): ``peers * B`` bytes per exchange, one hop.

A round of ``b`` bytes takes ``8 b / (rate * efficiency) + hops * latency + overhead`` seconds
(every fragment of a streaming round pays the latency and the overhead: the fixed cost of one
synchronisation beyond its bytes and hops -- the collective calls and the strategy's bookkeeping --
which is a property of the machine and software, measured, not derived). The training waits for
(exposed):

* DDP (``kind="ddp"``): the round every step, less the share ``ddp_overlap`` of the compute that its
  gradient all-reduce hides behind;
* blocking rounds (``"all_reduce"``, ``"p2p"``: Local SGD, DiLoCo, NoLoCo, gossip): all of it;
* CO2 (``"overlapped"``): ``max(0, round - H * compute)`` (the round overlaps the next ``H`` steps);
* streaming DiLoCo (``"streaming"``): ``F * max(0, round / F - tau * compute)`` (each of ``F``
  fragments overlaps ``tau`` steps).

A step takes ``compute + exposed / H``; the exposed share is ``(exposed / H) / step``.
:func:`smallest_every` and :func:`choose_sync_every` return the smallest ``H`` whose exposed share
is within a budget.

Example:
    >>> link = Link.parse("100mbit", "1ms")
    >>> spec = Spec("all_reduce", every=64)
    >>> nbytes = bytes_per_round(spec, 1_000_000, 2)       # 4 MB of fp32, 2 replicas
    >>> round_seconds(spec, nbytes, 2, link.rate, link.latency)   # 0.32 s + 2 hops of 1 ms
    0.322
    >>> choose_sync_every(0.08, 0.322, budget=0.05)        # smallest H with <= 5% exposed
    77
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

from lightning_fedopt._validate import check_choice, check_float, check_int

__all__ = [
    "FP32",
    "INT4",
    "INT8",
    "KINDS",
    "Link",
    "Prediction",
    "Spec",
    "bytes_per_round",
    "choose_sync_every",
    "compute_seconds",
    "exposed_seconds",
    "exposed_share",
    "fit_overhead",
    "hops",
    "parse_count",
    "parse_rate",
    "parse_seconds",
    "predict",
    "round_seconds",
    "rounds_ceiling",
    "smallest_every",
]

FP32 = 4.0
#: int8 and int4 blockwise (``lightning_fedopt.compression.Int8`` / ``Int4``, block 256): the codes
#: and one float32 scale a block, in bytes per value
INT8 = 1.0 + 4.0 / 256
INT4 = 0.5 + 4.0 / 256

#: how a :class:`Spec`'s rounds travel and overlap (module doc)
KINDS = ("ddp", "all_reduce", "overlapped", "streaming", "p2p")

_RATE_UNITS = {"": 1.0, "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_SECOND_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60.0}
_COUNT_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_NUMBER = r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)"


# ====================================================================== units
def parse_rate(text: str | float, name: str = "rate") -> float:
    """A ``tc``-style rate in bits/s: ``"100mbit"``, ``"1gbit"``, ``"2.5Gbit"``, ``"10Gbit/s"``,
    ``"800kbit"``, or a number of bits/s (bare or as a number).

    Raises:
        ValueError: naming ``name``, for anything else or a rate that is not > 0.

    Example:
        >>> parse_rate("10Gbit/s"), parse_rate("800kbit")
        (10000000000.0, 800000.0)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return check_float(name, text, low=0.0, low_open=True)
    m = re.fullmatch(rf"\s*{_NUMBER}\s*([a-z]*)(/s)?\s*", str(text).lower())
    if m is None or m.group(2) not in _RATE_UNITS or (m.group(3) and not m.group(2)):
        raise ValueError(
            f"`{name}` must be a rate > 0 such as 100mbit, 1gbit, 10Gbit/s, 800kbit or a number of "
            f"bits/s, got {text!r}"
        )
    rate = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"`{name}` must be a rate > 0 (bits/s), got {text!r}")
    return rate


def parse_seconds(text: str | float, name: str = "latency", *, positive: bool = False) -> float:
    """A duration in seconds: ``"25ms"``, ``"0.5s"``, ``"200us"``, ``"1.5"`` (seconds) or a number.

    Args:
        text: the duration.
        name: the argument, for the error message.
        positive: refuse 0 (a step time), else 0 is allowed (a latency).

    Raises:
        ValueError: naming ``name`` and the allowed range.

    Example:
        >>> parse_seconds("25ms"), parse_seconds(0.5, "step_seconds", positive=True)
        (0.025, 0.5)
    """
    what = "> 0" if positive else ">= 0"
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return check_float(name, text, low=0.0, low_open=positive)
    m = re.fullmatch(rf"\s*{_NUMBER}\s*([a-zµ]*)\s*", str(text).lower())
    if m is None or m.group(2) not in _SECOND_UNITS:
        raise ValueError(
            f"`{name}` must be a duration {what} such as 25ms, 0.5s, 200us or a number of seconds, got {text!r}"
        )
    value = float(m.group(1)) * _SECOND_UNITS[m.group(2)]
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"`{name}` must be a duration {what}, got {text!r}")
    return value


def parse_count(text: str | float, name: str = "params") -> float:
    """A positive count: ``"1e9"``, ``"1.2B"``, ``"350M"``, ``"124672"`` (k, M, B/G, T suffixes).

    Example:
        >>> parse_count("1.2B"), parse_count("350m"), parse_count(124672)
        (1200000000.0, 350000000.0, 124672.0)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return check_float(name, text, low=0.0, low_open=True)
    m = re.fullmatch(rf"\s*{_NUMBER}\s*([a-z]?)\s*", str(text).lower())
    if m is None or m.group(2) not in _COUNT_UNITS:
        raise ValueError(f"`{name}` must be a number > 0 such as 1e9, 1.2B, 350M or 124672, got {text!r}")
    value = float(m.group(1)) * _COUNT_UNITS[m.group(2)]
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a number > 0, got {text!r}")
    return value


def compute_seconds(params: float, tokens_per_step: float, flops: float) -> float:
    """Compute seconds of one optimizer step of a transformer: ``6 * params * tokens / flops``
    (forward and backward, ``flops`` the FLOP/s one replica achieves).

    Example:
        >>> compute_seconds(1e9, 65536, 1e14)
        3.93216
    """
    params = check_float("params", params, low=0.0, low_open=True)
    tokens_per_step = check_float("tokens_per_step", tokens_per_step, low=0.0, low_open=True)
    flops = check_float("flops", flops, low=0.0, low_open=True)
    return 6.0 * params * tokens_per_step / flops


@dataclasses.dataclass(frozen=True)
class Link:
    """Each replica's network link.

    Attributes:
        rate: bits/s (the slower of up- and downlink; full duplex assumed): what TCP achieves
            with both directions busy at once (``iperf3 --bidir``), as an all-reduce loads the
            link; a link's nominal rate over-promises (docs/planning.md, validation).
        latency: seconds per hop of a collective (one-way message latency).
        efficiency: the share of ``rate`` transfers achieve, in (0, 1].
        overhead: fixed seconds of one synchronisation round beyond its bytes and hops (the
            collective calls, the strategy's bookkeeping; per fragment for streaming DiLoCo): a
            property of the machine and software stack, measured (:func:`fit_overhead`), default 0.
    """

    rate: float
    latency: float = 0.0
    efficiency: float = 1.0
    overhead: float = 0.0

    def __post_init__(self) -> None:
        check_float("rate", self.rate, low=0.0, low_open=True)
        check_float("latency", self.latency, low=0.0)
        check_float("efficiency", self.efficiency, low=0.0, high=1.0, low_open=True)
        check_float("overhead", self.overhead, low=0.0)

    @classmethod
    def parse(
        cls,
        rate: str | float,
        latency: str | float = 0.0,
        efficiency: float = 1.0,
        overhead: str | float = 0.0,
    ) -> Link:
        """A link from text: ``Link.parse("1gbit", "20ms")``."""
        return cls(
            parse_rate(rate, "link"),
            parse_seconds(latency, "latency"),
            efficiency,
            parse_seconds(overhead, "overhead"),
        )

    def seconds(self, nbytes: float, hops: float = 0.0) -> float:
        """Seconds of one round that moves ``nbytes`` in ``hops`` latency-bound steps (its
        overhead included)."""
        return 8.0 * nbytes / (self.rate * self.efficiency) + hops * self.latency + self.overhead


# ====================================================================== a strategy's rounds
@dataclasses.dataclass(frozen=True)
class Spec:
    """How one strategy communicates.

    Args:
        kind: one of :data:`KINDS`: ``"ddp"`` (a gradient all-reduce every step, which may hide
            behind the backward pass), ``"all_reduce"`` (a blocking round every ``every`` steps),
            ``"overlapped"`` (a round hidden behind the next ``every`` steps, CO2),
            ``"streaming"`` (``fragments`` parts, each hidden behind ``delay`` steps) or ``"p2p"``
            (blocking point-to-point messages: NoLoCo, gossip).
        every: ``H``, optimizer steps per round.
        bytes_per_value: payload bytes per parameter (a compressor's asymptotic size).
        fragments: streaming DiLoCo's ``F`` (each fragment pays the latency).
        delay: streaming DiLoCo's ``sync_delay`` ``tau`` (steps a fragment's transfer may take).
        ddp_steps: optimizer steps of DDP (a gradient all-reduce each) before the rounds start
            (post-local SGD).
        gather: the payloads are all-gathered (top-k) rather than all-reduced.
        peers: ``"p2p"``: replicas a message goes to per exchange (NoLoCo 1, gossip on a ring 2).
        exchanges: ``"p2p"``: exchanges per round (gossip's ``gossip_steps``).
        extra_hops: latency-bound steps a round (a fragment) takes beyond its collective's own,
            e.g. ``2 (N-1)`` for the exact all-reduce of the counters that precedes a compressed
            round of Local SGD or DiLoCo.
    """

    kind: str
    every: int = 1
    bytes_per_value: float = FP32
    fragments: int = 1
    delay: int = 0
    ddp_steps: int = 0
    gather: bool = False
    peers: int = 1
    exchanges: int = 1
    extra_hops: int = 0

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_int("every", self.every, low=1)
        check_float("bytes_per_value", self.bytes_per_value, low=0.0)
        check_int("fragments", self.fragments, low=1)
        check_int("delay", self.delay, low=0)
        check_int("ddp_steps", self.ddp_steps, low=0)
        check_int("peers", self.peers, low=0)
        check_int("exchanges", self.exchanges, low=1)
        check_int("extra_hops", self.extra_hops, low=0)


def bytes_per_round(spec: Spec, params: float, replicas: int) -> float:
    """Bytes one replica sends in one round of ``spec`` (all fragments of a streaming round
    together), from the asymptotic ``spec.bytes_per_value`` (see
    :func:`lightning_fedopt.plan.codecs.wire_bytes` for the exact sizes of a compressor).

    Example:
        >>> bytes_per_round(Spec("all_reduce", 64), 1e6, 4)   # 2 (N-1)/N * 4 MB
        6000000.0
    """
    if replicas <= 1:
        return 0.0
    payload = params * spec.bytes_per_value
    if spec.kind == "p2p":
        return payload * spec.peers * spec.exchanges
    if spec.gather:
        return (replicas - 1) * payload
    return 2 * (replicas - 1) / replicas * payload


def hops(spec: Spec, replicas: int) -> int:
    """Latency-bound steps of one round (of one fragment, for streaming DiLoCo): ``2 (N-1)`` for a
    ring all-reduce (or the all-to-all and all-gather of a chunked compressed all-reduce), ``N-1``
    for a ring all-gather, one per exchange for point-to-point; plus ``spec.extra_hops``."""
    if replicas <= 1:
        return 0
    if spec.kind == "p2p":
        own = spec.exchanges
    else:
        own = replicas - 1 if spec.gather else 2 * (replicas - 1)
    return own + spec.extra_hops


def round_seconds(
    spec: Spec,
    nbytes: float,
    replicas: int,
    rate: float,
    latency: float = 0.0,
    efficiency: float = 1.0,
    overhead: float = 0.0,
) -> float:
    """Seconds one round of ``nbytes`` per replica takes on links of ``rate`` bits/s (each fragment
    of a streaming round pays the latency and the ``overhead``).

    Example:
        >>> round_seconds(Spec("all_reduce"), 4e6, 2, 1e8, latency=1e-3)   # 0.32 s + 2 hops
        0.322
        >>> round(round_seconds(Spec("all_reduce"), 4e6, 2, 1e8, overhead=0.015), 6)   # + 15 ms
        0.335
    """
    if replicas <= 1:
        return 0.0
    per_fragment = hops(spec, replicas) * latency + overhead
    return 8 * nbytes / (rate * efficiency) + per_fragment * max(1, spec.fragments)


def fit_overhead(
    measured_seconds: float,
    spec: Spec,
    nbytes: float,
    replicas: int,
    rate: float,
    latency: float = 0.0,
    efficiency: float = 1.0,
) -> float:
    """The per-round ``overhead`` that makes :func:`round_seconds` equal a measured round: what a
    synchronisation took beyond its bytes and hops (never below 0). Measure one round at the
    replica count you plan for (``sync_every="auto"`` logs ``measured_sync_seconds``; a short run
    with a fixed ``H`` gives it as the extra seconds of its synchronising steps); the value then
    carries to other links, ``H`` and strategies of that machine and software.

    Example:
        >>> fit_overhead(0.055, Spec("all_reduce"), 500_000, 2, 1e8)   # 40 ms of bytes
        0.015
    """
    measured = check_float("measured_seconds", measured_seconds, low=0.0)
    base = round_seconds(spec, nbytes, replicas, rate, latency, efficiency)
    return round(max(0.0, measured - base) / max(1, spec.fragments), 12)


def exposed_seconds(spec: Spec, seconds: float, compute: float, ddp_overlap: float = 0.0) -> float:
    """Seconds of one round (of ``seconds``) the training waits for, given ``compute`` seconds per
    step (module doc)."""
    if spec.kind == "overlapped":
        return max(0.0, seconds - spec.every * compute)
    if spec.kind == "streaming":
        return spec.fragments * max(0.0, seconds / spec.fragments - spec.delay * compute)
    if spec.kind == "ddp":  # the all-reduce may overlap the backward pass
        return max(0.0, seconds - ddp_overlap * compute)
    return seconds


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One strategy's numbers per optimizer step (averaged over ``steps`` when given).

    Attributes:
        name: the row's name.
        bytes_per_step: bytes a replica sends per optimizer step.
        round_seconds: seconds of one round's transfers.
        exposed_per_step: seconds per step the training waits for communication.
        compute: compute seconds per step.
    """

    name: str
    bytes_per_step: float
    round_seconds: float
    exposed_per_step: float
    compute: float

    @property
    def step_seconds(self) -> float:
        """Wall seconds of a step: compute plus exposed communication."""
        return self.compute + self.exposed_per_step

    @property
    def comm_share(self) -> float:
        """Share of wall time spent waiting for communication."""
        return self.exposed_per_step / self.step_seconds if self.step_seconds > 0 else 0.0


_DDP = Spec("ddp")


def predict(
    name: str,
    spec: Spec,
    params: float,
    replicas: int,
    rate: float,
    compute: float,
    *,
    latency: float = 0.0,
    efficiency: float = 1.0,
    overhead: float = 0.0,
    ddp_overlap: float = 0.0,
    steps: int | None = None,
    round_bytes: float | None = None,
) -> Prediction:
    """The prediction for one strategy.

    Args:
        name: the row's name.
        spec: how it communicates.
        params: parameters (values) per replica.
        replicas: ``N``.
        rate: link rate, bits/s.
        compute: compute seconds per optimizer step.
        latency: seconds per hop.
        efficiency: achieved share of ``rate``.
        overhead: fixed seconds per round (per fragment) beyond bytes and hops (:class:`Link`).
        ddp_overlap: share of DDP's compute its gradient all-reduce hides behind.
        steps: average a post-local SGD warm-up (``spec.ddp_steps``) over a run of that many
            steps (None: steady state, the warm-up is over).
        round_bytes: bytes per round instead of :func:`bytes_per_round` (counted by a run, or the
            exact size of a compressor, :func:`lightning_fedopt.plan.codecs.wire_bytes`).
    """
    nbytes = bytes_per_round(spec, params, replicas) if round_bytes is None else round_bytes
    secs = round_seconds(spec, nbytes, replicas, rate, latency, efficiency, overhead)
    per_step_bytes = nbytes / spec.every
    per_step_exposed = exposed_seconds(spec, secs, compute, ddp_overlap) / spec.every
    if spec.ddp_steps and steps is not None:  # else steady state: the warm-up is over
        d_bytes = bytes_per_round(_DDP, params, replicas)
        d_secs = round_seconds(_DDP, d_bytes, replicas, rate, latency, efficiency, overhead)
        d_exposed = exposed_seconds(_DDP, d_secs, compute, ddp_overlap)
        w = min(spec.ddp_steps, steps) / steps
        per_step_bytes = w * d_bytes + (1 - w) * per_step_bytes
        per_step_exposed = w * d_exposed + (1 - w) * per_step_exposed
    return Prediction(name, per_step_bytes, secs, per_step_exposed, compute)


# ====================================================================== choosing H
def exposed_share(
    step_seconds: float, round_seconds: float, every: int, *, overlapped: bool = False
) -> float:
    """Share of wall time spent waiting for communication with a round every ``every`` steps.

    ``overlapped=False`` (Local SGD, DiLoCo, NoLoCo, gossip): the training waits for the whole
    round; ``True`` (CO2): the round overlaps the next ``every`` steps, only
    ``max(0, round - every * step)`` is waited for. For streaming DiLoCo pass the exposed
    seconds of its round (:func:`exposed_seconds`) as ``round_seconds``, not overlapped.

    Example:
        >>> exposed_share(0.1, 1.0, 10)          # 1 s of 2 s
        0.5
        >>> exposed_share(0.1, 1.0, 10, overlapped=True)   # hidden behind 10 x 0.1 s
        0.0
    """
    exposed = max(0.0, round_seconds - every * step_seconds) if overlapped else round_seconds
    total = every * step_seconds + exposed
    return exposed / total if total > 0 else 0.0


def _smallest(share: Callable[[int], float], budget: float, low: int, high: int) -> int | None:
    """The smallest ``H`` in ``[low, high]`` with ``share(H) <= budget`` (``share`` non-increasing
    in ``H``), by bisection; None if even ``high`` exceeds the budget."""
    if share(high) > budget:
        return None
    lo, hi = low, high  # share(hi) <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if share(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def smallest_every(
    spec: Spec,
    round_seconds: float,
    compute: float,
    budget: float,
    *,
    low: int = 1,
    high: int = 1_000_000,
    ddp_overlap: float = 0.0,
) -> int | None:
    """The smallest ``H`` in ``[low, high]`` at which ``spec``'s exposed share of wall time is at
    most ``budget`` (None: not even at ``high``; DDP's ``H`` is always 1).

    Args:
        spec: the strategy (its ``every`` is replaced by the candidates).
        round_seconds: seconds of one round's transfers (:func:`round_seconds`).
        compute: compute seconds per step.
        budget: the largest acceptable exposed share, in (0, 1).
        low, high: the bounds of ``H``.
        ddp_overlap: as for :func:`predict`.
    """
    budget = check_float("budget", budget, low=0.0, high=1.0, low_open=True, high_open=True)
    low = check_int("low", low, low=1)
    high = check_int("high", high, low=low)

    def share(h: int) -> float:
        s = dataclasses.replace(spec, every=h)
        exposed = exposed_seconds(s, round_seconds, compute, ddp_overlap) / h
        return exposed / (compute + exposed) if compute + exposed > 0 else 0.0

    if spec.kind == "ddp":
        return 1 if share(1) <= budget else None
    return _smallest(share, budget, low, high)


def rounds_ceiling(steps: int | None, min_rounds: int | None, low: int, high: int) -> int:
    """The largest ``H`` in ``[low, high]`` that leaves at least ``min_rounds`` rounds in a run of
    ``steps`` steps: ``max(low, min(high, steps // min_rounds))``; ``high`` when either is None
    (or ``steps`` is not positive). ``sync_every="auto"`` (:meth:`AutoSync.ceiling
    <lightning_fedopt.schedules.AutoSync.ceiling>`) and :func:`~lightning_fedopt.plan.plan` both
    bound ``H`` by it.

    Example:
        >>> rounds_ceiling(4096, 32, 1, 1000), rounds_ceiling(40, 32, 2, 1000), rounds_ceiling(None, 32, 1, 50)
        (128, 2, 50)
    """
    if steps is None or steps <= 0 or min_rounds is None:
        return high
    return max(low, min(high, int(steps) // min_rounds))


def choose_sync_every(
    step_seconds: float,
    round_seconds: float | Callable[[int], float] | None = None,
    *,
    nbytes: float | None = None,
    link: Link | None = None,
    hops: float = 1.0,
    budget: float = 0.05,
    low: int = 1,
    high: int = 1000,
    overlapped: bool = False,
) -> int:
    """The smallest ``H`` in ``[low, high]`` whose exposed communication is at most ``budget`` of
    the wall time (``high`` when none is): what ``sync_every="auto"`` sets from measured numbers.

    A pure, deterministic function of its arguments: every rank that passes the same (agreed)
    numbers gets the same ``H``. The exposed share at ``H`` is :func:`exposed_share`; it is
    non-increasing in ``H`` when the round's seconds are (always, for a number), and the answer
    is found by bisection over the integers of ``[low, high]``.

    Args:
        step_seconds: compute seconds of one optimizer step (> 0), measured.
        round_seconds: seconds one round's transfers take: a number (measured), or a function of
            ``H`` (non-increasing), or None to derive it from ``nbytes`` and ``link``.
        nbytes: bytes a replica sends per round (with ``link``).
        link: the :class:`Link` (``8 * nbytes / (rate * efficiency) + hops * latency + overhead``).
        hops: latency-bound steps of a round (a ring all-reduce: ``2 (N-1)``).
        budget: the largest acceptable exposed share, in (0, 1) (e.g. 0.05).
        low, high: bounds of ``H`` (``1 <= low <= high``).
        overlapped: the round overlaps the next ``H`` steps' compute (CO2).

    Raises:
        ValueError: naming the argument, for a value out of its range or a missing round time.

    Example:
        >>> choose_sync_every(0.08, 0.322)                     # 0.322 s rounds, 80 ms steps
        77
        >>> choose_sync_every(0.08, nbytes=4e6, link=Link.parse("1gbit", "1ms"), hops=2)
        9
        >>> choose_sync_every(0.08, 0.322, overlapped=True)    # CO2: hide 95% of the round
        4
        >>> choose_sync_every(0.08, 100.0, high=500)           # out of reach: the bound
        500
    """
    step_seconds = check_float("step_seconds", step_seconds, low=0.0, low_open=True)
    budget = check_float("budget", budget, low=0.0, high=1.0, low_open=True, high_open=True)
    low = check_int("low", low, low=1)
    high = check_int("high", high, low=low)
    fn: Callable[[int], float]
    if round_seconds is None:
        if nbytes is None or link is None:
            raise ValueError("`round_seconds` must be given (seconds >= 0), or `nbytes` together with `link`")
        if not isinstance(link, Link):
            raise ValueError(f"`link` must be a lightning_fedopt.plan.Link, got {link!r}")
        nb = check_float("nbytes", nbytes, low=0.0)
        hp = check_float("hops", hops, low=0.0)
        secs = link.seconds(nb, hp)
        fn = lambda h: secs  # noqa: E731
    elif callable(round_seconds):
        user: Callable[[int], Any] = round_seconds

        def fn(h: int) -> float:
            return check_float(f"round_seconds({h})", user(h), low=0.0)
    else:
        value = check_float("round_seconds", round_seconds, low=0.0)
        fn = lambda h: value  # noqa: E731

    def share(h: int) -> float:
        return exposed_share(step_seconds, fn(h), h, overlapped=overlapped)

    found = _smallest(share, budget, low, high)
    return high if found is None else found
