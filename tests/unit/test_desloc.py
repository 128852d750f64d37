"""DES-LOC (``DESLOCStrategy``, ``strategy="desloc"``) without processes: a single-process reference
of the update rule (N replicas as plain tensors, each with its own ``torch.optim.AdamW``; the
parameters, ``exp_avg`` and ``exp_avg_sq`` each averaged on their own period), checked against the
rule written out by hand; the schedule of the moments; argument checks; the optimizer check; the
registered name; the state a checkpoint carries. Two real gloo ranks against the reference, and the
optimizer check when a Trainer sets up: tests/multiprocess/test_desloc.py (which imports
:func:`reference_desloc` from here). No Trainer is fitted here: an in-process fit of a replica
strategy leaves Lightning's process group initialised in this interpreter, and the forked ranks of
a later multi-process test in the same session would inherit it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor

from lightning_fedopt.runtime.handshake import agreement_fields
from lightning_fedopt.strategies.local_sgd.desloc import (
    DESLOCStrategy,
    adam_moment_slots,
    check_adam_optimizers,
    moments_due,
)
from lightning_fedopt.strategies.local_sgd.local_sgd import LocalSGDStrategy

MOMENTS = ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------- the reference
def reference_desloc(
    init: Sequence[Tensor],
    loss_fn: Callable[[int, int, list[Tensor]], Tensor],
    *,
    replicas: int,
    steps: int,
    sync_every: int,
    moment_periods: tuple[int, int],
    adamw: dict[str, Any] | None = None,
    nan_at: tuple[int, int] | None = None,
    final_sync: bool = True,
) -> list[dict[str, list[Tensor | None]]]:
    """DES-LOC on ``replicas`` copies of the tensors ``init``, written from the paper's rule.

    Replica ``r`` takes AdamW steps (``adamw`` keyword arguments) on ``loss_fn(r, step, params)``
    (its loss becomes NaN at ``(r, step) == nan_at``). After step ``t`` (1-based), when ``t`` is a
    multiple of ``sync_every = K_x``: parameter average number ``k`` replaces every replica's
    parameters by their mean, and ``exp_avg`` (``exp_avg_sq``) by theirs when
    ``k % moment_periods[0]`` (``[1]``) is 0 -- i.e. ``K_u = a K_x``, ``K_v = b K_x``. Replicas
    whose parameters or moments are not all finite are left out of the means and take them; such a
    replica whose moments are still not finite afterwards restarts its AdamW (state cleared). At the
    end, unless the last step was an average, the parameters of the finite replicas are averaged
    (the final synchronisation; the moments stay). Returns per replica ``{"params": [...],
    "exp_avg": [...], "exp_avg_sq": [...]}`` (None for a tensor with no state).
    """
    params = [[t.detach().clone().requires_grad_(True) for t in init] for _ in range(replicas)]
    opts = [torch.optim.AdamW(ps, **(adamw or {})) for ps in params]

    def moment(r: int, i: int, key: str) -> Tensor | None:
        return opts[r].state.get(params[r][i], {}).get(key)

    def moments_finite(r: int) -> bool:
        return all(
            bool(torch.isfinite(m).all())
            for i in range(len(init))
            for key in MOMENTS
            if (m := moment(r, i, key)) is not None
        )

    def params_finite(r: int) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in params[r])

    rounds = since = 0
    for step in range(steps):
        for r in range(replicas):
            loss = loss_fn(r, step, params[r])
            if nan_at is not None and (r, step) == tuple(nan_at):
                loss = loss * float("nan")
            opts[r].zero_grad()
            loss.backward()
            opts[r].step()
        since += 1
        if (step + 1) % sync_every:
            continue
        rounds, since = rounds + 1, 0
        ok = [r for r in range(replicas) if params_finite(r) and moments_finite(r)]
        assert ok, "no finite replica"
        due = [key for key, every in zip(MOMENTS, moment_periods) if rounds % every == 0]
        with torch.no_grad():
            mean_params = [sum(params[r][i] for r in ok) / len(ok) for i in range(len(init))]
            mean_moments = {}
            for key in due:
                for i in range(len(init)):
                    have = [m for r in ok if (m := moment(r, i, key)) is not None]
                    if have:
                        mean_moments[key, i] = sum(have) / len(have)
            for r in range(replicas):
                for i, mean in enumerate(mean_params):
                    params[r][i].copy_(mean)
                for (key, i), mean in mean_moments.items():
                    m = moment(r, i, key)
                    if m is not None:
                        m.copy_(mean)
            for r in range(replicas):
                if r not in ok and not moments_finite(r):
                    opts[r].state.clear()
    if final_sync and since:
        ok = [r for r in range(replicas) if params_finite(r)]
        with torch.no_grad():
            mean_params = [sum(params[r][i] for r in ok) / len(ok) for i in range(len(init))]
            for r in range(replicas):
                for i, mean in enumerate(mean_params):
                    params[r][i].copy_(mean)
    out = []
    for r in range(replicas):
        state: dict[str, list[Tensor | None]] = {"params": [p.detach().clone() for p in params[r]]}
        for key in MOMENTS:
            state[key] = [None if (m := moment(r, i, key)) is None else m.clone() for i in range(len(init))]
        out.append(state)
    return out


def _linear_loss(grads: list[Tensor]) -> Callable[[int, int, list[Tensor]], Tensor]:
    """``<g_r, x>``: replica ``r``'s gradient is the constant ``grads[r]``."""
    return lambda r, step, ps: (grads[r] * ps[0]).sum()


