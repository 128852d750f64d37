"""``python -m lightning_fedopt.plan``: the planner's table (or JSON) from the command line.

    python -m lightning_fedopt.plan --params 1e9 --replicas 8 --link 1gbit --latency 20ms --step-time 0.5
    python -m lightning_fedopt.plan --params 1.2B --replicas 16 --link 10Gbit/s --flops 2e14 \\
        --tokens-per-step 65536 --strategies diloco,streaming_diloco --compressors none,int8,int4
    python -m lightning_fedopt.plan --params 124672 --replicas 4 --link 100mbit --step-time 31ms --json

Every argument is checked; a bad one ends the command with exit status 2 and a message naming it
and its allowed range (the ``ValueError`` of :func:`~lightning_fedopt.plan.plan`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_fedopt.plan.codecs import TOPOLOGY_DEGREES
from lightning_fedopt.plan.planner import DEFAULT_COMPRESSORS, STRATEGIES, Plan, plan

__all__ = ["build_parser", "main", "run"]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (values are checked by :func:`~lightning_fedopt.plan.plan`)."""
    p = argparse.ArgumentParser(
        prog="python -m lightning_fedopt.plan",
        description="Which H and which compressor for my model on my link? Bytes, seconds and "
        "exposed communication per strategy and compressor, and the smallest H within a budget.",
    )
    p.add_argument("--params", required=True, help="parameters of the model: 1e9, 1.2B, 350M, 124672")
    p.add_argument("--replicas", required=True, type=int, help="N, replicas (>= 2)")
    p.add_argument("--link", required=True, help="each replica's link rate: 100mbit, 1gbit, 10Gbit/s")
    p.add_argument("--latency", default="0", help="latency per hop: 20ms, 0.5ms, seconds (default 0)")
    p.add_argument("--efficiency", type=float, default=1.0, help="achieved share of the link rate, (0, 1]")
    p.add_argument(
        "--overhead",
        default=None,
        help="fixed seconds of a synchronisation round beyond bytes and hops (15ms; measured, default 0)",
    )
    p.add_argument(
        "--measured-round",
        default=None,
        help="instead of --overhead: seconds one uncompressed DiLoCo round took at these replicas on this "
        "link (sync_every='auto' logs it as measured_sync_seconds); the overhead is fitted to it",
    )
    p.add_argument("--step-time", default=None, help="compute time of one optimizer step: 0.5, 500ms")
    p.add_argument(
        "--flops", type=float, default=None, help="achieved FLOP/s of one replica (with --tokens-per-step)"
    )
    p.add_argument("--tokens-per-step", type=float, default=None, help="tokens per replica per step")
    p.add_argument(
        "--budget", type=float, default=0.05, help="exposed communication share to stay within (0.05)"
    )
    p.add_argument("--every", type=int, default=None, help="also show each row's exposed share at this H")
    p.add_argument("--max-every", type=int, default=100_000, help="the largest H considered")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="the run's optimizer steps: H at most steps // --min-rounds, as sync_every='auto'",
    )
    p.add_argument(
        "--min-rounds", type=int, default=32, help="the fewest rounds over --steps (32; 0: the budget alone)"
    )
    p.add_argument(
        "--strategies", default=",".join(STRATEGIES), help=f"comma-separated, of {','.join(STRATEGIES)}"
    )
    p.add_argument(
        "--compressors",
        default=",".join(DEFAULT_COMPRESSORS),
        help="comma-separated: none, fp16, bf16, int8[:block], int4[:block], sign, topk[:density], "
        "sparseloco[:density]",
    )
    p.add_argument("--fragments", type=int, default=4, help="streaming DiLoCo's F (4)")
    p.add_argument("--sync-delay", type=int, default=1, help="streaming DiLoCo's tau (1)")
    p.add_argument(
        "--topology", default="ring", help=f"gossip's topology, one of {', '.join(TOPOLOGY_DEGREES)}"
    )
    p.add_argument("--gossip-steps", type=int, default=1, help="gossip steps a round (1)")
    p.add_argument(
        "--ddp-overlap", type=float, default=0.0, help="share of DDP's compute its all-reduce hides behind"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def run(argv: Sequence[str] | None = None) -> Plan:
    """Parse ``argv`` and return the :class:`~lightning_fedopt.plan.Plan` (``ValueError`` for a bad
    value; argparse's ``SystemExit`` for a malformed command line)."""
    return _plan(build_parser().parse_args(argv))


def _plan(a: argparse.Namespace) -> Plan:
    return plan(
        a.params,
        a.replicas,
        a.link,
        a.step_time,
        latency=a.latency,
        efficiency=a.efficiency,
        overhead=a.overhead,
        measured_round=a.measured_round,
        flops=a.flops,
        tokens_per_step=a.tokens_per_step,
        budget=a.budget,
        strategies=_csv(a.strategies),
        compressors=_csv(a.compressors),
        fragments=a.fragments,
        sync_delay=a.sync_delay,
        topology=a.topology,
        gossip_steps=a.gossip_steps,
        ddp_overlap=a.ddp_overlap,
        every=a.every,
        max_every=a.max_every,
        steps=a.steps,
        min_rounds=a.min_rounds or None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan (``--json``: as JSON); return 0, or exit with status 2 naming a bad argument."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = _plan(args)
    except ValueError as e:
        parser.error(str(e))
    print(result.to_json() if args.json else result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
