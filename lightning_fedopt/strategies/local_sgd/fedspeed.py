"""FedSpeed: Local SGD with a prox-correction and a perturbed (gradient-ascent) local gradient.

Sun et al., "FedSpeed: Larger Local Interval, Less Communication Round, and Higher
Generalization Accuracy", ICLR 2023 (arXiv 2302.10429). Replica ``i`` keeps a correction
``g_hat_i`` (zero at the start) and the round's starting point ``x^t``. Each local step, on one
batch:

* ``g1 = grad f(x)``; ``g2 = grad f(x + rho g1 / ||g1||)`` (same batch; ``||.||`` over all parameters);
* ``g = (1 - alpha) g1 + alpha g2``;
* the inner optimizer steps with ``g - g_hat_i + (x - x^t) / lambda`` as the gradient (with SGD
  this is the paper's ``x <- x - eta (g - g_hat_i + (x - x^t) / lambda)``).

At the end of the round ``g_hat_i <- g_hat_i - (x_K - x^t) / lambda`` and the replica contributes
``x_K - lambda g_hat_i`` to the average, which becomes ``x^{t+1}`` for everyone.

Defaults against the authors' code (woodenchild95/FL-Simulator, ``client/fedspeed.py``,
``optimizer/ESAM.py``, ``train.py``):

* ``rho=0.1``: ``--rho`` "select the SAM perturbation rate", default 0.1 (adopted);
* ``perturb_alpha=1.0``: their ``ESAM.step(alpha=1.)`` zeroes the first gradient before the
  perturbed backward pass, so the step uses the perturbed gradient alone, ``alpha = 1`` (adopted);
* ``prox_lambda=10.0``: their ``--lamb`` (default 0.1) is the prox coefficient ``1 / lambda``
  (it is added as weight decay, ``lamb * x``, and as ``lamb * (h_i - x^t)`` through the correction),
  so ``lambda = 1 / 0.1 = 10``;
* gradient clipping at norm 10 (``max_norm = 10`` in their ``Client``, for every method, applied to
  the whole local gradient after the correction is added): not built into this strategy; pass
  ``Trainer(gradient_clip_val=10.0)``, which Lightning applies after this strategy's closure has
  formed the corrected gradient, i.e. to the same quantity;
* their local learning rate (0.1, decayed by 0.998 per round) and weight decay (1e-3) belong to the
  inner optimizer, which is the module's own here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_float
from lightning_fedopt.schedules import SyncSchedule
from lightning_fedopt.strategies.local_sgd.local_sgd import LocalSGDStrategy
from lightning_fedopt.strategies.local_sgd.sam import perturbed, sam_offsets

__all__ = ["FedSpeedStrategy"]


class FedSpeedStrategy(LocalSGDStrategy):
    """FedSpeed: Local SGD whose local steps use a perturbed gradient and a prox-correction.

    Args:
        sync_every: ``H`` (>= 1), local steps per round, or a schedule.
        rho: perturbation radius ``rho`` (>= 0; 0 skips the second gradient); default 0.1, the
            authors' code's.
        perturb_alpha: ``alpha`` in [0, 1], weight of the perturbed gradient; default 1.0 (the
            perturbed gradient alone), as the authors' code steps.
        prox_lambda: ``lambda`` (> 0) of the prox term ``||x - x^t||^2 / (2 lambda)``; default 10.0,
            the authors' ``--lamb 0.1`` (their coefficient is ``1 / lambda``).
        **kwargs: :class:`~lightning_fedopt.strategies.local_sgd.LocalSGDStrategy` arguments
            (``weighting``, ``evaluate``, ...; full participation only).

    Each local step runs ``training_step`` twice (at ``x`` and at the perturbed point) when
    ``rho > 0 and alpha > 0``; the second run's loss is the one Lightning reports. The authors'
    code also clips the local gradient at norm 10: ``Trainer(gradient_clip_val=10.0)`` does the
    same here (module doc).

    Example:
        >>> import lightning as L
        >>> import lightning_fedopt as lf
        >>> strategy = lf.FedSpeedStrategy(sync_every=20, rho=0.01, perturb_alpha=0.9, prox_lambda=10.0)
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy)
    """

    strategy_name = "fedspeed"
    supports_round_seconds = False

    supports_fault_tolerance = False

    @override
    def fault_tolerance_unsupported(self) -> str | None:
        return "its round sends x - lambda * correction and keeps per-replica corrections, not a torchft round yet"

    def __init__(
        self,
        sync_every: int | SyncSchedule = 8,
        *,
        rho: float = 0.1,
        perturb_alpha: float = 1.0,
        prox_lambda: float = 10.0,
        **kwargs: Any,
    ) -> None:
        rho = check_float("rho", rho, low=0.0)
        perturb_alpha = check_float("perturb_alpha", perturb_alpha, low=0.0, high=1.0)
        prox_lambda = check_float("prox_lambda", prox_lambda, low=0.0, low_open=True)
        for name, ok in (
            ("participation", kwargs.get("participation", 1.0) == 1.0),
            ("adaptive_weights", not kwargs.get("adaptive_weights", False)),
            ("group_size", kwargs.get("group_size", 1) == 1),
            ("warmup_steps", not kwargs.get("warmup_steps", 0)),
        ):
            if not ok:
                raise ValueError(
                    f"FedSpeedStrategy does not support `{name}` (full participation, no groups)"
                )
        super().__init__(sync_every, **kwargs)
        self.rho = rho
        self.perturb_alpha = perturb_alpha
        self.prox_lambda = prox_lambda
        self._correction: list[Tensor] = []
        self._param_idx: set[int] = set()

    # ---------------------------------------------------------------- state
    @override
    def setup_algorithm(self) -> None:
        super().setup_algorithm()
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.accumulate_grad_batches > 1:
            raise ValueError("FedSpeedStrategy does not support `accumulate_grad_batches` > 1")
        self._last_average = [t.detach().clone() for t in self.tracked_tensors()]  # x^t
        self._correction = [torch.zeros_like(t) for t in self.tracked_tensors()]
        module = self.lightning_module
        assert module is not None
        self._param_idx = {self.tracked.ids[id(p)] for p in module.parameters() if id(p) in self.tracked.ids}

    @override
    def replica_state_dict(self) -> dict[str, Any]:
        return {
            **super().replica_state_dict(),
            "correction": [c.detach().cpu().clone() for c in self._correction],
        }

    @override
    def load_replica_state_dict(self, state: dict[str, Any]) -> None:
        super().load_replica_state_dict(state)
        if len(state.get("correction", [])) == len(self._correction):
            with torch.no_grad():
                for dst, src in zip(self._correction, state["correction"]):
                    dst.copy_(src)

    # ---------------------------------------------------------------- the local step
    @override
    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        module = self.lightning_module
        if module is not None and not module.automatic_optimization:
            raise ValueError("FedSpeedStrategy needs automatic optimization (it re-runs the closure)")
        inner = closure

        def fedspeed_closure() -> Any:
            loss = inner()
            self._fedspeed_gradients(optimizer, inner)
            return loss

        return super().optimizer_step(optimizer, fedspeed_closure, model, **kwargs)

    def _fedspeed_gradients(self, optimizer: Any, closure: Callable[[], Any]) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        g1 = [p.grad.detach().clone() for p in params]
        if self.rho > 0 and self.perturb_alpha > 0:
            with perturbed(params, sam_offsets(g1, self.rho)):
                closure()  # g2 at the perturbed point, same batch
            grads = [
                (1 - self.perturb_alpha) * a + self.perturb_alpha * (p.grad if p.grad is not None else 0.0)
                for p, a in zip(params, g1)
            ]
        else:
            grads = g1
        with torch.no_grad():
            for p, g in zip(params, grads):
                i = self.tracked.ids.get(id(p))
                if i is None:  # not tracked (e.g. a non-float parameter): plain gradient
                    p.grad = g
                    continue
                p.grad = g - self._correction[i] + (p.detach() - self._last_average[i]) / self.prox_lambda

    # ---------------------------------------------------------------- the round
    @override
    def sync(self) -> dict[str, float]:
        """Update the correction, contribute ``x_K - lambda g_hat``, average (Local SGD's sync)."""
        tensors = self.tracked_tensors()
        if self.is_finite(tensors):
            with torch.no_grad():
                for i in sorted(self._param_idx):
                    t, g, c = tensors[i], self._last_average[i], self._correction[i]
                    c.sub_((t - g) / self.prox_lambda)
                    t.sub_(c, alpha=self.prox_lambda)
        else:
            for c in self._correction:
                c.zero_()
        return super().sync()

    @override
    def final_sync(self) -> None:
        """A last FedSpeed round for the steps since the last one."""
        if self.steps_since_sync == 0:
            return
        self.sync()
