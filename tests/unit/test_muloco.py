"""MuLoCo (``strategy="muloco"``): the inner optimizer :class:`MuonAdamW` (routing, bit-exact against
``torch.optim.Muon`` and ``torch.optim.AdamW`` stepped separately, its state dict, the optimizer
reset, Lightning's scheduler and gradient clipping), the 2-bit error-feedback codec
:class:`StatQuant` against a reference written from its rule, a single-process reference of the
MuLoCo round (N replicas, inner Muon steps, compressed error-feedback pseudo-gradients, outer
Nesterov SGD; tests/multiprocess/test_muloco.py runs the strategy on 2 real ranks against it), the
strategy's defaults and argument checks."""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from modules import KnownBatchModule, make_batch, make_net
from reference_outer import reference_diloco
from torch import nn

from lightning_fedopt.compression import Int4, SparseLoCo
from lightning_fedopt.compression.statquant import StatQuant
from lightning_fedopt.optim import DEFAULT_HEAD_NAMES, MuonAdamW, is_muon_based, route_parameters
from lightning_fedopt.strategies.diloco.muloco import (
    MULOCO_COMPRESSOR,
    MULOCO_OUTER,
    MULOCO_SYNC_EVERY,
    MuLoCoStrategy,
)

# the paper's / the authors' settings (module doc of lightning_fedopt/strategies/diloco/muloco.py)
H, BITS, BETA, SIGMAS = 30, 2, 1.0, 6.0
OUTER = {"lr": 0.7, "momentum": 0.6, "nesterov": True}


# ====================================================================== the reference
def ref_quantize(e: torch.Tensor, bits: int, sigmas: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistical quantizer from its rule: ``B = 2**bits`` bins of width
    ``h = sigmas * s / B`` centred on the mean ``mu`` (``s`` the unbiased std, ``h = 1`` when 0),
    code ``clamp(floor((e - mu) / h + B / 2), 0, B - 1)``, decoded to ``mu`` + the mean of the
    deviations that got the code. Returns the codes and the decoded values (dense)."""
    b = 2**bits
    mu = e.mean()
    c = e - mu
    n = e.numel()
    s = c.norm() / math.sqrt(n - 1) if n > 1 else torch.zeros(())
    h = sigmas * s / b
    if not (bool(torch.isfinite(h)) and float(h) > 0):
        h = torch.ones(())
    codes = torch.clamp(torch.floor(c / h + b / 2), 0, b - 1).long()
    out = torch.empty_like(e)
    for code in codes.unique().tolist():
        hit = codes == code
        out[hit] = c[hit].double().mean().float() + mu
    return codes, out


def ref_nbytes(numel: int, bits: int) -> int:
    """``numel`` codes of ``bits`` bits packed into bytes + ``2**bits`` fp32 levels."""
    return math.ceil(numel * bits / 8) + 4 * 2**bits


class RefStatQuant:
    """One replica's error-feedback buffers (per name) and its messages."""

    def __init__(self, bits: int = BITS, beta: float = BETA, sigmas: float = SIGMAS) -> None:
        self.bits, self.beta, self.sigmas = bits, beta, sigmas
        self.e: dict[str, torch.Tensor] = {}

    def send(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        e = self.e.setdefault(name, torch.zeros(delta.numel()))
        e.mul_(self.beta).add_(delta.reshape(-1).float())
        sent = ref_quantize(e, self.bits, self.sigmas)[1]
        e.sub_(sent)
        return sent.view(delta.shape)


def compressed_mean(replicas: list[RefStatQuant], name: str, deltas: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the replicas' messages for one tensor (a tensor whose message would not be smaller
    than its fp32 bytes travels dense and exact), summed in replica order as the collective does."""
    n = deltas[0].numel()
    if ref_nbytes(n, replicas[0].bits) >= 4 * n:
        sent = [d.float() for d in deltas]
    else:
        sent = [rep.send(name, d) for rep, d in zip(replicas, deltas)]
    acc = torch.zeros_like(sent[0])
    for s in sent:
        acc = acc + s
    return acc / len(sent)


def bn_net() -> nn.Module:
    """The test net with a BatchNorm layer (floating-point running statistics). The layer before it
    has no bias: BatchNorm removes it, its gradient is rounding noise, and Adam would amplify that
    noise into steps of ``lr`` whose signs differ between processes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))


