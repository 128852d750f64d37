"""Unit tests of the projection calculator (benchmarks/project.py) and the LM benchmark's summary.

Pure functions, one process: the formulas of the cost model (ring all-reduce 2(N-1)/N * 4P, 1/H,
int8/int4 payloads, point-to-point), the overlap rules (CO2, streaming DiLoCo), the speed-up over
DDP, ``--check`` against a synthetic summary CSV, and benchmarks.lm.summarize's ratios and
time-to-target.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from benchmarks import lm, project
from benchmarks.project import INT4, INT8, SPECS, Spec, bytes_per_round, parse_rate, predict

P = 1_000_000  # parameters


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("100mbit", 1e8),
        ("1gbit", 1e9),
        ("2.5Gbit", 2.5e9),
        ("800kbit", 8e5),
        ("1000", 1e3),
        (" 10gbit ", 1e10),
    ],
)
def test_parse_rate(text: str, bits: float) -> None:
    assert parse_rate(text) == pytest.approx(bits)


@pytest.mark.parametrize("text", ["", "fast", "100mbps", "0mbit", "-1gbit", "1 gigabit"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


@pytest.mark.parametrize(("n", "factor"), [(2, 1.0), (4, 1.5), (8, 1.75)])
def test_all_reduce_bytes_follow_the_ring_cost_model(n: int, factor: float) -> None:
    # DDP: 2(N-1)/N * 4P per step; DiLoCo H=64: the same per round, a round every 64 steps
    assert bytes_per_round(SPECS["ddp"], P, n) == pytest.approx(factor * 4 * P)
    assert bytes_per_round(SPECS["diloco_h64"], P, n) == pytest.approx(factor * 4 * P)
    ddp = predict("ddp", SPECS["ddp"], P, n, 1e9, 0.1)
    dil = predict("diloco_h64", SPECS["diloco_h64"], P, n, 1e9, 0.1)
    assert ddp.bytes_per_step == pytest.approx(factor * 4 * P)
    assert dil.bytes_per_step == pytest.approx(factor * 4 * P / 64)


def test_compressed_payloads_and_point_to_point() -> None:
    assert INT8 == pytest.approx(1 + 4 / 256)
    assert INT4 == pytest.approx(0.5 + 4 / 256)
    fp32 = bytes_per_round(SPECS["diloco_h64"], P, 4)
    assert bytes_per_round(SPECS["diloco_int8"], P, 4) / fp32 == pytest.approx(INT8 / 4)
    assert bytes_per_round(SPECS["diloco_int4"], P, 4) / fp32 == pytest.approx(INT4 / 4)
    # NoLoCo: its model to one partner, whatever N
    assert bytes_per_round(SPECS["noloco"], P, 2) == bytes_per_round(SPECS["noloco"], P, 16) == 4 * P
    assert bytes_per_round(SPECS["ddp"], P, 1) == 0.0


def test_blocking_round_time_and_comm_share() -> None:
    # 4 MB at 100 Mbit/s on 2 ranks = 0.32 s; latency 1 ms over 2(N-1) = 2 hops
    p = predict("ddp", SPECS["ddp"], P, 2, 1e8, 0.08, latency=1e-3)
    assert p.round_seconds == pytest.approx(0.32 + 0.002)
    assert p.exposed_per_step == pytest.approx(0.322)
    assert p.step_seconds == pytest.approx(0.402)
    assert p.comm_share == pytest.approx(0.322 / 0.402)
    # efficiency: the same transfer at 80% of the rate
    assert predict("ddp", SPECS["ddp"], P, 2, 1e8, 0.08, efficiency=0.8).round_seconds == pytest.approx(0.4)
    # DDP's all-reduce partly hidden behind the compute
    half = predict("ddp", SPECS["ddp"], P, 2, 1e8, 0.08, ddp_overlap=0.5)
    assert half.exposed_per_step == pytest.approx(0.32 - 0.04)
    # H=64: the same round once every 64 steps
    d = predict("diloco_h64", SPECS["diloco_h64"], P, 2, 1e8, 0.08)
    assert d.exposed_per_step == pytest.approx(0.32 / 64)


def test_co2_hides_its_round_behind_h_steps() -> None:
    co2 = SPECS["co2"]
    # round 0.32 s, 64 steps of 10 ms = 0.64 s of compute: all hidden
    assert predict("co2", co2, P, 2, 1e8, 0.01).exposed_per_step == 0.0
    # 64 steps of 1 ms = 0.064 s: 0.256 s exposed per round
    assert predict("co2", co2, P, 2, 1e8, 0.001).exposed_per_step == pytest.approx(0.256 / 64)
    # no compute: as blocking as DiLoCo
    blocking = predict("d", SPECS["diloco_h64"], P, 2, 1e8, 0.0).exposed_per_step
    assert predict("co2", co2, P, 2, 1e8, 0.0).exposed_per_step == pytest.approx(blocking)


def test_streaming_fragments_overlap_their_delay() -> None:
    spec = Spec("streaming", 64, fragments=4, delay=8)
    # round 0.32 s = 4 fragments of 0.08 s, each hidden behind 8 steps
    assert predict("s", spec, P, 2, 1e8, 0.01).exposed_per_step == 0.0
    # 8 steps of 5 ms = 0.04 s: 0.04 s exposed per fragment, 0.16 s per round
    assert predict("s", spec, P, 2, 1e8, 0.005).exposed_per_step == pytest.approx(0.16 / 64)
    # each fragment pays the latency: 4 fragments x 2 hops
    assert predict("s", spec, P, 2, 1e8, 0.0, latency=1e-3).round_seconds == pytest.approx(0.32 + 0.008)


def test_post_local_sgd_warmup_is_averaged_over_the_run() -> None:
    spec = SPECS["post_local_sgd"]  # 64 DDP steps, then H=16
    ddp = predict("ddp", SPECS["ddp"], P, 2, 1e8, 0.01)
    steady = predict("p", spec, P, 2, 1e8, 0.01)
    assert steady.bytes_per_step == pytest.approx(4 * P / 16)
    run = predict("p", spec, P, 2, 1e8, 0.01, steps=256)
    assert run.bytes_per_step == pytest.approx(0.25 * 4 * P + 0.75 * 4 * P / 16)
    assert run.exposed_per_step == pytest.approx(0.25 * ddp.exposed_per_step + 0.75 * steady.exposed_per_step)


def test_speedup_table_is_relative_to_ddp() -> None:
    preds = [predict(n, SPECS[n], P, 2, 1e8, 0.08) for n in ("ddp", "diloco_h64")]
    text = project.table(preds)
    want = preds[0].step_seconds / preds[1].step_seconds
    assert f"{want:.2f}x" in text.splitlines()[-1]
    assert "1.00x" in text.splitlines()[2]


def test_main_prints_projection(capsys: pytest.CaptureFixture[str]) -> None:
    project.main(["--params", "1e9", "--replicas", "8", "--link", "1gbit", "--step-seconds", "0.5"])
    out = capsys.readouterr().out
    assert "diloco_int4" in out and "speed-up vs ddp" in out
    with pytest.raises(SystemExit):
        project.main(["--replicas", "8"])  # no --params
    with pytest.raises(SystemExit):
        project.main(["--params", "1e9", "--replicas", "8"])  # no compute time


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_check_predicts_from_counted_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = {"world_size": 2, "seed": 0, "n_params": P, "steps": 128, "compute_only_step_ms": 10.0}
    rows = [
        # DDP: 128 all-reduces of 4 MB at 100 Mbit/s = 320 ms each on top of 10 ms compute
        {
            **base,
            "strategy": "ddp",
            "mode": "netns-100mbit",
            "syncs": 128,
            "sync_bytes_sent": 128 * 4 * P,
            "mean_step_ms": 300.0,
        },
        # DiLoCo H=64: 3 rounds (the final one included) of 4 MB
        {
            **base,
            "strategy": "diloco_h64",
            "mode": "netns-100mbit",
            "syncs": 3,
            "sync_bytes_sent": 3 * 4 * P,
            "mean_step_ms": 15.0,
        },
        # loopback: no link rate, skipped
        {
            **base,
            "strategy": "ddp",
            "mode": "loopback",
            "syncs": 128,
            "sync_bytes_sent": 128 * 4 * P,
            "mean_step_ms": 12.0,
        },
        # no row of SPECS: skipped
        {
            **base,
            "strategy": "single_par",
            "mode": "netns-100mbit",
            "syncs": 0,
            "sync_bytes_sent": 0,
            "mean_step_ms": 10.0,
        },
    ]
    path = tmp_path / "s.csv"
    _write(path, rows)
    out = project.check(path)
    assert [o["strategy"] for o in out] == ["ddp", "diloco_h64"]
    ddp, dil = out
    assert ddp["round_bytes_counted"] == pytest.approx(4 * P)
    assert ddp["predicted_step_ms"] == pytest.approx(330.0)
    assert ddp["error_pct"] == pytest.approx(10.0)
    assert dil["predicted_step_ms"] == pytest.approx(10.0 + 320.0 / 64)
    assert dil["measured_comm_share"] == pytest.approx(1 - 10 / 15)
    assert "median |error|" in capsys.readouterr().out
    # --rate: the loopback row is predicted too
    assert len(project.check(path, rate="1gbit")) == 3
    # the run's own steps without a round as its compute, where it has them (not DDP)
    _write(path, [{**rows[1], "median_nonsync_step_ms": 12.0}, {**rows[0], "median_nonsync_step_ms": ""}])
    own = {o["strategy"]: o for o in project.check(path)}
    assert own["diloco_h64"]["compute_from"] == "own"
    assert own["diloco_h64"]["predicted_step_ms"] == pytest.approx(12.0 + 320.0 / 64)
    assert own["ddp"]["compute_from"] == "single_par" and own["ddp"]["compute_ms"] == pytest.approx(10.0)
    ref = {o["strategy"]: o for o in project.check(path, compute_from="single_par")}
    assert ref["diloco_h64"]["compute_ms"] == pytest.approx(10.0)


def test_link_rates_replace_the_nominal_rate(tmp_path: Path) -> None:
    """``--link-rates``: a nominal link's measured rate; a run's own both-ways measurement is
    preferred over its one-way one (``--measured-rates``)."""
    assert project.parse_link_rates("10mbit=9mbit, 1gbit=307.4mbit") == {1e7: 9e6, 1e9: 3.074e8}
    assert project.parse_link_rates(None) == {}
    with pytest.raises(ValueError, match="NOMINAL=MEASURED"):
        project.parse_link_rates("10mbit")
    row = {
        "world_size": 2,
        "seed": 0,
        "n_params": P,
        "steps": 128,
        "compute_only_step_ms": 10.0,
        "strategy": "ddp",
        "mode": "netns-100mbit",
        "syncs": 128,
        "sync_bytes_sent": 128 * 4 * P,
        "mean_step_ms": 300.0,
    }
    path = tmp_path / "r_summary.csv"
    _write(path, [row])
    # 4 MB at 80 Mbit/s: 400 ms a round on top of 10 ms compute
    (out,) = project.check(path, link_rates={1e8: 8e7})
    assert out["predicted_step_ms"] == pytest.approx(410.0)
    # a rate for another link changes nothing
    (out,) = project.check(path, link_rates={1e7: 8e6})
    assert out["predicted_step_ms"] == pytest.approx(330.0)
    run_txt = tmp_path / "r_run.txt"
    run_txt.write_text("measured TCP throughput host1 -> host0: 95.0 Mbit/s\n")
    assert project.measured_rate(path) == pytest.approx(95e6)
    run_txt.write_text(
        "measured TCP throughput host1 -> host0: 95.0 Mbit/s\n"
        "measured TCP throughput both ways at once: 80.0 Mbit/s (host0 -> host1 79.0, host1 -> host0 81.0)\n"
    )
    assert project.measured_rate(path) == pytest.approx(80e6)
    (out,) = project.check(path, measured=True)
    assert out["predicted_step_ms"] == pytest.approx(410.0)


def _run(name: str, losses: list[float], bytes_sent: int, step_s: float = 0.01) -> dict[str, object]:
    rows = [
        {
            "step": 32 * (i + 1),
            "val_loss": v,
            "val_bpb": v / math.log(2),
            "bytes_sent": bytes_sent,
            "wall_s": 1.0 + i,
        }
        for i, v in enumerate(losses)
    ]
    final = {
        "step": 32 * len(losses),
        "bytes_sent": bytes_sent,
        "sync_bytes_sent": bytes_sent // 2,
        "bytes_source": "counted",
        "sync_count": 4,
        "wall_s": 9.0,
    }
    return {
        "rows": rows,
        "final": final,
        "steps": [{"seconds": step_s, "sync": int(i % 10 == 9)} for i in range(20)],
        "mode": "loopback",
        "n_params": 10,
        "world_size": 2,
    }


def test_lm_summarize_ratios_and_time_to_ddp_loss() -> None:
    runs = {
        (2, 0, "ddp"): _run("ddp", [3.0, 2.0, 1.5], 6000),
        (2, 0, "diloco_h64"): _run("diloco_h64", [2.5, 1.4, 1.45], 100, step_s=0.02),
        (2, 0, "single_par"): _run("single_par", [3.0, 2.0, 1.6], 0, step_s=0.005),
    }
    summary = {s["strategy"]: s for s in lm.summarize(runs, tokens_per_step=1024)}
    d = summary["diloco_h64"]
    assert d["ddp_over_bytes"] == pytest.approx(60.0)
    assert d["bpb_vs_ddp_pct"] == pytest.approx(100 * (1.45 / 1.5 - 1))
    assert d["time_to_target_s"] == 2.0 and d["steps_to_target"] == 64  # first validation <= 1.5
    assert summary["ddp"]["time_to_target_s"] == 3.0
    assert d["tokens_per_replica"] == 96 * 1024
    assert d["mean_step_ms"] == pytest.approx(20.0)
    assert d["compute_only_step_ms"] == pytest.approx(5.0)
    assert d["median_nonsync_step_ms"] == pytest.approx(20.0) and d["median_sync_step_ms"] == pytest.approx(
        20.0
    )
    assert summary["single_par"]["time_to_target_s"] is None  # never at or below 1.5


def _digits_run(
    n_params: int, step_s: list[float], sync_bytes: int, world_size: int = 2
) -> dict[str, object]:
    """Rank 0's JSON of one benchmarks.run worker (the digits MLP): one validation, a time per step."""
    syncs = sum(s > 0.1 for s in step_s)
    final = {
        "wall_s": sum(step_s),
        "step": len(step_s),
        "sync_count": syncs,
        "bytes_sent": sync_bytes,
        "sync_bytes_sent": sync_bytes,
        "bytes_source": "counted",
    }
    return {
        "world_size": world_size,
        "n_params": n_params,
        "rows": [{"step": len(step_s), "val_loss": 0.1, "val_acc": 0.97, "wall_s": sum(step_s)}],
        "steps": [{"step": i + 1, "seconds": s, "sync": int(s > 0.1)} for i, s in enumerate(step_s)],
        "final": final,
    }


