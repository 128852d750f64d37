"""Evaluation in the same processes after fit: ``trainer.validate`` on the consensus, then on two
checkpoints in turn (the second must not reuse the first one's consensus).

    python tests/scripts/eval_after_fit.py OUT_DIR
"""

import atexit
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modules import KnownBatchModule

import lightning_fedopt as lf


def main() -> None:
    out = Path(sys.argv[1])
    # registered before the strategy's own exit handler, so (last in, first out) it runs after it:
    # records whether the process group was torn down before the interpreter finalises
    atexit.register(
        lambda: (out / f"exit{os.environ.get('LOCAL_RANK', '0')}.txt").write_text(str(dist.is_initialized()))
    )
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        strategy=lf.LocalSGDStrategy(sync_every=4, final_sync=False),
        accelerator="cpu",
        devices=2,
        max_steps=6,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=1000,
    )
    model = KnownBatchModule()
    trainer.fit(model)
    local_before = {k: v.clone() for k, v in model.state_dict().items()}
    after_fit = trainer.validate(model, verbose=False)[0]["val_loss"]
    local_after = {k: v.clone() for k, v in model.state_dict().items()}
    on_a = trainer.validate(model, ckpt_path=str(out / "ckpt" / "step=3.ckpt"), verbose=False)[0]["val_loss"]
    on_b = trainer.validate(model, ckpt_path=str(out / "ckpt" / "step=6.ckpt"), verbose=False)[0]["val_loss"]
    torch.save(
        {
            "local_before": local_before,
            "local_after": local_after,
            "after_fit": after_fit,
            "a": on_a,
            "b": on_b,
        },
        out / f"eval{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
