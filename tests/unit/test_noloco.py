"""NoLoCo without processes: the pairs cover every replica once, argument checks (the real processes:
tests/multiprocess/test_noloco.py)."""

from __future__ import annotations

import pytest

import lightning_fedopt as lf
from lightning_fedopt.strategies.diloco.noloco import pair_groups


def test_pair_groups_cover_every_replica_once():
    for n in (2, 3, 4, 7):
        for rnd in range(5):
            groups = pair_groups(rnd, n, seed=1)
            assert sorted(r for g in groups for r in g) == list(range(n))
            assert all(1 <= len(g) <= 2 for g in groups) and sum(len(g) == 1 for g in groups) == n % 2
    assert pair_groups(0, 4) == pair_groups(0, 4)
    assert len({str(pair_groups(r, 6)) for r in range(10)}) > 1, "the pairing changes between rounds"


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"sync_every": 0}, "sync_every"),
        ({"outer_lr": 0}, "outer_lr"),
        ({"outer_momentum": 1.0}, "outer_momentum"),
        ({"compressor": "int8"}, "compressor"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lf.NoLoCoStrategy(**kwargs)