def _quadratic_loss(r: int, step: int, ps: list[Tensor]) -> Tensor:
    """A different noisy quadratic per replica and step (non-IID replicas)."""
    g = torch.Generator().manual_seed(1000 * r + step)
    target = torch.randn(5, generator=g) + r
    return ((ps[0] - target) ** 2).sum() + (ps[1] ** 2).sum() * (1 + r)


# ---------------------------------------------------------------------- the reference's math by hand
def test_reference_is_the_rule_written_out_by_hand():
    """Two replicas with constant gradients ``g_r`` (linear losses), K_x = 1, moment_periods
    (1, 2), two steps, Adam without weight decay. Step 1: ``u_r = (1-b1) g_r``,
    ``v_r = (1-b2) g_r^2``, ``x_r = x0 - lr g_r / (|g_r| + eps)``; average 1 averages x and u (not
    v); step 2 from there; average 2 averages x, u and v."""
    b1, b2, lr, eps = 0.9, 0.99, 0.1, 1e-8
    g = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -0.5])]
    x0 = torch.tensor([0.2, -0.1, 0.3])
    kw = {"lr": lr, "betas": (b1, b2), "eps": eps, "weight_decay": 0.0}

    def adam_x(x, u, v, t):
        return x - lr * (u / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)

    # step 1, then average 1: x and u
    u1 = [(1 - b1) * gr for gr in g]
    v1 = [(1 - b2) * gr**2 for gr in g]
    x1 = [adam_x(x0, u1[r], v1[r], 1) for r in range(2)]
    one = reference_desloc(
        [x0], _linear_loss(g), replicas=2, steps=1, sync_every=1, moment_periods=(1, 2), adamw=kw
    )
    for r in range(2):
        torch.testing.assert_close(one[r]["params"][0], (x1[0] + x1[1]) / 2)
        torch.testing.assert_close(one[r]["exp_avg"][0], (u1[0] + u1[1]) / 2)
        torch.testing.assert_close(one[r]["exp_avg_sq"][0], v1[r])  # not averaged at average 1
    # step 2 from the averages, then average 2: x, u and v
    x_bar, u_bar = (x1[0] + x1[1]) / 2, (u1[0] + u1[1]) / 2
    u2 = [b1 * u_bar + (1 - b1) * g[r] for r in range(2)]
    v2 = [b2 * v1[r] + (1 - b2) * g[r] ** 2 for r in range(2)]
    x2 = [adam_x(x_bar, u2[r], v2[r], 2) for r in range(2)]
    two = reference_desloc(
        [x0], _linear_loss(g), replicas=2, steps=2, sync_every=1, moment_periods=(1, 2), adamw=kw
    )
    for r in range(2):
        torch.testing.assert_close(two[r]["params"][0], (x2[0] + x2[1]) / 2)
        torch.testing.assert_close(two[r]["exp_avg"][0], (u2[0] + u2[1]) / 2)
        torch.testing.assert_close(two[r]["exp_avg_sq"][0], (v2[0] + v2[1]) / 2)


