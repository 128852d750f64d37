"""The planner (lightning_fedopt.plan): units, formulas against hand-computed values, the exact
wire bytes against the library's compressors and its Communicator's counters, choose_sync_every,
monotonicity, the CLI (table, JSON, argument errors) and the benchmark's validated cases.

One process: the Communicator's counted bytes come from torch's in-process fake process group.
"""

from __future__ import annotations

import csv
import json
import math
import re
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_fedopt import compression
from lightning_fedopt.plan import (
    INT4,
    INT8,
    STRATEGIES,
    Codec,
    Link,
    Spec,
    bytes_per_round,
    choose_sync_every,
    compute_seconds,
    exposed_seconds,
    exposed_share,
    fit_overhead,
    gossip_degree,
    hops,
    message_bytes,
    model_size,
    parse_codec,
    parse_count,
    parse_rate,
    parse_seconds,
    plan,
    predict,
    round_seconds,
    smallest_every,
    wire_bytes,
)
from lightning_fedopt.plan.cli import main, run

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
P = 1_000_000


# ====================================================================== units
@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("100mbit", 1e8),
        ("1gbit", 1e9),
        ("10Gbit/s", 1e10),
        ("2.5Gbit", 2.5e9),
        ("800kbit", 8e5),
        ("1e9", 1e9),
        (5e7, 5e7),
    ],
)
def test_parse_rate(text: str | float, bits: float) -> None:
    assert parse_rate(text) == pytest.approx(bits)


@pytest.mark.parametrize("text", ["", "fast", "100mbps", "0mbit", "-1gbit", "10/s", "1 gigabit", 0.0, -5.0])
def test_parse_rate_rejects_naming_the_argument(text: str | float) -> None:
    with pytest.raises(ValueError, match="`link`"):
        parse_rate(text, "link")


def test_parse_seconds_and_count() -> None:
    assert parse_seconds("25ms") == pytest.approx(0.025)
    assert parse_seconds("200us") == pytest.approx(2e-4)
    assert parse_seconds("0.5s") == parse_seconds("0.5") == parse_seconds(0.5) == 0.5
    assert parse_seconds("0") == 0.0  # a latency may be 0
    for bad in ("0", "0ms", 0):
        with pytest.raises(ValueError, match=r"`step_seconds` must be .*> 0"):
            parse_seconds(bad, "step_seconds", positive=True)
    bad_latencies: list[Any] = ["-1ms", "5 parsecs", "ms", float("nan")]
    for bad in bad_latencies:
        with pytest.raises(ValueError, match="`latency`"):
            parse_seconds(bad)
    assert parse_count("1e9") == 1e9 and parse_count("1.2B") == pytest.approx(1.2e9)
    assert parse_count("350M") == 3.5e8 and parse_count("1.5k") == 1500 and parse_count(124672) == 124672
    for bad in ("0", "abc", "1.2X", True, -1):
        with pytest.raises(ValueError, match="`params`"):
            parse_count(bad)


def test_link_and_compute_seconds() -> None:
    link = Link.parse("100mbit", "1ms", 0.8)
    assert (link.rate, link.latency, link.efficiency) == (1e8, 1e-3, 0.8)
    assert link.seconds(4e6, hops=2) == pytest.approx(0.4 + 0.002)
    with pytest.raises(ValueError, match=r"`efficiency` must be a finite number in \(0.0, 1.0\]"):
        Link(1e9, 0.0, 1.5)
    with pytest.raises(ValueError, match="`latency`"):
        Link(1e9, -1.0)
    assert compute_seconds(1e9, 65536, 1e14) == pytest.approx(6 * 1e9 * 65536 / 1e14)
    with pytest.raises(ValueError, match="`flops`"):
        compute_seconds(1e9, 65536, 0)


# ====================================================================== formulas
def test_spec_is_validated() -> None:
    with pytest.raises(ValueError, match="`kind` must be one of"):
        Spec("broadcast")
    with pytest.raises(ValueError, match="`every` must be an integer >= 1"):
        Spec("all_reduce", 0)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_bytes_and_hops_of_each_collective(n: int) -> None:
    ring = Spec("all_reduce", 16)
    assert bytes_per_round(ring, P, n) == pytest.approx(2 * (n - 1) / n * 4 * P)
    assert hops(ring, n) == 2 * (n - 1)
    gather = Spec("all_reduce", 16, 0.08, gather=True)  # top-k 1%: 8 bytes a kept value
    assert bytes_per_round(gather, P, n) == pytest.approx((n - 1) * 0.08 * P)
    assert hops(gather, n) == n - 1
    gossip = Spec("p2p", 4, peers=2, exchanges=3)
    assert bytes_per_round(gossip, P, n) == pytest.approx(2 * 3 * 4 * P)
    assert hops(gossip, n) == 3
    assert hops(Spec("all_reduce", extra_hops=2 * (n - 1)), n) == 4 * (n - 1)
    assert bytes_per_round(ring, P, 1) == 0.0 and round_seconds(ring, 1e6, 1, 1e9) == 0.0


