"""The language model of ``examples/lm.py`` under every strategy: bits per byte vs tokens, bytes and time.

    python -m benchmarks.lm --quick          # 2 ranks, seed 0: ddp, local_sgd, diloco H=16/64, diloco_int4
    python -m benchmarks.lm                  # the outer sweep, then every row at 2 and 4 ranks, seeds 0 and 1
    sudo python -m benchmarks.lm --netns --rate 100mbit     # each rank its own host, 100 Mbit/s links
    python -m benchmarks.lm --strategies ddp,diloco_h64 --world-sizes 2 --seeds 0 --steps 256
    python -m benchmarks.lm --equal-wall --strategies diloco_h8,diloco_h32,diloco_auto --world-sizes 2 --seeds 0

One model (``examples.lm.LanguageModel``: a byte-level GPT, by default the benchmark's small size
d_model 64, 2 layers, 2 heads, seq_len 128 -- 125k parameters -- so that a step takes ~15 ms on
one core), one data module (``examples.lm_data.StdlibText``: the standard library's source, one
disjoint block of packages per replica -- non-IID -- and the same held-out files for every rank),
the same seed, AdamW with warm-up + cosine and gradient clipping at 1 as in the example, and the
same number of optimizer steps, batch and sequence length for every row: equal tokens per replica.

The runner is the harness of :mod:`benchmarks.compare` (a fresh worker process per row, which
launches its ranks; ``--netns``: one namespace host per rank). The run is a plan: first (without
``--outer-lr``) a small sweep of DiLoCo's outer Nesterov SGD at H=64 (:data:`SWEEP`, 2 ranks, the
first seed); the setting with the lowest final validation bits per byte is then used by every
DiLoCo row (its own run is reused as ``diloco_h64`` there); then every row at each world size and
seed (at more than 2 ranks only :data:`FOUR_RANK_ROWS` unless ``--strategies`` names the rows).
Defaults: 1024 steps (H=256 gets 4 outer steps), validation every 128 steps on 64 KiB of held-out
text, batch 8 x 128 tokens per replica, lr 2e-3 with 64 warm-up steps; ``--quick``: 512 steps,
validation every 64, 2 ranks, seed 0, :data:`QUICK` rows, no sweep (the paper's outer lr 0.7,
momentum 0.9) and no compute-only reference. Outputs in ``--out``: ``<name>.csv`` (one
row per validation: world size, seed, tokens per replica, val loss/bpb, bytes, wall seconds),
``<name>_steps.csv``, ``<name>_summary.csv`` (one row per run), ``<name>.png`` (val bpb against
tokens, bytes sent and wall time), and a printed table with the spread over seeds and the goals.

``--equal-wall`` (:mod:`benchmarks._lm_wall`): not equal tokens but equal training wall time --
the ``*_auto`` row of ``--strategies`` runs ``--steps`` steps (its training time, validation
excluded, is the budget T, or ``--wall-budget``), every other row the steps that fill T (its own
warm-up + cosine over them), then a table of H, steps, time vs T and final loss vs the best row's.
Any ``diloco_h<N>`` names DiLoCo at H=N with the DiLoCo rows' outer step (:func:`diloco_h`).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import _lm_report, _lm_wall, compare, rows
from benchmarks.harness import SINGLE_PAR, Row, Suite, write_csv
from benchmarks.rows import lf_row

__all__ = ["QUICK", "ROWS", "SUITE", "SWEEP", "WALL_ROWS", "diloco_h", "main", "summarize"]

summarize = _lm_report.summarize

#: DiLoCo's outer step used when there is no sweep (the paper's: Nesterov SGD lr 0.7, momentum 0.9)
DEFAULT_OUTER = {"lr": 0.7, "momentum": 0.9}
#: the outer settings the sweep tries at H=64: (lr, momentum), Nesterov
SWEEP_GRID = ((0.5, 0.5), (0.5, 0.9), (0.7, 0.5), (0.7, 0.9))
#: the outer setting the DiLoCo rows of this worker use (set from ``--outer-lr/--outer-momentum``)
_outer: dict[str, float] = dict(DEFAULT_OUTER)


def _sweep_name(lr: float, momentum: float) -> str:
    return f"sweep_h64_lr{lr:g}_m{momentum:g}"


def _diloco(h: int | str, **kw: Any) -> Callable[[], Any]:
    """``DiLoCoStrategy(sync_every=h, outer Nesterov SGD at the chosen lr/momentum, **kw)``."""

    def make() -> Any:
        import lightning_fedopt as lf

        outer = {"lr": _outer["lr"], "momentum": _outer["momentum"], "nesterov": True}
        return lf.DiLoCoStrategy(sync_every=h, outer_kwargs=outer, **kw)

    return make


_DILOCO_H = re.compile(r"diloco_h([1-9][0-9]*)")


def diloco_h(name: str) -> int | None:
    """``N`` of a row named ``diloco_h<N>``, else None.

    >>> diloco_h("diloco_h128"), diloco_h("diloco_h16_lr0.6"), diloco_h("diloco_auto")
    (128, None, None)
    """
    m = _DILOCO_H.fullmatch(name)
    return int(m.group(1)) if m else None


def _diloco_row(h: int) -> Row:
    return (f"DiLoCoStrategy(sync_every={h}), outer Nesterov SGD (swept lr/momentum)", _diloco(h))


class _Rows(dict[str, Row]):
    """Rows by name that also holds every ``diloco_h<N>`` (:func:`diloco_h`, :func:`_diloco_row`):
    the lookup behind :data:`SUITE`'s ``row``/``knows``, so any H can be named wherever rows are."""

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and diloco_h(name) is not None)

    def __missing__(self, name: str) -> Row:
        h = diloco_h(name)
        if h is None:
            raise KeyError(name)
        return _diloco_row(h)


