"""The analysis of :mod:`benchmarks.lm`: one summary per run, the printed report with the spread over
seeds and the issue's goals, and the PNG (val bits per byte vs tokens, bytes sent and wall time).

Pure Python over rank 0's JSON of every run (no torch): ``runs`` maps ``(world_size, seed, row)``
to that JSON with ``"mode"`` and ``"seed"`` added.
"""

from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.harness import SINGLE_PAR, WARMUP_STEPS_SKIPPED

__all__ = ["BYTE_GOALS", "plot", "print_goals", "print_long_goals", "print_report", "print_wall", "summarize"]

#: the issue's goals: (row, max % above DDP's final val bpb, min x fewer bytes in all, words)
BYTE_GOALS = (
    ("diloco_h64", 2.0, 60.0, "DiLoCo H=64: within 2% of DDP's val bpb, >= 60x fewer bytes per replica"),
    (
        "diloco_int4",
        3.0,
        400.0,
        "DiLoCo+int4 H=64 (initial_sync='check'): within 3%, >= 400x fewer bytes in all",
    ),
)


def _mean_step_ms(res: dict[str, Any]) -> float:
    steps = [s["seconds"] for s in res["steps"][WARMUP_STEPS_SKIPPED:]]
    return 1e3 * statistics.fmean(steps) if steps else math.nan


def _median_step_ms(res: dict[str, Any], sync: bool) -> float | None:
    """Median ms of the run's synchronising (or other) steps after the warm-up; None if none."""
    steps = [s["seconds"] for s in res["steps"][WARMUP_STEPS_SKIPPED:] if bool(s["sync"]) == sync]
    return 1e3 * statistics.median(steps) if steps else None


def summarize(runs: dict[tuple[int, int, str], dict[str, Any]], tokens_per_step: int) -> list[dict[str, Any]]:
    """One summary dict per ``(world_size, seed, row)`` run; time-to-target against that world size
    and seed's ``ddp`` final validation loss (where ``ddp`` ran)."""
    out = []
    for (n, seed, name), res in runs.items():
        rows_, final = res["rows"], res["final"]
        ddp = runs.get((n, seed, "ddp"))
        target = ddp["rows"][-1]["val_loss"] if ddp else None
        hit = next((r for r in rows_ if target is not None and r["val_loss"] <= target + 1e-12), None)
        ref = runs.get((n, seed, SINGLE_PAR))
        mean_ms = _mean_step_ms(res)
        row = {
            "world_size": n,
            "seed": seed,
            "strategy": name,
            "mode": res["mode"],
            "n_params": res["n_params"],
            "steps": final["step"],
            "tokens_per_replica": final["step"] * tokens_per_step,
            "final_val_loss": rows_[-1]["val_loss"],
            "final_val_bpb": rows_[-1].get("val_bpb"),
            "bytes_sent": final["bytes_sent"],
            "sync_bytes_sent": final["sync_bytes_sent"],
            "bytes_source": final["bytes_source"],
            "syncs": final["sync_count"],
            "wall_s": final["wall_s"],
            "mean_step_ms": mean_ms,
            "median_nonsync_step_ms": _median_step_ms(res, False),
            "median_sync_step_ms": _median_step_ms(res, True),
            "target_val_loss": target,
            "time_to_target_s": hit["wall_s"] if hit else None,
            "steps_to_target": hit["step"] if hit else None,
            "compute_only_step_ms": _mean_step_ms(ref) if ref else None,
        }
        if ddp is not None:
            d = ddp["final"]
            row["ddp_over_bytes"] = d["bytes_sent"] / final["bytes_sent"] if final["bytes_sent"] else None
            row["ddp_over_sync_bytes"] = (
                d["sync_bytes_sent"] / final["sync_bytes_sent"] if final["sync_bytes_sent"] else None
            )
            ddp_bpb = ddp["rows"][-1].get("val_bpb")
            if ddp_bpb and row["final_val_bpb"] is not None:
                row["bpb_vs_ddp_pct"] = 100 * (row["final_val_bpb"] / ddp_bpb - 1)
                alone = ref["rows"][-1].get("val_bpb") if ref else None
                if alone is not None and alone != ddp_bpb:
                    # the share of the gap between not talking at all and DDP that this row closes
                    row["gap_recovered"] = (alone - row["final_val_bpb"]) / (alone - ddp_bpb)
        out.append(row)
    return out


