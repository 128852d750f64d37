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
* at the end of ``fit`` leaves every rank holding the same consensus weights (``final_sync``; it
  runs in the strategy's ``on_train_end``, after the callbacks' ``on_train_end`` and before
  ``on_fit_end``);
* checkpoints: the checkpoint file's ``state_dict`` is the consensus model (loadable by plain
  Lightning/PyTorch), its ``"lightning_fedopt"`` entry holds the replicated algorithm state, and
  every rank writes its own replica's weights, optimizer states, algorithm state, RNG state and
  counters to ``<checkpoint>.replicas/rank<r>.pt``. Resuming with the same world size restores
  every replica exactly; with a different world size every replica restarts from the consensus.

Subclasses implement :meth:`sync` and :meth:`consensus_values`, and override the state hooks if
they keep state between rounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from lightning_fedopt.comm import Communicator
from lightning_fedopt.schedules import SyncSchedule, as_schedule
from lightning_fedopt.strategies._counted import CountedCollectives

log = logging.getLogger("lightning_fedopt")

__all__ = ["ReplicaStrategy"]

_EVALUATE = ("consensus", "local")
_START_METHODS = ("popen", "spawn", "fork", "forkserver")
_INITIAL_SYNC = ("broadcast", "check")
CHECKPOINT_KEY = "lightning_fedopt"
CHECKPOINT_FORMAT = 1


def replica_shard_path(filepath: str | os.PathLike, rank: int) -> str:
    """Where rank ``rank`` keeps its replica state for the checkpoint at ``filepath``.

    ``<checkpoint>.replicas/rank<r>.pt`` next to the checkpoint; a local symbolic link (Lightning's
    ``save_last="link"``) leads to the shards of the checkpoint it points to. Remote paths
    (``s3://...``) are used as they are.
    """
    path = os.fspath(filepath)
    if "://" not in path:
        path = os.path.realpath(path)
    return f"{path}.replicas/rank{rank}.pt"


