"""``DESLOCStrategy`` on 2 real gloo ranks (fork) against the single-process reference of
tests/unit/test_desloc.py: parameters and both Adam moments of every rank, the bytes counted, a
replica that turns NaN, SGD refused at set-up, and a resume from a checkpoint taken mid-round."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from modules import KnownBatchModule, make_batch, make_net
from reference_outer import run_and_resume
from runners import TIMEOUT, fit_fork
from torch import Tensor, nn
from unit.test_desloc import reference_desloc

from lightning_fedopt.strategies.local_sgd.desloc import DESLOCStrategy

#: the module's AdamW (weight decay on: AdamW's decoupled decay is part of the local step)
ADAMW = {"lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.1}
NAMES = [name for name, _ in make_net().named_parameters()]
#: the net the reference evaluates with each replica's parameters (functional call)
_NET = make_net()


class AdamWModule(KnownBatchModule):
    """The test net on known per-rank batches with AdamW; at the end of ``fit`` it writes its
    optimizer's moments, by parameter name, to ``<out>/moments<rank>.pt``."""

    def __init__(self, out: Path, nan_at: tuple[int, int] | None = None) -> None:
        super().__init__(nan_at=nan_at)
        self.out = out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), **ADAMW)

    def on_fit_end(self) -> None:
        opt = self.trainer.strategy.optimizers[0]
        moments = {
            key: {
                n: opt.state[p][key].clone() if p in opt.state else None
                for n, p in self.net.named_parameters()
            }
            for key in ("exp_avg", "exp_avg_sq")
        }
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(moments, self.out / f"moments{self.global_rank}.pt")


def _moments(out: Path, rank: int) -> dict[str, dict[str, Tensor | None]]:
    return torch.load(out / f"moments{rank}.pt", weights_only=False)


def _loss(r: int, step: int, params: list[Tensor]) -> Tensor:
    x, y = make_batch(r, step)
    pred = torch.func.functional_call(_NET, dict(zip(NAMES, params)), (x,))
    return nn.functional.mse_loss(pred, y)


def _reference(steps: int, sync_every: int, periods: tuple[int, int], **kw: Any) -> list[dict[str, Any]]:
    init = [p.detach().clone() for p in make_net().parameters()]
    return reference_desloc(
        init,
        _loss,
        replicas=2,
        steps=steps,
        sync_every=sync_every,
        moment_periods=periods,
        adamw=ADAMW,
        **kw,
    )


def _assert_rank_equals(ranks, out: Path, ref, atol: float = 1e-6) -> None:
    for r in range(2):
        params = ranks[r]["state_dict"]
        moments = _moments(out, r)
        for i, name in enumerate(NAMES):
            torch.testing.assert_close(params[f"net.{name}"], ref[r]["params"][i], rtol=0, atol=atol)
            for key in ("exp_avg", "exp_avg_sq"):
                got, want = moments[key][name], ref[r][key][i]
                assert (got is None) == (want is None), (r, key, name)
                if want is not None:
                    torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=f"rank {r} {key} {name}")


def desloc(**kw: Any) -> DESLOCStrategy:
    return DESLOCStrategy(start_method="fork", timeout=TIMEOUT, **kw)