def test_run_summary_feeds_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``benchmarks.run`` (the digits MLP) writes the columns ``--check`` reads, rows named as SPECS."""
    from benchmarks import compare, run

    assert all(run.SUITE.knows(n) for n in ("ddp", "diloco_h16", "diloco_auto", "single_par"))
    # 100 Mbit/s, 2 ranks: a round of 4P bytes takes 320 ms; compute 10 ms (12 ms inside DiLoCo's steps)
    runs = {
        "ddp": [_digits_run(P, [0.33] * 32, 32 * 4 * P)],
        "diloco_h16": [_digits_run(P, [0.332 if i % 16 == 15 else 0.012 for i in range(32)], 2 * 4 * P)],
        "single_par": [_digits_run(P, [0.01] * 32, 0, world_size=1)],
    }
    monkeypatch.setattr(compare, "_network", lambda args: (None, "netns-100mbit"))
    monkeypatch.setattr(compare, "_train_all", lambda *a: runs)
    monkeypatch.setattr(compare._report, "plot", lambda *a: None)
    monkeypatch.setattr(compare.signal, "signal", lambda *a: None)
    argv = ["--strategies", ",".join(runs), "--no-single", "--steps", "32", "--seed", "3"]
    args = compare.build_parser(run.SUITE).parse_args([*argv, "--out", str(tmp_path), "--name", "mlp"])
    compare.runner(args, run.SUITE)
    with open(tmp_path / "mlp_summary.csv", newline="") as fh:
        summary = {r["strategy"]: r for r in csv.DictReader(fh)}
    assert {r["seed"] for r in summary.values()} == {"3"}
    assert {r["n_params"] for r in summary.values()} == {str(P)}
    assert float(summary["ddp"]["compute_only_step_ms"]) == pytest.approx(10.0)
    out = {o["strategy"]: o for o in project.check(tmp_path / "mlp_summary.csv")}
    assert list(out) == ["ddp", "diloco_h16"]  # single_par: the reference, no row of SPECS
    assert out["ddp"]["compute_from"] == "single_par"
    assert out["ddp"]["predicted_step_ms"] == pytest.approx(330.0)
    assert out["diloco_h16"]["round_bytes_counted"] == pytest.approx(4 * P)
    assert out["diloco_h16"]["predicted_step_ms"] == pytest.approx(12.0 + 320.0 / 16)
    assert "median |error|" in capsys.readouterr().out
