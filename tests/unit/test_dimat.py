"""DIMAT: aligning a permuted network recovers it exactly (MLP and CNN with BatchNorm); merging two
independently trained digits MLPs with DIMAT beats plain averaging; unsupported networks fail clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fedopt.dimat import align, dimat_merge, permute_hidden_units


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: torch's intra-op threads only fight over the shared cores (20x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise_bn(net):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


def _check_roundtrip(net, x):
    hidden = [m for m in net if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(m.weight.shape[0], generator=g) for m in hidden]
    shuffled = permute_hidden_units(net, perms, example=x)
    net.eval()
    shuffled.eval()
    torch.testing.assert_close(shuffled(x), net(x), rtol=1e-5, atol=1e-5)  # same function
    assert not torch.equal(shuffled[0].weight, net[0].weight)
    back = align(net, shuffled, x)
    for (k, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k  # exactly the original weights


def test_mlp_with_batchnorm_roundtrip():
    torch.manual_seed(0)
    net = _randomise_bn(
        nn.Sequential(
            nn.Linear(6, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 12),
            nn.Tanh(),
            nn.Dropout(0.1),
            nn.Linear(12, 3),
        )
    )
    _check_roundtrip(net, torch.randn(256, 6))


def test_cnn_with_batchnorm_and_flatten_roundtrip():
    torch.manual_seed(0)
    net = _randomise_bn(
        nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 3 * 3, 10),
            nn.ReLU(),
            nn.Linear(10, 4),
        )
    )
    _check_roundtrip(net, torch.randn(128, 1, 8, 8))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


@pytest.mark.parametrize(
    "net",
    [
        nn.Sequential(nn.Linear(4, 4), Residual(), nn.Linear(4, 2)),
        nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU()), nn.Linear(4, 2)),
        nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)),
        nn.LSTM(4, 4),
    ],
)
def test_unsupported_architecture_is_a_clear_error(net):
    with pytest.raises(ValueError, match="DIMAT"):
        align(net, net, torch.randn(2, 4))


def _train_digits_mlp(seed, x, y, steps=300):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net


def test_dimat_beats_plain_averaging_on_digits():
    from examples.digits import load_digits_tensors

    train, val = load_digits_tensors(0)
    (x, y), (xv, yv) = train.tensors, val.tensors
    a, b = _train_digits_mlp(1, x, y), _train_digits_mlp(2, x, y)

    def loss(net):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(net(xv), yv))

    plain = dimat_merge([a, a], x)  # a copy of a's structure
    with torch.no_grad():
        for p, pa, pb in zip(plain.parameters(), a.parameters(), b.parameters()):
            p.copy_((pa + pb) / 2)
    merged = dimat_merge([a, b], x[:512])
    print(
        f"val loss: a {loss(a):.3f}, b {loss(b):.3f}, plain average {loss(plain):.3f}, DIMAT {loss(merged):.3f}"
    )
    assert loss(merged) < 0.7 * loss(plain)


def _bn_mlp(seed):
    torch.manual_seed(seed)
    return _randomise_bn(
        nn.Sequential(
            nn.Linear(6, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 12),
            nn.BatchNorm1d(12),
            nn.Tanh(),
            nn.Linear(12, 3),
        )
    )


def _pre_bn_batch_stats(net, batches):
    """Written out: each batch through ``net`` in training mode (every BatchNorm normalises with the
    batch's own mean and biased variance); per BatchNorm, the batch means and unbiased variances of
    its input (the pre-BN activations), in float64."""
    stats = {}
    for x in batches:
        h = x.double()
        for i, m in enumerate(net):
            if isinstance(m, nn.BatchNorm1d):
                mean, var = h.mean(0), h.var(0, unbiased=True)
                stats.setdefault(i, []).append((mean, var))
                h = (h - mean) / torch.sqrt(h.var(0, unbiased=False) + m.eps)
                h = h * m.weight.double() + m.bias.double()
            elif isinstance(m, nn.Linear):
                h = h @ m.weight.double().T + m.bias.double()
            else:
                h = m(h)
    return stats


def test_merge_reestimates_batchnorm_statistics_on_the_inputs():
    """After dimat_merge of two BatchNorm MLPs, every BatchNorm's running statistics are those of its
    pre-BN activations in the *merged* net on the inputs: with momentum=None (cumulative) over three
    equal batches, running_mean = the mean of the batch means, running_var = the mean of the batch
    unbiased variances; one tensor of inputs gives its unbiased variance. Momentum and mode are restored."""
    a, b = _bn_mlp(0).eval(), _bn_mlp(1).eval()
    g = torch.Generator().manual_seed(3)
    # batches with very different statistics: an exponential moving average would weigh the last one
    batches = [torch.randn(64, 6, generator=g) * s + s for s in (0.5, 1.0, 3.0)]
    merged = dimat_merge([a, b], batches)
    stats = _pre_bn_batch_stats(merged, batches)
    norms = [(i, m) for i, m in enumerate(merged) if isinstance(m, nn.BatchNorm1d)]
    assert [i for i, _ in norms] == sorted(stats) == [1, 4]
    for i, m in norms:
        means = torch.stack([s[0] for s in stats[i]])
        variances = torch.stack([s[1] for s in stats[i]])
        torch.testing.assert_close(m.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var.double(), variances.mean(0), rtol=1e-5, atol=1e-6)
        assert int(m.num_batches_tracked) == 3 and m.momentum == 0.1
        # not the averaged (aligned) statistics of a and b, nor a momentum-0.1 running average
        assert (
            m.running_mean.double() - (a[i].running_mean.double() + b[i].running_mean.double()) / 2
        ).abs().max() > 0.1
        ema_mean = torch.zeros_like(means[0])
        for mu in means:
            ema_mean = 0.9 * ema_mean + 0.1 * mu
        assert (m.running_mean.double() - ema_mean).abs().max() > 0.1
    assert not merged.training  # the mode it had (re-estimation ran in training mode)
    # one tensor of inputs: the statistics of all of them
    x = torch.cat(batches)
    single = dimat_merge([a, b], x)
    stats = _pre_bn_batch_stats(single, [x])
    for i, m in enumerate(single):
        if isinstance(m, nn.BatchNorm1d):
            ((mean, var),) = stats[i]
            torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-6)
            assert int(m.num_batches_tracked) == 1