def _spread(states: list[dict[str, list[Tensor | None]]], key: str) -> float:
    """The largest difference of ``key`` between replica 0 and the others."""
    return max(float((a - b).abs().max()) for s in states[1:] for a, b in zip(states[0][key], s[key]))


@pytest.mark.parametrize(
    ("steps", "agree"),
    [
        (12, {"params": True, "exp_avg": True, "exp_avg_sq": True}),  # average 6: every state
        (6, {"params": True, "exp_avg": True, "exp_avg_sq": False}),  # average 3: exp_avg too
        (4, {"params": True, "exp_avg": False, "exp_avg_sq": False}),  # average 2: parameters only
        (5, {"params": False, "exp_avg": False, "exp_avg_sq": False}),  # mid round, no final sync
    ],
)
def test_each_state_is_averaged_on_its_own_period(steps, agree):
    """K_x = 2, moment_periods (3, 6) (K_u = 6, K_v = 12 steps), three non-IID replicas: right
    after an average exactly the states due at it agree between the replicas."""
    out = reference_desloc(
        [torch.zeros(5), torch.ones(2)],
        _quadratic_loss,
        replicas=3,
        steps=steps,
        sync_every=2,
        moment_periods=(3, 6),
        adamw={"lr": 0.05, "weight_decay": 0.1},
        final_sync=False,
    )
    for key, same in agree.items():
        assert (_spread(out, key) == 0.0) is same, key


def test_local_adam_and_desloc_differ_in_the_moments():
    """(1, 1) is Local Adam (every state at every average); the default (3, 6) averages the moments
    less often and ends elsewhere; with periods beyond the run the moments stay local."""
    kw = {"replicas": 2, "steps": 12, "sync_every": 2, "adamw": {"lr": 0.05}}
    init = [torch.zeros(5), torch.ones(2)]
    local_adam = reference_desloc(init, _quadratic_loss, moment_periods=(1, 1), **kw)
    desloc = reference_desloc(init, _quadratic_loss, moment_periods=(3, 6), **kw)
    params_only = reference_desloc(init, _quadratic_loss, moment_periods=(100, 100), **kw)
    assert _spread(local_adam, "exp_avg_sq") == 0.0 and _spread(desloc, "exp_avg_sq") == 0.0
    assert _spread(params_only, "exp_avg") > 1e-3  # never averaged
    for a, b in ((local_adam, desloc), (desloc, params_only)):
        assert float((a[0]["params"][0] - b[0]["params"][0]).abs().max()) > 1e-5


def test_a_nan_replica_sits_out_and_restarts():
    """Replica 1 turns NaN at step 4 (0-based): the average after step 6 is replica 0's own state;
    replica 1 takes it, its moments that were not due are NaN, so its AdamW restarts."""
    kw = {"replicas": 2, "sync_every": 3, "moment_periods": (2, 4), "adamw": {"lr": 0.05}}
    init = [torch.zeros(5), torch.ones(2)]
    out = reference_desloc(init, _quadratic_loss, steps=6, nan_at=(1, 4), **kw)
    assert _spread(out, "params") == 0.0
    # the average after step 6 was the 2nd: exp_avg (due) was replica 0's, exp_avg_sq not due
    assert out[1]["exp_avg"] == [None, None] and out[1]["exp_avg_sq"] == [None, None]
    assert all(bool(torch.isfinite(t).all()) for t in out[0]["exp_avg_sq"])


