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

``--ft`` adds ``diloco_ft`` to the same run: ``--groups`` replica groups under
``DiLoCoStrategy(fault_tolerance="torchft")`` (:mod:`benchmarks._ft_worker`), started and restarted
by ``python -m lightning_fedopt.fault_tolerance.launch``; runs ``free``, ``faults`` (SIGKILL of one
group at the same steps) and, per K of ``--chaos``, ``chaos<K>`` (one group SIGKILLed every K
seconds, round-robin). The survivors keep training; :func:`summarize_ft` reports throughput kept,
the loss against the failure-free run, the survivors' stall per failure, seconds from a restart to
the group training again and the bytes sent to heal, beside the torchrun rows (``<name>_ft*.csv``,
``<name>_ft.png``). ``--step-sleep`` lengthens every step of every row (a run long enough for chaos).

``--task lm`` trains the byte-level GPT of ``examples/lm.py`` instead, in every row, at
``benchmarks/lm.py``'s size (d_model 64, 2 layers, 2 heads, seq_len 128, AdamW 2e-3 with warm-up,
clipping at 1, batch 8) on ``examples.lm_data.StdlibText``: one block of packages per torchrun rank,
and per replica group the block of its ``REPLICA_GROUP_ID`` (:func:`benchmarks._elastic_worker.make_task`,
shared by both workers); the losses are in nats per byte, with bits per byte beside them.

Kill steps are drawn once per seed (one per ``--kill-every`` steps, uniformly inside each window)
and are the same for every strategy. Outputs in ``--out`` (default ``benchmarks/results/``):

* ``<name>.csv``: one row per validation (rank 0): strategy, run, seconds since the job started,
  step, world size, validation loss (``lm``: and bits per byte);
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
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from benchmarks._agents import Agents, Rendezvous
from benchmarks.harness import DEFAULT_OUT, REPO_ROOT, write_csv

__all__ = [
    "TASKS",
    "add_task_args",
    "kill_steps",
    "main",
    "run_ft_job",
    "run_job",
    "summarize",
    "summarize_ft",
    "task_defaults",
]

STRATEGIES = ("ddp", "local_sgd", "diloco", "noloco", "gossip")
WORKER = REPO_ROOT / "benchmarks" / "_elastic_worker.py"
FT_WORKER = REPO_ROOT / "benchmarks" / "_ft_worker.py"
RUNS = ("free", "faults", "lose_node")
#: the name of the fault-tolerant rows (``DiLoCoStrategy(fault_tolerance="torchft")``)
FT = "diloco_ft"

#: what a fault run trains (``--task``): the digits MLP, or the language model of ``examples/lm.py``
TASKS = ("digits", "lm")
#: ``--lr`` and ``--batch-size`` (per replica) when not given: the digits benchmarks' and benchmarks/lm.py's
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"lr": 1e-3, "batch_size": 32},
    "lm": {"lr": 2e-3, "batch_size": 8},
}


def add_task_args(p: argparse.ArgumentParser) -> None:
    """``--task`` and the flags of its model and data, on the workers' command lines
    (:mod:`benchmarks._elastic_worker`, :mod:`benchmarks._ft_worker`; this module forwards ``--task``)."""
    p.add_argument("--task", choices=TASKS, default="digits", help="the digits MLP or the language model")
    p.add_argument("--lr", type=float, default=None, help="AdamW's (peak) lr (default: digits 1e-3, lm 2e-3)")
    p.add_argument("--batch-size", type=int, default=None, help="per replica (default: digits 32, lm 8)")
    p.add_argument("--hidden", type=int, default=128, help="digits: the MLP's hidden width")
    lm = p.add_argument_group("lm: examples/lm.py's GPT and StdlibText, at benchmarks/lm.py's size")
    lm.add_argument("--d-model", type=int, default=64)
    lm.add_argument("--n-layers", type=int, default=2)
    lm.add_argument("--n-heads", type=int, default=2)
    lm.add_argument("--seq-len", type=int, default=128)
    lm.add_argument("--warmup", type=int, default=64, help="learning-rate warm-up steps (then a cosine)")
    lm.add_argument("--max-bytes", type=int, default=8 << 20, help="training text, all replicas together")
    lm.add_argument("--val-bytes", type=int, default=64 << 10, help="held-out text")


#: the task in the printed header and the plots' titles, and the plots' y label
TASK_TITLES = {
    "digits": "digits MLP",
    "lm": "byte-level GPT (d_model 64, 2 layers, seq_len 128), stdlib text",
}
TASK_YLABELS = {"digits": "validation loss", "lm": "validation loss (nats per byte)"}


def task_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``--lr``/``--batch-size`` left out: the task's (:data:`TASK_DEFAULTS`)."""
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


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
    rows: list[dict[str, Any]] = []
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
        "--step-sleep", str(args.step_sleep), "--task", args.task,
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
                **_given("val_bpb", r.get("val_bpb")),
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


