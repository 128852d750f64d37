"""The ``multiprocess`` marker: every test module is classified, the reading of a test's source
follows its helpers, and the run-time guard counts processes and fails an unmarked test that starts one."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from process_markers import TESTS, process_tests, processes_started, pytest_runtest_call

#: modules with tests that start processes (each module of tests/ is in exactly one of the two sets)
PROCESS_MODULES = {
    "test_checkpoint_eval",
    "test_sparseloco",
    "test_torchft",
    "test_choco",
    "test_co2",
    "test_comm",
    "test_compressed_comm",
    "test_compressed_strategies",
    "test_curriculum",
    "test_diloco",
    "test_fedspeed",
    "test_gossip",
    "test_hard_batch",
    "test_heterogeneous",
    "test_hierarchical",
    "test_kernels",
    "test_launchers",
    "test_lm_example",
    "test_local_sgd",
    "test_local_sgd_merge",
    "test_monitor",
    "test_noloco",
    "test_outer_resume",
    "test_process_markers",
    "test_recipes",
    "test_replica_selection",
    "test_replica_shards",
    "test_trust",
    "test_failures",
}
SINGLE_PROCESS_MODULES = {
    "test_fuzz_arguments",
    "test_plan",
    "test_runtime_parts",
    "test_project",
    "test_compression",
    "test_dimat",
    "test_example_model",
    "test_layering",
    "test_merging",
    "test_pacing",
    "test_partition",
    "test_robust",
    "test_schedules",
    "test_topology",
}


def test_every_test_module_is_classified():
    """A new test module goes into one of the sets above; the reading of its source must agree (a
    module of process tests in which none is found means a launcher the reading does not know)."""
    modules = {p.stem for p in TESTS.glob("test_*.py")}
    assert not PROCESS_MODULES & SINGLE_PROCESS_MODULES
    unlisted = modules - PROCESS_MODULES - SINGLE_PROCESS_MODULES
    assert not unlisted, f"add {sorted(unlisted)} to PROCESS_MODULES or SINGLE_PROCESS_MODULES"
    found = {m for m in modules if process_tests(TESTS / f"{m}.py")}
    assert found == PROCESS_MODULES & modules


SOURCE = """
import subprocess

import lightning as L
import pytest
import torch.multiprocessing as mp
from runners import fit_fork, trainer_kwargs
from reference_outer import run_and_resume


def _script(args):
    return subprocess.run(args)


def _strategy():
    return object(start_method="spawn")


@pytest.fixture
def scripted():
    return _script(["true"])


def test_fit_fork(tmp_path):
    fit_fork(tmp_path, None, None)

def test_helper_runs_a_script():
    _script(["true"])

def test_fixture_runs_a_script(scripted):
    pass

def test_through_another_helper_module(tmp_path):
    run_and_resume(tmp_path, None, None, total=4, at=2)

def test_local_import():
    from runners import fit_fork as launch
    launch()

def test_start_processes():
    mp.start_processes(print, nprocs=2)

def test_default_trainer_kwargs_are_two_devices(model):
    L.Trainer(**trainer_kwargs(max_steps=2)).fit(model)

def test_start_method(model):
    L.Trainer(strategy=_strategy(), devices=1).validate(model)

def test_forking_strategy_name(model):
    L.Trainer(strategy="local_sgd_fork", devices=1).fit(model)

class TestGrouped:
    def test_in_a_class(self, tmp_path):
        fit_fork(tmp_path, None, None)

    def test_pure_in_a_class(self):
        assert True

def test_one_device(model):
    L.Trainer(**trainer_kwargs(devices=1, max_steps=2)).fit(model)

def test_two_devices_but_nothing_runs():
    L.Trainer(devices=2, strategy="ddp_fork")

def test_strategy_built_but_not_run():
    _strategy()

def test_pure():
    assert 1 + 1 == 2
"""


def test_the_reading_follows_helpers_fixtures_and_trainer_arguments(tmp_path):
    path = tmp_path / "test_synthetic.py"
    path.write_text(textwrap.dedent(SOURCE))
    assert process_tests(path) == [
        "test_fit_fork",
        "test_helper_runs_a_script",
        "test_fixture_runs_a_script",
        "test_through_another_helper_module",
        "test_local_import",
        "test_start_processes",
        "test_default_trainer_kwargs_are_two_devices",
        "test_start_method",
        "test_forking_strategy_name",
        "TestGrouped.test_in_a_class",
    ]


def test_marks_follow_the_reading(request):
    """The collected items of this module carry the marker exactly when the reading finds processes."""
    reading = set(process_tests(Path(__file__)))
    assert "test_every_way_of_starting_a_process_is_counted" in reading
    assert request.node.originalname not in reading
    for item in request.session.items:
        if item.path == Path(__file__):
            assert bool(item.get_closest_marker("multiprocess")) == (item.originalname in reading), item


class _Unmarked:
    nodeid = "tests/test_x.py::test_y"

    def get_closest_marker(self, name: str) -> None:
        return None


def test_guard_fails_an_unmarked_test_that_started_a_process():
    guard = pytest_runtest_call(_Unmarked())
    next(guard)
    import process_markers

    process_markers._started[0] += 1  # what a fork in the test would count
    try:
        with pytest.raises(pytest.fail.Exception, match="not marked `multiprocess`"):
            guard.send(None)
    finally:
        process_markers._started[0] -= 1  # (else the guard fails this test, which started none)
    quiet = pytest_runtest_call(_Unmarked())
    next(quiet)
    with pytest.raises(StopIteration):  # nothing started: the test's result passes through
        quiet.send(None)


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
