"""``python -m benchmarks.lm --equal-wall``: every row trained for the same wall-clock budget.

The budget ``T`` is the training wall time of the ``*_auto`` row of ``--strategies`` run at
``--steps`` (:func:`train_wall`: the fit's wall seconds less its validation seconds), or
``--wall-budget`` seconds. Every other row gets the number of optimizer steps that fills ``T``, so
that its own learning-rate schedule (warm-up + cosine over its ``max_steps``) ends within the
budget and it is judged at the end of that schedule, not in the middle of it. The steps come from
a cost model fitted to the auto row's run (:func:`fit`, :func:`predict`):

    wall(S, H) = a + S c + ceil(S / H) r

with ``a`` the start-up and warm-up, ``c`` a step without a round (the loop's gap between steps
included), ``r`` a round's extra time (the last step is a round when ``H`` does not divide ``S``:
the final synchronisation). ``H`` is the row's own (``diloco_h<N>``; the auto row, given
``--wall-budget``: its mean H); a row of unknown ``H`` (``ddp``, ...) runs at ``--steps`` first.
Then a row whose achieved time is more than ``--wall-tol`` % away from ``T`` runs once more, at the
steps its own run's costs predict (the run nearer ``T`` is kept). The steps are a multiple of the row's validation interval (the
one nearest ``--val-every``) so that the last validation is at the last step.

Pure Python apart from the runs, which :mod:`benchmarks.lm` hands in (``run``: its ``_run``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.harness import WARMUP_STEPS_SKIPPED

__all__ = ["Costs", "fit", "intervals", "predict", "runner", "solve", "train_wall"]


class Costs(NamedTuple):
    """Seconds of one run's parts: start-up (and warm-up), a step without a round, a round's extra."""

    start: float
    step: float
    round: float


def train_wall(res: dict[str, Any]) -> float:
    """The run's training wall seconds: the fit's wall time less the time spent validating."""
    return float(res["final"]["wall_s"]) - float(res["rows"][-1]["val_s"])


def _sync_steps(res: dict[str, Any]) -> list[int]:
    return [int(s["step"]) for s in res["steps"] if s["sync"]]


def mean_h(res: dict[str, Any]) -> float:
    """Optimizer steps per synchronisation (the steps if it never synchronised)."""
    return res["final"]["step"] / max(1, len(_sync_steps(res)))


def intervals(res: dict[str, Any]) -> str:
    """The steps between synchronisations, runs of the same ``H`` folded: ``"8, 68x7, 80x3, 4"``
    (the last one the final synchronisation when ``H`` does not divide the steps).

    >>> intervals({"steps": [{"step": i, "sync": i in (8, 76, 144, 150)} for i in range(1, 151)]})
    '8, 68x2, 6'
    """
    syncs = _sync_steps(res)
    gaps = [b - a for a, b in zip([0, *syncs], syncs)]
    return ", ".join(
        f"{h}x{n}" if n > 1 else str(h) for h, n in ((h, len(list(g))) for h, g in itertools.groupby(gaps))
    )


def fit(res: dict[str, Any]) -> Costs:
    """:class:`Costs` of a run from its steps' seconds (and the gaps before them) and its wall time:
    ``step`` the mean step without a round after the warm-up, ``round`` the median step with one
    less the median without, ``start`` what remains of :func:`train_wall`."""
    steps = res["steps"]
    secs = [s["seconds"] + (s.get("gap_seconds") or 0.0) for s in steps]
    plain = [t for s, t in zip(steps, secs) if not s["sync"]]
    synced = [t for s, t in zip(steps, secs) if s["sync"]]
    later = plain[WARMUP_STEPS_SKIPPED:] or plain or secs
    step = statistics.fmean(later)
    rnd = max(0.0, statistics.median(synced) - statistics.median(later)) if synced and plain else 0.0
    return Costs(train_wall(res) - len(steps) * step - len(synced) * rnd, step, rnd)


def predict(costs: Costs, steps: int, h: float) -> float:
    """Training wall seconds of ``steps`` steps with a round every ``h``.

    >>> predict(Costs(1.0, 0.01, 0.5), 100, 16)    # 7 rounds: 6 and the final one
    5.5
    """
    return costs.start + steps * costs.step + math.ceil(steps / h - 1e-9) * costs.round


def solve(costs: Costs, budget: float, h: float, val_every: int) -> tuple[int, int]:
    """``(steps, validation interval)``: the steps whose :func:`predict` is nearest ``budget``, a
    multiple of the interval nearest ``val_every`` (so that the last validation is at the last step).

    >>> solve(Costs(1.0, 0.01, 0.5), 5.5, 16, 32)    # 100 steps fill it; 3 validations: 99
    (99, 33)
    """
    hi = 1
    while predict(costs, hi, h) < budget and hi < 1 << 24:
        hi *= 2
    lo = 1  # the most steps that stay within the budget (bisection; predict does not decrease)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if predict(costs, mid, h) <= budget else (lo, mid - 1)
    k = max(1, round(lo / max(1, val_every)))
    options = {k * max(1, m) for m in (lo // k, lo // k + 1)}
    steps = min(sorted(options), key=lambda s: abs(predict(costs, s, h) - budget))
    return steps, steps // k


Run = Callable[..., dict[str, Any]]


def _train(
    args: argparse.Namespace,
    run: Run,
    name: str,
    steps: int,
    val_every: int,
    at: tuple[int, int],
    logdir: Path,
) -> dict[str, Any]:
    """One run of the row ``name`` at ``steps`` steps, validation every ``val_every``."""
    row_args = argparse.Namespace(**{**vars(args), "steps": steps, "val_every": val_every})
    return run(row_args, [name], *at, logdir)[name]


def _plan(
    args: argparse.Namespace,
    run: Run,
    h_of: Callable[[str], int | None],
    names: list[str],
    ref: str,
    at: tuple[int, int],
    logdir: Path,
) -> dict[str, dict[str, Any]]:
    """Every row of ``names`` at ``at = (world size, seed)``, its steps filling the budget."""
    first = _train(args, run, ref, args.steps, args.val_every, at, logdir / "pass1")
    budget = args.wall_budget or train_wall(first)
    source = "--wall-budget" if args.wall_budget else f"{ref}'s fit at {args.steps} steps"
    costs = fit(first)
    print(
        f"\nbudget T = {budget:.2f}s ({source}, validation excluded); {ref}'s costs: start-up {costs.start:.2f}s, "
        f"step {1e3 * costs.step:.2f} ms, round +{1e3 * costs.round:.1f} ms"
    )
    got: dict[str, dict[str, Any]] = {}
    every: dict[str, int] = {}
    tried: dict[str, list[str]] = {n: [] for n in names}

    def train(name: str, steps: int, val_every: int, tag: str, pred: float | None) -> None:
        res = _train(args, run, name, steps, val_every, at, logdir / tag)
        wall = train_wall(res)
        guess = f" (predicted {pred:.2f}s)" if pred is not None else ""
        print(
            f"  {name}: {steps} steps, validation every {val_every}: training wall {wall:.2f}s, "
            f"{100 * (wall / budget - 1):+.1f}% of T{guess}",
            flush=True,
        )
        old = got.get(name)
        if old is not None and abs(train_wall(old) - budget) <= abs(wall - budget):
            tried[name].append(f"{steps} steps {wall:.2f}s")  # further off than the run it was to correct
            return
        if old is not None:
            tried[name].append(f"{old['final']['step']} steps {train_wall(old):.2f}s")
        got[name], every[name] = res, val_every

    if args.wall_budget is None:
        got[ref], every[ref] = first, args.val_every
    else:
        tried[ref].append(f"{args.steps} steps {train_wall(first):.2f}s")
    for name in names:
        if name in got:
            continue
        h = mean_h(first) if name == ref else h_of(name)
        if h is None:  # costs unknown: a first run at --steps, then the steps its own costs predict
            train(name, args.steps, args.val_every, "pass2", None)
            continue
        steps, interval = solve(costs, budget, h, args.val_every)
        train(name, steps, interval, "pass2", predict(costs, steps, h))
    for name in names:
        res = got[name]
        if abs(train_wall(res) / budget - 1) <= args.wall_tol / 100 or (name == ref and not args.wall_budget):
            continue
        own = fit(res)
        steps, interval = solve(own, budget, mean_h(res), args.val_every)
        if steps != res["final"]["step"]:
            train(name, steps, interval, "pass3", predict(own, steps, mean_h(res)))
    for name, res in got.items():
        wall = train_wall(res)
        res["summary_extra"] = {
            "budget_s": budget,
            "budget_source": source,
            "train_wall_s": wall,
            "wall_vs_budget_pct": 100 * (wall / budget - 1),
            "wall_tol_pct": args.wall_tol,
            "val_every": every[name],
            "h_mean": mean_h(res),
            "h_intervals": intervals(res),
            "earlier_runs": "; ".join(tried[name]),
        }
        for row in res["rows"]:
            row["train_wall_s"] = row["wall_s"] - row["val_s"]
    return {n: got[n] for n in names}


def runner(
    args: argparse.Namespace,
    run: Run,
    report: Callable[..., None],
    h_of: Callable[[str], int | None],
    names: list[str],
    name: str,
) -> None:
    """The equal-wall plan at every world size and seed (``names``: the rows, one ``*_auto``);
    ``report``: :func:`benchmarks.lm._report`."""
    import time

    refs = [n for n in names if n.endswith("_auto")]
    if len(refs) != 1:
        sys.exit(
            f"--equal-wall needs exactly one *_auto row in --strategies (it sets T, its run the costs); got {refs}"
        )
    names = [refs[0], *(n for n in names if n != refs[0])]
    outdir = Path(args.out)
    logdir = outdir / "logs" / name
    t0 = time.perf_counter()
    runs: dict[tuple[int, int, str], dict[str, Any]] = {}
    for n in [int(x) for x in args.world_sizes.split(",") if x.strip()]:
        for seed in [int(x) for x in args.seeds.split(",") if x.strip()]:
            for k, res in _plan(args, run, h_of, names, refs[0], (n, seed), logdir).items():
                runs[(n, seed, k)] = res
    budget = "--wall-budget" if args.wall_budget else f"{refs[0]}'s training time at {args.steps} steps"
    report(args, runs, name, outdir, t0, hidden=set(), steps_words=f"equal wall-clock budget ({budget})")