def _spread(values: list[float], spec: str = ".4g") -> str:
    """``mean`` or ``mean (min..max)`` of the finite values, each formatted with ``spec``."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return format(mean, spec)
    return f"{mean:{spec}} ({min(vals):{spec}}..{max(vals):{spec}})"


def _group(summary: list[dict[str, Any]], n: int, name: str, key: str) -> list[float]:
    return [
        s[key] for s in summary if s["world_size"] == n and s["strategy"] == name and s.get(key) is not None
    ]


def print_report(summary: list[dict[str, Any]]) -> None:
    """Per world size: every row's numbers as ``mean (min..max)`` over seeds, then the goals."""
    for n in sorted({s["world_size"] for s in summary}):
        names = list(dict.fromkeys(s["strategy"] for s in summary if s["world_size"] == n))
        seeds = sorted({s["seed"] for s in summary if s["world_size"] == n})
        mode = next(s["mode"] for s in summary if s["world_size"] == n)
        print(f"\n=== {n} replicas ({mode}), seeds {seeds}: mean (min..max) over seeds ===")
        head = (
            f"{'row':<24} {'val bpb':>22} {'vs ddp %':>18} {'MB sent':>9} {'x fewer':>8} {'syncs':>5} "
            f"{'wall s':>7} {'t->ddp s':>8} {'step ms':>8} {'gap rec.':>17}"
        )
        print(head + "\n" + "-" * len(head))
        for name in names:
            g = functools.partial(_group, summary, n, name)
            mb = statistics.fmean(g("bytes_sent")) / 1e6
            hits = g("time_to_target_s")
            t_tgt = (
                _spread(hits)
                if len(hits) == len(seeds)
                else (f"{len(hits)}/{len(seeds)} hit" if hits else "never")
            )
            print(
                f"{name:<24} {_spread(g('final_val_bpb'), '.4f'):>22} {_spread(g('bpb_vs_ddp_pct'), '+.2f'):>18} {mb:>9.3f} "
                f"{_spread(g('ddp_over_bytes')):>8.8} {int(statistics.fmean(g('syncs'))):>5} "
                f"{statistics.fmean(g('wall_s')):>7.1f} {t_tgt:>8.8} {statistics.fmean(g('mean_step_ms')):>8.2f} "
                f"{_spread(g('gap_recovered'), '.2f'):>17}"
            )
        print_goals(summary, n)


def print_goals(summary: list[dict[str, Any]], n: int) -> None:
    """The issue's goals at ``n`` replicas, as ratios measured side by side (mean over seeds)."""

    def mean(name: str, key: str) -> float | None:
        vals = _group(summary, n, name, key)
        return statistics.fmean(vals) if vals else None

    print(f"goals at {n} replicas (mean over seeds; a goal's row must have run with ddp):")
    for name, pct, times, words in BYTE_GOALS:
        dl, x = mean(name, "bpb_vs_ddp_pct"), mean(name, "ddp_over_bytes")
        if dl is None or x is None:
            continue
        verdict = "MET" if dl <= pct and x >= times else "NOT met"
        xs = mean(name, "ddp_over_sync_bytes")
        sync = f" ({xs:.0f}x fewer sync bytes)" if xs else ""
        print(f"  {words}: {dl:+.2f}% bpb, {x:.0f}x fewer bytes in all{sync} -> {verdict}")
    mode = next(s["mode"] for s in summary if s["world_size"] == n)
    for name in ("diloco_h64", "diloco_int4"):
        mine, ddp, pls = (
            mean(name, "time_to_target_s"),
            mean("ddp", "time_to_target_s"),
            mean("post_local_sgd", "time_to_target_s"),
        )
        if mine is None or ddp is None:
            continue
        vs_pls = f", {pls / mine:.2f}x shorter than post_local_sgd (goal >= 1.5x)" if pls else ""
        print(
            f"  {name}: time to DDP's final val loss {mine:.1f}s vs ddp {ddp:.1f}s: {ddp / mine:.2f}x shorter "
            f"(goal >= 5x at 4 replicas, 100 Mbit/s; this run: {n} replicas, {mode}){vs_pls}"
        )
    for auto in [k for k in dict.fromkeys(s["strategy"] for s in summary) if k.endswith("_auto")]:
        step, own = mean(auto, "mean_step_ms"), mean(auto, "median_nonsync_step_ms")
        steps, syncs, synced = mean(auto, "steps"), mean(auto, "syncs"), mean(auto, "median_sync_step_ms")
        if step and own and syncs:
            share = max(0.0, 1 - own / step)
            # robust to load spikes (a shared machine): medians of the steps with and without a round
            robust = (
                syncs * max(0.0, synced - own) / (steps * own + syncs * max(0.0, synced - own))
                if synced
                else None
            )
            judged = robust if robust is not None else share
            verdict = "MET" if abs(judged - 0.05) <= 0.02 else "NOT met"
            print(
                f"  {auto}: mean H {steps / syncs:.1f} ({syncs:.0f} syncs in {steps:.0f} steps), communication share "
                f"{share:.3f} of the step (1 - step without a sync / mean step)"
                + (
                    f", {robust:.3f} from the medians (rounds x (median step with a sync - without) / time)"
                    if robust is not None
                    else ""
                )
                + f"; goal 0.05 +- 0.02: {verdict}; {mode}"
            )
    co2, ref = mean("co2", "mean_step_ms"), mean("co2", "compute_only_step_ms")
    if co2 is not None and ref:
        verdict = "MET" if co2 <= 1.1 * ref else "NOT met"
        print(
            f"  co2 mean step {co2:.2f} ms vs compute only ({SINGLE_PAR}) {ref:.2f} ms: {100 * (co2 / ref - 1):+.1f}% "
            f"(goal <= +10% at 100 Mbit/s; this run: {mode}) -> {verdict}"
        )
    nl, dl = mean("noloco", "final_val_bpb"), mean("diloco_h64", "final_val_bpb")
    if nl is not None and dl is not None:
        nb, db = mean("noloco", "sync_bytes_sent"), mean("diloco_h64", "sync_bytes_sent")
        print(
            f"  noloco vs diloco_h64 (H=64, equal tokens): val bpb {nl:.4f} vs {dl:.4f} ({100 * (nl / dl - 1):+.2f}%), "
            f"sync bytes {nb / 1e6:.3f} vs {db / 1e6:.3f} MB"
        )