def test_round_seconds_and_exposure_by_kind() -> None:
    # 4 MB at 100 Mbit/s = 0.32 s; 2 ranks: 2 hops of 1 ms; streaming: every fragment pays them
    assert round_seconds(Spec("all_reduce"), 4e6, 2, 1e8, 1e-3) == pytest.approx(0.322)
    assert round_seconds(Spec("streaming", 64, fragments=4, delay=1), 4e6, 2, 1e8, 1e-3) == pytest.approx(
        0.328
    )
    assert round_seconds(Spec("all_reduce"), 4e6, 2, 1e8, efficiency=0.5) == pytest.approx(0.64)
    assert exposed_seconds(Spec("all_reduce", 64), 0.32, 0.01) == 0.32
    assert exposed_seconds(Spec("ddp"), 0.32, 0.1, ddp_overlap=0.5) == pytest.approx(0.27)
    assert exposed_seconds(Spec("overlapped", 16), 0.32, 0.01) == pytest.approx(0.16)
    assert exposed_seconds(Spec("overlapped", 64), 0.32, 0.01) == 0.0
    # 4 fragments of 0.08 s, each behind 2 steps of 30 ms: 0.02 s exposed each
    assert exposed_seconds(Spec("streaming", 64, fragments=4, delay=2), 0.32, 0.03) == pytest.approx(0.08)
    p = predict("d", Spec("all_reduce", 64), P, 2, 1e8, 0.08)
    assert p.exposed_per_step == pytest.approx(0.32 / 64)
    assert p.comm_share == pytest.approx(0.005 / 0.085)


# ====================================================================== codecs: the library's sizes
SIZES = [1, 7, 255, 256, 257, 4095, 4096, 4097, 10_000, 123_457]


def _library_pairs() -> list[tuple[str, Any]]:
    c = compression
    pairs: list[tuple[str, Any]] = [
        ("fp16", c.FP16()),
        ("bf16", c.BF16()),
        ("int8", c.Int8()),
        ("int8:64", c.Int8(block=64)),
        ("int4", c.Int4()),
        ("int4:1024", c.Int4(block=1024)),
        ("sign", c.Sign()),
        ("topk", c.TopK()),
        ("topk:0.01", c.TopK(density=0.01)),
    ]
    sparse = getattr(c, "SparseLoCo", None)
    if sparse is not None:
        pairs += [("sparseloco", sparse()), ("sparseloco:64/2048", sparse(topk=64, chunk=2048))]
        pairs += [("sparseloco:3/10", sparse(topk=3, chunk=10))]
    return pairs


@pytest.mark.parametrize(("spec", "comp"), _library_pairs(), ids=lambda x: x if isinstance(x, str) else "")
def test_codec_sizes_are_the_library_compressors(spec: str, comp: object) -> None:
    codec = parse_codec(spec)
    for n in SIZES:
        assert codec.nbytes(n) == comp.compressed_nbytes(n), (spec, n)  # type: ignore[attr-defined]
    big = 1 << 22
    assert codec.bytes_per_value() == pytest.approx(codec.nbytes(big) / big, rel=1e-3)
    assert codec.scheme == {"topk": "gather", "sparseloco": "gather"}.get(codec.name, "chunked")
    assert getattr(comp, "collective", "chunked") == codec.scheme


