"""A byte-level causal language model on real text that ships offline: Python's own standard library.

The training text is the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (no download):
a small GPT written here (pre-norm blocks, causal self-attention through
``torch.nn.functional.scaled_dot_product_attention``, tied input/output embeddings; about 1.9M
parameters by default), or any Hugging Face causal LM when ``transformers`` is installed.

Run it with any registered strategy through Lightning's CLI, e.g.::

    python examples/lm.py fit --trainer.accelerator=cpu --trainer.devices=2 \
        --trainer.strategy=diloco --trainer.max_steps=20
    # a tiny model, DiLoCo every 10 steps, bf16 autocast
    python examples/lm.py fit --trainer.accelerator=cpu --trainer.devices=2 --trainer.max_steps=200 \
        --trainer.strategy=lightning_fedopt.DiLoCoStrategy --trainer.strategy.sync_every=10 \
        --trainer.precision=bf16-mixed --model.d_model=64 --model.n_layers=2 --model.n_heads=2 \
        --model.seq_len=64
    # MuLoCo: Muon inside (--model.optimizer=muon), 2-bit error-feedback pseudo-gradients
    python examples/lm.py fit --trainer.accelerator=cpu --trainer.devices=2 --model.optimizer=muon \
        --trainer.strategy=lightning_fedopt.strategies.diloco.muloco.MuLoCoStrategy \
        --trainer.strategy.sync_every=30
    # IID instead of one block of packages per replica
    python examples/lm.py fit --trainer.accelerator=cpu --trainer.devices=2 \
        --trainer.strategy=local_sgd --data.iid=true
    # GPUs (NCCL), bf16 autocast
    python examples/lm.py fit --trainer.accelerator=gpu --trainer.devices=8 \
        --trainer.strategy=diloco --trainer.precision=bf16-mixed
    # a Hugging Face model and its tokenizer (pip install transformers; a local directory, or a
    # hub name when online)
    python examples/lm.py fit --trainer.accelerator=cpu --trainer.devices=2 \
        --trainer.strategy=local_sgd --model.hf_model=gpt2 --data.tokenizer=gpt2 --model.seq_len=128

The data (``examples/lm_data.py``): the sorted file list is split by a seeded hash into training
and held-out validation files. By default each replica reads only its own contiguous block of the
sorted training files (so each site sees different packages: non-IID); ``--data.iid=true`` deals
a seeded shuffle of the files instead. Every rank validates on the same held-out files; ``val_loss`` is in nats per token and
``val_bpb`` in bits per byte of source text. The learning rate warms up linearly for
``warmup_steps`` optimizer steps, then follows a cosine to ``min_lr_ratio * lr`` (with
``--model.optimizer=muon`` Muon's ``muon_lr`` follows the same schedule); gradients are clipped to
norm 1 (``--trainer.gradient_clip_val``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.nn import functional as F

try:
    from examples.lm_data import StdlibText
except ImportError:  # run as a script from the examples folder
    from lm_data import StdlibText

# ---------------------------------------------------------------------------------------------
# model


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.fc, self.out = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).split(c, 2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """A small GPT: token + learned position embeddings, ``n_layers`` pre-norm blocks, a final
    LayerNorm, and logits through the token embedding matrix (tied: there is no separate output
    matrix). GPT-2 initialisation (N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers))."""

    def __init__(
        self,
        vocab: int = 256,
        d_model: int = 192,
        n_layers: int = 4,
        n_heads: int = 6,
        seq_len: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"`d_model` ({d_model}) must be a multiple of `n_heads` ({n_heads})")
        self.seq_len = seq_len
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, d_model), nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, time, vocab)`` for token ids ``(batch, time)``, time <= seq_len."""
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len={self.seq_len}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok_emb.weight)


#: the inner optimizers :class:`LanguageModel` builds (``optimizer=``)
OPTIMIZERS = ("adamw", "muon")


