"""Strategies with ``compressor=``: LocalSGD's compressed model deltas and CompressedDDPStrategy,
on real processes (fork, gloo) against single-process references."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from compressed_reference import simulate_all_reduce_compressed
from lightning.pytorch.callbacks import ModelCheckpoint
from modules import KnownBatchModule, make_batch, make_net
from runners import TIMEOUT, SaveFinal, assert_close_state, fit_fork, load_ranks, trainer_kwargs
from torch import nn

import lightning_fedopt as lf
from lightning_fedopt.compression import Int8, Sign


def local_sgd(**kw):
    return lf.LocalSGDStrategy(start_method="fork", timeout=TIMEOUT, **kw)


def reference_local_sgd_compressed(
    n: int, steps: int, every: int, make_compressor, lr: float = 0.1, weights: list[float] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Local SGD whose averages are x + N * compressed-mean(w_i (theta_i - x)) / sum_i w_i (``weights``:
    fixed per-replica weights, 0 = not taking part; default all 1); an exact final average."""
    w = weights or [1.0] * n
    nets = [make_net(0) for _ in range(n)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in nets]
    params = [list(m.parameters()) for m in nets]
    names = [f"net.{k}" for k, _ in nets[0].named_parameters()]
    comps = [make_compressor() for _ in range(n)]
    x = [p.detach().clone() for p in params[0]]
    for step in range(steps):
        for r in range(n):
            xb, yb = make_batch(r, step)
            opts[r].zero_grad()
            nn.functional.mse_loss(nets[r](xb), yb).backward()
            opts[r].step()
        if (step + 1) % every == 0:
            with torch.no_grad():
                deltas = [[(p - g) * w[r] for p, g in zip(params[r], x)] for r in range(n)]
                mean = simulate_all_reduce_compressed(deltas, comps, names)
                x = [(m * n + g * sum(w)) / sum(w) for g, m in zip(x, mean)]
                for r in range(n):
                    for p, v in zip(params[r], x):
                        p.copy_(v)
    if steps % every:
        with torch.no_grad():
            avg = [sum(params[r][i] for r in range(n)) / n for i in range(len(x))]
            for r in range(n):
                for p, v in zip(params[r], avg):
                    p.copy_(v)
    return [{f"net.{k}": v.detach().clone() for k, v in m.state_dict().items()} for m in nets]


@pytest.mark.parametrize("n", [2, 3])
def test_local_sgd_int8_deltas_match_reference(tmp_path, n):
    """Two rounds of compressed deltas (H=4) and an exact final average at step 10, every rank
    equal to the reference; the synchronisations moved int8 bytes, not fp32 ones."""
    ranks = fit_fork(
        tmp_path, KnownBatchModule(), local_sgd(sync_every=4, compressor=Int8(block=16)), n=n, max_steps=10
    )
    ref = reference_local_sgd_compressed(n, 10, 4, lambda: Int8(block=16))
    for r in range(n):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-6)
    # the quantization was real: exact Local SGD ends elsewhere
    from references import reference_local_sgd

    exact = reference_local_sgd(n, 10, lf.Periodic(4))
    assert not torch.allclose(exact[0]["net.0.weight"], ref[0]["net.0.weight"], atol=1e-6)
    by_op = ranks[0]["comm"]["by_op"]
    assert by_op["all_to_all"]["rounds"] == 2 and by_op["all_gather"]["rounds"] >= 2


def test_local_sgd_compressed_with_a_replica_that_never_takes_part(tmp_path):
    """participation=[1, 0]: rank 1 sends a zero delta (weight 0) through the compressed all-reduce,
    the result is rank 0's delta alone, and rank 1 continues from it every round."""
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        local_sgd(sync_every=4, participation=[1.0, 0.0], compressor=Int8(block=16)),
        max_steps=10,
    )
    ref = reference_local_sgd_compressed(2, 10, 4, lambda: Int8(block=16), weights=[1.0, 0.0])
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-6)
    uniform = reference_local_sgd_compressed(2, 10, 4, lambda: Int8(block=16))
    assert not torch.allclose(uniform[0]["net.0.weight"], ref[0]["net.0.weight"], atol=1e-4)


