"""Partitions across replicas and the replica's sampler/loader (single process, no Lightning)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from lightning_fedopt.data import (
    IID,
    Dirichlet,
    Pacing,
    Partition,
    PartitionSampler,
    QuantitySkew,
    Shards,
    get_partitioner,
    infer_labels,
    partition_dataloader,
)


def digits_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def covers_once(p: Partition, n: int) -> bool:
    everything = np.concatenate(p.parts)
    return len(everything) == n and np.array_equal(np.sort(everything), np.arange(n))


@settings(max_examples=40)
@given(
    n=st.integers(20, 300),
    k=st.integers(1, 8),
    classes=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["iid", "dirichlet", "shards", "quantity"]),
)
def test_every_sample_belongs_to_exactly_one_replica(n, k, classes, seed, kind):
    y = np.arange(n) % classes
    part = {
        "iid": IID(seed=seed),
        "dirichlet": Dirichlet(alpha=0.5, min_size=1, seed=seed),
        "shards": Shards(shards_per_replica=2, seed=seed),
        "quantity": QuantitySkew(beta=0.5, min_size=1, seed=seed),
    }[kind]
    if kind == "shards" and 2 * k > n:
        return
    p = part.split(y, k)
    assert p.num_replicas == k
    assert covers_once(p, n)
    assert all(len(x) >= 1 for x in p.parts)


def test_dirichlet_skew_grows_as_alpha_falls():
    # digits' classes are balanced, so the distance from the whole set's label distribution is the
    # distance from uniform
    y = digits_labels()
    skewed = Dirichlet(alpha=0.1, seed=0).split(y, 4)
    mild = Dirichlet(alpha=100.0, seed=0).split(y, 4)
    tv_skewed, tv_mild = skewed.label_divergence(y), mild.label_divergence(y)
    kl_skewed, kl_mild = skewed.label_divergence(y, "kl"), mild.label_divergence(y, "kl")
    # alpha=0.1: each replica holds a few classes; alpha=100: close to the whole set's distribution
    assert tv_skewed > 0.5 and tv_mild < 0.06, (tv_skewed, tv_mild)
    assert kl_skewed > 20 * kl_mild
    hist = skewed.label_histogram(y)
    assert hist.shape == (4, 10) and hist.sum() == len(y)
    assert (hist.sum(0) == np.bincount(y)).all()
    # under alpha=0.1 most replicas miss some classes entirely; under alpha=100 none does
    assert (hist == 0).sum() > 5 and (mild.label_histogram(y) == 0).sum() == 0
    assert "label divergence" in skewed.report(y)


def test_same_seed_same_partition_other_seed_another():
    y = digits_labels()
    for make in (
        lambda s: Dirichlet(0.3, seed=s),
        lambda s: Shards(2, seed=s),
        lambda s: QuantitySkew(0.5, seed=s),
        lambda s: IID(seed=s),
    ):
        a, b, c = make(3).split(y, 5), make(3).split(y, 5), make(4).split(y, 5)
        assert all(np.array_equal(x, z) for x, z in zip(a.parts, b.parts))
        assert not all(np.array_equal(x, z) for x, z in zip(a.parts, c.parts))


def test_shards_and_quantity_skew():
    y = digits_labels()
    p = Shards(shards_per_replica=2, seed=0).split(y, 10)
    # 20 label-sorted shards of ~90 samples: a replica holds at most 2 shards' labels (+1 at a boundary)
    assert max(len(np.unique(y[part])) for part in p.parts) <= 4
    q = QuantitySkew(beta=0.3, min_size=10, seed=0).split(y, 6)
    sizes = q.sizes()
    assert min(sizes) >= 10 and max(sizes) > 3 * min(sizes)
    assert q.label_divergence(y) < Dirichlet(0.3, seed=0).split(y, 6).label_divergence(y)


def test_bad_input():
    y = np.arange(10) % 2
    with pytest.raises(ValueError, match="alpha"):
        Dirichlet(alpha=0)
    with pytest.raises(ValueError, match="alpha"):
        Dirichlet(alpha=-1.0)
    with pytest.raises(ValueError, match="num_replicas"):
        IID().split(3, 4)  # more replicas than samples
    with pytest.raises(ValueError, match="num_replicas"):
        Dirichlet(1.0, min_size=1).split(y, 11)
    with pytest.raises(ValueError, match="min_size"):
        Dirichlet(1.0, min_size=6).split(y, 2)
    with pytest.raises(ValueError, match="shards_per_replica"):
        Shards(shards_per_replica=0)
    with pytest.raises(ValueError, match="beta"):
        QuantitySkew(beta=0.0)
    with pytest.raises(ValueError, match="labels"):
        Dirichlet(1.0).split(10, 2)  # a count where labels are needed
    with pytest.raises(ValueError, match="unknown partitioner"):
        get_partitioner("zipf")
    with pytest.raises(ValueError, match="alpha"):
        get_partitioner("dirichlet")  # a name whose partitioner needs arguments
    with pytest.raises(ValueError, match="exactly one replica"):
        Partition((np.array([0, 1]), np.array([1, 2])), 3)
    # NaN, infinities and booleans are not numbers of samples or concentrations
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="alpha"):
            Dirichlet(alpha=bad)
        with pytest.raises(ValueError, match="beta"):
            QuantitySkew(beta=bad)
    with pytest.raises(ValueError, match="min_size"):
        QuantitySkew(min_size=True)
    with pytest.raises(ValueError, match="seed"):
        IID(seed=1.5)
    with pytest.raises(ValueError, match="metric"):
        IID().split(10, 2).label_divergence(y, "js")
    assert Shards(np.int64(2)).shards_per_replica == 2  # NumPy integers are integers


def test_sampler_epochs_are_equal_length_and_stay_in_the_part():
    y = digits_labels()
    data = TensorDataset(torch.zeros(len(y), 1), torch.from_numpy(y))
    p = Dirichlet(alpha=0.1, seed=0).split(y, 4)
    assert len(set(p.sizes())) > 1  # the parts differ in size ...
    samplers = [PartitionSampler(data, p, r, batch_size=16) for r in range(4)]
    assert len({len(s) for s in samplers}) == 1  # ... the epochs do not
    for r, s in enumerate(samplers):
        s.set_epoch(0)
        first = list(s)
        assert set(first) <= set(p[r].tolist())
        assert list(s) == first  # deterministic by (seed, rank, epoch)
        s.set_epoch(1)
        assert list(s) != first
        if len(p[r]) < len(s):  # a small part is cycled through in whole passes
            counts = np.bincount(first, minlength=len(y))[p[r]]
            assert counts.max() - counts.min() <= 1


def test_loader_resumes_mid_epoch_with_the_same_batches():
    y = np.arange(200) % 5
    data = TensorDataset(torch.arange(200).float()[:, None], torch.from_numpy(y))

    def loader():
        return partition_dataloader(
            data, Dirichlet(0.5, min_size=5, seed=1), batch_size=8, rank=1, num_replicas=3
        )

    full = loader()
    full.partition_sampler.set_epoch(2)
    expected = [b[0][:, 0].long().tolist() for b in full]
    part = loader()
    part.partition_sampler.set_epoch(2)
    it = iter(part)
    head = [next(it)[0][:, 0].long().tolist() for _ in range(3)]
    state = part.state_dict()
    assert state == {"epoch": 2, "batches": 3}
    resumed = loader()
    resumed.load_state_dict(state)
    tail = [b[0][:, 0].long().tolist() for b in resumed]
    assert head + tail == expected
    # the next epoch starts from its first batch again
    resumed.partition_sampler.set_epoch(3)
    assert len(list(resumed)) == len(resumed)


def test_curriculum_batches_come_from_the_visible_prefix():
    data = list(range(100))
    p = IID(seed=0).split(100, 1)
    s = PartitionSampler(data, p, 0, batch_size=10, epoch_length=100)
    scores = torch.arange(100, dtype=torch.float64)  # position i has score i
    order = torch.argsort(scores)
    s.set_curriculum(order, Pacing("linear", a=0.5, b=0.2), total_batches=40)
    for b in range(10):
        t = b  # epoch 0
        visible = s.visible(t)
        assert visible == max(10, int(100 * min(1.0, 0.2 + 0.8 * t / 20)))
        idx = s.batch_indices(0, b)
        assert len(set(idx.tolist())) == 10 and int(idx.max()) < visible
    s.set_epoch(1)  # t = 10..19 and beyond aT = 20 everything is visible
    assert s.visible(25) == 100
    with pytest.raises(ValueError, match="permutation"):
        s.set_curriculum(torch.tensor([0, 0, 1]), Pacing(), 10)


def test_infer_labels_and_sampler_errors():
    y = torch.arange(30) % 3
    assert (infer_labels(TensorDataset(torch.zeros(30, 2), y)) == y.numpy()).all()
    assert (infer_labels([(0.0, int(v)) for v in y]) == y.numpy()).all()
    with pytest.raises(ValueError, match="labels="):
        infer_labels([object()] * 3)
    p = IID().split(30, 2)
    with pytest.raises(ValueError, match="rank"):
        PartitionSampler(list(range(30)), p, 2, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        PartitionSampler(list(range(30)), p, 0, batch_size=0)
    with pytest.raises(ValueError, match="no full batch"):
        PartitionSampler(list(range(30)), p, 0, batch_size=16)
    with pytest.raises(ValueError, match="covers"):
        PartitionSampler(list(range(31)), p, 0, batch_size=4)
    with pytest.raises(ValueError, match="epoch_length"):
        PartitionSampler(list(range(30)), p, 0, batch_size=4, epoch_length="own")  # 2 replicas
    for bad in ("longest", 0, True, 2.5):
        with pytest.raises(ValueError, match="`epoch_length` must be 'equal', 'own' or an integer >= 1"):
            PartitionSampler(list(range(30)), p, 0, batch_size=4, epoch_length=bad)
    with pytest.raises(ValueError, match="rank"):
        PartitionSampler(list(range(30)), p, True, batch_size=4)


def test_rank_zero_logs_the_label_histograms(caplog):
    y = np.arange(120) % 4
    data = TensorDataset(torch.zeros(120, 1), torch.from_numpy(y))
    with caplog.at_level("INFO", logger="lightning_fedopt"):
        partition_dataloader(data, Dirichlet(0.5, min_size=5), batch_size=8, rank=0, num_replicas=3)
    assert "label divergence" in caplog.text and "replica  samples" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="lightning_fedopt"):
        partition_dataloader(data, Dirichlet(0.5, min_size=5), batch_size=8, rank=1, num_replicas=3)
    assert "label divergence" not in caplog.text
