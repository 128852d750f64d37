"""Convergence of compressed communication on the digits task: one run, side by side.

    python -m benchmarks.compression              # the rows below, 1024 steps, 2 ranks
    python -m benchmarks.compression --quick      # 320 steps
    python -m benchmarks.compression --strategies ddp,int8,dgc --steps 640
    python -m benchmarks.compression --dgc        # DGC's setting: momentum SGD, 1.1M parameters

It is the harness of ``python -m benchmarks.run`` (:mod:`benchmarks.compare`: same model, data, seed,
subprocess per strategy, CSV + PNG + table in ``benchmarks/results/compression*``) with the rows of
:data:`ROWS` added (:data:`SUITE`; its workers run this module). A new row is one more entry ``"name": ("description", factory)``, e.g.
``"diloco_int4"``: ``DiLoCoStrategy(sync_every=64, compressor="int4")``.

At the end it prints the issue's goals against DDP: final validation loss (relative) and bytes
per replica (all traffic, and the gradient/sync part).

``--dgc`` runs :data:`DGC_ROWS` instead: DDP and DGC at 0.1% in DGC's own setting (momentum SGD with a
cosine schedule, the momentum moved into the compressor for DGC) on ``DigitsClassifier(hidden=1024)``.
On the default 26k-parameter AdamW model 0.1% is 26 values a step, too few for any top-k method.

``powersgd`` is PyTorch's own ``powerSGD_hook`` (rank 2, error feedback, warm start, plain
all-reduce for the first 10 steps) registered on DDP; torch calls ``torch.distributed`` itself, so
its bytes come from the cost model of the all-reduces the hook makes (``bytes_source = "cost model"``).
"""

# no ``from __future__ import annotations``: DDP checks the comm hook's annotations at registration

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed import GradBucket
from typing_extensions import override

import lightning_fedopt as lf
from benchmarks import compare, run
from benchmarks.harness import DEFAULT_OUT, REFERENCES, Row, read_summary
from benchmarks.rows import DILOCO_OUTER, lf_row
from lightning_fedopt.comm import Communicator

DEFAULT_ROWS = (
    "ddp",
    "int8",
    "sign_ef",
    "topk",
    "dgc",
    "topk_1pct",
    "dgc_1pct",
    "powersgd",
    "local_sgd",
    "local_sgd_int8",
    "local_sgd_int4",
    "local_sgd_h64_int4",
    "diloco",
    "diloco_int8",
    "diloco_int4",
    "diloco_int4_check",
)


def _compressed_ddp(**kw: Any) -> Any:
    return lf.CompressedDDPStrategy(**kw)


def _diloco(**kw: Any) -> Callable[[], Any]:
    """The harness's ``diloco`` row (:mod:`benchmarks.rows`) with ``kw`` on top."""
    return lf_row("DiLoCoStrategy", sync_every=64, outer_kwargs=DILOCO_OUTER, **kw)


def _topk(**kw: Any) -> Any:
    from lightning_fedopt.compression import TopK

    return TopK(**kw)


