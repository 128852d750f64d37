"""One replica group of tests/test_torchft.py: a toy DiLoCo loop over ManagedCommunicator.

The model is one float64 vector ``w`` (the global weights) with an outer SGD with Nesterov momentum
``m``. A round: ``H`` local SGD steps from ``w`` on this group's targets (deterministic in the
group id, the round's step and the local step), a quorum, a managed mean of the pseudo-gradient
``w - local`` (with a one-hot mask of the group id, so the log says who contributed), the commit
vote, then the outer step only when committed (else a rollback: ``w`` untouched). A group that
healed at the quorum contributes nothing (its local steps were from a state it no longer has).

Environment (besides the launcher's REPLICA_GROUP_ID, TORCHFT_LIGHTHOUSE, LIGHTNING_FEDOPT_FT_*):
  FTW_OUT: folder for ``group<id>.jsonl`` (one JSON line per start, round and end)
  FTW_ROUNDS: stop after this many committed rounds ...
  FTW_END_PARTICIPANTS: ... and a committed round with at least this many contributing groups
    (the same decision in every group: they stop together)
  FTW_H: local steps per round;  FTW_STEP_SLEEP: seconds of "compute" per local step
  FTW_KILL_GROUP, FTW_KILL_AT_STEP: on its first start, that group SIGKILLs itself in the middle
    of its local steps towards that step's round (between syncs)
  FTW_DIE_GROUP, FTW_DIE_AFTER_QUORUM, FTW_DIE_PARTICIPANTS: on its first start, that group
    SIGKILLs itself right after the quorum (before the all-reduce) of the first round at or after
    this step whose quorum and the previous one had at least that many groups
  FTW_TIMEOUT: torchft's operation timeout (s);  FTW_QUORUM_TIMEOUT: quorum timeout (s)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import types
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DIM = 16
MAX_GROUPS = 8
LR = 0.1
OUTER_LR = 0.7
MOMENTUM = 0.9


def target(group: int, step: int, local_step: int) -> torch.Tensor:
    """Group ``group``'s target at local step ``local_step`` of the round at ``step``."""
    gen = torch.Generator().manual_seed(1_000_003 * (group + 1) + 1009 * step + local_step)
    return torch.randn(DIM, generator=gen, dtype=torch.float64)