def print_long_goals(summary: list[dict[str, Any]], scaling_law: dict[int, float | None]) -> None:
    """The long preset's goals (issue 22), mean over seeds, and the scaling law's numbers beside them."""

    def mean(n: int, name: str, key: str) -> float | None:
        vals = _group(summary, n, name, key)
        return statistics.fmean(vals) if vals else None

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT met"

    for n in sorted({s["world_size"] for s in summary}):
        names = list(dict.fromkeys(s["strategy"] for s in summary if s["world_size"] == n))
        print(f"\nlong-preset goals at {n} replicas (mean over seeds):")
        law = scaling_law.get(n)
        for h in (16, 32):
            d, x, gap = (
                mean(n, f"diloco_h{h}", k) for k in ("bpb_vs_ddp_pct", "ddp_over_bytes", "gap_recovered")
            )
            if d is None or x is None:
                continue
            syncs = mean(n, f"diloco_h{h}", "syncs")
            ref = f"; scaling law (35M, H=30, loss): {law:+.1f}%" if law is not None else ""
            gap_s = f", {gap:.0%} of the no-talk gap" if gap is not None else ""
            line = (
                f"  diloco_h{h} ({syncs:.0f} outer steps): {d:+.2f}% bpb at {x:.0f}x fewer bytes{gap_s}{ref}"
            )
            if n == 4 and h == 16 and gap is not None:
                line += f" -> goal <= +3%, >= 30x, >= 75% recovered: {verdict(d <= 3 and x >= 30 and gap >= 0.75)}"
            print(line)
        limit = 3.0 if n >= 4 else 1.5
        far = [
            (mean(n, k, "bpb_vs_ddp_pct"), mean(n, k, "ddp_over_bytes"), k)
            for k in names
            if k not in ("ddp",) and (mean(n, k, "ddp_over_bytes") or 0) >= 200
        ]
        far = [f for f in far if f[0] is not None and f[1] is not None]
        if far:
            d, x, k = min(far)
            print(
                f"  best row at >= 200x fewer bytes: {k} {d:+.2f}% at {x:.0f}x -> goal <= +{limit}%: {verdict(d <= limit)}"
            )
        else:
            print("  no row at >= 200x fewer bytes")
        co2, dl = mean(n, "co2_h16", "bpb_vs_ddp_pct"), mean(n, "diloco_h16", "bpb_vs_ddp_pct")
        if co2 is not None and dl is not None:
            print(
                f"  co2_h16 {co2:+.2f}% vs diloco_h16 {dl:+.2f}% -> goal co2 <= diloco + 2%: {verdict(co2 <= dl + 2)}"
            )


