"""Building blocks of the outer-optimizer strategies (DiLoCo, streaming DiLoCo, CO2): the outer
optimizer factory and the pseudo-gradient compressor, both checked when the strategy is built."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from lightning_fedopt._validate import check_bool, check_float

__all__ = [
    "MAX_OUTER_LR",
    "OuterOptimizerFactory",
    "check_outer_kwargs",
    "outer_factory",
    "resolve_compressor",
]

OuterOptimizerFactory = Callable[..., torch.optim.Optimizer]

#: the largest outer learning rate accepted: the outer step is ``lr`` times a pseudo-gradient (a
#: model difference), so DiLoCo uses ~0.7 and anything near this bound already diverges
MAX_OUTER_LR = 1e3


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


def outer_factory(outer_optimizer: Any, outer_kwargs: dict[str, Any] | None) -> OuterOptimizerFactory:
    """Turn ``outer_optimizer`` (a ``torch.optim`` class or its name, a factory, or None for
    DiLoCo's Nesterov SGD with lr 0.7 and momentum 0.9) into a factory ``params -> Optimizer``,
    checking now that it builds a ``torch.optim.Optimizer`` with ``outer_kwargs``.

    Example:
        >>> make = outer_factory("Adam", {"lr": 0.1})
        >>> type(make([torch.zeros(2)])).__name__
        'Adam'
    """
    kwargs = check_outer_kwargs(outer_kwargs)
    if outer_optimizer is None:
        outer_optimizer = torch.optim.SGD
        kwargs = {"lr": 0.7, "momentum": 0.9, "nesterov": True, **kwargs}
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