def initial_weights() -> torch.Tensor:
    return torch.randn(DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def local_steps(
    w: torch.Tensor, group: int, step: int, h: int, sleep: float = 0.0, on_step: Any = None
) -> torch.Tensor:
    """``h`` SGD steps on ``0.5 |x - target|^2`` from ``w`` (``on_step(s)`` after each)."""
    x = w.clone()
    for s in range(h):
        x -= LR * (x - target(group, step, s))
        if sleep:
            time.sleep(sleep)
        if on_step is not None:
            on_step(s)
    return x


def outer_step(w: torch.Tensor, m: torch.Tensor, avg: torch.Tensor) -> None:
    """Nesterov SGD on the averaged pseudo-gradient, in place."""
    m.mul_(MOMENTUM).add_(avg)
    w.sub_(OUTER_LR * (avg + MOMENTUM * m))


def replay(rounds: list[tuple[int, list[int]]], h: int) -> torch.Tensor:
    """The global weights after the committed ``(step, contributor ids)`` rounds, computed serially."""
    w, m = initial_weights(), torch.zeros(DIM, dtype=torch.float64)
    for step, groups in rounds:
        if not groups:
            raise AssertionError(f"committed round at step {step} had no contributor")
        pgs = [w - local_steps(w, g, step, h) for g in groups]
        outer_step(w, m, torch.stack(pgs).mean(0))
    return w


def _light_import() -> Any:
    """Import the torchft module without running ``lightning_fedopt/__init__`` (Lightning and every
    strategy: seconds per process); the package's own modules it uses are plain."""
    if "lightning_fedopt" not in sys.modules:
        pkg = types.ModuleType("lightning_fedopt")
        pkg.__path__ = [os.path.join(ROOT, "lightning_fedopt")]
        sys.modules["lightning_fedopt"] = pkg
    from lightning_fedopt.fault_tolerance import _torchft as ft

    return ft


def main() -> None:
    t_start = time.time()
    out = os.environ["FTW_OUT"]
    rid = int(os.environ["REPLICA_GROUP_ID"])
    restarts = int(os.environ.get("LIGHTNING_FEDOPT_FT_RESTARTS", "0"))
    rounds = int(os.environ.get("FTW_ROUNDS", "8"))
    end_participants = int(os.environ.get("FTW_END_PARTICIPANTS", "1"))
    h = int(os.environ.get("FTW_H", "4"))
    sleep = float(os.environ.get("FTW_STEP_SLEEP", "0.03"))
    die_at = int(os.environ.get("FTW_DIE_AFTER_QUORUM", "-1"))
    die_group = int(os.environ.get("FTW_DIE_GROUP", "-1"))
    die_participants = int(os.environ.get("FTW_DIE_PARTICIPANTS", "1"))
    kill_group = int(os.environ.get("FTW_KILL_GROUP", "-1"))
    kill_step = int(os.environ.get("FTW_KILL_AT_STEP", "-1"))
    previous = 0  # participants of the previous round
    rank = int(os.environ.get("RANK", "0"))  # inside a group of several processes (torchrun)
    path = os.path.join(out, f"group{rid}.jsonl" if rank == 0 else f"group{rid}rank{rank}.jsonl")

    def emit(**kw: Any) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({**kw, "group": rid, "pid": os.getpid(), "time": time.time()}) + "\n")

    ft = _light_import()
    w, m = initial_weights(), torch.zeros(DIM, dtype=torch.float64)

    def load(state: dict[str, torch.Tensor]) -> None:
        w.copy_(state["w"])
        m.copy_(state["m"])

    comm = ft.ManagedCommunicator.from_env(
        state_dict=lambda: {"w": w, "m": m},
        load_state_dict=load,
        min_replica_size=1,
        timeout=float(os.environ.get("FTW_TIMEOUT", "5")),
        quorum_timeout=float(os.environ.get("FTW_QUORUM_TIMEOUT", "30")),
        connect_timeout=5.0,
    )
    emit(event="start", restarts=restarts, start_seconds=time.time() - t_start)
    while True:
        step = comm.manager.current_step()
        tl = time.perf_counter()

        def between_syncs(s: int, step: int = step) -> None:
            if rid == kill_group and restarts == 0 and step == kill_step and s == h // 2 - 1:
                emit(event="killed", step=step)
                os.kill(os.getpid(), signal.SIGKILL)

        local = local_steps(w, rid, step, h, sleep, between_syncs)
        t0 = time.perf_counter()
        info = comm.start_round()
        if (
            rid == die_group
            and restarts == 0
            and info.step >= die_at
            and min(info.participants, previous) >= die_participants
        ):
            emit(event="suicide", step=info.step)
            os.kill(os.getpid(), signal.SIGKILL)
        previous = info.participants
        if info.healed or info.step != step:
            local = w.clone()  # the peer's state: nothing of ours to contribute (zero weight anyway)
        pg = w - local
        mask = torch.zeros(MAX_GROUPS, dtype=torch.float64)
        mask[rid] = 1.0
        t1 = time.perf_counter()
        handle = comm.all_reduce([pg, mask], "mean")
        reduced = handle.wait()
        t2 = time.perf_counter()
        committed = comm.commit()
        t3 = time.perf_counter()
        contributors = (
            [i for i, v in enumerate((mask * handle.contributors).tolist()) if round(v) == 1]
            if reduced and handle.contributors
            else []
        )
        if committed:
            outer_step(w, m, pg)
        emit(
            event="round",
            step=info.step,
            quorum_id=info.quorum_id,
            participants=info.participants,
            index=info.index,
            healed=info.healed,
            healed_from_step=info.healed_from_step,
            heal_bytes=info.heal_bytes,
            heal_fetch_seconds=info.heal_fetch_seconds,
            errored=info.errored,
            reduced=reduced,
            contributors=contributors,
            committed=committed,
            quorum_s=info.seconds,
            allreduce_s=t2 - t1,
            commit_s=t3 - t2,
            sync_s=t3 - t0,
            local_s=t0 - tl,
        )
        if committed and info.step + 1 >= rounds and len(contributors) >= end_participants:
            break
    emit(
        event="end",
        step=comm.manager.current_step(),
        w=w.numpy().tobytes().hex(),
        m=m.numpy().tobytes().hex(),
        stats=comm.stats.state_dict(),
    )
    comm.close()


if __name__ == "__main__":
    main()