def counted_powersgd_hook(
    state: tuple[Any, Communicator], bucket: GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """PyTorch's ``powerSGD_hook``, with the bytes of the all-reduces it makes counted by the cost model."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

    ps_state, comm = state
    item = bucket.buffer().element_size()
    if ps_state.iter < ps_state.start_powerSGD_iter:
        comm.account("all_reduce", bucket.buffer().numel() * item, purpose="sync")
    else:
        uncompressed = p_size = q_size = 0
        for t in bucket.gradients():
            n, m = t.view(t.shape[0], -1).shape
            r = min(n, m, ps_state.matrix_approximation_rank)
            if ps._should_compress(n, m, r, ps_state.min_compression_rate)[0]:
                p_size, q_size = p_size + n * r, q_size + m * r
            else:
                uncompressed += t.numel()
        for numel in (uncompressed, p_size, q_size):  # three all-reduces (the first one may be empty)
            if numel:
                comm.account("all_reduce", numel * item, purpose="sync")
    return ps.powerSGD_hook(ps_state, bucket)


class PowerSGDStrategy(lf.MeteredDDPStrategy):
    """MeteredDDPStrategy with PyTorch's PowerSGD hook instead of the plain counted all-reduce.

    Args:
        approximation_rank: ``matrix_approximation_rank``: the rank of the low-rank approximation.
        start_iter: ``start_powerSGD_iter``: plain all-reduces before it.
        **kwargs: :class:`lightning_fedopt.MeteredDDPStrategy`'s arguments.
    """

    bytes_source = "cost model"

    def __init__(self, approximation_rank: int = 2, start_iter: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.approximation_rank = approximation_rank
        self.start_iter = start_iter

    @override
    def _register_ddp_hooks(self) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

        state = PowerSGDState(
            process_group=None,
            matrix_approximation_rank=self.approximation_rank,
            start_powerSGD_iter=self.start_iter,
            use_error_feedback=True,
            warm_start=True,
            random_seed=0,
        )
        self.model.register_comm_hook((state, self.comm), counted_powersgd_hook)  # type: ignore[union-attr]


#: name -> (description, factory): the rows this benchmark adds to ``run.SUITE``
ROWS: dict[str, Row] = {
    "int8": (
        "CompressedDDPStrategy(Int8(block=256)): int8 gradients",
        lambda: _compressed_ddp(compressor="int8"),
    ),
    "sign_ef": (
        "CompressedDDPStrategy(Sign()): 1-bit gradients, worker+server error feedback",
        lambda: _compressed_ddp(compressor="sign"),
    ),
    "topk": (
        "CompressedDDPStrategy(TopK(density=0.001)): top-0.1% with error feedback, no momentum correction",
        lambda: _compressed_ddp(compressor=_topk(density=0.001)),
    ),
    "dgc": (
        "CompressedDDPStrategy(TopK(0.001, momentum=0.9, warm-up densities 0.25/0.063/0.015/0.004 x 10 steps)): DGC",
        lambda: _compressed_ddp(
            compressor=_topk(
                density=0.001, momentum=0.9, warmup_densities=(0.25, 0.063, 0.015, 0.004), warmup_steps=10
            )
        ),
    ),
    "dgc_1pct": (
        "DGC at 1% density (same warm-up): the density the 26k-parameter model needs",
        lambda: _compressed_ddp(
            compressor=_topk(
                density=0.01, momentum=0.9, warmup_densities=(0.25, 0.063, 0.015), warmup_steps=10
            )
        ),
    ),
    "topk_1pct": (
        "CompressedDDPStrategy(TopK(density=0.01)): top-1% with error feedback",
        lambda: _compressed_ddp(compressor=_topk(density=0.01)),
    ),
    "powersgd": ("PyTorch powerSGD_hook (rank 2, EF, warm start) on DDP [baseline]", PowerSGDStrategy),
    "local_sgd_int8": (
        "LocalSGDStrategy(sync_every=8, compressor='int8'): int8 model deltas",
        lf_row("LocalSGDStrategy", sync_every=8, compressor="int8"),
    ),
    "local_sgd_int4": (
        "LocalSGDStrategy(sync_every=8, compressor='int4'): int4 model deltas",
        lf_row("LocalSGDStrategy", sync_every=8, compressor="int4"),
    ),
    "local_sgd_h64_int4": (
        "LocalSGDStrategy(sync_every=64, compressor='int4')",
        lf_row("LocalSGDStrategy", sync_every=64, compressor="int4"),
    ),
    "diloco_int8": (
        "DiLoCoStrategy(sync_every=64, compressor='int8'): int8 pseudo-gradients",
        _diloco(compressor="int8"),
    ),
    "diloco_int4": (
        "DiLoCoStrategy(sync_every=64, compressor='int4'): int4 pseudo-gradients",
        _diloco(compressor="int4"),
    ),
    "diloco_int4_check": (
        "DiLoCoStrategy(sync_every=64, compressor='int4', initial_sync='check'): the ranks, seeded alike, "
        "compare digests instead of broadcasting the model at start-up",
        _diloco(compressor="int4", initial_sync="check"),
    ),
}


#: DGC's own setting (Lin et al., arXiv 1712.01887): momentum SGD on a model large enough for 0.1%
#: to be a useful number of values a step. ``--dgc`` runs these rows on ``DigitsClassifier(hidden=1024)``
#: (1.1M parameters: 0.1% is 1,126 values a step) trained with SGD lr 0.05 and a cosine schedule:
#: ``ddp_sgd`` with momentum 0.9 in the optimizer, the DGC rows with the momentum moved into the
#: compressor (momentum correction) and none in the optimizer. Its goal lines compare with ``ddp_sgd``.
DGC_HIDDEN = 1024
SGD_LR = 0.05
_SGD = {"optimizer": "sgd", "lr": SGD_LR, "schedule": "cosine"}
DGC_ROWS: dict[str, tuple[str, Callable[[], Any], dict[str, Any]]] = {
    "ddp_sgd": (
        f"MeteredDDPStrategy(), SGD lr {SGD_LR} momentum 0.9, cosine [DGC's baseline]",
        run.SUITE.strategies["ddp"][1],
        {**_SGD, "momentum": 0.9},
    ),
    "dgc_sgd": (
        "DGC 0.1%: momentum correction 0.9, masking, clip_norm 1 per tensor, warm-up 1.5%/0.4% x 44 steps; "
        "SGD without momentum",
        lambda: _compressed_ddp(
            compressor=_topk(
                density=0.001, momentum=0.9, clip_norm=1.0, warmup_densities=(0.015, 0.004), warmup_steps=44
            )
        ),
        {**_SGD, "momentum": 0.0},
    ),
    "dgc_sgd_paper_warmup": (
        "DGC 0.1% with the paper's four warm-up stages 25%/6.3%/1.5%/0.4%, one epoch (22 steps) each",
        lambda: _compressed_ddp(
            compressor=_topk(
                density=0.001,
                momentum=0.9,
                clip_norm=1.0,
                warmup_densities=(0.25, 0.063, 0.015, 0.004),
                warmup_steps=22,
            )
        ),
        {**_SGD, "momentum": 0.0},
    ),
    "dgc_sgd_noclip": (
        "DGC 0.1% as dgc_sgd without the local gradient clipping",
        lambda: _compressed_ddp(
            compressor=_topk(density=0.001, momentum=0.9, warmup_densities=(0.015, 0.004), warmup_steps=44)
        ),
        {**_SGD, "momentum": 0.0},
    ),
    "topk_sgd": (
        "TopK(0.001) + error feedback only (no momentum correction, clipping, warm-up); SGD momentum 0.9",
        lambda: _compressed_ddp(compressor=_topk(density=0.001)),
        {**_SGD, "momentum": 0.9},
    ),
}


#: the harness's rows (``python -m benchmarks.run``'s) with :data:`ROWS` and :data:`DGC_ROWS` added;
#: its workers run this module
SUITE = run.SUITE.extended(
    {**ROWS, **{name: (description, factory) for name, (description, factory, _) in DGC_ROWS.items()}},
    model_kwargs={name: model_kwargs for name, (_, _, model_kwargs) in DGC_ROWS.items()},
    worker_module="benchmarks.compression",
)


#: (row, baseline row, max % above the baseline's final val loss, min x fewer sync bytes, what)
GOALS = (
    ("dgc", "ddp", 2.0, 100.0, "DGC at 0.1%: within 2% of DDP's val loss, >= 100x fewer gradient bytes"),
    ("topk", "ddp", 2.0, 100.0, "top-k 0.1% + EF (no momentum correction): same goal"),
    ("dgc_sgd", "ddp_sgd", 2.0, 100.0, "DGC at 0.1% (SGD, 1.1M parameters): within 2% of DDP, >= 100x"),
    ("dgc_sgd_paper_warmup", "ddp_sgd", 2.0, 100.0, "DGC with the paper's 4-stage warm-up: same goal"),
    ("topk_sgd", "ddp_sgd", 2.0, 100.0, "top-k 0.1% + EF (SGD, 1.1M parameters): same goal"),
    ("diloco_int4", "ddp", 5.0, 400.0, "DiLoCo + Int4: within 5%, >= 400x fewer bytes"),
    ("diloco_int4_check", "ddp", 5.0, 400.0, "DiLoCo + Int4, initial_sync='check': the same goal"),
    ("local_sgd_h64_int4", "ddp", 5.0, 400.0, "Local SGD H=64 + Int4: the same goal as DiLoCo + Int4"),
)


def _baseline_of(name: str) -> str:
    return "ddp_sgd" if name in DGC_ROWS else "ddp"


def print_goals(summary_csv: Path) -> None:
    """The issue's goals against the run's DDP row (``ddp``, or ``ddp_sgd`` for the DGC rows)."""
    rows = read_summary(summary_csv)
    baselines = [b for b in ("ddp", "ddp_sgd") if b in rows]
    for base in baselines:
        ref = rows[base]
        base_loss, base_bytes, base_sync = (
            float(ref[k]) for k in ("final_val_loss", "bytes_sent", "sync_bytes_sent")
        )
        print(
            f"\nagainst {base} (val_loss: relative change of the final validation loss; "
            f"bytes: {base} / row, per replica)"
        )
        print(f"{'row':<22} {'val_loss':>8} {'vs ' + base:>10} {'x fewer (all)':>13} {'x fewer (sync)':>14}")
        for name, r in rows.items():
            if name in baselines or name in REFERENCES or _baseline_of(name) != base:
                continue
            loss, sent, sync = float(r["final_val_loss"]), float(r["bytes_sent"]), float(r["sync_bytes_sent"])
            print(
                f"{name:<22} {loss:>8.4f} {100 * (loss / base_loss - 1):>+9.1f}% {base_bytes / sent:>13.1f} "
                f"{base_sync / sync if sync else float('inf'):>14.1f}"
            )
    for name, base, pct, times, what in GOALS:
        if name in rows and base in rows:
            r, ref = rows[name], rows[base]
            dl = 100 * (float(r["final_val_loss"]) / float(ref["final_val_loss"]) - 1)
            x = float(ref["sync_bytes_sent"]) / float(r["sync_bytes_sent"])
            x_all = float(ref["bytes_sent"]) / float(r["bytes_sent"])
            verdict = "NOT met"
            if dl <= pct and x >= times:
                verdict = "MET" if x_all >= times else "MET on the sync bytes, not on all bytes"
            print(f"goal {what}: {dl:+.1f}%, {x:.0f}x sync bytes ({x_all:.0f}x all) -> {verdict}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.compression``: see the module docstring; the harness's flags apply."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        compare.main(argv, SUITE)
        return
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dgc", action="store_true")
    known, _ = parser.parse_known_args(argv)
    argv = [a for a in argv if a != "--dgc"]
    stem = "compression_dgc" if known.dgc else "compression"
    name = known.name or (stem + "_quick" if known.quick else stem)
    if known.dgc:  # DGC's setting: the DGC_ROWS on the 1.1M-parameter model
        defaults = ["--strategies", ",".join(DGC_ROWS), "--hidden", str(DGC_HIDDEN), "--no-single"]
    else:
        defaults = ["--strategies", ",".join(DEFAULT_ROWS), "--no-single"]
    if known.name is None:
        defaults += ["--name", name]
    compare.main(defaults + argv, SUITE)
    summary = Path(known.out) / f"{name}_summary.csv"
    if summary.exists():
        print_goals(summary)


if __name__ == "__main__":
    main()