def test_local_sgd_sign_resume_is_exact(tmp_path):
    """Error-feedback buffers are per-replica state: 6 steps, checkpoint, resume to 14 equals 14
    uninterrupted steps bit for bit (and differs when the buffers are dropped)."""

    def strategy():
        return local_sgd(sync_every=4, final_sync=False, compressor=Sign())

    full = fit_fork(tmp_path / "full", KnownBatchModule(), strategy(), max_steps=14)
    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1, filename="mid")
    fit_fork(
        tmp_path / "first",
        KnownBatchModule(),
        strategy(),
        max_steps=6,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    shard = torch.load(ckpt_dir / "mid.ckpt.replicas" / "rank1.pt", weights_only=False)
    assert "net.0.weight/w" in shard["replica"]["compressor"]
    trainer = L.Trainer(
        strategy=strategy(), callbacks=[SaveFinal(tmp_path / "resumed")], **trainer_kwargs(max_steps=14)
    )
    trainer.fit(KnownBatchModule(), ckpt_path=str(ckpt_dir / "mid.ckpt"))
    resumed = load_ranks(tmp_path / "resumed", 2)
    for r in range(2):
        assert_close_state(resumed[r]["state_dict"], full[r]["state_dict"], atol=0.0)


class SaveMonitor(L.Callback):
    """Writes the CommunicationMonitor's history and the strategy's ratio of every rank to a file."""

    def __init__(self, out, monitor):
        self.out, self.monitor = out, monitor

    def on_fit_end(self, trainer, pl_module):
        ratio = trainer.strategy.compression_ratio
        torch.save(
            {"history": self.monitor.history, "ratio": ratio}, self.out / f"mon{trainer.global_rank}.pt"
        )


def test_compression_ratio_reaches_the_monitor(tmp_path):
    monitor = lf.callbacks.CommunicationMonitor()
    fit_fork(
        tmp_path,
        KnownBatchModule(),
        local_sgd(sync_every=4, compressor="int4"),
        max_steps=8,
        callbacks=[monitor, SaveMonitor(tmp_path, monitor)],
    )
    saved = torch.load(tmp_path / "mon0.pt", weights_only=False)
    # int4 with 256-value blocks on 2 ranks: the 4 tensors (97 fp32 values) are packed into one
    # buffer of 2 chunks of 49 values, each 25 bytes of codes + one fp32 scale
    ratios = [row["comm/compression_ratio"] for row in saved["history"]]
    assert len(ratios) >= 2 and ratios[-1] == pytest.approx(saved["ratio"])
    sizes = [16 * 4, 16, 16, 1]
    compressed = 2 * (-(-49 // 2) + 4)
    assert saved["ratio"] == pytest.approx(4 * sum(sizes) / compressed)
    assert lf.LocalSGDStrategy(compressor="int4").compression_ratio is None  # nothing compressed yet
    with pytest.raises(ValueError, match="`compressor`"):
        lf.LocalSGDStrategy(compressor="int3")


# ====================================================================== CompressedDDPStrategy
def compressed_ddp(**kw):
    return lf.CompressedDDPStrategy(start_method="fork", timeout=TIMEOUT, **kw)


def _grads(net: nn.Module, rank: int, step: int, nan: bool = False) -> list[torch.Tensor]:
    net.zero_grad()
    x, y = make_batch(rank, step)
    loss = nn.functional.mse_loss(net(x), y)
    if nan:
        loss = loss * float("nan")
    loss.backward()
    return [p.grad.detach().clone() for p in net.parameters()]


def reference_fp16_ddp(n: int, steps: int, lr: float = 0.1, nan_at: tuple[int, int] | None = None):
    """DDP whose gradient mean is fp16(mean_r fp16(g_r)) elementwise (the chunked collective with
    FP16: worker cast, fp32 mean at the owner, server cast) over the ranks with finite gradients."""
    net = make_net(0)
    for step in range(steps):
        per_rank = [_grads(net, r, step, nan=nan_at == (r, step)) for r in range(n)]
        ok = [r for r in range(n) if all(torch.isfinite(g).all() for g in per_rank[r])]
        with torch.no_grad():
            for i, p in enumerate(net.parameters()):
                mean = sum(per_rank[r][i].half().float() for r in ok) / len(ok)
                p -= lr * mean.half().float()
    return {f"net.{k}": v for k, v in net.state_dict().items()}


def test_compressed_ddp_fp16_matches_reference_and_skips_nan_replica(tmp_path):
    """FP16 is elementwise, so the reference does not depend on DDP's bucket layout. Rank 1's loss
    is NaN at step 3: its gradients are left out, both ranks apply rank 0's, stay equal and finite."""
    module = KnownBatchModule(nan_at=(1, 3))
    ranks = fit_fork(tmp_path, module, compressed_ddp(compressor="fp16"), max_steps=6)
    ref = reference_fp16_ddp(2, 6, nan_at=(1, 3))
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r] if isinstance(ref, list) else ref, atol=1e-6)
    assert torch.equal(ranks[0]["state_dict"]["net.0.weight"], ranks[1]["state_dict"]["net.0.weight"])
    sync = ranks[0]["comm"]["by_purpose"]["sync"]
    n_params = 16 * 4 + 16 + 16 + 1
    # fp16: 2 bytes per value, ~2 (N-1)/N = 1 compressed size per step on 2 ranks (+ padding, headers)
    assert 6 * 2 * n_params <= sync["bytes_sent"] <= 6 * (2 * n_params + 2 * 2 + 5)


def test_compressed_ddp_int8_close_to_ddp(tmp_path):
    ranks = fit_fork(tmp_path, KnownBatchModule(), compressed_ddp(compressor=Int8(block=8)), max_steps=8)
    exact = fit_fork(
        tmp_path / "ddp", KnownBatchModule(), lf.MeteredDDPStrategy(start_method="fork"), max_steps=8
    )
    assert torch.equal(ranks[0]["state_dict"]["net.0.weight"], ranks[1]["state_dict"]["net.0.weight"])
    for k in exact[0]["state_dict"]:
        diff = (ranks[0]["state_dict"][k] - exact[0]["state_dict"][k]).abs().max()
        assert 0 < diff < 2e-3, (k, diff)
    ratio = (
        exact[0]["comm"]["by_purpose"]["sync"]["bytes_sent"]
        / ranks[0]["comm"]["by_purpose"]["sync"]["bytes_sent"]
    )
    assert (
        ratio > 2.0
    )  # int8 + a scale per 8 values: 1.5 bytes per value instead of 4 (+ padding of the tiny biases)


def reference_onebit(
    n: int, steps: int, warmup: int, lr: float = 0.01, betas=(0.9, 0.999), eps=1e-8, compress: bool = True
):
    """1-bit Adam written out: Adam on the mean gradient for `warmup` steps; then local momenta,
    averaged through per-rank Sign compressors (worker + server error), with the variance frozen.
    ``compress=False``: the momenta are averaged exactly instead."""
    net = make_net(0)
    params = list(net.parameters())
    b1, b2 = betas
    m = [[torch.zeros_like(p) for p in params] for _ in range(n)]
    v = [torch.zeros_like(p) for p in params]
    comps = [Sign() for _ in range(n)]
    names = [f"g0.p{i}" for i in range(len(params))]
    for step in range(steps):
        t = step + 1
        per_rank = [_grads(net, r, step) for r in range(n)]
        with torch.no_grad():
            if t <= warmup:
                g = [sum(per_rank[r][i] for r in range(n)) / n for i in range(len(params))]
                for r in range(n):
                    m[r] = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m[r], g)]
                v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
                upd = [(mi / (1 - b1**t)) / ((vi / (1 - b2**t)).sqrt() + eps) for mi, vi in zip(m[0], v)]
            else:
                for r in range(n):
                    m[r] = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m[r], per_rank[r])]
                if compress:
                    mean = simulate_all_reduce_compressed(m, comps, names)
                else:
                    mean = [sum(m[r][i] for r in range(n)) / n for i in range(len(params))]
                m = [[x.clone() for x in mean] for _ in range(n)]
                upd = [mi / ((vi / (1 - b2**warmup)).sqrt() + eps) for mi, vi in zip(mean, v)]
            for p, u in zip(params, upd):
                p -= lr * u
    return {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}