def test_asymptotic_sizes_and_labels() -> None:
    assert parse_codec("int8").bytes_per_value() == INT8
    assert parse_codec("int4").bytes_per_value() == INT4
    assert parse_codec("none").bytes_per_value() == 4.0 and parse_codec(None).name == "none"
    assert parse_codec("fp32").name == "none"
    assert parse_codec("sign").bytes_per_value() == 1 / 8
    assert parse_codec("topk:0.01").bytes_per_value() == pytest.approx(0.08)
    assert parse_codec("sparseloco").bytes_per_value() == pytest.approx(128 * 2.25 / 4096)
    assert [parse_codec(s).label for s in ("int8", "int4:64", "topk:0.01", "sparseloco")] == [
        "int8",
        "int4/b64",
        "topk 1%",
        "sparseloco 128/4096",
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("zip", "`compressor` must be one of"),
        ("int8:100", "`block` of int8 must be a power of two"),
        ("topk:2", r"`density` must be a finite number in \(0.0, 1.0\]"),
        ("topk:x", "`density` of topk"),
        ("sparseloco:5000", "`topk` must be an integer in"),
        ("sparseloco:a/b", "sparseloco:<topk>"),
        ("sign:3", "takes no option"),
    ],
)
def test_parse_codec_rejects(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_codec(text)


def test_wire_bytes_by_hand() -> None:
    assert wire_bytes(Codec("none"), [P], 4) == pytest.approx(1.5 * 4 * P)
    # int8, 4 ranks: chunks of 250000 values = 250000 codes + 977 scales; an all-to-all row and an
    # all-gathered chunk to each of 3 others, with a flag byte and an int32 header
    assert wire_bytes(parse_codec("int8"), [P], 4) == 3 * (2 * (250_000 + 4 * 977) + 1 + 4)
    # top-k 1%, all-gathered: 10000 values + int32 indices, and a flag byte, to 3 others
    assert wire_bytes(parse_codec("topk:0.01"), [P], 4) == 3 * (1 + 8 * 10_000)
    # a tiny tensor does not shrink: it travels dense
    assert wire_bytes(parse_codec("topk:0.25"), [1, P], 2) == 1 + 4 + 8 * 250_000
    assert wire_bytes(parse_codec("topk:0.5"), [P], 2) == 1 + 4 * P  # 8 bytes x half: not smaller
    assert wire_bytes(parse_codec("int8"), [1], 2) == 2 * 4 + 1 + 4  # a chunk of 1 value: dense
    assert message_bytes(Codec("none"), [10, 20]) == 120
    assert message_bytes(parse_codec("int8"), [10, 20]) == 1 + (10 + 4) + (20 + 4)
    assert wire_bytes(parse_codec("int8"), [P], 1) == 0.0


def _fake_group_counts(cases: list[tuple[str, list[int], int]]) -> list[int]:
    """Bytes a rank's Communicator counts for one compressed all-reduce of each case, on torch's
    in-process fake process group (transfers are no-ops; the counters are the real ones)."""
    dist = pytest.importorskip("torch.distributed")
    fake = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from lightning_fedopt.comm import Communicator
    from lightning_fedopt.compression.collective import all_reduce_compressed

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    out = []
    pairs = dict(_library_pairs())
    try:
        for spec, sizes, n in cases:
            dist.init_process_group("fake", store=fake.FakeStore(), rank=0, world_size=n)
            try:
                comm = Communicator()
                tensors = [torch.randn(s) for s in sizes]
                comp = type(pairs[spec])(**_ctor_args(spec))  # fresh state for every case
                try:
                    all_reduce_compressed(comm, tensors, comp, names=[f"t{i}" for i in range(len(sizes))])
                except (RuntimeError, IndexError):
                    pass  # decoding the fake group's uninitialised buffers; the bytes are counted
                out.append(int(comm.stats.bytes_sent))
            finally:
                dist.destroy_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return out


def _ctor_args(spec: str) -> dict[str, Any]:
    args: dict[str, dict[str, Any]] = {
        "int8:64": {"block": 64},
        "topk:0.01": {"density": 0.01},
        "sparseloco:64/2048": {"topk": 64, "chunk": 2048},
    }
    return args.get(spec, {})


def test_wire_bytes_are_what_the_communicator_counts() -> None:
    specs = ["bf16", "int8", "int8:64", "int4", "sign", "topk:0.01"]
    if "sparseloco" in dict(_library_pairs()):
        specs += ["sparseloco", "sparseloco:64/2048"]
    cases = [(s, sizes, n) for s in specs for sizes in ([100_003], [1000, 37, 5000]) for n in (2, 3, 8)]
    counted = _fake_group_counts(cases)
    for (spec, sizes, n), got in zip(cases, counted):
        assert wire_bytes(parse_codec(spec), sizes, n) == got, (spec, sizes, n)


def test_gossip_degree_matches_the_topologies() -> None:
    from lightning_fedopt.topology import make_topology

    for name in (
        "ring",
        "torus",
        "exponential",
        "one_peer_exponential",
        "random_matching",
        "fully_connected",
    ):
        for n in range(1, 11):
            topo = make_topology(name, n)
            most = max(len(topo.out_neighbors(i, t)) for i in range(n) for t in range(6))
            assert gossip_degree(name, n) == most, (name, n)
    with pytest.raises(ValueError, match="`topology` must be one of"):
        gossip_degree("star", 4)


# ====================================================================== choosing H
def _brute(step: float, rnd: float, budget: float, low: int, high: int, overlapped: bool = False) -> int:
    for h in range(low, high + 1):
        if exposed_share(step, rnd, h, overlapped=overlapped) <= budget:
            return h
    return high


def test_choose_sync_every_closed_forms() -> None:
    # blocking: share R / (H c + R) <= b  <=>  H >= R (1 - b) / (b c)
    assert choose_sync_every(0.1, 0.32, budget=0.05) == math.ceil(0.32 * 0.95 / (0.05 * 0.1)) == 61
    # overlapped (CO2): share 1 - H c / R <= b  <=>  H >= R (1 - b) / c
    assert choose_sync_every(0.1, 0.32, budget=0.05, overlapped=True) == math.ceil(0.32 * 0.95 / 0.1) == 4
    assert exposed_share(0.1, 0.32, 61) <= 0.05 < exposed_share(0.1, 0.32, 60)
    for step in (0.013, 0.08, 0.5, 2.0):
        for rnd in (0.0, 0.001, 0.33, 7.0, 60.0):
            for budget in (0.01, 0.05, 0.2):
                for overlapped in (False, True):
                    want = _brute(step, rnd, budget, 2, 3000, overlapped)
                    got = choose_sync_every(step, rnd, budget=budget, low=2, high=3000, overlapped=overlapped)
                    assert got == want, (step, rnd, budget, overlapped)


def test_choose_sync_every_inputs() -> None:
    link = Link.parse("1gbit", "1ms")
    by_bytes = choose_sync_every(0.08, nbytes=4e6, link=link, hops=2)
    assert by_bytes == choose_sync_every(0.08, link.seconds(4e6, 2)) == 9
    # a round that shrinks with H (e.g. a compressor chosen per H), and the bounds
    assert choose_sync_every(0.1, lambda h: 0.32 if h < 10 else 0.1, high=100) == choose_sync_every(0.1, 0.1)
    assert choose_sync_every(0.1, 0.0, low=5) == 5
    assert choose_sync_every(0.1, 100.0, high=500) == 500
    for kwargs, match in [
        ({"step_seconds": 0.0, "round_seconds": 1.0}, "`step_seconds` must be a finite number > 0"),
        ({"step_seconds": 0.1, "round_seconds": -1.0}, "`round_seconds` must be a finite number >= 0"),
        (
            {"step_seconds": 0.1, "round_seconds": 1.0, "budget": 1.0},
            r"`budget` must be a finite number in \(0.0, 1.0\)",
        ),
        ({"step_seconds": 0.1, "round_seconds": 1.0, "low": 0}, "`low` must be an integer >= 1"),
        ({"step_seconds": 0.1, "round_seconds": 1.0, "low": 8, "high": 4}, "`high` must be an integer >= 8"),
        ({"step_seconds": 0.1}, "`round_seconds` must be given"),
        (
            {"step_seconds": 0.1, "nbytes": 1e6, "link": "1gbit"},
            "`link` must be a lightning_fedopt.plan.Link",
        ),
        ({"step_seconds": 0.1, "round_seconds": lambda h: -1.0}, r"`round_seconds\(1000\)`"),
    ]:
        assert isinstance(kwargs, dict)
        with pytest.raises(ValueError, match=match):
            choose_sync_every(**kwargs)


def test_smallest_every_by_kind() -> None:
    assert smallest_every(Spec("ddp"), 0.001, 0.1, 0.05) == 1
    assert smallest_every(Spec("ddp"), 0.32, 0.1, 0.05) is None
    assert smallest_every(Spec("all_reduce"), 0.32, 0.1, 0.05) == 61
    assert smallest_every(Spec("all_reduce"), 0.32, 0.1, 0.05, high=60) is None
    # streaming: 4 fragments of 0.08 s behind 1 step of 50 ms each: 0.12 s exposed a round
    s = Spec("streaming", fragments=4, delay=1)
    assert smallest_every(s, 0.32, 0.05, 0.05, low=8) == math.ceil(0.12 * 0.95 / (0.05 * 0.05))
    assert smallest_every(s, 0.32, 0.1, 0.05, low=8) == 8  # all hidden


# ====================================================================== the planner
def test_plan_rows_by_hand() -> None:
    p = plan(P, 2, "100mbit", 0.1, budget=0.05, every=64, compressors=["none"])
    assert [r.strategy for r in p.rows] == list(STRATEGIES)
    ddp = p.row("ddp")
    assert ddp.bytes_per_round == 4 * P and ddp.round_seconds == pytest.approx(0.32)
    assert ddp.every is None and not ddp.within_budget and ddp.exposed_share == pytest.approx(0.32 / 0.42)
    d = p.row("diloco")  # the model and 3 fp32 counters, all-reduced
    assert d.bytes_per_round == 4 * P + 12
    assert d.every == math.ceil(8 * (4 * P + 12) / 1e8 * 0.95 / (0.05 * 0.1)) == 61
    assert d.bytes_per_step == pytest.approx((4 * P + 12) / 61)
    assert d.bytes_vs_ddp == pytest.approx(4 * P / d.bytes_per_step)
    assert d.share_at == pytest.approx(d.round_seconds / (64 * 0.1 + d.round_seconds))
    assert p.row("co2").every == 4
    assert p.row("noloco").bytes_per_round == 4 * P + 4
    assert p.row("gossip").bytes_per_round == 4 * P  # ring of 2: one neighbour
    st = p.row("streaming_diloco")  # 4 fragments hidden behind a 100 ms step each: H = F (tau + 1)
    assert st.bytes_per_round == 4 * P + 4 * 12 and st.every == 8 and st.exposed_share == 0.0
    for r in p.rows:
        if r.every is not None and r.strategy != "ddp":
            assert r.exposed_share <= 0.05


def test_plan_compressed_rows() -> None:
    p = plan(P, 4, "1gbit", 0.05, latency="1ms", strategies=["diloco", "streaming_diloco", "co2"])
    d8 = p.row("diloco", "int8")
    assert d8.bytes_per_round == wire_bytes(parse_codec("int8"), [P], 4) + 1.5 * 12
    # a compressed round all-reduces its counters first: 2 (N-1) more hops
    assert d8.round_seconds == pytest.approx(8 * d8.bytes_per_round / 1e9 + 12 * 1e-3)
    assert p.row("diloco", "topk 1%").round_seconds == pytest.approx(
        8 * p.row("diloco", "topk 1%").bytes_per_round / 1e9 + (3 + 6) * 1e-3
    )
    # compressed streaming DiLoCo is synchronous: F fragments, each with its own latency
    s8 = p.row("streaming_diloco", "int8")
    assert s8.bytes_per_round == 4 * wire_bytes(parse_codec("int8"), [P // 4], 4) + 4 * 1.5 * 12
    assert s8.round_seconds == pytest.approx(8 * s8.bytes_per_round / 1e9 + 4 * 12 * 1e-3)
    assert {(s, c.split()[0]) for s, c, _ in p.skipped} == {
        ("co2", c) for c in ("bf16", "int8", "int4", "sign", "topk", "sparseloco")
    }
    assert len(p.rows) == 2 * 7 + 1


def test_plan_counts_a_module_like_the_strategies() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(10, 5)
    model = nn.Sequential(lin, nn.BatchNorm1d(5), nn.Linear(5, 10))
    model[2].weight = nn.Parameter(lin.weight.T.contiguous())  # not tied: its own tensor
    model[0].bias.requires_grad_(False)  # frozen parameters are tracked too
    m = model_size(model)
    # 55 + 60 parameters, BatchNorm's weight, bias, running mean and var (its int64 counter is not)
    assert m.numel == 55 + 10 + 10 + 60 and m.nbytes == 4 * m.numel
    assert len(m.sizes) == 8
    half = model_size(nn.Linear(8, 8).to(torch.bfloat16))
    assert half.numel == 72 and half.dense_bytes == 2.0
    tied = nn.Sequential(nn.Embedding(20, 4), nn.Linear(4, 20, bias=False))
    tied[1].weight = tied[0].weight
    assert model_size(tied).numel == 80  # a tied weight travels once
    assert plan(model, 2, "1gbit", 0.01, compressors=["none"]).row("ddp").bytes_per_round == 4 * m.numel
    assert model_size([3, 4]).sizes == (3, 4)
    for bad in (None, [], [0], "many", True, object()):
        with pytest.raises(ValueError, match=r"`(model|params|model\[0\])`"):
            model_size(bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"replicas": 1}, r"`replicas` must be an integer in \[2, 1000000\]"),
        ({"link": "fast"}, "`link` must be a rate > 0"),
        ({"latency": "-3ms"}, "`latency` must be a duration >= 0"),
        ({"step_seconds": 0}, "`step_seconds` must be a finite number > 0"),
        ({"step_seconds": None}, "`step_seconds` must be given"),
        ({"flops": 1e14}, "not both"),
        ({"budget": 0.0}, r"`budget` must be a finite number in \(0.0, 1.0\)"),
        ({"strategies": ["diloco", "fedavg"]}, "`strategies` must be one of"),
        ({"compressors": ["int3"]}, "`compressor` must be one of"),
        ({"compressors": []}, "must each name at least one"),
        ({"fragments": 0}, "`fragments` must be an integer >= 1"),
        ({"topology": "star"}, "`topology` must be one of"),
        ({"ddp_overlap": 2.0}, r"`ddp_overlap` must be a finite number in \[0.0, 1.0\]"),
        ({"every": 0}, "`every` must be an integer >= 1"),
        ({"efficiency": 0.0}, r"`efficiency` must be a finite number in \(0.0, 1.0\]"),
        ({"overhead": "-1ms"}, "`overhead` must be a duration >= 0"),
        ({"measured_round": 0}, "`measured_round` must be"),
        ({"overhead": "1ms", "measured_round": 0.5}, "not both"),
    ],
)
def test_plan_validates_its_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"model": P, "replicas": 4, "link": "1gbit", "step_seconds": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan(**args)


