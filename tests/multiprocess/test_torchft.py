"""Fault tolerance across replica groups on torchft: quorum, managed all-reduce, commit, heal.

The process tests run the launcher (``lightning_fedopt/fault_tolerance/launch.py``: a lighthouse on
127.0.0.1 and 3 replica groups of one process each) around ``tests/scripts/torchft_worker.py``, a
toy DiLoCo loop over :class:`ManagedCommunicator`. Each group logs every round (participants,
contributors, healed, committed, seconds); the checks replay the committed rounds serially and
compare with every group's final weights, so a round applied from a partial or double-counted
average, or a rolled-back round applied anyway, would show.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from torchft_helpers import dead_lighthouse_check

pytest.importorskip("torchft")


TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
LAUNCH = ROOT / "lightning_fedopt" / "fault_tolerance" / "launch.py"
WORKER = TESTS / "scripts" / "torchft_worker.py"

sys.path.insert(0, str(TESTS / "scripts"))
import torchft_worker as worker  # noqa: E402

H = 4


@pytest.mark.multiprocess
def test_a_dead_lighthouse_is_a_clear_error_within_the_quorum_timeout(tmp_path: Path) -> None:
    """``torchft_lighthouse`` in its own process, killed with -9 between two rounds."""
    here = Path(sys.executable).parent / "torchft_lighthouse"  # not through a version manager's shim
    binary = str(here) if here.exists() else shutil.which("torchft_lighthouse")
    if binary is None:
        pytest.skip("torchft_lighthouse is not on PATH")
    port = _free_port()
    lighthouse = subprocess.Popen(
        [binary, "--bind", f"127.0.0.1:{port}", "--min_replicas", "1", "--quorum_tick_ms", "20"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, lighthouse)
        # the group runs in a spawned process: torchft's threads must not live in pytest's process,
        # which later tests fork (a fork with those threads alive can deadlock the child)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            got = pool.submit(dead_lighthouse_check, port, _free_port(), lighthouse.pid).result(timeout=90)
        assert "cannot reach the lighthouse" in got["unreachable"], got
        assert got["committed"] is True
        lighthouse.wait(timeout=10)
        assert "no quorum for replica group 0 at step 1" in got["after"], got
        print(f"\n[lighthouse killed] QuorumError after {got['elapsed']:.2f} s")
        assert got["elapsed"] < 3.0 + 2.0 + 2.0  # quorum + connect timeouts, and slack
    finally:
        if lighthouse.poll() is None:
            lighthouse.kill()
            lighthouse.wait()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the lighthouse did not start"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the launcher
def _launch(
    out: Path,
    args: list[str],
    command: list[str],
    env: dict[str, str],
    timeout: float,
    on_running: Any = None,
) -> tuple[int, str, list[dict[str, Any]]]:
    """Run the launcher; on a hang, SIGTERM it (it stops its groups), then SIGKILL it and the
    groups it started (their pids are in its events file)."""
    events = out / "events.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCH), "--events", str(events), *args, "--", *command],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    deadline = time.monotonic() + timeout
    try:
        if on_running is not None:
            on_running(proc, deadline)
        output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            for e in _read(events):
                if e.get("event") == "start":
                    try:
                        os.killpg(e["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            proc.communicate()
        raise
    return proc.returncode, output.decode(errors="replace"), _read(events)


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.multiprocess
def test_launcher_sets_the_environment_and_restarts_a_dying_group_a_bounded_number_of_times(
    tmp_path: Path,
) -> None:
    script = (
        # group 0 finishes after group 1 used its restarts (a group that dies after another finished
        # the run is not restarted)
        'import os,sys,time; g=os.environ["REPLICA_GROUP_ID"]; r=os.environ["LIGHTNING_FEDOPT_FT_RESTARTS"]; '
        'open(os.path.join(sys.argv[1], f"g{g}r{r}"), "w").write(os.environ["TORCHFT_LIGHTHOUSE"] + " " + '
        'os.environ["LIGHTNING_FEDOPT_FT_HOST"]); time.sleep(0 if g == "1" else 20); sys.exit(3 if g == "1" else 0)'
    )
    rc, output, events = _launch(
        tmp_path,
        ["--groups", "2", "--lighthouse-port", "0", "--max-restarts", "2"],
        [sys.executable, "-c", script, str(tmp_path)],
        {},
        timeout=30,
    )
    assert rc == 1, output
    assert sorted(p.name for p in tmp_path.glob("g*")) == ["g0r0", "g1r0", "g1r1", "g1r2"]
    address = next(e["address"] for e in events if e["event"] == "lighthouse")
    assert address.startswith("http://127.0.0.1:")
    assert (tmp_path / "g1r2").read_text() == f"{address} 127.0.0.1"
    assert output.count("died (exit code 3)") == 3
    assert "restart 2/2 as pid" in output and "no restart left" in output


@pytest.mark.multiprocess
def test_launcher_does_not_restart_a_group_after_the_run_finished(tmp_path: Path) -> None:
    """A group that dies after another group finished the run is not restarted: alone, it would
    form a quorum of one and train a whole new run."""
    script = (
        'import os,sys,time; g=os.environ["REPLICA_GROUP_ID"]; time.sleep(0 if g == "0" else 2); '
        'sys.exit(0 if g == "0" else 3)'
    )
    rc, output, events = _launch(
        tmp_path,
        ["--groups", "2", "--lighthouse-port", "0", "--max-restarts", "2"],
        [sys.executable, "-c", script],
        {},
        timeout=30,
    )
    assert rc == 0, output
    assert "not restarted" in output and "restart 1/2" not in output
    assert [e["group"] for e in events if e["event"] == "start"] == [0, 1]


@pytest.mark.multiprocess
def test_launcher_forwards_sigterm_to_every_group(tmp_path: Path) -> None:
    script = (
        "import os,signal,sys,time; "
        "signal.signal(signal.SIGTERM, lambda *a: (open(os.path.join(sys.argv[1], 'term' + "
        "os.environ['REPLICA_GROUP_ID']), 'w').close(), sys.exit(0))); "
        "open(os.path.join(sys.argv[1], 'up' + os.environ['REPLICA_GROUP_ID']), 'w').close(); time.sleep(60)"
    )

    def stop_when_up(proc: subprocess.Popen[bytes], deadline: float) -> None:
        while len(list(tmp_path.glob("up*"))) < 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)

    rc, output, events = _launch(
        tmp_path,
        ["--groups", "3", "--lighthouse-port", "0", "--grace", "5"],
        [sys.executable, "-c", script, str(tmp_path)],
        {},
        timeout=30,
        on_running=stop_when_up,
    )
    assert rc == 128 + signal.SIGTERM, output
    assert sorted(p.name for p in tmp_path.glob("term*")) == ["term0", "term1", "term2"]
    assert "forwarding it to every replica group" in output
    for e in events:
        if e["event"] == "start":
            with pytest.raises(ProcessLookupError):
                os.kill(e["pid"], 0)


# --------------------------------------------------------------------------- three replica groups
def _logs(out: Path, groups: int = 3) -> dict[int, list[dict[str, Any]]]:
    return {g: _read(out / f"group{g}.jsonl") for g in range(groups)}


def _weights(hexed: str) -> torch.Tensor:
    return torch.frombuffer(bytearray.fromhex(hexed), dtype=torch.float64)


def _check_consistent(logs: dict[int, list[dict[str, Any]]]) -> list[tuple[int, list[int]]]:
    """Every group ends bit-identical; the committed rounds replay to the final weights; a group
    never contributes to the round it healed in. Returns the committed rounds."""
    ends = {g: [e for e in rows if e["event"] == "end"] for g, rows in logs.items()}
    assert all(len(e) == 1 for e in ends.values()), ends
    finals = {(e[0]["w"], e[0]["m"], e[0]["step"]) for e in ends.values()}
    assert len(finals) == 1, "the groups ended with different weights"
    committed: dict[int, list[int]] = {}
    for rows in logs.values():
        for r in rows:
            if r["event"] != "round":
                continue
            if r["healed"]:
                assert r["group"] not in r["contributors"], r
            if r["committed"]:
                assert r["reduced"] and r["contributors"], r
                # every group that committed a step saw the same contributors
                assert committed.setdefault(r["step"], r["contributors"]) == r["contributors"], r
    steps = sorted(committed)
    assert steps == list(range(len(steps))), f"committed steps have a gap: {steps}"
    rounds = [(s, committed[s]) for s in steps]
    w = _weights(next(iter(finals))[0])
    assert torch.allclose(worker.replay(rounds, H), w, rtol=0, atol=1e-12)
    return rounds


def _worker_env(out: Path, **extra: str) -> dict[str, str]:
    return {"FTW_OUT": str(out), "FTW_H": str(H), "FTW_STEP_SLEEP": "0.03", "FTW_TIMEOUT": "5", **extra}


FAST = ["--lighthouse-port", "0", "--heartbeat-timeout-ms", "1000", "--quorum-tick-ms", "50"]


@pytest.mark.multiprocess
def test_three_groups_without_failure_end_bit_identical(tmp_path: Path) -> None:
    rc, output, _ = _launch(
        tmp_path,
        ["--groups", "3", "--min-replicas", "3", "--max-restarts", "0", *FAST],
        [sys.executable, str(WORKER)],
        _worker_env(tmp_path, FTW_ROUNDS="6"),
        timeout=60,
    )
    assert rc == 0, output
    logs = _logs(tmp_path)
    rounds = _check_consistent(logs)
    # the first quorum syncs the initial state from one group (torchft's init_sync); then all three
    assert len(rounds[0][1]) == 1 and all(c == [0, 1, 2] for _, c in rounds[1:]), rounds
    assert len(rounds) == 6
    for rows in logs.values():
        assert all(r["committed"] for r in rows if r["event"] == "round")
        assert sum(r["healed"] for r in rows if r["event"] == "round") <= 1


def _pids(rows: list[dict[str, Any]]) -> list[int]:
    return [r["pid"] for r in rows if r["event"] == "start"]


@pytest.mark.multiprocess
def test_a_kill_between_syncs_and_a_death_in_the_round(tmp_path: Path) -> None:
    """Two failures in one run (each restart costs seconds of start-up on this machine):

    1. group 1 is ``kill -9``ed (by itself, to hit its local steps every time) in the middle of
       its local steps towards step 3: groups 0 and 2 keep their processes, form the next quorum
       without it and go on; its restart heals from a peer;
    2. once the three are together again (two quorums of 3 from step 8), group 0 (the primary:
       its store carries the cross-group process group) kills itself right after a quorum: the
       others' all-reduce fails, they vote not to commit and roll back, redo the step without it,
       and its restart heals.

    Every group ends bit-identical; the committed rounds replay to the final weights."""
    rc, output, events = _launch(
        tmp_path,
        ["--groups", "3", "--min-replicas", "2", "--join-timeout-ms", "3000", "--max-restarts", "1", *FAST],
        [sys.executable, str(WORKER)],
        _worker_env(
            tmp_path,
            FTW_ROUNDS="10",
            FTW_END_PARTICIPANTS="3",
            FTW_DIE_GROUP="0",
            FTW_DIE_AFTER_QUORUM="8",
            FTW_DIE_PARTICIPANTS="3",
            FTW_KILL_GROUP="1",
            FTW_KILL_AT_STEP="3",
        ),
        timeout=90,
    )
    assert rc == 0, output
    assert output.count("killed by SIGKILL") == 2 and output.count("restart 1/1 as pid") == 2, output
    logs = _logs(tmp_path)
    rounds = _check_consistent(logs)
    pids = {g: _pids(logs[g]) for g in logs}
    assert len(pids[2]) == 1 and {r["pid"] for r in logs[2]} == set(pids[2])  # never stopped
    assert len(pids[0]) == 2 and len(pids[1]) == 2
    killed = next(e for e in logs[1] if e["event"] == "killed")
    death = next(e for e in logs[0] if e["event"] == "suicide")
    # group 0 lived through the first failure: one process until it killed itself
    assert all(r["pid"] == pids[0][0] for r in logs[0] if r["time"] <= death["time"])

    # 1. the kill between syncs: no round lost, the restart healed and contributes from its next round
    after_kill = [r for r in logs[2] if r["event"] == "round" and r["step"] == killed["step"]]
    assert len(after_kill) == 1 and after_kill[0]["committed"] and after_kill[0]["participants"] == 2
    second1 = [r for r in logs[1] if r["pid"] == pids[1][1] and r["event"] == "round"]
    assert second1[0]["healed"] and second1[0]["healed_from_step"] == second1[0]["step"] >= killed["step"]
    # the response body: the tensors (2 of DIM float64) and the serialisation around them
    assert 2 * worker.DIM * 8 <= second1[0]["heal_bytes"] < 2 * worker.DIM * 8 + 4096
    assert 1 not in dict(rounds)[second1[0]["step"]] and 1 in dict(rounds)[second1[0]["step"] + 1]

    # 2. the death in the round: rolled back by both others, then the step redone without group 0
    step = death["step"]
    for g in (1, 2):
        failed = [r for r in logs[g] if r["event"] == "round" and not r["committed"]]
        assert [r["step"] for r in failed] == [step] and not failed[0]["reduced"], failed
    assert dict(rounds)[step] == [1, 2]
    second0 = [r for r in logs[0] if r["pid"] == pids[0][1] and r["event"] == "round"]
    assert second0[0]["healed"] and second0[0]["step"] > step and all(r["committed"] for r in second0)
    assert len(rounds[-1][1]) == 3

    _report("kill -9 between syncs", logs, [0, 2], 1, killed["step"], killed["time"], events)
    _report("death after a quorum (in the all-reduce)", logs, [1, 2], 0, step, death["time"], events)


def _report(
    title: str,
    logs: dict[int, list[dict[str, Any]]],
    survivors: list[int],
    victim: int,
    step: int,
    t: float,
    events: list[dict[str, Any]],
) -> None:
    """Print the numbers of the failure at time ``t`` in the round at ``step`` (``pytest -s``)."""
    rows = {g: [r for r in logs[g] if r["event"] == "round"] for g in survivors}
    before = sorted(r["sync_s"] for g in survivors for r in rows[g] if step - 10 <= r["step"] < step)
    at = {g: [r for r in rows[g] if r["step"] == step] for g in survivors}
    restart = next(e for e in events if e["event"] == "start" and e["group"] == victim and e["restart"] == 1)
    died = next(e for e in events if e["event"] == "exit" and e["group"] == victim)
    back = [r for r in logs[victim] if r["event"] == "round" and r["time"] > restart["time"]]
    started = next(r for r in logs[victim] if r["event"] == "start" and r["time"] > restart["time"])
    stats = {
        "survivor_sync_s_median_before": round(before[len(before) // 2], 4),
        "survivor_quorum_s_at_failure": {g: [round(r["quorum_s"], 3) for r in at[g]] for g in survivors},
        "survivor_sync_s_at_failure": {g: round(sum(r["sync_s"] for r in at[g]), 3) for g in survivors},
        "survivor_rounds_rolled_back": {g: sum(not r["committed"] for r in at[g]) for g in survivors},
        "launcher_saw_death_after_s": round(died["time"] - t, 3),
        "restart_to_first_committed_round_s": round(back[0]["time"] - restart["time"], 3),
        "of_which_process_start_s": round(started["time"] - restart["time"], 3),
        "heal_quorum_s": round(back[0]["quorum_s"], 3),
        "heal_fetch_s": round(back[0]["heal_fetch_seconds"], 4),
        "heal_bytes": back[0]["heal_bytes"],
    }
    print(f"\n[{title}] {json.dumps(stats)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s", "-q"]))