class OneBitModule(KnownBatchModule):
    def __init__(self, warmup: int = 3, **kw):
        super().__init__(**kw)
        self.warmup = warmup

    def configure_optimizers(self):
        return lf.compression.OneBitAdam(self.parameters(), lr=0.01, warmup_steps=self.warmup)


class SaveRatio(L.Callback):
    """Writes the strategy's compression totals and ratio (and the communicator's deprecated view)."""

    def __init__(self, out):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        s = trainer.strategy
        torch.save(
            {
                "totals": vars(s.compression_totals).copy(),
                "ratio": s.compression_ratio,
                "comm_ratio": s.comm.compression_ratio,
            },
            self.out / f"ratio{trainer.global_rank}.pt",
        )


def test_onebit_adam_matches_reference(tmp_path):
    """3 warm-up steps of full-precision Adam, then 5 steps of 1-bit compressed momentum."""
    ranks = fit_fork(
        tmp_path,
        OneBitModule(warmup=3),
        compressed_ddp(preset="onebit"),
        max_steps=8,
        callbacks=[SaveRatio(tmp_path)],
    )
    ref = reference_onebit(2, 8, 3)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref, atol=1e-5)
    # without the compression (exact momentum mean) the result would differ, by far more than the tolerance
    exact = reference_onebit(2, 8, 3, compress=False)
    diff = max((ranks[0]["state_dict"][k] - exact[k]).abs().max().item() for k in exact)
    assert diff > 1e-3, diff
    by_op = ranks[0]["comm"]["by_op"]
    assert by_op["all_to_all"]["rounds"] == 5 and by_op["all_reduce"]["rounds"] >= 3
    # the momenta's bytes are the optimizer's compressor's, and the strategy's ratio includes them:
    # 5 steps of 97 fp32 values packed into 2 chunks of 49, each ceil(49 / 8) bytes of signs + a scale
    for r in range(2):
        saved = torch.load(tmp_path / f"ratio{r}.pt", weights_only=False)
        totals = saved["totals"]
        assert (totals["calls"], totals["raw_bytes"], totals["compressed_bytes"]) == (
            5,
            5 * 97 * 4,
            5 * 2 * 11,
        )
        assert saved["ratio"] == pytest.approx(97 * 4 / 22) and saved["comm_ratio"] == saved["ratio"]


