"""Projection past this machine: communication share of wall time and speed-up over DDP, per strategy.

    python -m benchmarks.project --params 1e9 --replicas 8 --link 1gbit --step-seconds 0.5
    python -m benchmarks.project --params 1e9 --replicas 8 --link 1gbit --flops 2e14 --tokens-per-step 65536
    python -m benchmarks.project --params 1.2e8 --replicas 4 --link 100mbit --from benchmarks/results/lm_summary.csv
    python -m benchmarks.project --check benchmarks/results/lm_netns_100mbit_summary.csv

A pure model (no torch): for each strategy (:data:`SPECS`, the rows of :mod:`benchmarks.lm`)

* bytes per synchronisation round per replica, from the cost model of :mod:`lightning_fedopt.comm`:
  a ring all-reduce of ``B`` bytes sends ``2(N-1)/N * B`` per rank; a payload of ``P`` values is
  ``bytes_per_value * P`` (fp32 4; int8 1 + 4/256 for a float32 scale per block of 256; int4
  0.5 + 4/256); NoLoCo sends its model point-to-point to one partner, ``4P``;
* a round every ``H`` optimizer steps (DDP: every step; post-local SGD: every step for its DDP
  warm-up, then every ``H``);
* the time of a round: ``8 * bytes / (rate * efficiency) + hops * latency`` (ring all-reduce:
  ``2(N-1)`` hops, point-to-point: 1);
* how much of it the step waits for (exposed): all of it for DDP (unless ``--ddp-overlap`` of the
  compute hides part), Local SGD, DiLoCo and NoLoCo; CO2 overlaps a round with the next ``H`` steps'
  compute, so ``max(0, round - H * compute)``; streaming DiLoCo sends ``F`` fragments a round,
  each overlapped with ``sync_delay`` steps: ``F * max(0, round / F - delay * compute)``;
* a step takes ``compute + exposed / H``; the communication share is ``exposed / H / step`` and the
  speed-up over DDP at equal tokens is ``DDP's step / the strategy's step``.

The compute time per step is ``--step-seconds``, or ``6 * params * tokens_per_step / --flops``, or
the compute-only step time measured by :mod:`benchmarks.lm` (``--from`` a summary CSV: the
``single_par`` rows) scaled by ``params`` and tokens per step. ``--check`` reads a summary CSV of a
``--netns`` run of :mod:`benchmarks.lm` and prints, for every run with a compute-only reference,
the predicted mean step time (its compute-only step plus the model's exposed communication for the
bytes the run counted) against the measured one.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "INT4",
    "INT8",
    "SPECS",
    "Prediction",
    "Spec",
    "bytes_per_round",
    "check",
    "main",
    "parse_rate",
    "predict",
    "round_seconds",
]

FP32 = 4.0
INT8 = 1.0 + 4.0 / 256  # one byte a value, one float32 scale a block of 256
INT4 = 0.5 + 4.0 / 256  # half a byte a value, one float32 scale a block of 256
_UNITS = {"": 1.0, "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one strategy communicates.

    Args:
        kind: ``"all_reduce"`` (blocking ring all-reduce), ``"overlapped"`` (all-reduce hidden
            behind the next ``every`` steps, CO2), ``"streaming"`` (``fragments`` parts, each
            hidden behind ``delay`` steps) or ``"p2p"`` (the model to one partner, NoLoCo).
        every: ``H``, optimizer steps per round.
        bytes_per_value: payload bytes per parameter.
        fragments: streaming DiLoCo's ``F``.
        delay: streaming DiLoCo's ``sync_delay`` (steps a fragment's transfer may take).
        ddp_steps: optimizer steps of DDP (a gradient all-reduce each) before the rounds start.
    """

    kind: str
    every: int = 1
    bytes_per_value: float = FP32
    fragments: int = 1
    delay: int = 0
    ddp_steps: int = 0


#: the rows of :mod:`benchmarks.lm`
SPECS: dict[str, Spec] = {
    "ddp": Spec("all_reduce", 1),
    "post_local_sgd": Spec("all_reduce", 16, ddp_steps=64),
    "local_sgd": Spec("all_reduce", 16),
    "diloco_h16": Spec("all_reduce", 16),
    "diloco_h64": Spec("all_reduce", 64),
    "diloco_h256": Spec("all_reduce", 256),
    "diloco_int8": Spec("all_reduce", 64, INT8),
    "diloco_int4": Spec("all_reduce", 64, INT4),
    "streaming_diloco": Spec("streaming", 64, fragments=4, delay=8),
    "co2": Spec("overlapped", 64),
    "noloco": Spec("p2p", 64),
}


