"""DIMAT: align a neighbour's hidden units to your own by activation matching, then merge.

Saadati et al., "DIMAT: Decentralized Iterative Merging-And-Training for Deep Learning Models",
CVPR 2024. Two networks that compute the same function can order their hidden units
differently; averaging them unit by unit then mixes unrelated features. Before merging, each
hidden layer of the other network is permuted so that its units match the reference network's:

1. run both networks on the same (local) data and record every hidden layer's activations (after
   the nonlinearity; for convolutions every spatial position is a sample of each channel);
2. correlate each reference unit with each other unit and solve the assignment that maximises
   the total correlation (:func:`scipy.optimize.linear_sum_assignment`);
3. permute the other network consistently: the layer's output rows and bias, the BatchNorm that
   follows it (weight, bias, running statistics), and the next layer's input columns (through a
   ``Flatten`` each channel is a block of ``H*W`` features).

The permuted network computes exactly the same function. :func:`dimat_merge` then averages the
aligned networks and recomputes BatchNorm statistics on the data.

Supported: an ``nn.Sequential`` of ``Linear``, ``Conv2d`` (``groups=1``), ``BatchNorm1d/2d``,
elementwise activations, dropout, pooling and ``Flatten``: MLPs and plain CNNs. Anything else (a
residual block, attention, a nested container) raises a ``ValueError`` naming the layer.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["align", "check_permutable", "dimat_merge", "permute_hidden_units", "recompute_batchnorm"]

_WEIGHT = (nn.Linear, nn.Conv2d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
)


def _layers(net: nn.Module) -> list[nn.Module]:
    if not isinstance(net, nn.Sequential):
        raise ValueError(
            f"DIMAT can permute an nn.Sequential of Linear/Conv2d/BatchNorm/activation/pooling/Flatten "
            f"layers (an MLP or a plain CNN), got {type(net).__name__}"
        )
    layers = list(net)
    for i, m in enumerate(layers):
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"DIMAT cannot permute layer {i} ({m}): grouped convolutions are not supported")
        if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
            raise ValueError(f"DIMAT cannot permute layer {i} ({m}): only Flatten(1, -1) is supported")
        if not isinstance(m, (*_WEIGHT, *_NORM, *_PASS)):
            raise ValueError(
                f"DIMAT cannot permute layer {i} ({type(m).__name__}) of this network: supported are "
                "Linear, Conv2d, BatchNorm1d/2d, elementwise activations, dropout, pooling and Flatten "
                "(MLPs and plain CNNs; no residual connections or nested modules)"
            )
    if not any(isinstance(m, _WEIGHT) for m in layers):
        raise ValueError("DIMAT: the network has no Linear or Conv2d layer")
    return layers


def check_permutable(net: nn.Module) -> None:
    """Raise a ``ValueError`` naming the layer unless DIMAT can permute ``net``'s hidden units.

    Example:
        >>> check_permutable(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
        >>> check_permutable(nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU())))
        Traceback (most recent call last):
        ...
        ValueError: DIMAT cannot permute layer 1 (Sequential) of this network: supported are Linear, Conv2d, BatchNorm1d/2d, elementwise activations, dropout, pooling and Flatten (MLPs and plain CNNs; no residual connections or nested modules)
    """
    _layers(net)


def _hidden_points(layers: list[nn.Module]) -> list[tuple[int, int]]:
    """For every weight layer except the last: (its index, index of the next weight layer)."""
    idx = [i for i, m in enumerate(layers) if isinstance(m, _WEIGHT)]
    return list(itertools.pairwise(idx))


@torch.no_grad()
def _activations(
    layers: list[nn.Module], inputs: Iterable[Tensor], points: list[int]
) -> dict[int, list[Tensor]]:
    """Inputs of the layers at ``points`` (i.e. the features after the previous block), as (samples, units)."""
    out: dict[int, list[Tensor]] = {p: [] for p in points}
    for x in inputs:
        h = x
        for i, m in enumerate(layers):
            if i in out:
                feats = h
                if feats.dim() == 4:  # (N, C, H, W): every position is a sample of each channel
                    feats = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
                out[i].append(feats.double())
            h = m(h)
    return out


def _match(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """The permutation ``p`` maximising ``sum_i corr(a_i, b_p[i])`` (a, b: samples x units).

    ``wa``, ``wb``: each unit's incoming weights (units x fan-in, in the same input basis); their
    cosine similarity, scaled by 1e-6, only breaks ties between units that are constant on the data.
    """
    from scipy.optimize import linear_sum_assignment

    a = a - a.mean(0)
    b = b - b.mean(0)
    sa, sb = a.norm(dim=0), b.norm(dim=0)
    corr = (a.T @ b) / (sa[:, None] * sb[None, :]).clamp_min(1e-12)
    # a dead unit (no variance on the data) correlates with nothing: match it by its weights
    wa = wa / wa.norm(dim=1, keepdim=True).clamp_min(1e-12)
    wb = wb / wb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    corr = torch.nan_to_num(corr) + 1e-6 * (wa @ wb.T)
    rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def _spatial_after(layers: list[nn.Module], start: int, stop: int, example: Tensor | None) -> int:
    """Features per channel that a Flatten between ``start`` and ``stop`` produces (1 without Flatten)."""
    if not any(isinstance(layers[i], nn.Flatten) for i in range(start, stop)):
        return 1
    if example is None:
        raise ValueError("DIMAT: a Flatten after a convolution needs example inputs to know the spatial size")
    modes = [m.training for m in layers]
    try:
        with torch.no_grad():
            h = example[:1]
            for m in layers[:stop]:
                if isinstance(m, nn.Flatten):
                    return int(h[0].numel() // h.shape[1])
                m.eval()  # no running-statistics update
                h = m(h)
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)
    return 1


@torch.no_grad()
def permute_hidden_units(
    net: nn.Sequential, perms: Sequence[Tensor], example: Tensor | None = None
) -> nn.Sequential:
    """A copy of ``net`` whose hidden units are reordered: unit ``i`` of hidden layer ``l`` of the
    result is unit ``perms[l][i]`` of ``net``. The copy computes the same function.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> p = permute_hidden_units(net, [torch.tensor([3, 2, 1, 0])])
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(p(x), net(x))
        True
    """
    layers = _layers(net)
    points = _hidden_points(layers)
    if len(perms) != len(points):
        raise ValueError(f"DIMAT: the network has {len(points)} hidden layers, got {len(perms)} permutations")
    out = copy.deepcopy(net)
    new = list(out)
    for (start, stop), perm in zip(points, perms):
        perm = perm.to(torch.long)
        w = new[start]
        weight = cast(Tensor, w.weight)
        weight.copy_(weight[perm])
        bias = cast("Tensor | None", w.bias)
        if bias is not None:
            bias.copy_(bias[perm])
        for i in range(start + 1, stop):
            m = new[i]
            if isinstance(m, _NORM):
                for t in (m.weight, m.bias, m.running_mean, m.running_var):
                    if t is not None:
                        t.copy_(t[perm])
        spatial = _spatial_after(layers, start, stop, example)
        cols = (perm[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
        nxt_weight = cast(Tensor, new[stop].weight)
        nxt_weight.copy_(nxt_weight[:, cols])
    return out


def align(reference: nn.Sequential, other: nn.Sequential, inputs: Iterable[Tensor] | Tensor) -> nn.Sequential:
    """A copy of ``other`` with its hidden units permuted to match ``reference``'s on ``inputs``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> b = permute_hidden_units(a, [torch.randperm(8)])
        >>> back = align(a, b, torch.randn(64, 4))
        >>> torch.equal(back[0].weight, a[0].weight)
        True
    """
    batches = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if not batches:
        raise ValueError("DIMAT needs at least one batch of inputs to match activations")
    layers_a, layers_b = _layers(reference), _layers(other)
    if [type(m) for m in layers_a] != [type(m) for m in layers_b]:
        raise ValueError("DIMAT: the two networks have different architectures")
    points = _hidden_points(layers_a)
    # where each hidden layer's units are observed: the input of the next weight layer, or of the
    # Flatten in between (there each channel is still one unit)
    nxt = [
        next((i for i in range(start, stop) if isinstance(layers_a[i], nn.Flatten)), stop)
        for start, stop in points
    ]
    was_training = reference.training, other.training
    reference.eval()
    other.eval()
    try:
        acts_a = _activations(layers_a, batches, nxt)
        acts_b = _activations(layers_b, batches, nxt)
    finally:
        reference.train(was_training[0])
        other.train(was_training[1])
    perms: list[Tensor] = []
    cols = None  # the previous permutation, as input columns of the current layer
    for (start, stop), point in zip(points, nxt):
        wa, wb = _incoming(layers_a[start]), _incoming(layers_b[start])
        if cols is not None:
            wb = wb.reshape(wb.shape[0], len(cols), -1)[:, cols].reshape(wb.shape[0], -1)
        perm = _match(torch.cat(acts_a[point]), torch.cat(acts_b[point]), wa, wb)
        perms.append(perm)
        spatial = _spatial_after(layers_a, start, stop, batches[0])
        cols = (perm[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
    return permute_hidden_units(other, perms, example=batches[0])


def _incoming(layer: nn.Module) -> Tensor:
    """Each output unit's incoming weights as a row, grouped by input feature (then kernel position)."""
    w = cast(Tensor, layer.weight).detach().double()
    return w.reshape(w.shape[0], -1)


