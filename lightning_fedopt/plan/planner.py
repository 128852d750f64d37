"""The planner: every strategy and compressor for one model, link and step time, as rows.

:func:`plan` answers, before any GPU is rented, "which ``H`` and which compressor for my model on
my link?": for each strategy of :data:`STRATEGIES` and each compressor it can take, the bytes a
replica sends per round, the seconds a round takes, the smallest ``H`` whose exposed communication
stays within the budget, the exposed share and step time at that ``H``, and how many times fewer
bytes per step than DDP without compression. :meth:`Plan.table` prints it as plain text,
:meth:`Plan.to_dict` as JSON-ready data.

What each strategy sends, as the library's strategies do (see ``docs/planning.md``):

* ``ddp``: the gradients every step (a compressor: :class:`~lightning_fedopt.CompressedDDPStrategy`);
* ``local_sgd``, ``diloco``: the model (or its pseudo-gradient) every ``H`` steps, blocking;
* ``streaming_diloco``: ``F`` fragments a round, each overlapped with ``tau`` steps; with a
  compressor its all-reduces are synchronous, so nothing is hidden;
* ``co2``: the model every ``H`` steps, overlapped with the next ``H`` steps (no compressor);
* ``noloco``: the model and a flag to one partner, point-to-point (no compressor);
* ``gossip``: the model (or, with a compressor, CHOCO-gossip's compressed difference) to each
  out-neighbour of the topology, ``gossip_steps`` times a round.

Example:
    >>> p = plan(1e9, 8, "1gbit", 0.5, latency="20ms", strategies=["diloco"], compressors=["none", "int4"])
    >>> [(r.compressor, r.every) for r in p.rows]
    [('none', 2139), ('int4', 296)]
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

from lightning_fedopt._validate import check_choice, check_float, check_int
from lightning_fedopt.plan.codecs import (
    TOPOLOGY_DEGREES,
    Codec,
    gossip_degree,
    message_bytes,
    parse_codec,
    wire_bytes,
)
from lightning_fedopt.plan.cost import (
    Link,
    Prediction,
    Spec,
    compute_seconds,
    fit_overhead,
    parse_count,
    parse_rate,
    parse_seconds,
    predict,
    round_seconds,
    rounds_ceiling,
    smallest_every,
)

__all__ = [
    "DEFAULT_COMPRESSORS",
    "STRATEGIES",
    "ModelSize",
    "Plan",
    "Row",
    "model_size",
    "plan",
]

#: the strategies the planner models
STRATEGIES = ("ddp", "local_sgd", "diloco", "streaming_diloco", "co2", "noloco", "gossip")
#: strategies that take no compressor in the library
_NO_COMPRESSOR = {
    "co2": "CO2Strategy takes no compressor (its overlapped all-reduce would turn synchronous)",
    "noloco": "NoLoCoStrategy takes no compressor (partners change every round)",
}
#: what :func:`plan` compares by default
DEFAULT_COMPRESSORS = ("none", "bf16", "int8", "int4", "sign", "topk:0.01", "sparseloco")


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """What the strategies synchronise: the floating-point parameters and buffers.

    Attributes:
        numel: values in all.
        nbytes: their bytes in their own dtypes (fp32: ``4 * numel``).
        sizes: values per tensor (what per-tensor compressors such as top-k see).
    """

    numel: int
    nbytes: float
    sizes: tuple[int, ...]

    @property
    def dense_bytes(self) -> float:
        """Bytes per value uncompressed (4 for fp32, 2 for bf16 weights)."""
        return self.nbytes / self.numel


def model_size(model: Any) -> ModelSize:
    """The :class:`ModelSize` of ``model``: a parameter count (``1e9``, ``"1.2B"``, ``"350M"``;
    one fp32 tensor), a sequence of per-tensor sizes (fp32), or a ``torch.nn.Module``, whose
    floating-point parameters (frozen ones included, as the strategies track them by default) and
    floating-point buffers are counted in their own dtypes.

    Raises:
        ValueError: naming ``model``, for anything else or an empty model.

    Example:
        >>> model_size("1.2B").numel, model_size([10, 20]).nbytes
        (1200000000, 120.0)
    """
    if hasattr(model, "named_parameters") and hasattr(model, "named_buffers"):
        sizes, nbytes = [], 0.0
        for _, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and t.numel() > 0:
                sizes.append(int(t.numel()))
                nbytes += t.numel() * t.element_size()
        if not sizes:
            raise ValueError("`model` must have floating-point parameters or buffers, got none")
        return ModelSize(sum(sizes), nbytes, tuple(sizes))
    if isinstance(model, (str, int, float)) and not isinstance(model, bool):
        n = max(1, round(parse_count(model, "params")))
        return ModelSize(n, 4.0 * n, (n,))
    if isinstance(model, Sequence) and model and not isinstance(model, (str, bytes)):
        sizes = [check_int(f"model[{i}]", s, low=1) for i, s in enumerate(model)]
        return ModelSize(sum(sizes), 4.0 * sum(sizes), tuple(sizes))
    raise ValueError(
        f"`model` must be a parameter count > 0 (1e9, '1.2B'), a non-empty sequence of tensor sizes "
        f"or a torch.nn.Module, got {model!r}"
    )


@dataclasses.dataclass(frozen=True)
class Row:
    """One strategy with one compressor.

    Attributes:
        strategy: the strategy's name (:data:`STRATEGIES`).
        compressor: the compressor's label (``none``, ``int8``, ``topk 1%``).
        bytes_per_round: bytes one replica sends per round (DDP: per step).
        round_seconds: seconds one round's transfers take.
        every: the smallest ``H`` within the budget (DDP: 1), or None where no ``H`` up to the
            bound is (the other columns are then at the bound; DDP's at 1).
        exposed_share: share of wall time waiting for communication at ``every``.
        step_seconds: wall seconds per step at ``every``.
        bytes_per_step: bytes per replica per step at ``every``.
        bytes_vs_ddp: DDP's bytes per step (uncompressed) over this row's.
        share_at: the exposed share at the ``every`` given to :func:`plan` (None without one, or
            where that ``H`` is not allowed: streaming DiLoCo needs ``H >= F (tau + 1)``).
        within_budget: whether ``every`` meets the budget.
        capped: ``every`` is the ceiling of ``min_rounds`` rounds in ``steps`` (:func:`plan`),
            below the budget's ``H``: the exposed share is then above the budget.
    """

    strategy: str
    compressor: str
    bytes_per_round: float
    round_seconds: float
    every: int | None
    exposed_share: float
    step_seconds: float
    bytes_per_step: float
    bytes_vs_ddp: float
    share_at: float | None
    within_budget: bool
    capped: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """The inputs of :func:`plan` and its rows; ``skipped`` lists ``(strategy, compressor, why)``."""

    model: ModelSize
    replicas: int
    link: Link
    compute: float
    budget: float
    rows: tuple[Row, ...]
    skipped: tuple[tuple[str, str, str], ...] = ()
    every: int | None = None
    max_every: int = 100_000
    fragments: int = 4
    sync_delay: int = 1
    topology: str = "ring"
    gossip_steps: int = 1
    compute_source: str = "given"
    steps: int | None = None
    min_rounds: int | None = None

    def row(self, strategy: str, compressor: str = "none") -> Row:
        """The row of ``strategy`` with ``compressor`` (its label)."""
        for r in self.rows:
            if r.strategy == strategy and r.compressor == compressor:
                return r
        raise KeyError((strategy, compressor))

    def header(self) -> str:
        """The inputs, in one line."""
        m = self.model
        return (
            f"{_fmt_count(m.numel)} parameters ({_fmt_bytes(m.nbytes)} dense), {self.replicas} replicas, "
            f"link {_fmt_rate(self.link.rate)} x {self.link.efficiency:g}, latency "
            f"{_fmt_seconds(self.link.latency)}/hop"
            + (f", overhead {_fmt_seconds(self.link.overhead)}/round" if self.link.overhead else "")
            + f"; compute {_fmt_seconds(self.compute)}/step "
            f"({self.compute_source}); budget {100 * self.budget:g}% exposed communication"
        )

    def table(self) -> str:
        """The plan as a plain-text table (paste it into an issue)."""
        budget = f"H@{100 * self.budget:g}%"
        cols = [
            "strategy",
            "compressor",
            "bytes/round",
            "s/round",
            budget,
            "exposed",
            "step s",
            "bytes/step vs DDP",
        ]
        if self.every is not None:
            cols.append(f"exposed@H={self.every}")
        body = []
        for r in self.rows:
            if r.strategy == "ddp":
                h = "1" if r.every is not None else "1 (over)"
            else:
                h = str(r.every) if r.every is not None else f">{self.max_every}"
                h += " (rounds)" if r.capped else ""
            line = [
                r.strategy,
                r.compressor,
                _fmt_bytes(r.bytes_per_round),
                _fmt_seconds(r.round_seconds),
                h,
                f"{100 * r.exposed_share:.1f}%",
                _fmt_seconds(r.step_seconds),
                _fmt_ratio(r.bytes_vs_ddp),
            ]
            if self.every is not None:
                line.append("-" if r.share_at is None else f"{100 * r.share_at:.1f}%")
            body.append(line)
        widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
        left = {0, 1}

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        lines = [self.header(), "", fmt(cols), "  ".join("-" * w for w in widths)]
        lines += [fmt(b) for b in body]
        notes = []
        if any(r.strategy == "streaming_diloco" for r in self.rows):
            notes.append(
                f"streaming_diloco: F={self.fragments} fragments, tau={self.sync_delay}; with a compressor "
                "its all-reduces are synchronous (nothing hidden)"
            )
        if any(r.strategy == "gossip" for r in self.rows):
            notes.append(
                f"gossip: {self.topology} topology ({gossip_degree(self.topology, self.replicas)} "
                f"out-neighbours), {self.gossip_steps} gossip step(s) a round"
            )
        if any(r.capped for r in self.rows):
            notes.append(
                f"(rounds): H at most {self.steps} steps // {self.min_rounds} rounds (sync_every='auto' "
                "does the same), above the budget's H: more communication than the budget"
            )
        if any(r.strategy == "ddp" and r.every is None for r in self.rows):
            notes.append("ddp: H is 1; (over): its communication exceeds the budget")
        for name in dict.fromkeys(s for s, _, _ in self.skipped):
            labels = [c for s, c, _ in self.skipped if s == name]
            why = next(w for s, _, w in self.skipped if s == name)
            notes.append(f"{name}: not with {', '.join(labels)}: {why}")
        return "\n".join(lines + (["", *notes] if notes else []))

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (``json.dumps(plan.to_dict())``)."""
        return {
            "inputs": {
                "params": self.model.numel,
                "dense_bytes": self.model.nbytes,
                "replicas": self.replicas,
                "link_bit_s": self.link.rate,
                "latency_s": self.link.latency,
                "efficiency": self.link.efficiency,
                "overhead_s": self.link.overhead,
                "step_seconds": self.compute,
                "compute_source": self.compute_source,
                "budget": self.budget,
                "every": self.every,
                "max_every": self.max_every,
                "fragments": self.fragments,
                "sync_delay": self.sync_delay,
                "topology": self.topology,
                "gossip_steps": self.gossip_steps,
                "steps": self.steps,
                "min_rounds": self.min_rounds,
            },
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "skipped": [{"strategy": s, "compressor": c, "reason": why} for s, c, why in self.skipped],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.3g} B"


def _fmt_seconds(s: float) -> str:
    if s == 0:
        return "0 s"
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _fmt_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:,}"


