"""Lightning's DDP with its traffic counted: the baseline every algorithm is compared against.

:class:`MeteredDDPStrategy` is :class:`lightning.pytorch.strategies.DDPStrategy` whose gradient
all-reduce runs through a DDP communication hook that calls :mod:`lightning_fedopt.comm`, so its
bytes are counted with the same cost model as the replica strategies. Unlike Lightning's own
``ddp_comm_hook`` support (CUDA only), the hook is registered on CPU/gloo as well.
"""

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_fedopt._validate import check_choice, check_str, check_timeout
from lightning_fedopt.comm import Communicator, GradBucket, tensors_nbytes
from lightning_fedopt.runtime.communicators import Communicators, CountedDDPStrategy
from lightning_fedopt.runtime.registry import register_name

__all__ = ["MeteredDDPStrategy"]


# DDP checks this hook's annotations at registration, so they must be real objects (no
# ``from __future__ import annotations`` in this module).
def counted_allreduce_hook(comm: Communicator, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the bucket's gradients through ``comm`` (counted as ``"sync"``)."""
    return comm.all_reduce_future(bucket.buffer(), op="mean", purpose="sync")


class MeteredDDPStrategy(CountedDDPStrategy):
    """Plain data-parallel training (gradient all-reduce every step) with byte accounting.

    Takes the arguments of Lightning's ``DDPStrategy`` (``ddp_comm_hook`` excepted).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=MeteredDDPStrategy())
    """

    strategy_name = "ddp_metered"

    def __init__(self, **kwargs: Any) -> None:
        for name in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period"):
            if name in kwargs:
                raise ValueError(
                    f"MeteredDDPStrategy: argument `{name}` is not supported (the strategy sets its own hook)"
                )
        if "timeout" in kwargs:
            check_timeout("timeout", kwargs["timeout"])
        if "start_method" in kwargs:
            check_choice("start_method", kwargs["start_method"], ("popen", "spawn", "fork", "forkserver"))
        if "process_group_backend" in kwargs:
            check_str("process_group_backend", kwargs["process_group_backend"], allow_none=True)
        super().__init__(**kwargs)
        self.comms = Communicators()
        self._steps = 0

    @property
    def sync_count(self) -> int:
        """Gradient synchronisations so far: one per optimizer step."""
        return self._steps

    @property
    def replica_step(self) -> int:
        """Optimizer steps so far (every step is a synchronisation)."""
        return self._steps

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().optimizer_step(*args, **kwargs)
        self._steps += 1
        return out

    @override
    def configure_ddp(self) -> None:
        self.comm.stats.reset()
        self._steps = 0
        super().configure_ddp()
        # DistributedDataParallel's constructor broadcasts the module state from rank 0
        module = self.lightning_module
        assert module is not None
        nbytes = tensors_nbytes([*module.parameters(), *module.buffers()])
        self.comm.account("broadcast", nbytes, purpose="setup", is_source=self.global_rank == 0)

    @override
    def _register_ddp_hooks(self) -> None:
        model = self.model
        assert isinstance(model, DistributedDataParallel)
        model.register_comm_hook(self.comm, counted_allreduce_hook)

    @override
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``ddp_metered``, ``ddp_metered_spawn`` and ``ddp_metered_fork``."""
        register_name(strategy_registry, cls.strategy_name, cls, description=cls.__name__)