def test_two_ranks_match_the_reference_and_count_their_bytes(tmp_path):
    """K_x = 2, moment_periods (2, 3), 13 steps: averages at steps 2..12 (exp_avg at 4, 8, 12,
    exp_avg_sq at 6, 12: every combination occurs) and the final synchronisation of the
    parameters at 13. Every rank's parameters and both moments equal the reference's; the moments
    really were averaged (a parameters-only run ends elsewhere); the bytes under "sync" are the
    six rounds' messages: parameters, the moments due and their counters."""
    ranks = fit_fork(
        tmp_path, AdamWModule(tmp_path), desloc(sync_every=2, moment_periods=(2, 3)), max_steps=13
    )
    ref = _reference(13, 2, (2, 3))
    _assert_rank_equals(ranks, tmp_path, ref)
    assert ranks[0]["sync_count"] == 7  # six averages and the final synchronisation
    params_only = _reference(13, 2, (100, 100))
    assert (params_only[0]["params"][0] - ref[0]["params"][0]).abs().max() > 1e-6
    assert (params_only[0]["exp_avg"][0] - ref[0]["exp_avg"][0]).abs().max() > 1e-6

    n_params = sum(p.numel() for p in make_net().parameters())
    n_tensors = len(NAMES)
    due = [(r % 2 == 0) + (r % 3 == 0) for r in range(1, 7)]  # moment kinds due at averages 1..6
    # ring all-reduce of 2 ranks: each rank sends the payload once; float32 counters
    expected = sum(4 * (n_params * (1 + k) + 3 + n_tensors * k) for k in due)
    for r in range(2):
        assert ranks[r]["comm"]["by_purpose"]["sync"]["bytes_sent"] == expected


def test_a_nan_replica_never_reaches_the_other(tmp_path):
    """Rank 1's loss turns NaN at step 5 (0-based): at the average after step 6 (the 3rd: exp_avg_sq
    due, exp_avg not) rank 1 contributes nothing and takes rank 0's parameters; its exp_avg is still
    NaN, so its AdamW restarts. Both ranks equal the reference, stay finite, and report the event."""
    module = AdamWModule(tmp_path, nan_at=(1, 5))
    ranks = fit_fork(tmp_path, module, desloc(sync_every=2, moment_periods=(2, 3)), max_steps=10)
    ref = _reference(10, 2, (2, 3), nan_at=(1, 5))
    _assert_rank_equals(ranks, tmp_path, ref)
    for r in range(2):
        assert all(torch.isfinite(v).all() for v in ranks[r]["state_dict"].values())
        assert [(e["step"], e["excluded"]) for e in ranks[r]["nonfinite_events"]] == [(6, 1)]
    assert ranks[1]["nonfinite_events"][0]["local"] == 1 and ranks[0]["nonfinite_events"][0]["local"] == 0
    clean = _reference(10, 2, (2, 3))
    assert (clean[0]["params"][0] - ref[0]["params"][0]).abs().max() > 1e-6


class SGDModule(KnownBatchModule):
    """The test net with plain SGD: no Adam moments to average."""


def test_an_optimizer_without_adam_moments_is_refused_at_set_up(tmp_path):
    """Both ranks raise the TypeError naming the optimizer when Lightning builds it, before any step."""
    with pytest.raises(Exception, match="got SGD"):
        fit_fork(tmp_path, SGDModule(), desloc(sync_every=2), max_steps=4)


def test_resume_mid_round_is_exact(tmp_path):
    """A checkpoint after step 7 (after the 3rd average, whose exp_avg_sq was due; mid-round 4),
    resumed to step 13: parameters and both moments of every rank equal the uninterrupted run's
    exactly (the moments are each replica's optimizer state in its shard, the count of averages
    is in the checkpoint)."""
    runs = itertools.count()

    def module() -> AdamWModule:
        return AdamWModule(tmp_path / f"moments{next(runs)}")

    def strategy() -> DESLOCStrategy:
        return DESLOCStrategy(sync_every=2, moment_periods=(2, 3), final_sync=False, start_method="fork")

    full, resumed, _ = run_and_resume(tmp_path, module, strategy, total=13, at=7)
    for r in range(2):
        for name in NAMES:
            key = f"net.{name}"
            assert torch.equal(resumed[r]["state_dict"][key], full[r]["state_dict"][key]), (r, name)
        a, b = _moments(tmp_path / "moments0", r), _moments(tmp_path / "moments2", r)
        for kind in ("exp_avg", "exp_avg_sq"):
            for name in NAMES:
                assert torch.equal(a[kind][name], b[kind][name]), (r, kind, name)
    # the replicas really differ at the end (no final average): each one's own state came back
    assert not torch.equal(full[0]["state_dict"]["net.0.weight"], full[1]["state_dict"]["net.0.weight"])