class Holder(nn.Module):
    """The test net (or :func:`bn_net`) under the name ``net``, as :class:`modules.KnownBatchModule`
    holds it."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.net = bn_net() if bn else make_net(0)


def muon_inner(module: nn.Module) -> torch.optim.Optimizer:
    """The inner optimizer of the MuLoCo tests: Muon on ``net.0.weight``, AdamW on the output
    matrix (excluded by name) and the biases (no weight decay)."""
    return MuonAdamW(module, lr=0.01, muon_lr=0.02, vector_weight_decay=0.0, exclude=["net.2.weight"])


def reference_muloco(
    n: int,
    steps: int,
    sync_every: int,
    *,
    inner: Callable[[nn.Module], torch.optim.Optimizer] = muon_inner,
    compress: bool = True,
    bits: int = BITS,
    beta: float = BETA,
    outer_kwargs: dict[str, Any] | None = None,
    bn: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """MuLoCo on ``n`` simulated replicas, from the paper's update rule: replica ``r`` takes its
    optimizer step ``s`` on ``make_batch(r, s)`` (MSE) with its own ``inner`` optimizer (state kept
    across rounds); every ``sync_every`` steps each replica sends ``Q(e_r)`` with
    ``e_r <- beta e_r + (phi - theta_r)``, ``e_r <- e_r - Q(e_r)`` (``compress``; else the exact
    pseudo-gradient), the mean of the messages is ``phi``'s gradient for the outer Nesterov SGD,
    and every replica restarts from the new ``phi``. With ``bn`` (:func:`bn_net`) the running
    statistics become the replicas' exact mean at every round. Returns each replica's final state
    dict."""
    holders = [Holder(bn) for _ in range(n)]
    opts = [inner(h) for h in holders]
    params = [dict(h.named_parameters()) for h in holders]
    names = list(params[0])
    phi = {k: v.detach().clone() for k, v in params[0].items()}
    outer = torch.optim.SGD(list(phi.values()), **(outer_kwargs or OUTER))
    replicas = [RefStatQuant(bits, beta) for _ in range(n)]
    for step in range(steps):
        for r in range(n):
            x, y = make_batch(r, step)
            loss = nn.functional.mse_loss(holders[r].net(x), y)
            opts[r].zero_grad()
            loss.backward()
            opts[r].step()
        if (step + 1) % sync_every:
            continue
        for k in names:
            deltas = [(phi[k] - params[r][k]).detach() for r in range(n)]
            if compress:
                phi[k].grad = compressed_mean(replicas, k, deltas)
            else:
                phi[k].grad = sum(deltas[1:], deltas[0]) / n
        outer.step()
        outer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for r in range(n):
                for k in names:
                    params[r][k].copy_(phi[k])
            stats = [{k: b for k, b in h.named_buffers() if b.is_floating_point()} for h in holders]
            for k in stats[0]:
                mean = sum((st[k] for st in stats[1:]), stats[0][k].clone()) / n
                for st in stats:
                    st[k].copy_(mean)
    return [{k: v.detach().clone() for k, v in h.state_dict().items()} for h in holders]


# ====================================================================== MuonAdamW: routing
class Tiny(nn.Module):
    """An embedding, two hidden matrices, a norm, a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(self.emb(idx))))


TINY_MUON = ["body.0.weight", "body.2.weight"]
TINY_ADAMW = ["emb.weight", "head.weight"]
TINY_VECTORS = ["body.0.bias", "body.2.bias", "norm.weight", "norm.bias", "head.bias"]


def test_routing_matrices_to_muon_the_rest_to_adamw():
    got = route_parameters(Tiny()).names()
    assert got == {"muon": TINY_MUON, "adamw": TINY_ADAMW, "vectors": TINY_VECTORS}
    # the same from named_parameters(): the embedding is known by its name there
    assert route_parameters(Tiny().named_parameters()).names() == got
    assert DEFAULT_HEAD_NAMES == ("head", "lm_head", "output", "classifier")


