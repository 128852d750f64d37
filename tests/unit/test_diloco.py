"""DiLoCo and streaming DiLoCo without processes: fragments and their events, checkpoint layouts,
argument checks, registered names (the real processes: tests/multiprocess/test_diloco.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_fedopt as lf
from lightning_fedopt.strategies.diloco.diloco import fragment_events, split_fragments, strided_fragments
from lightning_fedopt.strategies.diloco.fragments import assign_fragments, layer_keys, resolve_layout


def test_fragments_and_events():
    # the test net: Linear(4,16) weight 64, bias 16; Linear(16,1) weight 16, bias 1
    assert split_fragments([64, 16, 16, 1], 2) == [[0], [1, 2, 3]]
    assert split_fragments([64, 16, 16, 1], 4) == [[0], [1], [2], [3]]
    events = [fragment_events(s, 8, 2, 3) for s in range(1, 17)]
    assert events[3] == (0, None) and events[6] == (None, 0)  # launched after step 4, applied after 7
    assert events[7] == (1, None) and events[10] == (None, 1)
    # at most one fragment in flight at any time
    inflight = 0
    for launch, apply in events:
        inflight -= apply is not None
        inflight += launch is not None
        assert inflight <= 1


def test_inflight_round_from_a_checkpoint_of_either_counter_layout():
    """A round in flight saved in a checkpoint comes back with its counts, whether saved now
    (masked_sum's [weight, valid, invalid]) or before (the old [valid, invalid, summed steps])."""
    from lightning_fedopt.strategies.diloco.fragments import InFlight

    sums = [torch.ones(2)]
    old = {"fragment": 1, "apply_step": 7, "reduced": [*sums, torch.tensor([2.0, 1.0, 6.0])]}
    for state in (old, InFlight.from_state_dict(old, [0], torch.device("cpu")).state_dict()):
        f = InFlight.from_state_dict(state, [0], torch.device("cpu"))
        result = f.wait()
        assert (f.fragment, f.apply_step) == (1, 7)
        assert (result.weight, result.valid, result.invalid) == (6.0, 2, 1)
        assert torch.equal(result.sums[0], sums[0])


def test_strided_layout_keeps_layers_whole():
    """fragment_layout="strided": whole layers dealt round-robin (layer j to fragment j mod F), a
    module's weight and bias together, a numbered block's tensors together; contiguous splits
    the test net's first layer from its bias."""
    net = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert strided_fragments(net, 2) == [[0, 1], [2, 3]]
    assert split_fragments([64, 16, 16, 1], 2) == [[0], [1, 2, 3]]  # weight and bias apart
    gpt = [
        "wte.weight",
        "h.0.ln.weight",
        "h.0.ln.bias",
        "h.0.attn.c_attn.weight",
        "h.1.ln.weight",
        "h.1.attn.c_attn.weight",
        "h.2.mlp.fc.weight",
        "h.2.mlp.fc.bias",
        "ln_f.weight",
        "ln_f.bias",
        "bn.running_mean",
    ]
    assert layer_keys(gpt) == ["wte", "h.0", "h.0", "h.0", "h.1", "h.1", "h.2", "h.2", "ln_f", "ln_f", "bn"]
    # the repeated blocks h.0, h.1, h.2 dealt round-robin; the embedding goes with fragment 0,
    # the final norm and what follows with the last fragment
    assert strided_fragments(gpt, 3) == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    with pytest.raises(ValueError, match="repeated blocks"):
        strided_fragments(gpt, 4)
    assert strided_fragments(gpt, 1) == [list(range(len(gpt)))]
    with pytest.raises(ValueError, match="fragments"):
        strided_fragments(net, 3)  # two layers only
    # the default layout: strided where the model has enough layers, contiguous otherwise
    assert resolve_layout(net, 2, "auto") == "strided"
    assert resolve_layout(net, 3, "auto") == "contiguous"
    assert assign_fragments(net, [64, 16, 16, 1], 2, "auto") == [[0, 1], [2, 3]]
    assert assign_fragments(net, [64, 16, 16, 1], 3, "auto") == split_fragments([64, 16, 16, 1], 3)
    assert lf.DiLoCoStrategy(sync_every=8, fragments=2).fragment_layout == "auto"


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"sync_every": 0}, "sync_every"),
        ({"sync_every": 8, "fragments": 0}, "fragments"),
        ({"sync_every": 8, "fragments": 2, "sync_delay": 4}, "sync_delay"),
        ({"sync_every": 8, "sync_delay": -1}, "sync_delay"),
        ({"sync_every": 8, "fragments": 2, "mixing": 1.5}, "mixing"),
        ({"sync_every": 8, "mixing": -0.1}, "mixing"),
        ({"outer_optimizer": "NoSuchOptimizer"}, "outer_optimizer"),
        ({"outer_optimizer": lambda params: object()}, "outer_optimizer"),
        ({"outer_optimizer": torch.nn.Linear}, "outer_optimizer"),
        ({"outer_kwargs": {"lr": -1.0}}, "outer_kwargs"),
        ({"sync_every": 4, "fragments": 5}, "fragments"),
        ({"sync_every": 8, "fragments": 2, "fragment_layout": "by_size"}, "fragment_layout"),
        ({"sync_every": True}, "sync_every"),
        ({"sync_every": 8, "mixing": float("nan")}, "mixing"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lf.DiLoCoStrategy(**kwargs)


def test_registered_names():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="streaming_diloco", logger=False)
    assert isinstance(trainer.strategy, lf.DiLoCoStrategy) and trainer.strategy.fragments == 4
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="diloco_fork", logger=False)
    assert trainer.strategy.fragments == 1 and trainer.strategy._start_method == "fork"
