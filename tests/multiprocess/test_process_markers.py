"""The run-time guard of the ``multiprocess`` marker with real processes: every way of starting one is
counted, and in a pytest run of its own (tests/conftest.py and tests/process_guard.py on a small
tree) a test outside multiprocess/ that starts a process fails, naming the rule, while the same test
under multiprocess/ passes."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

from process_guard import processes_started

TESTS = Path(__file__).resolve().parents[1]

STARTS_A_PROCESS = """
import subprocess
import sys


def test_starts_a_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


def test_every_way_of_starting_a_process_is_counted():
    before = processes_started()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert processes_started() > before

    before = processes_started()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os._exit(0)
    os.waitpid(pid, 0)
    assert processes_started() > before

    for method in ("fork", "spawn"):  # spawn raises no audit event: Process.start is counted
        before = processes_started()
        proc = multiprocessing.get_context(method).Process(target=os.getpid)
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0 and processes_started() > before


def test_a_test_outside_multiprocess_that_starts_a_process_fails(tmp_path):
    tests = tmp_path / "tests"
    for folder in ("unit", "multiprocess"):
        (tests / folder).mkdir(parents=True)
        (tests / folder / "__init__.py").write_text("")
        (tests / folder / "test_starts.py").write_text(STARTS_A_PROCESS)
    for helper in ("conftest.py", "process_guard.py"):
        shutil.copy(TESTS / helper, tests / helper)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    multiprocess: starts real processes\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args, "tests"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    everything = run()
    assert everything.returncode == 1, everything.stdout + everything.stderr
    assert "1 failed, 1 passed" in everything.stdout, everything.stdout
    assert "FAILED tests/unit/test_starts.py::test_starts_a_process" in everything.stdout
    assert "not marked `multiprocess`" in everything.stdout and "tests/multiprocess/" in everything.stdout

    fast = run("-m", "not multiprocess")
    assert "1 failed, 1 deselected" in fast.stdout, fast.stdout
