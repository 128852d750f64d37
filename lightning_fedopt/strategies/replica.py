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

This module holds the step loop, the schedule and the algorithm interface; the rest lives in
mixins of :class:`ReplicaStrategy`, one module each: ``_state`` (counters, last sync, NaN events),
``_shards`` (checkpoint shards and the :class:`~lightning_fedopt.strategies._shards.Counters`
saved in them), ``_consensus`` (the consensus swapped in for evaluation and checkpoints),
``_tracked`` (the tracked tensors), ``_groups`` (``group_size`` hierarchies), ``_patches``
(changes to Lightning's loop: the SIGTERM check, the manual-optimization hook),
``_initial_sync`` (:func:`state_digest` and the start-up broadcast), ``_finish`` (the last step,
validation of a changed model), ``_batchnorm`` (BatchNorm statistics of the consensus) and
``_rendezvous`` (ranks out of step).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_choice, check_float, check_int, check_timeout
from lightning_fedopt.comm import Communicator
from lightning_fedopt.schedules import SyncSchedule, as_schedule
from lightning_fedopt.strategies._batchnorm import BatchNormStatistics
from lightning_fedopt.strategies._consensus import ConsensusEvaluation
from lightning_fedopt.strategies._counted import CountedCollectives
from lightning_fedopt.strategies._faults import Failures, SyncPointCheckpoints
from lightning_fedopt.strategies._finish import FitEnd
from lightning_fedopt.strategies._groups import ReplicaGroups
from lightning_fedopt.strategies._handshake import agreement_fields, check_agreement
from lightning_fedopt.strategies._initial_sync import INITIAL_SYNC, start_identical, state_digest
from lightning_fedopt.strategies._patches import LoopPatches, ManualOptimizationHooks
from lightning_fedopt.strategies._registry import register_name
from lightning_fedopt.strategies._rendezvous import StepCheck
from lightning_fedopt.strategies._shards import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_KEY,
    Counters,
    ShardedCheckpoints,
    replica_shard_path,
)
from lightning_fedopt.strategies._state import ReplicaState
from lightning_fedopt.strategies._tracked import TrackedTensors

log = logging.getLogger("lightning_fedopt")

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEY", "ReplicaStrategy", "replica_shard_path", "state_digest"]

_EVALUATE = ("consensus", "local")
_START_METHODS = ("popen", "spawn", "fork", "forkserver")
_INITIAL_SYNC = INITIAL_SYNC
_ManualOptimizationHooks = ManualOptimizationHooks  # the name it had before it moved to _patches