def _post_local_sgd(period: int, warmup_steps: int) -> Callable[[], Any]:
    def make() -> Any:
        from benchmarks._post_local import TorchPostLocalSGDStrategy

        return TorchPostLocalSGDStrategy(period=period, warmup_steps=warmup_steps)

    return make


#: name -> (description, factory): the rows of the language-model comparison, in the default order
ROWS: dict[str, Row] = {
    "ddp": rows.STRATEGIES["ddp"],
    "ddp_muon": (
        "Lightning DDP with Muon inside (LanguageModel(optimizer='muon')) [baseline of the Muon rows]",
        rows.STRATEGIES["ddp"][1],
    ),
    "post_local_sgd": (
        "PyTorch post-local SGD: DDP for 64 steps, then PeriodicModelAverager(period=16) [baseline]",
        _post_local_sgd(16, 64),
    ),
    "local_sgd": ("LocalSGDStrategy(sync_every=16)", lf_row("LocalSGDStrategy", sync_every=16)),
    "diloco_h16": _diloco_row(16),
    "diloco_h64": _diloco_row(64),
    "diloco_h32": _diloco_row(32),
    "diloco_h256": _diloco_row(256),
    "diloco_int8": ("DiLoCoStrategy(64, compressor='int8')", _diloco(64, compressor="int8")),
    "diloco_int4": (
        "DiLoCoStrategy(64, compressor='int4', initial_sync='check')",
        _diloco(64, compressor="int4", initial_sync="check"),
    ),
    "streaming_diloco": (
        "DiLoCoStrategy(64, fragments=4, sync_delay=8, mixing=0.5)",
        _diloco(64, fragments=4, sync_delay=8, mixing=0.5),
    ),
    "co2": rows.STRATEGIES["co2"],
    "co2_auto": (
        "CO2Strategy(sync_every='auto'): H by the overlapped rule from the round's launch-to-completion time",
        lf_row("CO2Strategy", sync_every="auto"),
    ),
    "streaming_auto": (
        "DiLoCoStrategy('auto', fragments=4, sync_delay=1): the fragment schedule's H from the measured rounds",
        _diloco("auto", fragments=4, sync_delay=1),
    ),
    "co2_h16": (
        "CO2Strategy(sync_every=16): the library's defaults (beta by world size)",
        lf_row("CO2Strategy", sync_every=16),
    ),
    "sparseloco_h16": (
        "SparseLoCoStrategy(sync_every=16): top-128 of 4096, 2-bit values, error feedback, outer SGD lr 1",
        lf_row("SparseLoCoStrategy", sync_every=16),
    ),
    "sparseloco_h32": ("SparseLoCoStrategy(sync_every=32)", lf_row("SparseLoCoStrategy", sync_every=32)),
    "diloco_auto": rows.BY_NAME["diloco_auto"],
    "desloc_h16": (
        "DESLOCStrategy(sync_every=16, moment_periods=(3, 6)): exp_avg every 48, exp_avg_sq every 96 steps",
        lf_row("DESLOCStrategy", sync_every=16, moment_periods=(3, 6)),
    ),
    "muloco_h32": (
        "MuLoCoStrategy(sync_every=32): Muon inside (LanguageModel(optimizer='muon')), 2-bit error-feedback "
        "pseudo-gradients, outer Nesterov SGD lr 0.7 momentum 0.6",
        lf_row("MuLoCoStrategy", sync_every=32),
    ),
    "diloco_muon_h16": ("DiLoCoStrategy(sync_every=16) with Muon inside, full precision", _diloco(16)),
    "eager_h16": (
        "EagerDiLoCoStrategy(sync_every=16): eager updates, the round overlapped; outer Nesterov lr 0.4 (M<=2) / 0.2",
        lf_row("EagerDiLoCoStrategy", sync_every=16),
    ),
    "noloco": rows.STRATEGIES["noloco"],
}
#: the outer sweep: DiLoCo H=64 at each setting of :data:`SWEEP_GRID`
SWEEP: dict[str, Row] = {
    _sweep_name(lr, m): (
        f"DiLoCoStrategy(sync_every=64), outer Nesterov SGD lr {lr} momentum {m}",
        lf_row("DiLoCoStrategy", sync_every=64, outer_kwargs={"lr": lr, "momentum": m, "nesterov": True}),
    )
    for lr, m in SWEEP_GRID
}
#: the long preset (``--long``): DiLoCo's H, each swept over :data:`LONG_LRS` (outer Nesterov SGD,
#: momentum 0.9) per number of replicas on the first seed; the best lr is the row ``diloco_h<H>``
LONG_H = (16, 32)
#: the outer learning rates the long preset's sweep tries (the scaling law's 0.6 for M = 2-4, and more)
LONG_LRS = (0.6, 0.9)
#: the long preset's other rows, run at every number of replicas and seed (with ``ddp`` and the compute-only reference)
LONG_ROWS = ("ddp", "sparseloco_h16", "co2_h16")