def _given(key: str, value: Any) -> dict[str, Any]:
    """``{key: value}`` when there is a value (``--task lm``'s bits per byte), else nothing: the
    digits task's CSVs keep their columns."""
    return {} if value is None else {key: value}


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
        "final_val_bpb": r0.get("final_val_bpb"),
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
            row.update(_given(f"{run}_val_bpb", fin["final_val_bpb"]))
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
    """The summary as a table: losses, wall times, seconds to resume, steps redone (``--task lm``:
    and the losses in bits per byte)."""
    bpb = any("free_val_bpb" in s or "faults_val_bpb" in s for s in summary)
    head = (
        f"{'strategy':<10} {'loss free':>9} {'w/ fails':>9} {'ratio':>6} {'wall free':>9} {'w/ fails':>9} "
        f"{'ratio':>6} {'kills':>5} {'new wkr s':>9} {'resume s':>8} {'recover s':>9} {'lost':>5} {'same w':>6}"
        + (f" {'bpb free':>8} {'w/ fails':>8}" if bpb else "")
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
            + (
                f" {_fmt(s.get('free_val_bpb'), '.4f'):>8} {_fmt(s.get('faults_val_bpb'), '.4f'):>8}"
                if bpb
                else ""
            )
        )
    if any("lose_node_val_loss" in s for s in summary):
        lines.append("\nnode lost (agent + worker, kill -9), the job continues on the survivors:")
        for s in summary:
            if "lose_node_val_loss" in s:
                lines.append(
                    f"{s['strategy']:<10} val loss {s['lose_node_val_loss']:.4f}"
                    + (f" ({s['lose_node_val_bpb']:.4f} bpb)" if "lose_node_val_bpb" in s else "")
                    + f", wall {s['lose_node_wall_s']:.1f} s, "
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
        + ("; loss in nats per byte (lm), bpb: the same in bits per byte" if bpb else "")
    )
    print("\n".join(lines))


def plot(
    jobs: dict[tuple[str, str], dict[str, Any]], path: Path, title: str, ylabel: str = "validation loss"
) -> None:
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
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(strategies) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- fault-tolerant rows
def _read_jsonl_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by SIGKILL
            continue
    return out


def _ft_progress(directory: Path, groups: int) -> dict[int, dict[str, Any]]:
    out = {}
    for g in range(groups):
        try:
            out[g] = json.loads((directory / "progress" / f"group{g}.json").read_text())
        except (OSError, ValueError):
            continue
    return out