def parse_rate(text: str) -> float:
    """A ``tc``-style rate (``"100mbit"``, ``"1gbit"``, ``"2.5Gbit"``, ``"800kbit"``, bits/s if bare) in bits/s."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"`rate` must look like 100mbit, 1gbit, 800kbit or a number of bits/s, got {text!r}")
    rate = float(m.group(1)) * _UNITS[m.group(2)]
    if not rate > 0:
        raise ValueError(f"`rate` must be > 0, got {text!r}")
    return rate


def bytes_per_round(spec: Spec, params: float, replicas: int) -> float:
    """Bytes one replica sends in one round of ``spec`` (all fragments of a streaming round together)."""
    if replicas <= 1:
        return 0.0
    payload = params * spec.bytes_per_value
    if spec.kind == "p2p":
        return payload
    return 2 * (replicas - 1) / replicas * payload


def round_seconds(
    spec: Spec, nbytes: float, replicas: int, rate: float, latency: float = 0.0, efficiency: float = 1.0
) -> float:
    """Seconds one round of ``nbytes`` per replica takes on links of ``rate`` bits/s (each fragment
    of a streaming round pays the latency)."""
    if replicas <= 1:
        return 0.0
    hops = 1 if spec.kind == "p2p" else 2 * (replicas - 1)
    return 8 * nbytes / (rate * efficiency) + hops * latency * max(1, spec.fragments)


def exposed_seconds(spec: Spec, seconds: float, compute: float, ddp_overlap: float = 0.0) -> float:
    """Seconds of one round the training waits for, given ``compute`` seconds per step."""
    if spec.kind == "overlapped":
        return max(0.0, seconds - spec.every * compute)
    if spec.kind == "streaming":
        return spec.fragments * max(0.0, seconds / spec.fragments - spec.delay * compute)
    if spec.every == 1:  # DDP: the all-reduce may overlap the backward pass
        return max(0.0, seconds - ddp_overlap * compute)
    return seconds


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One strategy's numbers per optimizer step (averaged over ``steps`` when given)."""

    name: str
    bytes_per_step: float
    round_seconds: float
    exposed_per_step: float
    compute: float

    @property
    def step_seconds(self) -> float:
        return self.compute + self.exposed_per_step

    @property
    def comm_share(self) -> float:
        """Share of wall time spent waiting for communication."""
        return self.exposed_per_step / self.step_seconds if self.step_seconds > 0 else 0.0


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
    ddp_overlap: float = 0.0,
    steps: int | None = None,
    round_bytes: float | None = None,
) -> Prediction:
    """The prediction for one strategy (``round_bytes``: measured bytes per round instead of the
    cost model's; ``steps``: average a post-local SGD warm-up over a run of that many steps)."""
    nbytes = bytes_per_round(spec, params, replicas) if round_bytes is None else round_bytes
    secs = round_seconds(spec, nbytes, replicas, rate, latency, efficiency)
    per_step_bytes = nbytes / spec.every
    per_step_exposed = exposed_seconds(spec, secs, compute, ddp_overlap) / spec.every
    if spec.ddp_steps:
        ddp = SPECS["ddp"]
        d_bytes = bytes_per_round(ddp, params, replicas)
        d_exposed = exposed_seconds(
            ddp, round_seconds(ddp, d_bytes, replicas, rate, latency, efficiency), compute, ddp_overlap
        )
        if steps is not None:  # else steady state: the warm-up is over
            w = min(spec.ddp_steps, steps) / steps
            per_step_bytes = w * d_bytes + (1 - w) * per_step_bytes
            per_step_exposed = w * d_exposed + (1 - w) * per_step_exposed
    return Prediction(name, per_step_bytes, secs, per_step_exposed, compute)


