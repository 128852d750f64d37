"""Curriculum benchmark: Local SGD with and without a curriculum on non-IID digits, alpha in {0.1, 1, 100}.

    python -m benchmarks.curriculum                  # 4 ranks, 320 steps, alphas 0.1,1,100, 2 seeds (~6 min)
    python -m benchmarks.curriculum --seeds 1 --steps 160 --alphas 0.1,100    # a quick look

The question is the finding of Vahidian et al., "When Do Curricula Work in Federated Learning?"
(ICCV 2023): curricula help more the more non-IID the data. Every run is the same digits MLP
(``examples.digits``) under ``LocalSGDStrategy(sync_every=8)`` on 4 gloo ranks, each rank sampling
its own ``Dirichlet(alpha)`` part through a ``PartitionSampler``; the arms differ only in the
order each replica draws its part:

* ``plain`` — shuffled, every sample visible from the start;
* ``curriculum`` — ``Curriculum("given", "curriculum", "linear", a=0.8, b=0.2)``: easiest first,
  by the per-sample losses of a fixed expert (the same MLP trained centrally for 2 epochs on the
  whole training set before the runs, as the paper's expert scoring; computed once in the parent
  and handed to every run as given scores, the same numbers ``score_by="reference"`` would compute);
* ``anti`` — the same scores, hardest first;
* ``random`` — a random ordering under the same pacing (only the pacing, no difficulty);
* ``global`` — easiest first by the *consensus* model's loss, re-scored every epoch.

Validation (on the consensus model, the full validation split) every 32 steps. Outputs in
``benchmarks/results/``: ``curriculum.csv`` (every validation of every run), ``curriculum_summary.csv``
(per alpha and arm: final and mean-over-the-run validation loss, mean over seeds, and the ratio to
``plain``) and ``curriculum.png`` (validation loss vs steps, one panel per alpha).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import DEFAULT_OUT, run_command, write_csv

ARMS = ("plain", "curriculum", "anti", "random", "global")


def _curriculum(arm: str, reference: Any) -> Any:
    import lightning_fedopt as lf

    pacing = {"pacing": "linear", "a": 0.8, "b": 0.2}
    if arm == "plain":
        return None
    if arm == "global":
        return lf.callbacks.Curriculum(
            "consensus", "curriculum", rescore_every=1, progress_bar=False, **pacing
        )
    if arm == "random":
        return lf.callbacks.Curriculum("given", "random", scores=reference["scores"], **pacing)
    return lf.callbacks.Curriculum("given", arm, scores=reference["scores"], **pacing)


def expert_scores(seed: int, hidden: int, epochs: int = 2) -> list[float]:
    """Per-sample losses of the training set under an expert trained centrally for ``epochs``."""
    import torch
    from torch import nn

    from examples.digits import DigitsClassifier, load_digits_tensors

    torch.manual_seed(seed)
    train, _ = load_digits_tensors(seed)
    model = DigitsClassifier(hidden=hidden)
    opt = model.configure_optimizers()
    x, y = train.tensors
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y, reduction="none").tolist()


def worker(args: argparse.Namespace) -> None:
    """One run (one arm, one alpha, one seed); rank 0 writes JSON to ``args.out``."""
    from benchmarks import _worker  # imports Lightning: only in worker processes

    _worker.one_thread()
    import lightning as L

    import lightning_fedopt as lf
    from examples.digits import DigitsClassifier, DigitsDataModule

    reference = json.loads(Path(args.reference).read_text())
    L.seed_everything(args.seed, workers=True, verbose=False)
    recorder = _worker.ValLossRecorder()
    callbacks: list[Any] = [recorder]
    curriculum = _curriculum(args.worker, reference)
    if curriculum is not None:
        callbacks.append(curriculum)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedopt-curriculum-") as root:
        trainer = _worker.digits_trainer(
            strategy=lf.LocalSGDStrategy(sync_every=args.sync_every),
            devices=args.devices,
            steps=args.steps,
            val_every=args.val_every,
            callbacks=callbacks,
            root=root,
        )
        data = DigitsDataModule(batch_size=args.batch_size, seed=args.seed, alpha=args.alpha, curriculum=True)
        trainer.fit(DigitsClassifier(hidden=args.hidden, lr=args.lr), data)
    if trainer.is_global_zero:
        result = {
            "arm": args.worker,
            "alpha": args.alpha,
            "seed": args.seed,
            "rows": recorder.rows,
            "wall_s": time.perf_counter() - start,
            "score_seconds": getattr(curriculum, "score_seconds", 0.0),
        }
        Path(args.out).write_text(json.dumps(result))


def _run_one(args: argparse.Namespace, arm: str, alpha: float, seed: int, reference: Path, tmp: Path) -> dict:
    out = tmp / f"{arm}_{alpha}_{seed}.json"
    cmd = [
        "--worker",
        arm,
        "--out",
        str(out),
        "--reference",
        str(reference),
        "--alpha",
        str(alpha),
        "--seed",
        str(seed),
        *(
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("devices", "steps", "val_every", "sync_every")
        ),
        *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("hidden", "lr", "batch_size")),
    ]
    log = tmp / f"{arm}_{alpha}_{seed}.log"
    run_command(f"{arm} alpha={alpha} seed={seed}", "benchmarks.curriculum", cmd, log, args.timeout)
    return json.loads(out.read_text())


def summarise(results: list[dict]) -> list[dict[str, Any]]:
    """Per (alpha, arm): final and mean-over-the-run val loss (mean over seeds), ratios to plain."""
    import statistics

    table: dict[tuple[float, str], dict[str, list[float]]] = {}
    for r in results:
        losses = [row["val_loss"] for row in r["rows"]]
        cell = table.setdefault((r["alpha"], r["arm"]), {"final": [], "mean": [], "wall": [], "score": []})
        cell["final"].append(losses[-1])
        cell["mean"].append(statistics.fmean(losses))
        cell["wall"].append(r["wall_s"])
        cell["score"].append(r["score_seconds"])
    out = []
    for (alpha, arm), cell in sorted(table.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][1]))):
        plain = table.get((alpha, "plain"))
        final, mean = statistics.fmean(cell["final"]), statistics.fmean(cell["mean"])
        out.append(
            {
                "alpha": alpha,
                "arm": arm,
                "seeds": len(cell["final"]),
                "final_val_loss": final,
                "mean_val_loss": mean,
                "final_vs_plain": final / statistics.fmean(plain["final"]) if plain else float("nan"),
                "mean_vs_plain": mean / statistics.fmean(plain["mean"]) if plain else float("nan"),
                "wall_s": statistics.fmean(cell["wall"]),
                "score_s": statistics.fmean(cell["score"]),
            }
        )
    return out


def plot(results: list[dict], alphas: Sequence[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 4), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        for arm in ARMS:
            runs = [r for r in results if r["alpha"] == alpha and r["arm"] == arm]
            if not runs:
                continue
            steps = [row["step"] for row in runs[0]["rows"]]
            mean = [sum(r["rows"][i]["val_loss"] for r in runs) / len(runs) for i in range(len(steps))]
            ax.plot(steps, mean, label=arm, marker=".")
        ax.set_title(f"Dirichlet alpha = {alpha:g}")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("validation loss (consensus)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.curriculum", description=__doc__.split("\n\n")[0])
    p.add_argument("--alphas", default="0.1,1,100")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--val-every", type=int, default=32)
    p.add_argument("--sync-every", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default="curriculum")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    p.add_argument("--alpha", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    alphas = [float(a) for a in args.alphas.split(",")]
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        sys.exit(f"unknown arm(s) {sorted(unknown)}; choose from {ARMS}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedopt-curriculum-") as tmp_name:
        tmp = Path(tmp_name)
        for seed in range(args.seeds):
            reference = tmp / f"expert{seed}.json"
            reference.write_text(json.dumps({"scores": expert_scores(seed, args.hidden)}))
            for alpha in alphas:
                for arm in arms:
                    t0 = time.perf_counter()
                    r = _run_one(args, arm, alpha, seed, reference, tmp)
                    results.append(r)
                    print(
                        f"alpha={alpha:<5g} seed={seed} {arm:<10s} final val loss {r['rows'][-1]['val_loss']:.4f} "
                        f"({time.perf_counter() - t0:.1f} s)",
                        flush=True,
                    )
    rows = [
        {
            "alpha": r["alpha"],
            "arm": r["arm"],
            "seed": r["seed"],
            "step": row["step"],
            "val_loss": row["val_loss"],
        }
        for r in results
        for row in r["rows"]
    ]
    write_csv(out_dir / f"{args.name}.csv", rows)
    summary = summarise(results)
    write_csv(out_dir / f"{args.name}_summary.csv", summary)
    print(
        f"\n{'alpha':>6} {'arm':<11} {'final':>8} {'vs plain':>9} {'mean':>8} {'vs plain':>9} {'score s':>8}"
    )
    for s in summary:
        print(
            f"{s['alpha']:>6g} {s['arm']:<11} {s['final_val_loss']:>8.4f} {s['final_vs_plain']:>9.3f} "
            f"{s['mean_val_loss']:>8.4f} {s['mean_vs_plain']:>9.3f} {s['score_s']:>8.2f}"
        )
    for metric in ("final", "mean"):
        ratios = {
            a: next(
                (s[f"{metric}_vs_plain"] for s in summary if s["alpha"] == a and s["arm"] == "curriculum"),
                None,
            )
            for a in alphas
        }
        if any(v is None for v in ratios.values()) or len(alphas) < 2:
            continue
        ordered = [ratios[a] for a in sorted(alphas)]
        helps = [a for a in sorted(alphas) if ratios[a] < 1.0]
        print(
            f"\ncurriculum / plain, {metric} val loss, by alpha: "
            + ", ".join(f"{a:g}: {ratios[a]:.3f}" for a in sorted(alphas))
            + f"\n  the curriculum helps (ratio < 1) at alpha: {', '.join(f'{a:g}' for a in helps) or 'none'}"
            + "\n  its relative effect is best at the most non-IID alpha and worsens as alpha grows: "
            + ("yes" if all(x <= y for x, y in itertools.pairwise(ordered)) else "no")
        )
    plot(results, alphas, out_dir / f"{args.name}.png")
    print(f"wrote {out_dir / (args.name + '.csv')} and {out_dir / (args.name + '_summary.csv')}")


if __name__ == "__main__":
    main()