def _ft_current_pids(events: Path) -> dict[int, int]:
    """``group -> pid`` of each group's latest start (the launcher's events file)."""
    pids: dict[int, int] = {}
    for e in _read_jsonl_file(events):
        if e.get("event") == "start":
            pids[int(e["group"])] = int(e["pid"])
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (the launcher has not reaped it yet) is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_ft_job(
    run: str, args: argparse.Namespace, directory: Path, kills: list[int], chaos: float | None = None
) -> dict[str, Any]:
    """One fault-tolerant job: ``args.groups`` replica groups under
    ``python -m lightning_fedopt.fault_tolerance.launch`` (lighthouse in the launcher, restarts by it).

    ``run``: ``"free"``; ``"faults"``: SIGKILL one group when the leading group reaches each step of
    ``kills`` (victims ``(k + 1) % groups`` in turn, the torchrun rows' order); ``"chaos<K>"``: SIGKILL
    one group every ``chaos`` seconds, round-robin, from the moment every group has trained until the
    run is done. A victim is always a group that is training (its current life has had a committed
    synchronisation): a group still restarting is skipped for the next one."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    groups = args.groups
    launch_events = directory / "launch.jsonl"
    command = [
        sys.executable, "-m", "lightning_fedopt.fault_tolerance.launch",
        "--groups", str(groups), "--min-replicas", "1", "--max-restarts", str(args.ft_max_restarts),
        "--lighthouse-port", "0", "--heartbeat-timeout-ms", str(args.ft_heartbeat_ms),
        "--quorum-tick-ms", str(args.ft_quorum_tick_ms), "--join-timeout-ms", str(args.ft_join_timeout_ms),
        "--events", str(launch_events), "--",
        sys.executable, str(FT_WORKER), "--dir", str(directory), "--groups", str(groups),
        "--steps", str(args.steps), "--val-every", str(args.val_every), "--sync-every", str(args.ft_sync_every),
        "--sync-timeout", str(args.sync_timeout), "--seed", str(args.seed), "--step-sleep", str(args.step_sleep),
        "--task", args.task,
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    injected: list[dict[str, Any]] = []
    t0 = time.time()
    with open(directory / "launch.log", "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            _ft_control(run, args, directory, kills, chaos, proc, injected)
            rc = proc.wait(timeout=max(1.0, t0 + args.job_timeout - time.time()))
        except BaseException:
            proc.send_signal(signal.SIGTERM)  # the launcher forwards it to every group
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            for pid in _ft_current_pids(launch_events).values():
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            raise
    t_exit = time.time()
    if rc != 0:
        tail = (directory / "launch.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{FT}/{run}: the launcher exited {rc}; its log ends:\n{tail}")
    launch = _read_jsonl_file(launch_events)
    events = {g: _read_jsonl_file(directory / "events" / f"group{g}.jsonl") for g in range(groups)}
    results = [json.loads(f.read_text()) for f in sorted((directory / "results").glob("*.json"))]
    if not results:
        raise RuntimeError(f"{FT}/{run}: no group finished")
    ends = [e["time"] for evs in events.values() for e in evs if e["event"] == "end"]
    t1 = min(e["time"] for evs in events.values() for e in evs if e["event"] == "fit_start")
    rows = sorted(
        (r for g in range(groups) for r in _read_jsonl_file(directory / "rows" / f"group{g}.jsonl")),
        key=lambda r: r["time"],
    )
    (directory / "job.json").write_text(
        json.dumps({"run": run, "chaos": chaos, "t0": t0, "exit_s": t_exit - t0, "injected": injected})
    )
    return {
        "strategy": FT,
        "run": run,
        "chaos": chaos,
        "t0": t0,
        "t_train0": t1,  # the first group's train start
        "groups": groups,
        # the job's steps are done when the last surviving group has finished its fit
        "wall_s": max(ends) - t0,
        "exit_s": t_exit - t0,  # + the launcher's exit (a late restart's start-up, the lighthouse)
        "injected": injected,
        "launch": launch,
        "events": events,
        "results": results,
        "rows": [
            {
                "strategy": FT,
                "run": run,
                "seconds": r["time"] - t0,
                "train_seconds": r["time"] - t1,
                "step": r["step"],
                "group": r["group"],
                "life": r["life"],
                "val_loss": r["val_loss"],
                **_given("val_bpb", r.get("val_bpb")),
            }
            for r in rows
        ],
    }


def _ft_control(
    run: str,
    args: argparse.Namespace,
    directory: Path,
    kills: list[int],
    chaos: float | None,
    proc: subprocess.Popen[bytes],
    injected: list[dict[str, Any]],
) -> None:
    """Inject the failures of ``run`` while the launcher runs (see :func:`run_ft_job`)."""
    groups = args.groups
    launch_events = directory / "launch.jsonl"
    deadline = time.time() + args.job_timeout
    schedule = list(kills) if run == "faults" else []
    next_chaos: float | None = None
    turn = 0  # chaos: the next victim in round-robin order
    while proc.poll() is None:
        if time.time() > deadline:
            raise TimeoutError(f"{FT}/{run}: not finished within --job-timeout {args.job_timeout} s")
        time.sleep(0.05)
        if (directory / "done").exists():
            continue  # the run is over: no more failures
        pids = _ft_current_pids(launch_events)
        progress = _ft_progress(directory, groups)
        # training now: the group's current process has reported a committed synchronisation
        training = {
            g: p
            for g, p in progress.items()
            if pids.get(g) == p.get("pid") and p.get("trained") and _alive(p["pid"])
        }
        if not training:
            continue
        lead = max(p["step"] for p in progress.values())
        victim: int | None = None
        if schedule and lead >= schedule[0]:
            k = len(injected)
            order = [(k + 1 + i) % groups for i in range(groups)]
            victim = next((g for g in order if g in training), None)
            if victim is not None:
                schedule.pop(0)
        elif chaos is not None:
            if next_chaos is None:
                if len(training) == groups:  # the clock starts once every group trains
                    next_chaos = time.time() + chaos
                continue
            if time.time() >= next_chaos:
                order = [(turn + i) % groups for i in range(groups)]
                victim = next((g for g in order if g in training), None)
                if victim is not None:
                    turn = victim + 1
                    next_chaos += chaos
        if victim is None:
            continue
        pid = training[victim]["pid"]
        tk = time.time()
        os.kill(pid, signal.SIGKILL)
        injected.append(
            {
                "index": len(injected),
                "victim": victim,
                "pid": pid,
                "time": tk,
                "kill_step": training[victim]["step"],
                "lead_step": lead,
                "alive_training": sorted(training),
            }
        )


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else None


def _max(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return max(xs) if xs else None


def _ft_lives(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per process life: group, life, start (launcher), exec/imports/fit start, its syncs."""
    starts = {(e["group"], e["restart"]): e for e in job["launch"] if e.get("event") == "start"}
    lives: dict[tuple[int, int], dict[str, Any]] = {}
    for g, evs in job["events"].items():
        for e in evs:
            key = (g, int(e["life"]))
            life = lives.setdefault(key, {"group": g, "life": key[1], "syncs": [], "start": None})
            life["pid"] = e["pid"]
            if e["event"] == "sync":
                life["syncs"].append(e)
            elif e["event"] in ("exec", "fit_start", "end", "late"):
                life[e["event"]] = e
    for key, life in lives.items():
        s = starts.get(key)
        life["start"] = s["time"] if s else None
        # the first committed synchronisation: the join round (at fit start) or a later one
        fit = life.get("fit_start")
        first = None
        if fit is not None and fit["join"].get("committed"):
            first = fit["time"]
        else:
            first = next((e["time"] for e in life["syncs"] if e.get("committed")), None)
        life["trained_at"] = first
        heal = [(fit or {}).get("heal_sent", 0), *(e.get("heal_sent", 0) for e in life["syncs"])]
        recv = [(fit or {}).get("heal_recv", 0), *(e.get("heal_recv", 0) for e in life["syncs"])]
        life["heal_sent"], life["heal_recv"] = max(heal), max(recv)
    return sorted(lives.values(), key=lambda x: (x["group"], x["life"]))