# ---------------------------------------------------------------------- the schedule of the moments
def test_moments_due_counts_parameter_averages():
    """moment_periods (3, 6): exp_avg at averages 3, 6, 9, 12, exp_avg_sq at 6 and 12, i.e. at
    steps multiple of K_u = 3 K_x and K_v = 6 K_x, with no offset."""
    due = {r: moments_due(r, (3, 6)) for r in range(1, 13)}
    assert [r for r, d in due.items() if "exp_avg" in d] == [3, 6, 9, 12]
    assert [r for r, d in due.items() if "exp_avg_sq" in d] == [6, 12]
    assert due[6] == ("exp_avg", "exp_avg_sq") and due[1] == ()
    assert all(moments_due(r, (1, 1)) == ("exp_avg", "exp_avg_sq") for r in range(1, 5))  # Local Adam
    s = DESLOCStrategy(sync_every=16)
    assert s.moment_periods == (3, 6) and s.moments_due(3) == ("exp_avg",)


# ---------------------------------------------------------------------- arguments
def test_defaults_and_kind():
    s = DESLOCStrategy()
    assert isinstance(s, LocalSGDStrategy) and s.strategy_name == "desloc"
    assert s.moment_periods == (3, 6) and s.schedule.should_sync(8) and not s.schedule.should_sync(4)
    assert DESLOCStrategy(moment_periods=[1, 2]).moment_periods == (1, 2)
    assert "moment_periods" in agreement_fields(s)  # ranks with other periods fail the handshake


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"moment_periods": (0, 6)}, "moment_periods\\[0\\]"),
        ({"moment_periods": (3, -1)}, "moment_periods\\[1\\]"),
        ({"moment_periods": (3.5, 6)}, "moment_periods\\[0\\]"),
        ({"moment_periods": (True, 6)}, "moment_periods\\[0\\]"),
        ({"moment_periods": 3}, "moment_periods"),
        ({"moment_periods": (3, 6, 9)}, "moment_periods"),
        ({"moment_periods": "36"}, "moment_periods"),
        ({"sync_every": 0}, "sync_every"),
        ({"participation": 0.5}, "participation"),
        ({"weighting": "samples"}, "weighting"),
        ({"adaptive_weights": True}, "adaptive_weights"),
        ({"merge": "ties"}, "merge"),
        ({"compressor": "int8"}, "compressor"),
        ({"average_optimizer_state": True}, "average_optimizer_state"),
        ({"server_lr": 0.5}, "server_lr"),
        ({"round_seconds": 1.0}, "round_seconds"),
        ({"fault_tolerance": "torchft"}, "fault_tolerance"),
        ({"no_such_argument": 1}, "no_such_argument"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DESLOCStrategy(**kwargs)


def test_range_is_in_the_message():
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        DESLOCStrategy(moment_periods=(3, 0))
    with pytest.raises(ValueError, match="pair"):
        DESLOCStrategy(moment_periods=None)


def test_local_sgd_arguments_at_their_off_value_are_accepted():
    s = DESLOCStrategy(weighting="uniform", participation=1.0, merge="mean", compressor=None)
    assert s.compressor is None and s.participation == 1.0


# ---------------------------------------------------------------------- the optimizer
def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam])
def test_adam_like_optimizers_are_accepted(cls):
    check_adam_optimizers([cls(_params(), lr=0.1)])


@pytest.mark.parametrize(
    "cls", [torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adamax, torch.optim.RMSprop]
)
def test_optimizers_without_both_moments_are_refused(cls):
    with pytest.raises(TypeError, match=f"got {cls.__name__}"):
        check_adam_optimizers([torch.optim.AdamW(_params()), cls(_params(), lr=0.1)])