def _fmt_ratio(x: float) -> str:
    return f"{x:.0f}x" if x >= 100 else f"{x:.3g}x"


def _fmt_rate(r: float) -> str:
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if r >= scale:
            return f"{r / scale:.4g} {unit}"
    return f"{r:.4g} bit/s"


#: the counters ``[weight, valid, invalid]`` that Local SGD's, DiLoCo's and CO2's rounds all-reduce
#: (in the weights' dtype): with the payload when it travels dense, just before it when compressed
_COUNTERS = 3


def _spec_and_bytes(
    strategy: str,
    codec: Codec,
    m: ModelSize,
    n: int,
    *,
    fragments: int,
    sync_delay: int,
    topology: str,
    gossip_steps: int,
) -> tuple[Spec, float]:
    """The :class:`Spec` (``every`` 1, replaced later) and exact bytes per round of one row."""
    db, gather, dense = m.dense_bytes, codec.scheme == "gather", codec.name == "none"
    ring = 2 * (n - 1) / n
    counters = ring * _COUNTERS * db  # their own all-reduce, or riding with a dense payload
    if strategy == "ddp":
        return Spec("ddp", gather=gather), wire_bytes(codec, m.sizes, n, db)
    if strategy in ("local_sgd", "diloco", "co2"):
        kind = "overlapped" if strategy == "co2" else "all_reduce"
        spec = Spec(kind, gather=gather, extra_hops=0 if dense else 2 * (n - 1))
        return spec, wire_bytes(codec, m.sizes, n, db) + counters
    if strategy == "streaming_diloco":
        if dense:
            spec = Spec("streaming", fragments=fragments, delay=sync_delay)
            return spec, wire_bytes(codec, m.sizes, n, db) + fragments * counters
        if gather:  # fragments are sets of whole tensors: one flag byte more per fragment
            nbytes = wire_bytes(codec, m.sizes, n, db) + (fragments - 1) * (n - 1)
        else:
            nbytes = fragments * wire_bytes(codec, [math.ceil(m.numel / fragments)], n, db)
        # compressed: synchronous, nothing hidden; every fragment pays its counters' all-reduce
        spec = Spec("all_reduce", fragments=fragments, gather=gather, extra_hops=2 * (n - 1))
        return spec, nbytes + fragments * counters
    if strategy == "noloco":  # the model and a finite flag, in the weights' dtype
        return Spec("p2p", peers=1), m.nbytes + db
    degree = gossip_degree(topology, n)
    spec = Spec("p2p", peers=degree, exchanges=gossip_steps)
    return spec, degree * gossip_steps * message_bytes(codec, m.sizes, db)