class ReplicaStrategy(
    ReplicaState,
    FitEnd,
    BatchNormStatistics,
    Failures,
    StepCheck,
    ShardedCheckpoints,
    ConsensusEvaluation,
    TrackedTensors,
    ReplicaGroups,
    LoopPatches,
    CountedCollectives,
    DDPStrategy,
):
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
            :mod:`~lightning_fedopt.strategies._batchnorm`.
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

    def __init__(
        self,
        sync_every: int | SyncSchedule = 1,
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
        check_choice("initial_sync", initial_sync, _INITIAL_SYNC)
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
        self.comm = Communicator()
        self.group_size = group_size
        self.round_seconds = round_seconds
        self.initial_sync = initial_sync
        self.skip_unchanged_validation = check_bool("skip_unchanged_validation", skip_unchanged_validation)
        self.bn_recalibration = bn_recalibration
        self.bn_forward = bn_forward
        self.sync_timeout = check_float("sync_timeout", sync_timeout, low=0, low_open=True, high=86400.0)
        self.elastic = check_bool("elastic", elastic)
        self._liveness = None
        self._sync_points = SyncPointCheckpoints(self)
        self._sigterm_received = False
        self._preempt = False
        self._saved_sync = 0
        self._elastic_kept = []
        self._outer_comm: Communicator | None = None
        self._inner_comm: Communicator | None = None
        #: set by :class:`~lightning_fedopt.callbacks.CommunicationMonitor`: measure the consensus
        #: distance at every synchronisation (costs one scalar all-reduce).
        self.track_consensus_distance = False
        self._hooks = ManualOptimizationHooks(self)
        #: count samples per round (for sample-proportional weights); off saves a little per step
        self.count_samples = False
        self._reset_run_state()

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
        return self._steps_since_sync == 0

    def final_sync(self) -> None:
        """Make every replica hold the consensus at the end of fit (at the last step when Lightning's
        stop is foreseeable; algorithms may fold pending work into the consensus here)."""
        if self.local_is_consensus():
            return
        self._load_consensus()

    def _after_final_sync(self) -> None:
        """Hook for algorithms whose global state must follow the final consensus."""

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

    # ================================================================== Lightning plumbing
    def _reset_run_state(self) -> None:
        self._counts = Counters()
        self._stepped = False
        self._round_compute = 0.0
        self._skip_step = False
        self._effective_history: list[int] = []
        self._last_sync: dict[str, float] = {}
        self._nonfinite_events: list[dict[str, int]] = []
        self._reset_tracked()
        self._algorithm_ready = False
        self._eval_backup = None
        self._consensus_cache = None
        self._resume_meta = None
        self._resume_shard = None
        self._weights_from_shard = False
        self._closed = False
        self._checked_step = None
        self._validated_version = None
        self._skipped_validations = 0
        self._bn_batches: deque[Any] = deque(maxlen=max(self.bn_recalibration, 1))
        self._bn_training: set[int] = set()

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
            self._patch_loop(trainer)
            self.configure_ddp()
            self.setup_optimizers(trainer)
        else:
            self._consensus_cache = None
            if self._algorithm_ready and self._tracked_module == id(self.lightning_module):
                # evaluation after a fit: the module may have moved devices since (teardown moves it
                # to CPU), so point at its live tensors again; the replicas may legitimately differ
                self._collect_tracked()
            else:
                # evaluation without a fit (or of another module): start every rank from rank 0's weights
                self._algorithm_ready = False
                self._start_identical()
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _start_identical(self) -> None:
        """Give every replica rank 0's weights and buffers (``initial_sync``)."""
        start_identical(self.comm, self._module_state_tensors(), self.initial_sync, self.root_device)

    @override
    def configure_ddp(self) -> None:
        """No DDP wrapper: check that every rank runs the same configuration on the same model
        structure (the start-up handshake), make the replicas identical, set up the algorithm."""
        self._start_liveness()
        check_agreement(self.comm, agreement_fields(self), device=self.root_device)
        if self._resume_meta is None:
            # a new fit (not a resume) starts the algorithm afresh
            stats = self.comm.stats
            self._reset_run_state()
            self.comm.stats = stats
            stats.reset()
        if not self._weights_from_shard:
            self._start_identical()
        self._setup_groups()
        module = self.lightning_module
        if self.round_seconds is not None and module is not None and not module.automatic_optimization:
            raise ValueError("`round_seconds` (heterogeneous local work) needs automatic optimization")
        self._collect_tracked()
        self.setup_algorithm()
        if self._resume_meta is not None:
            self._restore_from_resume()
        self._algorithm_ready = True

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None:
            self._patch_resume(trainer)

    @override
    def teardown(self) -> None:
        self._stop_liveness()
        self._unpatch_loop()
        # a resume whose fit loop never ran (training already complete) must not leak into the next fit
        self._forget_resume()
        super().teardown()

    @override
    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        t0 = time.perf_counter()
        out = super().optimizer_step(optimizer, self._group_closure(closure), model, **kwargs)
        if self._skip_step:
            self._skip_step = False
        else:
            self._effective_steps += 1
            self._round_compute += time.perf_counter() - t0
        module = self.lightning_module
        if module is not None and module.automatic_optimization:
            self._end_step()  # one optimizer per step: the step is over
        else:
            self._stepped = True  # several optimizers may step: the batch end closes the step
        return out

    # ---------------------------------------------------------------- the loop's points
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.round_seconds is not None and self._round_compute >= self.round_seconds:
            # this replica's time for the round is spent: skip the rest of the round's batches. The
            # optimizer step still runs, with no gradients (a constant loss), so that every rank counts
            # the same steps (Lightning refuses a None loss in distributed training)
            self._skip_step = True
            return torch.zeros((), device=self.root_device, requires_grad=True)
        return super().training_step(*args, **kwargs)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._record_batch(batch)
        if self.count_samples:
            try:
                self._samples_since_sync += int(extract_batch_size(batch))
            except Exception:  # a batch whose size cannot be told counts as one sample
                self._samples_since_sync += 1

    def _end_step(self) -> None:
        self._consensus_cache = None
        self._closed = False
        self._replica_step += 1
        self._steps_since_sync += 1
        if self.schedule.should_sync(self._replica_step):
            self._run_sync()
        if self.final_sync_enabled and self._is_last_training_step():
            # close training in its last step, before that step's validation and checkpoints
            self._close_training(self.final_sync)
            self._closed = True

    def _run_sync(self) -> None:
        seconds_before = self.comm.stats.seconds
        info = self.sync() or {}
        self._sync_count += 1
        self._steps_since_sync = 0
        self._samples_since_sync = 0
        self._close_round()
        info = {**info, "step": self._replica_step, "sync_seconds": self.comm.stats.seconds - seconds_before}
        self._last_sync = info

    def _close_round(self) -> None:
        if self.round_seconds is not None:
            self._effective_history.append(self._effective_steps)
        self._effective_steps = 0
        self._round_compute = 0.0

    # ================================================================== registry
    @override
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``<strategy_name>``, ``<strategy_name>_spawn`` and ``<strategy_name>_fork``."""
        if cls.strategy_name == ReplicaStrategy.strategy_name and cls is not ReplicaStrategy:
            return
        register_name(strategy_registry, cls.strategy_name, cls, description=cls.__name__)
