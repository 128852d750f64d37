"""The runner's analysis of finished runs: the summary per row, the printed tables, the PNG.

:func:`summarize` turns every row's runs (rank 0's JSON, one per repeat) into one summary dict
(losses and bytes from the first repeat, times as medians over repeats); :func:`print_table`,
:func:`print_step_costs` and :func:`print_ratios` print it; :func:`plot` draws validation loss vs
optimizer steps, vs bytes sent per replica and vs wall time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import ONE_PROCESS_LOCAL_SGD, REFERENCES, SINGLE, SINGLE_PAR, WARMUP_STEPS_SKIPPED
from benchmarks.rows import LOCAL_SGD_H

__all__ = ["plot", "print_ratios", "print_step_costs", "print_table", "summarize"]


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _ms(steps: list[dict[str, Any]], sync: bool | None = None, key: str = "seconds") -> float:
    """Median of ``key`` in ms after the warm-up steps (only sync / non-sync steps if ``sync`` is set)."""
    steps = [s for s in steps[WARMUP_STEPS_SKIPPED:] if s.get(key) is not None]
    return 1e3 * _median([s[key] for s in steps if sync is None or bool(s["sync"]) == sync])


def _timings(res: dict[str, Any], target: float) -> dict[str, float | None]:
    """Time-like numbers of one run."""
    steps = res["steps"]
    hit = next((r for r in res["rows"] if r["val_loss"] <= target), None)
    nonsync_ms = _ms(steps, False)
    return {
        "wall_s": res["final"]["wall_s"],
        "time_to_target_s": hit["wall_s"] if hit else None,
        "median_step_ms": _ms(steps),
        # every step after the warm-up, synchronisation steps included: what a round really costs
        "mean_step_ms": 1e3 * statistics.fmean([s["seconds"] for s in steps[WARMUP_STEPS_SKIPPED:]])
        if len(steps) > WARMUP_STEPS_SKIPPED
        else math.nan,
        "median_nonsync_step_ms": nonsync_ms,
        "median_sync_step_ms": _ms(steps, True),
        "median_gap_ms": _ms(steps, key="gap_seconds"),
        "median_nonsync_step_cpu_ms": _ms(steps, False, key="cpu_seconds"),
        # the step that the overhead compares: a non-sync step (ddp: every step syncs)
        "ref_step_ms": _ms(steps) if math.isnan(nonsync_ms) else nonsync_ms,
    }


def _median_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def summarize(
    runs: dict[str, list[dict[str, Any]]], target: float | None
) -> tuple[list[dict[str, Any]], float]:
    """One summary dict per strategy, and the target loss used.

    Losses and bytes come from the first repeat (they are the same in every repeat: the runs are
    deterministic, ``deterministic_across_repeats`` says whether that held); times are the median
    over repeats of each repeat's number.
    """
    if target is None:
        others = [r[0] for n, r in runs.items() if n not in REFERENCES] or [r[0] for r in runs.values()]
        ref = runs["ddp"][0] if "ddp" in runs else others[0]
        target = ref["rows"][-1]["val_loss"] * 1.05
    timing = {
        name: {k: _median_of([_timings(r, target)[k] for r in reps]) for k in _timings(reps[0], target)}
        for name, reps in runs.items()
    }
    ddp = runs["ddp"][0]["final"] if "ddp" in runs else None
    out = []
    for name, reps in runs.items():
        res = reps[0]
        rows, final, t = res["rows"], res["final"], timing[name]
        hit = next((r for r in rows if r["val_loss"] <= target), None)
        sent, sync_sent = final["bytes_sent"], final["sync_bytes_sent"]
        losses = [[r["val_loss"] for r in rep["rows"]] for rep in reps]
        row = {
            "strategy": name,
            "world_size": res["world_size"],
            "repeats": len(reps),
            "deterministic_across_repeats": all(x == losses[0] for x in losses),
            "final_val_loss": rows[-1]["val_loss"],
            "final_val_acc": rows[-1]["val_acc"],
            "steps": final["step"],
            "syncs": final["sync_count"],
            "bytes_sent": sent,
            "sync_bytes_sent": sync_sent,
            "bytes_source": final["bytes_source"],
            "ddp_over_strategy_bytes": ddp["bytes_sent"] / sent if ddp and sent else None,
            "ddp_over_strategy_sync_bytes": ddp["sync_bytes_sent"] / sync_sent if ddp and sync_sent else None,
            "steps_to_target": hit["step"] if hit else None,
            **{k: v for k, v in t.items() if k != "ref_step_ms"},
        }
        for ref in REFERENCES:
            if ref in timing and name not in REFERENCES and t["ref_step_ms"] is not None:
                row[f"overhead_vs_{ref}_pct"] = 100 * (t["ref_step_ms"] / timing[ref]["ref_step_ms"] - 1)
        compute_only = timing.get(SINGLE_PAR, {}).get("mean_step_ms")
        if compute_only and name not in REFERENCES and t["mean_step_ms"] is not None:
            row["mean_step_vs_compute_only_pct"] = 100 * (t["mean_step_ms"] / compute_only - 1)
        cpu, ref_cpu = (
            t["median_nonsync_step_cpu_ms"],
            timing.get(SINGLE, {}).get("median_nonsync_step_cpu_ms"),
        )
        if cpu is not None and ref_cpu and name not in REFERENCES:
            row["cpu_overhead_vs_single_pct"] = 100 * (cpu / ref_cpu - 1)
        out.append(row)
    return out, target


def _fmt(x: Any, spec: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:+.1f}%"


def print_table(summary: list[dict[str, Any]], target: float) -> None:
    """The main table: one line per row of :func:`summarize`."""
    head = (
        f"{'strategy':<15} {'val_loss':>8} {'val_acc':>7} {'MB sent':>9} {'sync MB':>8} {'x fewer':>7} "
        f"{'syncs':>5} {'wall s':>6} {'t->tgt s':>8} {'step->tgt':>9} {'non-sync':>8} {'sync ms':>7} "
        f"{'gap ms':>6} {'vs single':>9}"
    )
    lines = [head, "-" * len(head)]
    for s in summary:
        star = "*" if s["bytes_source"] == "cost model" else " "
        lines.append(
            f"{s['strategy']:<15} {s['final_val_loss']:>8.4f} {s['final_val_acc']:>7.3f} "
            f"{s['bytes_sent'] / 1e6:>8.3f}{star} {s['sync_bytes_sent'] / 1e6:>8.3f} "
            f"{_fmt(s['ddp_over_strategy_bytes'], '.2f'):>7} {s['syncs']:>5} {s['wall_s']:>6.1f} "
            f"{_fmt(s['time_to_target_s'], '.1f', 'never'):>8} {_fmt(s['steps_to_target'], 'd', 'never'):>9} "
            f"{_fmt(s['median_nonsync_step_ms'], '.2f'):>8} {_fmt(s['median_sync_step_ms'], '.2f'):>7} "
            f"{_fmt(s['median_gap_ms'], '.2f'):>6} {_pct(s.get('overhead_vs_single_pct')):>9}"
        )
    lines.append(
        f"target val loss = {target:.4f} (t->tgt: wall seconds, step->tgt: optimizer steps to reach it); "
        "step times are medians in ms;\n* = bytes from the cost model (torch calls torch.distributed "
        "itself), otherwise counted by lightning_fedopt.comm"
    )
    print("\n".join(lines))


def print_step_costs(summary: list[dict[str, Any]]) -> None:
    """Mean step time with the synchronisation steps included, against compute only (``single_par``:
    the same number of processes training without talking)."""
    by = {s["strategy"]: s for s in summary}
    if SINGLE_PAR not in by:
        return
    ref = by[SINGLE_PAR]["mean_step_ms"]
    print(f"\nmean step time, synchronisation steps included (compute only = {SINGLE_PAR}: {ref:.3f} ms)")
    for s in summary:
        if s["strategy"] in REFERENCES:
            continue
        print(
            f"  {s['strategy']:<17} {s['mean_step_ms']:8.3f} ms  {_pct(s.get('mean_step_vs_compute_only_pct')):>8}"
            f"   sync step median {_fmt(s['median_sync_step_ms'], '.2f'):>7} ms"
        )


def print_ratios(runs: dict[str, list[dict[str, Any]]], summary: list[dict[str, Any]]) -> None:
    """``local_sgd``'s bytes against ``ddp``'s and the cost model's 1/H, and its per-step overhead
    against the one-process references (each part only where its rows ran)."""
    by = {s["strategy"]: s for s in summary}
    if "local_sgd" in by and "ddp" in by:
        loc, ddp = by["local_sgd"], by["ddp"]
        expect = 1 / LOCAL_SGD_H
        sync_ratio = loc["sync_bytes_sent"] / ddp["sync_bytes_sent"]
        total_ratio = loc["bytes_sent"] / ddp["bytes_sent"]
        purposes = runs["local_sgd"][0]["final"].get("by_purpose", {})
        print(
            f"\nlocal_sgd bytes / ddp bytes: sync traffic {sync_ratio:.4f}, all traffic {total_ratio:.4f}; "
            f"cost-model expectation 1/H = 1/{LOCAL_SGD_H} = {expect:.4f}\n"
            f"  ({loc['syncs']} averages of the parameters vs {ddp['steps']} gradient all-reduces of the "
            f"same size; sync deviates from 1/H by {100 * (sync_ratio / expect - 1):+.2f}%: the 3 scalars "
            "[weight, valid, invalid] sent with each average)\n"
            "  local_sgd bytes by purpose: "
            + ", ".join(f"{k}={v}" for k, v in sorted(purposes.items()))
            + "\n  (both count Lightning's metric reductions and object broadcasts too; the replica "
            "strategies also count the consensus for validation between syncs)"
        )
    if "local_sgd" in by and (SINGLE in by or SINGLE_PAR in by):
        s = by["local_sgd"]
        print(
            f"\nstep-time overhead of a non-sync local_sgd step (median {s['median_nonsync_step_ms']:.3f} ms)"
        )
        for ref, what in ((SINGLE, "one process alone"), (SINGLE_PAR, "N independent processes at once")):
            if ref in by:
                pct = s[f"overhead_vs_{ref}_pct"]
                verdict = "meets" if pct <= 3.0 else "MISSES"
                print(
                    f"  vs {ref:<10} ({what}, median {by[ref]['median_step_ms']:.3f} ms): {pct:+.1f}% "
                    f"({verdict} the <= 3% goal)"
                )
        one = by.get(ONE_PROCESS_LOCAL_SGD)
        if one is not None and SINGLE in by and one["median_nonsync_step_ms"] is not None:
            pct = 100 * (one["median_nonsync_step_ms"] / by[SINGLE]["median_step_ms"] - 1)
            print(
                f"  {ONE_PROCESS_LOCAL_SGD} vs single (both ONE process, so no CPU contention: the cost of the "
                f"strategy's own per-step code, median {one['median_nonsync_step_ms']:.3f} ms): {pct:+.1f}% "
                f"({'meets' if pct <= 3.0 else 'MISSES'} the <= 3% goal)"
            )
        if "torch_avg" in by and by["torch_avg"]["median_nonsync_step_ms"] is not None:
            t = by["torch_avg"]["median_nonsync_step_ms"]
            print(
                f"  vs torch_avg  (same kind of process group, PyTorch's averager, no lightning_fedopt code per "
                f"step, median {t:.3f} ms): {100 * (s['median_nonsync_step_ms'] / t - 1):+.1f}%"
            )
        if "cpu_overhead_vs_single_pct" in s:
            print(
                "  CPU time of the training thread per non-sync step: "
                f"{s['median_nonsync_step_cpu_ms']:.3f} ms vs "
                f"{by[SINGLE]['median_nonsync_step_cpu_ms']:.3f} ms single: "
                f"{s['cpu_overhead_vs_single_pct']:+.1f}%"
            )
        if SINGLE in by:
            print(
                f"  between steps (gap ms): {s['median_gap_ms']:.3f} ms vs "
                f"{by[SINGLE]['median_gap_ms']:.3f} ms single -- "
                + "the replica strategies check Lightning's SIGTERM flag only before sync steps; "
                "ddp and torch_avg keep Lightning's broadcast of it before every batch"
            )
        print(
            f"  medians over rank 0's steps, first {WARMUP_STEPS_SKIPPED} skipped"
            + (f", median over {s['repeats']} repeats" if s["repeats"] > 1 else "")
            + ". Every process runs with torch.set_num_threads(1) so that the ranks do not fight over the "
            "cores; 'single_par' has the same CPU contention as the N replicas but no strategy. Timings on a "
            "shared 2-core machine vary by +-30% from run to run: use --repeat for steadier numbers."
        )
    nondet = [s["strategy"] for s in summary if not s["deterministic_across_repeats"]]
    if by and next(iter(by.values()))["repeats"] > 1:
        print(
            f"\nval losses identical across repeats: {'yes' if not nondet else 'NO for ' + ', '.join(nondet)}"
        )


def plot(rows: list[dict[str, Any]], target: float, path: Path, title: str) -> None:
    """Validation loss vs optimizer steps, vs bytes sent per replica and vs wall time, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    names = [n for n in dict.fromkeys(r["strategy"] for r in rows) if n != SINGLE_PAR]  # = single
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(names) > len(colors):  # more rows than the default cycle: no two lines share a colour
        colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    for i, name in enumerate(names):
        rs = [r for r in rows if r["strategy"] == name]
        cost = rs[0]["bytes_source"] == "cost model"
        style = (
            {"color": "0.45", "linestyle": ":", "marker": "."}
            if name == SINGLE
            else {"color": colors[i % len(colors)], "marker": "o", "markersize": 3.5}
        )
        label = name + (" (1 process)" if name == SINGLE else "") + (" (bytes: cost model)" if cost else "")
        loss = [r["val_loss"] for r in rs]
        axes[0].plot([r["step"] for r in rs], loss, label=label, **style)
        if name not in REFERENCES:
            axes[1].plot([r["bytes_sent"] for r in rs], loss, label=label, **style)
        axes[2].plot([r["wall_s"] for r in rs], loss, label=label, **style)
    for ax, xlabel in zip(
        axes, ("optimizer steps", "bytes sent per replica (log)", "wall seconds since fit start")
    ):
        ax.axhline(target, color="0.6", linewidth=0.8, linestyle="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].set_title("loss vs steps")
    axes[1].set_title("loss vs communication")
    axes[2].set_title("loss vs wall time")
    axes[0].legend(fontsize=8)
    axes[2].text(
        0.98,
        0.97,
        f"dashed: target {target:.3f}",
        transform=axes[2].transAxes,
        ha="right",
        va="top",
        fontsize=8,
        color="0.4",
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
