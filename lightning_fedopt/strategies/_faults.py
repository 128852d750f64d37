"""Failures: a deadline on the synchronisation, preemption, and sync-point checkpoints for elastic runs.

:class:`Failures` is a mixin of :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`.

* **Deadline.** The replicas' traffic runs on a process group whose timeout is ``sync_timeout``;
  :class:`~lightning_fedopt.strategies._liveness.Liveness` tells a slow peer (heartbeat alive: wait)
  from a lost one, and a lost peer raises :class:`~lightning_fedopt.strategies._liveness.ReplicaLostError`
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
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_fedopt.comm import Communicator
from lightning_fedopt.strategies._liveness import Liveness, ReplicaLostError, close_quietly
from lightning_fedopt.strategies._shards import remove_with_shard

log = logging.getLogger("lightning_fedopt")

__all__ = ["Failures", "PeerStoppedError", "ReplicaLostError", "SyncPointCheckpoints", "elastic_num_nodes"]

#: the file in the elastic folder naming the latest complete sync-point checkpoint
LATEST = "latest.json"
#: sync-point checkpoints kept (the latest, and the one before in case the latest is being written)
KEEP = 2


class PeerStoppedError(RuntimeError):
    """Under ``elastic=True``: another rank received SIGTERM; this one stops after the checkpoint of
    the synchronisation point so that its agent restarts it into the next rendezvous."""

    def __init__(self, step: int) -> None:
        self.step = step
        super().__init__(
            f"lightning_fedopt: another rank received SIGTERM (torchrun's agent re-forming the job, or a "
            f"preemption); the checkpoint of step {step} is written and this rank stops so that its agent "
            "restarts it at the new world size"
        )


def elastic_num_nodes() -> int:
    """``num_nodes`` for ``Trainer`` under ``torchrun --nnodes=MIN:MAX`` (the world the rendezvous
    formed, over the processes per node); 1 outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) or 1
    return max(world // local, 1)


def _run_id() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("LIGHTNING_FEDOPT_RUN_ID") or "local"


class SyncPointCheckpoints(Callback):
    """Internal: at the end of a training batch whose step synchronised, the elastic checkpoint
    and the preemption stop (placed after the manual-optimization hook, before user callbacks)."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.strategy._at_batch_end(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy._finish_elastic(trainer)


class Failures:
    """Mixin: deadline, preemption and elastic checkpoints (see the module doc)."""

    sync_timeout: float
    elastic: bool
    comm: Communicator
    _liveness: Liveness | None
    _sync_points: SyncPointCheckpoints
    #: a SIGTERM reached this process (set by the handler; Lightning's own flag stays False)
    _sigterm_received: bool
    #: every rank agreed to stop after this step's synchronisation
    _preempt: bool
    _saved_sync: int

    # ------------------------------------------------------------------ deadline
    def _start_liveness(self) -> None:
        """At the start of ``fit`` (whose ``setup_environment`` made ``self.comm`` afresh): the
        deadline communicator and the heartbeat."""
        close_quietly(self._liveness)
        self._liveness = None
        if not self.comm.available or self.comm.world_size == 1:
            return
        comm = self.comm = self.comm.with_deadline(self.sync_timeout, self._on_comm_failure)
        nonce = comm.broadcast_object(secrets.token_hex(8) if comm.rank == 0 else None, purpose="setup")
        self._liveness = Liveness(
            self.global_rank,
            self.world_size,
            self.sync_timeout,
            f"lightning_fedopt/{nonce}/",  # type: ignore[attr-defined]
        )

    def _stop_liveness(self) -> None:
        close_quietly(self._liveness)
        self._liveness = None

    def _communicators(self) -> list[Communicator]:
        return [c for c in (self.comm, self._inner_comm, self._outer_comm) if c is not None]  # type: ignore[attr-defined]

    def _lost(self, during: str) -> Any:
        def make(ranks: list[int], detail: str) -> ReplicaLostError:
            err = ReplicaLostError(ranks, int(self._replica_step), during, detail)  # type: ignore[attr-defined]
            for c in self._communicators():
                c.failed = err
            if self._liveness is not None:
                self._liveness.announce_abort()
            self._stop_liveness()
            log.error("%s", err)
            return err

        return make

    def _during(self, op: str, purpose: str) -> str:
        step = int(self._replica_step)  # type: ignore[attr-defined]
        if purpose == "sync":
            return f"the synchronisation of step {step} ({op})"
        return f"a {purpose} {op} after step {step}"

    def _on_comm_failure(self, exc: BaseException, op: str, purpose: str) -> None:
        """A collective failed: if a peer is gone, raise :class:`ReplicaLostError` instead."""
        if isinstance(exc, ReplicaLostError) or self._liveness is None:
            return
        err = self._liveness.explain(exc, self._lost(self._during(op, purpose)))
        if err is not None:
            raise err from exc

    def _arrive(self, what: str) -> None:
        """Before a meeting point's collective: wait for every rank while their heartbeats live."""
        if self._liveness is not None:
            self._liveness.arrive(self._lost(what))

    # ------------------------------------------------------------------ preemption
    def _patch_signals(self, trainer: Trainer) -> None:
        """Replace Lightning's SIGTERM notifier (it broadcasts inside the signal handler) by one
        that records the signal; registered by Lightning after set-up, removed at teardown."""
        self._sigterm_received = False
        self._preempt = False
        connector = trainer._signal_connector

        def notify(signum: Any, frame: Any) -> None:
            log.info("lightning_fedopt: rank %s received signal %s", self.global_rank, signum)  # type: ignore[attr-defined]
            if not self._sigterm_received:
                launcher = trainer.strategy.launcher
                if launcher is not None:  # as Lightning does: the launched processes get it too
                    launcher.kill(signum)
            self._sigterm_received = True

        connector._sigterm_notifier_fn = notify  # instance attribute, read by register_signal_handlers

    def _unpatch_signals(self, trainer: Trainer) -> None:
        trainer._signal_connector.__dict__.pop("_sigterm_notifier_fn", None)

    def _agree_to_stop(self) -> None:
        """The rendezvous before a synchronisation said some rank received SIGTERM."""
        self._preempt = True

    # ------------------------------------------------------------------ sync points
    def _elastic_dir(self, trainer: Trainer) -> str:
        return os.path.join(str(trainer.default_root_dir), "elastic", _run_id())

    def _install_sync_points(self, trainer: Trainer) -> None:
        if self._sync_points in trainer.callbacks:
            return
        at = trainer.callbacks.index(self._hooks) + 1 if self._hooks in trainer.callbacks else 0  # type: ignore[attr-defined]
        trainer.callbacks.insert(at, self._sync_points)
        self._saved_sync = int(self._sync_count)  # type: ignore[attr-defined]

    def _at_batch_end(self, trainer: Trainer) -> None:
        synced = int(self._sync_count) != self._saved_sync  # type: ignore[attr-defined]
        if not synced:
            return
        self._saved_sync = int(self._sync_count)  # type: ignore[attr-defined]
        done = trainer.fit_loop.epoch_loop.done or trainer.should_stop
        if self.elastic and not done:
            self._save_sync_point(trainer)
        if self._preempt and not done:
            if self.elastic and not self._sigterm_received:
                # torchrun's agent stops workers with SIGTERM when the membership changes (a node
                # joins or leaves): the ranks it did not signal must end in a failure, so that their
                # agents restart them into the next rendezvous instead of taking the run as finished
                raise PeerStoppedError(int(self._replica_step))  # type: ignore[attr-defined]
            if not self.elastic:
                path = self.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))  # type: ignore[attr-defined]
                trainer.save_checkpoint(path)
                log.warning(
                    "lightning_fedopt: SIGTERM: checkpoint %s written; resume with fit(ckpt_path='hpc')", path
                )
            raise SIGTERMException()

    def _save_sync_point(self, trainer: Trainer) -> None:
        folder = self._elastic_dir(trainer)
        step = int(self._replica_step)  # type: ignore[attr-defined]
        path = os.path.join(folder, f"sync-step{step}.ckpt")
        if self.global_rank == 0:  # type: ignore[attr-defined]
            os.makedirs(folder, exist_ok=True)
        trainer.save_checkpoint(path)  # collective: every rank's shard, then a barrier
        if self.global_rank == 0:  # type: ignore[attr-defined]
            tmp = os.path.join(folder, f".{LATEST}.tmp")
            with open(tmp, "w") as f:
                json.dump({"path": os.path.basename(path), "step": step, "world_size": self.world_size}, f)  # type: ignore[attr-defined]
            os.replace(tmp, os.path.join(folder, LATEST))
        self._elastic_kept.append(path)
        while len(self._elastic_kept) > KEEP:
            old = self._elastic_kept.pop(0)
            with contextlib.suppress(OSError):
                remove_with_shard(self.checkpoint_io, old, self.global_rank, self._remove_if_rank0)  # type: ignore[attr-defined]

    def _remove_if_rank0(self, path: Any) -> None:
        if self.global_rank == 0 and os.path.exists(path):  # type: ignore[attr-defined]
            os.remove(path)

    def latest_sync_point(self, trainer: Trainer) -> str | None:
        """The elastic checkpoint to resume from (None: none written by this run id)."""
        folder = self._elastic_dir(trainer)
        try:
            with open(os.path.join(folder, LATEST)) as f:
                name = json.load(f)["path"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(name, str) or os.sep in name or not name.endswith(".ckpt"):
            return None
        path = os.path.join(folder, name)
        return path if os.path.exists(path) else None

    def _patch_resume(self, trainer: Trainer) -> None:
        """With ``elastic=True``: a ``fit`` started by the agent resumes from the latest sync point."""
        self._elastic_kept: list[str] = []
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

        connector.resume_start = resume_start  # type: ignore[method-assign]

    def _finish_elastic(self, trainer: Trainer) -> None:
        """After a ``fit`` that finished (``on_fit_end``): its sync points are of no further use."""
        trainer._checkpoint_connector.__dict__.pop("resume_start", None)
        if self.elastic and self.global_rank == 0:  # type: ignore[attr-defined]
            shutil.rmtree(self._elastic_dir(trainer), ignore_errors=True)
