"""The replica strategy: one replica per process, no per-step gradient all-reduce.

:class:`ReplicaStrategy` is the base of every algorithm in ``lightning_fedopt``. It is a
Lightning :class:`~lightning.pytorch.strategies.DDPStrategy` (so it inherits the launchers,
process-group set-up, distributed samplers, ``devices``/``num_nodes`` handling and metric
reduction) that does **not** wrap the module in ``DistributedDataParallel``: each process trains
its own replica and the replicas only talk at the synchronisation points of a
:mod:`~lightning_fedopt.schedules` schedule, through :mod:`lightning_fedopt.comm`.

What the base does for every algorithm:

* broadcasts the initial weights and buffers from rank 0;
* counts **optimizer steps**: a training batch in which at least one optimizer stepped counts as
  one step, so gradient accumulation, manual optimization with several optimizers and LR
  schedulers need nothing special;
* calls :meth:`ReplicaStrategy.sync` after the steps the schedule names (with automatic
  optimization right after the optimizer step, with manual optimization at batch end, in both
  cases before other callbacks' ``on_train_batch_end``);
* makes no collective call between synchronisations: Lightning's per-batch broadcast of the
  SIGTERM flag is replaced by one check before each synchronisation step;
* evaluates (validation/test/predict) on the **consensus model** (``evaluate="consensus"``,
  default) by swapping it in and back out, or on each local replica (``evaluate="local"``);
* at the end of ``fit`` leaves every rank holding the same consensus weights (``final_sync``). When
  Lightning's stop is foreseeable (``max_steps``, the last batch of the last epoch) it runs in the
  last step itself, before that step's validation and checkpoints, so ``last.ckpt``, the last
  ``val_loss`` and the returned model are the same model; after a stop it cannot foresee
  (``EarlyStopping``, ``max_time``) every rank takes the consensus that the last validation and
  checkpoint saw (``_finish``);
* skips a validation during ``fit`` that would score an unchanged consensus
  (``skip_unchanged_validation``), re-estimates the consensus's BatchNorm statistics when it is
  used (``bn_recalibration``, ``_batchnorm``), and turns the meeting points of the ranks into a
  rendezvous that raises a clear error when ranks are out of step (``_rendezvous``);
* checkpoints: the checkpoint file's ``state_dict`` is the consensus model (loadable by plain
  Lightning/PyTorch), its ``"lightning_fedopt"`` entry holds the replicated algorithm state, and
  every rank writes its own replica's weights, optimizer states, algorithm state, RNG state and
  counters to ``<checkpoint>.replicas/rank<r>.pt``. Resuming with the same world size restores
  every replica exactly; with a different world size every replica restarts from the consensus.

Subclasses implement :meth:`sync` and :meth:`consensus_values`, and override the state hooks if
they keep state between rounds.

This module holds the step loop, the schedule, the algorithm interface and Lightning's hooks,
each a few lines that call one of the strategy's parts (:mod:`lightning_fedopt.runtime` and
:mod:`lightning_fedopt.fault_tolerance`), each with its own state and lifetime:

==================  ==============================================  =============================
attribute           part                                            lives for
==================  ==============================================  =============================
``run``             :class:`~lightning_fedopt.runtime.run.ReplicaRun`          one ``fit`` (a new one per fit)
``comms``           :class:`~lightning_fedopt.runtime.communicators.Communicators`  world: an entry point; groups: set-up to teardown
``tracked``         :class:`~lightning_fedopt.runtime.tracked.TrackedTensors`    one ``fit`` (re-pointed for evaluation)
``consensus``       :class:`~lightning_fedopt.runtime.consensus.Consensus`       one ``fit`` (cache: one step)
``meeting``         :class:`~lightning_fedopt.runtime.meeting.MeetingPoints`     the strategy
``validation``      :class:`~lightning_fedopt.runtime.fit_end.ValidationGate`    one ``fit``
``checkpoints``     :class:`~lightning_fedopt.runtime.checkpoints.ReplicaCheckpoints`  a resume: load to train start
``faults``          :class:`~lightning_fedopt.fault_tolerance.faults.FaultHandler`  liveness: one ``fit``
``patches``         :class:`~lightning_fedopt.runtime.patches.LightningPatches`  set-up to teardown
==================  ==============================================  =============================
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_choice, check_float, check_int, check_timeout
from lightning_fedopt.comm import Communicator
from lightning_fedopt.fault_tolerance._torchft import ENV_RESTARTS
from lightning_fedopt.fault_tolerance.faults import FaultHandler, StopPolicy
from lightning_fedopt.runtime.auto import agree_sync_every
from lightning_fedopt.runtime.batchnorm import BatchNormStatistics
from lightning_fedopt.runtime.checkpoints import ReplicaCheckpoints, StateRegistry
from lightning_fedopt.runtime.communicators import Communicators, CountedDDPStrategy
from lightning_fedopt.runtime.consensus import Consensus, consensus_distance
from lightning_fedopt.runtime.fit_end import ValidationGate, is_last_training_step
from lightning_fedopt.runtime.handshake import agreement_fields, check_agreement
from lightning_fedopt.runtime.initial_sync import INITIAL_SYNC, start_identical, state_digest
from lightning_fedopt.runtime.meeting import BARRIER, BROADCAST, END, SYNC, VALIDATION, MeetingPoints
from lightning_fedopt.runtime.patches import (
    LightningPatches,
    ManualOptimizationHooks,
    callbacks_of,
    set_global_step,
)
from lightning_fedopt.runtime.registry import register_name
from lightning_fedopt.runtime.run import Counters, ReplicaRun
from lightning_fedopt.runtime.shards import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_KEY,
    remove_with_shard,
    replica_shard_path,
)
from lightning_fedopt.runtime.tracked import TrackedTensors
from lightning_fedopt.schedules import AutoSync, SyncSchedule, as_schedule

log = logging.getLogger("lightning_fedopt")

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEY", "ReplicaStrategy", "replica_shard_path", "state_digest"]

_EVALUATE = ("consensus", "local")
_START_METHODS = ("popen", "spawn", "fork", "forkserver")


class ReplicaStrategy(CountedDDPStrategy):
    """Base strategy: each process trains its own replica; replicas synchronise on a schedule.

    Args:
        sync_every: ``H``, optimizer steps between synchronisations (>= 1), or a
            :class:`~lightning_fedopt.schedules.SyncSchedule`.
        warmup_steps: synchronise after every one of the first ``warmup_steps`` steps, then every
            ``sync_every`` (post-local SGD). Must be >= 0.
        evaluate: ``"consensus"`` to run validation/test/predict on the consensus model,
            ``"local"`` to run them on each rank's own replica.
        final_sync: at the end of ``fit``, load the consensus into every replica.
        include_frozen: also synchronise parameters that are frozen when ``fit`` starts (they may
            be unfrozen later, as Lightning's ``BackboneFinetuning`` does). Set it to False to save
            their bytes when they stay frozen (e.g. adapters on a frozen base model).
        group_size: hierarchical training: consecutive blocks of ``group_size`` ranks (e.g. one
            node's GPUs, on fast links) all-reduce their gradients at every step like DDP and
            stay identical; the algorithm runs across the groups (slow links), rank ``j`` of each
            group with rank ``j`` of the others. Must divide the world size. 1: no groups.
        round_seconds: heterogeneous local work: a round still spans ``sync_every`` training
            batches on every replica (so epochs, validation and checkpoints stay aligned), but a
            replica computes only while its compute time in the round is below ``round_seconds``
            and skips the round's remaining batches; algorithms that support it normalise each
            replica's update by the number of steps it managed (FedNova-style). None: off.
        initial_sync: how a new ``fit`` makes the replicas identical. ``"broadcast"`` (default):
            every rank receives rank 0's weights and buffers. ``"check"``: the ranks first compare
            a SHA-256 digest of their weights and buffers (32 bytes each, all-gathered) and rank 0
            broadcasts only if some rank differs, e.g. when every site loaded the same checkpoint
            or seeded the same initialisation, the model never crosses the slow link at start-up.
        bn_recalibration: re-estimate the consensus's BatchNorm running statistics, whenever the
            consensus is used (validation/test on it, checkpoints, the model ``fit`` returns), on this
            many of each replica's last training batches (forward passes in train mode, no
            gradients; then one all-reduce of the statistics): the replicas' statistics were
            estimated with their own weights, not the consensus's. 0: off (the statistics are the
            replicas' mean). Default: the algorithm's ``default_bn_recalibration`` (8 for DiLoCo,
            CO2, NoLoCo; 0 otherwise). Costs nothing for a model without BatchNorm; the batches are
            kept by reference (``bn_recalibration`` batches of memory). See
            :mod:`~lightning_fedopt.runtime.batchnorm`.
        bn_forward: ``(module, batch) -> Any``, the forward pass for the re-estimation. Default:
            ``module(batch[0])`` for a tuple/list batch, ``module(batch)`` otherwise.
        skip_unchanged_validation: skip a validation Lightning schedules during ``fit`` when the
            consensus model has not changed since the last validation (DiLoCo and CO2 change it at
            outer steps only): it would score the same model again, and ``EarlyStopping`` would
            count the repeat as "no improvement". A warning says so the first time.
        sync_timeout: seconds, the deadline of the synchronisation traffic (> 0, at most a day).
            A peer that died, or stopped answering (no heartbeat) for this long, raises
            :class:`~lightning_fedopt.ReplicaLostError` on every survivor naming it, the step and
            the synchronisation. A long compute phase between synchronisations is not timed: a rank
            waits for a slower peer as long as the peer's heartbeat lives. See ``_faults``.
        elastic: for ``torchrun``'s elastic agent (``--nnodes=MIN:MAX --max-restarts=K``): write a
            checkpoint at every synchronisation point to ``<default_root_dir>/elastic/<run id>/`` and,
            when the agent (re)starts the workers after a failure or a join, resume from the latest
            one by itself at the new world size. Needs a folder every rank sees.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
        process_group_backend, timeout, start_method: as for Lightning's ``DDPStrategy``
            (``start_method`` is ``"popen"``, ``"spawn"``, ``"fork"`` or ``"forkserver"``).

    Raises:
        ValueError: for an argument out of range or an argument the strategy does not know.

    Example:
        An algorithm is a subclass that says what a round does and what the consensus is; the
        base class does the rest (steps, schedule, evaluation, checkpoints)::

            class MeanOfReplicas(ReplicaStrategy):
                strategy_name = "mean_of_replicas"

                def consensus_values(self):
                    values = [t.detach().clone() for t in self.tracked_tensors()]
                    self.comm.all_reduce(values, "mean", purpose="consensus")
                    return values

                def sync(self):
                    for t, v in zip(self.tracked_tensors(), self.consensus_values()):
                        t.copy_(v)
                    return {}

        ``LocalSGDStrategy`` is this plus weights, participation and a NaN guard.
    """

    strategy_name = "replica"
    #: whether the algorithm normalises updates by each replica's step count (``round_seconds``)
    supports_round_seconds = False
    #: ``bn_recalibration`` when not given: 0 where the consensus is the replicas' plain mean
    default_bn_recalibration = 0
    #: whether the algorithm has a torchft round (``fault_tolerance="torchft"``); it then checks its
    #: own arguments with :meth:`fault_tolerance_unsupported` at the end of its ``__init__``
    supports_fault_tolerance = False

    def __init__(
        self,
        sync_every: int | str | SyncSchedule = 1,
        *,
        warmup_steps: int = 0,
        evaluate: str = "consensus",
        final_sync: bool = True,
        include_frozen: bool = True,
        group_size: int = 1,
        round_seconds: float | None = None,
        initial_sync: str = "broadcast",
        skip_unchanged_validation: bool = True,
        bn_recalibration: int | None = None,
        bn_forward: Callable[[Any, Any], Any] | None = None,
        sync_timeout: float = 30.0,
        elastic: bool = False,
        fault_tolerance: str | None = None,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown argument(s) {sorted(unknown)}; see "
                f"help({type(self).__name__}) for the accepted arguments"
            )
        check_choice("evaluate", evaluate, _EVALUATE)
        group_size = check_int("group_size", group_size, low=1)
        round_seconds = check_float("round_seconds", round_seconds, low=0, low_open=True, allow_none=True)
        if round_seconds is not None and not self.supports_round_seconds:
            raise ValueError(
                f"`round_seconds` (heterogeneous local work) is not supported by {type(self).__name__}"
            )
        check_choice("start_method", start_method, _START_METHODS)
        check_choice("initial_sync", initial_sync, INITIAL_SYNC)
        if bn_recalibration is None:
            bn_recalibration = self.default_bn_recalibration
        bn_recalibration = check_int("bn_recalibration", bn_recalibration, low=0, high=2**20)
        if bn_forward is not None and not callable(bn_forward):
            raise ValueError(f"`bn_forward` must be a callable (module, batch) -> Any, got {bn_forward!r}")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=check_timeout("timeout", timeout),
            start_method=start_method,  # type: ignore[arg-type]
        )
        self.schedule: SyncSchedule = as_schedule(sync_every, warmup_steps)
        self.evaluate = evaluate
        self.final_sync_enabled = check_bool("final_sync", final_sync)
        self.include_frozen = check_bool("include_frozen", include_frozen)
        self.group_size = group_size
        self.round_seconds = round_seconds
        self.initial_sync = initial_sync
        self.skip_unchanged_validation = check_bool("skip_unchanged_validation", skip_unchanged_validation)
        self.bn_recalibration = bn_recalibration
        self.bn_forward = bn_forward
        self.sync_timeout = check_float("sync_timeout", sync_timeout, low=0, low_open=True, high=86400.0)
        self.elastic = check_bool("elastic", elastic)
        check_choice("fault_tolerance", fault_tolerance, (None, "torchft"))
        if fault_tolerance is not None:
            why = None if self.supports_fault_tolerance else self.fault_tolerance_unsupported()
            if why:
                raise ValueError(
                    f"`fault_tolerance={fault_tolerance!r}` is not supported by {type(self).__name__}: {why}"
                )
            if elastic:
                raise ValueError(
                    "`fault_tolerance` and `elastic` exclude each other: choose in-process recovery or torchrun restarts"
                )
            if sync_every == "auto" or isinstance(sync_every, AutoSync):
                raise ValueError(
                    "`sync_every='auto'` cannot be combined with `fault_tolerance`: each replica group would "
                    "measure and choose its own H, and torchft's rounds pair the groups' synchronisations"
                )
            if group_size != 1:
                raise ValueError(
                    "`fault_tolerance='torchft'` takes `group_size=1`: the processes of one Lightning world "
                    "(e.g. `torchrun --nproc-per-node 2` with `devices=2`) are one replica group by "
                    "themselves (DDP inside it), and torchft carries the traffic across groups"
                )
        self.fault_tolerance = fault_tolerance
        #: set by :class:`~lightning_fedopt.callbacks.CommunicationMonitor`: measure the consensus
        #: distance at every synchronisation (costs one scalar all-reduce).
        self.track_consensus_distance = False
        #: count samples per round (for sample-proportional weights); off saves a little per step
        self.count_samples = False
        # ------------------------------------------------------------ the parts
        self.comms = Communicators(group_size)
        self.run = ReplicaRun()
        self.tracked = TrackedTensors(self.include_frozen)
        self.consensus = Consensus(
            self.tracked,
            BatchNormStatistics(bn_recalibration, bn_forward),
            compute=self.consensus_values,
            holds=self.local_is_consensus,
            module=self._module,
            comm=self._world_comm,
            forward_context=self._forward_context,
        )
        self.faults = FaultHandler(
            self, self.comms, sync_timeout=self.sync_timeout, elastic=self.elastic, policy=self.stop_policy()
        )
        self.meeting = MeetingPoints(self._world_comm, self._device, self.faults.arrive)
        self.validation = ValidationGate(
            self.skip_unchanged_validation and evaluate == "consensus",
            self.consensus_version,
            type(self).__name__,
        )
        registry = StateRegistry()
        registry.register("replica", self.replica_state_dict, self.load_replica_state_dict)
        registry.register("comm_stats", self.comms.stats.state_dict, self.comms.stats.load_state_dict)
        registry.register("nonfinite_events", self._nonfinite_events_state, self._load_nonfinite_events)
        registry.register("rng", _rng_state, _load_rng_state, phase="train_start")
        self.checkpoints = ReplicaCheckpoints(registry, type(self).__name__)
        self.patches = LightningPatches()
        self._manual_hooks = ManualOptimizationHooks(self._end_manual_step)

    # ================================================================== algorithm interface
    def setup_algorithm(self) -> None:
        """Initialise algorithm state; called once the replicas hold identical weights."""

    def sync(self) -> dict[str, float]:
        """One synchronisation round. Runs on every rank at the same step; returns numbers to report."""
        raise NotImplementedError

    def consensus_values(self) -> list[Tensor]:
        """The consensus value of every tracked tensor (may communicate; must run on every rank)."""
        raise NotImplementedError

    def local_is_consensus(self) -> bool:
        """Whether this replica's weights equal the consensus (then evaluation needs no traffic)."""
        return self.run.counts.steps_since_sync == 0

    def final_sync(self) -> None:
        """Make every replica hold the consensus at the end of fit (at the last step when Lightning's
        stop is foreseeable; algorithms may fold pending work into the consensus here)."""
        if self.local_is_consensus():
            return
        self.load_consensus()

    def after_final_sync(self) -> None:
        """Hook for algorithms whose global state must follow the final consensus."""

    def consensus_version(self) -> int:
        """A number that changes whenever the consensus model may have changed (default: every
        optimizer step). Algorithms whose consensus changes only at outer steps count those."""
        return self.run.counts.replica_step

    def fault_tolerance_unsupported(self) -> str | None:
        """Why this configuration cannot run with ``fault_tolerance="torchft"`` (None: it can)."""
        return (
            "its synchronisation is not a quorum round (supported: DiLoCoStrategy; Local SGD is "
            "DiLoCoStrategy(outer_optimizer='SGD', outer_kwargs={'lr': 1.0, 'momentum': 0.0}))"
        )

    def check_fault_tolerance(self) -> None:
        """Raise ``ValueError`` when ``fault_tolerance`` is set and :meth:`fault_tolerance_unsupported` says why not."""
        why = self.fault_tolerance_unsupported() if self.fault_tolerance is not None else None
        if why:
            raise ValueError(
                f"`fault_tolerance={self.fault_tolerance!r}` is not supported by {type(self).__name__}: {why}"
            )

    def sync_fault_tolerant(self, contribute: bool = True) -> dict[str, float]:
        """One synchronisation as a torchft round (quorum, managed all-reduce, commit vote);
        ``contribute=False``: take part with no weight (a group joining the others)."""
        raise NotImplementedError

    def stop_policy(self) -> StopPolicy | None:
        """How the ranks agree to stop after a SIGTERM (None: at the meeting before the next
        synchronisation; NoLoCo, without a global meeting point, returns its own)."""
        return None

    def algorithm_state_dict(self) -> dict[str, Any]:
        """State that is the same on every rank (saved once, in the checkpoint file)."""
        return {}

    def load_algorithm_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`algorithm_state_dict`."""

    def replica_state_dict(self) -> dict[str, Any]:
        """State that differs between ranks (saved in each rank's replica shard)."""
        return {}

    def load_replica_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`replica_state_dict`."""

    # ================================================================== what algorithms read
    @property
    def replica_step(self) -> int:
        """Optimizer steps this replica has taken (one per training batch in which any optimizer stepped)."""
        return self.run.counts.replica_step

    @property
    def steps_since_sync(self) -> int:
        """Optimizer steps since the last synchronisation."""
        return self.run.counts.steps_since_sync

    @property
    def sync_count(self) -> int:
        """Synchronisations done so far (the final one at the end of fit included)."""
        return self.run.counts.sync_count

    @property
    def samples_since_sync(self) -> int:
        """Training samples since the last synchronisation (when ``count_samples`` is on)."""
        return self.run.counts.samples_since_sync

    @property
    def skipping_step(self) -> bool:
        """Whether the optimizer step now running is a skipped one (``round_seconds``: this
        replica's time in the round is spent)."""
        return self.run.skip_step

    @property
    def last_sync(self) -> dict[str, float]:
        """What the last synchronisation reported (step, seconds, excluded replicas, ...)."""
        return dict(self.run.last_sync)

    @property
    def nonfinite_events(self) -> list[dict[str, int]]:
        """One entry per synchronisation at which some replica had non-finite weights."""
        return list(self.run.nonfinite_events)

    @property
    def round_effective_steps(self) -> int:
        """Steps this replica computed in the current round (fewer than the round's batches when
        ``round_seconds`` cut it short)."""
        return self.run.counts.effective_steps

    @property
    def effective_steps_history(self) -> list[int]:
        """Steps this replica computed in each finished round (``round_seconds`` runs)."""
        return list(self.run.effective_history)

    @property
    def skipped_validations(self) -> int:
        """Validations skipped in this fit because the consensus had not changed since the last one."""
        return self.validation.skipped

    @property
    def fault_tolerance_stats(self) -> dict[str, float] | None:
        """With ``fault_tolerance="torchft"``: the last quorum's size and the totals of heals,
        rounds not committed and seconds spent forming quorums (None otherwise)."""
        return dict(self.faults.torchft_totals) if self.fault_tolerance else None

    @property
    def outer_comm(self) -> Communicator:
        """The communicator the algorithm synchronises over: the world, or with ``group_size > 1``
        the same-position ranks of every group."""
        return self.comms.outer

    @property
    def outer_world_size(self) -> int:
        """Number of replicas the algorithm sees (groups count as one replica)."""
        return self.world_size // self.group_size

    @property
    def outer_rank(self) -> int:
        """This replica's index among :attr:`outer_world_size` (its group's index)."""
        return self.global_rank // self.group_size

    def tracked_named_tensors(self) -> list[tuple[str, Tensor]]:
        """The tensors the algorithm keeps in agreement: floating-point parameters and buffers.

        Parameters frozen when ``fit`` starts are included unless ``include_frozen=False`` (they
        may be unfrozen later, e.g. by Lightning's ``BackboneFinetuning``).
        """
        return self.tracked.named()

    def tracked_tensors(self) -> list[Tensor]:
        """The tracked tensors (see :meth:`tracked_named_tensors`), in a new list."""
        return list(self.tracked.tensors)

    def is_finite(self, tensors: list[Tensor] | None = None) -> bool:
        """Whether all of ``tensors`` (default: the tracked ones) are finite."""
        return self.tracked.is_finite(tensors)

    def cached_consensus_values(self) -> list[Tensor]:
        """:meth:`consensus_values`, computed at most once between two optimizer steps."""
        return self.consensus.values()

    def consensus_swapped(self) -> AbstractContextManager[None]:
        """Run the block with the consensus model's weights in the module, then restore the replica's.

        A collective call for algorithms whose consensus needs communication (every rank must enter
        it at the same point), used e.g. by :class:`~lightning_fedopt.callbacks.Curriculum` to score
        samples under the consensus model. Does nothing when the consensus is already swapped in.
        """
        if not self.run.algorithm_ready:
            return contextlib.nullcontext()
        return self.consensus.swapped()

    def recalibrates_batchnorm(self) -> bool:
        """Whether the consensus's BatchNorm statistics are re-estimated when it is used."""
        return self.consensus.recalibrates()

    def consensus_distance(self, local: list[Tensor], consensus: list[Tensor], valid: bool) -> float:
        """Mean over valid replicas of ``||theta_i - theta_bar|| / ||theta_bar||`` (one scalar all-reduce)."""
        return consensus_distance(self.outer_comm, local, consensus, valid, self.root_device)

    def load_consensus(self) -> None:
        """Every replica takes the consensus (as validation and checkpoints at this step saw it)."""
        self.consensus.load_into_replica()
        self.after_final_sync()

    def record_nonfinite(self, excluded: int, local: bool) -> None:
        """Note a synchronisation that excluded ``excluded`` replicas with non-finite weights."""
        self.run.note_nonfinite(excluded, local, self.global_rank)

    def reset_optimizer_state(self) -> None:
        """Forget this replica's optimizer state (after its weights were replaced by a non-finite reset)."""
        for opt in self.optimizers:
            opt.state.clear()

    def average_gradients_in_group(self) -> None:
        """Inside a group (``group_size > 1``): the mean of the gradients over the fast links."""
        self.comms.average_gradients_in_group(self.optimizers)

    def meet(self, point: int) -> bool:
        """Meet the other ranks at ``point`` (:mod:`~lightning_fedopt.runtime.meeting`); returns
        whether any rank received SIGTERM."""
        return self.meeting.meet(point, self.run.counts.replica_step, self.faults.sigterm_received)

    # ================================================================== Lightning plumbing
    def _new_run(self) -> None:
        """A new ``fit`` (not a resume): every per-fit part starts afresh."""
        self.run = ReplicaRun()
        self.tracked.reset()
        self.consensus.reset()
        self.consensus.batchnorm.reset()
        self.validation.reset()
        self.comms.stats.reset()

    def _forward_context(self) -> AbstractContextManager[Any]:
        return self.precision_plugin.forward_context()

    # the parts' accessors (bound methods, not lambdas: the strategy is pickled by the spawn launcher)
    def _module(self) -> LightningModule | None:
        return self.lightning_module

    def _world_comm(self) -> Communicator:
        return self.comm

    def _device(self) -> torch.device:
        return self.root_device

    def _nonfinite_events_state(self) -> list[dict[str, int]]:
        return list(self.run.nonfinite_events)

    def _load_nonfinite_events(self, events: list[dict[str, int]]) -> None:
        self.run.nonfinite_events = list(events)

    def _load_schedule(self, state: dict[str, Any] | None) -> None:
        if state is not None and isinstance(self.schedule, AutoSync):
            self.schedule.load_state_dict(state)

    def _load_counters(self, counters: dict[str, Any], own: bool) -> None:
        self.run.counts = Counters.from_shard(counters) if own else Counters.from_meta(counters)

    @override
    def _configure_launcher(self) -> None:
        self.comms.check_group_size(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        trainer = self._current_trainer()
        if trainer is not None:
            self.faults.install_resume(trainer, self.patches)

    @override
    def setup(self, trainer: Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._layer_sync is not None:
            raise ValueError(
                f"{type(self).__name__} does not support `sync_batchnorm=True`: SyncBatchNorm all-reduces "
                "activations at every forward pass, which defeats local training"
            )
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        assert self.model is not None
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self._install_patches(trainer)
            self.configure_ddp()
            self.setup_optimizers(trainer)
        else:
            self.comms.build_groups()
            self.consensus.reset()
            module = self.lightning_module
            if self.run.algorithm_ready and module is not None and self.tracked.module_id == id(module):
                # evaluation after a fit: the module may have moved devices since (teardown moves it
                # to CPU), so point at its live tensors again; the replicas may legitimately differ
                self.tracked.collect(module)
            else:
                # evaluation without a fit (or of another module): start every rank from rank 0's weights
                self.run.algorithm_ready = False
                self._start_identical()
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _install_patches(self, trainer: Trainer) -> None:
        """At the start of ``fit``: the batch-end hook under manual optimization, the SIGTERM check,
        the signal notifier and sync-point callback, and the validation gate (all removed at teardown)."""
        module = self.lightning_module
        manual = module is not None and not module.automatic_optimization
        if manual:
            self.patches.add_callback(trainer, self._manual_hooks, 0)
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            self.patches.replace(loop, "_broadcast_sigterm_tensor", self._sigterm_check)
        self.faults.install(trainer, self.patches, 1 if manual else 0)
        self.validation.install(trainer, self.patches, self.global_rank, lambda: self.run.counts.replica_step)

    def _start_identical(self) -> None:
        """Give every replica rank 0's weights and buffers (``initial_sync``)."""
        module = self.lightning_module
        assert module is not None
        start_identical(
            self.comm, TrackedTensors.module_state_tensors(module), self.initial_sync, self.root_device
        )

    @override
    def configure_ddp(self) -> None:
        """No DDP wrapper: check that every rank runs the same configuration on the same model
        structure (the start-up handshake), make the replicas identical, set up the algorithm."""
        self.faults.start()
        check_agreement(self.comm, agreement_fields(self), device=self.root_device)
        if not self.checkpoints.resuming:
            self._new_run()  # a new fit (not a resume) starts the algorithm afresh
        if not self.checkpoints.weights_from_shard:
            self._start_identical()
        if self.fault_tolerance == "torchft":
            # the processes of this Lightning world are one replica group (DDP inside it); torchft
            # carries the traffic across groups: one replica here, whatever the world's size
            self.group_size = self.comms.group_size = self.world_size
        self.comms.build_groups()
        module = self.lightning_module
        assert module is not None
        if self.round_seconds is not None and not module.automatic_optimization:
            raise ValueError("`round_seconds` (heterogeneous local work) needs automatic optimization")
        self.tracked.collect(module)
        self.setup_algorithm()
        if self.checkpoints.resuming:
            self.checkpoints.restore(self._load_counters, self.load_algorithm_state_dict, self._load_schedule)
        self.run.algorithm_ready = True
        if self.fault_tolerance == "torchft":
            self._join_replica_groups()

    # ---------------------------------------------------------------- in-process fault tolerance
    def _join_replica_groups(self) -> None:
        """Join the other replica groups through torchft (``fault_tolerance="torchft"``): one round
        in which this group contributes nothing (for the others it is their next synchronisation's
        round, so every group makes the same calls in it). A group that starts late or restarts
        receives the global state and the step count from a live peer there (and at any later quorum
        where it is behind), so it never trains its first round on stale weights, and it is never
        counted in an average it did not compute."""
        timeout = self.sync_timeout
        self.faults.open_torchft(
            self._heal_state,
            self._load_heal_state,
            group_rank=self.global_rank,
            group_world_size=self.world_size,
            timeout=timeout,
            quorum_timeout=timeout,
            connect_timeout=min(10.0, timeout),
            pg_timeout=timeout,
        )
        info = self.sync_fault_tolerant(contribute=False)
        if info.get("healed"):  # the peers count this round as one of their synchronisations
            self.run.counts.sync_count += 1
        elif info.get("quorum_size") == 1.0 and int(os.environ.get(ENV_RESTARTS, "0")) > 0:
            log.warning(
                "lightning_fedopt: replica group restarted and found no live peer to heal from (the others "
                "finished, or have not started): it trains on from its own initial state"
            )
        self.run.last_sync = {**info, "joined": 1.0, "step": self.run.counts.replica_step}

    def _heal_state(self) -> dict[str, Any]:
        """What a group that is behind receives from a live peer: the global algorithm state and the
        step counters (tensors and plain values only)."""
        counts = self.run.counts
        return {
            "algorithm": self.algorithm_state_dict(),
            "replica_step": int(counts.replica_step),
            "sync_count": int(counts.sync_count),
        }

    def _load_heal_state(self, state: dict[str, Any]) -> None:
        """Take a live peer's state: the global state, the step counters (Lightning's step count
        moves with them, so that every group stops at ``max_steps`` together), and the replica
        restarts from the consensus. Its optimizer state and data position stay its own."""
        self.load_algorithm_state_dict(state["algorithm"])
        step = int(state["replica_step"])
        counts = self.run.counts
        counts.replica_step, counts.sync_count, counts.steps_since_sync = step, int(state["sync_count"]), 0
        self.consensus.invalidate()
        self.tracked.load(self.consensus_values())
        trainer = self._current_trainer()
        module = self.lightning_module
        if trainer is not None and module is not None:
            set_global_step(trainer, step, in_step=module.automatic_optimization and self.run.in_step)

    @override
    def teardown(self) -> None:
        self.faults.close_torchft()
        self.faults.stop()
        self.patches.remove_all()
        self.comms.close()
        # a resume whose fit loop never ran (training already complete) must not leak into the next fit
        self.checkpoints.forget_resume()
        super().teardown()

    @override
    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        t0 = time.perf_counter()
        closure = self.comms.group_closure(closure, lambda: self.optimizers)
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        run = self.run
        if run.skip_step:
            run.skip_step = False
        else:
            run.counts.effective_steps += 1
            run.round_compute += time.perf_counter() - t0
        module = self.lightning_module
        if module is not None and module.automatic_optimization:
            run.in_step = True
            try:
                self._end_step()  # one optimizer per step: the step is over
            finally:
                run.in_step = False
        else:
            run.stepped = True  # several optimizers may step: the batch end closes the step
        return out

    # ---------------------------------------------------------------- the loop's points
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.round_seconds is not None and self.run.round_compute >= self.round_seconds:
            # this replica's time for the round is spent: skip the rest of the round's batches. The
            # optimizer step still runs, with no gradients (a constant loss), so that every rank counts
            # the same steps (Lightning refuses a None loss in distributed training)
            self.run.skip_step = True
            return torch.zeros((), device=self.root_device, requires_grad=True)
        return super().training_step(*args, **kwargs)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.consensus.batchnorm.record(self.lightning_module, batch)
        if self.count_samples:
            try:
                self.run.counts.samples_since_sync += int(extract_batch_size(batch))
            except Exception:  # a batch whose size cannot be told counts as one sample
                self.run.counts.samples_since_sync += 1

    def _end_manual_step(self) -> None:
        """Under manual optimization, at batch end: close the step if an optimizer stepped."""
        if self.run.stepped:
            self.run.stepped = False
            self._end_step()

    def _end_step(self) -> None:
        self.consensus.invalidate()
        self.run.end_step()
        auto = isinstance(self.schedule, AutoSync)
        if auto:
            self.run.note_step_end(time.perf_counter())
            self.auto_step_end()
        if self.schedule.should_sync(self.run.counts.replica_step):
            self._run_sync()
        if self.final_sync_enabled and is_last_training_step(self._current_trainer(), self.lightning_module):
            # close training in its last step, before that step's validation and checkpoints
            self._close_training(self.final_sync)
            self.run.closed = True
        if auto:  # the next step's wall time starts after this step's synchronisation
            self.run.last_step_end = time.perf_counter()

    def _run_sync(self) -> None:
        seconds_before = self.comms.stats.seconds
        compute, computed = self.run.round_compute, self.run.counts.effective_steps
        info = (self.sync_fault_tolerant() if self.fault_tolerance else self.sync()) or {}
        counts = self.run.counts
        counts.sync_count += 1
        step = counts.replica_step
        auto = self.schedule if isinstance(self.schedule, AutoSync) else None
        measured = auto is not None and self.auto_measures(step, counts.sync_count)
        if auto is not None:
            self.run.sync_walls.append(self.comms.stats.seconds - seconds_before)
        if measured:
            # the medians since the last measurement: a step's wall time (the interval between step
            # ends: the loop's own time in it, the slow first steps of a fit out of it; the
            # optimizer steps' mean before two steps) and a synchronisation's seconds
            step_seconds = self.run.step_seconds() or compute / max(computed, 1)
            round_seconds = self.auto_round_seconds(self.run.sync_seconds() or 0.0)
            info = {**info, **self._choose_sync_every(step_seconds, round_seconds)}
            self.run.sync_walls.clear()
        counts.steps_since_sync = 0
        counts.samples_since_sync = 0
        self.run.close_round(self.round_seconds is not None)
        if auto is not None and (measured or (auto.remeasure_every is None and auto.round_ends(step))):
            self.run.step_walls.clear()  # else kept until the next measurement
        info = {
            **info,
            "step": counts.replica_step,
            "sync_seconds": self.comms.stats.seconds - seconds_before,
        }
        self.run.last_sync = info

    # ---------------------------------------------------------------- sync_every="auto"
    #: ``sync_every="auto"``: the round overlaps the next ``H`` steps (CO2): ``H`` by the overlapped
    #: rule, ``max(0, R - H c)`` exposed (:meth:`~lightning_fedopt.schedules.AutoSync.decide`)
    auto_overlapped: bool = False

    def auto_measures(self, step: int, sync_count: int) -> bool:
        """``sync_every="auto"``: whether the synchronisation number ``sync_count`` (after step
        ``step``) is measured; the same answer on every rank (it decides who joins the agreement's
        all-reduce). Default: the schedule's
        (:meth:`~lightning_fedopt.schedules.AutoSync.measures_at`)."""
        assert isinstance(self.schedule, AutoSync)
        return self.schedule.measures_at(step, sync_count)

    def auto_round_seconds(self, blocking_seconds: float) -> float | None:
        """``sync_every="auto"``: the seconds of a round to choose ``H`` from, at a measured
        synchronisation. ``blocking_seconds``: the median of what the synchronisations since the
        last measurement took (their transfers and waits), the default (a blocking round). A
        strategy whose rounds overlap compute returns the transfer time of its last completed round instead, or None when it does not know it (e.g.
        the round was restored from a checkpoint): then no rank changes ``H`` at this measurement."""
        return blocking_seconds

    def auto_hides_rounds(self) -> bool:
        """``sync_every="auto"``: whether ``H`` follows the overlapped rule (only
        ``max(0, R - H c)`` exposed) rather than the blocking one. Default: :attr:`auto_overlapped`."""
        return self.auto_overlapped

    def auto_round_timed(self) -> bool:
        """``sync_every="auto"``: whether :meth:`auto_round_seconds` is a round's transfer time from
        this rank's launch to its completion (the ranks agree on the smallest) rather than the
        seconds a synchronisation blocked (the largest). Default: :attr:`auto_overlapped`."""
        return self.auto_overlapped

    def auto_step_end(self) -> None:
        """``sync_every="auto"``: called at every step end (before a synchronisation): a strategy
        with a round in flight may note whether it has completed."""

    def _choose_sync_every(self, step_seconds: float, round_seconds: float | None) -> dict[str, float]:
        """``sync_every="auto"``: the ranks' numbers agreed and ``H`` chosen (:func:`agree_sync_every`)."""
        assert isinstance(self.schedule, AutoSync)
        return agree_sync_every(
            self.schedule,
            self.comm,
            self.root_device,
            step=self.run.counts.replica_step,
            step_seconds=step_seconds,
            round_seconds=round_seconds,
            timed=self.auto_round_timed(),
            overlapped=self.auto_hides_rounds(),
            total_steps=self._planned_steps(),
        )

    def _planned_steps(self) -> int | None:
        """``sync_every="auto"``: the optimizer steps of this ``fit`` as Lightning knows them
        (``Trainer.estimated_stepping_batches``: ``max_steps``, or the steps of ``max_epochs``
        epochs), or None (endless, an iterable dataset without a length, not computable)."""
        trainer = self._current_trainer()
        if trainer is None:
            return None
        try:
            steps = trainer.estimated_stepping_batches
        except MisconfigurationException:  # accumulate_grad_batches that changes between epochs
            return None
        return int(steps) if math.isfinite(steps) and steps > 0 else None

    def _close_training(self, close: Callable[[], None]) -> None:
        """Run ``close`` (the final synchronisation) and count it as a synchronisation if it was one."""
        before = self.local_is_consensus()
        close()
        if not before:
            self.run.counts.sync_count += 1
            self.run.close_round(self.round_seconds is not None)
        self.run.counts.steps_since_sync = 0
        self.consensus.invalidate()

    def _sigterm_check(self) -> None:
        """Before a synchronisation step (in place of Lightning's per-batch SIGTERM broadcast): the
        fault handler's stop policy, at the meeting that checks every rank is at the same step."""
        step = self.run.counts.replica_step
        if not self.schedule.should_sync(step + 1):
            return
        if self.run.checked_step == step:
            return  # once per step (under manual optimization a batch need not step)
        self.run.checked_step = step
        self.faults.before_sync(lambda sigterm: self.meeting.meet(SYNC, step, sigterm))

    # ---------------------------------------------------------------- meeting points
    def _current_trainer(self) -> Trainer | None:
        module = self.lightning_module
        return module._trainer if module is not None else None

    def _in_fit_loop(self) -> bool:
        """Whether this is ``fit`` after its first optimizer step, on several processes (ranks can
        only be out of step once they have stepped)."""
        trainer = self._current_trainer()
        return bool(
            trainer is not None
            and self.run.algorithm_ready
            and self.run.counts.replica_step > 0
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and self.comm.available
            and self.comm.world_size > 1
        )

    def _meet_in_fit(self, point: int) -> None:
        if self._in_fit_loop():
            self.meet(point)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """During ``fit`` a Lightning barrier is a meeting (itself a barrier) that checks every
        rank is at the same step; otherwise a plain barrier, counted."""
        if self._in_fit_loop():
            self.meet(BARRIER)
        else:
            super().barrier(*args, **kwargs)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """During ``fit``: first a meeting that checks every rank is at the same step."""
        self._meet_in_fit(BROADCAST)
        return super().broadcast(obj, src)

    # ---------------------------------------------------------------- evaluation on the consensus
    def _swap_in(self) -> None:
        if self.evaluate == "consensus" and self.run.algorithm_ready:
            self.consensus.swap_in()

    @override
    def on_validation_start(self) -> None:
        self._meet_in_fit(VALIDATION)
        self.validation.note_validation(self._current_trainer())
        self._swap_in()

    @override
    def on_validation_end(self) -> None:
        self.consensus.swap_out()

    @override
    def on_test_start(self) -> None:
        self._swap_in()

    @override
    def on_test_end(self) -> None:
        self.consensus.swap_out()

    @override
    def on_predict_start(self) -> None:
        self._swap_in()

    @override
    def on_predict_end(self) -> None:
        self.consensus.swap_out()

    @override
    def on_train_end(self) -> None:
        """The final synchronisation (after the callbacks' ``on_train_end``, before ``on_fit_end``),
        unless training was closed at its last step."""
        self._meet_in_fit(END)
        run = self.run
        if self.final_sync_enabled and run.algorithm_ready:
            if not run.closed and not self.local_is_consensus() and self.fault_tolerance:
                # under torchft: a group that healed at the last step has its joining round in flight
                # (CO2, streaming DiLoCo): it finishes it with its peers, who did at that step
                self._close_training(self.final_sync)
            elif not run.closed and not self.local_is_consensus():
                # a stop the strategy could not foresee (EarlyStopping, max_time): end on the consensus
                # that this step's validation and checkpoints saw
                self._close_training(self.load_consensus)
            elif self.consensus.recalibrates():
                # the consensus's re-estimated BatchNorm statistics (those this step's validation and
                # checkpoints used, from the cache)
                self.load_consensus()
            run.counts.steps_since_sync = 0
        self.consensus.batchnorm.forget_batches()
        run.closed = False
        self.consensus.invalidate()

    # ---------------------------------------------------------------- checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The consensus model's state dict (what plain Lightning/PyTorch loads from the checkpoint)."""
        module = self.lightning_module
        assert module is not None
        return self.consensus.state_dict(module, self.run.algorithm_ready)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        module = self.lightning_module
        if self.run.algorithm_ready and "optimizer_states" in checkpoint and module is not None:
            self.checkpoints.save(
                checkpoint,
                filepath,
                comm=self.comm,
                checkpoint_io=self.checkpoint_io,
                rank=self.global_rank,
                world_size=self.world_size,
                counters=self.run.counts.as_dict(),
                algorithm_state=self.algorithm_state_dict(),
                schedule_state=self.schedule.state_dict() if isinstance(self.schedule, AutoSync) else None,
                module_state=self.consensus.local_state_dict(module),
                optimizer_states=[self.optimizer_state(opt) for opt in self.optimizers],
                per_replica_callbacks=_per_replica_callback_keys(self._current_trainer()),
            )
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        remove_with_shard(self.checkpoint_io, filepath, self.global_rank, super().remove_checkpoint)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        trainer = self._current_trainer()
        self.checkpoints.load(
            checkpoint,
            checkpoint_path,
            fitting=trainer is not None and trainer.state.fn == TrainerFn.FITTING,
            comm=self.comm,
            checkpoint_io=self.checkpoint_io,
            weights_only=weights_only,
        )
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        self.consensus.reset()
        shard = self.checkpoints.resume_shard
        if shard is not None:
            assert self.lightning_module is not None
            self.lightning_module.load_state_dict(shard["module"], strict=strict)
            self.checkpoints.weights_from_shard = True
            return
        super().load_model_state_dict(checkpoint, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        shard = self.checkpoints.resume_shard
        if shard is not None:
            checkpoint = {"optimizer_states": shard["optimizer_states"]}
        super().load_optimizer_state_dict(checkpoint)

    @override
    def on_train_start(self) -> None:
        """This replica's RNG state from the resumed shard, then the resume is over."""
        self.checkpoints.start_training()

    # ================================================================== registry
    @override
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``<strategy_name>``, ``<strategy_name>_spawn`` and ``<strategy_name>_fork``."""
        if cls.strategy_name == ReplicaStrategy.strategy_name and cls is not ReplicaStrategy:
            return
        register_name(strategy_registry, cls.strategy_name, cls, description=cls.__name__)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _load_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _per_replica_callback_keys(trainer: Trainer | None) -> set[str]:
    """State keys of the Trainer's callbacks that declare ``per_replica_state = True``."""
    if trainer is None:
        return set()
    return {cb.state_key for cb in callbacks_of(trainer) if getattr(cb, "per_replica_state", False)}
