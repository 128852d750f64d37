"""Projection past this machine: communication share of wall time and speed-up over DDP, per strategy.

    python -m benchmarks.project --params 1e9 --replicas 8 --link 1gbit --step-seconds 0.5
    python -m benchmarks.project --params 1e9 --replicas 8 --link 1gbit --flops 2e14 --tokens-per-step 65536
    python -m benchmarks.project --params 1.2e8 --replicas 4 --link 100mbit --from benchmarks/results/lm_summary.csv
    python -m benchmarks.project --check benchmarks/results/lm_netns_100mbit_summary.csv
    python -m benchmarks.project --check benchmarks/results/plan_netns_{10,100}mbit_summary.csv \
        --overhead-from benchmarks/results/plan_netns_1000mbit_summary.csv

The cost model itself (no torch) is the library's :mod:`lightning_fedopt.plan` (``Spec``,
``bytes_per_round``, ``round_seconds``, ``exposed_seconds``, ``predict``; the planner a user runs
is ``python -m lightning_fedopt.plan``); this script keeps what belongs to the benchmark: the rows
of :mod:`benchmarks.lm` as specs (:data:`SPECS`), the compute time measured by it, and ``--check``.
For each row:

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
bytes the run counted) against the measured one. ``--overhead`` adds a fixed cost per round (the
collective calls and the strategy's bookkeeping, beyond bytes and hops); ``--overhead-from`` fits
it, per number of replicas, to the fixed-``H`` DiLoCo rounds of another run (e.g. one on a fast
link), and the runs used for the fit are left out of the median.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_fedopt.plan import (
    FP32,
    INT4,
    INT8,
    Prediction,
    Spec,
    bytes_per_round,
    exposed_seconds,
    parse_rate,
    predict,
    round_seconds,
)

__all__ = [
    "FP32",
    "INT4",
    "INT8",
    "SPECS",
    "Prediction",
    "Spec",
    "bytes_per_round",
    "check",
    "exposed_seconds",
    "fit_overheads",
    "main",
    "parse_rate",
    "predict",
    "round_seconds",
    "spec_of",
]

#: the rows of :mod:`benchmarks.lm`
SPECS: dict[str, Spec] = {
    "ddp": Spec("ddp"),
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
    # H chosen at run time: the run's own rounds per step (syncs / steps) stand for 1 / H
    "diloco_auto": Spec("all_reduce", 1),
}
#: rows whose ``H`` changes during the run (``sync_every="auto"``)
AUTO_ROWS = ("diloco_auto",)


def spec_of(name: str) -> Spec | None:
    """The :data:`SPECS` entry of a row, or for any ``diloco_h<N>`` (benchmarks.lm's generic rows)
    a blocking all-reduce every ``N`` steps; None for a row the model does not know."""
    from benchmarks.lm import diloco_h

    h = diloco_h(name)
    return SPECS.get(name) or (Spec("all_reduce", h) if h is not None else None)


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


def _window_rounds(path: str | Path) -> dict[tuple[str, str], tuple[int, int]]:
    """``(seed or repeat, row) -> (rounds, steps)`` inside the step-time window (the steps after
    :data:`benchmarks.harness.WARMUP_STEPS_SKIPPED`, which ``mean_step_ms`` averages), from the
    ``_steps.csv`` beside a summary; empty when there is none."""
    from benchmarks.harness import WARMUP_STEPS_SKIPPED

    steps_csv = Path(str(path).removesuffix("_summary.csv") + "_steps.csv")
    if not str(path).endswith("_summary.csv") or not steps_csv.exists():
        return {}
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for r in _read(steps_csv):
        if int(r["step"]) <= WARMUP_STEPS_SKIPPED:
            continue
        key = (r.get("seed", r.get("repeat", "0")), r["strategy"])
        rounds, n = out.get(key, (0, 0))
        out[key] = (rounds + int(float(r["sync"] or 0) > 0), n + 1)
    return out


def measured_rate(path: str | Path) -> float | None:
    """The TCP throughput the netns run of a summary measured on its link before the runs (bits/s;
    printed as ``measured TCP throughput ...: X Mbit/s`` in ``<name>_run.txt`` beside it), or None."""
    run_txt = Path(str(path).removesuffix("_summary.csv") + "_run.txt")
    if not run_txt.exists():
        return None
    text = run_txt.read_text(errors="replace")
    # both directions at once, as an all-reduce loads the link, where the run measured that
    found = re.findall(r"measured TCP throughput both ways at once: ([0-9.]+) Mbit/s", text)
    found = found or re.findall(r"measured TCP throughput [^:]*: ([0-9.]+) Mbit/s", text)
    return statistics.median(float(x) for x in found) * 1e6 if found else None


def parse_link_rates(spec: str | None) -> dict[float, float]:
    """``"10mbit=8.6mbit,100mbit=92mbit"`` -> ``{nominal bits/s: measured bits/s}`` (``--link-rates``)."""
    out: dict[float, float] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        nominal, sep, actual = item.partition("=")
        if not sep:
            raise ValueError(f"`--link-rates`: {item!r} is not NOMINAL=MEASURED (e.g. 10mbit=8.6mbit)")
        out[parse_rate(nominal.strip())] = parse_rate(actual.strip())
    return out


def _link_rate(
    path: str | Path,
    mode: str,
    rate: str | None,
    measured: bool,
    link_rates: Mapping[float, float] | None = None,
) -> float | None:
    """A run's link rate: ``rate``, else its mode's rate as ``link_rates`` maps it, else the
    measured TCP throughput (``measured``), else its mode's."""
    if rate:
        return parse_rate(rate)
    nominal = _rate_of(mode)
    if link_rates and nominal is not None and nominal in link_rates:
        return link_rates[nominal]
    return (measured_rate(path) if measured else None) or nominal


def _rate_of(mode: str) -> float | None:
    return parse_rate(mode.split("-", 1)[1].split()[0]) if mode.startswith("netns-") else None


def _own_compute(r: Mapping[str, str], compute_from: str = "own") -> tuple[float, str]:
    """A run's compute seconds per step and where they come from (see :func:`check`)."""
    own = r.get("median_nonsync_step_ms") if compute_from == "own" else None
    return float(own or r["compute_only_step_ms"]) / 1e3, "own" if own else "single_par"


def fit_overheads(
    paths: Sequence[str | Path],
    *,
    rate: str | None = None,
    latency: float = 0.0,
    efficiency: float = 1.0,
    fit_efficiency: bool = False,
    measured: bool = False,
    link_rates: Mapping[float, float] | None = None,
) -> tuple[dict[int, tuple[float, float]], set[tuple[str, int, str, str]]]:
    """``{replicas: (overhead, efficiency)}`` fitted to the fixed-``H`` uncompressed DiLoCo runs of
    summary CSVs (their measured seconds a round: the mean step's excess over the run's own steps
    without a round, times steps per round), and the ``(resolved path, world size, seed, row)`` of
    the runs used. The overhead is the median of what the rounds took beyond their bytes (at
    ``efficiency``) and hops; with ``fit_efficiency`` and rounds on at least two link rates at a
    world size, ``seconds = bytes_time / efficiency + overhead`` is fitted by least squares there
    (efficiency at most 1, overhead at least 0). ``measured``: each run's link rate is the TCP
    throughput measured on it (:func:`measured_rate`), not the nominal one; ``link_rates``: the
    rate of each nominal link (:func:`parse_link_rates`), before ``measured``."""
    points: dict[int, list[tuple[float, float]]] = {}
    used: set[tuple[str, int, str, str]] = set()
    for path, r in ((str(Path(p).resolve()), r) for p in paths for r in _read(p)):
        name, spec = r["strategy"], spec_of(r["strategy"])
        link = _link_rate(path, r["mode"], rate, measured, link_rates)
        if (
            spec is None
            or not name.startswith("diloco_h")
            or spec.kind != "all_reduce"
            or spec.bytes_per_value != FP32
            or link is None
            or not r.get("median_nonsync_step_ms")
            or int(r["syncs"]) == 0
        ):
            continue
        n, steps, syncs = int(r["world_size"]), int(r["steps"]), int(r["syncs"])
        compute, _ = _own_compute(r)
        round_s = (float(r["mean_step_ms"]) / 1e3 - compute) * steps / syncs
        nbytes = float(r["sync_bytes_sent"]) / syncs
        wire = round_seconds(spec, nbytes, n, link)  # the bytes' time at full rate
        hops_s = round_seconds(spec, 0.0, n, link, latency)
        points.setdefault(n, []).append((wire, round_s - hops_s))
        used.add((path, n, r["seed"], name))
    if not points:
        raise ValueError(
            f"{list(paths)}: no fixed-H DiLoCo run with its own steps and a known rate to fit to"
        )
    out: dict[int, tuple[float, float]] = {}
    for n, pts in points.items():
        slope = 1.0 / efficiency
        xs = [x for x, _ in pts]
        if fit_efficiency and max(xs) > min(xs):
            mx, my = statistics.fmean(xs), statistics.fmean(y for _, y in pts)
            cov = sum((x - mx) * (y - my) for x, y in pts)
            slope = max(1.0, cov / sum((x - mx) ** 2 for x in xs))
        over = max(0.0, statistics.median(y - slope * x for x, y in pts))
        out[n] = (over, 1.0 / slope)
    return out, used


def check(
    path: str | Path,
    *,
    rate: str | None = None,
    latency: float = 0.0,
    efficiency: float = 1.0,
    overhead: float | Mapping[int, tuple[float, float]] = 0.0,
    compute_from: str = "own",
    fitted: set[tuple[str, int, str, str]] | None = None,
    label: str | None = None,
    measured: bool = False,
    link_rates: Mapping[float, float] | None = None,
) -> list[dict[str, Any]]:
    """Predicted vs measured mean step time for every run of a summary CSV that has a compute-only
    reference, a known rate (from its ``netns-<rate>`` mode, or ``rate``) and a :data:`SPECS` entry.
    Bytes per round: as counted by the run (sync bytes / syncs). Compute per step
    (``compute_from``): ``"own"``: the run's median step without a round where it has such steps
    (not DDP), else ``"single_par"``'s mean step. ``overhead``: seconds per round, or
    ``(overhead, efficiency)`` per number of replicas (:func:`fit_overheads`; this efficiency then
    replaces ``efficiency``); ``measured``: the link rate is the TCP throughput the run measured
    on it (:func:`measured_rate`) where known, and ``link_rates`` maps nominal rates to measured
    ones before that (:func:`parse_link_rates`); runs in ``fitted`` (``(resolved path, world size, seed, row)``) are marked
    and left out of the median. Prints the table (headed by ``label`` when given), returns its
    rows."""
    out: list[dict[str, Any]] = []
    window = _window_rounds(path)
    for r in _read(path):
        name, spec = r["strategy"], spec_of(r["strategy"])
        link = _link_rate(path, r["mode"], rate, measured, link_rates)
        has_compute = r.get("compute_only_step_ms") or (
            compute_from == "own" and r.get("median_nonsync_step_ms")
        )
        if spec is None or link is None or not has_compute or not r.get("mean_step_ms"):
            continue
        n, params, steps = int(r["world_size"]), float(r["n_params"]), int(r["steps"])
        step_s = float(r["mean_step_ms"]) / 1e3
        # the compute of a step: the run's own steps without a round where it has them (the CPU is
        # shared, so a reference measured at another moment drifts), else the compute-only reference
        compute, source = _own_compute(r, compute_from)
        syncs, sync_bytes = int(r["syncs"]), float(r["sync_bytes_sent"])
        eff = efficiency
        if isinstance(overhead, Mapping):
            if n not in overhead:
                continue  # nothing fitted at this number of replicas
            extra, eff = overhead[n]
        else:
            extra = overhead
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
            efficiency=eff,
            overhead=extra,
            steps=steps,
            round_bytes=counted,
        )
        if name in AUTO_ROWS:  # the run's own (changing) H: its rounds per step where it was timed
            rounds, timed = window.get((r["seed"], name), (syncs, steps))
            p = Prediction(name, p.bytes_per_step, p.round_seconds, p.round_seconds * rounds / timed, compute)
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
                "measured_step_ms": 1e3 * step_s,
                "error_pct": 100 * (p.step_seconds / step_s - 1),
                "predicted_comm_share": p.comm_share,
                "measured_comm_share": max(0.0, 1 - compute / step_s),
                "overhead_ms": 1e3 * extra,
                "fit": (str(Path(path).resolve()), n, r["seed"], name) in (fitted or set()),
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
    if label:
        print(label)
    print(head + "\n" + "-" * len(head))
    for o in out:
        print(
            f"{o['world_size']:>2} {o['seed']:>4} {o['strategy']:<18} {o['round_bytes_model'] / 1e6:>14.3f} "
            f"{o['round_bytes_counted'] / 1e6:>8.3f} {o['compute_ms']:>6.2f} {o['compute_from']:>10} "
            f"{o['predicted_step_ms']:>8.2f} "
            f"{o['measured_step_ms']:>8.2f} {o['error_pct']:>+6.1f}% {o['predicted_comm_share']:>9.1%} "
            f"{o['measured_comm_share']:>9.1%}" + ("  (fit)" if o["fit"] else "")
        )
    _print_median(out)
    return out


