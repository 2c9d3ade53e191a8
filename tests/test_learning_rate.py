"""Learning rates that recover (issue 29): the warning computed from the configured scheduler, and the re-warm
that the optimizer sees at each pruning step, composed with the user's scheduler."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_prune import OneShot, Polynomial, PruningScheduleCallback
from lightning_prune.learning_rate import LearningRateRewarm
from tests.helpers import TinyModule, make_trainer, random_loader

BATCHES = 8  # random_loader(): 64 samples, batches of 8


class RecordingSGD(torch.optim.SGD):
    """SGD that records the rate of its first group at every step."""

    seen: list[float]

    def step(self, closure: Any = None) -> Any:
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


class Scheduled(TinyModule):
    def __init__(self, schedule: str = "constant", lr: float = 0.1) -> None:
        super().__init__(lr=lr)
        self.schedule = schedule
        self.optimizer: RecordingSGD | None = None

    def configure_optimizers(self) -> Any:
        opt = RecordingSGD(self.parameters(), lr=self.hparams.lr)
        opt.seen = []
        self.optimizer = opt
        if self.schedule == "constant":
            return opt
        if self.schedule == "cosine":
            total = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # per epoch
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _fit(module: pl.LightningModule, callbacks: list, max_epochs: int) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(callbacks, max_epochs=max_epochs, limit_train_batches=BATCHES)
    trainer.fit(module, random_loader(), random_loader(16))
    return trainer


def _oracle_factor(factor: float, decay: int, since: int | None) -> float:
    if since is None or since >= decay:
        return 1.0
    return 1.0 + (factor - 1.0) * 0.5 * (1.0 + math.cos(math.pi * since / decay))


def test_rewarm_rate_seen_by_the_optimizer_restarts_at_each_pruning_step() -> None:
    schedule = Polynomial(start_epoch=1, end_epoch=3, every_n_steps=4)
    pruning = PruningScheduleCallback(0.8, scope="global", schedule=schedule, verbose=False)
    rewarm = LearningRateRewarm(factor=3.0, decay_steps=3)
    module = Scheduled("constant", lr=0.1)
    _fit(module, [pruning, rewarm], max_epochs=4)
    seen = module.optimizer.seen  # type: ignore[union-attr]
    assert len(seen) == 4 * BATCHES
    # pruning steps: at global steps 12 (epoch 1 + 4 steps of 8), 16 (epoch 2), 20, 24 (epoch 3: final)
    pruned_at = [12, 16, 20, 24]
    expected = []
    for g in range(len(seen)):
        last = max((p for p in pruned_at if p <= g), default=None)
        expected.append(0.1 * _oracle_factor(3.0, 3, None if last is None else g - last))
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[12] == pytest.approx(0.3) and seen[11] == pytest.approx(0.1)
    assert module.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # type: ignore[union-attr]


def test_rewarm_composes_with_the_users_scheduler() -> None:
    pruning = PruningScheduleCallback(0.5, scope="global", schedule=OneShot(epoch=1), verbose=False)
    rewarm = LearningRateRewarm(factor=2.0, decay_steps=2, shape="linear")
    module = Scheduled("step", lr=0.4)  # StepLR per epoch: 0.4, 0.2, 0.1
    _fit(module, [pruning, rewarm], max_epochs=3)
    seen = module.optimizer.seen  # type: ignore[union-attr]
    scheduled = [0.4] * BATCHES + [0.2] * BATCHES + [0.1] * BATCHES
    factor = [1.0] * BATCHES + [2.0, 1.5] + [1.0] * (2 * BATCHES - 2)
    assert seen == pytest.approx([s * f for s, f in zip(scheduled, factor)], rel=1e-12)
    assert module.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # type: ignore[union-attr]


def test_rate_warning_when_a_cosine_leaves_little_after_the_ramp() -> None:
    pruning = PruningScheduleCallback(0.5, scope="global", schedule=Polynomial(1, 4), verbose=False)
    left = 0.5 * (1 + math.cos(math.pi * 32 / 40))  # cosine over 40 steps, the ramp ending at step 32
    text = rf"ramp ends \(optimizer step 32\) is {left:.0%} of its peak \({0.1 * left:.3g} vs 0.1\)"
    with pytest.warns(UserWarning, match=text):
        _fit(Scheduled("cosine"), [pruning], max_epochs=5)


@pytest.mark.parametrize(("schedule", "end"), [("constant", 4), ("cosine", 1)])
def test_rate_warning_not_raised_with_rate_left(schedule: str, end: int, recwarn: pytest.WarningsRecorder) -> None:
    pruning = PruningScheduleCallback(0.5, scope="global", schedule=Polynomial(0, end), verbose=False)
    _fit(Scheduled(schedule), [pruning], max_epochs=5)
    assert not [w for w in recwarn if "pruning ramp ends" in str(w.message)]


def test_rate_warning_with_an_epoch_scheduler() -> None:
    pruning = PruningScheduleCallback(0.5, scope="global", schedule=Polynomial(1, 3), verbose=False)
    with pytest.warns(UserWarning, match=r"\(epoch 3\) is 12%"):  # StepLR(gamma=0.5): 0.125 of the peak
        _fit(Scheduled("step"), [pruning], max_epochs=4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor": 0.5}, "`factor` must be in"),
        ({"decay_steps": 0}, "`decay_steps` must be an integer >= 1"),
        ({"shape": "step"}, "`shape` must be one of"),
    ],
)
def test_rewarm_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LearningRateRewarm(**kwargs)


def test_rewarm_needs_a_pruning_callback() -> None:
    with pytest.raises(ValueError, match="add a PruningScheduleCallback"):
        _fit(Scheduled(), [LearningRateRewarm()], max_epochs=1)
