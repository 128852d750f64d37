"""The replica runtime's parts, each built on its own: no Trainer, no processes."""

from __future__ import annotations

import types

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from lightning_fedopt.comm import Communicator
from lightning_fedopt.errors import ReplicaLostError
from lightning_fedopt.fault_tolerance.faults import AgreeAtNextSync, FaultHandler
from lightning_fedopt.runtime.batchnorm import BatchNormStatistics
from lightning_fedopt.runtime.checkpoints import ReplicaCheckpoints, StateRegistry
from lightning_fedopt.runtime.communicators import Communicators
from lightning_fedopt.runtime.consensus import Consensus
from lightning_fedopt.runtime.fit_end import ValidationGate
from lightning_fedopt.runtime.meeting import SYNC, MeetingPoints
from lightning_fedopt.runtime.patches import LightningPatches, callbacks_of
from lightning_fedopt.runtime.run import Counters, ReplicaRun
from lightning_fedopt.runtime.tracked import TrackedTensors
from lightning_fedopt.strategies.diloco.noloco import StopThroughStore


# ---------------------------------------------------------------------------------------- ReplicaRun
def test_run_counts_steps_and_rounds_and_round_trips_through_its_state():
    run = ReplicaRun()
    for _ in range(3):
        run.end_step()
        run.counts.effective_steps += 1
    assert (run.counts.replica_step, run.counts.steps_since_sync) == (3, 3)
    run.close_round(keep_history=True)
    assert run.effective_history == [3] and run.counts.effective_steps == 0 and run.round_compute == 0.0
    run.note_nonfinite(1, local=False, rank=0)
    assert Counters.from_shard(run.counts.as_dict()) == run.counts  # what a shard saves and restores
    assert run.nonfinite_events == [{"step": 3, "excluded": 1, "rank": 0, "local": 0}]
    assert Counters.from_meta({"replica_step": 7, "sync_count": 2}) == Counters(replica_step=7, sync_count=2)


# ---------------------------------------------------------------------------------------- Communicators
def test_communicators_without_a_process_group():
    comms = Communicators(group_size=1)
    comms.open()
    assert comms.outer is comms.world and comms.all() == [comms.world]
    comms.build_groups()  # nothing to build with group_size=1
    assert comms.inner is None
    err = ReplicaLostError([1], 5, "a test")
    comms.fail(err)
    assert comms.world.failed is err
    with pytest.raises(ValueError, match="group_size"):
        Communicators(group_size=2).check_group_size(3)
    grads = []
    closure = comms.group_closure(lambda: grads.append(1), list)
    closure()
    assert grads == [1]  # no group: the closure as it was
    stats = comms.stats
    comms.open()
    assert comms.world.stats is stats  # the statistics outlive the communicators


