"""The runner every strategy comparison shares: same model, same data, same seed, several rows.

:func:`main` is ``python -m benchmarks.run`` for any :class:`benchmarks.harness.Suite`: every row
is trained in a fresh subprocess (``python -m <suite.worker_module> --worker <name>``, see
:func:`benchmarks._worker.train`) that starts a multi-process Lightning run (``accelerator="cpu",
devices=N``, Lightning's default popen launcher); in ``--netns`` mode the runner starts one process
per rank itself, each inside its own network namespace, with Lightning's multi-node environment
variables and ``Trainer(num_nodes=N, devices=1)``. Then it prints the table (:mod:`benchmarks._report`)
and writes ``<name>.csv``, ``<name>_steps.csv``, ``<name>_summary.csv`` and ``<name>.png``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import _report
from benchmarks.harness import (
    DEFAULT_OUT,
    ONE_PROCESS,
    REFERENCES,
    SINGLE_PAR,
    Suite,
    clean_env,
    start,
    wait_all,
    write_csv,
)

__all__ = ["build_parser", "main", "network", "runner", "train_all"]

#: one row's runs: rank 0's JSON of every repeat
Runs = dict[str, list[dict[str, Any]]]


# ====================================================================== starting the workers
def _worker_cmd(
    args: argparse.Namespace, suite: Suite, name: str, out: Path, devices: int, nodes: int
) -> list[str]:
    return [
        sys.executable,
        "-m",
        suite.worker_module,
        "--worker",
        name,
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--val-every",
        str(args.val_every),
        "--seed",
        str(args.seed),
        "--devices",
        str(devices),
        "--nodes",
        str(nodes),
        "--hidden",
        str(args.hidden),
        "--lr",
        str(args.lr),
        "--batch-size",
        str(args.batch_size),
        *(["--alpha", str(args.alpha)] if args.alpha is not None else []),
        *getattr(args, "worker_extra", ()),  # a suite's own worker flags (benchmarks.lm's model size, ...)
    ]


def _run_loopback(args: argparse.Namespace, suite: Suite, name: str, out: Path, logdir: Path) -> None:
    """One row on this host: one worker (which launches its ranks), or the single_par copies."""
    if name != SINGLE_PAR:
        devices = 1 if name in ONE_PROCESS else args.devices
        cmd = _worker_cmd(args, suite, name, out, devices, 1)
        wait_all(name, [start(cmd, clean_env(), logdir / f"{out.stem}.log")], args.timeout)
        return
    with tempfile.TemporaryDirectory(prefix="fedopt-barrier-") as barrier:
        procs = []
        for i in range(args.devices):
            target = out if i == 0 else out.with_suffix(f".copy{i}.json")
            cmd = _worker_cmd(args, suite, name, target, 1, 1)
            cmd += ["--barrier", barrier, "--copies", str(args.devices), "--copy-index", str(i)]
            procs.append(start(cmd, clean_env(), logdir / f"{out.stem}.copy{i}.log"))
        wait_all(name, procs, args.timeout)


def _run_netns(
    args: argparse.Namespace, suite: Suite, name: str, out: Path, logdir: Path, net: Any, port: int
) -> None:
    """One row with every rank on its own namespace host (Lightning multi-node variables)."""
    n = args.devices
    procs = []
    for r in range(n):
        env = clean_env(
            {
                "MASTER_ADDR": net.address(0),
                "MASTER_PORT": str(port),
                "NODE_RANK": str(r),
                "WORLD_SIZE": str(n),
                "LOCAL_RANK": "0",
                "GLOO_SOCKET_IFNAME": net.ifname(r),
            }
        )
        cmd = _worker_cmd(args, suite, name, out, 1, n)
        procs.append(start(cmd, env, logdir / f"{out.stem}.rank{r}.log", net, r))
    wait_all(name, procs, args.timeout)


def _network(args: argparse.Namespace) -> tuple[Any, str]:
    """The namespace network of ``--netns`` (``None`` without it, or where it cannot be made) and the mode."""
    if not args.netns:
        return None, "loopback"
    from benchmarks import netns

    reason = netns.netns_unavailable_reason()
    if reason:
        print(f"note: --netns requested but {reason}; falling back to loopback (all ranks on this host)")
        return None, "loopback"
    netns.cleanup_stale()
    return netns.Network(args.devices, rate=args.rate, delay=args.delay), f"netns-{args.rate}"


def _train_all(
    args: argparse.Namespace, suite: Suite, names: list[str], logdir: Path, net: Any, mode: str
) -> Runs:
    """Every row ``args.repeat`` times (interleaved), each in its own worker processes."""
    runs: Runs = {n: [] for n in names}
    if net is not None:
        net.create()
        print(f"network: {net.describe()}")
        for note in net.notes:
            print(f"note: {note}; continuing without it")
        mbit = net.measure_throughput(1, 0, 2_000_000)
        print(f"measured TCP throughput host1 -> host0: {mbit:.1f} Mbit/s")
        # an all-reduce loads both directions of a link at once: the planner's rate (benchmarks.project)
        there, back = net.measure_both_ways(0, 1, max(4_000_000, int(mbit * 1e6 / 8)))  # >= 1 s of transfer
        print(
            f"measured TCP throughput both ways at once: {(there + back) / 2:.1f} Mbit/s "
            f"(host0 -> host1 {there:.1f}, host1 -> host0 {back:.1f})"
        )
    print(
        f"{len(names)} strategies x {args.repeat} repeat(s), {args.steps} optimizer steps each, "
        f"{args.devices} ranks ({mode}), validation every {args.val_every} steps, seed {args.seed}, "
        "torch threads per process: 1"
    )
    for rep in range(args.repeat):
        for i, sname in enumerate(names):
            out = logdir / f"{sname}.r{rep}.json"
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            if net is not None and sname not in REFERENCES and sname not in ONE_PROCESS:
                port = 29500 + (rep * len(names) + i) % 500
                _run_netns(args, suite, sname, out, logdir, net, port=port)
            else:
                _run_loopback(args, suite, sname, out, logdir)
            res = json.loads(out.read_text())
            res["process_wall_s"] = time.perf_counter() - t0
            runs[sname].append(res)
            print(
                f"[{rep * len(names) + i + 1}/{args.repeat * len(names)}] {sname:<15} "
                f"{time.perf_counter() - t0:6.1f}s (fit {res['final']['wall_s']:.1f}s)  "
                f"val_loss {res['rows'][-1]['val_loss']:.4f}",
                flush=True,
            )
    return runs


#: for other runners (:mod:`benchmarks.lm`): the namespace network of ``--netns`` and training
#: every row (``args.worker_extra``, if set, is appended to every worker's command line)
network = _network
train_all = _train_all


def _optimizer_words(args: argparse.Namespace, suite: Suite, names: list[str]) -> str:
    """``"AdamW lr 0.001"`` and/or the optimizer settings of the rows that set their own."""
    own = sorted(
        {
            ", ".join(f"{k}={v}" for k, v in suite.model_kwargs[n].items())
            for n in names
            if n in suite.model_kwargs
        }
    )
    default = [f"AdamW lr {args.lr}"] if any(n not in suite.model_kwargs for n in names) else []
    return "; ".join(default + [f"rows' own {kw}" for kw in own])


# ====================================================================== the run
def runner(args: argparse.Namespace, suite: Suite) -> None:
    """Train the rows ``args.strategies`` of ``suite``, print the tables, write CSV and PNG files."""
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if not suite.knows(n)]
    if unknown:
        sys.exit(f"unknown strategies {unknown}; known: {[*suite.strategies, *REFERENCES]}")
    if not args.no_single:
        names += [n for n in REFERENCES if n not in names]
    if args.devices < 2:
        sys.exit("--devices must be >= 2")

    net, mode = _network(args)
    preset = "quick" if args.quick else "outer" if args.outer else "default"
    name = args.name or preset + (f"_netns_{args.rate}" if net else "")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    logdir = outdir / "logs" / name
    logdir.mkdir(parents=True, exist_ok=True)

    # turn SIGTERM into an exception so that the namespaces are torn down (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    try:
        runs = _train_all(args, suite, names, logdir, net, mode)
    finally:
        if net is not None:
            net.destroy()
    if net is not None and args.delay and not net.delay_applied:
        mode += " (delay not applied)"

    rows = [
        {**r, "repeat": k, "mode": mode, "world_size": res["world_size"]}
        for reps in runs.values()
        for k, res in enumerate(reps)
        for r in res["rows"]
    ]
    steps = [
        {"strategy": n, "repeat": k, "mode": mode, **s}
        for n, reps in runs.items()
        for k, res in enumerate(reps)
        for s in res["steps"]
    ]
    summary, target = _report.summarize(runs, args.target)
    n_params = runs[names[0]][0]["n_params"]
    print(
        f"\n=== {name}: DigitsClassifier(hidden={args.hidden}, {n_params} parameters, "
        f"{4 * n_params / 1e3:.1f} kB fp32), {_optimizer_words(args, suite, names)}, batch {args.batch_size} "
        f"per replica, {args.devices} replicas, {mode} ==="
    )
    _report.print_table(summary, target)
    _report.print_step_costs(summary)
    _report.print_ratios(runs, summary)
    # compute only: single_par's mean step (as benchmarks.lm's summary; benchmarks.project --check reads both)
    compute_only = next((s["mean_step_ms"] for s in summary if s["strategy"] == SINGLE_PAR), None)
    for s in summary:
        s["mode"] = mode
        s["target_val_loss"] = target
        s["seed"], s["n_params"] = args.seed, runs[s["strategy"]][0]["n_params"]
        s["compute_only_step_ms"] = compute_only
    write_csv(outdir / f"{name}.csv", rows)
    write_csv(outdir / f"{name}_steps.csv", steps)
    write_csv(outdir / f"{name}_summary.csv", summary)
    title = (
        f"{name}: digits MLP hidden={args.hidden}, {args.devices} replicas ({mode}), "
        f"{args.steps} steps, seed {args.seed}"
    )
    _report.plot([r for r in rows if r["repeat"] == 0], target, outdir / f"{name}.png", title)
    print(
        f"\nwrote {outdir / name}.csv, {name}_steps.csv, {name}_summary.csv, {name}.png "
        f"(total {time.perf_counter() - t_start:.0f}s)"
    )


def build_parser(suite: Suite) -> argparse.ArgumentParser:
    """The runner's command line (the worker's internal flags hidden)."""
    p = argparse.ArgumentParser(
        prog=suite.prog,
        description=suite.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"preset: {','.join(suite.quick)} (+ single), 320 steps, 2 ranks",
    )
    p.add_argument(
        "--outer",
        action="store_true",
        help=f"preset: {','.join(suite.outer)} (+ single), 320 steps, 2 ranks",
    )
    p.add_argument(
        "--strategies", default=None, help=f"comma list of {[*suite.strategies, *REFERENCES]} (default: all)"
    )
    p.add_argument("--no-single", action="store_true", help="skip the single-process reference runs")
    p.add_argument("--devices", type=int, default=2, help="ranks (processes) per run")
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 1024, quick 320)"
    )
    p.add_argument("--val-every", type=int, default=32, help="validate every this many optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every strategy this many times (interleaved); times are medians",
    )
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32, help="per replica")
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="non-IID: Dirichlet(alpha) label skew per replica (default IID)",
    )
    p.add_argument("--target", type=float, default=None, help="target val loss (default: ddp's final * 1.05)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    p.add_argument("--name", default=None, help="output file stem (default: quick/default[_netns_<rate>])")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per strategy run")
    p.add_argument(
        "--netns", action="store_true", help="each rank its own host in a network namespace (root)"
    )
    p.add_argument("--rate", default="100mbit", help="--netns: tc tbf rate of every link")
    p.add_argument(
        "--delay", default=None, help="--netns: one-way delay via tc netem, e.g. 5ms (if available)"
    )
    # internal: one strategy run
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    p.add_argument("--copies", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--copy-index", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None, suite: Suite) -> None:
    """Run the comparison ``argv`` asks for over ``suite`` (or, with ``--worker``, train one row)."""
    args = build_parser(suite).parse_args(argv)
    if args.steps is None:
        args.steps = 320 if args.quick or args.outer else 1024
    if args.worker is not None:
        from benchmarks import _worker  # imports Lightning: only in worker processes

        _worker.train(args, suite)
        return
    if args.strategies is None:
        preset = suite.quick if args.quick else suite.outer if args.outer else suite.strategies
        args.strategies = ",".join(preset)
    runner(args, suite)
