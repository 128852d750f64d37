"""The library's strategies and the PyTorch baseline as benchmark rows: ``name -> (description, factory)``.

:data:`STRATEGIES` is the table ``python -m benchmarks.run`` compares (a new algorithm is one more
entry) and the one the other benchmarks take their ``ddp``, ``local_sgd`` and ``diloco`` rows from.
The factories import ``lightning_fedopt`` only when called, i.e. inside a worker process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.harness import ONE_PROCESS_LOCAL_SGD, Row

__all__ = ["BY_NAME", "DILOCO_OUTER", "LOCAL_SGD_H", "STRATEGIES", "lf_row"]

LOCAL_SGD_H = 8  # H of the "local_sgd" entry, for the cost-model expectation printed at the end
#: the outer step of the ``diloco`` row: Nesterov SGD lr 0.5, momentum 0.5
DILOCO_OUTER = {"lr": 0.5, "momentum": 0.5, "nesterov": True}


def lf_row(cls: str, **kwargs: Any) -> Callable[[], Any]:
    """A factory of ``lightning_fedopt.<cls>(**kwargs)`` that imports the package when called."""

    def make() -> Any:
        import lightning_fedopt as lf

        return getattr(lf, cls)(**kwargs)

    return make


def _torch_avg(period: int, warmup_steps: int = 0) -> Any:
    from benchmarks.baselines import TorchPeriodicAveragingStrategy

    return TorchPeriodicAveragingStrategy(period=period, warmup_steps=warmup_steps)


#: name -> (description, factory). A new algorithm is one more line here.
STRATEGIES: dict[str, Row] = {
    "ddp": ("MeteredDDPStrategy(): gradient all-reduce every step", lf_row("MeteredDDPStrategy")),
    "torch_avg": ("PyTorch PeriodicModelAverager(period=8) [baseline]", lambda: _torch_avg(8)),
    "local_sgd": ("LocalSGDStrategy(sync_every=8)", lf_row("LocalSGDStrategy", sync_every=LOCAL_SGD_H)),
    "post_local_sgd": (
        "LocalSGDStrategy(sync_every=8, warmup_steps=50)",
        lf_row("LocalSGDStrategy", sync_every=8, warmup_steps=50),
    ),
    "local_sgd_h32": ("LocalSGDStrategy(sync_every=32)", lf_row("LocalSGDStrategy", sync_every=32)),
    "diloco": (
        "DiLoCoStrategy(sync_every=64), outer Nesterov SGD lr 0.5 momentum 0.5",
        lf_row("DiLoCoStrategy", sync_every=64, outer_kwargs=DILOCO_OUTER),
    ),
    "diloco_paper": (
        "DiLoCoStrategy(sync_every=64) with the paper's outer SGD lr 0.7 momentum 0.9 Nesterov",
        lf_row("DiLoCoStrategy", sync_every=64, outer_kwargs={"lr": 0.7, "momentum": 0.9, "nesterov": True}),
    ),
    "streaming_diloco": (
        "DiLoCoStrategy(sync_every=64, fragments=4, sync_delay=8, mixing=0.5)",
        lf_row("DiLoCoStrategy", sync_every=64, fragments=4, sync_delay=8, mixing=0.5),
    ),
    **{
        f"streaming_diloco_f{f}{'_strided' if layout == 'strided' else ''}": (
            f"DiLoCoStrategy(sync_every=64, fragments={f}, sync_delay=8, mixing=0.5, fragment_layout={layout!r})",
            lf_row(
                "DiLoCoStrategy",
                sync_every=64,
                fragments=f,
                sync_delay=8,
                mixing=0.5,
                fragment_layout=layout,
            ),
        )
        for f in (2, 3)
        for layout in ("contiguous", "strided")
    },
    "co2": (
        "CO2Strategy(sync_every=64, outer_lr=0.5, outer_momentum=0, clip=1): one-round-stale outer step",
        lf_row("CO2Strategy", sync_every=64, outer_lr=0.5, outer_momentum=0.0),
    ),
    "co2_paper": (
        "CO2Strategy(sync_every=64) with the released code's outer lr 1, momentum 0.5, clip 1",
        lf_row("CO2Strategy", sync_every=64, outer_momentum=0.5),
    ),
    "noloco": (
        "NoLoCoStrategy(sync_every=64): random pairs, point-to-point",
        lf_row("NoLoCoStrategy", sync_every=64),
    ),
    ONE_PROCESS_LOCAL_SGD: (
        "LocalSGDStrategy(sync_every=8) in ONE process: the strategy's per-step code, no CPU contention",
        lf_row("LocalSGDStrategy", sync_every=LOCAL_SGD_H),
    ),
}

#: rows runnable by name (``--strategies``) but in no default run, under the names of
#: :mod:`benchmarks.lm` and :data:`benchmarks.project.SPECS`: the planner's check on the digits MLP
BY_NAME: dict[str, Row] = {
    "diloco_h16": (
        "DiLoCoStrategy(sync_every=16), outer Nesterov SGD lr 0.5 momentum 0.5",
        lf_row("DiLoCoStrategy", sync_every=16, outer_kwargs=DILOCO_OUTER),
    ),
    "diloco_auto": (
        "DiLoCoStrategy(sync_every='auto'): H chosen from the measured step and link for a 5% communication budget",
        lf_row("DiLoCoStrategy", sync_every="auto"),
    ),
}