def test_routing_tied_head_excluded_names_frozen_and_kernels():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(6, 4)
            self.tokens = nn.Embedding(5, 4)  # not named like an embedding: known by its type
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.tokens.weight  # tied output layer
            self.conv = nn.Conv2d(2, 3, 3)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    r = route_parameters(Tied()).names()
    assert r == {
        "muon": ["proj.weight"],
        "adamw": ["tokens.weight", "conv.weight"],  # the tied head once, under its first name
        "vectors": ["proj.bias", "conv.bias"],
    }
    r = route_parameters(Tied(), exclude=["proj.*"], head_names=()).names()
    assert r["muon"] == [] and r["adamw"][0] == "proj.weight"
    # by name: GPT-2's and Llama's embeddings and heads
    names = ["transformer.wte.weight", "model.embed_tokens.weight", "lm_head.weight", "h.0.mlp.c_fc.weight"]
    named = [(n, nn.Parameter(torch.zeros(3, 3))) for n in names]
    assert route_parameters(named).names()["muon"] == ["h.0.mlp.c_fc.weight"]


# ====================================================================== MuonAdamW: the optimizer
def _grads(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 10, (4, 5), generator=g)
    loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), torch.randint(0, 10, (20,), generator=g))
    loss.backward()


KW = {"lr": 3e-3, "muon_lr": 0.05, "weight_decay": 0.1, "muon_weight_decay": 0.02, "vector_weight_decay": 0.0}


def _separate(model: nn.Module) -> list[torch.optim.Optimizer]:
    """``torch.optim.Muon`` and ``torch.optim.AdamW`` built by hand over :data:`TINY_MUON` etc."""
    p = dict(model.named_parameters())
    muon = torch.optim.Muon([p[n] for n in TINY_MUON], lr=KW["muon_lr"], weight_decay=KW["muon_weight_decay"])
    adamw = torch.optim.AdamW(
        [
            {"params": [p[n] for n in TINY_ADAMW], "weight_decay": KW["weight_decay"]},
            {"params": [p[n] for n in TINY_VECTORS], "weight_decay": 0.0},
        ],
        lr=KW["lr"],
        betas=(0.9, 0.95),
    )
    return [muon, adamw]


def _lambda(step: int) -> float:
    return min(1.0, (step + 1) / 3) * 0.9**step


def test_bit_exact_against_muon_and_adamw_stepped_separately():
    """Five steps under a LambdaLR on each side: every parameter equal, bit for bit, every step."""
    ours, theirs = Tiny(), Tiny()
    opt = MuonAdamW(ours, **KW)
    assert [g["name"] for g in opt.param_groups] == ["muon", "adamw", "adamw_vectors"]
    assert [g["lr"] for g in opt.param_groups] == [KW["muon_lr"], KW["lr"], KW["lr"]]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02, 0.1, 0.0]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lambda)
    parts = _separate(theirs)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, _lambda) for o in parts]
    for step in range(5):
        for model in (ours, theirs):
            _grads(model, step)
        opt.step()
        for o in parts:
            o.step()
        opt.zero_grad()
        for o in parts:
            o.zero_grad()
        sched.step()
        for s in scheds:
            s.step()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(a, b), (step, name)
    assert opt.param_groups[0]["lr"] == parts[0].param_groups[0]["lr"] == KW["muon_lr"] * _lambda(5)
    assert all(p.grad is None for p in ours.parameters())  # zero_grad reaches every group


