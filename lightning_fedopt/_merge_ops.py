"""The merge operators of :mod:`lightning_fedopt.merging`, on whole models.

Each operator maps ``(models, weights, context, **params)`` to the merged floating tensors:
``models[k][p]`` is tensor ``p`` of contribution ``k`` (already float64, in the set's canonical
order), ``weights[k]`` its weight and the :class:`Context` carries the seed, names, ``base`` and
``reference``. :class:`~lightning_fedopt.merging.Merge` validates the parameters and calls them;
the formulas are listed in :mod:`lightning_fedopt.merging`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Context",
    "op_dare",
    "op_krum",
    "op_mean",
    "op_median",
    "op_model_stock",
    "op_nna",
    "op_slerp",
    "op_task_arithmetic",
    "op_ties",
    "op_trimmed_mean",
    "op_variance_corrected",
]


@dataclass
class Context:
    """What an operator may need besides the models: the set's ``seed`` (DARE's masks), the
    tensors' ``names``, the ``base`` the deltas are taken from and NNA's ``reference`` (float64)."""

    seed: int
    names: Sequence[str] | None
    base: list[Tensor] | None
    reference: list[Tensor] | None


def _need_base(ctx: Context, method: str) -> list[Tensor]:
    if ctx.base is None:
        raise ValueError(f"merge {method!r} needs `base=` (the model the deltas are taken from)")
    return ctx.base


def _wmean(models: list[list[Tensor]], weights: list[float], p: int) -> Tensor:
    total = sum(weights)
    acc = torch.zeros_like(models[0][p])
    for m, w in zip(models, weights):
        acc += m[p] * w
    return acc / total


def op_mean(models: list[list[Tensor]], weights: list[float], ctx: Context, **_: Any) -> list[Tensor]:
    return [_wmean(models, weights, p) for p in range(len(models[0]))]


def op_slerp(
    models: list[list[Tensor]], weights: list[float], ctx: Context, t: float = 0.5, **_: Any
) -> list[Tensor]:
    if len(models) != 2:
        raise ValueError(f"merge 'slerp' takes exactly 2 contributions, got {len(models)}")
    out = []
    for a, b in zip(*models):
        va, vb = a.reshape(-1), b.reshape(-1)
        na, nb = va.norm(), vb.norm()
        cos = float((va @ vb) / (na * nb)) if na > 0 and nb > 0 else 1.0
        if abs(cos) > 0.9995:
            out.append((1 - t) * a + t * b)
            continue
        omega = math.acos(max(-1.0, min(1.0, cos)))
        s = math.sin(omega)
        out.append(math.sin((1 - t) * omega) / s * a + math.sin(t * omega) / s * b)
    return out


def op_task_arithmetic(
    models: list[list[Tensor]], weights: list[float], ctx: Context, scale: float = 1.0, **_: Any
) -> list[Tensor]:
    base = _need_base(ctx, "task_arithmetic")
    return [
        base[p]
        + scale * sum((w * (m[p] - base[p]) for m, w in zip(models, weights)), torch.zeros_like(base[p]))
        for p in range(len(base))
    ]


def _trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``ceil(density * n)`` entries of largest magnitude (ties: lower index first)."""
    flat = delta.reshape(-1)
    k = math.ceil(density * flat.numel() - 1e-9)
    if k >= flat.numel():
        return delta.clone()
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    out = torch.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.view_as(delta)


def op_ties(
    models: list[list[Tensor]],
    weights: list[float],
    ctx: Context,
    density: float = 0.5,
    scale: float = 1.0,
    **_: Any,
) -> list[Tensor]:
    base = _need_base(ctx, "ties")
    out = []
    for p in range(len(base)):
        trimmed = [_trim(m[p] - base[p], density) for m in models]
        elected = torch.sign(sum((w * d for d, w in zip(trimmed, weights)), torch.zeros_like(base[p])))
        num = torch.zeros_like(base[p])
        den = torch.zeros_like(base[p])
        for d, w in zip(trimmed, weights):
            agree = (torch.sign(d) == elected) & (d != 0)
            num += torch.where(agree, w * d, torch.zeros_like(d))
            den += agree.to(d.dtype) * w
        merged = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
        out.append(base[p] + scale * merged)
    return out


