"""Lottery-ticket rewinding (issue 4): opt-in, true copies, optimizer state reset, survives resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyModule, kept_masks, make_trainer, random_loader
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_prune import AtEpochs, OneShot, Polynomial, PruningScheduleCallback, Rewind, select_parameters


class Snapshot(pl.Callback):
    """Placed before the pruning callback: copies of the pruned tensors' trainable values at every epoch
    start and batch start, before any pruning or rewinding at that point."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def _take(self, key: tuple[str, int], pl_module: Any) -> None:
        self.at[key] = {t.name: t.tensor.detach().clone() for t in select_parameters(pl_module)}

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._take(("epoch", trainer.current_epoch), pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._take(("step", trainer.global_step), pl_module)


class AfterPruning(pl.Callback):
    """Placed after the pruning callback, at every epoch and batch start: the rewind target, the weights in use,
    the masks, the optimizer state and the number of pruning steps so far."""

    def __init__(self, callback: PruningScheduleCallback) -> None:
        self.callback = callback
        self.rows: dict[int, dict[str, Any]] = {}  # by epoch, at epoch starts
        self.at_step: dict[int, dict[str, Any]] = {}  # by global step, at batch starts

    def _row(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        saved = self.callback.state_dict()["rewind"]
        optimizer = trainer.optimizers[0]
        targets = select_parameters(pl_module)
        return {
            "saved": None if saved is None else {k: v.clone() for k, v in saved.items()},
            "effective": {t.name: t.tensor.detach().clone() for t in targets},
            "masks": kept_masks(self.callback),
            "target_state": [len(optimizer.state.get(t.tensor, {})) for t in targets],
            "bias_state": len(optimizer.state.get(pl_module.model.fc1.bias, {})),
            "steps": self.callback.state_dict()["steps"],
        }

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.rows[trainer.current_epoch] = self._row(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.at_step[trainer.global_step] = self._row(trainer, pl_module)


def _fit(callback: PruningScheduleCallback, max_epochs: int = 4, **kwargs: Any):
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    snapshot, after = Snapshot(), AfterPruning(callback)
    trainer = make_trainer([snapshot, callback, after], max_epochs=max_epochs, **kwargs)
    trainer.fit(module, random_loader())
    return module, snapshot, after


@pytest.mark.parametrize("rewind", ["init", Rewind(epoch=1)], ids=["init", "epoch1"])
def test_rewind_target_stays_a_true_copy_across_pruning_steps(rewind: Any) -> None:
    callback = PruningScheduleCallback(0.875, schedule=AtEpochs([1, 2, 3]), rewind=rewind, verbose=False)
    _, snapshot, after = _fit(callback)
    point = 0 if rewind == "init" else 1
    target = snapshot.at[("epoch", point)]
    for epoch in (1, 2, 3):  # three pruning steps, with training in between
        row = after.rows[epoch]
        for name, value in target.items():
            assert torch.equal(row["saved"][name], value), (epoch, name)  # never follows the live weights
            assert torch.equal(row["effective"][name], value * row["masks"][name]), (epoch, name)  # rewound
            if epoch > point:  # it did train in between
                assert not torch.equal(snapshot.at[("epoch", epoch)][name], value), (epoch, name)
        assert row["target_state"] == [0] * len(target)  # optimizer state dropped for the rewound tensors
        assert row["bias_state"] == 1  # and kept for the others (SGD momentum buffer)
    assert all(torch.equal(callback.state_dict()["rewind"][k], v) for k, v in target.items())


def test_rewind_late_to_a_step() -> None:
    callback = PruningScheduleCallback(
        0.8, schedule=Polynomial(start_epoch=1, end_epoch=3, every_n_steps=2), rewind=Rewind(step=3), verbose=False
    )
    module, snapshot, after = _fit(callback)
    target = snapshot.at[("step", 3)]
    assert all(torch.equal(callback.state_dict()["rewind"][k], v) for k, v in target.items())
    assert not all(torch.equal(snapshot.at[("step", 2)][k], v) for k, v in target.items())
    steps = sorted(after.at_step)
    pruned_at = [s for s, prev in zip(steps[1:], steps) if after.at_step[s]["steps"] > after.at_step[prev]["steps"]]
    assert pruned_at == [6, 8, 10, 12]  # every second step of the ramp (its start, epoch 1, is at 0)
    for step in pruned_at:  # right after each pruning step: the survivors back at step 3, no optimizer state
        row = after.at_step[step]
        for name, value in target.items():
            assert torch.equal(row["effective"][name], value * row["masks"][name]), (step, name)
            assert not torch.equal(snapshot.at[("step", step)][name], value), (step, name)  # it had trained
        assert row["target_state"] == [0] * len(target), step  # optimizer state dropped for the rewound tensors
        assert row["bias_state"] == 1, step  # and kept for the others (SGD momentum buffer)
    trained = after.at_step[7]  # one optimizer step after the first rewind: the optimizer state is new
    assert trained["target_state"] == [1] * len(target)


def test_rewind_is_off_by_default() -> None:
    callback = PruningScheduleCallback(0.5, schedule=AtEpochs([1, 2]), verbose=False)
    assert callback.rewind is None
    _, snapshot, after = _fit(callback, max_epochs=3)
    assert callback.state_dict()["rewind"] is None
    row = after.rows[2]
    before = snapshot.at[("epoch", 2)]
    assert all(torch.equal(row["effective"][k], before[k] * row["masks"][k]) for k in before)  # no reset
    assert all(state > 0 for state in row["target_state"])


def test_rewind_warns_for_pruning_before_the_point() -> None:
    callback = PruningScheduleCallback(0.5, schedule=OneShot(epoch=0), rewind=Rewind(epoch=1), verbose=False)
    with pytest.warns(UserWarning, match="before the rewind point"):
        _fit(callback, max_epochs=2)


@pytest.mark.parametrize("resume_after", [0, 1], ids=["before-capture", "after-capture"])
def test_rewind_target_survives_checkpoint_and_resume(tmp_path: Path, resume_after: int) -> None:
    def run(directory: Path, ckpt_path: str | None = None, seed: int = 0):
        pl.seed_everything(seed, verbose=False)
        module = TinyModule(optimizer="adam")
        callback = PruningScheduleCallback(0.875, schedule=AtEpochs([1, 2, 3]), rewind=Rewind(epoch=1), verbose=False)
        checkpoint = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer([callback, checkpoint], max_epochs=4, enable_checkpointing=True)
        trainer.fit(module, random_loader(), ckpt_path=ckpt_path)
        return module, callback

    full, full_cb = run(tmp_path / "a")
    resumed, resumed_cb = run(tmp_path / "b", str(tmp_path / "a" / f"epoch={resume_after}.ckpt"), seed=1)
    for name, value in full_cb.state_dict()["rewind"].items():
        assert torch.equal(resumed_cb.state_dict()["rewind"][name], value), name
    expected = full.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PruningScheduleCallback(0.5, rewind="start"), r"`rewind` must be None, 'init' or a Rewind"),
        (lambda: PruningScheduleCallback(0.5, rewind=3), r"`rewind` must be None, 'init' or a Rewind.*got 3"),
        (lambda: Rewind(epoch=-1), r"`Rewind\(epoch=...\)` must be an integer >= 0, got -1"),
        (lambda: Rewind(step=1.5), r"`Rewind\(step=...\)` must be an integer >= 0, got 1.5 \(float\)"),
        (lambda: Rewind(epoch=True), r"`Rewind\(epoch=...\)` must be an integer >= 0, got True \(bool\)"),
        (lambda: Rewind(epoch=1, step=2), r"`Rewind` takes one of `epoch` or `step`, got epoch=1, step=2"),
    ],
)
def test_rewind_bad_configuration_raises(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