def test_state_dict_round_trip_and_reset():
    """A state dict saved after 3 steps (through torch.save / weights_only load) continues exactly;
    ``state.clear()`` (the replica strategies' optimizer reset) clears both parts."""
    model = Tiny()
    opt = MuonAdamW(model, **KW)
    for step in range(3):
        _grads(model, step)
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    assert len(sd["param_groups"]) == 3 and len(sd["state"]) == 9  # every parameter has state
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    clone = copy.deepcopy(model)
    opt2 = MuonAdamW(clone, **KW)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for o in (opt2, *opt2.parts):  # the parts see the loaded groups and state
        assert o.state is opt2.state
    assert opt2.muon is not None and opt2.muon.param_groups[0] is opt2.param_groups[0]
    for step in range(3, 6):
        for m, o in ((model, opt), (clone, opt2)):
            _grads(m, step)
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    # the reset: both parts start afresh, as new optimizers from these weights would
    opt.state.clear()
    assert opt.muon is not None and opt.adamw is not None
    assert not opt.muon.state and not opt.adamw.state
    fresh = copy.deepcopy(model)
    fresh_opt = MuonAdamW(fresh, **KW)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        _grads(m, 7)
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):  # another layout
        MuonAdamW(Tiny(), exclude=["body.*"]).load_state_dict(sd)
    with pytest.raises(ValueError, match="routes its parameters"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_deepcopy_steps_like_the_original():
    """A deep copy of (model, optimizer) is a working pair: its parts step the copied parameters."""
    model = Tiny()
    opt = MuonAdamW(model, **KW)
    _grads(model, 0)
    opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.muon is not None and opt2.muon.param_groups[0]["params"][0] is model2.body[0].weight
    assert opt2.muon.state is opt2.state
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        _grads(m, 1)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


class MuonModule(KnownBatchModule):
    """The multi-process tests' module with :func:`muon_inner` and an optional LambdaLR."""

    def __init__(self, schedule: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.schedule = schedule

    def configure_optimizers(self) -> Any:
        opt = muon_inner(self)
        if not self.schedule:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_lightning_schedules_every_group_and_clips_every_parameter(tmp_path):
    """One process, automatic optimization: the scheduler moves Muon's and AdamW's learning rates
    together, and gradient clipping (norm 0.01) covers every parameter when the parts step."""
    lrs: list[list[float]] = []
    norms: list[tuple[float, float]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.before = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in pl_module.parameters()])
            ).item()

    record = Record()
    module = MuonModule(schedule=True)
    opt_holder: list[MuonAdamW] = []

    def pre_hook(optimizer, args, kwargs):  # Muon's step: after the closure and the clipping
        grads = [p.grad.norm() for p in module.parameters()]
        norms.append((record.before, torch.linalg.vector_norm(torch.stack(grads)).item()))

    class Hook(L.Callback):
        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            opt_holder.append(opt)
            opt.muon.register_step_pre_hook(pre_hook)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        gradient_clip_val=0.01,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, Hook()],
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module)
    assert isinstance(opt_holder[0], MuonAdamW)
    expected = [[lr * _lambda(s) for lr in (0.02, 0.01, 0.01)] for s in range(4)]
    assert lrs == [pytest.approx(e) for e in expected]
    assert len(norms) == 4
    for unclipped, clipped in norms:
        assert unclipped > 0.01 and clipped <= 0.01 * (1 + 1e-4)
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "`lr` must be a finite number > 0"),
        ({"muon_lr": float("nan")}, "`muon_lr` must be a finite number > 0"),
        ({"weight_decay": -1.0}, "`weight_decay` must be a finite number >= 0"),
        ({"muon_weight_decay": -0.1}, "`muon_weight_decay`"),
        ({"vector_weight_decay": "0"}, "`vector_weight_decay`"),
        ({"betas": (0.9,)}, r"`betas` must be two numbers in \[0, 1\)"),
        ({"betas": (0.9, 1.0)}, r"`betas\[1\]` must be a finite number in \[0.0, 1.0\)"),
        ({"eps": 0.0}, "`eps` must be a finite number > 0"),
        ({"momentum": 1.0}, r"`momentum` must be a finite number in \[0.0, 1.0\)"),
        ({"nesterov": 1}, "`nesterov` must be True or False"),
        ({"ns_steps": 100}, r"`ns_steps` must be an integer in \[1, 99\]"),
        ({"adjust_lr_fn": "spectral"}, "`adjust_lr_fn` must be one of"),
        ({"exclude": "head"}, "`exclude` must be a sequence of strings"),
        ({"head_names": [1]}, "`head_names` must be a sequence of non-empty strings"),
        (
            {"params": [torch.zeros(2, requires_grad=True)]},
            "`params` must be an nn.Module or its named_parameters",
        ),
        ({"params": nn.Linear(2, 2).requires_grad_(False)}, "`params` holds no trainable parameter"),
    ],
)
def test_optimizer_arguments_name_the_argument_and_range(kwargs, name):
    kwargs = {"params": Tiny(), **kwargs}
    with pytest.raises(ValueError, match=name):
        MuonAdamW(**kwargs)