def test_overhead_is_a_fixed_cost_per_round_and_per_fragment() -> None:
    """``overhead`` adds its seconds to every round (to every fragment of a streaming round), and
    ``measured_round`` fits it to one measured uncompressed DiLoCo round."""
    base = plan(P, 2, "100mbit", 0.1, compressors=["none"], strategies=["ddp", "diloco", "streaming_diloco"])
    more = plan(
        P,
        2,
        "100mbit",
        0.1,
        overhead="15ms",
        compressors=["none"],
        strategies=["ddp", "diloco", "streaming_diloco"],
    )
    for name, times in (("ddp", 1), ("diloco", 1), ("streaming_diloco", 4)):
        assert more.row(name).round_seconds == pytest.approx(base.row(name).round_seconds + times * 0.015)
    d = more.row("diloco")
    assert d.every == math.ceil((8 * (4 * P + 12) / 1e8 + 0.015) * 0.95 / (0.05 * 0.1))
    assert "overhead 15 ms/round" in more.table() and "overhead" not in base.table()
    assert more.to_dict()["inputs"]["overhead_s"] == 0.015
    # a round measured at 15 ms more than its bytes take: the same plan
    fitted = plan(
        P,
        2,
        "100mbit",
        0.1,
        measured_round=base.row("diloco").round_seconds + 0.015,
        compressors=["none"],
        strategies=["ddp", "diloco", "streaming_diloco"],
    )
    assert fitted.link.overhead == pytest.approx(0.015)
    assert [r.every for r in fitted.rows] == [r.every for r in more.rows]
    # never below 0: a round faster than its bytes says the link is faster than given
    assert fit_overhead(0.01, Spec("all_reduce"), 4 * P, 2, 1e8) == 0.0
    assert fit_overhead(0.4, Spec("streaming", fragments=4), 4 * P, 2, 1e8) == pytest.approx((0.4 - 0.32) / 4)
    with pytest.raises(ValueError, match="`overhead` must be a finite number >= 0"):
        Link(1e9, overhead=-0.001)
    assert Link.parse("1gbit", overhead="15ms").seconds(0.0) == pytest.approx(0.015)


