"""Building blocks of the outer-optimizer strategies (DiLoCo, streaming DiLoCo, CO2, SparseLoCo): the
outer optimizer factory and the pseudo-gradient compressor, both checked when the strategy is built.

DiLoCo's default outer optimizer (:class:`ScalingLawOuterOptimizer`) is Nesterov SGD with momentum
0.9 whose learning rate follows the number of replicas ``M`` (:func:`scaling_law_outer_lr`):
Charles et al., "Communication-Efficient Language Model Training Scales Reliably and Robustly:
Scaling Laws for DiLoCo" (arXiv 2503.09799), Figure 7 — "We select the best outer learning rate
over {0.2,0.4,0.6,0.8,1.0} ... For sufficiently large models, the best outer learning rate is
clearly constant": 0.4 for ``M = 1``, 0.6 for ``M = 2`` and ``M = 4``, 0.8 for ``M = 8`` (models of
335M parameters and more, ``H = 30``; section 3: "We use a momentum term of 0.9, and a constant
outer learning rate"). The value is resolved when the optimizer is built, at set-up, from the
strategy's number of replicas, so it is the same on every rank.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_float, check_int

__all__ = [
    "DILOCO_OUTER_MOMENTUM",
    "MAX_OUTER_LR",
    "SCALING_LAW_OUTER_LR",
    "UNKNOWN_REPLICAS_OUTER_LR",
    "OuterOptimizerFactory",
    "ScalingLawOuterOptimizer",
    "check_outer_kwargs",
    "outer_factory",
    "replica_count",
    "resolve_compressor",
    "scaling_law_outer_lr",
]

log = logging.getLogger("lightning_fedopt")

OuterOptimizerFactory = Callable[..., torch.optim.Optimizer]

#: the largest outer learning rate accepted: the outer step is ``lr`` times a pseudo-gradient (a
#: model difference), so DiLoCo uses ~0.7 and anything near this bound already diverges
MAX_OUTER_LR = 1e3

#: the best outer learning rate (Nesterov SGD, momentum 0.9, ``H = 30``) by number of replicas ``M``:
#: "Scaling Laws for DiLoCo" (arXiv 2503.09799), Figure 7, models of 335M parameters and more (the
#: sweep: {0.2, 0.4, 0.6, 0.8, 1.0}; Figure 8: it rises with ``H`` too, which is not applied here)
SCALING_LAW_OUTER_LR: dict[int, float] = {1: 0.4, 2: 0.6, 4: 0.6, 8: 0.8}
#: the outer learning rate when the number of replicas is not known (``fault_tolerance="torchft"``:
#: the quorum's size changes during the run): the DiLoCo paper's (Douillard et al., arXiv 2311.08105)
UNKNOWN_REPLICAS_OUTER_LR = 0.7
#: DiLoCo's outer Nesterov momentum (both papers)
DILOCO_OUTER_MOMENTUM = 0.9


def scaling_law_outer_lr(replicas: int | None) -> float:
    """DiLoCo's default outer learning rate for ``replicas`` replicas (:data:`SCALING_LAW_OUTER_LR`):
    the value measured for the smallest ``M`` in (1, 2, 4, 8) that is at least ``replicas`` (3 takes
    the ``M = 4`` value, 5 to 7 the ``M = 8`` one), the ``M = 8`` value beyond 8 (the paper measured
    no more); :data:`UNKNOWN_REPLICAS_OUTER_LR` for ``None``.

    Example:
        >>> [scaling_law_outer_lr(m) for m in (1, 2, 3, 4, 5, 8, 64, None)]
        [0.4, 0.6, 0.6, 0.6, 0.8, 0.8, 0.8, 0.7]
    """
    if replicas is None:
        return UNKNOWN_REPLICAS_OUTER_LR
    replicas = check_int("replicas", replicas, low=1)
    for m in sorted(SCALING_LAW_OUTER_LR):
        if replicas <= m:
            return SCALING_LAW_OUTER_LR[m]
    return SCALING_LAW_OUTER_LR[max(SCALING_LAW_OUTER_LR)]


def replica_count(strategy: Any) -> int | None:
    """The number of replicas ``M`` a replica strategy averages over: its ``outer_world_size``
    (a group of ``group_size`` processes is one replica); ``None`` without a strategy or under
    ``fault_tolerance="torchft"`` (there every Lightning world is one replica group and the number
    of groups in a round's quorum changes during the run)."""
    if strategy is None or getattr(strategy, "fault_tolerance", None) == "torchft":
        return None
    return max(1, int(strategy.outer_world_size))


class ScalingLawOuterOptimizer:
    """DiLoCo's default outer optimizer, a factory ``params -> torch.optim.SGD``: Nesterov SGD with
    momentum 0.9 whose learning rate follows the number of replicas (:func:`scaling_law_outer_lr`
    of :func:`replica_count`), resolved when it is built (at set-up, when the world size is known;
    the same on every rank, since every rank has the same world size and ``group_size``). The
    first build for a given number of replicas logs the value (rank 0).

    Args:
        kwargs: the other ``torch.optim.SGD`` arguments (``momentum``, ``nesterov``, ``weight_decay``,
            ...; not ``lr``).
        strategy: the strategy whose replicas are counted (None: unknown, see
            :data:`UNKNOWN_REPLICAS_OUTER_LR`).

    Example:
        >>> make = ScalingLawOuterOptimizer({"momentum": 0.9, "nesterov": True})
        >>> make.build([torch.zeros(1)], replicas=4).defaults["lr"]
        0.6
        >>> make
        ScalingLawOuterOptimizer(SGD, lr=by replicas {1: 0.4, 2: 0.6, 4: 0.6, 8: 0.8}, else 0.7, momentum=0.9, nesterov=True)
    """

    def __init__(self, kwargs: dict[str, Any], strategy: Any = None) -> None:
        if "lr" in kwargs:
            raise ValueError(
                "`outer_kwargs['lr']` given: the outer learning rate does not follow the replicas"
            )
        self.kwargs = dict(kwargs)
        self.strategy = strategy
        #: the learning rate of the last optimizer built (None before the first)
        self.lr: float | None = None
        self._logged: int | None = None

    def build(self, params: Any, replicas: int | None) -> torch.optim.SGD:
        """The outer SGD over ``params`` for ``replicas`` replicas."""
        return torch.optim.SGD(params, lr=scaling_law_outer_lr(replicas), **self.kwargs)

    def __call__(self, params: Any) -> torch.optim.SGD:
        replicas = replica_count(self.strategy)
        optimizer = self.build(params, replicas)
        self.lr = float(optimizer.defaults["lr"])
        key = -1 if replicas is None else replicas
        if self._logged != key and getattr(self.strategy, "global_rank", 0) == 0:
            self._logged = key
            if replicas is None:
                log.info(
                    "lightning_fedopt: DiLoCo outer learning rate %.2g (number of replicas unknown under "
                    "torchft; the DiLoCo paper's value); pass outer_kwargs={'lr': ...} to choose",
                    self.lr,
                )
            else:
                log.info(
                    "lightning_fedopt: DiLoCo outer learning rate %.2g for %d replica(s) (Scaling Laws for "
                    "DiLoCo, arXiv 2503.09799, Figure 7); pass outer_kwargs={'lr': ...} to choose",
                    self.lr,
                    replicas,
                )
        return optimizer

    @override
    def __repr__(self) -> str:
        # process-independent (the start-up handshake compares it): the rule, not the strategy
        table = ", ".join(f"{m}: {lr}" for m, lr in sorted(SCALING_LAW_OUTER_LR.items()))
        rest = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"ScalingLawOuterOptimizer(SGD, lr=by replicas {{{table}}}, else {UNKNOWN_REPLICAS_OUTER_LR}{rest})"


def check_outer_kwargs(outer_kwargs: Any) -> dict[str, Any]:
    """``outer_kwargs`` as a dict with its common entries checked, each named in the error:
    ``lr`` finite in (0, MAX_OUTER_LR], ``momentum`` and ``dampening`` in [0, 1), ``weight_decay``
    finite >= 0, ``eps`` finite > 0, ``betas`` two numbers in [0, 1), ``nesterov``/``amsgrad``/
    ``maximize`` real bools. Other entries are left to the optimizer class (see :func:`outer_factory`).

    Example:
        >>> check_outer_kwargs({"lr": float("nan")})
        Traceback (most recent call last):
        ...
        ValueError: `outer_kwargs['lr']` must be a finite number in (0.0, 1000.0], got nan
    """
    if outer_kwargs is None:
        return {}
    if not isinstance(outer_kwargs, dict) or not all(isinstance(k, str) for k in outer_kwargs):
        raise ValueError(f"`outer_kwargs` must be a dict of keyword arguments or None, got {outer_kwargs!r}")
    kw = dict(outer_kwargs)

    def name(key: str) -> str:
        return f"outer_kwargs['{key}']"

    if "lr" in kw:
        kw["lr"] = check_float(name("lr"), kw["lr"], low=0.0, high=MAX_OUTER_LR, low_open=True)
    for key in ("momentum", "dampening"):
        if key in kw:
            kw[key] = check_float(name(key), kw[key], low=0.0, high=1.0, high_open=True)
    if "weight_decay" in kw:
        kw["weight_decay"] = check_float(name("weight_decay"), kw["weight_decay"], low=0.0)
    if "eps" in kw:
        kw["eps"] = check_float(name("eps"), kw["eps"], low=0.0, low_open=True)
    if "betas" in kw:
        betas = kw["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"`{name('betas')}` must be two numbers in [0, 1), got {betas!r}")
        kw["betas"] = tuple(
            check_float(f"{name('betas')}[{i}]", b, low=0.0, high=1.0, high_open=True)
            for i, b in enumerate(betas)
        )
    for key in ("nesterov", "amsgrad", "maximize"):
        if key in kw:
            kw[key] = check_bool(name(key), kw[key])
    return kw


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name`` (exactly, or ignoring case)."""
    cls = getattr(torch.optim, name, None)
    if cls is None:
        cls = {k.lower(): v for k, v in vars(torch.optim).items() if isinstance(v, type)}.get(name.lower())
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"`outer_optimizer` must name a torch.optim optimizer (e.g. 'SGD', 'Adam'), got {name!r}"
        )
    return cls


def outer_factory(
    outer_optimizer: Any, outer_kwargs: dict[str, Any] | None, *, strategy: Any = None
) -> OuterOptimizerFactory:
    """Turn ``outer_optimizer`` (a ``torch.optim`` class or its name, a factory, or None for
    DiLoCo's Nesterov SGD with momentum 0.9) into a factory ``params -> Optimizer``, checking now
    that it builds a ``torch.optim.Optimizer`` with ``outer_kwargs``.

    With ``outer_optimizer=None`` and no ``outer_kwargs['lr']`` the learning rate follows the
    number of replicas of ``strategy`` (:class:`ScalingLawOuterOptimizer`); an explicit
    ``outer_kwargs['lr']`` always wins.

    Example:
        >>> make = outer_factory("Adam", {"lr": 0.1})
        >>> type(make([torch.zeros(2)])).__name__
        'Adam'
        >>> outer_factory(None, {"lr": 0.5})([torch.zeros(2)]).defaults["lr"]
        0.5
        >>> type(outer_factory(None, None)).__name__
        'ScalingLawOuterOptimizer'
    """
    kwargs = check_outer_kwargs(outer_kwargs)
    if outer_optimizer is None:
        kwargs = {"momentum": DILOCO_OUTER_MOMENTUM, "nesterov": True, **kwargs}
        if "lr" not in kwargs:
            scaled = ScalingLawOuterOptimizer(kwargs, strategy)
            try:
                scaled.build([torch.zeros(1)], replicas=1)
            except Exception as err:  # e.g. momentum 0 with Nesterov
                raise ValueError(
                    f"`outer_optimizer` could not be built with `outer_kwargs` {kwargs}: {err}"
                ) from err
            return scaled
        outer_optimizer = torch.optim.SGD
    if isinstance(outer_optimizer, str):
        outer_optimizer = _optimizer_class(outer_optimizer)
    if not callable(outer_optimizer):
        raise ValueError(
            f"`outer_optimizer` must be a torch.optim.Optimizer class, its name, or a callable "
            f"params -> torch.optim.Optimizer; got {outer_optimizer!r}"
        )
    factory = functools.partial(outer_optimizer, **kwargs) if kwargs else outer_optimizer
    try:
        probe = factory([torch.zeros(1)])
    except Exception as err:  # a wrong keyword, a negative lr, ...
        raise ValueError(f"`outer_optimizer` could not be built with `outer_kwargs` {kwargs}: {err}") from err
    if not isinstance(probe, torch.optim.Optimizer):
        raise ValueError(
            f"`outer_optimizer` must build a torch.optim.Optimizer, it built a {type(probe).__name__}"
        )
    return factory


def resolve_compressor(compressor: Any) -> Any:
    """``None``, or the :class:`~lightning_fedopt.compression.Compressor` that ``compressor``
    (an instance or a name such as ``"int8"``) stands for."""
    if compressor is None:
        return None
    from lightning_fedopt.compression import get_compressor

    return get_compressor(compressor)
