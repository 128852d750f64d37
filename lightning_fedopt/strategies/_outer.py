"""Building blocks of the outer-optimizer strategies (DiLoCo, streaming DiLoCo, CO2): the outer
optimizer factory and the pseudo-gradient compressor, both checked when the strategy is built."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["OuterOptimizerFactory", "outer_factory", "resolve_compressor"]

OuterOptimizerFactory = Callable[..., torch.optim.Optimizer]


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
    kwargs = dict(outer_kwargs or {})
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
        raise ValueError(f"`outer_optimizer` could not be built with {kwargs}: {err}") from err
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
    try:
        from lightning_fedopt.compression import get_compressor  # type: ignore[attr-defined]
    except ImportError as err:
        raise ValueError(
            "`compressor` needs lightning_fedopt.compression, which this installation does not have"
        ) from err
    return get_compressor(compressor)
