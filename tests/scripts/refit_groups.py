"""Two fits and a validation on one Trainer with ``group_size=2`` on 4 processes (script launcher):
the communicators' lifetimes (the groups are built per entry point and dropped at its end).

    python tests/scripts/refit_groups.py OUT_DIR STRATEGY
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modules import KnownBatchModule

import lightning_fedopt as lf


def main() -> None:
    out, name = Path(sys.argv[1]), sys.argv[2]
    strategy = {
        "diloco": lambda: lf.DiLoCoStrategy(sync_every=3, group_size=2),
        "local_sgd": lambda: lf.LocalSGDStrategy(sync_every=3, group_size=2),
    }[name]()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=4,
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=1000,
    )
    model = KnownBatchModule()
    trainer.fit(model)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    groups_after_first = (strategy.comms.inner, strategy.comms.outer is strategy.comms.world)
    trainer.fit_loop.epoch_loop.max_steps = 12  # six more steps on the same Trainer
    trainer.fit(model)
    second = {k: v.clone() for k, v in model.state_dict().items()}
    val = trainer.validate(model, verbose=False)[0]["val_loss"]
    torch.save(
        {
            "first": first,
            "second": second,
            "val": val,
            "steps": strategy.replica_step,
            "syncs": strategy.sync_count,
            "dropped": groups_after_first[0] is None and groups_after_first[1],
            "outer_world": strategy.outer_world_size,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