def _long_name(h: int, lr: float) -> str:
    return f"diloco_h{h}_lr{lr:g}"


#: the long preset's sweep rows: DiLoCo at each H of :data:`LONG_H` and lr of :data:`LONG_LRS`
LONG_SWEEP: dict[str, Row] = {
    _long_name(h, lr): (
        f"DiLoCoStrategy(sync_every={h}), outer Nesterov SGD lr {lr} momentum 0.9",
        lf_row("DiLoCoStrategy", sync_every=h, outer_kwargs={"lr": lr, "momentum": 0.9, "nesterov": True}),
    )
    for h in LONG_H
    for lr in LONG_LRS
}
#: "Scaling Laws for DiLoCo" (arXiv 2503.09799, Table 4): DiLoCo H=30 vs data parallel at equal tokens,
#: final loss, 35M parameters (the smallest model there): replicas -> % above data parallel
SCALING_LAW_35M_H30 = {1: None, 2: 0.7, 4: 2.0, 8: 3.9}
QUICK = ("ddp", "local_sgd", "diloco_h16", "diloco_h64", "diloco_int4")
#: the rows of the default plan at 4 ranks (``--strategies`` runs the rows it names at every size)
FOUR_RANK_ROWS = ("ddp", "post_local_sgd", "diloco_h64", "diloco_int4", "co2", "noloco")
#: the rows of ``--equal-wall`` unless ``--strategies`` names them
WALL_ROWS = ("diloco_auto", "diloco_h8", "diloco_h16", "diloco_h32", "diloco_h64", "diloco_h128")
SUITE = Suite(
    strategies=ROWS,
    extra=_Rows({**SWEEP, **LONG_SWEEP}),
    model_kwargs={
        "muloco_h32": {"optimizer": "muon"},
        "diloco_muon_h16": {"optimizer": "muon"},
        "ddp_muon": {"optimizer": "muon"},
    },
    worker_module="benchmarks.lm",
    quick=QUICK,
    prog="python -m benchmarks.lm",
    description=__doc__.split("\n\n")[0],
)


