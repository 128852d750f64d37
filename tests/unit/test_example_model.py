"""The example model's options the benchmarks use: SGD momentum and the cosine learning rate."""

import math

import lightning as L
import pytest
import torch
from runners import trainer_kwargs

from examples.digits import DigitsClassifier, DigitsDataModule


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"optimizer": "adam"}, "optimizer"),
        ({"momentum": 1.0}, "momentum"),
        ({"schedule": "step"}, "schedule"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        DigitsClassifier(**kwargs)


def test_sgd_momentum_and_cosine_schedule_over_the_run():
    """SGD gets the momentum asked for, and the cosine schedule takes lr from its value at step 0 to 0
    at max_steps, stepped every optimizer step: lr_t = lr/2 (1 + cos(pi t / T))."""
    steps, lr = 8, 0.05
    seen: list[float] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = DigitsClassifier(hidden=8, lr=lr, optimizer="sgd", momentum=0.0, schedule="cosine")
    trainer = L.Trainer(**trainer_kwargs(devices=1, max_steps=steps, callbacks=[Record()]))
    trainer.fit(model, DigitsDataModule(batch_size=16))
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.0
    expected = [lr / 2 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