def test_amsgrad_and_no_optimizer_are_refused():
    with pytest.raises(ValueError, match="amsgrad"):
        check_adam_optimizers([torch.optim.Adam(_params(), amsgrad=True)])
    with pytest.raises(TypeError, match="no optimizer"):
        check_adam_optimizers([])


def test_moment_slots_follow_the_optimizer_and_skip_frozen_parameters():
    a, b, frozen = (
        torch.nn.Parameter(torch.ones(3)),
        torch.nn.Parameter(torch.ones(2)),
        torch.nn.Parameter(torch.ones(4), requires_grad=False),
    )
    opt = torch.optim.AdamW([{"params": [a, frozen]}, {"params": [b]}], lr=0.1)
    assert [(p is a, t) for p, t in adam_moment_slots([opt], "exp_avg")][:1] == [(True, None)]
    a.grad = torch.ones(3)  # b gets no gradient: no state
    opt.step()
    slots = adam_moment_slots([opt, opt], "exp_avg_sq")  # each parameter once
    assert [p for p, _ in slots] == [a, b]
    assert slots[0][1] is opt.state[a]["exp_avg_sq"] and slots[1][1] is None


# ---------------------------------------------------------------------- registry and checkpoint state
def test_registered_name():
    from lightning.pytorch.strategies import StrategyRegistry

    DESLOCStrategy.register_strategies(
        StrategyRegistry
    )  # (also done by `import lightning_fedopt` once listed)
    assert {"desloc", "desloc_spawn", "desloc_fork"} <= set(StrategyRegistry)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="desloc", logger=False)
    assert type(trainer.strategy) is DESLOCStrategy and trainer.strategy.moment_periods == (3, 6)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="desloc_fork", logger=False)
    assert trainer.strategy._start_method == "fork"


def test_the_count_of_averages_is_checkpoint_state():
    s = DESLOCStrategy()
    state = s.algorithm_state_dict()
    assert state["desloc_rounds"] == 0 and "global" in state
    s.load_algorithm_state_dict({**state, "desloc_rounds": 5})
    assert s.param_rounds == 5 and s.algorithm_state_dict()["desloc_rounds"] == 5
    s.load_algorithm_state_dict({"global": []})  # a checkpoint of another Local SGD
    assert s.param_rounds == 0


def test_traffic_of_the_default_periods():
    """Per K_x steps, in model sizes: 1 (parameters) + 1/3 (exp_avg) + 1/6 (exp_avg_sq) = 1.5;
    DDP sends one model size of gradients per step, Local Adam 3 per K_x."""
    a, b = DESLOCStrategy().moment_periods
    per_round = 1 + 1 / a + 1 / b
    assert math.isclose(per_round, 1.5)
    assert math.isclose(256 / per_round, 170.67, rel_tol=1e-3)  # the paper's "170x less than DDP"
    assert math.isclose(3 / per_round, 2.0)  # "2x less than Local Adam" at the same K_x


def test_lightning_cli_builds_it_from_the_command_line():
    """``--trainer.strategy=...DESLOCStrategy --trainer.strategy.moment_periods=[2,4]`` (LightningCLI's
    parser): the arguments it offers are DES-LOC's, Local SGD's and the base's (at their defaults),
    and the strategy builds."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Strategy, "strategy")
    path = f"{DESLOCStrategy.__module__}.DESLOCStrategy"
    cfg = parser.parse_args(
        [f"--strategy={path}", "--strategy.sync_every=16", "--strategy.moment_periods=[2,4]"]
    )
    assert "ddp_comm_hook" not in vars(cfg.strategy.init_args)
    strategy = parser.instantiate(cfg).strategy
    assert type(strategy) is DESLOCStrategy and strategy.moment_periods == (2, 4)
    assert strategy.schedule.should_sync(16) and not strategy.schedule.should_sync(8)