def test_is_muon_based_and_single_parts():
    lin = nn.Linear(3, 3)
    assert is_muon_based(MuonAdamW(lin)) and is_muon_based(torch.optim.Muon([lin.weight]))
    vectors_only = MuonAdamW([("b", nn.Parameter(torch.zeros(3)))])
    assert vectors_only.muon is None and len(vectors_only.param_groups) == 1
    assert not is_muon_based(vectors_only) and not is_muon_based(torch.optim.SGD(lin.parameters(), lr=0.1))
    matrices_only = MuonAdamW([("w", nn.Parameter(torch.zeros(3, 3)))])
    assert matrices_only.adamw is None and [g["name"] for g in matrices_only.param_groups] == ["muon"]


def test_language_model_example_with_muon_inside():
    from examples.lm import LanguageModel

    model = LanguageModel(d_model=32, n_layers=1, n_heads=2, seq_len=16, optimizer="muon")
    conf = model.configure_optimizers()
    opt = conf["optimizer"]
    assert isinstance(opt, MuonAdamW)
    r = opt.routing.names()
    assert r["muon"] == [f"net.blocks.0.{n}.weight" for n in ("qkv", "proj", "fc", "out")]
    assert r["adamw"] == ["net.tok_emb.weight", "net.pos_emb.weight"]  # the tied head is tok_emb
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.1, 0.0]
    assert type(LanguageModel(d_model=32, n_heads=2).configure_optimizers()["optimizer"]) is torch.optim.AdamW
    with pytest.raises(ValueError, match="`optimizer`"):
        LanguageModel(optimizer="sgd")


# ====================================================================== StatQuant
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_statquant_matches_its_rule_bytes_and_error_feedback(bits):
    """Four calls of one key with beta 0.9: codes and decoded values equal the reference (codes
    exactly, values to float32 rounding), the payload is exactly the counted bytes, and the error
    stays in the buffer."""
    c = StatQuant(bits=bits, beta=0.9)
    ref = RefStatQuant(bits, 0.9)
    g = torch.Generator().manual_seed(bits)
    for call in range(4):
        x = torch.randn(203, generator=g) * (call + 1)
        before = ref.e.get("w", torch.zeros(203)).clone()
        p = c.compress(x, "w")
        assert p.nbytes == c.compressed_nbytes(203) == ref_nbytes(203, bits)
        got = c.decompress(p)
        want = ref.send("w", x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(c.state_dict()["w"]["error"], 0.9 * before + x - got, rtol=1e-6, atol=1e-6)
        assert len(got.unique()) <= 2**bits
    assert c.ratio(1 << 20) == pytest.approx(32 / bits, rel=1e-3)  # vs fp32: 16x at 2 bits


def test_statquant_error_feedback_sends_everything_eventually():
    """beta = 1: what was sent over the calls plus the buffer is what came in (telescoping)."""
    c = StatQuant()
    g = torch.Generator().manual_seed(0)
    total_in, total_sent = torch.zeros(500), torch.zeros(500)
    for _ in range(6):
        x = torch.randn(500, generator=g)
        total_in += x
        total_sent += c.decompress(c.compress(x, "k"))
    torch.testing.assert_close(total_sent + c.state_dict()["k"]["error"], total_in, rtol=0, atol=1e-5)
    no_feedback = StatQuant(error_feedback=False)
    no_feedback.compress(torch.randn(10), "k")
    assert no_feedback.state_dict() == {}


def test_statquant_pack_round_trip_and_edge_cases():
    for bits in (1, 2, 4, 8):
        c = StatQuant(bits=bits)
        codes = torch.randint(0, 2**bits, (37,), dtype=torch.uint8)
        packed = c.pack(codes)
        assert packed.numel() == math.ceil(37 * bits / 8)
        assert torch.equal(c.unpack(packed, 37), codes.long())
    c = StatQuant()
    assert c.decompress(c.compress(torch.zeros(9), "z")).abs().max() == 0  # s = 0
    assert torch.equal(c.decompress(c.compress(torch.full((9,), 2.5), "f")), torch.full((9,), 2.5))
    one_bit = StatQuant(bits=1, error_feedback=False)  # the sign around the mean
    x = torch.tensor([1.0, 1.0, 5.0, 5.0])
    assert one_bit.decompress(one_bit.compress(x)).tolist() == [1.0, 1.0, 5.0, 5.0]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bits": 3}, r"`bits` must be one of \(1, 2, 4, 8\)"),
        ({"bits": True}, "`bits`"),
        ({"beta": 1.5}, r"`beta` must be a finite number in \[0.0, 1.0\]"),
        ({"range_sigmas": 0.0}, "`range_sigmas` must be a finite number > 0"),
        ({"error_feedback": "yes"}, "`error_feedback`"),
    ],
)
def test_statquant_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        StatQuant(**kwargs)