def test_project_check_with_a_fitted_overhead(capsys: pytest.CaptureFixture[str]) -> None:
    """``benchmarks.project --check ... --overhead-from``: the overhead fitted per number of
    replicas to the fixed-H DiLoCo rounds of the 1000 Mbit/s runs; those runs are marked and left
    out of the median."""
    from benchmarks import project

    fast = [RESULTS / "plan_netns_1000mbit_summary.csv", RESULTS / "plan_netns4_1000mbit_summary.csv"]
    overhead, used = project.fit_overheads(fast)
    assert set(overhead) == {2, 4} and {(n, row) for _, n, _, row in used} == {
        (2, "diloco_h16"),
        (4, "diloco_h16"),
    }
    assert all(0.0 < o < 0.05 and e == 1.0 for o, e in overhead.values())
    rows = project.check(RESULTS / "plan_netns_1000mbit_summary.csv", overhead=overhead, fitted=used)
    by = {r["strategy"]: r for r in rows}
    assert by["diloco_h16"]["fit"] and not by["ddp"]["fit"]
    assert by["diloco_h16"]["error_pct"] == pytest.approx(0.0, abs=1e-6)  # fitted to itself
    assert "(1 used for the overhead's fit left out)" in capsys.readouterr().out
    assert by["diloco_auto"]["predicted_step_ms"] > by["diloco_auto"]["compute_ms"]
    # two rates: overhead and efficiency fitted together, the fitted rounds reproduced
    both, _ = project.fit_overheads([*fast, RESULTS / "plan_netns_10mbit_summary.csv"], fit_efficiency=True)
    assert 0.5 < both[2][1] < 1.0 and both[4] == overhead[4]  # one rate at 4 replicas: nothing to fit
    rows = project.check(RESULTS / "plan_netns_10mbit_summary.csv", overhead=both)
    assert {r["strategy"]: r for r in rows}["diloco_h16"]["error_pct"] == pytest.approx(0.0, abs=1e-6)