def test_onebit_preset_needs_onebit_adam(tmp_path):
    with pytest.raises(Exception, match="OneBitAdam"):  # raised in the ranks (ProcessRaisedException)
        fit_fork(tmp_path, KnownBatchModule(), compressed_ddp(preset="onebit"), max_steps=2)


def test_compressed_ddp_resume_is_exact(tmp_path):
    """Sign with error feedback: each rank's buffers are in its shard; 6 steps + resume to 10 == 10 steps."""

    def strategy():
        return compressed_ddp(compressor="sign")

    full = fit_fork(tmp_path / "full", KnownBatchModule(), strategy(), max_steps=10)
    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1, filename="mid")
    fit_fork(
        tmp_path / "first",
        KnownBatchModule(),
        strategy(),
        max_steps=6,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    assert (ckpt_dir / "mid.ckpt.replicas" / "rank1.pt").exists()
    trainer = L.Trainer(
        strategy=strategy(), callbacks=[SaveFinal(tmp_path / "resumed")], **trainer_kwargs(max_steps=10)
    )
    trainer.fit(KnownBatchModule(), ckpt_path=str(ckpt_dir / "mid.ckpt"))
    resumed = load_ranks(tmp_path / "resumed", 2)
    for r in range(2):
        assert_close_state(resumed[r]["state_dict"], full[r]["state_dict"], atol=0.0)


class SaveEvents(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        torch.save(trainer.strategy.nonfinite_events, self.out / f"events{trainer.global_rank}.pt")


def test_topk_sends_biases_dense_and_survives_a_nan_replica(tmp_path):
    """Top-k: weights sparse (all-gather of values + indices), biases dense (DGC); rank 1's NaN
    gradients at step 3 are left out of both, every rank stays finite and identical."""
    from lightning_fedopt.compression import TopK

    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(nan_at=(1, 3)),
        compressed_ddp(compressor=TopK(density=0.25)),
        max_steps=6,
        callbacks=[SaveEvents(tmp_path)],
    )
    for r in range(2):
        assert all(torch.isfinite(v).all() for v in ranks[r]["state_dict"].values())
        assert torch.equal(ranks[r]["state_dict"]["net.0.weight"], ranks[0]["state_dict"]["net.0.weight"])
        assert torch.load(tmp_path / f"events{r}.pt") == [{"step": 3, "excluded": 1}]
    by_op = ranks[0]["comm"]["by_op"]
    # per step: one all-gather of the two weight matrices' top-25% (k = 16 + 4 values + int32
    # indices, + 1 validity byte), one all-reduce of the 17 bias values + the validity count; after
    # the step that left rank 1 out, one 1-byte all-gather checks that every replica's weights are
    # finite (they are: nothing is broadcast)
    assert by_op["all_gather"]["bytes_sent"] == 6 * (1 + 8 * (16 + 4)) + 1
    assert ranks[0]["comm"]["by_purpose"]["control"]["bytes_sent"] == 1
    sync = ranks[0]["comm"]["by_purpose"]["sync"]["bytes_sent"]
    assert sync == 6 * (1 + 8 * (16 + 4)) + 6 * 4 * (16 + 1 + 1)
