"""One runner for all strategy comparisons: same model, same data, same seed, several strategies.

    python -m benchmarks.run --quick            # ddp, torch_avg, local_sgd, post_local_sgd, diloco, ... (+ single)
    python -m benchmarks.run --outer            # ddp, local_sgd, diloco, streaming_diloco, co2, noloco
    python -m benchmarks.run                    # every strategy, 1024 steps
    python -m benchmarks.run --quick --netns --rate 100mbit   # each rank its own host (root only)
    python -m benchmarks.run --strategies ddp,local_sgd_h32 --steps 640 --devices 4
    sudo python -m benchmarks.run --netns --rate 100mbit --hidden 1024 --no-single --steps 256 --val-every 256
        --strategies ddp,diloco_h16,diloco_auto,single_par --name mlp_netns_100mbit   # (one command line)
    python -m benchmarks.project --check benchmarks/results/mlp_netns_100mbit_summary.csv

The comparison of the library's strategies with DDP and PyTorch's own periodic model averaging:
the rows of :data:`benchmarks.rows.STRATEGIES`, then the gossip rows of :mod:`benchmarks.gossip`.
Every strategy is trained in a fresh subprocess (``python -m benchmarks.run --worker <name>``) that
starts a multi-process Lightning run (``accelerator="cpu", devices=N``, Lightning's default popen
launcher); in ``--netns`` mode the runner starts one process per rank itself, each inside its own
network namespace, with Lightning's multi-node environment variables and
``Trainer(num_nodes=N, devices=1)``. A ``single`` run (one process, ``strategy="auto"``) is the
reference for the per-step overhead. Every worker uses ``torch.set_num_threads(1)``. The runner
itself is :mod:`benchmarks.compare`.

The rows of :data:`benchmarks.rows.BY_NAME` (``diloco_h16``, ``diloco_auto``) run only when
``--strategies`` names them: with the compute-only reference ``single_par`` and ``--hidden 1024``
(the 1.1M-parameter MLP, 4.5 MB in fp32) behind ``--netns`` links, the summary has every column
``python -m benchmarks.project --check`` reads (``n_params``, ``seed``, ``syncs``,
``sync_bytes_sent``, ``mean_step_ms``, ``median_nonsync_step_ms``, ``compute_only_step_ms``, mode
``netns-<rate>``): the planner's prediction against the MLP's measured step time.

Outputs in ``--out`` (default ``benchmarks/results/``): ``<name>.csv`` (one row per validation per
strategy), ``<name>_steps.csv`` (the time of every training step), ``<name>_summary.csv`` (the
printed table) and ``<name>.png`` (val loss vs optimizer steps, vs bytes sent per replica, vs wall
time). See ``benchmarks/README.md`` for what each column means.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks import compare, gossip, rows
from benchmarks.harness import ONE_PROCESS_LOCAL_SGD, Suite

__all__ = ["OUTER_STRATEGIES", "QUICK_STRATEGIES", "SUITE", "main"]

QUICK_STRATEGIES = (
    "ddp",
    "torch_avg",
    "local_sgd",
    "post_local_sgd",
    ONE_PROCESS_LOCAL_SGD,
    "diloco",
    "streaming_diloco",
    "co2",
    "noloco",
)
#: the outer-optimizer comparison (issue 3): DDP, Local SGD, DiLoCo, streaming DiLoCo, CO2, NoLoCo
OUTER_STRATEGIES = (
    "ddp",
    "local_sgd",
    "diloco",
    "diloco_paper",
    "streaming_diloco",
    "co2",
    "co2_paper",
    "noloco",
)

#: every row runnable by ``python -m benchmarks.run``; the default run is all of ``strategies``
SUITE = Suite(
    strategies={**rows.STRATEGIES, **gossip.STRATEGIES},
    extra={**gossip.EXTRA_STRATEGIES, **rows.BY_NAME},
    worker_module="benchmarks.run",
    quick=QUICK_STRATEGIES,
    outer=OUTER_STRATEGIES,
    prog="python -m benchmarks.run",
    description=__doc__.split("\n\n")[0],
)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.run``: see the module docstring and ``--help``."""
    compare.main(argv, SUITE)


if __name__ == "__main__":
    main()