def test_project_check_reads_the_measured_rate_and_any_diloco_h(tmp_path: Path) -> None:
    """``--measured-rates`` takes each run's link rate from the TCP throughput its ``_run.txt``
    printed; a ``diloco_h<N>`` row of any ``N`` is a blocking round every ``N`` steps."""
    from benchmarks import project

    src = RESULTS / "plan_netns_100mbit_summary.csv"
    assert project.measured_rate(src) == pytest.approx(95.8e6)
    copy = tmp_path / "x_summary.csv"
    copy.write_text(src.read_text())
    assert project.measured_rate(copy) is None  # no _run.txt beside it: the nominal rate
    (tmp_path / "x_run.txt").write_text("measured TCP throughput host1 -> host0: 50.0 Mbit/s\n")
    slow = {r["strategy"]: r for r in project.check(copy, measured=True)}
    nominal = {r["strategy"]: r for r in project.check(copy)}
    assert slow["ddp"]["rate_bit_s"] == 50e6 and nominal["ddp"]["rate_bit_s"] == 100e6
    assert slow["ddp"]["predicted_step_ms"] > nominal["ddp"]["predicted_step_ms"]
    assert project.spec_of("diloco_h128") == Spec("all_reduce", 128) and project.spec_of("diloco_hx") is None


def test_plan_from_flops() -> None:
    p = plan(1e9, 8, "1gbit", flops=1e14, tokens_per_step=65536, strategies=["diloco"], compressors=["int4"])
    assert p.compute == pytest.approx(3.93216) and "FLOP/s" in p.compute_source


