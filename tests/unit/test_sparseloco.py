"""SparseLoCo (arXiv 2508.15706): the compressor against a single-process reference of the paper's
update written out here (not from the package's code), its exact byte count, the conservation of
its error feedback, and DiLoCo + SparseLoCo on two real processes (fork, gloo) against the
reference DiLoCo whose averaging is the reference SparseLoCo.

Per replica and tensor: ``e <- beta e + delta``; from every chunk of ``chunk`` values (the last
one may be shorter, ``L`` values) the ``k = max(1, round(L topk / chunk))`` largest ``|e|``; their
values ``v`` quantized together to ``B = 2**bits`` levels (``mu`` = mean, ``s`` = unbiased std of
``v - mu``, step ``h = range_sigmas s / B``, code ``clamp(round((v - mu) / h + B // 2), 0, B-1)``,
level of a code = ``mu`` + the mean of ``v - mu`` over the values with that code); ``e <- e - sent``.
The outer update is the mean of the replicas' messages (``average="replicas"``) or, per coordinate,
the mean over the replicas that sent it (``average="senders"``, the authors' code)."""

from __future__ import annotations

import math

import pytest
import torch
from sparseloco_reference import RefSparseLoCo, _x, ref_message, ref_nbytes

from lightning_fedopt.comm import Communicator
from lightning_fedopt.compression import SparseLoCo, get_compressor
from lightning_fedopt.compression.collective import all_reduce_compressed

CONFIGS = [
    dict(topk=4, chunk=16, beta=0.95, bits=2),
    dict(topk=3, chunk=10, beta=0.5, bits=1),
    dict(topk=7, chunk=32, beta=1.0, bits=4),
    dict(topk=2, chunk=8, beta=0.0, bits=8),
    dict(topk=128, chunk=4096, beta=0.95, bits=2),  # the authors' run: 3.125% of 64 x 64 tiles
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"k{c['topk']}c{c['chunk']}b{c['bits']}")
@pytest.mark.parametrize("n", [1, 37, 160, 5000])
def test_compressor_matches_the_reference(cfg, n):
    """Four rounds on random pseudo-gradients: the decoded message, the buffer and the bytes equal
    the reference's (tails shorter than a chunk included)."""
    c = SparseLoCo(**cfg)
    ref = RefSparseLoCo(cfg["topk"], cfg["chunk"], cfg["beta"], cfg["bits"])
    for rnd in range(4):
        delta = _x(n, seed=10 * n + rnd) * (1 + rnd)
        p = c.compress(delta, "w")
        want = ref.send("w", delta)
        torch.testing.assert_close(c.decompress(p), want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(c.state_dict()["w"]["error"], ref.e["w"], atol=1e-5, rtol=1e-6)
        assert p.nbytes == c.compressed_nbytes(n) == ref_nbytes(n, cfg["topk"], cfg["chunk"], cfg["bits"])
        assert p.tensors[0].dtype == torch.int16 and p.tensors[1].dtype == torch.uint8
        assert p.tensors[2].dtype == torch.float32 and p.tensors[2].numel() == 2 ** cfg["bits"]


def test_bytes_are_exact():
    """Indices (2 bytes), codes (bits / 8 bytes, packed) and the levels, nothing else; the default
    (128 of every 4096 values, 2 bits) sends 2.25 bytes per 32 values: 56x less than fp32."""
    c = get_compressor("sparseloco")
    assert (c.topk, c.chunk, c.beta, c.bits, c.average, c.density) == (
        128,
        4096,
        0.95,
        2,
        "replicas",
        0.03125,
    )
    n = 4096 * 10 + 100  # 10 full chunks of 128 + a tail of 100 values: round(100 * 128 / 4096) = 3
    k = 10 * 128 + 3
    assert c.selected(n) == k
    assert c.compressed_nbytes(n) == 2 * k + math.ceil(k / 4) + 16 == 2903
    assert c.compress(_x(n), "w").nbytes == 2903
    assert 4 * n / c.compressed_nbytes(n) == pytest.approx(56.6, abs=0.1)
    # through the compressed all-reduce (one process): the call's bytes are the message's
    comm, t = Communicator(), _x(n).view(10, 4106)
    call = all_reduce_compressed(comm, [t], c, names=["w"])
    assert (call.raw_bytes, call.compressed_bytes) == (4 * n, 2903) and c.totals.ratio == 4 * n / 2903
    # a tensor whose message would not be smaller travels dense: 3 values = 12 bytes < 2 + 1 + 16
    assert c.compressed_nbytes(3) == 19
    small = torch.tensor([1.0, -2.0, 3.0])
    all_reduce_compressed(comm, [small], c, names=["b"])
    assert small.tolist() == [1.0, -2.0, 3.0] and "b" not in c.state_dict()


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.95, 1.0])
def test_error_feedback_conserves_mass(beta):
    """sent + new buffer == beta * old buffer + delta, coordinate by coordinate (to rounding), and
    what is not sent stays in the buffer exactly."""
    c = SparseLoCo(topk=5, chunk=64, beta=beta)
    old = torch.zeros(1000)
    for rnd in range(5):
        delta = _x(1000, seed=rnd)
        sent = c.decompress(c.compress(delta, "w"))
        new = c.state_dict()["w"]["error"]
        torch.testing.assert_close(sent + new, beta * old + delta, atol=1e-6, rtol=0)
        kept = sent == 0
        assert torch.equal(new[kept], (beta * old + delta)[kept])
        assert int((~kept).sum()) == c.selected(1000)
        old = new


