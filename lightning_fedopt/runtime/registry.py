"""Registering a strategy name with Lightning's ``StrategyRegistry``, with its launcher variants."""

from __future__ import annotations

from typing import Any

__all__ = ["START_METHOD_SUFFIXES", "register_name"]

#: ``"<name>"`` starts processes with ``popen`` (scripts, CLI), ``"<name>_spawn"`` and
#: ``"<name>_fork"`` with ``spawn``/``fork`` (notebooks, tests).
START_METHOD_SUFFIXES = (("", "popen"), ("_spawn", "spawn"), ("_fork", "fork"))


def register_name(
    registry: Any, name: str, cls: type, *, description: str | None = None, **init_kwargs: Any
) -> None:
    """Register ``name``, ``name_spawn`` and ``name_fork`` for ``cls`` (a name already taken is kept).

    ``init_kwargs`` are passed to ``cls`` when Lightning builds the strategy from the name.
    """
    what = description or cls.__name__
    for suffix, method in START_METHOD_SUFFIXES:
        if name + suffix in registry:
            continue
        registry.register(
            name + suffix,
            cls,
            description=f"{what}, start_method={method!r}",
            start_method=method,
            **init_kwargs,
        )