def plan(
    model: Any,
    replicas: int,
    link: Link | str | float,
    step_seconds: float | str | None = None,
    *,
    latency: float | str | None = None,
    efficiency: float = 1.0,
    overhead: float | str | None = None,
    measured_round: float | str | None = None,
    flops: float | None = None,
    tokens_per_step: float | None = None,
    budget: float = 0.05,
    strategies: Sequence[str] = STRATEGIES,
    compressors: Sequence[str | Codec] = DEFAULT_COMPRESSORS,
    fragments: int = 4,
    sync_delay: int = 1,
    topology: str = "ring",
    gossip_steps: int = 1,
    ddp_overlap: float = 0.0,
    every: int | None = None,
    max_every: int = 100_000,
    steps: int | None = None,
    min_rounds: int | None = 32,
) -> Plan:
    """Plan every strategy and compressor for ``model`` on ``replicas`` replicas behind ``link``.

    Args:
        model: a parameter count, tensor sizes or a ``torch.nn.Module`` (:func:`model_size`).
        replicas: ``N``, an integer in [2, 1000000].
        link: a :class:`Link`, or its rate (``"1gbit"``, ``"10Gbit/s"``, bits/s).
        step_seconds: compute seconds per optimizer step (``0.5``, ``"500ms"``); or None with
            ``flops`` and ``tokens_per_step`` (``6 * params * tokens / flops``).
        latency: seconds per hop (``"20ms"``) when ``link`` is a rate.
        efficiency: achieved share of the link rate, in (0, 1], when ``link`` is a rate.
        overhead: fixed seconds of a synchronisation round beyond its bytes and hops (``"15ms"``;
            per fragment for streaming DiLoCo), when ``link`` is a rate; default 0.
        measured_round: instead of ``overhead``: the seconds one uncompressed DiLoCo round of
            this model took at ``replicas`` replicas on this link (``sync_every="auto"`` logs it
            as ``measured_sync_seconds``); the overhead is what it took beyond its bytes and hops
            (:func:`~lightning_fedopt.plan.cost.fit_overhead`).
        flops, tokens_per_step: a replica's achieved FLOP/s and its tokens per step.
        budget: the largest acceptable exposed share of wall time, in (0, 1).
        strategies: names from :data:`STRATEGIES`.
        compressors: :class:`~lightning_fedopt.plan.codecs.Codec` objects or names
            (:func:`~lightning_fedopt.plan.codecs.parse_codec`: ``"int8"``, ``"topk:0.01"``, ...).
        fragments, sync_delay: streaming DiLoCo's ``F`` and ``tau`` (``H >= F (tau + 1)``).
        topology: gossip's topology (one of ``ring``, ``torus``, ``exponential``,
            ``one_peer_exponential``, ``random_matching``, ``fully_connected``).
        gossip_steps: gossip steps a round.
        ddp_overlap: share of DDP's compute its gradient all-reduce hides behind, in [0, 1].
        every: also report every row's exposed share at this ``H``.
        max_every: the largest ``H`` considered.
        steps: the run's optimizer steps, if known: ``H`` is then at most ``steps // min_rounds``
            (as ``sync_every="auto"`` with :class:`~lightning_fedopt.schedules.AutoSync`'s
            ``min_rounds``), even above the budget.
        min_rounds: the fewest rounds over ``steps`` (None: the budget alone).

    Raises:
        ValueError: naming the argument and its allowed range.
    """
    m = model_size(model)
    n = check_int("replicas", replicas, low=2, high=1_000_000)
    if isinstance(link, Link):
        if latency is not None or overhead is not None:
            raise ValueError("`latency` and `overhead` must be None when `link` is a Link (it has its own)")
        the_link = link
    else:
        the_link = Link(
            parse_rate(link, "link"),
            parse_seconds(0.0 if latency is None else latency, "latency"),
            check_float("efficiency", efficiency, low=0.0, high=1.0, low_open=True),
            parse_seconds(0.0 if overhead is None else overhead, "overhead"),
        )
    if measured_round is not None:
        if overhead is not None or the_link.overhead:
            raise ValueError("give `overhead` or `measured_round`, not both")
        spec, nbytes = _spec_and_bytes(
            "diloco", Codec("none"), m, n, fragments=1, sync_delay=0, topology="ring", gossip_steps=1
        )
        fitted = fit_overhead(
            parse_seconds(measured_round, "measured_round", positive=True),
            spec,
            nbytes,
            n,
            the_link.rate,
            the_link.latency,
            the_link.efficiency,
        )
        the_link = dataclasses.replace(the_link, overhead=fitted)
    if step_seconds is not None:
        if flops is not None or tokens_per_step is not None:
            raise ValueError("give `step_seconds` or `flops` with `tokens_per_step`, not both")
        compute, source = parse_seconds(step_seconds, "step_seconds", positive=True), "given"
    elif flops is not None and tokens_per_step is not None:
        compute = compute_seconds(m.numel, tokens_per_step, flops)
        source = f"6 x params x {tokens_per_step:g} tokens / {flops:g} FLOP/s"
    else:
        raise ValueError(
            "`step_seconds` must be given (seconds > 0), or `flops` and `tokens_per_step` (both > 0)"
        )
    budget = check_float("budget", budget, low=0.0, high=1.0, low_open=True, high_open=True)
    if isinstance(strategies, str):
        strategies = [strategies]
    names = [check_choice("strategies", s, STRATEGIES) for s in strategies]
    if isinstance(compressors, (str, Codec)):
        compressors = [compressors]
    codecs = [parse_codec(c) for c in compressors]
    if not names or not codecs:
        raise ValueError("`strategies` and `compressors` must each name at least one")
    fragments = check_int("fragments", fragments, low=1)
    sync_delay = check_int("sync_delay", sync_delay, low=0)
    check_choice("topology", topology, TOPOLOGY_DEGREES)
    gossip_steps = check_int("gossip_steps", gossip_steps, low=1)
    ddp_overlap = check_float("ddp_overlap", ddp_overlap, low=0.0, high=1.0)
    max_every = check_int("max_every", max_every, low=1)
    every = check_int("every", every, low=1, allow_none=True)
    steps = check_int("steps", steps, low=1, allow_none=True)
    min_rounds = check_int("min_rounds", min_rounds, low=1, allow_none=True)
    bounded = steps is not None and min_rounds is not None
    ddp_bytes = wire_bytes(Codec("none"), m.sizes, n, m.dense_bytes)

    rows, skipped = [], []
    for s in names:
        for c in codecs:
            if c.name != "none" and s in _NO_COMPRESSOR:
                skipped.append((s, c.label, _NO_COMPRESSOR[s]))
                continue
            spec, nbytes = _spec_and_bytes(
                s,
                c,
                m,
                n,
                fragments=fragments,
                sync_delay=sync_delay,
                topology=topology,
                gossip_steps=gossip_steps,
            )
            secs = round_seconds(
                spec, nbytes, n, the_link.rate, the_link.latency, the_link.efficiency, the_link.overhead
            )
            low = fragments * (sync_delay + 1) if s == "streaming_diloco" else 1
            high = max(low, max_every)
            h = smallest_every(spec, secs, compute, budget, low=low, high=high, ddp_overlap=ddp_overlap)
            within = h is not None
            ceiling = rounds_ceiling(steps, min_rounds, low, high)
            capped = s != "ddp" and bounded and (h is None or h > ceiling)
            if capped:
                h = ceiling

            def at(k: int, spec: Spec = spec, nbytes: float = nbytes) -> Prediction:
                return predict(
                    spec.kind,
                    dataclasses.replace(spec, every=k),
                    m.numel,
                    n,
                    the_link.rate,
                    compute,
                    latency=the_link.latency,
                    efficiency=the_link.efficiency,
                    overhead=the_link.overhead,
                    ddp_overlap=ddp_overlap,
                    round_bytes=nbytes,
                )

            p = at(1 if s == "ddp" else (h if h is not None else high))
            share_at = None
            if every is not None:
                if s == "ddp":
                    share_at = at(1).comm_share
                elif every >= low:  # streaming DiLoCo needs H >= F (tau + 1)
                    share_at = at(every).comm_share
            rows.append(
                Row(
                    strategy=s,
                    compressor=c.label,
                    bytes_per_round=nbytes,
                    round_seconds=secs,
                    every=h,
                    exposed_share=p.comm_share,
                    step_seconds=p.step_seconds,
                    bytes_per_step=p.bytes_per_step,
                    bytes_vs_ddp=ddp_bytes / p.bytes_per_step if p.bytes_per_step > 0 else math.inf,
                    share_at=share_at,
                    within_budget=within and not capped,
                    capped=capped,
                )
            )
    return Plan(
        model=m,
        replicas=n,
        link=the_link,
        compute=compute,
        budget=budget,
        rows=tuple(rows),
        skipped=tuple(skipped),
        every=every,
        max_every=max_every,
        fragments=fragments,
        sync_delay=sync_delay,
        topology=topology,
        gossip_steps=gossip_steps,
        compute_source=source,
        steps=steps,
        min_rounds=min_rounds,
    )
