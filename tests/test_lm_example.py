"""examples/lm.py: the byte-level language model on the standard library's source.

The data split and the model are checked in one process; the example itself is run from the
command line (the script launcher, 2 real gloo ranks) under two strategies.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch

from examples.lm import GPT, LanguageModel, count_parameters, warmup_cosine
from examples.lm_data import ShareSampler, StdlibText, Windows, list_files, replica_shares, split_files

ROOT = Path(__file__).resolve().parents[1]
STDLIB = sysconfig.get_paths()["stdlib"]


# ---------------------------------------------------------------------------------------------
# data


def test_split_is_deterministic_disjoint_and_holds_out_validation():
    files = list_files(STDLIB)
    assert files == list_files(STDLIB) and files == sorted(files)
    assert not any(
        part in {"site-packages", "__pycache__", "test", "tests"} for f, _ in files for part in f.split("/")
    )
    train, val = split_files(files, seed=0, max_bytes=2 << 20, val_bytes=128 << 10)
    assert (train, val) == split_files(files, seed=0, max_bytes=2 << 20, val_bytes=128 << 10)
    assert {f for f, _ in train}.isdisjoint(f for f, _ in val)
    assert 0 < sum(s for _, s in train) <= 2 << 20 and 0 < sum(s for _, s in val) <= 128 << 10
    # a file's side is a function of its own path: a sub-list is split the same way
    sub_train, sub_val = split_files(files[::2], seed=0, max_bytes=1 << 40, val_bytes=1 << 40)
    all_train, all_val = split_files(files, seed=0, max_bytes=1 << 40, val_bytes=1 << 40)
    assert set(sub_train) <= set(all_train) and set(sub_val) <= set(all_val)
    assert (
        split_files(files, seed=1, max_bytes=2 << 20)[1] != split_files(files, seed=0, max_bytes=2 << 20)[1]
    )

    biggest = max(s for _, s in train)
    for world in (2, 3):
        for iid in (False, True):
            shares = replica_shares(train, world, iid=iid, seed=0)
            assert shares == replica_shares(train, world, iid=iid, seed=0)
            names = [{f for f, _ in share} for share in shares]
            assert all(a.isdisjoint(b) for i, a in enumerate(names) for b in names[i + 1 :])
            assert set().union(*names) == {f for f, _ in train}
            sizes = [sum(s for _, s in share) for share in shares]
            assert max(sizes) - min(sizes) <= 2 * biggest  # about equal bytes per replica
        # non-IID: contiguous blocks of the sorted list (each replica its own packages)
        assert [f for share in replica_shares(train, world) for f in share] == sorted(train)
        assert replica_shares(train, world, iid=True) != replica_shares(train, world)


def test_windows_and_equal_length_epochs():
    windows = Windows(torch.arange(21, dtype=torch.uint8), seq_len=4)
    assert len(windows) == 5
    assert windows[0].tolist() == [0, 1, 2, 3, 4] and windows[4].tolist() == [16, 17, 18, 19, 20]
    assert windows[0].dtype == torch.long

    sampler = ShareSampler(n=7, length=10, seed=0, rank=1)
    first = list(sampler)
    assert len(first) == len(sampler) == 10 and set(first) == set(range(7))  # cycles a small share
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(ShareSampler(n=7, length=10, seed=0, rank=0)) != first


def _write_tree(root: Path) -> None:
    for i in range(40):
        package = root / f"pkg{i // 10}"
        package.mkdir(parents=True, exist_ok=True)
        (package / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (20 + 7 * i))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skipped.py").write_text("never read\n")


def test_datamodule_gives_each_rank_its_own_share_and_the_same_validation(tmp_path):
    _write_tree(tmp_path)
    kw: dict[str, Any] = dict(root=str(tmp_path), seq_len=16, batch_size=4, val_fraction=0.2)
    modules = []
    for rank in range(2):
        dm = StdlibText(**kw)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.setup("fit")
        modules.append(dm)
    a, b = modules
    assert (
        a.train_files and b.train_files and not {f for f, _ in a.train_files} & {f for f, _ in b.train_files}
    )
    assert a.val_files == b.val_files and not {f for f, _ in a.val_files} & {f for f, _ in a.train_files}
    assert torch.equal(a.val_set.tokens, b.val_set.tokens)
    assert not any("site-packages" in f for f, _ in a.train_files + b.train_files + a.val_files)
    assert a.epoch_windows == b.epoch_windows <= min(len(a.train_set), len(b.train_set))
    assert len(a.train_dataloader()) == len(b.train_dataloader()) == a.epoch_windows // 4
    text = b"".join((tmp_path / f).read_bytes() + b"\x00" for f, _ in a.train_files)
    assert bytes(a.train_set.tokens.tolist()) == text
    assert a.bytes_per_token == 1.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"seq_len": True}, "seq_len"),
    ],
)
def test_bad_data_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        StdlibText(**kwargs)


# ---------------------------------------------------------------------------------------------
# model


def test_default_model_size_and_tied_embeddings():
    model = LanguageModel()
    n = count_parameters(model)
    assert 1_000_000 <= n <= 3_000_000, n
    gpt = model.net
    assert isinstance(gpt, GPT)
    d = gpt.tok_emb.weight.shape[1]
    # no output matrix of its own: the logits go through the token embedding
    matrices = [
        name for name, p in gpt.named_parameters() if p.shape == (256, d) and name != "pos_emb.weight"
    ]
    assert matrices == ["tok_emb.weight"]
    idx = torch.full((2, 8), ord("a"))
    F = torch.nn.functional
    F.cross_entropy(gpt(idx).flatten(0, 1), torch.full((16,), ord("b"))).backward()
    grad = gpt.tok_emb.weight.grad
    assert grad[ord("b")].abs().sum() > 0 and grad[ord("z")].abs().sum() > 0  # only reachable as outputs


def test_model_is_causal():
    torch.manual_seed(0)
    gpt = GPT(d_model=32, n_layers=2, n_heads=4, seq_len=16).eval()
    idx = torch.randint(0, 256, (3, 16))
    out = gpt(idx)
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, 256, (3, 15 - t))
        other = gpt(changed)
        torch.testing.assert_close(other[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(other[:, t + 1 :], out[:, t + 1 :])
    with pytest.raises(ValueError, match="seq_len"):
        gpt(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 30, "n_heads": 4}, "`d_model`"),
        ({"lr": 0.0}, "`lr`"),
        ({"min_lr_ratio": 2.0}, "`min_lr_ratio`"),
    ],
)
def test_bad_model_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LanguageModel(**kwargs)


def test_warmup_cosine():
    assert [warmup_cosine(s, 4, 12, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 12, 0.1) == 1.0
    assert warmup_cosine(8, 4, 12, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(12, 4, 12, 0.1) == pytest.approx(0.1) == warmup_cosine(50, 4, 12, 0.1)
    assert warmup_cosine(10**6, 4, math.inf, 0.1) == 1.0


def test_one_process_bf16_run_schedule_and_bits_per_byte(tmp_path):
    """bf16-mixed autocast on CPU; the learning rate follows warm-up + cosine, stepped every
    optimizer step; gradients clipped; val_bpb = val_loss / ln 2 for bytes."""
    _write_tree(tmp_path / "src")
    lrs: list[float] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    steps, lr = 6, 1e-3
    model = LanguageModel(d_model=32, n_layers=1, n_heads=2, seq_len=16, lr=lr, warmup_steps=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        check_val_every_n_epoch=None,
        val_check_interval=steps,
        limit_val_batches=4,
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, StdlibText(root=str(tmp_path / "src"), seq_len=16, batch_size=4, val_fraction=0.2))
    assert lrs == pytest.approx([lr * warmup_cosine(s, 2, steps, 0.1) for s in range(steps)])
    metrics = trainer.callback_metrics
    assert float(metrics["val_bpb"]) == pytest.approx(float(metrics["val_loss"]) / math.log(2), rel=1e-5)


def test_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    import tempfile

    with tempfile.TemporaryDirectory() as path:
        transformers.GPT2Config(
            vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2
        ).save_pretrained(path)
        model = LanguageModel(hf_model=path, pretrained=False)
    batch = torch.randint(0, 256, (2, 17))
    assert model(batch[:, :-1]).shape == (2, 16, 256)
    assert math.isfinite(float(model._loss(batch)))


# ---------------------------------------------------------------------------------------------
# the example, from the command line, on 2 real ranks


class RecordRun(L.Callback):
    """Passed on the example's command line: writes each rank's training losses, validation
    results, data files and final weights to ``<out>/rank<r>.pt``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.losses: list[float] = []
        self.val: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_validation_end(self, trainer, pl_module):  # the sanity check: the initial weights
        step = -1 if trainer.sanity_checking else trainer.global_step
        m = trainer.callback_metrics
        self.val.append((step, float(m["val_loss"]), float(m["val_bpb"])))

    def teardown(self, trainer, pl_module, stage):  # after fit, and after the validation that follows
        stats = getattr(trainer.strategy, "comm_stats", None)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "losses": self.losses,
                "val": self.val,
                "train_files": trainer.datamodule.train_files,
                "val_files": trainer.datamodule.val_files,
                "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                "bytes_sent": stats.bytes_sent if stats is not None else None,
                "global_step": trainer.global_step,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def _run_example(out: Path, strategy_args: list[str]) -> subprocess.CompletedProcess:
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), tests, os.environ.get("PYTHONPATH", "")]))
    for var in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(var, None)
    args = [
        "examples/lm.py",
        "fit",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.max_steps=24",
        "--trainer.val_check_interval=12",
        "--trainer.limit_val_batches=4",
        "--trainer.num_sanity_val_steps=4",  # validate the initial weights on the same 4 batches
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={out}",
        "--trainer.callbacks+=test_lm_example.RecordRun",
        f"--trainer.callbacks.out={out}",
        "--model.d_model=48",
        "--model.n_layers=1",
        "--model.n_heads=2",
        "--model.seq_len=64",
        "--model.lr=3e-3",
        "--model.warmup_steps=4",
        "--data.batch_size=16",
        "--data.max_bytes=1000000",
        "--data.val_bytes=65536",
        *strategy_args,
    ]
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "strategy_args",
    [
        ["--trainer.strategy=lightning_fedopt.LocalSGDStrategy", "--trainer.strategy.sync_every=5"],
        ["--trainer.strategy=lightning_fedopt.DiLoCoStrategy", "--trainer.strategy.sync_every=5"],
    ],
    ids=["local_sgd", "diloco"],
)
def test_example_trains_on_two_ranks_and_ends_in_consensus(tmp_path, strategy_args):
    proc = _run_example(tmp_path, strategy_args)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert "parameters=" in proc.stdout and "val_bpb=" in proc.stdout
    for rank in ranks:
        assert rank["global_step"] == 24 and len(rank["losses"]) == 24
        first, last = sum(rank["losses"][:3]) / 3, sum(rank["losses"][-3:]) / 3
        assert first > math.log(256) - 0.3 and last < first - 0.5, rank["losses"]
        assert rank["bytes_sent"] > 0
        # validated before training (about 8 bits per byte: uniform) and at steps 12 and 24
        assert [v[0] for v in rank["val"]] == [-1, 12, 24]
        (_, before, bpb_before), _, (_, after, bpb_after) = rank["val"]
        assert bpb_before > 7.5 and after < before - 1.0 and bpb_after < 6.5, rank["val"]
        assert bpb_after == pytest.approx(after / math.log(2), rel=1e-5)
    # each replica trained on its own files, validated on the same ones, and they end in agreement
    assert not {f for f, _ in ranks[0]["train_files"]} & {f for f, _ in ranks[1]["train_files"]}
    assert ranks[0]["val_files"] == ranks[1]["val_files"]
    assert ranks[0]["val"] == ranks[1]["val"]
    torch.testing.assert_close(ranks[0]["state_dict"], ranks[1]["state_dict"], rtol=0, atol=0)