def state_digest(tensors: list[Tensor]) -> Tensor:
    """SHA-256 of the tensors' dtypes, shapes and bytes, as 32 ``uint8`` values on the CPU.

    Two replicas have the same digest when their tensors are bit-for-bit equal (up to SHA-256
    collisions); ``-0.0`` and ``0.0`` or two NaN payloads count as different, as they are.
    """
    h = hashlib.sha256()
    for t in tensors:
        data = t.detach().contiguous().cpu()
        h.update(f"{data.dtype}{tuple(data.shape)};".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


class _ManualOptimizationHooks(Callback):
    """Internal: the batch-end point of the loop, needed only under manual optimization.

    With automatic optimization a step ends inside :meth:`ReplicaStrategy.optimizer_step`. With
    manual optimization a batch may step several optimizers, so the step ends at batch end; this
    callback is then put first in ``trainer.callbacks`` so that the callbacks after it
    (checkpointing, monitors) see the state after synchronisation.
    """

    def __init__(self, strategy: ReplicaStrategy) -> None:
        self.strategy = strategy

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.strategy._stepped:
            self.strategy._stepped = False
            self.strategy._end_step()


class ReplicaStrategy(CountedCollectives, DDPStrategy):
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
        if evaluate not in _EVALUATE:
            raise ValueError(f"`evaluate` must be one of {_EVALUATE}, got {evaluate!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"`group_size` must be an integer >= 1, got {group_size!r}")
        if round_seconds is not None:
            if not (
                isinstance(round_seconds, (int, float)) and math.isfinite(round_seconds) and round_seconds > 0
            ):
                raise ValueError(
                    f"`round_seconds` must be a finite number > 0 or None, got {round_seconds!r}"
                )
            if not self.supports_round_seconds:
                raise ValueError(
                    f"`round_seconds` (heterogeneous local work) is not supported by {type(self).__name__}"
                )
        if start_method not in _START_METHODS:
            raise ValueError(f"`start_method` must be one of {_START_METHODS}, got {start_method!r}")
        if initial_sync not in _INITIAL_SYNC:
            raise ValueError(f"`initial_sync` must be one of {_INITIAL_SYNC}, got {initial_sync!r}")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,  # type: ignore[arg-type]
        )
        self.schedule: SyncSchedule = as_schedule(sync_every, warmup_steps)
        self.evaluate = evaluate
        self.final_sync_enabled = bool(final_sync)
        self.include_frozen = bool(include_frozen)
        self.comm = Communicator()
        self.group_size = group_size
        self.round_seconds = None if round_seconds is None else float(round_seconds)
        self.initial_sync = initial_sync
        self._outer_comm: Communicator | None = None
        self._inner_comm: Communicator | None = None
        #: set by :class:`~lightning_fedopt.callbacks.CommunicationMonitor`: measure the consensus
        #: distance at every synchronisation (costs one scalar all-reduce).
        self.track_consensus_distance = False
        self._hooks = _ManualOptimizationHooks(self)
        #: count samples per round (for sample-proportional weights); off saves a little per step
        self.count_samples = False
        self._reset_run_state()

    # ================================================================== public state
    @property
    def replica_step(self) -> int:
        """Optimizer steps this replica has taken (one per training batch in which any optimizer stepped)."""
        return self._replica_step

    @property
    def steps_since_sync(self) -> int:
        return self._steps_since_sync

    @property
    def sync_count(self) -> int:
        """Synchronisations done so far (the final one at the end of fit included)."""
        return self._sync_count

    @property
    def last_sync(self) -> dict[str, float]:
        """What the last synchronisation reported (step, seconds, excluded replicas, ...)."""
        return dict(self._last_sync)

    @property
    def nonfinite_events(self) -> list[dict[str, int]]:
        """One entry per synchronisation at which some replica had non-finite weights."""
        return list(self._nonfinite_events)

    @property
    def round_effective_steps(self) -> int:
        """Steps this replica computed in the current round (fewer than the round's batches when
        ``round_seconds`` cut it short)."""
        return self._effective_steps

    @property
    def effective_steps_history(self) -> list[int]:
        """Steps this replica computed in each finished round (``round_seconds`` runs)."""
        return list(self._effective_history)

    @property
    def outer_comm(self) -> Communicator:
        """The communicator the algorithm synchronises over: the world, or with ``group_size > 1``
        the same-position ranks of every group."""
        return self._outer_comm if self._outer_comm is not None else self.comm

    @property
    def outer_world_size(self) -> int:
        """Number of replicas the algorithm sees (groups count as one replica)."""
        return self.world_size // self.group_size

    @property
    def outer_rank(self) -> int:
        """This replica's index among :attr:`outer_world_size` (its group's index)."""
        return self.global_rank // self.group_size

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
        """Make every replica hold the consensus at the end of fit."""
        if self.local_is_consensus():
            return
        values = self.cached_consensus_values()
        with torch.no_grad():
            for t, v in zip(self.tracked_tensors(), values):
                t.copy_(v)
        self._after_final_sync()

    def cached_consensus_values(self) -> list[Tensor]:
        """:meth:`consensus_values`, computed at most once between two optimizer steps.

        Validation, a checkpoint and the final synchronisation at the same step share one result.
        """
        if self._consensus_cache is None:
            self._consensus_cache = [v.detach().clone() for v in self.consensus_values()]
        return self._consensus_cache

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

    # ================================================================== tracked tensors
    def tracked_named_tensors(self) -> list[tuple[str, Tensor]]:
        """The tensors the algorithm keeps in agreement: floating-point parameters and buffers.

        Parameters frozen when ``fit`` starts are included unless ``include_frozen=False`` (they
        may be unfrozen later, e.g. by Lightning's ``BackboneFinetuning``).
        """
        return list(zip(self._tracked_names, self._tracked))

    def tracked_tensors(self) -> list[Tensor]:
        return list(self._tracked)

    def _collect_tracked(self) -> None:
        module = self.lightning_module
        assert module is not None
        names, tensors, ids = [], [], {}
        for name, p in module.named_parameters():
            if torch.is_floating_point(p) and (p.requires_grad or self.include_frozen):
                ids[id(p)] = len(tensors)
                names.append(name)
                tensors.append(p.data)
        for name, b in module.named_buffers():
            if torch.is_floating_point(b):
                ids[id(b)] = len(tensors)
                names.append(name)
                tensors.append(b)
        self._tracked_names, self._tracked, self._tracked_ids = names, tensors, ids
        self._tracked_module = id(module)

    def _state_dict_with(self, values: list[Tensor]) -> dict[str, Any]:
        """The module's state dict with every tracked tensor replaced by ``values`` (by tensor
        identity, so tied weights and non-persistent buffers come out right)."""
        module = self.lightning_module
        assert module is not None
        out = {}
        for key, value in module.state_dict(keep_vars=True).items():
            i = self._tracked_ids.get(id(value))
            out[key] = (values[i] if i is not None else value).detach().clone()
        return out

    def _module_state_tensors(self) -> list[Tensor]:
        module = self.lightning_module
        assert module is not None
        return [p.data for p in module.parameters()] + list(module.buffers())

    # ================================================================== Lightning plumbing
    def _reset_run_state(self) -> None:
        self._replica_step = 0
        self._steps_since_sync = 0
        self._sync_count = 0
        self._samples_since_sync = 0
        self._stepped = False
        self._effective_steps = 0
        self._round_compute = 0.0
        self._skip_step = False
        self._effective_history: list[int] = []
        self._last_sync: dict[str, float] = {}
        self._nonfinite_events: list[dict[str, int]] = []
        self._tracked_names: list[str] = []
        self._tracked: list[Tensor] = []
        self._tracked_ids: dict[int, int] = {}
        self._tracked_module: int | None = None
        self._algorithm_ready = False
        self._eval_backup: list[Tensor] | None = None
        self._consensus_cache: list[Tensor] | None = None
        self._resume_meta: dict[str, Any] | None = None
        self._resume_shard: dict[str, Any] | None = None
        self._weights_from_shard = False

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
            module = self.lightning_module
            if (
                module is not None
                and not module.automatic_optimization
                and self._hooks not in trainer.callbacks
            ):
                trainer.callbacks.insert(0, self._hooks)
            self._patch_sigterm_check(trainer)
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
        tensors = self._module_state_tensors()
        comm = self.comm
        if self.initial_sync == "check" and comm.available and comm.world_size > 1:
            device = tensors[0].device if tensors else self.root_device
            digests = comm.all_gather(state_digest(tensors).to(device), purpose="setup").wait()
            differ = [r for r, d in enumerate(digests) if not torch.equal(d, digests[0])]
            if not differ:
                log.info(
                    "lightning_fedopt: all %d replicas start from the same weights; nothing broadcast",
                    comm.world_size,
                )
                return
            log.info(
                "lightning_fedopt: ranks %s start from other weights than rank 0: broadcasting rank 0's",
                differ,
            )
        comm.broadcast(tensors, src=0, purpose="setup")

    def _check_group_size(self, world_size: int) -> None:
        if world_size % self.group_size:
            raise ValueError(
                f"`group_size` ({self.group_size}) must divide the number of processes ({world_size})"
            )

    def _configure_launcher(self) -> None:
        self._check_group_size(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    def _setup_groups(self) -> None:
        """Create the intra-group and across-group process groups (once per process)."""
        g = self.group_size
        if g == 1 or self._outer_comm is not None:
            return
        self._check_group_size(self.world_size)
        n_groups = self.world_size // g
        self._inner_comm = self.comm.split([list(range(k * g, (k + 1) * g)) for k in range(n_groups)])
        self._outer_comm = self.comm.split([list(range(j, self.world_size, g)) for j in range(g)])

    def _average_gradients_in_group(self) -> None:
        """Inside a group, every step: mean of the gradients over the fast links (like DDP)."""
        comm = self._inner_comm
        if comm is None or comm.world_size == 1:
            return
        grads = [p.grad for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        grads = [gr for gr in grads if gr is not None]
        if grads:
            comm.all_reduce(grads, "mean", purpose="inner")

    def configure_ddp(self) -> None:
        """No DDP wrapper: make the replicas identical, then set up the algorithm."""
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

    def teardown(self) -> None:
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None:
            if self._hooks in trainer.callbacks:
                trainer.callbacks.remove(self._hooks)
            trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)
        # a resume whose fit loop never ran (training already complete) must not leak into the next fit
        self._resume_meta, self._resume_shard, self._weights_from_shard = None, None, False
        super().teardown()

    def _patch_sigterm_check(self, trainer: Trainer) -> None:
        """Lightning broadcasts a SIGTERM flag from rank 0 before *every* training batch, which puts
        the replicas in lockstep and costs a network round trip per step. Replicas only need to
        agree to stop where they meet anyway: check the flag before synchronisation steps only."""
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = self._sigterm_check  # instance attribute; removed in teardown

    def _sigterm_check(self) -> None:
        if not self.schedule.should_sync(self._replica_step + 1):
            return
        trainer = getattr(self.lightning_module, "_trainer", None)
        # int64, as Lightning's own SIGTERM notifier broadcasts it (the two may pair up)
        flag = torch.tensor(
            [1 if getattr(trainer, "received_sigterm", False) else 0], device=self.root_device
        )
        self.comm.broadcast([flag], src=0, purpose="control")
        if int(flag.item()) == 1:
            with contextlib.suppress(Exception):
                self.comm.barrier(purpose="control")
            raise SIGTERMException()

    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        t0 = time.perf_counter()
        if self._inner_comm is not None:
            inner = closure

            def closure() -> Any:  # gradients are averaged in the group before the optimizer uses them
                result = inner()
                self._average_gradients_in_group()
                return result

        out = super().optimizer_step(optimizer, closure, model, **kwargs)
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
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.round_seconds is not None and self._round_compute >= self.round_seconds:
            # this replica's time for the round is spent: skip the rest of the round's batches. The
            # optimizer step still runs, with no gradients (a constant loss), so that every rank counts
            # the same steps (Lightning refuses a None loss in distributed training)
            self._skip_step = True
            return torch.zeros((), device=self.root_device, requires_grad=True)
        return super().training_step(*args, **kwargs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.count_samples:
            try:
                self._samples_since_sync += int(extract_batch_size(batch))
            except Exception:  # a batch whose size cannot be told counts as one sample
                self._samples_since_sync += 1

    def _end_step(self) -> None:
        self._consensus_cache = None
        self._replica_step += 1
        self._steps_since_sync += 1
        if self.schedule.should_sync(self._replica_step):
            self._run_sync()

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

    def on_train_end(self) -> None:
        """The final synchronisation (after the callbacks' ``on_train_end``, before ``on_fit_end``)."""
        if self.final_sync_enabled and self._algorithm_ready:
            before = self.local_is_consensus()
            self.final_sync()
            if not before:
                self._sync_count += 1
                self._close_round()
            self._steps_since_sync = 0
        self._consensus_cache = None

    # ---------------------------------------------------------------- helpers for algorithms
    def is_finite(self, tensors: list[Tensor] | None = None) -> bool:
        """Whether all of ``tensors`` (default: the tracked ones) are finite."""
        tensors = self._tracked if tensors is None else tensors
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def consensus_distance(self, local: list[Tensor], consensus: list[Tensor], valid: bool) -> float:
        """Mean over valid replicas of ``||theta_i - theta_bar|| / ||theta_bar||`` (one scalar all-reduce)."""
        with torch.no_grad():
            if valid:
                diff = math.sqrt(
                    sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(local, consensus))
                )
            else:
                diff = 0.0
            norm = math.sqrt(sum(float(b.double().pow(2).sum()) for b in consensus))
        buf = torch.tensor([diff, float(valid)], dtype=torch.float64, device=self.root_device)
        self.outer_comm.all_reduce([buf], "sum", purpose="metrics")
        n_valid = float(buf[1])
        return float(buf[0]) / n_valid / max(norm, 1e-12) if n_valid > 0 else float("nan")

    def record_nonfinite(self, excluded: int, local: bool) -> None:
        """Note a synchronisation that excluded ``excluded`` replicas with non-finite weights."""
        event = {
            "step": self._replica_step,
            "excluded": int(excluded),
            "rank": self.global_rank,
            "local": int(local),
        }
        self._nonfinite_events.append(event)
        if local:
            log.warning(
                "lightning_fedopt: replica %d has non-finite weights at step %d; it was excluded from the "
                "average and reset to the result",
                self.global_rank,
                self._replica_step,
            )
        elif self.global_rank == 0:
            log.warning(
                "lightning_fedopt: %d replica(s) with non-finite weights excluded at step %d",
                excluded,
                self._replica_step,
            )

    def reset_optimizer_state(self) -> None:
        """Forget this replica's optimizer state (after its weights were replaced by a non-finite reset)."""
        for opt in self.optimizers:
            opt.state.clear()

    # ================================================================== evaluation on the consensus
    @contextlib.contextmanager
    def consensus_swapped(self) -> Any:
        """Run the block with the consensus model's weights in the module, then restore the replica's.

        A collective call for algorithms whose consensus needs communication (every rank must enter
        it at the same point), used e.g. by :class:`~lightning_fedopt.callbacks.Curriculum` to score
        samples under the consensus model. Does nothing when the consensus is already swapped in.
        """
        swapped = self._eval_backup is None
        if swapped:
            self._swap_in_consensus(force=True)
        try:
            yield
        finally:
            if swapped:
                self._swap_out_consensus()

    def _swap_in_consensus(self, force: bool = False) -> None:
        if (not force and self.evaluate != "consensus") or not self._algorithm_ready:
            return
        if self._eval_backup is not None or self.local_is_consensus():
            return
        values = self.cached_consensus_values()
        with torch.no_grad():
            self._eval_backup = [t.detach().clone() for t in self._tracked]
            for t, v in zip(self._tracked, values):
                t.copy_(v)

    def _swap_out_consensus(self) -> None:
        if self._eval_backup is None:
            return
        with torch.no_grad():
            for t, v in zip(self._tracked, self._eval_backup):
                t.copy_(v)
        self._eval_backup = None

    def on_validation_start(self) -> None:
        self._swap_in_consensus()

    def on_validation_end(self) -> None:
        self._swap_out_consensus()

    def on_test_start(self) -> None:
        self._swap_in_consensus()

    def on_test_end(self) -> None:
        self._swap_out_consensus()

    def on_predict_start(self) -> None:
        self._swap_in_consensus()

    def on_predict_end(self) -> None:
        self._swap_out_consensus()

    # ================================================================== checkpoints
    def _local_module_state_dict(self) -> dict[str, Any]:
        """This replica's own weights, even while the consensus is swapped in for evaluation."""
        module = self.lightning_module
        assert module is not None
        if self._eval_backup is not None:
            return self._state_dict_with(self._eval_backup)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The consensus model's state dict (what plain Lightning/PyTorch loads from the checkpoint)."""
        module = self.lightning_module
        assert module is not None
        if not self._algorithm_ready or self._eval_backup is not None or self.local_is_consensus():
            return module.state_dict()
        return self._state_dict_with(self.cached_consensus_values())

    def _counters(self) -> dict[str, int]:
        return {
            "replica_step": self._replica_step,
            "steps_since_sync": self._steps_since_sync,
            "sync_count": self._sync_count,
            "samples_since_sync": self._samples_since_sync,
            "effective_steps": self._effective_steps,
        }

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        full = self._algorithm_ready and "optimizer_states" in checkpoint
        if full:
            checkpoint[CHECKPOINT_KEY] = {
                "format": CHECKPOINT_FORMAT,
                "strategy": type(self).__name__,
                "world_size": self.world_size,
                "counters": self._counters(),
                "algorithm": self.algorithm_state_dict(),
                "replica_shards": True,
            }
            shard = {
                "format": CHECKPOINT_FORMAT,
                "rank": self.global_rank,
                "world_size": self.world_size,
                "module": self._local_module_state_dict(),
                "optimizer_states": [self.optimizer_state(opt) for opt in self.optimizers],
                "replica": self.replica_state_dict(),
                "counters": self._counters(),
                "comm_stats": self.comm.stats.state_dict(),
                "nonfinite_events": list(self._nonfinite_events),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
            }
            # callbacks whose state differs between replicas (a curriculum's per-rank scores) keep
            # this rank's copy here; the checkpoint file itself holds rank 0's
            keys = self._per_replica_callback_keys()
            shard["callbacks"] = {k: v for k, v in checkpoint.get("callbacks", {}).items() if k in keys}
            self.checkpoint_io.save_checkpoint(shard, replica_shard_path(filepath, self.global_rank))
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _per_replica_callback_keys(self) -> set[str]:
        """State keys of the Trainer's callbacks that declare ``per_replica_state = True``."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None:
            return set()
        return {cb.state_key for cb in trainer.callbacks if getattr(cb, "per_replica_state", False)}

    def remove_checkpoint(self, filepath: Any) -> None:
        path = os.fspath(filepath)
        # removing a link (save_last="link") must not take the linked checkpoint's shards with it
        linked = "://" not in path and os.path.islink(path)
        shard = replica_shard_path(path, self.global_rank)
        super().remove_checkpoint(filepath)
        fs = get_filesystem(shard)
        if not linked and fs.exists(shard):
            self.checkpoint_io.remove_checkpoint(shard)
            with contextlib.suppress(OSError):  # other ranks' shards may still be there
                fs.rmdir(os.path.dirname(shard))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        meta = checkpoint.get(CHECKPOINT_KEY)
        module = self.lightning_module
        fitting = (
            module is not None
            and module._trainer is not None
            and module.trainer.state.fn == TrainerFn.FITTING
        )
        self._resume_meta, self._resume_shard = None, None
        if not fitting or meta is None:
            return checkpoint
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint {checkpoint_path}: unsupported lightning_fedopt format {meta.get('format')!r}"
            )
        self._resume_meta = meta
        if meta.get("replica_shards") and meta["world_size"] == self.world_size:
            path = replica_shard_path(checkpoint_path, self.global_rank)
            # every rank learns whether any shard is missing, so that all of them stop (none hangs)
            found = self.comm.all_gather_object(get_filesystem(path).exists(path), purpose="control")
            if not all(found):
                missing = [r for r, ok in enumerate(found) if not ok]
                raise FileNotFoundError(
                    f"the replica shard(s) of rank(s) {missing} of checkpoint {checkpoint_path} are missing "
                    f"(rank {self.global_rank} looked for {path}); copy the whole '<checkpoint>.replicas' "
                    "folder along with the checkpoint"
                )
            self._resume_shard = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
            if self._resume_shard.get("callbacks"):
                checkpoint.setdefault("callbacks", {}).update(self._resume_shard["callbacks"])
        elif meta.get("replica_shards"):
            log.warning(
                "lightning_fedopt: checkpoint was written by %d replicas, resuming with %d; every replica "
                "restarts from the consensus weights",
                meta["world_size"],
                self.world_size,
            )
        return checkpoint

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        self._consensus_cache = None
        if self._resume_shard is not None:
            assert self.lightning_module is not None
            self.lightning_module.load_state_dict(self._resume_shard["module"], strict=strict)
            self._weights_from_shard = True
            return
        super().load_model_state_dict(checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if self._resume_shard is not None:
            checkpoint = {"optimizer_states": self._resume_shard["optimizer_states"]}
        super().load_optimizer_state_dict(checkpoint)

    def _restore_from_resume(self) -> None:
        meta, shard = self._resume_meta, self._resume_shard
        assert meta is not None
        counters = shard["counters"] if shard is not None else dict(meta["counters"], steps_since_sync=0)
        self._replica_step = int(counters["replica_step"])
        self._steps_since_sync = int(counters["steps_since_sync"])
        self._sync_count = int(counters["sync_count"])
        self._samples_since_sync = int(counters["samples_since_sync"]) if shard is not None else 0
        self._effective_steps = int(counters.get("effective_steps", 0)) if shard is not None else 0
        self.load_algorithm_state_dict(meta["algorithm"])
        if shard is not None:
            self.load_replica_state_dict(shard["replica"])
            self.comm.stats.load_state_dict(shard["comm_stats"])
            self._nonfinite_events = list(shard.get("nonfinite_events", []))

    def on_train_start(self) -> None:
        shard = self._resume_shard
        if shard is not None:
            torch.set_rng_state(shard["rng"]["torch"])
            if shard["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(shard["rng"]["cuda"])
        self._resume_meta, self._resume_shard, self._weights_from_shard = None, None, False

    # ================================================================== registry
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``<strategy_name>``, ``<strategy_name>_spawn`` and ``<strategy_name>_fork``."""
        if cls.strategy_name == ReplicaStrategy.strategy_name and cls is not ReplicaStrategy:
            return
        for suffix, method in (("", "popen"), ("_spawn", "spawn"), ("_fork", "fork")):
            name = cls.strategy_name + suffix
            if name in strategy_registry:
                continue
            strategy_registry.register(
                name, cls, description=f"{cls.__name__} with start_method={method!r}", start_method=method
            )
