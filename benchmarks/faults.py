"""Fault-tolerance benchmark: the same job with and without failures, under ``torchrun``'s agents.

For every strategy, a 3-node job (``--nnodes=2:3``, one worker per node, :mod:`benchmarks._agents`)
trains the digits MLP (:mod:`benchmarks._elastic_worker`) twice: once without failures and once
with a replica's worker killed (``kill -9``) at chosen steps; its agent restarts it, the other
agents restart theirs, and training resumes. ``--lose-node`` adds a third run in which a whole node
(agent and worker) is killed halfway: the job carries on with the two survivors.

* ``ddp``: Lightning's DDP with ``ModelCheckpoint(save_last=True, every_n_train_steps=16)`` and
  ``fit(ckpt_path="last")``: the baseline;
* ``local_sgd`` (H=8), ``diloco`` (H=32), ``noloco`` (H=32), ``gossip`` (ring, every 4 steps):
  ``elastic=True, sync_timeout=10``: a checkpoint at every synchronisation, resumed on restart.

Kill steps are drawn once per seed (one per ``--kill-every`` steps, uniformly inside each window)
and are the same for every strategy. Outputs in ``--out`` (default ``benchmarks/results/``):

* ``<name>.csv``: one row per validation (rank 0): strategy, run, seconds since the job started,
  step, world size, validation loss;
* ``<name>_kills.csv``: one row per failure: the step it hit, how long until a new worker ran,
  until training resumed (first step completed after the restart) and until it was back past the
  step it had reached (``recover_s``), the step it resumed from and the steps redone;
* ``<name>_summary.csv``: the printed table, one row per strategy;
* ``<name>.png``: validation loss vs wall time, one panel per strategy, the failures as vertical lines;
* ``logs/<name>/<strategy>_<run>/``: each job's directory (agents' logs, progress, events, results).

``python -m benchmarks.faults --quick`` (one failure, 200 steps) took 236 s on 2 cores (with
another benchmark running); the default (three failures, 600 steps) 14 minutes with ``--lose-node``
under a load average of 8, about 10 without it. Process start-up (3 workers importing torch and
Lightning on 2 cores) is most of every run and of every restart.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._agents import Agents, Rendezvous
from benchmarks.harness import DEFAULT_OUT, REPO_ROOT, write_csv

__all__ = ["kill_steps", "main", "run_job", "summarize"]

STRATEGIES = ("ddp", "local_sgd", "diloco", "noloco", "gossip")
WORKER = REPO_ROOT / "benchmarks" / "_elastic_worker.py"
RUNS = ("free", "faults", "lose_node")


def kill_steps(steps: int, every: int, seed: int) -> list[int]:
    """One kill step per ``every`` steps, uniform in ``[every*j - every/2, every*j + every/2)``
    (seeded), for ``j = 1, 2, ...`` while it stays at least ``every/2`` before the end."""
    rng = random.Random(seed)
    out = []
    j = 1
    while every * j + every // 2 <= steps - every // 2:
        out.append(every * j - every // 2 + rng.randrange(every))
        j += 1
    return out or [steps // 2]


def _read_jsonl(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted(folder.glob("*.jsonl")):
        rows.extend(json.loads(line) for line in f.read_text().splitlines() if line.strip())
    return sorted(rows, key=lambda r: r["time"])


def run_job(
    strategy: str,
    run: str,
    args: argparse.Namespace,
    directory: Path,
    kills: list[int],
) -> dict[str, Any]:
    """One job: ``run`` is ``"free"``, ``"faults"`` (kill -9 a worker at each of ``kills``,
    victims in turn) or ``"lose_node"`` (kill the node whose worker is rank 0 at ``kills[0]``)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    worker_args = [
        "--strategy", strategy, "--dir", str(directory), "--steps", str(args.steps),
        "--val-every", str(args.val_every), "--sync-timeout", str(args.sync_timeout),
        "--seed", str(args.seed), "--ckpt-every", str(args.ckpt_every),
    ]  # fmt: skip
    injected: list[dict[str, Any]] = []
    lost: list[int] = []
    t0 = time.time()
    with Agents(
        WORKER,
        worker_args,
        directory,
        nodes=args.nodes,
        min_nodes=args.min_nodes,
        max_restarts=args.max_restarts,
        rendezvous=Rendezvous(last_call_timeout=args.last_call),
    ) as job:
        deadline = time.monotonic() + args.job_timeout
        last = t0
        schedule = kills if run == "faults" else kills[:1] if run == "lose_node" else []
        for k, step in enumerate(schedule):
            left = deadline - time.monotonic()
            job.wait_for_step(step, left, started_after=last)
            progress = {i: p for i, p in job.progress_all().items() if p.started > last and i not in lost}
            reached = max(p.step for p in progress.values())
            if run == "lose_node":
                victim = min(progress, key=lambda i: progress[i].rank)  # the node of rank 0
                tk = time.time()
                job.kill_node(victim)
                lost.append(victim)
            else:
                alive = [i for i in job.running() if i in progress]
                victim = alive[(k + 1) % len(alive)]
                tk = time.time()
                job.kill_worker(victim)
            # back past the step it had reached: the work lost is made up
            job.wait_for_step(reached + 1, deadline - time.monotonic(), started_after=tk)
            injected.append(
                {
                    "index": k,
                    "victim": victim,
                    "victim_rank": progress[victim].rank,
                    "kill_step": reached,
                    "time": tk,
                    "recover_s": time.time() - tk,
                }
            )
            last = tk
        codes = job.wait(max(deadline - time.monotonic(), 1.0))
        wall = time.time() - t0
        bad = [i for i, c in enumerate(codes) if c != 0 and i not in lost]
        if bad:
            raise RuntimeError(f"{strategy}/{run}: agent(s) {bad} exited {codes}; log:\n{job.log(bad[0])}")
    events = _read_jsonl(directory / "events")
    rows = _read_jsonl(directory / "rows")
    results = [json.loads(f.read_text()) for f in sorted((directory / "results").glob("*.json"))]
    return {
        "strategy": strategy,
        "run": run,
        "t0": t0,
        "wall_s": wall,
        "kills": _kill_rows(strategy, run, injected, events, t0),
        "rows": [
            {
                "strategy": strategy,
                "run": run,
                "seconds": r["time"] - t0,
                "step": r["step"],
                "world_size": r["world_size"],
                "restart": r["restart"],
                "val_loss": r["val_loss"],
            }
            for r in rows
            if r["rank"] == 0
        ],
        "results": results,
        "events": events,
    }