def warmup_cosine(step: int, warmup_steps: int, total_steps: float, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1 over ``warmup_steps``, then a cosine from 1 to
    ``min_ratio`` at ``total_steps`` (constant at 1 after warm-up when ``total_steps`` is infinite)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(total_steps):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LanguageModel(LightningModule):
    """Next-token prediction with AdamW (or Muon inside), warm-up + cosine learning rate, and
    bits-per-byte validation.

    Args:
        d_model: the :class:`GPT`'s width (vocabulary: the 256 byte values).
        n_layers: transformer blocks.
        n_heads: attention heads (a divisor of ``d_model``).
        seq_len: context length in tokens; the data's windows follow it.
        dropout: dropout on embeddings, attention and residual branches.
        lr: peak learning rate.
        warmup_steps: optimizer steps of linear warm-up.
        min_lr_ratio: the cosine ends at ``min_lr_ratio * lr`` at the run's last optimizer step.
        weight_decay: AdamW's decoupled weight decay, on matrices and embeddings only.
        betas: AdamW's betas.
        optimizer: ``"adamw"`` (AdamW on everything) or ``"muon"``: Muon on the hidden matrices
            and AdamW (``lr``, ``betas``, ``weight_decay``) on the embeddings, biases and norms,
            as one :class:`lightning_fedopt.optim.MuonAdamW` (MuLoCo's inner optimizer; needs
            ``torch.optim.Muon``, torch 2.9 or later).
        muon_lr: Muon's learning rate (``optimizer="muon"``), under the same warm-up and cosine.
        muon_weight_decay: Muon's decoupled weight decay (``optimizer="muon"``; the MuLoCo
            authors' default 0.01: Muon's steps are ``muon_lr`` large, so AdamW's 0.1 would shrink
            the matrices ten times as fast).
        hf_model: a Hugging Face causal LM (hub name or local path; needs ``transformers``) to train
            instead of the GPT; pair it with ``--data.tokenizer``.
        pretrained: load ``hf_model``'s weights (False: its architecture, freshly initialised).
    """

    def __init__(
        self,
        d_model: int = 192,
        n_layers: int = 4,
        n_heads: int = 6,
        seq_len: int = 256,
        dropout: float = 0.0,
        lr: float = 2e-3,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        hf_model: str | None = None,
        pretrained: bool = True,
        optimizer: str = "adamw",
        muon_lr: float = 0.02,
        muon_weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not muon_lr > 0:
            raise ValueError(f"`muon_lr` must be > 0, got {muon_lr!r}")
        if not muon_weight_decay >= 0:
            raise ValueError(f"`muon_weight_decay` must be >= 0, got {muon_weight_decay!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio!r}")
        self.save_hyperparameters()
        self.validated_at = -1  # the optimizer step of the last validation
        if hf_model is None:
            self.net: nn.Module = GPT(256, d_model, n_layers, n_heads, seq_len, dropout)
        else:
            from transformers import AutoConfig, AutoModelForCausalLM  # optional dependency

            if pretrained:
                self.net = AutoModelForCausalLM.from_pretrained(hf_model)
            else:
                self.net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_model))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.hparams.hf_model is None:
            return self.net(idx)
        return self.net(input_ids=idx).logits

    def _loss(self, window: torch.Tensor) -> torch.Tensor:
        logits = self(window[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = self._loss(batch)
        datamodule = getattr(self.trainer, "datamodule", None)
        bytes_per_token = getattr(datamodule, "bytes_per_token", 1.0)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_bpb", loss / (math.log(2) * bytes_per_token), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt: torch.optim.Optimizer
        if hp.get("optimizer", "adamw") == "muon":
            from lightning_fedopt.optim import MuonAdamW

            # Muon on the blocks' matrices; AdamW on the (tied) embeddings with weight decay and on
            # the biases and norms without, as in the AdamW configuration below
            opt = MuonAdamW(
                self,
                lr=hp.lr,
                muon_lr=hp.muon_lr,
                weight_decay=hp.weight_decay,
                muon_weight_decay=hp.muon_weight_decay,
                vector_weight_decay=0.0,
                betas=tuple(hp.betas),
            )
        else:
            decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
            no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
            opt = torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": hp.weight_decay},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=hp.lr,
                betas=tuple(hp.betas),
            )
        total = float(self.trainer.estimated_stepping_batches) if self._trainer is not None else math.inf
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# ---------------------------------------------------------------------------------------------
# command line


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (a tied matrix counted once)."""
    return sum(p.numel() for p in module.parameters())


class LanguageModelCLI(LightningCLI):
    """``seq_len`` is given once (``--model.seq_len``); a summary line is printed after ``fit``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.seq_len", "data.seq_len")

    def after_fit(self) -> None:
        trainer = self.trainer
        train_loss = trainer.callback_metrics.get("train_loss")  # rank 0's last step
        stats = getattr(trainer.strategy, "comm_stats", None)
        sent = stats.bytes_sent if stats is not None else None  # before the evaluation below
        if trainer.limit_val_batches and self.model.validated_at != trainer.global_step:
            # evaluate the final (consensus) model, on every rank, unless that just happened
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if not trainer.is_global_zero:
            return
        line = f"parameters={count_parameters(self.model)}  steps={trainer.global_step}"
        if train_loss is not None:
            line += f"  train_loss={float(train_loss):.4f}"
        for key in ("val_loss", "val_bpb"):
            if key in trainer.callback_metrics:
                line += f"  {key}={float(trainer.callback_metrics[key]):.4f}"
        if sent is not None:
            line += f"  bytes sent per replica={sent}"
        print(line)


TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 1000,
    "gradient_clip_val": 1.0,  # clip the global gradient norm of each replica's step
    "check_val_every_n_epoch": None,  # validate every `val_check_interval` optimizer steps,
    "val_check_interval": 250,  # across epoch boundaries
    "log_every_n_steps": 10,
}


def main(args: Sequence[str] | None = None) -> LanguageModelCLI:
    """Run the command line (``args``: instead of ``sys.argv[1:]``)."""
    import lightning_fedopt  # noqa: F401  (registers the strategy names)
    from lightning_fedopt.callbacks import CommunicationMonitor

    return LanguageModelCLI(
        LanguageModel,
        StdlibText,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [CommunicationMonitor()]},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
