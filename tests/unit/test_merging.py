"""Merge operators: pure functions of a contribution set (order, duplication and grouping do not matter),
hand-computed TIES/DARE cases, the variance correction, and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_fedopt.merging import MERGES, Contribution, ContributionSet, Merge, merge

SHAPES = [(3, 2), (4,), ()]


def model(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g) for s in SHAPES)


BASE = list(model(999))
REFERENCE = list(model(1234))
NAMES = ["layer.weight", "bn.running_mean", "scale"]
METHODS = {
    "mean": {},
    "weighted": {},
    "task_arithmetic": {"scale": 0.7},
    "ties": {"density": 0.5},
    "dare": {"density": 0.6, "seed": 3},
    "model_stock": {},
    "variance_corrected": {},
    "median": {},
    "trimmed_mean": {"f": 1},
    "nna": {"f": 1},
    "krum": {"f": 1},
}


def run(method: str, contributions) -> list[torch.Tensor]:
    return Merge(method, **METHODS[method])(contributions, base=BASE, reference=REFERENCE, names=NAMES)


keys = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 2)), min_size=1, max_size=6, unique=True)


def contributions_for(ks):
    return [Contribution(r, v, model(10 * r + v), weight=1.0 + (r % 3)) for r, v in ks]


@given(ks=keys, method=st.sampled_from(sorted(METHODS)), data=st.data())
def test_order_duplicates_and_grouping_do_not_matter(ks, method, data):
    cs = contributions_for(ks)
    op = Merge(method, **METHODS[method])
    if len(cs) < op.min_contributions():
        with pytest.raises(ValueError, match="needs"):
            run(method, cs)
        return
    expected = run(method, cs)
    # any arrival order, with duplicated deliveries
    arrival = data.draw(st.permutations(cs + data.draw(st.lists(st.sampled_from(cs), max_size=4))))
    got = run(method, arrival)
    # any grouping: split the arrivals into groups, merge the groups' sets in any order and nesting
    cut = sorted(data.draw(st.lists(st.integers(0, len(arrival)), max_size=3)))
    groups = [ContributionSet(arrival[a:b]) for a, b in itertools.pairwise([0, *cut, len(arrival)])]
    left = groups[0]
    for g in groups[1:]:
        left = left | g
    right = groups[-1]
    for g in reversed(groups[:-1]):
        right = g | right
    assert left == right == ContributionSet(cs) and left | left == left
    for result in (got, run(method, left), run(method, right)):
        for a, b in zip(expected, result):
            assert torch.equal(a, b), method


def test_set_is_keyed_by_replica_and_version():
    a = Contribution(0, 1, model(1))
    with pytest.raises(ValueError, match="different content"):
        ContributionSet([a, Contribution(0, 1, model(2))])
    s = ContributionSet([a, Contribution(0, 2, model(2))])
    assert s.keys() == [(0, 1), (0, 2)] and len(s | s) == 2
    assert s.digest() == ContributionSet(reversed(list(s))).digest() != ContributionSet([a]).digest()


def test_mean_and_weighted_mean():
    cs = [Contribution(r, 0, (torch.tensor([float(r)]),), weight=w) for r, w in ((0, 1.0), (1, 3.0))]
    assert merge(cs, "mean")[0].item() == pytest.approx(0.75)


def test_ties_hand_computed():
    base = [torch.ones(4)]
    deltas = [[3.0, -1.0, 2.0, 0.5], [-2.0, -4.0, 1.0, 0.1], [1.0, -2.0, 0.0, 0.0]]
    cs = [Contribution(k, 0, (base[0] + torch.tensor(d),)) for k, d in enumerate(deltas)]
    # trimmed to the top 2 by magnitude: [3,0,2,0], [-2,-4,0,0], [1,-2,0,0]; elected sign of the
    # sum [2,-6,2,0] -> [+,-,+,0]; mean of the agreeing entries: [(3+1)/2, (-4-2)/2, 2, 0]
    out = merge(cs, "ties", base=base, density=0.5)[0]
    torch.testing.assert_close(out, torch.tensor([1 + 2.0, 1 - 3.0, 1 + 2.0, 1.0]))
    out = merge(cs, "ties", base=base, density=0.5, scale=0.5)[0]
    torch.testing.assert_close(out, torch.tensor([2.0, -0.5, 2.0, 1.0]))
    # density 1 keeps everything: entry 0 has sum +2 -> mean of 3 and 1
    out = merge(cs[:2], "ties", base=base, density=1.0)[0]
    torch.testing.assert_close(out, torch.tensor([1 + 3.0, 1 - 2.5, 1 + 1.5, 1 + 0.3]))


def test_dare_hand_computed():
    base = [torch.zeros(1000)]
    delta = torch.arange(1.0, 1001.0)
    one = [Contribution(0, 0, (delta,))]
    # density 1: nothing dropped, plain task arithmetic
    torch.testing.assert_close(merge(one, "dare", base=base, density=1.0)[0], delta)
    # density 1/4: every entry is dropped (0) or rescaled by 4, about a quarter survive
    out = merge(one, "dare", base=base, density=0.25)[0]
    kept = out != 0
    torch.testing.assert_close(out[kept], 4 * delta[kept])
    assert 180 < int(kept.sum()) < 320
    # two contributions: each entry is the sum of its two rescaled-or-dropped deltas
    two = [Contribution(0, 0, (delta,)), Contribution(1, 0, (-delta,))]
    out = merge(two, "dare", base=base, density=0.5)[0]
    assert set((out / (2 * delta)).round().tolist()) <= {-1.0, 0.0, 1.0}
    # masks come from the set's hash: other versions draw other masks; the mean over sets is unbiased
    outs = [merge([Contribution(0, v, (delta,))], "dare", base=base, density=0.5)[0] for v in range(40)]
    assert not torch.equal(outs[0], outs[1])
    assert float((torch.stack(outs).mean(0) / delta).mean()) == pytest.approx(1.0, abs=0.05)


def test_variance_correction_restores_target_variance():
    g = torch.Generator().manual_seed(0)
    models = [
        (torch.randn(64, 64, generator=g) * 2 + 1, torch.randn(64, generator=g), torch.randn(1, generator=g))
        for _ in range(4)
    ]
    cs = [Contribution(k, 0, m) for k, m in enumerate(models)]
    names = ["fc.weight", "bn.running_var", "fc.bias"]
    plain = merge(cs, "mean")
    fixed = merge(cs, "variance_corrected", names=names)
    target = sum(float(m[0].var(unbiased=False)) for m in models) / 4
    assert float(plain[0].var(unbiased=False)) < 0.3 * target  # averaging shrinks the variance
    assert float(fixed[0].var(unbiased=False)) == pytest.approx(target, rel=1e-3)
    assert float(fixed[0].mean()) == pytest.approx(float(plain[0].mean()), abs=1e-5)
    assert torch.equal(fixed[1], plain[1]) and torch.equal(fixed[2], plain[2])  # BN stats and scalars


def test_slerp_and_model_stock():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    out = merge([Contribution(0, 0, (a,)), Contribution(1, 0, (b,))], "slerp", t=0.5)[0]
    # 90 degrees apart: sin(45)/sin(90) of each
    torch.testing.assert_close(out, torch.tensor([2**-0.5, 2 * 2**-0.5]))
    near = merge([Contribution(0, 0, (a,)), Contribution(1, 0, (a * 2,))], "slerp", t=0.25)[0]
    torch.testing.assert_close(near, a * 1.25)  # parallel: linear interpolation
    base = [torch.zeros(2)]
    d = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]  # orthogonal deltas: cos 0 -> t = 0
    out = merge([Contribution(k, 0, (x,)) for k, x in enumerate(d)], "model_stock", base=base)[0]
    torch.testing.assert_close(out, torch.zeros(2))
    same = merge([Contribution(k, 0, (d[0],)) for k in range(3)], "model_stock", base=base)[0]
    torch.testing.assert_close(same, d[0])  # cos 1 -> t = 1


def test_robust_operators_hand_computed():
    vals = [0.0, 1.0, 2.0, 100.0]
    cs = [Contribution(k, 0, (torch.tensor([v]),)) for k, v in enumerate(vals)]
    assert merge(cs, "median")[0].item() == 1.5
    assert merge(cs, "trimmed_mean", f=1)[0].item() == 1.5
    assert merge(cs, "nna", f=1, reference=[torch.tensor([0.5])])[0].item() == 1.0
    five = [*cs, Contribution(9, 0, (torch.tensor([1.5]),))]
    assert merge(five, "krum", f=1)[0].item() == 1.5  # closest to its 2 nearest others
    assert merge(five, "krum", f=1, m=3)[0].item() == pytest.approx((1.0 + 1.5 + 2.0) / 3)


def test_bad_input():
    with pytest.raises(ValueError, match="merge"):
        Merge("average")
    for density in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density"):
            Merge("ties", density=density)
    with pytest.raises(ValueError, match="unknown parameter"):
        Merge("mean", density=0.5)
    with pytest.raises(ValueError, match="needs `base=`"):
        merge([Contribution(0, 0, model(0))], "ties")
    with pytest.raises(ValueError, match="exactly 2"):
        merge(contributions_for([(0, 0), (1, 0), (2, 0)]), "slerp")
    with pytest.raises(ValueError, match="empty"):
        merge([], "mean")
    with pytest.raises(ValueError, match="weight"):
        Contribution(0, 0, model(0), weight=0.0)
    assert set(METHODS) <= set(MERGES)
