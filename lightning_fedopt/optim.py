"""Inner optimizers for the replica strategies: :class:`MuonAdamW`, Muon for the hidden matrices and
AdamW for everything else, as one ``torch.optim.Optimizer``.

Muon (Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024;
``torch.optim.Muon``) orthogonalises the momentum of a 2-D weight by a Newton-Schulz iteration
and steps along it; it is meant for the hidden matrices only: "Other parameters, such as
embeddings, classifier heads, and hidden gains/biases should be optimized using standard AdamW"
(Keller Jordan's Muon README), and ``torch.optim.Muon`` refuses any parameter that is not 2-D.
MuLoCo (Thérien et al., arXiv 2505.23725) is DiLoCo with this pairing as the inner optimizer; its
authors' code (bentherien/muloco-1, ``create_param_groups``) sends
``p.ndim < 2 or "emb" in name or "head" in name`` to AdamW and the rest to Muon.

Lightning's automatic optimization takes one optimizer; :class:`MuonAdamW` is that one. It
builds a ``torch.optim.Muon`` and a ``torch.optim.AdamW`` and exposes their parameter groups as
its own (the same dicts: a learning-rate scheduler on :class:`MuonAdamW` schedules both, Lightning's
gradient clipping sees every parameter) and one ``state`` shared by both (``state.clear()``, the
replica strategies' optimizer reset, clears both; the state dict is torch's usual format). A step
is Muon's step then AdamW's, each exactly as the torch optimizer alone would take it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_choice, check_float, check_int

__all__ = [
    "DEFAULT_HEAD_NAMES",
    "MuonAdamW",
    "Routing",
    "is_muon_based",
    "muon_available",
    "route_parameters",
]

#: the modules whose matrices go to AdamW by name: the last component of the module's path (the
#: authors' code: ``"head" in name``; ``output``: torchtitan's Llama head; ``classifier``: vision)
DEFAULT_HEAD_NAMES: tuple[str, ...] = ("head", "lm_head", "output", "classifier")
#: an embedding by name (a component of the module's path): ``tok_emb``, ``embed_tokens``,
#: ``word_embeddings``, GPT-2's ``wte``/``wpe`` (the authors' code: ``"emb" in name``)
_EMBEDDING = re.compile(r"(^|_)(emb|embed|embeds|embedding|embeddings|wte|wpe)(_|$)")
#: ``adjust_lr_fn`` values ``torch.optim.Muon`` accepts
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def muon_available() -> bool:
    """Whether this torch has ``torch.optim.Muon`` (torch 2.9 and later)."""
    return isinstance(getattr(torch.optim, "Muon", None), type)


@dataclass
class Routing:
    """Which optimizer each trainable parameter goes to (names as ``named_parameters`` gives them;
    a parameter shared by several modules is listed once, under its first name).

    Attributes:
        muon: 2-D hidden matrices (Muon).
        adamw: the other parameters of 2 or more dimensions (embeddings, heads, excluded
            matrices, convolution kernels): AdamW with ``weight_decay``.
        vectors: parameters of fewer than 2 dimensions (biases, norm gains): AdamW with
            ``vector_weight_decay``.
    """

    muon: list[tuple[str, Tensor]] = field(default_factory=list)
    adamw: list[tuple[str, Tensor]] = field(default_factory=list)
    vectors: list[tuple[str, Tensor]] = field(default_factory=list)

    def names(self) -> dict[str, list[str]]:
        """``{"muon": [...], "adamw": [...], "vectors": [...]}``: the names of each part."""
        return {k: [n for n, _ in getattr(self, k)] for k in ("muon", "adamw", "vectors")}


def _check_patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"`{name}` must be a sequence of strings (e.g. ('head',)), got {value!r}")
    out = tuple(value)
    if not all(isinstance(v, str) and v for v in out):
        raise ValueError(f"`{name}` must be a sequence of non-empty strings, got {value!r}")
    return out


def route_parameters(
    params: Any,
    *,
    exclude: Iterable[str] = (),
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
) -> Routing:
    """Sort the trainable parameters of ``params`` into Muon's and AdamW's.

    A parameter goes to AdamW when it has fewer or more than 2 dimensions (``torch.optim.Muon``
    takes matrices only), belongs to an ``nn.Embedding``/``nn.EmbeddingBag`` (by identity, so an
    output layer tied to the embedding goes with it; only when ``params`` is a module) or to a
    module named like an embedding (a path component such as ``tok_emb``, ``embed_tokens``,
    ``wte``), belongs to a module whose own name is in ``head_names`` (``lm_head.weight``,
    ``model.head.weight``), or its name matches a glob of ``exclude`` (``fnmatch``, case-sensitive,
    against the full name, e.g. ``"net.2.*"``); every other 2-D parameter goes to Muon. Frozen
    parameters (``requires_grad=False``) are left out.

    Args:
        params: an ``nn.Module`` or its ``named_parameters()`` (``(name, parameter)`` pairs).
        exclude: glob patterns of parameter names that go to AdamW.
        head_names: module names whose parameters go to AdamW (default :data:`DEFAULT_HEAD_NAMES`).

    Raises:
        ValueError: ``params`` is neither, ``exclude``/``head_names`` are not sequences of strings,
            or there is no trainable parameter.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 10))
        >>> route_parameters(net, exclude=["3.*"]).names()
        {'muon': ['1.weight'], 'adamw': ['0.weight', '3.weight'], 'vectors': ['1.bias', '2.weight', '2.bias', '3.bias']}
    """
    exclude = _check_patterns("exclude", exclude)
    heads = set(_check_patterns("head_names", head_names))
    embedding_ids: set[int] = set()
    if isinstance(params, nn.Module):
        for m in params.modules():
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                embedding_ids.update(id(p) for p in m.parameters(recurse=False))
        named: list[Any] = list(params.named_parameters())
    elif isinstance(params, (str, bytes, Tensor)) or not isinstance(params, Iterable):
        raise ValueError(
            "`params` must be an nn.Module or its named_parameters() ((name, parameter) pairs), "
            f"got {type(params).__name__}"
        )
    else:
        named = list(params)
    routing = Routing()
    seen: set[int] = set()
    for item in named:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], Tensor)
        ):
            raise ValueError(
                "`params` must be an nn.Module or its named_parameters() ((name, parameter) pairs), "
                f"got an item {item!r:.80}"
            )
        name, p = item
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        path = name.split(".")[:-1]
        if p.ndim < 2:
            routing.vectors.append((name, p))
        elif (
            p.ndim != 2
            or id(p) in embedding_ids
            or any(_EMBEDDING.search(part.lower()) for part in path)
            or (bool(path) and path[-1] in heads)
            or any(fnmatch.fnmatchcase(name, pat) for pat in exclude)
        ):
            routing.adamw.append((name, p))
        else:
            routing.muon.append((name, p))
    if not (routing.muon or routing.adamw or routing.vectors):
        raise ValueError("`params` holds no trainable parameter")
    return routing


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices, AdamW for the rest, as one optimizer (module doc): what a
    LightningModule returns from ``configure_optimizers`` to train with Muon inside a replica
    strategy (MuLoCo: :class:`~lightning_fedopt.strategies.diloco.muloco.MuLoCoStrategy`).

    The parameter groups are, in this order and when not empty: ``"muon"`` (a
    ``torch.optim.Muon`` group), ``"adamw"`` and ``"adamw_vectors"`` (``torch.optim.AdamW``
    groups); each carries its ``name``. Which parameter goes where: :func:`route_parameters`
    (:attr:`routing` keeps the result).

    Args:
        params: an ``nn.Module`` (e.g. the LightningModule itself) or its ``named_parameters()``.
        lr: AdamW's learning rate (> 0).
        muon_lr: Muon's learning rate (> 0), before ``adjust_lr_fn``'s shape factor.
        weight_decay: decoupled weight decay (>= 0) of AdamW's matrices and, unless
            ``muon_weight_decay`` is given, of Muon's (both: ``p <- p (1 - lr wd)``).
        muon_weight_decay: Muon's weight decay (>= 0); None: ``weight_decay``.
        vector_weight_decay: AdamW's weight decay on biases and norm gains (>= 0); None:
            ``weight_decay``.
        betas: AdamW's two betas, each in [0, 1).
        eps: AdamW's eps (> 0).
        momentum: Muon's momentum in [0, 1).
        nesterov: Muon's Nesterov momentum.
        ns_steps: Newton-Schulz iterations, 1 to 99.
        adjust_lr_fn: Muon's shape factor of the learning rate: None or ``"original"``
            (``sqrt(max(1, rows / cols))``, Keller Jordan's), or ``"match_rms_adamw"``
            (``0.2 sqrt(max(rows, cols))``, Moonshot's: reuse AdamW's learning rate).
        exclude: glob patterns of parameter names that go to AdamW (e.g. ``("net.2.*",)`` for an
            output layer not named like a head).
        head_names: module names whose parameters go to AdamW.

    Defaults: ``muon_lr=0.02``, ``momentum=0.95``, Nesterov, 5 Newton-Schulz steps, AdamW
    ``lr=3e-4``, ``betas=(0.9, 0.95)``, ``weight_decay=0.01``: the pairing of the
    ``torch.optim.Muon`` documentation's example and Keller Jordan's README (Muon ``lr=0.02,
    momentum=0.95``; AdamW ``lr=3e-4, betas=(0.90, 0.95), weight_decay=0.01``); the MuLoCo authors'
    code uses the same Muon momentum, betas and weight decay (their Muon defaults to no Nesterov and
    scales the learning rate by ``sqrt(fan_out / fan_in)``; torch's ``"original"`` is
    ``sqrt(max(1, fan_out / fan_in))``). ``eps=1e-8``: AdamW's default.

    Raises:
        ValueError: an argument out of its range (the message names it), nothing to optimize.
        RuntimeError: this torch has no ``torch.optim.Muon`` (torch < 2.9).

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 10))
        >>> opt = MuonAdamW(net, lr=1e-3, exclude=["3.*"])
        >>> [(g["name"], len(g["params"]), g["lr"]) for g in opt.param_groups]
        [('muon', 1, 0.02), ('adamw', 2, 0.001), ('adamw_vectors', 2, 0.001)]
        >>> net(torch.tensor([[1, 2]])).sum().backward(); opt.step(); opt.zero_grad()
        >>> sorted(len(s) for s in opt.state.values())     # Muon: momentum; AdamW: step and 2 moments
        [1, 3, 3, 3, 3]
    """

    def __init__(
        self,
        params: Any,
        lr: float = 3e-4,
        muon_lr: float = 0.02,
        weight_decay: float = 0.01,
        *,
        muon_weight_decay: float | None = None,
        vector_weight_decay: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        exclude: Iterable[str] = (),
        head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
    ) -> None:
        lr = check_float("lr", lr, low=0.0, low_open=True)
        muon_lr = check_float("muon_lr", muon_lr, low=0.0, low_open=True)
        weight_decay = check_float("weight_decay", weight_decay, low=0.0)
        muon_wd = check_float("muon_weight_decay", muon_weight_decay, low=0.0, allow_none=True)
        vector_wd = check_float("vector_weight_decay", vector_weight_decay, low=0.0, allow_none=True)
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Iterable) or len(tuple(betas)) != 2:
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}")
        b1, b2 = (
            check_float(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
            for i, b in enumerate(tuple(betas))
        )
        eps = check_float("eps", eps, low=0.0, low_open=True)
        momentum = check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
        nesterov = check_bool("nesterov", nesterov)
        ns_steps = check_int("ns_steps", ns_steps, low=1, high=99)
        check_choice("adjust_lr_fn", adjust_lr_fn, ADJUST_LR_FNS)
        if not muon_available():
            raise RuntimeError("MuonAdamW needs torch.optim.Muon (torch 2.9 or later)")
        #: which parameter went where (:func:`route_parameters`)
        self.routing = route_parameters(params, exclude=exclude, head_names=head_names)
        r = self.routing
        #: the torch optimizers that step (None where no parameter went to them)
        self.muon: torch.optim.Optimizer | None = None
        self.adamw: torch.optim.AdamW | None = None
        if r.muon:
            self.muon = torch.optim.Muon(
                [{"params": [p for _, p in r.muon], "name": "muon"}],
                lr=muon_lr,
                weight_decay=weight_decay if muon_wd is None else muon_wd,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                adjust_lr_fn=adjust_lr_fn,
            )
        adamw_groups = [
            {"params": [p for _, p in r.adamw], "weight_decay": weight_decay, "name": "adamw"},
            {
                "params": [p for _, p in r.vectors],
                "weight_decay": weight_decay if vector_wd is None else vector_wd,
                "name": "adamw_vectors",
            },
        ]
        adamw_groups = [g for g in adamw_groups if g["params"]]
        if adamw_groups:
            self.adamw = torch.optim.AdamW(
                adamw_groups, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay
            )
        self._building = True
        # the parts' groups are this optimizer's groups (the same dicts)
        super().__init__([g for part in self.parts for g in part.param_groups], {"lr": lr})
        self._building = False
        self._link()

    @property
    def parts(self) -> tuple[torch.optim.Optimizer, ...]:
        """The torch optimizers that step, Muon's first."""
        return tuple(p for p in (self.muon, self.adamw) if p is not None)

    def _link(self) -> None:
        """Give the parts this optimizer's ``state`` and their slices of its ``param_groups``."""
        at = 0
        for part in self.parts:
            n = len(part.param_groups)
            part.__setstate__({"state": self.state, "param_groups": self.param_groups[at : at + n]})
            at += n

    @override
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only while building: the parameters were routed then (build a new optimizer for more)."""
        if not getattr(self, "_building", False):
            raise ValueError(
                "MuonAdamW routes its parameters when it is built; build a new MuonAdamW for new parameters"
            )
        super().add_param_group(param_group)

    @override
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` (once, with gradients enabled), then Muon's step and AdamW's."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading (groups in this optimizer's order), then the parts see the loaded groups
        and state."""
        super().load_state_dict(state_dict)
        self._link()

    @override
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "routing": self.routing, "muon": self.muon, "adamw": self.adamw}


def is_muon_based(optimizer: Any) -> bool:
    """Whether ``optimizer`` steps with Muon: a :class:`MuonAdamW` with matrices for Muon, a
    ``torch.optim.Muon``, or an optimizer class named like Muon (``MuonWithAuxAdam``, ...).

    Example:
        >>> is_muon_based(torch.optim.AdamW([torch.zeros(2, requires_grad=True)]))
        False
    """
    if isinstance(optimizer, MuonAdamW):
        return optimizer.muon is not None
    muon = getattr(torch.optim, "Muon", None)
    if isinstance(muon, type) and isinstance(optimizer, muon):
        return True
    return "muon" in type(optimizer).__name__.lower()