def test_average_replicas_or_senders():
    """``average="replicas"``: sum / R (the paper); ``"senders"``: per coordinate over the replicas that sent it
    (the authors' scatter_reduce mean); a coordinate nobody sent is 0 either way."""
    x0 = torch.tensor([5.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # sends 5 (at 0) and 1 (at 4)
    x1 = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 0.0])  # sends 3 (at 0) and 7 (at 6)
    for average, want in (
        ("replicas", [4.0, 0.0, 0.0, 0.0, 0.5, 0.0, 3.5, 0.0]),
        ("senders", [4.0, 0.0, 0.0, 0.0, 1.0, 0.0, 7.0, 0.0]),
    ):
        a, b = (SparseLoCo(topk=1, chunk=4, bits=8, average=average) for _ in range(2))
        pays = [a.compress(x0, "w"), b.compress(x1, "w")]
        assert torch.allclose(a.decompress_mean(pays), torch.tensor(want), atol=1e-6), average


def test_without_error_feedback_and_quantization_details():
    c = SparseLoCo(topk=2, chunk=4, error_feedback=False)
    x = torch.tensor([0.1, -3.0, 0.2, 2.0, 0.0, 0.3, -0.4, 0.5])
    assert torch.allclose(c.decompress(c.compress(x, "w")), ref_message(x, 2, 4), atol=1e-6)
    assert c.state_dict() == {}  # nothing kept
    # one selected value: sent exactly; equal values: one level, exact
    one = SparseLoCo(topk=1, chunk=8)
    assert one.decompress(one.compress(torch.tensor([0.5, -7.0, 0.1]), "w")).tolist() == [0.0, -7.0, 0.0]
    same = SparseLoCo(topk=4, chunk=4)
    assert same.decompress(same.compress(torch.full((4,), 2.5), "w")).tolist() == [2.5] * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`topk` must be at most `chunk` \(16\)"):
        SparseLoCo(topk=17, chunk=16)
    for kw, name in (
        ({"chunk": 0}, "chunk"),
        ({"chunk": 40000}, "chunk"),
        ({"topk": 0}, "topk"),
        ({"beta": 1.5}, "beta"),
        ({"bits": 3}, "bits"),
        ({"range_sigmas": 0.0}, "range_sigmas"),
        ({"average": "mean"}, "average"),
        ({"error_feedback": 1}, "error_feedback"),
    ):
        with pytest.raises(ValueError, match=f"`{name}`"):
            SparseLoCo(**kw)


# ---------------------------------------------------------------------- DiLoCo + SparseLoCo, 2 ranks