# ====================================================================== the round reference
def test_reference_round_without_compression_is_diloco():
    """The reference's skeleton: inner SGD and exact pseudo-gradients give DiLoCo's reference
    (tests/reference_outer.py, written independently) with the same outer Nesterov SGD."""

    def sgd(module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(module.parameters(), lr=0.1)

    ours = reference_muloco(2, 12, 4, inner=sgd, compress=False)
    theirs = reference_diloco(2, 12, 4, outer=lambda p: torch.optim.SGD(p, **OUTER))
    for r in range(2):
        for k in theirs[r]:
            torch.testing.assert_close(ours[r][k], theirs[r][k], rtol=0, atol=1e-6)


def test_reference_messages_are_the_compressors():
    """Per replica a real StatQuant instance: its messages, averaged as the gather collective does,
    equal the reference's bit for bit over rounds (error feedback carrying over)."""
    names = ["a", "b"]
    ours = [StatQuant() for _ in range(3)]
    refs = [RefStatQuant() for _ in range(3)]
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for name in names:
            deltas = [torch.randn(7, 9, generator=g) for _ in range(3)]
            pays = [c.compress(d, name) for c, d in zip(ours, deltas)]
            got = ours[0].decompress_mean(pays).view(7, 9)
            assert torch.equal(got, compressed_mean(refs, name, deltas))


def test_muloco_round_reference_compresses_and_trains():
    """Muon inside, 2-bit error-feedback messages: the replicas end identical (they restart from
    phi), the compression is real (differs from exact pseudo-gradients), and both runs beat the
    initial loss on held-out batches."""
    compressed = reference_muloco(2, 24, 4)
    exact = reference_muloco(2, 24, 4, compress=False)
    assert all(torch.equal(compressed[0][k], compressed[1][k]) for k in compressed[0])
    diff = max((compressed[0][k] - exact[0][k]).abs().max().item() for k in exact[0])
    assert diff > 1e-4

    @torch.no_grad()
    def loss(state: dict[str, torch.Tensor]) -> float:
        h = Holder()
        h.load_state_dict(state)
        return sum(
            float(nn.functional.mse_loss(h.net(x), y)) for x, y in (make_batch(99, i) for i in range(4))
        )

    start = loss(Holder().state_dict())
    assert loss(compressed[0]) < start and loss(exact[0]) < start


# ====================================================================== the strategy
def test_strategy_defaults_are_the_papers():
    s = MuLoCoStrategy()
    assert s.sync_every == H == MULOCO_SYNC_EVERY and s.fragments == 1 and s.sync_delay == 0
    c = s.compressor
    assert isinstance(c, StatQuant)
    assert (c.bits, c.beta, c.range_sigmas, c.error_feedback) == (BITS, BETA, SIGMAS, True)
    assert MULOCO_COMPRESSOR == {"bits": BITS, "beta": BETA, "range_sigmas": SIGMAS}
    outer = s.outer_factory([torch.zeros(2)])
    assert type(outer) is torch.optim.SGD
    d = outer.defaults
    assert {k: d[k] for k in OUTER} == OUTER == MULOCO_OUTER
    assert "ScalingLaw" not in repr(s.outer_factory)


def test_strategy_compressor_choices_and_overrides(caplog):
    a, b = MuLoCoStrategy(), MuLoCoStrategy()
    assert a.compressor is not b.compressor  # error-feedback buffers are one replica's own
    mine = StatQuant(bits=4)
    assert MuLoCoStrategy(compressor=mine).compressor is mine
    assert MuLoCoStrategy(compressor=None).compressor is None  # DiLoCo with Muon inside
    assert isinstance(MuLoCoStrategy(compressor="statquant").compressor, StatQuant)
    assert isinstance(MuLoCoStrategy(compressor=SparseLoCo()).compressor, SparseLoCo)
    with caplog.at_level(logging.WARNING, logger="lightning_fedopt"):
        assert isinstance(MuLoCoStrategy(compressor="int4").compressor, Int4)
    assert "without error feedback" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_fedopt"):
        MuLoCoStrategy(compressor=Int4(error_feedback=True))
    assert "without error feedback" not in caplog.text
    d = MuLoCoStrategy(outer_kwargs={"lr": 0.5}).outer_factory([torch.zeros(1)]).defaults
    assert (d["lr"], d["momentum"], d["nesterov"]) == (0.5, 0.6, True)
    adam = MuLoCoStrategy(outer_optimizer="Adam", outer_kwargs={"lr": 0.1}).outer_factory([torch.zeros(1)])
    assert type(adam) is torch.optim.Adam
    assert MuLoCoStrategy(sync_every=10).sync_every == 10
    # the streaming arguments at their defaults pass (Lightning's CLI fills every argument in)
    s = MuLoCoStrategy(fragments=1, fragment_layout="auto", sync_delay=0, mixing=0.0)
    assert s.fragments == 1 and s.sync_delay == 0 and s.mixing == 0.0


def test_strategy_warns_once_when_the_inner_optimizer_is_not_muon(caplog):
    s = MuLoCoStrategy()
    lin = nn.Linear(3, 3)
    with caplog.at_level(logging.WARNING, logger="lightning_fedopt"):
        assert s.check_inner_optimizers([MuonAdamW(lin)])
    assert not caplog.records
    s = MuLoCoStrategy()
    with caplog.at_level(logging.WARNING, logger="lightning_fedopt"):
        assert not s.check_inner_optimizers([torch.optim.AdamW(lin.parameters())])
        assert not s.check_inner_optimizers([torch.optim.AdamW(lin.parameters())])
    warnings = [r for r in caplog.records if "not Muon-based (AdamW)" in r.getMessage()]
    assert len(warnings) == 1 and "MuonAdamW" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"compressor": "no_such"}, "compressor"),
        ({"compressor": 0}, "compressor"),
        ({"sync_every": 0}, "sync_every"),
        ({"outer_kwargs": {"lr": float("nan")}}, "outer_kwargs"),
        ({"outer_kwargs": {"momentum": 1.0}}, "outer_kwargs"),
        ({"outer_kwargs": [("lr", 1.0)]}, "outer_kwargs"),
        ({"fragments": 2}, "fragments"),
        ({"sync_delay": 1}, "sync_delay"),
        ({"mixing": 0.5}, "mixing"),
        ({"mixing": "0.0"}, "mixing"),
        ({"fragments": True}, "fragments"),
        ({"fragment_layout": "strided"}, "fragment_layout"),
        ({"fault_tolerance": "torchft"}, "fault_tolerance"),
    ],
)
def test_strategy_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}"):
        MuLoCoStrategy(**kwargs)


