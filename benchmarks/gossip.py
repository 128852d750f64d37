"""Gossip benchmark: decentralised training over topologies against DDP, on non-IID digits.

    python -m benchmarks.gossip                 # 4 ranks, Dirichlet(0.3) label skew, 320 steps
    python -m benchmarks.gossip --steps 640 --alpha 0.1
    python -m benchmarks.gossip --robust        # 1 of 4 replicas sends sign-flipped / huge updates

One run of the harness (:mod:`benchmarks.compare`: same model, data and seed for every strategy; each
strategy in its own subprocess with 4 gloo ranks) compares

* ``ddp`` — the gradient all-reduce baseline;
* ``gossip_ring``, ``gossip_exp``, ``gossip_onepeer`` — decentralised SGD, one gossip step after every
  optimizer step, on a ring, the static exponential graph and the one-peer exponential graph;
* ``gossip_sparse_merge`` — "A Single Merging Suffices" (arXiv 2507.06542): a ring gossip step every
  16 steps, then a single global merge at the end of training;
* ``gossip_truncate`` — the same, but every round from 90% of training on is a global merge;
* ``one_shot_merge`` — no communication at all until the single final merge (Local SGD with one round).

Validation runs on the consensus (the replicas' mean), so a row's loss is that of the model the
final merge produces. Besides the harness's table it prints, per strategy, the final validation
loss relative to DDP and the bytes each replica sent for training: the gossip rounds plus one final
merge (an all-reduce of the model under the cost model of :mod:`lightning_fedopt.comm`), without
the consensus computed for intermediate validations.

``--robust`` runs the Byzantine experiment on real processes: fully connected gossip every 4 steps
with ``merge`` = mean, trimmed mean (f=1) or NNA (f=1) while rank 3 sends its round's update
sign-flipped (x4) or blown up (x100); the reported loss is the mean over the replicas of each
replica's own model (``evaluate="local"``; the attacker merges honestly, it only lies in what it sends).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import compare
from benchmarks.harness import DEFAULT_OUT, Row, Suite, read_summary, write_csv
from benchmarks.rows import STRATEGIES as LIBRARY_ROWS
from benchmarks.rows import lf_row


def _gossip(topology: str, gossip_every: int, **kwargs: Any) -> Callable[[], Any]:
    return lf_row("GossipStrategy", topology=topology, gossip_every=gossip_every, **kwargs)


#: name -> (description, factory): the topology comparison (also rows of ``python -m benchmarks.run``)
STRATEGIES: dict[str, Row] = {
    "gossip_ring": ("GossipStrategy('ring', gossip_every=1)", _gossip("ring", 1)),
    "gossip_exp": ("GossipStrategy('exponential', gossip_every=1)", _gossip("exponential", 1)),
    "gossip_onepeer": (
        "GossipStrategy('one_peer_exponential', gossip_every=1)",
        _gossip("one_peer_exponential", 1),
    ),
    "gossip_sparse_merge": (
        "GossipStrategy('ring', gossip_every=16) + one global merge at the end",
        _gossip("ring", 16),
    ),
    "gossip_truncate": (
        "GossipStrategy('ring', gossip_every=16, merge_from=0.9): global merges in the last 10%",
        _gossip("ring", 16, merge_from=0.9),
    ),
    "one_shot_merge": (
        "LocalSGDStrategy: no communication, one merge at the end",
        lf_row("LocalSGDStrategy", sync_every=10**9),  # never before the final merge
    ),
}
COMPARISON = ("ddp", *STRATEGIES)
#: their last round (at the last step, a multiple of 16) is a global merge: no final merge follows
_LAST_ROUND_IS_MERGE = {"gossip_truncate"}

ATTACKER = 3
#: attack -> the factor the attacker multiplies its round's update by (None: no attack)
ATTACK_FACTORS: dict[str, float | None] = {"none": None, "sign_flip": -4.0, "huge": 100.0}
ATTACKS = tuple(ATTACK_FACTORS)
ROBUST_MERGES = ("mean", "trimmed_mean", "nna")


def _byzantine(merge: str, attack: str) -> Any:
    import lightning_fedopt as lf
    from benchmarks._byzantine import ByzantineGossip

    kwargs = {"f": 1} if merge != "mean" else {}
    return ByzantineGossip(
        "fully_connected",
        4,
        merge=lf.Merge(merge, **kwargs),
        evaluate="local",
        final_sync=False,
        factor=ATTACK_FACTORS[attack],
        attacker=ATTACKER,
    )


#: runnable by name (``--robust``), not in the default lists: they need 4 ranks
EXTRA_STRATEGIES: dict[str, Row] = {
    f"byz_{m}_{a}": (
        f"fully connected gossip every 4 steps, merge={m!r}, rank {ATTACKER} attack={a!r}",
        lambda m=m, a=a: _byzantine(m, a),
    )
    for m in ROBUST_MERGES
    for a in ATTACKS
}


def _payload_bytes(hidden: int) -> int:
    """fp32 bytes of DigitsClassifier(hidden): 64 -> hidden -> hidden -> 10."""
    return 4 * (64 * hidden + hidden + hidden * hidden + hidden + hidden * 10 + 10)


def report_comparison(outdir: Path, name: str, devices: int, hidden: int) -> list[dict[str, Any]]:
    from lightning_fedopt.comm import cost_model

    summary = read_summary(outdir / f"{name}_summary.csv")
    ddp = summary["ddp"]
    ddp_loss, ddp_bytes = float(ddp["final_val_loss"]), int(ddp["sync_bytes_sent"])
    merge_bytes = cost_model("all_reduce", _payload_bytes(hidden) + 12, devices)[0]  # + 3 float32 counters
    rows = []
    for strat, row in summary.items():
        sync = int(row["sync_bytes_sent"])
        train_bytes = sync if strat == "ddp" or strat in _LAST_ROUND_IS_MERGE else sync + merge_bytes
        rows.append(
            {
                "strategy": strat,
                "final_val_loss": float(row["final_val_loss"]),
                "val_loss_vs_ddp": float(row["final_val_loss"]) / ddp_loss,
                "final_val_acc": float(row["final_val_acc"]),
                "train_bytes_per_replica": train_bytes,
                "bytes_vs_ddp": train_bytes / ddp_bytes,
                "counted_bytes_sent": int(row["bytes_sent"]),
                "wall_s": float(row["wall_s"]),
            }
        )
    print(f"\n=== {name}: final (merged) model vs DDP, {devices} replicas ===")
    head = f"{'strategy':<20} {'val_loss':>8} {'vs DDP':>7} {'val_acc':>7} {'MB/replica':>10} {'vs DDP':>7} {'wall s':>6}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['strategy']:<20} {r['final_val_loss']:>8.4f} {r['val_loss_vs_ddp']:>7.3f} {r['final_val_acc']:>7.3f} "
            f"{r['train_bytes_per_replica'] / 1e6:>10.3f} {r['bytes_vs_ddp']:>7.3f} {r['wall_s']:>6.1f}"
        )
    print(
        "MB/replica: bytes a replica sent for training (DDP: gradient all-reduces; gossip: its gossip rounds and "
        f"global merges plus one final merge, {merge_bytes / 1e6:.3f} MB under the ring all-reduce cost model); "
        "the consensus computed for intermediate validations is left out (it is in counted_bytes_sent)."
    )
    _write(outdir / f"{name}_gossip.csv", rows)
    return rows


def report_robust(outdir: Path, name: str) -> list[dict[str, Any]]:
    summary = read_summary(outdir / f"{name}_summary.csv")
    clean = {m: float(summary[f"byz_{m}_none"]["final_val_loss"]) for m in ROBUST_MERGES}
    rows = []
    print(f"\n=== {name}: rank {ATTACKER} of 4 attacks; mean over replicas of each own model's val loss ===")
    head = f"{'merge':<13} {'attack':<10} {'val_loss':>10} {'vs no-attack mean':>18} {'vs own no-attack':>17}"
    print(head + "\n" + "-" * len(head))
    for m in ROBUST_MERGES:
        for a in ATTACKS:
            loss = float(summary[f"byz_{m}_{a}"]["final_val_loss"])
            rows.append(
                {
                    "merge": m,
                    "attack": a,
                    "val_loss": loss,
                    "vs_no_attack_mean": loss / clean["mean"],
                    "vs_own_no_attack": loss / clean[m],
                }
            )
            print(
                f"{m:<13} {a:<10} {loss:>10.4g} {loss / clean['mean'] - 1:>+17.1%} {loss / clean[m] - 1:>+16.1%}"
            )
    _write(outdir / f"{name}_table.csv", rows)
    return rows


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    write_csv(path, rows)
    print(f"wrote {path}")


#: the suite of this benchmark's workers: the library's rows (``ddp``, ...), the topology rows, the
#: Byzantine rows (the rows of ``python -m benchmarks.run``, as before this suite had its own workers)
SUITE = Suite(
    strategies={**LIBRARY_ROWS, **STRATEGIES},
    extra=EXTRA_STRATEGIES,
    worker_module="benchmarks.gossip",
    prog="python -m benchmarks.gossip",
    description="The harness run of python -m benchmarks.gossip (see benchmarks/compare.py).",
)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.gossip``: see the module docstring and ``--help``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        compare.main(argv, SUITE)
        return
    p = argparse.ArgumentParser(prog="python -m benchmarks.gossip", description=__doc__.split("\n\n")[0])
    p.add_argument("--robust", action="store_true", help="the Byzantine-replica experiment instead")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="default 320 (robust: 160)")
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew (comparison only)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default=None)
    args, rest = p.parse_known_args(argv)
    if args.robust:
        if args.devices != 4:
            sys.exit("--robust runs on 4 ranks")
        name = args.name or "gossip_robust"
        steps = args.steps or 160
        strategies = ",".join(EXTRA_STRATEGIES)
        extra = ["--val-every", str(steps)]
    else:
        name = args.name or "gossip"
        steps = args.steps or 320
        strategies = ",".join(COMPARISON)
        extra = ["--alpha", str(args.alpha)]
    compare.main(
        [
            "--strategies",
            strategies,
            "--devices",
            str(args.devices),
            "--steps",
            str(steps),
            "--hidden",
            str(args.hidden),
            "--no-single",
            "--out",
            args.out,
            "--name",
            name,
            *extra,
            *rest,
        ],
        SUITE,
    )
    if args.robust:
        report_robust(Path(args.out), name)
    else:
        report_comparison(Path(args.out), name, args.devices, args.hidden)


if __name__ == "__main__":
    main()