def op_dare(
    models: list[list[Tensor]],
    weights: list[float],
    ctx: Context,
    density: float = 0.5,
    scale: float = 1.0,
    **_: Any,
) -> list[Tensor]:
    base = _need_base(ctx, "dare")
    gen = torch.Generator().manual_seed(ctx.seed)
    acc = [torch.zeros_like(b) for b in base]
    for m, w in zip(models, weights):  # canonical order: contribution-major, tensor-minor draws
        for p in range(len(base)):
            keep = torch.rand(base[p].shape, generator=gen, dtype=torch.float64) < density
            delta = (m[p] - base[p]) * keep.to(base[p].device) / density
            acc[p] += w * delta
    return [b + scale * a for b, a in zip(base, acc)]


def op_model_stock(models: list[list[Tensor]], weights: list[float], ctx: Context, **_: Any) -> list[Tensor]:
    base = _need_base(ctx, "model_stock")
    n = len(models)
    if n < 2:
        raise ValueError("merge 'model_stock' needs at least 2 contributions")
    out = []
    for p in range(len(base)):
        deltas = [(m[p] - base[p]).reshape(-1) for m in models]
        coss = []
        for i in range(n):
            for j in range(i + 1, n):
                ni, nj = deltas[i].norm(), deltas[j].norm()
                coss.append(float(deltas[i] @ deltas[j] / (ni * nj)) if ni > 0 and nj > 0 else 1.0)
        cos = sum(coss) / len(coss)
        t = n * cos / (1 + (n - 1) * cos) if (1 + (n - 1) * cos) != 0 else 0.0
        mean = sum((m[p] for m in models), torch.zeros_like(base[p])) / n
        out.append(t * mean + (1 - t) * base[p])
    return out


_BN_STATS = ("running_mean", "running_var")


def op_variance_corrected(
    models: list[list[Tensor]], weights: list[float], ctx: Context, eps: float = 1e-4, **_: Any
) -> list[Tensor]:
    out = []
    for p in range(len(models[0])):
        mean = _wmean(models, weights, p)
        name = ctx.names[p] if ctx.names is not None else ""
        if mean.numel() <= 1 or name.rsplit(".", 1)[-1] in _BN_STATS:
            out.append(mean)
            continue
        target = sum(float(m[p].var(unbiased=False)) for m in models) / len(models)
        mu, var = mean.mean(), float(mean.var(unbiased=False))
        out.append((mean - mu) * math.sqrt((target + eps) / (var + eps)) + mu)
    return out


def _check_f(method: str, n: int, f: int, need: int) -> None:
    if n < need:
        raise ValueError(f"merge {method!r} with f={f} needs at least {need} contributions, got {n}")


def op_median(models: list[list[Tensor]], weights: list[float], ctx: Context, **_: Any) -> list[Tensor]:
    out = []
    n = len(models)
    for p in range(len(models[0])):
        s = torch.stack([m[p] for m in models]).sort(dim=0).values
        out.append(s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)
    return out


def op_trimmed_mean(
    models: list[list[Tensor]], weights: list[float], ctx: Context, f: int = 1, **_: Any
) -> list[Tensor]:
    n = len(models)
    _check_f("trimmed_mean", n, f, 2 * f + 1)
    return [
        torch.stack([m[p] for m in models]).sort(dim=0).values[f : n - f].mean(0)
        for p in range(len(models[0]))
    ]


def _sq_dist(a: list[Tensor], b: list[Tensor]) -> float:
    return sum(float((x - y).pow(2).sum()) for x, y in zip(a, b))


def op_nna(
    models: list[list[Tensor]], weights: list[float], ctx: Context, f: int = 1, **_: Any
) -> list[Tensor]:
    if ctx.reference is None:
        raise ValueError("merge 'nna' needs `reference=` (the merging replica's own model)")
    n = len(models)
    _check_f("nna", n, f, f + 1)
    d = [_sq_dist(m, ctx.reference) for m in models]
    chosen = sorted(range(n), key=lambda k: (d[k], k))[: n - f]
    return [
        sum((models[k][p] for k in chosen), torch.zeros_like(models[0][p])) / len(chosen)
        for p in range(len(models[0]))
    ]


def op_krum(
    models: list[list[Tensor]], weights: list[float], ctx: Context, f: int = 1, m: int = 1, **_: Any
) -> list[Tensor]:
    n = len(models)
    _check_f("krum", n, f, 2 * f + 3)
    d = [[_sq_dist(models[i], models[j]) for j in range(n)] for i in range(n)]
    scores = [sum(sorted(d[i][j] for j in range(n) if j != i)[: n - f - 2]) for i in range(n)]
    chosen = sorted(range(n), key=lambda k: (scores[k], k))[: min(m, n)]
    return [
        sum((models[k][p] for k in chosen), torch.zeros_like(models[0][p])) / len(chosen)
        for p in range(len(models[0]))
    ]