# ====================================================================== inputs
def _read(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def measured_compute(path: str | Path) -> tuple[float, float, float]:
    """``(seconds per step, parameters, tokens per step)`` of the compute-only (``single_par``)
    runs of a :mod:`benchmarks.lm` summary (median over its runs)."""
    rows = [r for r in _read(path) if r["strategy"] == "single_par" and r.get("compute_only_step_ms")]
    if not rows:
        raise ValueError(f"{path}: no single_par rows (run benchmarks.lm without --no-single)")
    ms = statistics.median(float(r["compute_only_step_ms"]) for r in rows)
    r = rows[0]
    return ms / 1e3, float(r["n_params"]), float(r["tokens_per_replica"]) / float(r["steps"])


def _rate_of(mode: str) -> float | None:
    return parse_rate(mode.split("-", 1)[1].split()[0]) if mode.startswith("netns-") else None


def check(
    path: str | Path,
    *,
    rate: str | None = None,
    latency: float = 0.0,
    efficiency: float = 1.0,
    compute_from: str = "own",
) -> list[dict[str, float | str]]:
    """Predicted vs measured mean step time for every run of a summary CSV that has a compute-only
    reference, a known rate (from its ``netns-<rate>`` mode, or ``rate``) and a :data:`SPECS` entry.
    Bytes per round: as counted by the run (sync bytes / syncs). Compute per step
    (``compute_from``): ``"own"``: the run's median step without a round where it has such steps
    (not DDP), else ``"single_par"``'s mean step. Prints the table, returns its rows."""
    out = []
    for r in _read(path):
        name, spec = r["strategy"], SPECS.get(r["strategy"])
        link = parse_rate(rate) if rate else _rate_of(r["mode"])
        if spec is None or link is None or not r.get("compute_only_step_ms") or not r.get("mean_step_ms"):
            continue
        n, params, steps = int(r["world_size"]), float(r["n_params"]), int(r["steps"])
        measured = float(r["mean_step_ms"]) / 1e3
        # the compute of a step: the run's own steps without a round where it has them (the CPU is
        # shared, so a reference measured at another moment drifts), else the compute-only reference
        own = r.get("median_nonsync_step_ms") if compute_from == "own" else None
        source = "own" if own else "single_par"
        compute = float(own or r["compute_only_step_ms"]) / 1e3
        syncs, sync_bytes = int(r["syncs"]), float(r["sync_bytes_sent"])
        if spec.ddp_steps:  # rounds of two sizes (the DDP warm-up's gradients, then the averages)
            counted = None
        elif spec.kind == "streaming":  # its syncs are fragments: bytes per step times H
            counted = sync_bytes / steps * spec.every
        else:  # all rounds alike (the final sync after the last step included)
            counted = sync_bytes / syncs if syncs > 0 else None
        p = predict(
            name,
            spec,
            params,
            n,
            link,
            compute,
            latency=latency,
            efficiency=efficiency,
            steps=steps,
            round_bytes=counted,
        )
        model_bytes = bytes_per_round(spec, params, n)
        out.append(
            {
                "world_size": n,
                "seed": r["seed"],
                "strategy": name,
                "rate_bit_s": link,
                "round_bytes_model": model_bytes,
                "round_bytes_counted": counted if counted is not None else math.nan,
                "compute_ms": 1e3 * compute,
                "compute_from": source,
                "predicted_step_ms": 1e3 * p.step_seconds,
                "measured_step_ms": 1e3 * measured,
                "error_pct": 100 * (p.step_seconds / measured - 1),
                "predicted_comm_share": p.comm_share,
                "measured_comm_share": max(0.0, 1 - compute / measured),
            }
        )
    if not out:
        print(
            f"{path}: no run with a compute-only reference and a known link rate (a --netns run, or --rate)"
        )
        return out
    head = (
        f"{'N':>2} {'seed':>4} {'row':<18} {'round MB model':>14} {'counted':>8} {'compute ms':>17} "
        f"{'pred ms':>8} {'meas ms':>8} {'error':>7} {'pred comm':>9} {'meas comm':>9}"
    )
    print(head + "\n" + "-" * len(head))
    for o in out:
        print(
            f"{o['world_size']:>2} {o['seed']:>4} {o['strategy']:<18} {o['round_bytes_model'] / 1e6:>14.3f} "
            f"{o['round_bytes_counted'] / 1e6:>8.3f} {o['compute_ms']:>6.2f} {o['compute_from']:>10} "
            f"{o['predicted_step_ms']:>8.2f} "
            f"{o['measured_step_ms']:>8.2f} {o['error_pct']:>+6.1f}% {o['predicted_comm_share']:>9.1%} "
            f"{o['measured_comm_share']:>9.1%}"
        )
    errs = [abs(o["error_pct"]) for o in out]
    print(
        f"median |error| of the predicted mean step time: {statistics.median(errs):.1f}% over {len(out)} runs"
    )
    return out


def table(preds: Iterable[Prediction]) -> str:
    """The projection as text (speed-up against the ``ddp`` prediction where there is one)."""
    preds = list(preds)
    ddp = next((p for p in preds if p.name == "ddp"), None)
    head = (
        f"{'strategy':<18} {'MB/step/replica':>15} {'round s':>9} {'exposed s/step':>14} {'step s':>9} "
        f"{'comm share':>10} {'speed-up vs ddp':>15}"
    )
    lines = [head, "-" * len(head)]
    for p in preds:
        speed = f"{ddp.step_seconds / p.step_seconds:.2f}x" if ddp else "-"
        lines.append(
            f"{p.name:<18} {p.bytes_per_step / 1e6:>15.4g} {p.round_seconds:>9.4g} {p.exposed_per_step:>14.4g} "
            f"{p.step_seconds:>9.4g} {p.comm_share:>10.1%} {speed:>15}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.project", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=None, help="parameters of the model (e.g. 1e9)")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--link", default="1gbit", help="each replica's link, tc style: 100mbit, 1gbit, 10gbit")
    p.add_argument("--latency", type=float, default=0.0, help="seconds per hop of a round")
    p.add_argument("--efficiency", type=float, default=1.0, help="achieved share of the link rate")
    p.add_argument(
        "--ddp-overlap", type=float, default=0.0, help="share of DDP's compute its all-reduce hides behind"
    )
    p.add_argument("--step-seconds", type=float, default=None, help="compute seconds per optimizer step")
    p.add_argument(
        "--flops", type=float, default=None, help="achieved FLOP/s of one replica (6 * params * tokens)"
    )
    p.add_argument("--tokens-per-step", type=float, default=None, help="tokens per replica per step")
    p.add_argument(
        "--from", dest="from_csv", default=None, help="benchmarks.lm summary CSV: measured compute"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="run length (averages post-local SGD's DDP warm-up)"
    )
    p.add_argument("--strategies", default=",".join(SPECS))
    p.add_argument(
        "--check", default=None, help="benchmarks.lm summary CSV of a --netns run: predicted vs measured"
    )
    p.add_argument("--rate", default=None, help="--check: the link rate, if the CSV's mode does not say")
    p.add_argument(
        "--compute-from",
        choices=("own", "single_par"),
        default="own",
        help="--check: a run's compute per step from its own steps without a round, or the reference",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.project``: see the module docstring and ``--help``."""
    args = build_parser().parse_args(argv)
    if args.check:
        check(
            args.check,
            rate=args.rate,
            latency=args.latency,
            efficiency=args.efficiency,
            compute_from=args.compute_from,
        )
        return
    if args.params is None or not args.params > 0:
        sys.exit("--params must be given and > 0 (or use --check)")
    if args.replicas < 2:
        sys.exit("--replicas must be >= 2")
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        sys.exit(f"unknown strategies {unknown}; known: {list(SPECS)}")
    if args.step_seconds is not None:
        compute, source = args.step_seconds, "--step-seconds"
    elif args.flops is not None:
        if args.tokens_per_step is None:
            sys.exit("--flops needs --tokens-per-step")
        compute = 6 * args.params * args.tokens_per_step / args.flops
        source = f"6 * params * {args.tokens_per_step:g} tokens / {args.flops:g} FLOP/s"
    elif args.from_csv is not None:
        secs, p0, tok0 = measured_compute(args.from_csv)
        tokens = args.tokens_per_step or tok0
        compute = secs * (args.params / p0) * (tokens / tok0)
        source = f"measured {1e3 * secs:.2f} ms at {p0:g} parameters, {tok0:g} tokens/step, scaled linearly"
    else:
        sys.exit(
            "give the compute time: --step-seconds, --flops with --tokens-per-step, or --from <lm summary CSV>"
        )
    rate = parse_rate(args.link)
    preds = [
        predict(
            n,
            SPECS[n],
            args.params,
            args.replicas,
            rate,
            compute,
            latency=args.latency,
            efficiency=args.efficiency,
            ddp_overlap=args.ddp_overlap,
            steps=args.steps,
        )
        for n in names
    ]
    print(
        f"{args.params:g} parameters, {args.replicas} replicas, {args.link} links ({rate / 1e9:g} Gbit/s x "
        f"{args.efficiency:g}), latency {args.latency:g} s/hop; compute {compute:.4g} s/step ({source})"
    )
    print(table(preds))


if __name__ == "__main__":
    main()
