"""Single-process reference of the compressed all-reduce
(:func:`lightning_fedopt.compression.collective.all_reduce_compressed`) for ``len(per_rank)``
ranks, written out from its documented scheme rather than from its code."""

from __future__ import annotations

import copy
from typing import Any

import torch


def chunk_len(numel: int, world: int) -> int:
    """Values per rank's chunk of a packed buffer of ``numel`` values: ``ceil(numel / world)``."""
    return -(-numel // world)


def goes_compressed(comp: Any, numel: int, dtype: torch.dtype) -> bool:
    """A buffer or tensor travels compressed only when that is smaller than its dense bytes."""
    return comp.compressed_nbytes(numel) < numel * torch.empty((), dtype=dtype).element_size()


def _dense_mean(xs: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    return (sum(x.to(acc) for x in xs) / len(xs)).to(xs[0].dtype)


def _forget_padding(comp: Any, key: str, real: int) -> None:
    """Padding is not data: it carries no error feedback from one call to the next."""
    for v in comp._state.get(key, {}).values():
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            v[real:] = 0


def simulate_all_reduce_compressed(
    per_rank: list[list[torch.Tensor]], comps: list[Any], names: list[str], op: str = "mean"
) -> list[torch.Tensor]:
    """What every rank ends with (all ranks finite); ``comps[r]`` is rank r's compressor (its state
    is used and updated as that rank's would be, under keys of its own: with a fixed packing the
    per-chunk state is the same numbers as the collective's per-name state).

    Chunked compressors: the tensors of each dtype are concatenated, split into ``world`` chunks of
    ``ceil(n / world)`` values (zero-padded; padding keeps no error feedback); rank j's chunk is the mean of every rank's compressed
    chunk j, compressed again by rank j. Gather / linear compressors: tensor by tensor (gather: the
    compressor's ``decompress_mean`` of the payloads, by default their sum over ``world``). What would
    not be smaller compressed travels dense (exact mean, in the tensors' dtype)."""
    world = len(per_rank)
    out: list[torch.Tensor | None] = [None] * len(names)
    comp = comps[0]
    for c in comps:  # the collective tells every compressor how many ranks take part
        c.set_world_size(world)
    if comp.collective == "chunked":
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(per_rank[0]):
            groups.setdefault(t.dtype, []).append(i)
        for dtype, idx in groups.items():
            xs = [torch.cat([per_rank[r][i].detach().reshape(-1) for i in idx]) for r in range(world)]
            n = xs[0].numel()
            c = chunk_len(n, world)
            pads = [torch.cat([x, torch.zeros(c * world - n, dtype=dtype)]) for x in xs]
            key = names[idx[0]]
            parts = []
            for j in range(world):
                chunks = [p[j * c : (j + 1) * c] for p in pads]
                if not goes_compressed(comp, c, dtype):
                    parts.append(_dense_mean(chunks))
                    continue
                real = max(0, min(c, n - j * c))  # values of chunk j that are not padding
                pays = []
                for r in range(world):
                    pays.append(comps[r].compress(chunks[r].float(), f"{key}/w{j}", salt=r))
                    _forget_padding(comps[r], f"{key}/w{j}", real)
                mean = comps[j].decompress_sum(pays) / world
                server = comps[j].compress(mean, f"{key}/s{j}", salt=j)
                _forget_padding(comps[j], f"{key}/s{j}", real)
                parts.append(comps[j].decompress_sum([server]))
            flat = torch.cat(parts)[:n]
            off = 0
            for i in idx:
                t = per_rank[0][i]
                out[i] = flat[off : off + t.numel()].view(t.shape).to(t.dtype)
                off += t.numel()
    else:
        for i, name in enumerate(names):
            t = per_rank[0][i]
            xs = [per_rank[r][i].detach().reshape(-1) for r in range(world)]
            if not goes_compressed(comp, t.numel(), t.dtype):
                res = _dense_mean(xs if comp.collective == "gather" else [x.float() for x in xs])
            elif comp.collective == "gather":  # whole payloads all-gathered, averaged by the compressor
                pays = [comps[r].compress(xs[r].float(), name, salt=r) for r in range(world)]
                mean = comps[0].decompress_mean(pays)
                res = [comps[r].aggregate(name, mean) for r in range(world)][-1]
            else:  # linear: the payloads are averaged
                pays = [comps[r].compress(xs[r].float(), name, salt=r) for r in range(world)]
                avg = copy.copy(pays[0])
                avg.tensors = (sum(p.tensors[0] for p in pays) / world,)
                res = comps[0].decompress_sum([avg])
            out[i] = res.view(t.shape).to(t.dtype)
    if op == "sum":
        out = [o * world for o in out]
    return out  # type: ignore[return-value]
