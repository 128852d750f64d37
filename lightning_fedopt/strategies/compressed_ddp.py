"""Data-parallel training whose per-step gradient average travels compressed.

:class:`CompressedDDPStrategy` is :class:`~lightning_fedopt.strategies.MeteredDDPStrategy`
(Lightning's DDP with counted traffic) whose DDP communication hook averages each gradient bucket
through :func:`~lightning_fedopt.compression.collective.all_reduce_compressed`, so it works on gloo
(CPU) as well as NCCL. Presets: ``"compressed_ddp"`` (int8), ``"dgc"`` (Deep Gradient
Compression: top-k at 0.1% with momentum correction and the warm-up density schedule, Lin et al.,
arXiv 1712.01887; the module's optimizer should be SGD without momentum, and local gradient clipping
is ``TopK(clip_norm=...)``, whose threshold depends on the model) and ``"onebit"`` (1-bit Adam, arXiv 2102.02888: the module's
optimizer must be :class:`~lightning_fedopt.compression.OneBitAdam`).

With a :class:`~lightning_fedopt.compression.OneBitAdam` optimizer the hook averages gradients in
full precision during its warm-up and sends nothing afterwards (the optimizer then averages its
momentum through its compressor). A replica whose gradients are NaN/Inf is left out of the
average (the others' mean comes back to it) and the event is logged; if its weights, buffers or
optimizer state are NaN/Inf after that step, it is reset from the lowest-ranked healthy replica
(:attr:`CompressedDDPStrategy.recoveries`), and a checkpoint of NaN/Inf weights is never written.
At start-up the ranks check that they are configured alike (same compressor, same model structure).

Compressor state (error feedback, momentum) differs between ranks: every rank writes it next to
the checkpoint, in ``<checkpoint>.replicas/rank<r>.pt``, and reads it back on resume (``weights_only``,
after checking that the shard is this rank's shard of that checkpoint).
"""

from typing import Any, cast

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_fedopt._validate import check_bool
from lightning_fedopt.comm import GradBucket
from lightning_fedopt.compression import Compressor, OneBitAdam, Sign, TopK, get_compressor
from lightning_fedopt.compression.collective import CompressionTotals, all_reduce_compressed
from lightning_fedopt.runtime.handshake import agreement_fields, check_agreement
from lightning_fedopt.runtime.optimizer_state import optimizer_state_tensors
from lightning_fedopt.runtime.reduce import NoFiniteReplicaError, all_finite
from lightning_fedopt.runtime.registry import register_name
from lightning_fedopt.runtime.shards import (
    CHECKPOINT_KEY,
    check_meta,
    load_verified_shard,
    log,
    new_checkpoint_id,
    provenance,
    remove_with_shard,
    save_shard,
    shard_exists,
)
from lightning_fedopt.strategies.ddp import MeteredDDPStrategy

__all__ = ["CompressedDDPStrategy", "compressed_allreduce_hook"]

_PRESETS = {
    "compressed_ddp": lambda: {"compressor": "int8"},
    "dgc": lambda: {
        "compressor": TopK(
            density=0.001, momentum=0.9, warmup_densities=(0.25, 0.063, 0.015, 0.004), warmup_steps=50
        )
    },
    "onebit": lambda: {"compressor": Sign(), "require_onebit_adam": True},
}