@torch.no_grad()
def recompute_batchnorm(net: nn.Module, inputs: Iterable[Tensor] | Tensor) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) on ``inputs``."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    batches = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    saved = [(m, m.momentum) for m in norms]
    training = net.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    try:
        for x in batches:
            net(x)
    finally:
        for m, mom in saved:
            m.momentum = mom
        net.train(training)


def dimat_merge(
    models: Sequence[nn.Sequential],
    inputs: Iterable[Tensor] | Tensor,
    weights: Sequence[float] | None = None,
    reference: int = 0,
) -> nn.Sequential:
    """Align every model to ``models[reference]``, average them (``weights``, default uniform) and
    recompute BatchNorm statistics on ``inputs``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> b = permute_hidden_units(a, [torch.randperm(8)])
        >>> m = dimat_merge([a, b], torch.randn(64, 4))
        >>> torch.allclose(m[0].weight, a[0].weight)
        True
    """
    batches = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models) or not models or sum(weights) <= 0:
        raise ValueError("`weights` must give one positive weight per model")
    ref = models[reference]
    aligned = [m if k == reference else align(ref, m, batches) for k, m in enumerate(models)]
    out = copy.deepcopy(ref)
    total = sum(weights)
    states = [m.state_dict() for m in aligned]
    merged: dict[str, Any] = {}
    for key, value in out.state_dict().items():
        if torch.is_floating_point(value):
            merged[key] = sum(w * s[key] for w, s in zip(weights, states)) / total
        else:
            merged[key] = value
    out.load_state_dict(merged)
    recompute_batchnorm(out, batches)
    return out
