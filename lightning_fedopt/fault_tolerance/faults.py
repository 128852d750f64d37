"""Failures: a deadline on the synchronisation, preemption, and sync-point checkpoints for elastic runs.

:class:`FaultHandler` is a part of :class:`~lightning_fedopt.strategies.ReplicaStrategy` (``strategy.faults``),
the one object that owns the liveness, the preemption flags and the sync-point checkpoints, with a
pluggable :class:`StopPolicy` (how the ranks agree to stop; NoLoCo, which has no global meeting
point, passes its own).

* **Deadline.** The replicas' traffic runs on a process group whose timeout is ``sync_timeout``;
  :class:`~lightning_fedopt.fault_tolerance.liveness.Liveness` tells a slow peer (heartbeat alive: wait)
  from a lost one, and a lost peer raises :class:`~lightning_fedopt.fault_tolerance.liveness.ReplicaLostError`
  on every survivor, naming it. After that every operation of the strategy's communicators fails
  at once (no second wait), so Lightning's exception path (``on_exception`` callbacks, teardown)
  cannot hang on the dead peer.
* **Preemption.** Lightning's SIGTERM handler broadcasts from rank 0 *inside the signal handler*,
  which deadlocks when one rank alone is signalled. The strategy's handler only records the signal;
  the flag travels with the rendezvous before the next synchronisation (no extra collective), so
  every rank learns of it there, runs the synchronisation, writes a checkpoint at the
  synchronisation point and stops with Lightning's ``SIGTERMException`` (a ``SystemExit``: status 0).
  The checkpoint is the elastic one (below) with ``elastic=True``, else Lightning's HPC checkpoint
  ``<default_root_dir>/hpc_ckpt_<n>.ckpt``, which ``fit(ckpt_path="hpc")`` resumes (and which
  Lightning resumes by itself on SLURM).
* **Elastic** (``elastic=True``, under ``torchrun``'s elastic agent). After every synchronisation,
  where a replica's state is the round's consensus, the ranks write a checkpoint (the consensus, the
  algorithm's global state, and each rank's shard) to ``<default_root_dir>/elastic/<run id>/``
  and point ``latest`` at it. When the agent (re)starts the workers, ``fit`` resumes from ``latest``
  by itself, at whatever world size the rendezvous formed: the same size restores every replica
  exactly; another size restarts every replica from the consensus (see ``_shards``). A successful
  ``fit`` removes the folder, so a later job with the same run id starts afresh. The agent stops
  workers with SIGTERM when a node joins or leaves: every rank then stops at the next
  synchronisation, after its checkpoint; the ranks that were not signalled raise
  :class:`PeerStoppedError` so that their agents restart them too (an exit status 0 would tell
  their agents the run is over).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from typing import Any, Protocol

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_fedopt.errors import PeerStoppedError, ReplicaLostError
from lightning_fedopt.fault_tolerance.liveness import Liveness, close_quietly
from lightning_fedopt.runtime.communicators import Communicators
from lightning_fedopt.runtime.patches import LightningPatches, callbacks_of
from lightning_fedopt.runtime.shards import remove_with_shard

log = logging.getLogger("lightning_fedopt")

__all__ = [
    "AgreeAtNextSync",
    "FaultHandler",
    "FaultHost",
    "PeerStoppedError",
    "ReplicaLostError",
    "StopPolicy",
    "SyncPointCheckpoints",
    "elastic_num_nodes",
]

#: the file in the elastic folder naming the latest complete sync-point checkpoint
LATEST = "latest.json"
#: sync-point checkpoints kept (the latest, and the one before in case the latest is being written)
KEEP = 2


def elastic_num_nodes() -> int:
    """``num_nodes`` for ``Trainer`` under ``torchrun --nnodes=MIN:MAX`` (the world the rendezvous
    formed, over the processes per node); 1 outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) or 1
    return max(world // local, 1)


def _run_id() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("LIGHTNING_FEDOPT_RUN_ID") or "local"


class FaultHost(Protocol):
    """What the fault handler reads of its strategy."""

    @property
    def global_rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def replica_step(self) -> int: ...

    @property
    def sync_count(self) -> int: ...

    @property
    def checkpoint_io(self) -> CheckpointIO: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...


class StopPolicy(Protocol):
    """How the ranks agree to stop after a SIGTERM: called before every synchronisation step."""

    def before_sync(self, faults: FaultHandler, meet: Callable[[bool], bool]) -> None:
        """``meet(sigterm)`` is the meeting of the ranks before the synchronisation (it returns
        whether any rank received SIGTERM); call ``faults.agree_to_stop()`` to stop after it."""
        ...


class AgreeAtNextSync:
    """The default policy: the SIGTERM flag rides the meeting before the synchronisation; when any
    rank received it, every rank stops after that synchronisation."""

    def before_sync(self, faults: FaultHandler, meet: Callable[[bool], bool]) -> None:
        if meet(faults.sigterm_received):
            faults.agree_to_stop()


class SyncPointCheckpoints(Callback):
    """Internal: at the end of a training batch whose step synchronised, the elastic checkpoint
    and the preemption stop (placed after the manual-optimization hook, before user callbacks)."""

    def __init__(self, faults: FaultHandler, at_fit_end: Callable[[], None] | None = None) -> None:
        self.faults = faults
        self.at_fit_end = at_fit_end

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.faults.at_batch_end(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.faults.finish_elastic(trainer)
        if self.at_fit_end is not None:
            self.at_fit_end()


class FaultHandler:
    """Deadline, preemption and elastic checkpoints of one strategy (see the module doc).

    Args:
        host: the strategy (ranks, counters, checkpoint I/O, Lightning's broadcast).
        comms: the strategy's communicators (moved to the deadline group; failed together).
        sync_timeout: seconds, the deadline of the synchronisation traffic.
        elastic: write and resume sync-point checkpoints (``torchrun``'s elastic agent).
        policy: how the ranks agree to stop (default :class:`AgreeAtNextSync`).
    """

    def __init__(
        self,
        host: FaultHost,
        comms: Communicators,
        *,
        sync_timeout: float,
        elastic: bool,
        policy: StopPolicy | None = None,
    ) -> None:
        self.host = host
        self.comms = comms
        self.sync_timeout = sync_timeout
        self.elastic = elastic
        self.policy: StopPolicy = policy if policy is not None else AgreeAtNextSync()
        self.liveness: Liveness | None = None
        #: a SIGTERM reached this process (set by the handler; Lightning's own flag stays False)
        self.sigterm_received = False
        #: every rank agreed to stop after this step's synchronisation
        self.preempt = False
        self.callback = SyncPointCheckpoints(self, self._remove_callback)
        self._patches: LightningPatches | None = None
        self._saved_sync = 0
        self._elastic_kept: list[str] = []
        #: in-process fault tolerance (``fault_tolerance="torchft"``): the outer communicator across
        #: replica groups, open for one ``fit`` (see :mod:`~lightning_fedopt.fault_tolerance._torchft`)
        self.managed: Any = None
        #: the torchft rounds so far: quorum size, heals, rounds not committed, seconds in quorums
        self.torchft_totals: dict[str, float] = {}

    # ------------------------------------------------------------------ in-process fault tolerance
    def open_torchft(
        self,
        state_dict: Callable[[], Any],
        load_state_dict: Callable[[Any], object],
        *,
        group_rank: int = 0,
        group_world_size: int = 1,
        **manager_kwargs: Any,
    ) -> Any:
        """Join the replica groups through torchft's lighthouse (``TORCHFT_LIGHTHOUSE``,
        ``REPLICA_GROUP_ID``): a managed communicator whose quorum heals this group from a live peer
        with ``load_state_dict(state_dict())`` when it is behind. ``group_rank``/``group_world_size``:
        this process in its group (the Lightning world: its rank and size, whichever launcher
        started it; a group of several processes shares the world's store, ``MASTER_ADDR/PORT``)."""
        from lightning_fedopt.fault_tolerance._torchft import ManagedCommunicator, ReplicaGroupEnv

        self.close_torchft()
        self.torchft_totals = {}
        env = ReplicaGroupEnv.from_env(
            {**os.environ, "RANK": str(group_rank), "WORLD_SIZE": str(group_world_size)}
        )
        self.managed = ManagedCommunicator.from_env(
            state_dict=state_dict,
            load_state_dict=load_state_dict,
            stats=self.comms.stats,
            env=env,
            **manager_kwargs,
        )
        return self.managed

    def quorum_allowed(self, info: Any, step: int) -> bool:
        """Whether a torchft round may be applied: its quorum holds no more replica groups than this
        run has (``LIGHTNING_FEDOPT_FT_GROUPS``, set by the launcher; unset: any number). A larger
        one holds a stray client of the lighthouse (it accepts anyone who reaches its port): every
        legitimate group sees the same quorum, takes part with no weight and applies nothing."""
        limit = os.environ.get("LIGHTNING_FEDOPT_FT_GROUPS")
        if not limit or info.participants <= int(limit):
            return True
        log.error(
            "lightning_fedopt: a quorum of %d replica groups at step %d, more than the %s this run has: a "
            "stray client joined the lighthouse; this round is not applied (keep the lighthouse and the "
            "groups' ports on a private network)",
            info.participants,
            step,
            limit,
        )
        return False

    def contributors_allowed(self, count: float, info: Any, step: int) -> bool:
        """Whether a torchft round's summed contributor count is what the groups can have sent: an
        integer from 0 to the quorum's size (every group sends 0 or 1). Anything else is a client
        that is not one of the run's groups (or a corrupted message): the round is not applied."""
        if float(count).is_integer() and 0 <= count <= info.participants:
            return True
        log.error(
            "lightning_fedopt: the round of step %d summed %r contributions from %d replica groups: a client "
            "that is not one of this run's groups took part; the round is not applied",
            step,
            count,
            info.participants,
        )
        return False

    def note_round(self, info: Any, committed: bool, step: int) -> None:
        """After a torchft round: one log line when the membership changed, this group healed, or
        the round was not committed (a failure is a line, not a traceback), and the totals."""
        totals = self.torchft_totals
        last = totals.get("quorum_size")
        if last is not None and info.participants != last:
            log.warning(
                "lightning_fedopt: replica groups %s at step %d: %d -> %d in the quorum",
                "left" if info.participants < last else "joined",
                step,
                int(last),
                info.participants,
            )
        if info.healed:
            log.warning(
                "lightning_fedopt: replica group %s healed from a live peer at step %d (%d bytes)",
                os.environ.get("REPLICA_GROUP_ID", "?"),
                step,
                info.heal_bytes,
            )
        if not committed:
            log.warning(
                "lightning_fedopt: the round of step %d was not committed (a replica group failed in it); "
                "every group restarts from the global weights before it",
                step,
            )
        totals["quorum_size"] = float(info.participants)
        totals["heals"] = totals.get("heals", 0.0) + float(info.healed)
        totals["rounds_not_committed"] = totals.get("rounds_not_committed", 0.0) + float(not committed)
        totals["quorum_seconds"] = totals.get("quorum_seconds", 0.0) + float(info.seconds)

    def close_torchft(self) -> None:
        """This group leaves (the lighthouse notices by its heartbeats)."""
        if self.managed is not None:
            self.managed.close()
        self.managed = None

    # ------------------------------------------------------------------ deadline
    def start(self) -> None:
        """At the start of ``fit`` (whose ``setup_environment`` opened the world communicator afresh):
        the deadline communicator and the heartbeat."""
        self.stop()
        world = self.comms.world
        if not world.available or world.world_size == 1:
            return
        comm = self.comms.use_deadline(self.sync_timeout, self.on_comm_failure)
        nonce = comm.broadcast_object(secrets.token_hex(8) if comm.rank == 0 else None, purpose="setup")
        self.liveness = Liveness(
            self.host.global_rank, self.host.world_size, self.sync_timeout, f"lightning_fedopt/{nonce}/"
        )

    def stop(self) -> None:
        """The heartbeat stops (teardown, or after a loss)."""
        close_quietly(self.liveness)
        self.liveness = None

    def _lost(self, during: str) -> Callable[[list[int], str], ReplicaLostError]:
        def make(ranks: list[int], detail: str) -> ReplicaLostError:
            err = ReplicaLostError(ranks, int(self.host.replica_step), during, detail)
            self.comms.fail(err)
            if self.liveness is not None:
                self.liveness.announce_abort()
            self.stop()
            log.error("%s", err)
            return err

        return make

    def _during(self, op: str, purpose: str) -> str:
        step = int(self.host.replica_step)
        if purpose == "sync":
            return f"the synchronisation of step {step} ({op})"
        return f"a {purpose} {op} after step {step}"

    def on_comm_failure(self, exc: BaseException, op: str, purpose: str) -> None:
        """A collective failed: if a peer is gone, raise :class:`ReplicaLostError` instead."""
        if isinstance(exc, ReplicaLostError) or self.liveness is None:
            return
        err = self.liveness.explain(exc, self._lost(self._during(op, purpose)))
        if err is not None:
            raise err from exc

    def arrive(self, what: str) -> None:
        """Before a meeting point's collective: wait for every rank while their heartbeats live."""
        if self.liveness is not None:
            self.liveness.arrive(self._lost(what))

    # ------------------------------------------------------------------ preemption
    def install(self, trainer: Trainer, patches: LightningPatches, callback_index: int) -> None:
        """At the start of ``fit``: Lightning's SIGTERM notifier (it broadcasts inside the signal
        handler) replaced by one that records the signal, and the sync-point callback at
        ``callback_index`` of ``trainer.callbacks``."""
        self.sigterm_received = False
        self.preempt = False

        def notify(signum: Any, frame: Any) -> None:
            log.info("lightning_fedopt: rank %s received signal %s", self.host.global_rank, signum)
            if not self.sigterm_received:
                launcher = trainer.strategy.launcher
                if launcher is not None:  # as Lightning does: the launched processes get it too
                    launcher.kill(signum)
            self.sigterm_received = True

        self._patches = patches
        # read by Lightning's register_signal_handlers after set-up
        patches.replace(trainer._signal_connector, "_sigterm_notifier_fn", notify)
        if self.callback not in callbacks_of(trainer):
            patches.add_callback(trainer, self.callback, callback_index, until_fit_end=True)
            self._saved_sync = int(self.host.sync_count)

    def _remove_callback(self) -> None:
        if self._patches is not None:
            self._patches.remove_at_fit_end()

    def before_sync(self, meet: Callable[[bool], bool]) -> None:
        """Before a synchronisation step: the stop policy decides whether every rank stops after it."""
        self.policy.before_sync(self, meet)

    def agree_to_stop(self) -> None:
        """Every rank stops after this step's synchronisation."""
        self.preempt = True

    # ------------------------------------------------------------------ sync points
    def elastic_dir(self, trainer: Trainer) -> str:
        """The folder of this run's sync-point checkpoints."""
        return os.path.join(str(trainer.default_root_dir), "elastic", _run_id())

    def at_batch_end(self, trainer: Trainer) -> None:
        """After a batch whose step synchronised: the sync-point checkpoint, then a preemption stop."""
        synced = int(self.host.sync_count) != self._saved_sync
        if not synced:
            return
        self._saved_sync = int(self.host.sync_count)
        done = trainer.fit_loop.epoch_loop.done or trainer.should_stop
        if self.elastic and not done:
            self.save_sync_point(trainer)
        if self.preempt and not done:
            if self.elastic and not self.sigterm_received:
                # torchrun's agent stops workers with SIGTERM when the membership changes (a node
                # joins or leaves): the ranks it did not signal must end in a failure, so that their
                # agents restart them into the next rendezvous instead of taking the run as finished
                raise PeerStoppedError(int(self.host.replica_step))
            if not self.elastic:
                path = self.host.broadcast(
                    trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
                )
                trainer.save_checkpoint(path)
                log.warning(
                    "lightning_fedopt: SIGTERM: checkpoint %s written; resume with fit(ckpt_path='hpc')", path
                )
            raise SIGTERMException()

    def save_sync_point(self, trainer: Trainer) -> None:
        """Write the sync-point checkpoint and point ``latest`` at it (a collective call)."""
        folder = self.elastic_dir(trainer)
        step = int(self.host.replica_step)
        rank = self.host.global_rank
        path = os.path.join(folder, f"sync-step{step}.ckpt")
        if rank == 0:
            os.makedirs(folder, exist_ok=True)
        trainer.save_checkpoint(path)  # collective: every rank's shard, then a barrier
        if rank == 0:
            tmp = os.path.join(folder, f".{LATEST}.tmp")
            with open(tmp, "w") as f:
                json.dump(
                    {"path": os.path.basename(path), "step": step, "world_size": self.host.world_size}, f
                )
            os.replace(tmp, os.path.join(folder, LATEST))
        self._elastic_kept.append(path)
        while len(self._elastic_kept) > KEEP:
            old = self._elastic_kept.pop(0)
            with contextlib.suppress(OSError):
                remove_with_shard(self.host.checkpoint_io, old, rank, self._remove_if_rank0)

    def _remove_if_rank0(self, path: Any) -> None:
        if self.host.global_rank == 0 and os.path.exists(path):
            os.remove(path)

    def latest_sync_point(self, trainer: Trainer) -> str | None:
        """The elastic checkpoint to resume from (None: none written by this run id)."""
        folder = self.elastic_dir(trainer)
        try:
            with open(os.path.join(folder, LATEST)) as f:
                name = json.load(f)["path"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(name, str) or os.sep in name or not name.endswith(".ckpt"):
            return None
        path = os.path.join(folder, name)
        return path if os.path.exists(path) else None

    def install_resume(self, trainer: Trainer, patches: LightningPatches) -> None:
        """With ``elastic=True``: a ``fit`` started by the agent resumes from the latest sync point."""
        self._elastic_kept = []
        if not self.elastic or trainer.state.fn != "fit":
            return
        if (
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and os.environ.get("GROUP_WORLD_SIZE", "1") != "1"
        ):
            raise ValueError(
                "`elastic=True` with several torchrun agents needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in every "
                "agent's environment: with torch's default the workers share the rank-0 agent's store, a restart "
                "reads the previous attempt's addresses (every agent counts its restarts on its own) and losing "
                "the rank-0 node takes the store with it; the job would hang at the restart instead of resuming"
            )
        path = self.latest_sync_point(trainer)
        if path is None:
            return
        connector = trainer._checkpoint_connector
        original = type(connector).resume_start

        def resume_start(checkpoint_path: Any = None, weights_only: Any = None) -> None:
            if checkpoint_path is not None and os.path.abspath(str(checkpoint_path)) != path:
                log.warning(
                    "lightning_fedopt: elastic restart: resuming from %s instead of %s", path, checkpoint_path
                )
            else:
                log.warning("lightning_fedopt: elastic restart: resuming from %s", path)
            connector.__dict__.pop("resume_start", None)
            original(connector, path, weights_only)

        patches.replace(connector, "resume_start", resume_start)

    def finish_elastic(self, trainer: Trainer) -> None:
        """After a ``fit`` that finished (``on_fit_end``): its sync points are of no further use."""
        trainer._checkpoint_connector.__dict__.pop("resume_start", None)
        if self.elastic and self.host.global_rank == 0:
            shutil.rmtree(self.elastic_dir(trainer), ignore_errors=True)
