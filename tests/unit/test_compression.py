"""Compressors on their own (no processes): round-trip error bounds, error feedback, state, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_fedopt.compression import (
    BF16,
    COMPRESSORS,
    FP16,
    ErrorControl,
    Int4,
    Int8,
    OneBitAdam,
    RandomProjection,
    Sign,
    TopK,
    get_compressor,
)
from lightning_fedopt.compression.base import CompressionTotals
from lightning_fedopt.compression.kernels import reference


def _x(n: int = 1000, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale


# ---------------------------------------------------------------------- round-trip bounds
@pytest.mark.parametrize("cls,qmax", [(Int8, 127), (Int4, 7)])
@pytest.mark.parametrize("block", [8, 64, 256])
@pytest.mark.parametrize("n", [1, 37, 1000])
def test_blockwise_nearest_error_at_most_half_a_step(cls, qmax, block, n):
    x = _x(n, seed=n) * torch.linspace(0.01, 10, n)  # blocks of very different magnitudes
    c = cls(block=block)
    y = c.decompress(c.compress(x))
    padded = torch.zeros(-(-n // block) * block)
    padded[:n] = x
    step = (padded.view(-1, block).abs().amax(1) / qmax).repeat_interleave(block)[:n]
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(((y - x).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all())
    assert c.compress(x).nbytes == c.compressed_nbytes(n)


@pytest.mark.parametrize("cls", [Int8, Int4])
def test_blockwise_stochastic_is_unbiased_within_one_step(cls):
    x = _x(512, seed=1)
    c = cls(block=64, rounding="stochastic", seed=3)
    outs = torch.stack([c.decompress(c.compress(x)) for _ in range(400)])
    step = x.view(-1, 64).abs().amax(1).repeat_interleave(64) / (127 if cls is Int8 else 7)
    assert bool(((outs - x).abs() < step * (1 + 1e-5)).all())
    # the mean of 400 independent roundings: std <= step / (2 sqrt(400)) = step / 40
    assert bool(((outs.mean(0) - x).abs() <= step / 8).all())
    # deterministic rounding would be biased for this x: the two differ
    assert not torch.equal(outs[0], outs[1])


def test_exact_values_round_trip():
    x = torch.tensor([0.0, 127.0, -127.0, 1.0, 64.0, -3.0, 0.0, 5.0])
    assert torch.equal(Int8(block=8).decompress(Int8(block=8).compress(x)), x)
    z = torch.zeros(16)
    assert torch.equal(Int4(block=16).decompress(Int4(block=16).compress(z)), z)


@pytest.mark.parametrize("cls,rel", [(FP16, 2**-11), (BF16, 2**-8)])
def test_casts(cls, rel):
    x = _x(1000, scale=100)
    y = cls().decompress(cls().compress(x))
    assert bool(((y - x).abs() <= x.abs() * rel).all())
    big = FP16().decompress(FP16().compress(torch.tensor([1e6, -1e6])))
    assert torch.equal(big, torch.tensor([65504.0, -65504.0]))  # saturates, never Inf


def test_half_precision_input_keeps_dtype():
    x = _x(100).to(torch.bfloat16)
    y = Int8(block=32).decompress(Int8(block=32).compress(x))
    assert y.dtype == torch.bfloat16 and (y.float() - x.float()).abs().max() < 0.05


def test_sign_is_contractive_and_scaled():
    x = _x(1001)
    c = Sign(error_feedback=False)
    p = c.compress(x)
    y = c.decompress(p)
    assert p.nbytes == math.ceil(1001 / 8) + 4 == c.compressed_nbytes(1001)
    scale = x.norm() / math.sqrt(1001)
    assert torch.allclose(y.abs(), torch.full_like(y, float(scale)))
    assert torch.equal(y > 0, x >= 0)
    # with scale = ||x||_2 / sqrt(n): ||x - C(x)||^2 = 2 ||x||^2 - 2 ||x||_2 ||x||_1 / sqrt(n) < 2 ||x||^2
    expected = 2 * x.norm() ** 2 - 2 * x.norm() * x.abs().sum() / math.sqrt(1001)
    assert float((x - y).norm() ** 2) == pytest.approx(float(expected), rel=1e-4)
    assert torch.equal(c.decompress(c.compress(torch.zeros(9))), torch.zeros(9))


def test_topk_exact_without_feedback():
    x = _x(5000)
    c = TopK(density=0.01, error_feedback=False)
    p = c.compress(x)
    y = c.decompress(p)
    k = 50
    assert p.tensors[0].numel() == k and p.nbytes == 8 * k == c.compressed_nbytes(5000)
    assert set(p.tensors[1].tolist()) == set(torch.topk(x.abs(), k).indices.tolist())
    assert float((x - y).norm() ** 2) <= (1 - k / 5000) * float(x.norm() ** 2)


def _spy_topk_selection(monkeypatch):
    """Record every ``compact_above(x, threshold)`` call of TopK's sampled threshold as (threshold,
    entries passing) and the sizes of the tensors torch.topk runs on (the exact fallback runs on all n)."""
    from lightning_fedopt.compression import kernels

    thresholds: list[tuple[float, int]] = []
    topk_sizes: list[int] = []
    compact, topk = kernels.compact_above, torch.topk

    def spy_compact(x, threshold):
        idx, vals = compact(x, threshold)
        thresholds.append((float(threshold), idx.numel()))
        return idx, vals

    def spy_topk(t, *args, **kwargs):
        topk_sizes.append(t.numel())
        return topk(t, *args, **kwargs)

    monkeypatch.setattr(kernels, "compact_above", spy_compact)
    monkeypatch.setattr(torch, "topk", spy_topk)
    return thresholds, topk_sizes


def test_topk_sampled_threshold_gives_exactly_k_of_the_largest(monkeypatch):
    """Sampling path (n large): exactly k values, and they are the k largest (candidates >= k).
    The threshold really came from the sample: compact_above ran and no top-k ran over all n."""
    x = _x(200_000, seed=5)
    c = TopK(density=0.001, error_feedback=False, sample_fraction=0.01)
    thresholds, topk_sizes = _spy_topk_selection(monkeypatch)
    idx = c.compress(x).tensors[1]
    assert thresholds and thresholds[-1][1] >= 200, thresholds
    assert 200_000 not in topk_sizes and max(topk_sizes) < 200_000 // 10, topk_sizes
    assert idx.numel() == 200
    assert set(idx.tolist()) == set(torch.topk(x.abs(), 200).indices.tolist())


def test_topk_heavy_tail_lowers_the_sampled_threshold(monkeypatch):
    """Heavy tail: 200 outliers (1000-1099) over N(0, 1) noise, k = 200, every 100th entry sampled
    (k_s = 2). Each run of 100 outliers holds exactly one sampled entry, ordered up in one run and
    down in the other, so the sample's 2nd largest overshoots the true 200th for all but 2 of the
    100 sample offsets: fewer than k entries pass, and the threshold drops x0.8 until they do.
    The result is still exactly the k largest, without the fallback top-k over all n."""
    n, k = 200_000, 200
    x = _x(n, seed=7)
    ramp = torch.arange(100, dtype=torch.float32)
    x[:100] = 1000 + ramp
    x[100_000:100_100] = -(1099 - ramp)  # negative: magnitudes count
    expected = set(range(100)) | set(range(100_000, 100_100))
    looped = 0
    for key in ("a", "b", "c", "d"):  # different keys sample at different offsets
        thresholds, topk_sizes = _spy_topk_selection(monkeypatch)
        c = TopK(density=k / n, error_feedback=False, sample_fraction=0.01)
        p = c.compress(x, key)
        monkeypatch.undo()
        assert set(p.tensors[1].tolist()) == expected and p.tensors[0].numel() == k, key
        assert n not in topk_sizes, "the sampled threshold path, not the exact fallback"
        (t0, c0), *rest = thresholds
        assert 1000 <= t0 <= 1099, thresholds  # from the sample: one of the outliers
        if c0 < k:
            looped += 1
            assert rest, thresholds
            for (prev, _), (t, _) in zip(thresholds, rest):
                assert t == pytest.approx(0.8 * prev, rel=1e-12)
            assert [cnt >= k for _, cnt in thresholds] == [False] * len(rest) + [True]
    assert looped >= 3, "the outliers force the x0.8 adjustment for almost every offset"


def test_topk_dgc_momentum_correction_and_masking():
    """u <- m u + g; v <- v + u; sent entries of u and v are zeroed (reference written out here)."""
    m, k = 0.9, 3
    c = TopK(density=k / 20, momentum=m)
    u = torch.zeros(20)
    v = torch.zeros(20)
    for step in range(6):
        g = _x(20, seed=step)
        u = m * u + g
        v = v + u
        idx = torch.topk(v.abs(), k).indices.sort().values
        expected = torch.zeros(20)
        expected[idx] = v[idx]
        v[idx] = 0
        u[idx] = 0
        got = c.decompress(c.compress(g, "w"))
        assert torch.allclose(got, expected, atol=1e-6), step
    st = c.state_dict()["w"]
    assert torch.allclose(st["u"], u, atol=1e-6) and torch.allclose(st["v"], v, atol=1e-6)


def test_topk_warmup_schedule_and_clipping():
    c = TopK(density=0.01, warmup_densities=(0.5, 0.1), warmup_steps=2, clip_norm=1.0)
    sizes = [c.compress(_x(100, seed=i) * 50, "a").tensors[0].numel() for i in range(6)]
    assert sizes == [50, 50, 10, 10, 1, 1]
    # clipping: the first call's sent values have norm <= 1 (no accumulated error yet)
    c2 = TopK(density=1.0, clip_norm=1.0)
    assert float(c2.decompress(c2.compress(_x(100) * 50)).norm()) == pytest.approx(1.0, rel=1e-5)


def test_topk_clip_threshold_scales_with_the_world_size():
    """DGC (Lin et al. 2018, local gradient clipping): N nodes' independent gradients add up to
    about sqrt(N) times one node's norm, so each node clips at clip_norm * N^-1/2. The compressed
    all-reduce tells the compressor N (test_compressed_comm checks it on real ranks); alone N = 1."""
    x = _x(100) * 50
    alone = TopK(density=1.0, clip_norm=1.0)
    assert alone.world_size == 1 and alone.local_clip_norm == 1.0
    for n in (1, 4, 9):
        c = TopK(density=1.0, clip_norm=1.0)
        c.set_world_size(n)
        assert c.local_clip_norm == pytest.approx(n**-0.5)
        assert float(c.decompress(c.compress(x)).norm()) == pytest.approx(n**-0.5, rel=1e-5)
    # a gradient already inside the local threshold is not touched
    c = TopK(density=1.0, clip_norm=10.0)
    c.set_world_size(4)
    small = _x(100) * (4.0 / float(_x(100).norm()))  # norm 4 < 10 / 2
    assert torch.allclose(c.decompress(c.compress(small)), small)
    # EControl passes N on to its inner compressor; no clipping: nothing to scale
    e = ErrorControl(TopK(density=1.0, clip_norm=2.0))
    e.set_world_size(16)
    assert e.world_size == 16 and e.inner.local_clip_norm == pytest.approx(0.5)
    assert TopK().local_clip_norm is None


def test_onebit_adam_bias_correction_as_documented():
    """OneBitAdam's documented update (not DeepSpeed's, which corrects neither moment): Adam with
    bias correction during the warm-up, then m as it is over sqrt(v / (1 - beta2^W)) + eps with
    the variance frozen at step W. One process: nothing is communicated."""
    lr, (b1, b2), eps, w = 0.1, (0.9, 0.999), 1e-8, 3
    p = torch.nn.Parameter(torch.zeros(4))
    opt = OneBitAdam([p], lr=lr, betas=(b1, b2), eps=eps, warmup_steps=w)
    m, v, x, ds = torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4)
    for t in range(1, 7):
        g = _x(4, seed=t)
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        if t <= w:
            v = b2 * v + (1 - b2) * g * g
            x = x - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        else:
            x = x - lr * m / ((v / (1 - b2**w)).sqrt() + eps)
        ds = ds - lr * m / (v.sqrt() + eps)  # DeepSpeed's raw moments (same frozen v)
        assert torch.allclose(p.detach(), x, atol=1e-6), t
    assert opt.frozen and not torch.allclose(x, ds, atol=1e-3)


def test_compression_totals():
    t = CompressionTotals()
    assert t.ratio is None and t.calls == 0
    t.record(400, 54, excluded_nonfinite=1)
    t.record(100, 46)
    assert (t.raw_bytes, t.compressed_bytes, t.excluded_nonfinite, t.calls) == (500, 100, 0, 2)
    assert t.ratio == 5.0
    both = CompressionTotals.combined([t, CompressionTotals(100, 50, 1, 1)])
    assert (both.raw_bytes, both.compressed_bytes, both.excluded_nonfinite, both.calls) == (600, 150, 1, 3)
    # every compressor owns its totals; resetting the error state does not clear them
    c = Int8()
    assert c.totals.calls == 0 and c.totals is not Int8().totals
    c.totals.record(8, 4)
    c.reset_state()
    assert c.totals.calls == 1 and "totals" not in str(c.state_dict())


@pytest.mark.parametrize(
    "make",
    [
        lambda: Sign(),
        lambda: TopK(density=0.2),
        lambda: Int4(block=16, error_feedback=True),
        lambda: Int8(block=64, rounding="stochastic", error_feedback=True),
        lambda: FP16(error_feedback=True),
        lambda: ErrorControl(TopK(density=0.2), eta=0.2),
    ],
)
def test_error_feedback_running_sum_tracks_inputs(make):
    """With error feedback, sum_t C(x_t) - sum_t x_t stays bounded (= minus the current error), so
    relative to the growing sum of inputs it shrinks. (DGC's momentum variant tracks the momentum
    sum instead: test_topk_dgc_momentum_correction_and_masking.)"""
    c = make()
    total_in = torch.zeros(200)
    total_out = torch.zeros(200)
    gaps = []
    for t in range(60):
        x = _x(200, seed=t) + 0.3  # a persistent bias a lossy compressor without feedback would lose
        total_in += x
        out = c.decompress(c.compress(x, "p"))
        if isinstance(c, ErrorControl):
            out = c.aggregate("p", out)  # H: what the receivers apply
        total_out += out
        gaps.append(float((total_out - total_in).norm() / total_in.norm()))
    # bounded error / growing sum: the relative gap shrinks
    assert gaps[-1] < 0.15 and gaps[-1] < gaps[4] / 2


def test_error_control_eta_zero_is_ef21_and_does_not_track_the_sum():
    """EF21 (eta=0) compensates no past error: its running sum drifts from the inputs' where eta>0's does not."""
    gaps = {}
    for eta in (0.0, 0.2):
        c = ErrorControl(TopK(density=0.2), eta=eta)
        tin, tout = torch.zeros(200), torch.zeros(200)
        for t in range(60):
            x = _x(200, seed=t) + 0.3
            tin += x
            tout += c.aggregate("p", c.decompress(c.compress(x, "p")))
        gaps[eta] = float((tout - tin).norm() / tin.norm())
    assert gaps[0.2] < 0.15 < 0.3 < gaps[0.0]


def test_error_feedback_makes_the_difference_for_sign():
    xs = [_x(200, seed=t) * 0.1 + torch.linspace(-1, 1, 200) for t in range(50)]
    total = sum(xs)
    results = {}
    for ef in (True, False):
        c = Sign(error_feedback=ef)
        results[ef] = float((sum(c.decompress(c.compress(x)) for x in xs) - total).norm() / total.norm())
    assert results[True] < 0.05 < results[False]


def test_random_projection_is_unbiased_and_shared_by_key_and_call():
    x = _x(64)
    outs = []
    for seed in range(300):
        c = RandomProjection(ratio=0.25, seed=seed)
        p = c.compress(x)
        assert p.nbytes == 4 * 16 == c.compressed_nbytes(64)
        outs.append(c.decompress(p))
    mean = torch.stack(outs).mean(0)
    assert float((mean - x).norm() / x.norm()) < 0.25  # one draw is off by ~sqrt(n/k) = 2x
    # two replicas with the same seed draw the same directions at the same call: payloads add up
    a, b = RandomProjection(ratio=0.5, seed=1), RandomProjection(ratio=0.5, seed=1)
    pa, pb = a.compress(x, "w"), b.compress(2 * x, "w")
    assert torch.allclose(pa.tensors[0] * 2, pb.tensors[0], atol=1e-5)
    assert not torch.equal(a.compress(x, "w").tensors[0], pa.tensors[0])  # next call: new directions
    full = RandomProjection(ratio=1.0)
    assert float((full.decompress(full.compress(x)) - x).norm() / x.norm()) < 2.0


def test_error_control_reference():
    """EControl, written out: delta = C(eta e + g - h); e += g - h - delta; h += delta; H += delta."""
    eta = 0.5
    c = ErrorControl(TopK(density=0.1), eta=eta)
    inner = TopK(density=0.1, error_feedback=False)
    e, h = torch.zeros(50), torch.zeros(50)
    for t in range(5):
        g = _x(50, seed=t)
        delta = inner.decompress(inner.compress(eta * e + g - h))
        e = e + g - h - delta
        h = h + delta
        got = c.aggregate("k", c.decompress(c.compress(g, "k")))
        assert torch.allclose(got, h, atol=1e-6)
    assert torch.allclose(c.state_dict()["self"]["k"]["e"], e, atol=1e-6)


# ---------------------------------------------------------------------- state
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_state_dict_resumes_exactly(name):
    a = get_compressor(name)
    for t in range(3):
        a.compress(_x(300, seed=t), "k1")
        a.compress(_x(50, seed=t), "k2")
    b = get_compressor(name)
    b.load_state_dict(a.state_dict())
    pa, pb = a.compress(_x(300, seed=9), "k1"), b.compress(_x(300, seed=9), "k1")
    assert all(torch.equal(u, v) for u, v in zip(pa.tensors, pb.tensors))
    assert torch.equal(a.decompress(pa), b.decompress(pb))


def test_keys_are_independent():
    c = Sign()
    x = _x(100)
    first = c.decompress(c.compress(x, "a"))
    c.compress(_x(100, seed=1), "b")
    c.compress(_x(100, seed=2), "b")
    fresh = Sign()
    fresh.compress(x, "a")
    assert torch.equal(c.decompress(c.compress(x, "a")), fresh.decompress(fresh.compress(x, "a")))
    assert not torch.equal(first, torch.zeros(100))


# ---------------------------------------------------------------------- bad input
def test_get_compressor():
    assert get_compressor(None) is None
    c = Int8()
    assert get_compressor(c) is c
    assert isinstance(get_compressor("int4"), Int4) and isinstance(
        get_compressor("randomprojection"), RandomProjection
    )
    with pytest.raises(ValueError, match=r"`compressor`.*'int8'"):
        get_compressor("int7")
    with pytest.raises(ValueError, match="`compressor`"):
        get_compressor(8)


@pytest.mark.parametrize("block", [0, 3, 48, 4, 32768, 2.0, True, "64"])
def test_bad_block(block):
    with pytest.raises(ValueError, match=r"`block` must be a power of two in \[8, 16384\]"):
        Int8(block=block)


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    with pytest.raises(ValueError, match=r"`density` must be in \(0, 1\]"):
        TopK(density=density)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`rounding`"):
        Int8(rounding="up")
    with pytest.raises(ValueError, match="`momentum`"):
        TopK(momentum=1.0)
    with pytest.raises(ValueError, match="`ratio`"):
        RandomProjection(ratio=0)
    with pytest.raises(ValueError, match="`eta`"):
        ErrorControl("topk", eta=2)


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_bad_tensors(name):
    c = get_compressor(name)
    with pytest.raises(ValueError, match="floating point"):
        c.compress(torch.arange(10))
    with pytest.raises(ValueError, match="empty"):
        c.compress(torch.empty(0))
    x = _x(64)
    x[7] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        c.compress(x)
    x[7] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        c.compress(x)


def test_nan_does_not_touch_error_state():
    c = Sign()
    c.compress(_x(10), "k")
    before = c.state_dict()
    bad = _x(10)
    bad[0] = float("nan")
    with pytest.raises(ValueError):
        c.compress(bad, "k")
    assert torch.equal(c.state_dict()["k"]["error"], before["k"]["error"])


# ---------------------------------------------------------------------- reference kernels (property)
@given(
    n=st.integers(1, 300),
    block_log=st.integers(3, 7),
    bits=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
)
def test_reference_quantize_roundtrip_property(n, block_log, bits, seed):
    block = 1 << block_log
    x = _x(n, seed=seed) * (1 + seed % 7)
    err = torch.zeros(n)
    codes, scales = reference.quantize_blockwise(x, bits, block, err)
    y = reference.dequantize_accumulate(codes[None], scales[None], n, bits, block)
    assert torch.allclose(x - y, err, atol=1e-6)
    qmax = (1 << (bits - 1)) - 1
    assert bool((err.abs() <= scales.repeat_interleave(block)[:n] / 2 * (1 + 1e-5)).all())
    assert scales.numel() == -(-n // block) and codes.numel() == (n if bits == 8 else -(-n // 2))
    assert int(qmax) >= 7


@pytest.mark.parametrize(
    "make",
    [
        lambda: Int8(block=16, error_feedback=True),
        lambda: Int4(block=8, rounding="stochastic"),
        lambda: FP16(error_feedback=True),
        lambda: Sign(),
    ],
    ids=["int8_ef", "int4_stochastic", "fp16_ef", "sign"],
)
def test_compress_packed_keeps_state_per_tensor(make):
    """The chunked collective compresses a packed buffer chunk by chunk: one chunk equals
    compressing the concatenation under one key (same codes, same seeds), while the state stays
    per tensor key (full-size buffers), is only written where a slice covers it, and round-trips
    through state_dict (the next call after a reload equals the uninterrupted one)."""
    sizes = [20, 7, 37]
    keys = ["w", "b", "v"]
    a, b = make(), make()
    for t in range(3):
        x = torch.cat([_x(n, seed=10 * t + i) * (i + 1) for i, n in enumerate(sizes)])
        (packed,) = a.compress_packed(x, keys, sizes, tag="t")
        single = b.compress(x, "w#t0")  # the temporary key the packed call compresses under
        for u, v in zip(packed.tensors, single.tensors):
            assert torch.equal(u, v)
        whole = b.state_dict().get("w#t0", {})
        if "error" in whole:
            for k, e in zip(keys, torch.split(whole["error"], sizes)):
                assert torch.equal(a.state_dict()[k]["error"], e)
        if "calls" in whole:
            assert all(a.state_dict()[k]["calls"] == whole["calls"] for k in keys)
    st = a.state_dict()
    if getattr(a, "error_feedback", False):
        assert sorted(st) == sorted(keys) and [st[k]["error"].numel() for k in keys] == sizes
    # a slice (a server's chunk) touches only the keys it covers, at the positions it covers
    c = make()
    c.compress_packed(torch.ones(10), keys, sizes, offset=22, tag="s")  # "b"[2:7] and "v"[0:5]
    if getattr(c, "error_feedback", False):
        assert sorted(c.state_dict()) == ["b", "v"]
        assert bool((c.state_dict()["v"]["error"][5:] == 0).all())
        assert bool((c.state_dict()["b"]["error"][:2] == 0).all())
    # round trip: reload the state, the next call (in two chunks) matches
    d = make()
    d.load_state_dict(st)
    x = torch.cat([_x(n, seed=99 + i) for i, n in enumerate(sizes)])
    for p, q in zip(
        a.compress_packed(x, keys, sizes, parts=2, tag="t"),
        d.compress_packed(x, keys, sizes, parts=2, tag="t"),
    ):
        for u, v in zip(p.tensors, q.tensors):
            assert torch.equal(u, v)


def test_wire_round_trip():
    """The one wire format: a header (flag byte or int32 count) then the payloads' bytes, read back
    with the layouts of payloads the receiver built itself."""
    from lightning_fedopt.compression import wire
    from lightning_fedopt.compression.base import Payload

    pays = [
        Int4(block=8).compress(_x(13)),
        TopK(density=0.3, error_feedback=False).compress(_x(10, seed=1)),
        Payload((torch.arange(3, dtype=torch.float64),), 3, torch.Size([3]), torch.float64),
    ]
    for dtype, header in ((torch.uint8, 1), (torch.int32, 70000)):
        buf = wire.encode(pays, header, header_dtype=dtype)
        assert buf.dtype == torch.uint8
        assert buf.numel() == wire.header_nbytes(dtype) + sum(p.nbytes for p in pays)
        got_header, got = wire.decode(buf, pays, header_dtype=dtype)
        assert got_header == header
        for p, q in zip(pays, got):
            assert all(torch.equal(a, b) for a, b in zip(p.tensors, q.tensors))
            assert (q.numel, q.shape, q.dtype) == (p.numel, p.shape, p.dtype)