def _kill_rows(
    strategy: str, run: str, injected: list[dict[str, Any]], events: list[dict[str, Any]], t0: float
) -> list[dict[str, Any]]:
    """Per failure: the new workers' start, the step they resumed from, the seconds to resume."""
    out = []
    for n, kill in enumerate(injected):
        tk = kill["time"]
        until = injected[n + 1]["time"] if n + 1 < len(injected) else math.inf
        window = [e for e in events if tk < e["time"] < until]
        starts = [e for e in window if e["event"] == "start"]
        first = [e for e in window if e["event"] == "first_step"]
        resumed = min((e["step"] for e in starts), default=None)
        out.append(
            {
                "strategy": strategy,
                "run": run,
                "kill": n,
                "victim_agent": kill["victim"],
                # rank 0 hosts the workers' store: its loss shows at once, another rank's only
                # once the strategy's heartbeat goes stale
                "victim_rank": kill["victim_rank"],
                "kill_step": kill["kill_step"],
                "time_s": tk - t0,  # seconds since the job started
                # the agents noticed, stopped the other workers, re-formed the rendezvous, started workers
                "new_worker_s": min((e["exec_time"] for e in starts), default=math.nan) - tk,
                # + imports, process group, restore: the first step after the restart is done
                "resume_s": min((e["time"] for e in first), default=math.nan) - tk,
                # + the steps redone: back past kill_step
                "recover_s": kill["recover_s"],
                "resumed_from": resumed,
                "steps_lost": None if resumed is None else kill["kill_step"] - resumed,
                "world_size_after": starts[0]["world_size"] if starts else None,
            }
        )
    return out


def _final(job: dict[str, Any]) -> dict[str, Any]:
    """Final loss (rank 0's result), whether every rank ended with the same weights, restarts."""
    results = job["results"]
    r0 = next((r for r in results if r["rank"] == 0), results[0])
    recovery = sum(
        v
        for r in results
        for k, v in r.get("bytes_by_purpose", {}).items()
        if any(w in k for w in ("recover", "resume", "elastic", "restore"))
    )
    return {
        "final_val_loss": r0["final_val_loss"],
        "steps": r0["steps"],
        "world_size": r0["world_size"],
        "weights_agree": len({r["sha256"] for r in results}) == 1,
        "agent_restarts": sum(r["restart"] for r in results),
        "elastic": r0["elastic"],
        "recovery_bytes": recovery or None,
    }