# ====================================================================== command line
def build_parser() -> argparse.ArgumentParser:
    """The harness's flags (:func:`benchmarks.compare.build_parser`) with the model's and the plan's."""
    p = compare.build_parser(SUITE)
    p.set_defaults(lr=2e-3, batch_size=8, val_every=None)
    g = p.add_argument_group("language model")
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--n-layers", type=int, default=2)
    g.add_argument("--n-heads", type=int, default=2)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--warmup", type=int, default=64, help="learning-rate warm-up steps")
    g.add_argument("--max-bytes", type=int, default=8 << 20, help="training text, all replicas together")
    g.add_argument("--val-bytes", type=int, default=64 << 10, help="held-out text")
    g.add_argument(
        "--iid", action="store_true", help="deal shuffled files (default: a block of packages each)"
    )
    g.add_argument("--outer-lr", type=float, default=None, help="DiLoCo's outer lr (default: from the sweep)")
    g.add_argument("--outer-momentum", type=float, default=None, help="DiLoCo's outer momentum")
    g.add_argument("--seeds", default=None, help="comma list (default 0,1; quick 0)")
    g.add_argument("--world-sizes", default=None, help="comma list of ranks per run (default 2,4; quick 2)")
    g.add_argument("--no-sweep", action="store_true", help="skip the outer sweep (use --outer-lr/momentum)")
    g.add_argument(
        "--from-logs",
        action="store_true",
        help="--long: report the runs an earlier (possibly interrupted) run left in its logs, run nothing",
    )
    g.add_argument(
        "--long",
        action="store_true",
        help="the long preset: 2048 steps, 4 and 2 replicas, seeds 0,1; DiLoCo H=16/32 (lr swept per replicas), "
        "SparseLoCo, CO2, DDP, compute only; --strategies adds rows",
    )
    g.add_argument(
        "--equal-wall",
        action="store_true",
        help="every row at the training wall time of the *_auto row at --steps (or --wall-budget): the steps that "
        f"fill it (default rows {','.join(WALL_ROWS)}; no sweep, no compute-only reference)",
    )
    g.add_argument("--wall-budget", type=float, default=None, help="--equal-wall: the budget T in seconds")
    g.add_argument(
        "--wall-tol", type=float, default=3.0, help="--equal-wall: %% off T after which a row runs once more"
    )
    return p