BAD = [0, 1, -1, 2, 10**18, 0.5, -0.0, math.nan, math.inf, -math.inf, 1e-300, True, False, "False", "", None]


@pytest.mark.parametrize(
    ("make", "args"),
    [
        (
            lambda **kw: MuonAdamW(**{"params": nn.Linear(2, 2), **kw}),
            ["params", "lr", "muon_lr", "weight_decay", "muon_weight_decay", "vector_weight_decay", "betas",
             "eps", "momentum", "nesterov", "ns_steps", "adjust_lr_fn", "exclude", "head_names"],
        ),
        (StatQuant, ["bits", "beta", "range_sigmas", "error_feedback"]),
        (MuLoCoStrategy, ["sync_every", "compressor", "outer_optimizer", "outer_kwargs"]),
    ],
)  # fmt: skip
def test_fuzzed_arguments_construct_or_name_the_argument(make, args):
    """As tests/unit/test_fuzz_arguments.py does for the exported constructors: one argument at a
    time, every value either builds or raises a ValueError naming that argument."""
    for arg in args:
        for value in BAD:
            try:
                make(**{arg: value})
            except ValueError as err:
                assert f"`{arg}" in str(err), (arg, value, str(err))


def test_registered_name():
    MuLoCoStrategy.register_strategies(StrategyRegistry)  # what lightning_fedopt._register does
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="muloco", logger=False)
    assert type(trainer.strategy) is MuLoCoStrategy and trainer.strategy.sync_every == H
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="muloco_fork", logger=False)
    assert trainer.strategy._start_method == "fork"