def summarize(jobs: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per strategy: failure-free vs with failures (and node loss, if run)."""
    out = []
    for strategy in dict.fromkeys(s for s, _ in jobs):
        free, faults = jobs.get((strategy, "free")), jobs.get((strategy, "faults"))
        row: dict[str, Any] = {"strategy": strategy}
        for run, job in (
            ("free", free),
            ("faults", faults),
            ("lose_node", jobs.get((strategy, "lose_node"))),
        ):
            if job is None:
                continue
            if "error" in job:
                row[f"{run}_error"] = job["error"]
                continue
            fin = _final(job)
            row[f"{run}_val_loss"] = fin["final_val_loss"]
            row[f"{run}_wall_s"] = job["wall_s"]
            row[f"{run}_weights_agree"] = fin["weights_agree"]
            row["elastic"] = fin["elastic"]
            if run != "free":
                kills = job["kills"]
                row[f"{run}_kills"] = len(kills)
                row[f"{run}_new_worker_s"] = _mean([k["new_worker_s"] for k in kills])
                row[f"{run}_resume_s"] = _mean([k["resume_s"] for k in kills])
                row[f"{run}_recover_s"] = _mean([k["recover_s"] for k in kills])
                row[f"{run}_steps_lost"] = sum(k["steps_lost"] or 0 for k in kills)
                row[f"{run}_world_size_end"] = fin["world_size"]
                row[f"{run}_agent_restarts"] = fin["agent_restarts"]
                row[f"{run}_recovery_bytes"] = fin["recovery_bytes"]
        if free is not None and faults is not None and "error" not in free and "error" not in faults:
            row["loss_ratio"] = row["faults_val_loss"] / row["free_val_loss"]
            row["wall_ratio"] = row["faults_wall_s"] / row["free_wall_s"]
        out.append(row)
    return out


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else None


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(summary: list[dict[str, Any]]) -> None:
    """The summary as a table: losses, wall times, seconds to resume, steps redone."""
    head = (
        f"{'strategy':<10} {'loss free':>9} {'w/ fails':>9} {'ratio':>6} {'wall free':>9} {'w/ fails':>9} "
        f"{'ratio':>6} {'kills':>5} {'new wkr s':>9} {'resume s':>8} {'recover s':>9} {'lost':>5} {'same w':>6}"
    )
    lines = [head, "-" * len(head)]
    for s in summary:
        if "free_error" in s or "faults_error" in s:
            lines.append(f"{s['strategy']:<10} FAILED: {s.get('free_error') or s.get('faults_error')}")
            continue
        lines.append(
            f"{s['strategy']:<10} {s['free_val_loss']:>9.4f} {s['faults_val_loss']:>9.4f} "
            f"{s['loss_ratio']:>6.3f} {s['free_wall_s']:>9.1f} {s['faults_wall_s']:>9.1f} "
            f"{s['wall_ratio']:>6.2f} {s['faults_kills']:>5} {_fmt(s['faults_new_worker_s'], '.1f'):>9} "
            f"{_fmt(s['faults_resume_s'], '.1f'):>8} {_fmt(s['faults_recover_s'], '.1f'):>9} "
            f"{s['faults_steps_lost']:>5} {'yes' if s['faults_weights_agree'] else 'NO':>6}"
        )
    if any("lose_node_val_loss" in s for s in summary):
        lines.append("\nnode lost (agent + worker, kill -9), the job continues on the survivors:")
        for s in summary:
            if "lose_node_val_loss" in s:
                lines.append(
                    f"{s['strategy']:<10} val loss {s['lose_node_val_loss']:.4f}, wall {s['lose_node_wall_s']:.1f} s, "
                    f"new workers after {_fmt(s['lose_node_new_worker_s'], '.1f')} s, resumed after "
                    f"{_fmt(s['lose_node_resume_s'], '.1f')} s, {s['lose_node_steps_lost']} steps redone, "
                    f"world size at the end {s['lose_node_world_size_end']}"
                )
    lines.append(
        "loss: final validation loss of the consensus model (rank 0); wall: seconds from starting the job to "
        "every agent's exit; new wkr s: kill -> the restarted workers' processes start (agents notice, stop "
        "their workers, re-rendezvous); resume s: kill -> first step done after the restart; recover s: kill "
        "-> back past the step reached before it; lost: steps redone (all failures); same w: every rank ends "
        "with identical weights"
    )
    print("\n".join(lines))


def plot(jobs: dict[tuple[str, str], dict[str, Any]], path: Path, title: str) -> None:
    """Validation loss vs seconds since the job started, one panel per strategy, kills as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(s for s, _ in jobs))
    cols = min(len(strategies), 3)
    rows = math.ceil(len(strategies) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.2 * rows), squeeze=False)
    styles = {"free": ("C0", "-", "o"), "faults": ("C3", "--", "s"), "lose_node": ("C2", ":", "^")}
    for ax, strategy in zip(axes.flat, strategies):
        for run in RUNS:
            job = jobs.get((strategy, run))
            if job is None or "error" in job:
                continue
            color, ls, marker = styles[run]
            rs = job["rows"]
            label = {"free": "no failure", "faults": "kill -9 a worker", "lose_node": "lose a node"}[run]
            ax.plot(
                [r["seconds"] for r in rs],
                [r["val_loss"] for r in rs],
                color=color,
                linestyle=ls,
                marker=marker,
                markersize=3,
                label=label,
            )
            for n, k in enumerate(job["kills"]):
                what = "node lost" if run == "lose_node" else "kill -9"
                ax.axvline(k["time_s"], color=color, alpha=0.5, linewidth=1, label=None if n else what)
        ax.set_title(strategy)
        ax.set_xlabel("seconds since the job started")
        ax.set_ylabel("validation loss")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(strategies) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 steps, one failure")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, of {STRATEGIES}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 600, quick 200)")
    p.add_argument("--val-every", type=int, default=None, help="validation period (default 25, quick 20)")
    p.add_argument(
        "--kill-every", type=int, default=None, help="one failure per this many steps (default 150)"
    )
    p.add_argument("--lose-node", action="store_true", help="also a run that loses a whole node halfway")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--min-nodes", type=int, default=2)
    p.add_argument("--ckpt-every", type=int, default=16, help="ddp's ModelCheckpoint every_n_train_steps")
    p.add_argument("--sync-timeout", type=float, default=10.0)
    p.add_argument("--last-call", type=int, default=3, help="rendezvous last_call_timeout, seconds")
    p.add_argument("--max-restarts", type=int, default=20)
    p.add_argument("--job-timeout", type=float, default=300.0, help="seconds one job may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default="faults")
    args = p.parse_args(argv)
    args.steps = args.steps or (200 if args.quick else 600)
    args.val_every = args.val_every or (20 if args.quick else 25)
    args.kill_every = args.kill_every or (args.steps // 2 if args.quick else 150)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {STRATEGIES}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every strategy without and with failures; print the table, write CSVs and the PNG."""
    args = parse_args(argv)
    kills = kill_steps(args.steps, args.kill_every, args.seed)
    runs = ["free", "faults", *(["lose_node"] if args.lose_node else [])]
    logs = args.out / "logs" / args.name
    logs.mkdir(parents=True, exist_ok=True)
    print(
        f"{len(args.strategies)} strategies x {runs}, {args.nodes} nodes (min {args.min_nodes}), "
        f"{args.steps} steps, failures at steps {kills}",
        flush=True,
    )
    jobs: dict[tuple[str, str], dict[str, Any]] = {}
    t_all = time.time()
    for strategy in args.strategies:
        for run in runs:
            t = time.time()
            try:
                job = run_job(strategy, run, args, logs / f"{strategy}_{run}", kills)
            except Exception as exc:  # one broken run should not lose the others
                job = {"strategy": strategy, "run": run, "error": f"{type(exc).__name__}: {exc}"}
                print(f"  {strategy}/{run}: FAILED {job['error'][:2000]}", flush=True)
            jobs[(strategy, run)] = job
            if "error" not in job:
                print(
                    f"  {strategy:<10} {run:<9} {time.time() - t:6.1f} s, final val loss "
                    f"{_final(job)['final_val_loss']:.4f}"
                    + "".join(
                        f"; kill at step {k['kill_step']}: resumed from {k['resumed_from']} after "
                        f"{_fmt(k['resume_s'], '.1f')} s"
                        for k in job["kills"]
                    ),
                    flush=True,
                )
    summary = summarize(jobs)
    print()
    print_table(summary)
    print(f"\n{time.time() - t_all:.0f} s in all")
    args.out.mkdir(parents=True, exist_ok=True)
    ok = [j for j in jobs.values() if "error" not in j]
    write_csv(args.out / f"{args.name}.csv", [r for j in ok for r in j["rows"]])
    write_csv(args.out / f"{args.name}_kills.csv", [k for j in ok for k in j["kills"]])
    write_csv(args.out / f"{args.name}_summary.csv", summary)
    plot(
        jobs,
        args.out / f"{args.name}.png",
        f"{args.nodes} torchrun agents (min {args.min_nodes}), one CPU worker each, {args.steps} steps; "
        f"vertical lines: kill -9 (steps {kills})",
    )
    print(f"wrote {args.out / args.name}.csv, _kills.csv, _summary.csv, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
