"""A lost, stopped, slow or preempted replica, with real processes over gloo (3 ranks).

Each test runs ``tests/scripts/fault_worker.py`` as a job (Lightning's launcher, or ``torchrun``'s
elastic agent) in its own session, injects the failure from inside the victim rank at a fixed step
(``kill -9``, ``kill -STOP``, ``SIGTERM``, a pause longer than the deadline), and asserts what every
rank ended with: the library's error naming the lost rank within the deadline, or the run that
completes, compared bit for bit with the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks._agents import Agents

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "scripts" / "fault_worker.py"
TIMEOUT = 5.0  # the jobs' sync_timeout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(out: Path, *, torchrun: bool = False, limit: float = 150, **env: Any) -> int:
    """Run one job to its end (or ``limit`` seconds) and return the worst exit status; every
    process of it is gone afterwards. Without ``torchrun`` each rank is a process of its own, as
    on separate machines (Lightning's multi-node variables), so that a lost rank takes nobody with it
    (on one machine Lightning's launcher would terminate the whole job as soon as a child dies)."""
    out.mkdir(parents=True, exist_ok=True)
    base = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FT_OUT": str(out),
        "FT_TIMEOUT": str(TIMEOUT),
        **{k: str(v) for k, v in env.items()},
    }
    if torchrun:
        cmds = [[
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
            "--max-restarts=2", "--monitor-interval=0.5", str(WORKER),
        ]]  # fmt: skip
        envs = [base]
    else:
        port = _free_port()
        cmds = [[sys.executable, str(WORKER)]] * 3
        envs = [
            {
                **base,
                "NODE_RANK": str(r),
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            for r in range(3)
        ]
    procs = []
    end = time.monotonic() + limit
    try:
        for i, (cmd, e) in enumerate(zip(cmds, envs)):
            with open(out / f"log{i}.txt", "w") as log:
                procs.append(
                    subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                )
        codes = []
        for p in procs:
            if env.get("FT_MODE") == "stop" and procs.index(p) == env.get("FT_VICTIM"):
                continue  # the stopped one never ends by itself
            try:
                codes.append(p.wait(timeout=max(end - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the job did not end within {limit} s (a hang); logs in {out}")
        return max(codes, key=abs)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # the stopped victim and anything left behind
            p.wait()


def _log(out: Path) -> str:
    return "\n".join(f.read_text()[-3000:] for f in sorted(out.glob("log*.txt")))


def _ranks(out: Path, n: int = 3) -> dict[int, dict[str, Any]]:
    return {
        r: json.loads((out / f"rank{r}.json").read_text())
        for r in range(n)
        if (out / f"rank{r}.json").exists()
    }


def _injected(out: Path) -> dict[str, Any]:
    return json.loads((out / "events.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("strategy", ["local_sgd", "diloco"])
def test_killed_replica_gives_every_survivor_the_library_error(tmp_path: Path, strategy: str) -> None:
    _run(tmp_path, FT_STRATEGY=strategy, FT_MODE="kill", FT_VICTIM=2, FT_AT=6)
    ranks, kill = _ranks(tmp_path), _injected(tmp_path)
    assert sorted(ranks) == [0, 1]  # the victim wrote nothing: it was killed
    for r, res in ranks.items():
        assert res["type"] == "ReplicaLostError", (r, res)
        assert res["lost"] == [2], res
        assert "rank(s) 2" in res["message"] and "step" in res["message"]
        assert "gloo" not in res["message"].lower()
        assert res["time"] - kill["time"] <= TIMEOUT * 1.1, res["time"] - kill["time"]


def test_stopped_replica_is_noticed_within_the_deadline(tmp_path: Path) -> None:
    _run(tmp_path, FT_STRATEGY="local_sgd", FT_MODE="stop", FT_VICTIM=1, FT_AT=6)
    ranks, stop = _ranks(tmp_path), _injected(tmp_path)
    assert sorted(ranks) == [0, 2]
    for res in ranks.values():
        assert res["type"] == "ReplicaLostError" and res["lost"] == [1], res
        assert res["time"] - stop["time"] <= TIMEOUT * 1.1


def test_lost_rank_zero_is_named_as_the_store_host(tmp_path: Path) -> None:
    # rank 0 hosts Lightning's rendezvous store: the survivors see the store go and name rank 0
    _run(tmp_path, FT_STRATEGY="local_sgd", FT_MODE="kill", FT_VICTIM=0, FT_AT=6)
    ranks, kill = _ranks(tmp_path), _injected(tmp_path)
    assert sorted(ranks) == [1, 2]
    for res in ranks.values():
        assert res["type"] == "ReplicaLostError" and res["lost"] == [0], res
        assert res["time"] - kill["time"] <= TIMEOUT * 1.1


def test_a_pause_longer_than_the_deadline_between_syncs_is_not_a_failure(tmp_path: Path) -> None:
    # only the synchronisation is timed: a replica computing (here: sleeping) for 1.6 x the
    # deadline between two synchronisations keeps a live heartbeat, and the others wait for it
    rc = _run(tmp_path, FT_STRATEGY="diloco", FT_MODE="slow", FT_SLEEP=1.6 * TIMEOUT, FT_VICTIM=1, FT_AT=5)
    ranks = _ranks(tmp_path)
    assert rc == 0 and sorted(ranks) == [0, 1, 2]
    assert all(res["ok"] and res["step"] == 16 for res in ranks.values()), ranks
    assert len({res["digest"] for res in ranks.values()}) == 1


def test_sigterm_on_one_noloco_rank_stops_every_rank_after_the_same_sync(tmp_path: Path) -> None:
    # NoLoCo has no global meeting point: the request goes through the store, every rank stops
    # after the synchronisation two rounds ahead of the signalled rank's next one (steps 8 -> 16)
    rc = _run(tmp_path, FT_STRATEGY="noloco", FT_MODE="sigterm", FT_VICTIM=1, FT_AT=5, FT_STEPS=24)
    ranks = _ranks(tmp_path)
    assert rc == 0, _log(tmp_path)
    assert sorted(ranks) == [0, 1, 2]
    assert all(res["type"] == "SIGTERMException" and res["step"] == 16 for res in ranks.values()), ranks
    assert (tmp_path / "hpc_ckpt_1.ckpt").exists()


def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert _run(straight, FT_STRATEGY="diloco", FT_MODE="none") == 0
    want = _ranks(straight)

    pre = tmp_path / "preempted"
    t0 = time.time()
    rc = _run(pre, FT_STRATEGY="diloco", FT_MODE="sigterm", FT_VICTIM=1, FT_AT=5)
    ranks = _ranks(pre)
    assert rc == 0, _log(pre)
    # every rank learned of it at the rendezvous before the next synchronisation (step 8), ran
    # that synchronisation and stopped with Lightning's SIGTERMException (exit status 0)
    assert sorted(ranks) == [0, 1, 2]
    assert all(res["type"] == "SIGTERMException" and res["step"] == 8 for res in ranks.values()), ranks
    assert time.time() - t0 < 150
    checkpoint = pre / "hpc_ckpt_1.ckpt"
    assert checkpoint.exists() and all(
        (pre / f"hpc_ckpt_1.ckpt.replicas/rank{r}.pt").exists() for r in range(3)
    )

    # a later start resumes from it (Lightning's ckpt_path="hpc") and ends where the straight run ended
    (pre / "events.jsonl").unlink()
    for r in range(3):
        (pre / f"rank{r}.json").unlink()
    assert _run(pre, FT_STRATEGY="diloco", FT_MODE="none", FT_RESUME="hpc") == 0
    resumed = _ranks(pre)
    assert [resumed[r]["digest"] for r in range(3)] == [want[r]["digest"] for r in range(3)]


@pytest.mark.parametrize("strategy", ["local_sgd", "diloco", "noloco", "gossip"])
def test_elastic_run_survives_a_killed_replica_and_matches_the_uninterrupted_run(
    tmp_path: Path, strategy: str
) -> None:
    straight = tmp_path / "straight"
    assert _run(straight, torchrun=True, FT_STRATEGY=strategy, FT_ELASTIC=1, FT_MODE="none") == 0
    want = _ranks(straight)

    failed = tmp_path / "failed"
    rc = _run(failed, torchrun=True, FT_STRATEGY=strategy, FT_ELASTIC=1, FT_MODE="kill", FT_VICTIM=2, FT_AT=6)
    got = _ranks(failed)
    assert rc == 0, _log(failed)
    # the agent restarted the workers; they resumed from the checkpoint of the synchronisation at
    # step 4 (the round in progress is the work lost) and reached max_steps
    assert all(res["ok"] and res["attempt"] == "1" and res["step"] == 16 for res in got.values()), got
    assert "resuming from" in _log(failed)
    assert [got[r]["digest"] for r in range(3)] == [want[r]["digest"] for r in range(3)]
    assert len({res["digest"] for res in got.values()}) == 1
    # the finished run removed its sync points
    assert not any((failed / "elastic").glob("*/latest.json"))


def _agent_results(directory: Path) -> dict[int, dict[str, Any]]:
    return {
        int(p.stem.removeprefix("agent")): json.loads(p.read_text())
        for p in (directory / "results").glob("agent*.json")
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["local_sgd", "diloco"])
def test_a_node_that_joins_late_ends_identical_to_the_others(tmp_path: Path, strategy: str) -> None:
    # torchrun agents, --nnodes=2:3: two nodes start; a third joins while they train. Every agent
    # restarts its worker, the job resumes from the last sync point at world size 3, and the late
    # replica starts from the consensus (not from its own fresh initialisation)
    args = [
        "--strategy",
        strategy,
        "--dir",
        str(tmp_path),
        "--steps",
        "240",
        "--val-every",
        "48",
        "--sync-every",
        "8",
        "--step-sleep",
        "0.05",  # >= 11 s of training after the join starts: the job cannot end before the joiner arrives
    ]
    with Agents(
        Path(ROOT / "benchmarks" / "_elastic_worker.py"), args, tmp_path, nodes=2, min_nodes=2, max_nodes=3
    ) as job:
        job.wait_for_step(16, timeout=120)
        job.add_node()
        codes = job.wait(timeout=240)
    assert codes == [0, 0, 0], [job.log(i) for i in range(3)]
    results = _agent_results(tmp_path)
    assert sorted(results) == [0, 1, 2]
    assert all(r["world_size"] == 3 and r["steps"] == 240 for r in results.values()), results
    assert len({r["sha256"] for r in results.values()}) == 1


@pytest.mark.multiprocess
def test_a_lost_node_leaves_the_survivors_training(tmp_path: Path) -> None:
    # the whole node (agent and worker) of agent 2 is killed: the survivors' next synchronisation
    # raises ReplicaLostError, their agents re-form the job on 2 nodes, and it reaches max_steps
    args = [
        "--strategy",
        "diloco",
        "--dir",
        str(tmp_path),
        "--steps",
        "96",
        "--val-every",
        "48",
        "--sync-every",
        "8",
    ]
    with Agents(
        Path(ROOT / "benchmarks" / "_elastic_worker.py"), args, tmp_path, nodes=3, min_nodes=2, max_nodes=3
    ) as job:
        job.wait_for_step(20, timeout=120, every=True)
        job.kill_node(2)
        codes = job.wait(timeout=240)
    assert codes[:2] == [0, 0], [job.log(i) for i in range(2)]
    results = _agent_results(tmp_path)
    survivors = {i: results[i] for i in (0, 1)}
    assert all(r["world_size"] == 2 and r["steps"] == 96 for r in survivors.values()), survivors
    assert len({r["sha256"] for r in survivors.values()}) == 1