# ---------------------------------------------------------------------------------------- TrackedTensors
class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied
        self.frozen = nn.Linear(3, 1)
        self.frozen.requires_grad_(False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # not floating point
        self.bn = nn.BatchNorm1d(3)


def test_tracked_tensors_collect_and_rebuild_a_state_dict():
    module = _Tied()
    tracked = TrackedTensors(include_frozen=False)
    tracked.collect(module)
    assert "frozen.weight" not in tracked.names and "count" not in tracked.names
    assert "bn.running_mean" in tracked.names and tracked.module_id == id(module)
    values = [torch.full_like(t, float(i)) for i, t in enumerate(tracked.tensors)]
    sd = tracked.state_dict_with(module, values)
    assert torch.equal(sd["a.weight"], sd["b.weight"])  # tied weights come out tied
    assert torch.equal(sd["frozen.weight"], module.frozen.weight)  # untracked: the module's own
    before = tracked.snapshot()
    tracked.load(values)
    assert torch.equal(module.a.bias, values[tracked.names.index("a.bias")])
    tracked.load(before)
    assert tracked.is_finite() and not tracked.is_finite([torch.tensor([float("nan")])])
    tracked.reset()
    assert tracked.tensors == [] and tracked.module_id is None


# ---------------------------------------------------------------------------------------- Consensus
def _consensus(module: nn.Module, value: float = 2.0, holds: bool = False):
    tracked = TrackedTensors()
    tracked.collect(module)
    calls = []

    def compute():
        calls.append(1)
        return [torch.full_like(t, value) for t in tracked.tensors]

    part = Consensus(
        tracked,
        BatchNormStatistics(0),
        compute=compute,
        holds=lambda: holds,
        module=lambda: module,
        comm=Communicator,
    )
    return part, tracked, calls


def test_consensus_is_computed_once_per_step_and_swapped_in_and_out():
    module = nn.Linear(2, 2)
    part, tracked, calls = _consensus(module)
    own = tracked.snapshot()
    assert part.values() is part.values() and len(calls) == 1
    with part.swapped():
        assert part.swapped_in and all(bool((t == 2.0).all()) for t in tracked.tensors)
        assert torch.equal(
            part.local_state_dict(module)["weight"], own[0]
        )  # the replica's, not the consensus
    assert not part.swapped_in and torch.equal(tracked.tensors[0], own[0])
    assert bool((part.state_dict(module, ready=True)["weight"] == 2.0).all())
    assert torch.equal(part.state_dict(module, ready=False)["weight"], own[0])
    part.invalidate()
    part.values()
    assert len(calls) == 2
    part.load_into_replica()
    assert bool((module.weight == 2.0).all())


def test_consensus_held_by_the_replica_needs_no_swap():
    module = nn.Linear(2, 2)
    part, _, calls = _consensus(module, holds=True)
    part.swap_in()
    assert not part.swapped_in and calls == []


# ---------------------------------------------------------------------------------------- BatchNorm
def test_batchnorm_statistics_are_reestimated_on_the_kept_batches():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    tracked = TrackedTensors()
    tracked.collect(module)
    bn = BatchNormStatistics(2)
    batches = [(torch.randn(8, 4),) for _ in range(3)]
    for b in batches:
        bn.record(module, b)
    assert len(bn.batches) == 2 and bn.active(module, tracked)
    values = tracked.snapshot()
    out = bn.recalibrated(values, module, tracked, Communicator())
    with torch.no_grad():
        h = torch.cat([module[0](b[0]) for b in batches[1:]])
    mean = out[tracked.names.index("1.running_mean")]
    assert torch.allclose(mean, h.mean(0), atol=1e-6)
    assert torch.equal(tracked.tensors[0], values[0])  # the module's own weights are back
    bn.forget_batches()
    assert not bn.active(module, tracked)


# ---------------------------------------------------------------------------------------- meetings, validation
def test_meeting_on_one_process_and_the_arrival_hook():
    arrived = []
    meeting = MeetingPoints(Communicator, lambda: torch.device("cpu"), arrived.append)
    assert meeting.meet(SYNC, 4, sigterm=True) is True
    assert meeting.meet(SYNC, 5) is False
    assert arrived[0].startswith("the meeting of the ranks about to synchronise after step 4")


def test_validation_gate_skips_only_an_unchanged_consensus():
    version = [3]
    gate = ValidationGate(True, lambda: version[0])
    trainer = types.SimpleNamespace(state=types.SimpleNamespace(fn="fit"), sanity_checking=False)
    assert not gate.unchanged()
    gate.note_validation(trainer)  # type: ignore[arg-type]
    assert gate.unchanged()
    version[0] = 4
    assert not gate.unchanged()
    assert not ValidationGate(False, lambda: 3).unchanged()


# ---------------------------------------------------------------------------------------- patches
class _Loop:
    def check(self) -> str:
        return "lightning's"


def test_patches_are_undone_together():
    loop, patches = _Loop(), LightningPatches()
    patches.replace(loop, "check", lambda: "ours")
    patches.replace(loop, "check", lambda: "ours again")
    assert loop.check() == "ours again" and patches.is_replaced(loop, "check")
    trainer = types.SimpleNamespace(callbacks=[Callback()])
    mine, kept = Callback(), Callback()
    patches.add_callback(trainer, mine, 0)  # type: ignore[arg-type]
    patches.add_callback(trainer, kept, 1, until_fit_end=True)  # type: ignore[arg-type]
    assert callbacks_of(trainer)[:2] == [mine, kept]  # type: ignore[arg-type]
    patches.remove_all()
    assert loop.check() == "lightning's" and len(patches) == 0
    assert mine not in trainer.callbacks and kept in trainer.callbacks  # kept until on_fit_end
    listed = trainer.callbacks
    patches.remove_at_fit_end()
    assert kept not in trainer.callbacks and kept in listed  # a new list: Lightning may be iterating


# ---------------------------------------------------------------------------------------- checkpoints
def test_state_registry_saves_and_restores_by_phase():
    box = {"a": 1, "rng": 0}
    registry = StateRegistry()
    registry.register("a", lambda: box["a"], lambda v: box.__setitem__("a", v))
    registry.register("rng", lambda: box["rng"], lambda v: box.__setitem__("rng", v), phase="train_start")
    with pytest.raises(ValueError, match="twice"):
        registry.register("a", dict, print)
    with pytest.raises(ValueError, match="phase"):
        registry.register("b", dict, print, phase="later")
    saved = registry.state_dict()
    box.update(a=9, rng=9)
    registry.load_state_dict(saved)
    assert box == {"a": 1, "rng": 9}
    registry.load_state_dict(saved, phase="train_start")
    assert box == {"a": 1, "rng": 0}
    registry.load_state_dict({})  # an older shard without the entries
    assert registry.keys() == ["a", "rng"]


def test_replica_checkpoints_restore_own_or_consensus_counters():
    got = {}
    registry = StateRegistry()
    registry.register("replica", dict, lambda v: got.__setitem__("replica", v))
    part = ReplicaCheckpoints(registry, "DiLoCoStrategy")
    assert not part.resuming
    part.resume_meta = {"counters": {"replica_step": 8, "sync_count": 2}, "algorithm": {"phi": 1}}
    part.restore(lambda c, own: got.__setitem__("counters", (c, own)), lambda a: got.__setitem__("alg", a))
    assert got == {"counters": ({"replica_step": 8, "sync_count": 2}, False), "alg": {"phi": 1}}
    part.resume_shard = {"counters": {"replica_step": 9}, "replica": {"x": 1}}
    part.restore(lambda c, own: got.__setitem__("counters", (c, own)), lambda a: None)
    assert got["counters"] == ({"replica_step": 9}, True) and got["replica"] == {"x": 1}
    part.start_training()
    assert not part.resuming and part.resume_shard is None


# ---------------------------------------------------------------------------------------- faults
class _Host:
    global_rank, world_size, replica_step, sync_count, checkpoint_io = 0, 2, 4, 1, None

    def broadcast(self, obj, src=0):
        return obj


def test_fault_handler_policies_decide_at_the_meeting():
    faults = FaultHandler(_Host(), Communicators(), sync_timeout=5.0, elastic=False)  # type: ignore[arg-type]
    assert isinstance(faults.policy, AgreeAtNextSync)
    seen = []
    faults.before_sync(lambda sigterm: seen.append(sigterm) or False)
    assert seen == [False] and not faults.preempt
    faults.sigterm_received = True
    faults.before_sync(lambda sigterm: sigterm)
    assert faults.preempt
    faults.start()  # one process: no deadline group, no heartbeat
    assert faults.liveness is None
    faults.arrive("nothing to wait for")


def test_noloco_stop_policy_without_a_store_stops_this_rank_alone():
    faults = FaultHandler(
        _Host(), Communicators(), sync_timeout=5.0, elastic=False, policy=StopThroughStore()
    )  # type: ignore[arg-type]
    faults.before_sync(lambda sigterm: pytest.fail("NoLoCo never meets the other ranks"))
    faults.sigterm_received = True
    with pytest.raises(SIGTERMException):
        faults.before_sync(lambda sigterm: False)
