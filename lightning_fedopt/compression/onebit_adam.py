"""1-bit Adam (Tang et al., "1-bit Adam: Communication Efficient Large-Scale Training with Adam's
Convergence Speed", ICML 2021, arXiv 2102.02888).

Plain Adam for ``warmup_steps`` steps (gradients averaged in full precision by the strategy), then
the variance ``v`` is frozen and the replicas communicate their *momentum* instead of their
gradients: each computes ``m <- beta1 m + (1 - beta1) g`` from its local gradient, the momenta are
averaged through a compressor (1-bit :class:`~lightning_fedopt.compression.Sign` with worker and
server error feedback by default) and every replica applies ``x <- x - lr (m / (sqrt(v_hat) + eps)
+ wd x)`` with the same averaged ``m`` (``v_hat``: the frozen variance, bias-corrected).

Bias correction, a deliberate difference from DeepSpeed. Here the warm-up is torch's Adam (both
moments corrected: ``m / (1 - beta1^t)``, ``v / (1 - beta2^t)``); once frozen, the variance keeps
the correction of the step it froze at, ``v_hat = v / (1 - beta2^W)`` (``W = warmup_steps``), and
the momentum is used as it is (``beta1^t`` is negligible after a warm-up of hundreds of steps).
DeepSpeed's ``OnebitAdam`` (``deepspeed/runtime/fp16/onebit/adam.py``) takes a
``bias_correction=True`` argument but never uses it: in both phases it steps with the raw moments,
``x <- x - lr (m / (sqrt(v) + eps) + wd x)``. The two agree when ``beta2^W`` is negligible (DeepSpeed's
default ``freeze_step`` is 100,000); after a short warm-up they do not (``W = 100``, ``beta2 = 0.999``:
``1 - beta2^W = 0.095``, so a step here is ``sqrt(0.095) = 0.31`` times DeepSpeed's), and during the
warm-up DeepSpeed's first step is ``(1 - beta1) / sqrt(1 - beta2)`` (3.2) times Adam's. A
learning rate tuned for DeepSpeed's 1-bit Adam does not transfer as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from typing_extensions import override

from lightning_fedopt._validate import check_float, check_int
from lightning_fedopt.compression.base import Compressor
from lightning_fedopt.compression.collective import all_reduce_compressed
from lightning_fedopt.compression.compressors import get_compressor

__all__ = ["OneBitAdam"]


class OneBitAdam(torch.optim.Optimizer):
    """Adam whose momentum is averaged through a compressor after a warm-up with frozen variance.

    Used with :class:`~lightning_fedopt.strategies.CompressedDDPStrategy` (which averages the
    gradients in full precision during the warm-up and attaches its communicator); on its own (one
    process, no communicator) it is Adam that freezes its variance after ``warmup_steps``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (> 0).
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to ``sqrt(v_hat)`` (> 0).
        weight_decay: decoupled weight decay (AdamW style, >= 0).
        warmup_steps: full-precision Adam steps before the variance freezes (>= 1; the paper uses
            15-25% of training).
        compressor: how the momentum travels (object or name; default ``"sign"``).

    Example:
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> opt = OneBitAdam([p], lr=0.1, warmup_steps=2)
        >>> for _ in range(3):
        ...     p.grad = torch.tensor([1.0, -1.0, 0.5])
        ...     _ = opt.step()
        >>> opt.frozen
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        compressor: Compressor | str | None = "sign",
    ) -> None:
        check_float("lr", lr, low=0.0, low_open=True)
        try:
            checked: tuple[float, ...] = tuple(
                check_float("betas", b, low=0.0, high=1.0, high_open=True) for b in betas
            )
        except (TypeError, ValueError):
            checked = ()
        if len(checked) != 2:
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}")
        betas = (checked[0], checked[1])
        check_float("eps", eps, low=0.0, low_open=True)
        check_float("weight_decay", weight_decay, low=0.0)
        warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.warmup_steps = warmup_steps
        self.compressor = get_compressor(compressor)
        self.comm: Any = None  # set by the strategy
        self.steps_done = 0

    @property
    def frozen(self) -> bool:
        """Whether the variance is frozen (the warm-up is over)."""
        return self.steps_done >= self.warmup_steps

    @property
    def next_step_frozen(self) -> bool:
        """Whether the step about to be taken communicates the momentum (not the gradient)."""
        return self.steps_done + 1 > self.warmup_steps

    def attach(self, comm: Any) -> None:
        """Use ``comm`` (a :class:`~lightning_fedopt.comm.Communicator`) to average the momentum."""
        self.comm = comm

    @override
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        frozen = self.next_step_frozen
        params, momenta, names = [], [], []
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                g = p.grad
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                if not frozen:
                    st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                params.append((p, group))
                momenta.append(st["exp_avg"])
                names.append(f"g{gi}.p{pi}")
        if frozen and self.comm is not None and self.compressor is not None and momenta:
            all_reduce_compressed(self.comm, momenta, self.compressor, names=names, purpose="sync")
        t = self.steps_done + 1
        for p, group in params:
            st = self.state[p]
            beta1, beta2 = group["betas"]
            if frozen:
                v_hat = st["exp_avg_sq"] / (1 - beta2**self.warmup_steps)
                m_hat = st["exp_avg"]  # beta1^t is negligible after the warm-up (module doc)
            else:
                v_hat = st["exp_avg_sq"] / (1 - beta2**t)
                m_hat = st["exp_avg"] / (1 - beta1**t)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])
        self.steps_done += 1
        return loss

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["onebit"] = {
            "steps_done": self.steps_done,
            "compressor": self.compressor.state_dict() if self.compressor is not None else {},
        }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("onebit", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.steps_done = int(extra["steps_done"])
            if self.compressor is not None:
                self.compressor.load_state_dict(extra["compressor"])