# DDP checks the hook's annotations at registration: no ``from __future__ import annotations`` here.
def compressed_allreduce_hook(
    strategy: "CompressedDDPStrategy", bucket: GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's mean gradient through the strategy's compressor (counted as ``"sync"``)."""
    buf = bucket.buffer()
    comm = strategy.comm
    if strategy.onebit_phase() == "momentum":  # 1-bit Adam after its warm-up: the optimizer talks
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(buf)
        return fut
    if strategy.onebit_phase() == "warmup":
        return comm.all_reduce_future(buf, op="mean", purpose="sync")
    # The collective packs the bucket's gradients into one buffer. DDP rebuilds its buckets after
    # the first step (and again after a resume) in another order: packing them sorted by parameter
    # name, with the compressor state keyed by name, keeps the result and the state independent of
    # that layout (a resumed run equals an uninterrupted one)
    grads = [g.detach().clone() for g in bucket.gradients()]
    params = bucket.parameters()
    names = [strategy.param_name(p) for p in params]
    # DGC sends tensors with dim <= 1 (biases, norms) dense: they are tiny and sparsifying them hurts
    dense = [isinstance(strategy.compressor, TopK) and p.dim() <= 1 for p in params]
    sparse_i = sorted((i for i, d in enumerate(dense) if not d), key=lambda i: names[i])
    dense_i = [i for i, d in enumerate(dense) if d]
    valid = all(bool(torch.isfinite(g).all()) for g in grads)
    if not valid and sparse_i and dense_i:  # NaN only in a dense tensor: leave the whole replica out
        grads[sparse_i[0]].fill_(float("nan"))
    if sparse_i:
        call = all_reduce_compressed(
            comm,
            [grads[i] for i in sparse_i],
            strategy.compressor,
            names=[names[i] for i in sparse_i],
            purpose="sync",
        )
        excluded = call.excluded_nonfinite
        if excluded:
            strategy.record_nonfinite(excluded)
            strategy.recover_after_step = True
    if dense_i:  # mean over the replicas with finite gradients, as the compressed path does
        dense_g = [grads[i] if valid else torch.zeros_like(grads[i]) for i in dense_i]
        count = torch.tensor([float(valid)], dtype=dense_g[0].dtype, device=dense_g[0].device)
        comm.all_reduce([*dense_g, count], "sum", purpose="sync")
        for i, g in zip(dense_i, dense_g):
            grads[i] = g / max(float(count), 1.0)
        if not sparse_i and float(count) < comm.world_size:
            strategy.record_nonfinite(comm.world_size - round(float(count)))
            strategy.recover_after_step = True
    buf.copy_(torch.cat([g.reshape(-1) for g in grads]))
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


class CompressedDDPStrategy(MeteredDDPStrategy):
    """Gradient averaging every step, through a compressor (DDP communication hook, gloo or NCCL).

    Args:
        compressor: a :class:`~lightning_fedopt.compression.Compressor` or a name (``"int8"``,
            ``"sign"``, ``"topk"``, ...). Error-feedback state is kept per parameter (by name). With
            top-k, parameters with ``dim <= 1`` travel dense (DGC); with ``momentum > 0`` (DGC's
            momentum correction) use an optimizer without momentum.
        require_onebit_adam: raise at set-up unless the module's optimizer is
            :class:`~lightning_fedopt.compression.OneBitAdam` (the ``"onebit"`` preset).
        preset: ``"compressed_ddp"``, ``"dgc"`` or ``"onebit"``: a fresh compressor (and options) of
            that preset, overriding ``compressor`` (used by the registered strategy names).
        **kwargs: Lightning ``DDPStrategy`` arguments (``ddp_comm_hook`` excepted).

    Raises:
        ValueError: for an unknown compressor, or no OneBitAdam under ``require_onebit_adam``.

    Example:
        >>> import lightning as L
        >>> from lightning_fedopt.compression import Int8
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CompressedDDPStrategy(Int8(block=256)))
    """

    strategy_name = "compressed_ddp"

    def __init__(
        self,
        compressor: Compressor | str = "int8",
        *,
        require_onebit_adam: bool = False,
        preset: str | None = None,
        **kwargs: Any,
    ) -> None:
        if preset is not None:
            if not isinstance(preset, str) or preset not in _PRESETS:
                raise ValueError(f"`preset` must be one of {sorted(_PRESETS)}, got {preset!r}")
            opts = cast(
                dict[str, Any], _PRESETS[preset]()
            )  # a new compressor per strategy: no state shared between runs
            compressor = opts["compressor"]
            require_onebit_adam = opts.get("require_onebit_adam", require_onebit_adam)
        comp = get_compressor(compressor)
        if comp is None:
            raise ValueError("`compressor` must be a compressor or a name; use MeteredDDPStrategy for none")
        super().__init__(**kwargs)
        self.compressor: Compressor = comp
        self.require_onebit_adam = check_bool("require_onebit_adam", require_onebit_adam)
        self._nonfinite_events: list[dict[str, int]] = []
        self._resume_shard: dict[str, Any] | None = None
        self._param_names: dict[int, str] = {}
        #: set by the hook when a bucket average left a replica out: after the optimizer step the
        #: ranks check their weights and a non-finite replica is reset from a healthy one
        self.recover_after_step = False
        self._recoveries: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ state
    @property
    def compression_totals(self) -> CompressionTotals:
        """The compressed averages so far: the totals of the strategy's compressor and of the
        compressors of its :class:`~lightning_fedopt.compression.OneBitAdam` optimizers (each
        compressor once)."""
        comps = [self.compressor, *(o.compressor for o in self._onebit_optimizers())]
        unique = {id(c): c for c in comps if c is not None}
        return CompressionTotals.combined(c.totals for c in unique.values())

    @property
    def compression_ratio(self) -> float | None:
        """Uncompressed / compressed bytes of the compressed averages so far."""
        return self.compression_totals.ratio

    @property
    def nonfinite_events(self) -> list[dict[str, int]]:
        """One entry per bucket average that left out replicas with NaN/Inf gradients."""
        return list(self._nonfinite_events)

    def record_nonfinite(self, excluded: int) -> None:
        self._nonfinite_events.append({"step": self.replica_step, "excluded": int(excluded)})
        if self.global_rank == 0:
            log.warning(
                "lightning_fedopt: %d replica(s) with NaN/Inf gradients left out of the average at step %d",
                excluded,
                self.replica_step,
            )

    @property
    def recoveries(self) -> list[dict[str, Any]]:
        """One entry per reset of non-finite replicas: ``{"step", "ranks", "source"}``."""
        return [dict(r) for r in self._recoveries]

    @override
    def configure_ddp(self) -> None:
        """Check that every rank is configured alike (:mod:`~lightning_fedopt.runtime.handshake`),
        then wrap the module in DDP."""
        self.recover_after_step = False
        self._recoveries = []
        check_agreement(self.comm, agreement_fields(self), device=self.root_device)
        super().configure_ddp()

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().optimizer_step(*args, **kwargs)
        if self.recover_after_step:
            self.recover_after_step = False
            self.recover_nonfinite()
        return out

    def _replica_tensors(self) -> list[torch.Tensor]:
        module = self.lightning_module
        assert module is not None
        return (
            [p.data for p in module.parameters()]
            + list(module.buffers())
            + optimizer_state_tensors(self.optimizers)
        )

    def recover_nonfinite(self) -> None:
        """Reset every replica whose weights, buffers or optimizer state went NaN/Inf from the
        lowest-ranked healthy one (a collective: one all-gather of a flag, a broadcast only when some
        rank is unhealthy); a replica's compressor state that went non-finite starts afresh.

        Raises:
            NoFiniteReplicaError: on every rank when no replica is healthy.
        """
        tensors = self._replica_tensors()
        healthy = all_finite(tensors)
        state = [v for st in getattr(self.compressor, "_state", {}).values() for v in st.values()]
        if not all_finite([v for v in state if isinstance(v, torch.Tensor) and v.is_floating_point()]):
            self.compressor.reset_state()  # this rank's own error feedback / momentum: nothing to copy
        flag = torch.tensor([int(healthy)], dtype=torch.uint8, device=self.root_device)
        flags = [bool(f.item()) for f in self.comm.all_gather(flag, purpose="control").wait()]
        if all(flags):
            return
        bad = [r for r, ok in enumerate(flags) if not ok]
        if len(bad) == len(flags):
            raise NoFiniteReplicaError(step=self.replica_step, replicas=bad, what="restore them from")
        source = flags.index(True)
        self.comm.broadcast(tensors, src=source, purpose="control")
        self._recoveries.append({"step": self.replica_step, "ranks": bad, "source": source})
        if self.global_rank == 0:
            log.warning(
                "lightning_fedopt: replica(s) %s had NaN/Inf weights or optimizer state after step %d; "
                "reset from rank %d",
                bad,
                self.replica_step,
                source,
            )

    def _onebit_optimizers(self) -> list[OneBitAdam]:
        return [o for o in getattr(self, "optimizers", []) if isinstance(o, OneBitAdam)]

    def onebit_phase(self) -> str | None:
        """``"warmup"`` / ``"momentum"`` when a OneBitAdam optimizer is in use, else None."""
        opts = self._onebit_optimizers()
        if not opts:
            return None
        return "momentum" if opts[0].next_step_frozen else "warmup"

    @override
    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        opts = self._onebit_optimizers()
        if self.require_onebit_adam and not opts:
            raise ValueError(
                "strategy 'onebit' needs the LightningModule's optimizer to be "
                "lightning_fedopt.compression.OneBitAdam (configure_optimizers returned "
                f"{[type(o).__name__ for o in self.optimizers]})"
            )
        for o in opts:
            o.attach(self.comm)
            if o.compressor is None:
                o.compressor = self.compressor

    def param_name(self, p: torch.Tensor) -> str:
        """The module's name of parameter ``p`` (the key of its compressor state)."""
        return self._param_names.get(id(p), f"param@{id(p)}")

    @override
    def _register_ddp_hooks(self) -> None:
        module = self.lightning_module
        assert module is not None
        self._param_names = {id(p): name for name, p in module.named_parameters()}
        model = self.model
        assert isinstance(model, DistributedDataParallel)
        model.register_comm_hook(self, compressed_allreduce_hook)

    # ------------------------------------------------------------------ per-rank checkpoint state
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if "optimizer_states" in checkpoint:
            state = [v for v in checkpoint.get("state_dict", {}).values() if isinstance(v, torch.Tensor)]
            finite = all_finite([v for v in state if v.is_floating_point()])
            ckpt_id = new_checkpoint_id(self.comm, filepath, finite=finite)
            where = provenance(
                type(self).__name__, self.world_size, self.global_rank, self.replica_step, ckpt_id
            )
            checkpoint[CHECKPOINT_KEY] = {
                k: where[k] for k in ("format", "strategy", "world_size", "step", "checkpoint_id")
            }
            shard = {
                **where,
                "compressor": self.compressor.state_dict(),
                "onebit_state": [o.state_dict() for o in self._onebit_optimizers()],
            }
            save_shard(self.checkpoint_io, shard, filepath, self.global_rank)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Read the checkpoint; when fitting from one this strategy wrote, also this rank's shard
        (checked to belong to it, on every rank). Evaluation reads no shard."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._resume_shard = None
        module = self.lightning_module
        fitting = (
            module is not None
            and module._trainer is not None
            and module.trainer.state.fn == TrainerFn.FITTING
        )
        meta = checkpoint.get(CHECKPOINT_KEY)
        if not fitting:
            return checkpoint
        if meta is None:
            if shard_exists(checkpoint_path, self.global_rank):
                log.warning(
                    "lightning_fedopt: checkpoint %s has no lightning_fedopt entry (written before format 2); "
                    "its replica shards cannot prove they belong to it and are not read: the compressor "
                    "state starts afresh",
                    checkpoint_path,
                )
            return checkpoint
        check_meta(meta, checkpoint_path, type(self).__name__)
        if meta.get("world_size") != self.world_size:
            log.warning(
                "lightning_fedopt: checkpoint was written by %s ranks, resuming with %d; the compressor "
                "state starts afresh",
                meta.get("world_size"),
                self.world_size,
            )
            return checkpoint
        self._resume_shard = load_verified_shard(
            self.comm, self.checkpoint_io, checkpoint_path, meta, weights_only=weights_only
        )
        self.compressor.load_state_dict(self._resume_shard["compressor"])
        return checkpoint

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        shard = self._resume_shard
        if shard is not None:  # this rank's own momentum and error buffers, not rank 0's
            for o, st in zip(self._onebit_optimizers(), shard["onebit_state"]):
                o.load_state_dict(st)
        self._resume_shard = None

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        remove_with_shard(self.checkpoint_io, filepath, self.global_rank, super().remove_checkpoint)

    @override
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register the presets' names (``compressed_ddp``, ``dgc``, ``onebit``), each with ``_spawn``/``_fork``."""
        for preset in _PRESETS:
            register_name(
                strategy_registry, preset, cls, description=f"{cls.__name__} preset {preset!r}", preset=preset
            )