def _print_median(out: Sequence[Mapping[str, Any]]) -> None:
    errs = [abs(float(o["error_pct"])) for o in out if not o["fit"]]
    fit = sum(1 for o in out if o["fit"])
    if errs:
        print(
            f"median |error| of the predicted mean step time: {statistics.median(errs):.1f}% over {len(errs)} runs"
            + (f" ({fit} used for the overhead's fit left out)" if fit else "")
        )


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
        "--check",
        nargs="+",
        default=None,
        help="benchmarks.lm summary CSV(s) of --netns runs: predicted vs measured",
    )
    p.add_argument(
        "--overhead", type=float, default=0.0, help="--check: fixed seconds a round beyond bytes and hops"
    )
    p.add_argument(
        "--measured-rates",
        action="store_true",
        help="--check: each run's link rate is the TCP throughput measured on it (<name>_run.txt), not the nominal",
    )
    p.add_argument(
        "--link-rates",
        default=None,
        help="--check: each nominal link's measured rate, e.g. 10mbit=8.6mbit,100mbit=92mbit "
        "(python -m benchmarks.netns --rate R: both ways at once, as an all-reduce loads it)",
    )
    p.add_argument(
        "--fit-efficiency",
        action="store_true",
        help="--overhead-from: also fit the achieved share of the rate (needs runs on two rates)",
    )
    p.add_argument(
        "--overhead-from",
        nargs="+",
        default=None,
        help="--check: fit the overhead per number of replicas to the fixed-H DiLoCo runs of these summary CSVs",
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
        overhead: float | dict[int, tuple[float, float]] = args.overhead
        fitted: set[tuple[str, int, str, str]] = set()
        try:
            link_rates = parse_link_rates(args.link_rates)
        except ValueError as err:
            sys.exit(str(err))
        if args.overhead_from:
            overhead, fitted = fit_overheads(
                args.overhead_from,
                rate=args.rate,
                latency=args.latency,
                efficiency=args.efficiency,
                fit_efficiency=args.fit_efficiency,
                measured=args.measured_rates,
                link_rates=link_rates,
            )
            print(
                f"fitted to {' '.join(args.overhead_from)}: "
                + ", ".join(
                    f"{n} replicas: overhead {1e3 * o:.1f} ms a round, efficiency {e:.3f}"
                    for n, (o, e) in sorted(overhead.items())
                )
            )
        everything: list[dict[str, Any]] = []
        for path in args.check:
            everything += check(
                path,
                rate=args.rate,
                latency=args.latency,
                efficiency=args.efficiency,
                overhead=overhead,
                compute_from=args.compute_from,
                fitted=fitted,
                label=path if len(args.check) > 1 else None,
                measured=args.measured_rates,
                link_rates=link_rates,
            )
        if len(args.check) > 1 and everything:
            print("all files:", end=" ")
            _print_median(everything)
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