def _ft_failures(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Per failure: the survivors' stall at their first sync after the death and at the victim's
    rejoin (their sync step's seconds minus their median sync step), and the victim's restart cost."""
    t0 = job["t0"]
    lives = _ft_lives(job)
    # each group's median sync step (the syncs it contributed to, every life): the stall's reference
    median_sync: dict[int, float] = {}
    for g in {life["group"] for life in lives}:
        secs = [e["step_seconds"] for life in lives if life["group"] == g for e in life["syncs"]]
        if secs:
            median_sync[g] = statistics.median(secs)
    out = []
    for n, kill in enumerate(job["injected"]):
        tk, victim = kill["time"], kill["victim"]
        next_kill = job["injected"][n + 1]["time"] if n + 1 < len(job["injected"]) else math.inf
        death: list[float] = []
        not_committed = 0
        for g in kill["alive_training"]:
            if g == victim:
                continue
            first = next(
                (e for life in lives if life["group"] == g for e in life["syncs"] if e["time"] > tk), None
            )
            if first is not None and first["time"] < next_kill and g in median_sync:
                death.append(first["step_seconds"] - median_sync[g])
                not_committed += int(not first.get("committed"))
        # the victim's next life (restarted by the launcher)
        after = next((life for life in lives if life["group"] == victim and (life["start"] or 0) > tk), None)
        restart_s = train_s = imports_s = join_s = None
        rejoin: list[float] = []
        heal_recv = None
        late = False
        if after is not None:
            restart_s = after["start"] - tk
            late = "late" in after
            if after.get("exec") is not None:
                imports_s = after["exec"]["imported"] - after["exec"]["exec_time"]
            if not late and after.get("fit_start") is not None and after["trained_at"] is not None:
                train_s = after["trained_at"] - after["start"]
                join_s = after["fit_start"]["join"].get("quorum_seconds")
                heal_recv = after["heal_recv"]
                q = after["fit_start"]["join"].get("quorum_id")
                for g in median_sync:
                    if g == victim:
                        continue
                    first = next(
                        (
                            e
                            for life in lives
                            if life["group"] == g
                            for e in life["syncs"]
                            if e.get("quorum_id") == q and e["time"] > after["start"]
                        ),
                        None,
                    )
                    if first is not None:
                        rejoin.append(first["step_seconds"] - median_sync[g])
        out.append(
            {
                "strategy": FT,
                "run": job["run"],
                "kill": n,
                "victim_group": victim,
                "kill_step": kill["kill_step"],
                "time_s": tk - t0,
                "train_time_s": tk - job["t_train0"],
                "survivors": len(death),
                # the survivors' first sync after the death: extra seconds vs their median sync step
                "stall_death_s": _max(death),
                "death_round_not_committed": not_committed,
                # the survivors' sync in the quorum where the restarted group joined (and healed)
                "stall_rejoin_s": _max(rejoin),
                "restart_s": restart_s,  # kill -> the launcher started the new process
                "imports_s": imports_s,  # the new process importing torch, Lightning, the library
                "join_quorum_s": join_s,  # its joining quorum, heal included
                "restart_to_train_s": train_s,  # process start -> its first committed sync
                "heal_bytes_received": heal_recv,
                "late": late,  # restarted after the run had finished
            }
        )
    return out


def summarize_ft(jobs: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per fault-tolerant run (and the torchrun rows recast in the same columns)."""
    out: list[dict[str, Any]] = []
    found = jobs.get((FT, "free"))
    free: dict[str, Any] = found if found is not None and "error" not in found else {}
    free_ok = bool(free)
    for (strategy, run), job in jobs.items():
        if strategy != FT:
            continue
        row: dict[str, Any] = {"row": f"{FT} {run}", "strategy": strategy, "run": run}
        if "error" in job:
            row["error"] = job["error"]
            out.append(row)
            continue
        fails = job["failures"] = _ft_failures(job)
        res = sorted(job["results"], key=lambda r: r["group"])
        lives = _ft_lives(job)
        sync_secs = [e["step_seconds"] for life in lives for e in life["syncs"]]
        all_syncs = [e for life in lives for e in life["syncs"]]
        row.update(
            {
                "kills": len(job["injected"]),
                "wall_s": job["wall_s"],
                "exit_s": job["exit_s"],
                "train_wall_s": _train_wall(job),
                "throughput_kept": (_train_wall(free) / _train_wall(job)) if free_ok else None,
                "throughput_kept_launch": (free["wall_s"] / job["wall_s"]) if free_ok else None,
                "final_val_loss": res[0]["final_val_loss"],
                **_given("final_val_bpb", res[0].get("final_val_bpb")),
                "loss_vs_free": (res[0]["final_val_loss"] / _final_ft(free)) if free_ok else None,
                "groups_finished": len(res),
                "weights_agree": len({r["sha256"] for r in res}) == 1,
                "steps": res[0]["steps"],
                "median_sync_step_s": _median(sync_secs),
                "stall_death_median_s": _median([f["stall_death_s"] for f in fails]),
                "stall_death_max_s": _max([f["stall_death_s"] for f in fails]),
                "stall_rejoin_median_s": _median([f["stall_rejoin_s"] for f in fails]),
                "stall_rejoin_max_s": _max([f["stall_rejoin_s"] for f in fails]),
                "restart_to_train_median_s": _median([f["restart_to_train_s"] for f in fails]),
                "restart_to_train_max_s": _max([f["restart_to_train_s"] for f in fails]),
                "imports_median_s": _median([f["imports_s"] for f in fails]),
                "rounds_not_committed": sum(1 for e in all_syncs if not e.get("committed")),
                # the share of the groups' rounds that counted in a committed average (a victim's lost
                # round, its time away and its joining round count nothing; so does a late start)
                "work_kept": _work_kept(all_syncs, job["groups"]),
                "heals": sum(
                    1 for life in lives if life.get("fit_start") and life["fit_start"]["join"].get("healed")
                )
                + sum(1 for e in all_syncs if e.get("healed")),
                # CommStats purpose "heal", bytes_sent, summed over every life of every group
                "heal_bytes_sent": sum(life["heal_sent"] for life in lives),
                # what the healed groups received (heal_recv), summed over every life
                "heal_bytes_received": sum(life["heal_recv"] for life in lives),
                "heal_bytes_per_restart": _median(
                    [f["heal_bytes_received"] for f in fails if f["heal_bytes_received"]]
                ),
                "late_restarts": sum(1 for f in fails if f["late"]),
                "lives": len(lives),
            }
        )
        out.append(row)
    return out


def _work_kept(syncs: list[dict[str, Any]], groups: int) -> float | None:
    """Contributors per committed round (torchft's step), summed, over ``groups`` x rounds."""
    rounds: dict[float, float] = {}
    for e in syncs:
        if e.get("committed"):
            rounds[e["round"]] = max(rounds.get(e["round"], 0.0), float(e["contributors"]))
    return sum(rounds.values()) / (groups * len(rounds)) if rounds else None


def _train_wall(job: dict[str, Any]) -> float:
    """Seconds from the job's first training (the first ``on_train_start`` of any worker or group)
    to the last finished fit: the launch's imports, common to every run and the noisiest part of
    it on a shared machine, left out; every restart after the first start counted."""
    if job["strategy"] == FT:
        starts = [e["time"] for evs in job["events"].values() for e in evs if e["event"] == "fit_start"]
        ends = [e["time"] for evs in job["events"].values() for e in evs if e["event"] == "end"]
    else:
        starts = [e["time"] for e in job["events"] if e["event"] == "start"]
        ends = [r["time"] for r in job["results"]]
    return max(ends) - min(starts)


def _final_ft(job: dict[str, Any]) -> float:
    return min(job["results"], key=lambda r: r["group"])["final_val_loss"]


def _torchrun_rows(jobs: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """The torchrun rows' scheduled-kill runs in the fault-tolerant table's columns: every worker
    restarts, so a survivor's stall is the time until it trains again (``resume_s``)."""
    out = []
    for (strategy, run), job in jobs.items():
        if strategy == FT or run != "faults" or "error" in job:
            continue
        free = jobs.get((strategy, "free"))
        if free is None or "error" in free:
            continue
        kills = job["kills"]
        fin, fin_free = _final(job), _final(free)
        out.append(
            {
                "row": f"{strategy} torchrun-restart" if strategy != "ddp" else "ddp+ModelCheckpoint",
                "strategy": strategy,
                "run": run,
                "kills": len(kills),
                "wall_s": job["wall_s"],
                "train_wall_s": _train_wall(job),
                "throughput_kept": _train_wall(free) / _train_wall(job),
                "throughput_kept_launch": free["wall_s"] / job["wall_s"],
                "final_val_loss": fin["final_val_loss"],
                **_given("final_val_bpb", fin["final_val_bpb"]),
                "loss_vs_free": fin["final_val_loss"] / fin_free["final_val_loss"],
                "weights_agree": fin["weights_agree"],
                "stall_death_median_s": _median([k["resume_s"] for k in kills]),
                "stall_death_max_s": _max([k["resume_s"] for k in kills]),
                "restart_to_train_median_s": _median([k["resume_s"] - k["new_worker_s"] for k in kills]),
                "restart_to_train_max_s": _max([k["resume_s"] - k["new_worker_s"] for k in kills]),
                "steps_redone": sum(k["steps_lost"] or 0 for k in kills),
                "heal_bytes_sent": fin["recovery_bytes"],
            }
        )
    return out


def print_ft_table(rows: list[dict[str, Any]]) -> None:
    """The fault-tolerant rows beside the torchrun rows, in one table (``--task lm``: with the final
    validation loss in bits per byte)."""
    bpb = any("final_val_bpb" in r for r in rows)
    head = (
        f"{'row':<30} {'kills':>5} {'wall s':>7} {'train s':>7} {'kept':>6} {'val loss':>8} {'vs free':>7} "
        + (f"{'val bpb':>7} " if bpb else "")
        + f"{'stall med':>9} {'max':>6} {'rejoin med':>10} {'max':>6} {'restart->train med':>18} {'max':>6} "
        f"{'not comm.':>9} {'work':>5} {'heal MB':>8} {'recv MB':>8} {'same w':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['row']:<30} FAILED: {r['error'][:300]}")
            continue
        heal, recv = r.get("heal_bytes_sent"), r.get("heal_bytes_received")
        lines.append(
            f"{r['row']:<30} {r['kills']:>5} {r['wall_s']:>7.1f} {r['train_wall_s']:>7.1f} "
            f"{_fmt(r.get('throughput_kept'), '.3f'):>6} "
            f"{r['final_val_loss']:>8.4f} {_fmt(r.get('loss_vs_free'), '.3f'):>7} "
            + (f"{_fmt(r.get('final_val_bpb'), '.4f'):>7} " if bpb else "")
            + f"{_fmt(r.get('stall_death_median_s'), '.2f'):>9} {_fmt(r.get('stall_death_max_s'), '.2f'):>6} "
            f"{_fmt(r.get('stall_rejoin_median_s'), '.2f'):>10} {_fmt(r.get('stall_rejoin_max_s'), '.2f'):>6} "
            f"{_fmt(r.get('restart_to_train_median_s'), '.1f'):>18} {_fmt(r.get('restart_to_train_max_s'), '.1f'):>6} "
            f"{_fmt(r.get('rounds_not_committed'), 'd'):>9} {_fmt(r.get('work_kept'), '.2f'):>5} {_fmt(heal / 1e6 if heal else None, '.3f'):>8} {_fmt(recv / 1e6 if recv else None, '.3f'):>8} "
            f"{'yes' if r.get('weights_agree') else 'NO':>6}"
        )
    lines.append(
        "wall s: launch -> the steps are done (ft: the last group's fit ends; torchrun: every agent exited); train s: "
        "the first worker's train start -> the last fit's end; kept: failure-free train s / this run's (same steps); "
        "vs free: final validation loss / the same strategy's failure-free run; stall: the survivors' extra "
        "seconds at their first sync after a death vs their median sync step (torchrun rows: kill -> the "
        "restarted job's first step, every worker restarts); rejoin: the survivors' extra seconds at the sync "
        "where the restarted group joins and heals; restart->train: the new process starts -> its first "
        "committed sync (torchrun rows: new workers -> first step); not comm.: rounds not committed (any group); work: the share of the groups' rounds that counted in a "
        "committed average (the failure-free run's start-up included); "
        "heal MB: CommStats purpose 'heal', bytes sent, all lives and groups (torchrun rows: checkpoint bytes, if "
        "counted); recv MB: what the healed groups received (the start-up's heals included)"
        + ("; val loss: nats per byte of text (lm), val bpb: the same in bits per byte" if bpb else "")
    )
    print("\n".join(lines))


def plot_ft(
    jobs: dict[tuple[str, str], dict[str, Any]], path: Path, title: str, ylabel: str = "validation loss"
) -> None:
    """Validation loss vs seconds since launch, one panel per faulty fault-tolerant run (the
    failure-free run in each as the reference); kills as vertical lines, the restarted group
    training again as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    free = jobs.get((FT, "free"))
    faulty = [j for (s, r), j in jobs.items() if s == FT and r != "free" and "error" not in j]
    panels = faulty or ([free] if free is not None and "error" not in free else [])
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.3), squeeze=False)
    for ax, job in zip(axes.flat, panels):
        for j, color, label in ((free, "C0", "no failure"), (job, "C3", job["run"])):
            if j is None or "error" in j or (j is free and job is free and color == "C3"):
                continue
            rs = j["rows"]
            ax.plot(
                [r["train_seconds"] for r in rs],
                [r["val_loss"] for r in rs],
                color=color,
                marker="o",
                markersize=2.5,
                linewidth=1,
                label=f"{label} (all groups' validations)",
            )
        if job is not free:
            for n, f in enumerate(job.get("failures", [])):
                ax.axvline(
                    f["train_time_s"],
                    color="C3",
                    alpha=0.35,
                    linewidth=1,
                    label=None if n else "SIGKILL a group",
                )
                if f["restart_to_train_s"] is not None and f["restart_s"] is not None:
                    back = f["train_time_s"] + f["restart_s"] + f["restart_to_train_s"]
                    ax.axvline(
                        back,
                        color="C2",
                        alpha=0.35,
                        linewidth=1,
                        linestyle=":",
                        label=None if n else "it trains again",
                    )
        ax.set_title(f"{FT}: {job['run']} ({len(job.get('injected', []))} kills)")
        ax.set_xlabel("seconds since the first group started training")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, int(16 * 5.8 * len(panels))), fontsize=9)  # fits the panels
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 steps, one failure")
    p.add_argument(
        "--task",
        choices=TASKS,
        default="digits",
        help="what every row trains: the digits MLP, or examples/lm.py's byte-level GPT at benchmarks/lm.py's "
        "size on the standard library's text (loss in nats per byte, and bits per byte)",
    )
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
    p.add_argument(
        "--step-sleep",
        type=float,
        default=0.0,
        help="seconds added to every step of every row (a heavier step: a run long enough for chaos)",
    )
    ft = p.add_argument_group("fault-tolerant rows (DiLoCoStrategy(fault_tolerance='torchft'))")
    ft.add_argument(
        "--ft",
        action="store_true",
        help=f"add the {FT} rows: failure-free and the kill schedule (and --chaos)",
    )
    ft.add_argument(
        "--chaos",
        default="",
        help="comma-separated K: a run per K in which one group is SIGKILLed every K seconds (implies --ft)",
    )
    ft.add_argument(
        "--ft-only", action="store_true", help="skip the torchrun rows (same as --strategies none)"
    )
    ft.add_argument("--groups", type=int, default=None, help="replica groups (default: --nodes)")
    ft.add_argument("--ft-sync-every", type=int, default=32, help="DiLoCo's H (the torchrun diloco row's)")
    ft.add_argument("--ft-heartbeat-ms", type=int, default=1000, help="lighthouse heartbeat timeout")
    ft.add_argument("--ft-quorum-tick-ms", type=int, default=50)
    ft.add_argument(
        "--ft-join-timeout-ms",
        type=int,
        default=30000,
        help="the lighthouse's wait for heartbeating stragglers (launcher default 1000: see benchmarks/README.md)",
    )
    ft.add_argument("--ft-max-restarts", type=int, default=1000, help="launcher restarts per group")
    args = p.parse_args(argv)
    args.steps = args.steps or (200 if args.quick else 600)
    args.val_every = args.val_every or (20 if args.quick else 25)
    args.kill_every = args.kill_every or (args.steps // 2 if args.quick else 150)
    try:
        args.chaos = [float(k) for k in args.chaos.split(",") if k.strip()]
    except ValueError:
        p.error(f"--chaos takes seconds, comma-separated, got {args.chaos!r}")
    if any(k <= 0 for k in args.chaos):
        p.error("--chaos: every K must be > 0")
    args.ft = args.ft or bool(args.chaos) or args.ft_only
    args.groups = args.groups or args.nodes
    if args.groups < 2:
        p.error("--groups must be >= 2 (a failure needs a survivor)")
    if args.ft_only or args.strategies.strip().lower() == "none":
        args.strategies = ""
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {STRATEGIES}")
    return args


def _run_ft(
    args: argparse.Namespace, kills: list[int], logs: Path, jobs: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """The fault-tolerant rows: failure-free, the kill schedule, then one chaos run per K."""
    runs: list[tuple[str, float | None]] = [("free", None), ("faults", None)]
    runs += [(f"chaos{k:g}", k) for k in args.chaos]
    for run, chaos in runs:
        t = time.time()
        try:
            job = run_ft_job(run, args, logs / f"{FT}_{run}", kills, chaos)
        except Exception as exc:  # one broken run should not lose the others
            job = {"strategy": FT, "run": run, "error": f"{type(exc).__name__}: {exc}"}
            print(f"  {FT}/{run}: FAILED {job['error'][:2000]}", flush=True)
        jobs[(FT, run)] = job
        if "error" not in job:
            fails = _ft_failures(job)
            print(
                f"  {FT:<10} {run:<9} {time.time() - t:6.1f} s (steps done at {job['wall_s']:.1f} s), final val "
                f"loss {_final_ft(job):.4f}, {len(job['injected'])} kills"
                + "".join(
                    f"; g{f['victim_group']}@{f['time_s']:.0f}s stall {_fmt(f['stall_death_s'], '.2f')} "
                    f"back {_fmt(f['restart_to_train_s'], '.1f')}"
                    for f in fails[:12]
                ),
                flush=True,
            )


def _write_ft(
    args: argparse.Namespace,
    jobs: dict[tuple[str, str], dict[str, Any]],
    summary: list[dict[str, Any]],
    kills: list[int],
) -> None:
    """``<name>_ft.csv`` (validations), ``_ft_failures.csv``, ``_ft_summary.csv``, ``_ft.png``."""
    args.out.mkdir(parents=True, exist_ok=True)
    ok = [j for j in jobs.values() if "error" not in j]
    base = args.out / f"{args.name}_ft"
    write_csv(Path(f"{base}.csv"), [r for j in ok for r in j["rows"]])
    write_csv(Path(f"{base}_failures.csv"), [f for j in ok for f in j.get("failures", [])])
    write_csv(Path(f"{base}_summary.csv"), summary)
    chaos = ", ".join(f"every {k:g} s" for k in args.chaos) or "none"
    plot_ft(
        jobs,
        Path(f"{base}.png"),
        f"{FT} on {TASK_TITLES[args.task]}: {args.groups} replica groups (one CPU process each, lighthouse + "
        f"launcher restarts), {args.steps} steps, +{args.step_sleep:g} s/step; kills at steps {kills}; chaos: {chaos}",
        TASK_YLABELS[args.task],
    )
    print(f"wrote {base}.csv, _failures.csv, _summary.csv, .png", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Run every strategy without and with failures; print the table, write CSVs and the PNG."""
    args = parse_args(argv)
    kills = kill_steps(args.steps, args.kill_every, args.seed)
    runs = ["free", "faults", *(["lose_node"] if args.lose_node else [])]
    logs = args.out / "logs" / args.name
    logs.mkdir(parents=True, exist_ok=True)
    print(
        f"{TASK_TITLES[args.task]}: "
        f"{len(args.strategies)} strategies x {runs}, {args.nodes} nodes (min {args.min_nodes}), "
        f"{args.steps} steps, failures at steps {kills}"
        + (f", step sleep {args.step_sleep} s" if args.step_sleep else "")
        + (
            f"; {FT}: {args.groups} replica groups x free, faults"
            + "".join(f", chaos every {k:g} s" for k in args.chaos)
            if args.ft
            else ""
        ),
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
    if args.ft:
        _run_ft(args, kills, logs, jobs)
    tr_jobs = {k: j for k, j in jobs.items() if k[0] != FT}
    ft_jobs = {k: j for k, j in jobs.items() if k[0] == FT}
    if tr_jobs:
        summary = summarize(tr_jobs)
        print()
        print_table(summary)
    if ft_jobs:
        ft_summary = summarize_ft(ft_jobs) + _torchrun_rows(tr_jobs)
        print()
        print_ft_table(ft_summary)
        _write_ft(args, ft_jobs, ft_summary, kills)
    print(f"\n{time.time() - t_all:.0f} s in all")
    if not tr_jobs:
        return
    jobs = tr_jobs
    args.out.mkdir(parents=True, exist_ok=True)
    ok = [j for j in jobs.values() if "error" not in j]
    write_csv(args.out / f"{args.name}.csv", [r for j in ok for r in j["rows"]])
    write_csv(args.out / f"{args.name}_kills.csv", [k for j in ok for k in j["kills"]])
    write_csv(args.out / f"{args.name}_summary.csv", summary)
    plot(
        jobs,
        args.out / f"{args.name}.png",
        f"{TASK_TITLES[args.task]}: {args.nodes} torchrun agents (min {args.min_nodes}), one CPU worker each, "
        f"{args.steps} steps; vertical lines: kill -9 (steps {kills})",
        TASK_YLABELS[args.task],
    )
    print(f"wrote {args.out / args.name}.csv, _kills.csv, _summary.csv, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
