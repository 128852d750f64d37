"""examples/lm.py: the byte-level language model on the standard library's source.

The data split and the model, checked in one process (the example itself, run from the command
line on 2 real gloo ranks: tests/multiprocess/test_lm_example.py).
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch

from examples.lm import GPT, LanguageModel, count_parameters, warmup_cosine
from examples.lm_data import ShareSampler, StdlibText, Windows, list_files, replica_shares, split_files

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


@pytest.mark.parametrize("share", [(3, 3), (-1, 2), (0, 0), (1.0, 2)])
def test_a_share_out_of_range_is_refused(share):
    with pytest.raises(ValueError, match="share"):
        StdlibText(share=share)