def print_wall(summary: list[dict[str, Any]]) -> None:
    """``--equal-wall`` (:mod:`benchmarks._lm_wall`), per world size and seed: every row's H, steps,
    training wall time against the budget T and final validation loss, and the issue's verdict
    (the ``*_auto`` row's final loss vs the best other row's, goal <= +1%)."""
    for n, seed in dict.fromkeys((s["world_size"], s["seed"]) for s in summary if "budget_s" in s):
        group = [s for s in summary if (s["world_size"], s["seed"]) == (n, seed) and "budget_s" in s]
        auto = next(s for s in group if s["strategy"].endswith("_auto"))
        best = min((s for s in group if s is not auto), key=lambda s: s["final_val_loss"], default=None)
        budget, tol = auto["budget_s"], auto["wall_tol_pct"]
        print(
            f"\n=== equal wall-clock budget, {n} replicas ({auto['mode']}), seed {seed}: T = {budget:.2f}s "
            f"({auto['budget_source']}), training time without validation ==="
        )
        head = (
            f"{'row':<16} {'H mean':>7} {'steps':>6} {'val every':>9} {'train s':>8} {'vs T':>7} "
            f"{'val loss':>8} {'val bpb':>8} {'vs best':>8}  H: steps between rounds"
        )
        print(head + "\n" + "-" * len(head))
        for s in group:
            vs = f"{100 * (s['final_val_loss'] / best['final_val_loss'] - 1):+.2f}%" if best else "-"
            print(
                f"{s['strategy']:<16} {s['h_mean']:>7.1f} {s['steps']:>6} {s['val_every']:>9} "
                f"{s['train_wall_s']:>8.2f} {s['wall_vs_budget_pct']:>+6.1f}% {s['final_val_loss']:>8.4f} "
                f"{s['final_val_bpb']:>8.4f} {vs:>8}  {s['h_intervals']}"
            )
        for s in group:
            if s["earlier_runs"]:
                print(f"  {s['strategy']}: also ran {s['earlier_runs']} (not kept: further off T)")
        off = [s["strategy"] for s in group if abs(s["wall_vs_budget_pct"]) > tol]
        print(f"training wall times within +-{tol:g}% of T: {'every row' if not off else f'NOT {off}'}")
        if best is not None:
            d = 100 * (auto["final_val_loss"] / best["final_val_loss"] - 1)
            print(
                f"verdict: {auto['strategy']}'s final loss vs the best fixed H's ({best['strategy']}, "
                f"{best['final_val_loss']:.4f}): {d:+.2f}% (goal <= +1%) -> {'MET' if d <= 1 else 'NOT met'}"
                + (f" (but {off} ran off T: not an equal budget)" if off else "")
            )
    print_wall_over_seeds(summary)


def print_wall_over_seeds(summary: list[dict[str, Any]]) -> None:
    """``--equal-wall`` over several seeds, per world size: every row's mean final loss over the
    seeds that ran it, and the ``*_auto`` row's mean against the best other row's mean (one run's
    loss moves by 1-2% with the exact period, so a single seed's best fixed ``H`` is partly luck)."""
    for n in dict.fromkeys(s["world_size"] for s in summary if "budget_s" in s):
        group = [s for s in summary if s["world_size"] == n and "budget_s" in s]
        seeds = sorted({s["seed"] for s in group})
        if len(seeds) < 2:
            continue
        losses: dict[str, list[float]] = {}
        for s in group:
            losses.setdefault(s["strategy"], []).append(s["final_val_loss"])
        means = {k: sum(v) / len(v) for k, v in losses.items() if len(v) == len(seeds)}
        auto = next((k for k in means if k.endswith("_auto")), None)
        others = {k: v for k, v in means.items() if k != auto}
        if auto is None or not others:
            continue
        best = min(others, key=others.__getitem__)
        d = 100 * (means[auto] / others[best] - 1)
        print(
            f"\nover seeds {', '.join(map(str, seeds))} ({n} replicas): mean final loss "
            + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
            + f"\nverdict over seeds: {auto}'s mean vs the best fixed H's mean ({best}): {d:+.2f}% "
            f"(goal <= +1%) -> {'MET' if d <= 1 else 'NOT met'}"
        )


def plot(val_rows: list[dict[str, Any]], path: Path, title: str, wall_key: str = "wall_s") -> None:
    """Val bpb vs tokens per replica, vs bytes sent per replica (log) and vs wall seconds (the rows'
    ``wall_key``: ``"train_wall_s"``, validation excluded); one line of panels per world size, the
    first seed of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["world_size"] for r in val_rows})
    fig, axes = plt.subplots(len(sizes), 3, figsize=(17, 4.8 * len(sizes)), squeeze=False)
    colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    for line, n in zip(axes, sizes):
        rs_n = [r for r in val_rows if r["world_size"] == n]
        seed = min(r["seed"] for r in rs_n)
        names = [x for x in dict.fromkeys(r["strategy"] for r in rs_n) if x != SINGLE_PAR]
        for i, name in enumerate(names):
            rs = [r for r in rs_n if r["strategy"] == name and r["seed"] == seed]
            bpb = [r["val_bpb"] for r in rs]
            style = {"color": colors[i % 20], "marker": "o", "markersize": 3}
            line[0].plot([r["tokens_per_replica"] for r in rs], bpb, label=name, **style)
            line[1].plot([max(r["bytes_sent"], 1) for r in rs], bpb, label=name, **style)
            line[2].plot([r[wall_key] for r in rs], bpb, label=name, **style)
        wall = "wall seconds" + (", validation excluded" if wall_key == "train_wall_s" else "")
        for ax, xlabel in zip(line, ("tokens per replica", "bytes sent per replica (log)", wall)):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"val bits per byte ({n} replicas, seed {seed})")
            ax.grid(True, alpha=0.3)
        line[1].set_xscale("log")
        line[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