def _every(p: object, strategy: str, compressor: str) -> int:
    r = p.row(strategy, compressor)  # type: ignore[attr-defined]
    return r.every if r.every is not None else 10**9


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "ddp"])
def test_monotone(strategy: str) -> None:
    """More bandwidth, less latency, more compute per step, a larger budget or a smaller model:
    never a larger H."""
    kw: dict[str, Any] = {
        "strategies": [strategy],
        "compressors": ["none", "int8", "topk:0.01"],
        "latency": "5ms",
    }
    for c in ("none", "int8", "topk 1%"):
        if strategy in ("co2", "noloco") and c != "none":
            continue
        hs = [
            _every(plan(P, 8, rate, 0.02, **kw), strategy, c)
            for rate in ("10mbit", "100mbit", "1gbit", "10gbit")
        ]
        assert hs == sorted(hs, reverse=True) and hs[0] > hs[-1], (c, hs)
        lat = [
            _every(plan(P, 8, "1gbit", 0.02, **{**kw, "latency": x}), strategy, c)
            for x in ("50ms", "5ms", "0")
        ]
        assert lat == sorted(lat, reverse=True), (c, lat)
        comp = [_every(plan(P, 8, "100mbit", t, **kw), strategy, c) for t in (0.005, 0.05, 0.5)]
        assert comp == sorted(comp, reverse=True), (c, comp)
        bud = [_every(plan(P, 8, "100mbit", 0.02, budget=b, **kw), strategy, c) for b in (0.01, 0.05, 0.2)]
        assert bud == sorted(bud, reverse=True), (c, bud)
        size = [_every(plan(n, 8, "100mbit", 0.02, **kw), strategy, c) for n in (1e7, 1e6, 1e5)]
        assert size == sorted(size, reverse=True), (c, size)


# ====================================================================== the CLI
ARGS = ["--params", "1e9", "--replicas", "8", "--link", "1gbit", "--latency", "20ms", "--step-time", "0.5"]