def _worker_extra(args: argparse.Namespace) -> list[str]:
    extra = [
        *("--d-model", str(args.d_model), "--n-layers", str(args.n_layers)),
        *("--n-heads", str(args.n_heads), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup)),
        *("--max-bytes", str(args.max_bytes), "--val-bytes", str(args.val_bytes)),
        *(["--iid"] if args.iid else []),
    ]
    if args.outer_lr is not None:
        extra += ["--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum)]
    return extra


def _work(args: argparse.Namespace) -> None:
    """Inside a worker: train the row ``args.worker`` on the language model (imports Lightning)."""
    from benchmarks import _worker
    from examples.lm import LanguageModel
    from examples.lm_data import StdlibText

    if args.outer_lr is not None:
        _outer.update(lr=args.outer_lr, momentum=args.outer_momentum)

    def model() -> Any:
        return LanguageModel(
            d_model=args.d_model,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            seq_len=args.seq_len,
            lr=args.lr,
            warmup_steps=args.warmup,
            **SUITE.model_kwargs.get(args.worker, {}),
        )

    def data() -> Any:
        kwargs = {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "iid": args.iid,
            "seed": args.seed,
            "max_bytes": args.max_bytes,
            "val_bytes": args.val_bytes,
        }
        # a replica that never talks (single_par): copy i trains on the share replica i of the run reads
        share = (args.copy_index, args.copies) if args.worker == SINGLE_PAR and args.copies > 1 else None
        return StdlibText(**kwargs, share=share)

    _worker.train_module(args, SUITE, model, data, gradient_clip_val=1.0)


# ====================================================================== the plan
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    """The rows of a comma list; exits naming the unknown ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if not SUITE.knows(n)]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {[*ROWS, *SWEEP, SINGLE_PAR]} and any diloco_h<N>")
    return names


def _run(
    args: argparse.Namespace,
    names: list[str],
    devices: int,
    seed: int,
    logdir: Path,
    done: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every row of ``names`` once at ``devices`` ranks and ``seed``: ``name -> rank 0's JSON``.
    ``done``: rows already run with these settings (a sweep run, deterministic): reused, not rerun."""
    order = list(names)
    done = {k: v for k, v in (done or {}).items() if k in names}
    names = [n for n in names if n not in done]
    run_args = argparse.Namespace(**{**vars(args), "devices": devices, "seed": seed, "repeat": 1})
    run_args.worker_extra = _worker_extra(run_args)
    net, mode = compare.network(run_args)
    sub = logdir / f"n{devices}_s{seed}"
    sub.mkdir(parents=True, exist_ok=True)
    try:
        runs = compare.train_all(run_args, SUITE, names, sub, net, mode)
    finally:
        if net is not None:
            net.destroy()
    for k, res in done.items():
        print(f"{k}: the same run as {res['reused_from']} of the sweep (deterministic), reused")
    fresh = {n: {**r[0], "mode": mode, "seed": seed} for n, r in runs.items()}
    return {n: done[n] if n in done else fresh[n] for n in order}


def _relabel(res: dict[str, Any], name: str) -> dict[str, Any]:
    """A sweep run under another row's name (its validation rows too)."""
    return {
        **res,
        "strategy": name,
        "reused_from": res["strategy"],
        "rows": [{**r, "strategy": name} for r in res["rows"]],
    }


def _final_bpb(res: dict[str, Any]) -> float:
    return float(res["rows"][-1]["val_bpb"])


def sweep(args: argparse.Namespace, logdir: Path) -> tuple[dict[str, Any], tuple[float, float]]:
    """Run :data:`SWEEP` (smallest world size, first seed); the runs and the best (lr, momentum)."""
    devices, seed = _ints(args.world_sizes)[0], _ints(args.seeds)[0]
    runs = _run(args, list(SWEEP), devices, seed, logdir / "sweep")
    best = min(SWEEP_GRID, key=lambda lm: _final_bpb(runs[_sweep_name(*lm)]))
    print(f"\nouter sweep (DiLoCo H=64, {devices} ranks, seed {seed}): final val bpb")
    for lr, m in SWEEP_GRID:
        mark = "  <- best" if (lr, m) == best else ""
        print(f"  lr {lr:<4g} momentum {m:<4g}  {_final_bpb(runs[_sweep_name(lr, m)]):.4f}{mark}")
    return runs, best


# ====================================================================== the run
def runner(args: argparse.Namespace) -> None:
    """The plan: sweep (unless given), then every row at every world size and seed; outputs and report."""
    names = _names(args.strategies)
    if not args.no_single and SINGLE_PAR not in names:
        names.append(SINGLE_PAR)  # compute only: N processes training without talking
    name = args.name or ("lm_quick" if args.quick else "lm") + (f"_netns_{args.rate}" if args.netns else "")
    outdir = Path(args.out)
    logdir = outdir / "logs" / name
    logdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs: dict[tuple[int, int, str], dict[str, Any]] = {}
    reuse: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    if (
        args.outer_lr is None
        and not args.no_sweep
        and any(n.startswith("diloco") or n == "streaming_diloco" for n in names)
    ):
        sweep_runs, (args.outer_lr, args.outer_momentum) = sweep(args, logdir)
        devices, seed = _ints(args.world_sizes)[0], _ints(args.seeds)[0]
        runs.update({(devices, seed, k): r for k, r in sweep_runs.items()})
        best = sweep_runs[_sweep_name(args.outer_lr, args.outer_momentum)]
        reuse[(devices, seed)] = {"diloco_h64": _relabel(best, "diloco_h64")}
    elif args.outer_lr is None:
        args.outer_lr, args.outer_momentum = DEFAULT_OUTER["lr"], DEFAULT_OUTER["momentum"]
    print(f"DiLoCo rows: outer Nesterov SGD lr {args.outer_lr:g}, momentum {args.outer_momentum:g}")
    for n in _ints(args.world_sizes):
        here = names
        if n > 2 and args.four_rank_subset:
            here = [x for x in names if x in FOUR_RANK_ROWS or x == SINGLE_PAR]
        for seed in _ints(args.seeds):
            for k, r in _run(args, here, n, seed, logdir, reuse.get((n, seed))).items():
                runs[(n, seed, k)] = r
    _report(args, runs, name, outdir, t0, hidden=set(SWEEP))


def wall_runner(args: argparse.Namespace) -> None:
    """``--equal-wall``: every row at the training wall time of the ``*_auto`` row (:mod:`benchmarks._lm_wall`);
    no sweep (``--outer-lr/--outer-momentum``, else :data:`DEFAULT_OUTER`), no compute-only reference."""
    if args.outer_lr is None:
        args.outer_lr, args.outer_momentum = DEFAULT_OUTER["lr"], DEFAULT_OUTER["momentum"]
    print(f"DiLoCo rows: outer Nesterov SGD lr {args.outer_lr:g}, momentum {args.outer_momentum:g}")
    name = args.name or "lm_wall" + (f"_netns_{args.rate}" if args.netns else "")
    _lm_wall.runner(args, _run, _report, diloco_h, _names(args.strategies), name)


def _report(
    args: argparse.Namespace,
    runs: dict[tuple[int, int, str], dict[str, Any]],
    name: str,
    outdir: Path,
    t0: float,
    hidden: set[str],
    steps_words: str | None = None,
) -> None:
    """Summaries, the printed report (rows of ``hidden`` left out of it), the CSVs and the PNG;
    ``steps_words`` for the title where the rows ran different steps (their own in the table)."""
    tokens_per_step = args.batch_size * args.seq_len
    summary = _lm_report.summarize(runs, tokens_per_step)
    for s in summary:
        if s["strategy"] in LONG_SWEEP or (args.long and s["strategy"].startswith("diloco_h")):
            s["outer_lr"], s["outer_momentum"] = (
                runs[(s["world_size"], s["seed"], s["strategy"])].get("outer_lr", args.outer_lr),
                0.9,
            )
        else:
            s["outer_lr"], s["outer_momentum"] = args.outer_lr, args.outer_momentum
        s.update(runs[(s["world_size"], s["seed"], s["strategy"])].get("summary_extra", {}))
    val_rows = [
        {
            "world_size": n,
            "seed": seed,
            "mode": r["mode"],
            **row,
            "tokens_per_replica": row["step"] * tokens_per_step,
        }
        for (n, seed, _), r in runs.items()
        for row in r["rows"]
    ]
    steps = [
        {"world_size": n, "seed": seed, "strategy": k, **s}
        for (n, seed, k), r in runs.items()
        for s in r["steps"]
    ]
    n_params = next(iter(runs.values()))["n_params"]
    title = (
        f"{name}: GPT d_model={args.d_model} layers={args.n_layers} seq_len={args.seq_len} ({n_params} parameters), "
        f"batch {args.batch_size}/replica, {steps_words or f'{args.steps} steps'}, stdlib text ({'IID' if args.iid else 'non-IID'})"
    )
    outer = (
        "DiLoCo outer lr: the sweep's best per replicas and H (momentum 0.9)"
        if args.long
        else f"DiLoCo outer lr {args.outer_lr:g} momentum {args.outer_momentum:g}"
    )
    tokens = "" if steps_words else f"; tokens per replica {args.steps * tokens_per_step}"
    print(f"\n{title}{tokens}; {outer}")
    shown = [s for s in summary if s["strategy"] not in hidden]
    _lm_report.print_report(shown)
    if args.long:
        _lm_report.print_long_goals(shown, SCALING_LAW_35M_H30)
    if args.equal_wall:
        _lm_report.print_wall(shown)
    outdir.mkdir(parents=True, exist_ok=True)
    write_csv(outdir / f"{name}.csv", val_rows)
    write_csv(outdir / f"{name}_steps.csv", steps)
    write_csv(outdir / f"{name}_summary.csv", summary)
    shown_rows = [r for r in val_rows if r["strategy"] not in hidden]
    _lm_report.plot(
        shown_rows, outdir / f"{name}.png", title, "train_wall_s" if args.equal_wall else "wall_s"
    )
    print(
        f"\nwrote {outdir / name}.csv, {name}_steps.csv, {name}_summary.csv, {name}.png "
        f"(total {time.perf_counter() - t0:.0f}s)"
    )


def _logged(logdir: Path, devices: int, seed: int, names: list[str]) -> dict[str, Any]:
    """The rows of ``names`` that a run at ``devices`` ranks and ``seed`` left in ``logdir`` (rank 0's JSON)."""
    import json

    sub = logdir / f"n{devices}_s{seed}"
    found = {}
    for name in names:
        path = sub / f"{name}.r0.json"
        if path.exists():
            found[name] = {**json.loads(path.read_text()), "mode": "loopback", "seed": seed}
    return found


def long_runner(args: argparse.Namespace) -> None:
    """The long preset: per number of replicas, the first seed runs every row of :data:`LONG_SWEEP`
    beside :data:`LONG_ROWS` and the compute-only reference; the best lr of each H becomes the row
    ``diloco_h<H>`` there, and the other seeds run that lr only."""
    name = args.name or "lm_long" + ("_iid" if args.iid else "") + (
        f"_netns_{args.rate}" if args.netns else ""
    )
    outdir = Path(args.out)
    logdir = outdir / "logs" / name
    logdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    extra = _names(args.strategies or "")
    base = [*LONG_ROWS, *[n for n in extra if n not in LONG_ROWS], SINGLE_PAR]
    runs: dict[tuple[int, int, str], dict[str, Any]] = {}
    seeds = _ints(args.seeds)
    for n in _ints(args.world_sizes):
        best: dict[int, float] = {}
        for seed in seeds:
            diloco = list(LONG_SWEEP) if not best else [_long_name(h, best[h]) for h in LONG_H]
            if args.from_logs:  # the runs an earlier (possibly interrupted) run left in its logs
                got = _logged(logdir, n, seed, [*base, *diloco])
                if not all(_long_name(h, lr) in got for h in LONG_H for lr in LONG_LRS) and not best:
                    print(f"{n} replicas, seed {seed}: the sweep is not complete in the logs; skipped")
                    break
                if not best and "ddp" not in got:
                    break
            else:
                got = _run(args, [*base, *diloco], n, seed, logdir)
            if not got:
                continue
            for k, r in got.items():
                runs[(n, seed, k)] = r
            if not best:
                print(f"\nouter sweep at {n} replicas, seed {seed}: final val bpb")
                for h in LONG_H:
                    scores = {lr: _final_bpb(got[_long_name(h, lr)]) for lr in LONG_LRS}
                    best[h] = min(LONG_LRS, key=scores.__getitem__)
                    for lr in LONG_LRS:
                        mark = "  <- best" if lr == best[h] else ""
                        print(f"  H={h:<3} lr {lr:<4g} {_final_bpb(got[_long_name(h, lr)]):.4f}{mark}")
            for h in LONG_H:
                if _long_name(h, best[h]) in got:
                    row = {**_relabel(got[_long_name(h, best[h])], f"diloco_h{h}"), "outer_lr": best[h]}
                    runs[(n, seed, f"diloco_h{h}")] = row
    if not runs:
        sys.exit(f"no complete runs (logs: {logdir})")
    _report(args, runs, name, outdir, t0, hidden=set(LONG_SWEEP))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.lm``: see the module docstring and ``--help``."""
    args = build_parser().parse_args(argv)
    if args.steps is None:
        args.steps = 512 if args.quick else 2048 if args.long else 1024
    if args.worker is not None:
        _work(args)
        return
    if (args.outer_lr is None) != (args.outer_momentum is None):
        sys.exit("--outer-lr and --outer-momentum go together")
    if args.equal_wall and (args.long or args.quick):
        sys.exit("--equal-wall goes with neither --long nor --quick")
    if args.long:
        args.seeds = args.seeds or "0,1"
        args.world_sizes = args.world_sizes or "4,2"
        args.val_every = args.val_every or 256
        args.timeout = max(args.timeout, 3600)
        args.outer_lr = args.outer_momentum = None
        long_runner(args)
        return
    args.seeds = args.seeds or ("0" if args.quick else "0,1")
    args.world_sizes = args.world_sizes or ("2" if args.quick else "2,4")
    args.val_every = args.val_every or (64 if args.quick else 128)
    args.four_rank_subset = args.strategies is None and not args.quick
    if args.strategies is None:
        args.strategies = ",".join(QUICK if args.quick else WALL_ROWS if args.equal_wall else ROWS)
    if args.quick:  # no compute-only reference, no sweep: DEFAULT_OUTER unless given
        args.no_single = args.no_sweep = True
    (wall_runner if args.equal_wall else runner)(args)


if __name__ == "__main__":
    main()
