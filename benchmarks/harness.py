"""What every benchmark shares: the names, a suite of rows, starting worker processes, CSV files.

A benchmark is a :class:`Suite` (its rows ``name -> (description, factory)`` and the module its
workers run) handed to :func:`benchmarks.compare.main`. This module is the bottom layer: it imports
no other benchmark module and neither torch nor Lightning, so that the runner process stays light.

* :func:`clean_env` / :func:`start` / :func:`wait_all` / :func:`run_command`: one worker process
  (or one per rank) with the repo root on ``PYTHONPATH``, one thread, and no inherited
  ``torch.distributed`` variables; a failed or hung run stops the others and raises with the tail
  of its log.
* :func:`write_csv`: one CSV whose columns are the union of the rows' keys, in first-seen order.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DEFAULT_OUT",
    "ONE_PROCESS",
    "ONE_PROCESS_LOCAL_SGD",
    "REFERENCES",
    "REFERENCE_DESCRIPTION",
    "REPO_ROOT",
    "SINGLE",
    "SINGLE_PAR",
    "WARMUP_STEPS_SKIPPED",
    "Row",
    "Suite",
    "clean_env",
    "read_summary",
    "run_command",
    "start",
    "tail",
    "wait_all",
    "write_csv",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
SINGLE = "single"  # one process alone
SINGLE_PAR = "single_par"  # N independent single processes at once: same CPU contention as N replicas
REFERENCES = (SINGLE, SINGLE_PAR)
ONE_PROCESS_LOCAL_SGD = "local_sgd_1proc"
ONE_PROCESS = (SINGLE, ONE_PROCESS_LOCAL_SGD)  # runs that use a single process even with --devices N
WARMUP_STEPS_SKIPPED = 10  # step-time statistics ignore the first steps of a run
REFERENCE_DESCRIPTION = {
    SINGLE: "one process alone, strategy='auto'",
    SINGLE_PAR: "N independent one-process runs at the same time (copy 0 reported)",
}

#: one row of a comparison: (description, factory of the strategy)
Row = tuple[str, Callable[[], Any]]

_DIST_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "GLOBAL_RANK",
    "RANK",
    "PL_GLOBAL_SEED",
    "GLOO_SOCKET_IFNAME",
)


@dataclasses.dataclass(frozen=True)
class Suite:
    """The rows one benchmark compares, and how its workers find them again.

    Args:
        strategies: ``name -> (description, factory)``, in the order of the default run.
        extra: rows runnable by name but not in the default run (they need more ranks, ...).
        model_kwargs: ``name -> DigitsClassifier keyword arguments`` a row sets itself (its
            optimizer, lr, ...) over the run's ``--hidden``/``--lr``.
        worker_module: the module a worker subprocess runs (``python -m <module> --worker <name>``);
            its ``main`` must build this same suite.
        quick: the ``--quick`` preset.
        outer: the ``--outer`` preset.
        prog: the program name in ``--help``.
        description: the first line of ``--help``.
    """

    strategies: Mapping[str, Row]
    extra: Mapping[str, Row] = dataclasses.field(default_factory=dict)
    model_kwargs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    worker_module: str = "benchmarks.run"
    quick: tuple[str, ...] = ()
    outer: tuple[str, ...] = ()
    prog: str = "python -m benchmarks.run"
    description: str = ""

    def row(self, name: str) -> Row:
        """The row ``name`` of :attr:`strategies` or :attr:`extra` (``KeyError`` if neither has it)."""
        return self.strategies[name] if name in self.strategies else self.extra[name]

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a row of this suite or one of the :data:`REFERENCES`."""
        return name in self.strategies or name in self.extra or name in REFERENCES

    def extended(
        self,
        strategies: Mapping[str, Row] | None = None,
        *,
        extra: Mapping[str, Row] | None = None,
        model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        worker_module: str | None = None,
    ) -> Suite:
        """A copy with more rows (appended in order) and, if given, another worker module."""
        return dataclasses.replace(
            self,
            strategies={**self.strategies, **(strategies or {})},
            extra={**self.extra, **(extra or {})},
            model_kwargs={**self.model_kwargs, **(model_kwargs or {})},
            worker_module=worker_module or self.worker_module,
        )


# ====================================================================== processes
def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``torch.distributed`` variables, repo on ``PYTHONPATH``,
    one OpenMP thread; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def tail(path: Path, n: int = 30) -> str:
    """The last ``n`` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


#: a started process, the handle of its log file, the log's path
Started = tuple[Any, IO[str], Path]


def start(cmd: Sequence[str], env: Mapping[str, str], log: Path, net: Any = None, rank: int = 0) -> Started:
    """Start ``cmd`` in the repo root with its output in ``log`` (in ``net``'s namespace ``rank``
    if ``net`` is a :class:`benchmarks.netns.Network`)."""
    fh = open(log, "w")  # closed by wait_all
    kwargs: dict[str, Any] = {"env": dict(env), "cwd": REPO_ROOT, "stdout": fh, "stderr": subprocess.STDOUT}
    proc = net.popen(rank, list(cmd), **kwargs) if net is not None else subprocess.Popen(list(cmd), **kwargs)
    return proc, fh, log


def wait_all(name: str, procs: list[Started], timeout: float) -> None:
    """Wait for every process of one run; on a failure or timeout stop the others and raise."""
    try:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p, _, _ in procs):
            failed = [(p, log) for p, _, log in procs if p.poll() not in (None, 0)]
            if failed:
                p, log = failed[0]
                raise RuntimeError(f"{name} failed (exit {p.returncode}); log {log}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} timed out after {timeout}s; logs in {procs[0][2].parent}")
            time.sleep(0.1)
        for p, _, log in procs:
            if p.returncode != 0:
                raise RuntimeError(f"{name} failed (exit {p.returncode}); log {log}:\n{tail(log)}")
    finally:
        for p, fh, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            fh.close()


def run_command(name: str, module: str, args: Sequence[str], log: Path, timeout: float) -> None:
    """``python -m module *args`` in a clean environment (:func:`clean_env`), output in ``log``;
    raises with the log's tail if it fails or runs past ``timeout`` seconds."""
    wait_all(name, [start([sys.executable, "-m", module, *args], clean_env(), log)], timeout)


# ====================================================================== outputs
def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as CSV, the columns the union of their keys in first-seen order; nothing if empty."""
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    """A ``<name>_summary.csv`` the runner wrote: ``strategy -> row`` (values as strings)."""
    with open(path, newline="") as fh:
        return {row["strategy"]: row for row in csv.DictReader(fh)}