def _table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    out = {}
    for line in lines[head + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        out[(cells[0], cells[1])] = cells
    return out


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--every", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1B parameters (4 GB dense), 8 replicas, link 1 Gbit/s x 1, latency 20 ms/hop")
    assert "H@5%" in out and "exposed@H=64" in out
    rows = _table_rows(out)
    p = run(ARGS)
    assert len(rows) == len(p.rows) == 5 * 7 + 2
    for r in p.rows:
        cells = rows[(r.strategy, r.compressor)]
        assert cells[4] == (str(r.every) if r.strategy != "ddp" else "1 (over)")
        assert cells[5] == f"{100 * r.exposed_share:.1f}%"
    # by hand: DiLoCo sends 2 x 7/8 x 4 GB (+ counters) in 56 s + 14 hops of 20 ms; H >= 0.95 R / (0.05 x 0.5)
    d = rows[("diloco", "none")]
    assert d[2:5] == ["7 GB", "56.3 s", str(math.ceil((8 * (7e9 + 21) / 1e9 + 14 * 0.02) * 0.95 / 0.025))]
    assert "co2: not with bf16" in out


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--json", "--strategies", "diloco,co2", "--compressors", "none,int4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"]["params"] == 10**9 and data["inputs"]["latency_s"] == pytest.approx(0.02)
    assert [(r["strategy"], r["compressor"]) for r in data["rows"]] == [
        ("diloco", "none"),
        ("diloco", "int4"),
        ("co2", "none"),
    ]
    assert data["rows"][0]["every"] == 2139 and data["rows"][1]["every"] == 296
    assert data["skipped"][0]["strategy"] == "co2"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--replicas", "1"], r"`replicas` must be an integer in \[2, 1000000\]"),
        (["--budget", "1.5"], r"`budget` must be a finite number in \(0.0, 1.0\)"),
        (["--link", "fast"], "`link` must be a rate"),
        (["--latency", "soon"], "`latency` must be a duration"),
        (["--step-time", "0"], "`step_seconds` must be a duration > 0"),
        (["--compressors", "none,zip"], "`compressor` must be one of"),
        (["--strategies", "fedavg"], "`strategies` must be one of"),
        (["--sync-delay", "-1"], "`sync_delay` must be an integer >= 0"),
    ],
)
def test_cli_errors_name_the_argument(
    extra: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main([*ARGS, *extra])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_needs_a_compute_time(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--params", "1e9", "--replicas", "8", "--link", "1gbit"])
    assert "`step_seconds` must be given" in capsys.readouterr().err
    assert (
        main(
            [
                "--params",
                "1e9",
                "--replicas",
                "8",
                "--link",
                "1gbit",
                "--flops",
                "1e14",
                "--tokens-per-step",
                "65536",
            ]
        )
        == 0
    )


def test_python_dash_m(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(
        sys, "argv", ["lightning_fedopt.plan", *ARGS, "--strategies", "diloco", "--compressors", "int8"]
    )
    with pytest.raises(SystemExit) as e:
        runpy.run_module("lightning_fedopt.plan", run_name="__main__")
    assert e.value.code == 0
    assert "diloco" in capsys.readouterr().out


# ====================================================================== the benchmark's validated cases
def _check_file(name: str) -> list[tuple[str, str, str, float]]:
    """``(N, seed, row, predicted ms)`` of a committed ``--check`` output."""
    out = []
    for line in (RESULTS / name).read_text().splitlines()[2:]:
        cells = line.split()
        if len(cells) > 8 and cells[0].isdigit():
            out.append((cells[0], cells[1], cells[2], float(cells[7])))
    return out


@pytest.mark.parametrize("name", ["lm_netns_100mbit_4r_quiet", "lm_netns_100mbit"])
def test_benchmark_check_is_reproduced(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import project

    rows = project.check(RESULTS / f"{name}_summary.csv")
    printed = capsys.readouterr().out
    want = _check_file(f"{name}_project_check.txt")
    got = [
        (str(r["world_size"]), str(r["seed"]), str(r["strategy"]), float(r["predicted_step_ms"]))
        for r in rows
    ]
    assert [g[:3] for g in got] == [w[:3] for w in want]
    for g, w in zip(got, want):
        assert g[3] == pytest.approx(w[3], abs=0.006), (g, w)
    assert printed == (RESULTS / f"{name}_project_check.txt").read_text()


def test_plan_bytes_are_the_counted_bytes_of_the_lm_runs() -> None:
    """The planner's exact bytes per round for the language model (124,672 fp32 parameters in
    one buffer) are the bytes its netns runs counted, per round."""
    counted = {}
    for f in ("lm_netns_100mbit_summary.csv", "lm_netns_100mbit_4r_quiet_summary.csv"):
        with open(RESULTS / f, newline="") as fh:
            for r in csv.DictReader(fh):
                counted[(int(r["world_size"]), r["strategy"])] = (
                    float(r["sync_bytes_sent"]),
                    int(r["syncs"]),
                )
    rows = {
        "ddp": ("ddp", "none", 1),
        "diloco_h64": ("diloco", "none", 16),
        "diloco_int8": ("diloco", "int8", 16),
        "diloco_int4": ("diloco", "int4", 16),
        "co2": ("co2", "none", 16),
        "noloco": ("noloco", "none", 16),
    }
    checked = 0
    for (n, name), (total, syncs) in counted.items():
        if name not in rows:
            continue
        strategy, codec, rounds = rows[name]
        p = plan(124672, n, "100mbit", 0.03, strategies=[strategy], compressors=[codec])
        per_round = total / (syncs if strategy == "ddp" else rounds)
        assert p.row(strategy, codec).bytes_per_round == pytest.approx(per_round, abs=1), (n, name)
        checked += 1
    assert checked == 11
    # streaming DiLoCo (2 ranks, F=4): 16 rounds of 4 fragments and a final whole-model sync
    total, _ = counted[(2, "streaming_diloco")]
    s = plan(124672, 2, "100mbit", 0.03, strategies=["streaming_diloco"], compressors=["none"]).rows[0]
    assert 16 * s.bytes_per_round + (4 * 124672 + 12) == total


def test_run_length_caps_h_at_min_rounds() -> None:
    """``steps``: H at most ``steps // min_rounds`` (as ``sync_every="auto"``), marked and above the
    budget; a row whose budget H is smaller is unchanged; ``min_rounds=None``: the budget alone."""
    kw = {"overhead": "15ms", "strategies": ["diloco", "streaming_diloco"], "compressors": ["none", "int4"]}
    free = plan(124672, 2, "10mbit", "15ms", **kw)
    capped = plan(124672, 2, "10mbit", "15ms", steps=4096, **kw)  # min_rounds 32: H <= 128
    assert free.row("diloco").every > 128 and not free.row("diloco").capped
    row = capped.row("diloco")
    assert row.every == 128 and row.capped and not row.within_budget and row.exposed_share > 0.05
    assert capped.row("streaming_diloco").every == 128
    # int4's budget H (about 85) is below the ceiling: as without steps
    assert capped.row("diloco", "int4").every == free.row("diloco", "int4").every < 128
    assert not capped.row("diloco", "int4").capped
    assert "(rounds)" in capped.table() and "4096 steps // 32 rounds" in capped.table()
    assert plan(124672, 2, "10mbit", "15ms", steps=4096, min_rounds=None, **kw).row("diloco").every == (
        free.row("diloco").every
    )
    assert plan(124672, 2, "10mbit", "15ms", steps=4096, min_rounds=16, **kw).row("diloco").every == 256
    # streaming's ceiling never below F (tau + 1)
    assert plan(124672, 2, "10mbit", "15ms", steps=32, **kw).row("streaming_diloco").every == 8
    with pytest.raises(ValueError, match="`min_rounds`"):
        plan(124672, 2, "10mbit", "15ms", steps=4096, min_rounds=0)
    with pytest.raises(ValueError, match="`steps`"):
        plan(124672, 2, "10mbit", "15ms", steps=0)
