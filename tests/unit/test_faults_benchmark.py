"""Unit tests of the failure benchmark's task switch (benchmarks/faults.py ``--task``): the command
line, the workers' model and data for each task (the fault-tolerant groups' shards of the text), the
final loss in bits per byte, and the tables' bits-per-byte column. No process is started."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import faults

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_task_is_digits_unless_asked() -> None:
    assert faults.parse_args(["--ft-only"]).task == "digits"
    assert faults.parse_args(["--ft-only", "--task", "lm"]).task == "lm"
    with pytest.raises(SystemExit):
        faults.parse_args(["--task", "mnist"])


def test_the_workers_take_the_tasks_defaults() -> None:
    from benchmarks import _elastic_worker, _ft_worker

    ft = _ft_worker.parse_args(["--dir", "d", "--groups", "3", "--task", "lm"])
    assert (ft.task, ft.lr, ft.batch_size, ft.d_model, ft.n_layers, ft.n_heads, ft.seq_len, ft.warmup) == (
        "lm", 2e-3, 8, 64, 2, 2, 128, 64,
    )  # fmt: skip
    digits = _ft_worker.parse_args(["--dir", "d", "--groups", "3"])
    assert (digits.task, digits.lr, digits.batch_size, digits.hidden) == ("digits", 1e-3, 32, 128)
    tr = _elastic_worker.parse_args(["--strategy", "ddp", "--dir", "d", "--task", "lm", "--lr", "1e-3"])
    assert (tr.task, tr.lr, tr.batch_size) == ("lm", 1e-3, 8)
    assert _elastic_worker.task_trainer_kwargs("lm") == {"gradient_clip_val": 1.0}
    assert _elastic_worker.task_trainer_kwargs("digits") == {}


def test_each_group_trains_on_its_own_share_of_the_text() -> None:
    from benchmarks import _elastic_worker, _ft_worker
    from examples.lm import LanguageModel
    from examples.lm_data import list_files, replica_shares, split_files

    argv = ["--dir", "d", "--groups", "3", "--task", "lm", "--max-bytes", str(192 << 10)]
    args = _ft_worker.parse_args([*argv, "--val-bytes", str(8 << 10)])
    from examples.lm_data import StdlibText

    datas: list[StdlibText] = []
    for g in range(3):
        model, data = _elastic_worker.make_task(args, shard=(g, 3))
        assert isinstance(data, StdlibText) and data.share == (g, 3)
        data.setup("fit")
        datas.append(data)
    assert isinstance(model, LanguageModel) and model.hparams["d_model"] == 64
    files = list_files(datas[0].root)
    train, val = split_files(files, 0, 0.05, 192 << 10, 8 << 10)
    shares = replica_shares(train, 3)
    assert [d.train_files for d in datas] == shares  # what torchrun rank g of 3 reads
    assert all(d.val_files == val for d in datas)  # the same held-out text for every group
    assert len({d.epoch_windows for d in datas}) == 1  # equal steps per epoch
    first = [next(iter(d.train_dataloader())) for d in datas]
    assert all(b.shape == (8, 129) for b in first)
    assert not torch.equal(first[0], first[1])
    metrics = _elastic_worker.final_metrics(model, datas[0])
    assert metrics["final_val_bpb"] == pytest.approx(metrics["final_val_loss"] / math.log(2))
    assert metrics["final_val_loss"] == pytest.approx(math.log(256), rel=0.05)  # an untrained model


def test_the_digits_shard_is_the_distributed_samplers_slice() -> None:
    from benchmarks import _elastic_worker, _ft_worker

    args = _ft_worker.parse_args(["--dir", "d", "--groups", "3"])
    model, data = _elastic_worker.make_task(args, shard=(1, 3))
    data.setup("fit")
    sampler = data.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank, sampler.seed) == (3, 1, 0)
    assert list(_elastic_worker.final_metrics(model, data)) == ["final_val_loss"]  # no bits per byte


def _ft_row(**extra: object) -> dict[str, object]:
    return {
        "row": "diloco_ft free",
        "kills": 0,
        "wall_s": 10.0,
        "train_wall_s": 8.0,
        "final_val_loss": 1.5,
        **extra,
    }


def test_the_tables_show_bits_per_byte_only_for_text(capsys: pytest.CaptureFixture[str]) -> None:
    faults.print_ft_table([_ft_row()])
    assert "val bpb" not in capsys.readouterr().out
    faults.print_ft_table([_ft_row(final_val_bpb=2.1640)])
    out = capsys.readouterr().out
    assert "val bpb" in out and "2.1640" in out
    assert faults._given("val_bpb", None) == {} and faults._given("val_bpb", 2.0) == {"val_bpb": 2.0}
