"""Checkpoints and exact resume (issue 4): masks travel in the model's checkpoint, the callback's place in
the schedule in its own state, and a fresh model resumed with ``ckpt_path`` ends bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import resume_script
import torch
import torch.nn.utils.prune as prune
from helpers import MaskRecorder, SparsityRecorder, TinyModule, TinyNet, make_trainer, random_loader
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_prune import (
    AtEpochs,
    Polynomial,
    PruningScheduleCallback,
    restore_pruning,
    restore_pruning_on_load,
    select_parameters,
    sparsity_report,
)
from lightning_prune.masking import count_for
from lightning_prune.methods import resolve_method

HERE = Path(__file__).parent
X = torch.randn(5, 1, 10, 10, generator=torch.Generator().manual_seed(3))
HALVINGS = AtEpochs({0: 0.5, 1: 0.75, 2: 0.875})  # three halvings of the live weights


def _callback(case: dict[str, Any]) -> PruningScheduleCallback:
    return PruningScheduleCallback(
        case.get("sparsity", 0.875),
        method=case.get("method", "l1_unstructured"),
        scope=case.get("scope", "local"),
        schedule=case["schedule"],
        mask_mode=case.get("mask_mode", "hook"),
        verbose=False,
    )


def _run(case: dict[str, Any], dirpath: Path, ckpt_path: str | None = None, seed: int = 0, **ckpt: Any):
    """Fit TinyModule for 4 epochs of 4 batches with a ModelCheckpoint; a fresh model and callback each time."""
    pl.seed_everything(seed, verbose=False)
    module = TinyModule(optimizer=case.get("optimizer", "sgd"))
    callback, masks, sparsity = _callback(case), MaskRecorder(), SparsityRecorder()
    ckpt.setdefault("every_n_epochs", 1)
    checkpoint = ModelCheckpoint(dirpath=dirpath, filename="{epoch}-{step}", save_top_k=-1, **ckpt)
    trainer = make_trainer(
        [callback, masks, sparsity, checkpoint],
        max_epochs=4,
        enable_checkpointing=True,
        limit_train_batches=case.get("batches", 4),
    )
    trainer.fit(module, random_loader(), random_loader(16), ckpt_path=ckpt_path)
    return module, callback, masks, sparsity


RESUME_CASES = {
    "sgd-epochs-l1-local": {"optimizer": "sgd", "schedule": AtEpochs([0, 1, 2])},
    "adam-steps-l1-global": {
        "optimizer": "adam",
        "scope": "global",
        "schedule": Polynomial(start_epoch=0, end_epoch=3, every_n_steps=2),
    },
    "adamw-steps-random": {
        "optimizer": "adamw",
        "method": "random_unstructured",
        "schedule": Polynomial(start_epoch=1, end_epoch=3, every_n_steps=3),
    },
    "sgd-epochs-ln-structured": {"optimizer": "sgd", "method": "ln_structured", "schedule": AtEpochs([0, 2, 3])},
    "adam-steps-inplace-masks": {
        "optimizer": "adam",
        "mask_mode": "inplace",
        "schedule": Polynomial(start_epoch=0, end_epoch=3, every_n_steps=2),
    },
}


@pytest.mark.parametrize("case", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_epoch_boundary_is_bit_identical(tmp_path: Path, case: dict[str, Any]) -> None:
    """Stopped after epoch 0 (a checkpoint), resumed in a fresh model: same masks at every later step, same
    final weights bit for bit, with momentum and Adam states restored onto the right tensors."""
    full, full_cb, full_masks, full_sparsity = _run(case, tmp_path / "a")
    first = sorted((tmp_path / "a").glob("epoch=0-*.ckpt"))
    assert len(first) == 1
    resumed, resumed_cb, masks, sparsity = _run(case, tmp_path / "b", ckpt_path=str(first[0]), seed=1)

    steps = sorted(masks.zeros)
    assert steps[0] == 4 and steps[-1] == 15  # the resumed run starts at epoch 1
    for step in steps:
        for name, zeros in masks.zeros[step].items():
            assert torch.equal(zeros, full_masks.zeros[step][name]), (step, name)
        assert sparsity.at_step[step].zeros == full_sparsity.at_step[step].zeros
    assert resumed_cb.state_dict()["applied"] == full_cb.state_dict()["applied"]
    assert resumed_cb.state_dict()["steps"] == full_cb.state_dict()["steps"]
    expected, got = full.state_dict(), resumed.state_dict()
    assert list(got) == list(expected)  # made permanent: the unpruned keys, in the unpruned order
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert sparsity_report(resumed).sparsity == pytest.approx(0.875, abs=0.02)


def test_resume_mid_epoch_keeps_place_in_schedule(tmp_path: Path) -> None:
    """A checkpoint inside an epoch: the same steps prune, to the same counts, and the run ends as sparse."""
    case = {"schedule": Polynomial(start_epoch=0, end_epoch=3, every_n_steps=2), "batches": 5}
    _, full_cb, _, full_sparsity = _run(case, tmp_path / "a", every_n_epochs=None, every_n_train_steps=3)
    mid = tmp_path / "a" / "epoch=1-step=6.ckpt"  # epoch 1 has 5 batches: step 6 is its second
    assert mid.exists()
    resumed, resumed_cb, _, sparsity = _run(
        case, tmp_path / "b", ckpt_path=str(mid), seed=1, every_n_epochs=None, every_n_train_steps=3
    )
    assert sorted(sparsity.at_step) == list(range(6, 20))
    for step, report in sparsity.at_step.items():
        assert report.per_tensor() == full_sparsity.at_step[step].per_tensor(), step
    assert resumed_cb.state_dict()["applied"] == full_cb.state_dict()["applied"]
    assert resumed_cb.state_dict()["steps"] == full_cb.state_dict()["steps"]
    final = sparsity_report(resumed)
    assert [t.zeros for t in final.tensors] == [count_for(0.875, t.numel) for t in final.tensors]


def test_resume_keeps_parameter_order_of_the_optimizer(tmp_path: Path) -> None:
    """Torch's pruning appends ``weight_orig``; the callback keeps it in ``weight``'s slot, and a fresh model
    loading the checkpoint re-creates that order, so optimizer states restored by position fit."""
    case = {"optimizer": "sgd", "schedule": AtEpochs([0, 1, 2])}
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    before = [name.removesuffix("_orig") for name, _ in module.named_parameters()]
    callback = PruningScheduleCallback(0.5, schedule=case["schedule"], make_permanent=False, verbose=False)
    trainer = make_trainer([callback], max_epochs=1)
    trainer.fit(module, random_loader())
    assert [name for name, _ in module.named_parameters()][0] == "model.conv1.weight_orig"
    assert [name.removesuffix("_orig") for name, _ in module.named_parameters()] == before
    path = tmp_path / "masked.ckpt"
    trainer.save_checkpoint(path)

    fresh = TinyModule()
    restore_pruning_on_load(fresh)
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"], strict=True)
    assert [name for name, _ in fresh.named_parameters()] == [name for name, _ in module.named_parameters()]
    # a state dict from torch's own pruning (weight_orig appended after bias) is followed as it is
    net = TinyNet()
    prune.l1_unstructured(net.fc1, "weight", amount=10)
    other = TinyNet()
    restore_pruning(other, net.state_dict())
    assert list(other.fc1._parameters) == ["bias", "weight_orig"]


def _masked_checkpoint(tmp_path: Path, epochs: int = 2) -> tuple[Path, TinyModule]:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    callback = PruningScheduleCallback(schedule=HALVINGS, make_permanent=False, verbose=False)
    trainer = make_trainer([callback], max_epochs=epochs)  # mid-schedule (2 epochs: 0.75 on the way to 0.875)
    trainer.fit(module, random_loader())
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    assert any(k.endswith("weight_mask") for k in torch.load(path, weights_only=False)["state_dict"])
    return path, module


class AutoLoadingModule(TinyModule):
    """What a user writes for strict ``load_from_checkpoint`` of a pruned checkpoint: one line in ``__init__``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        restore_pruning_on_load(self)


class HookLoadingModule(TinyModule):
    """The alternative: re-create the masks in ``on_load_checkpoint``."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_pruning(self, checkpoint["state_dict"])


def test_restore_pruning_loads_masked_checkpoint_strictly(tmp_path: Path) -> None:
    path, live = _masked_checkpoint(tmp_path)
    state_dict = torch.load(path, weights_only=False)["state_dict"]
    live.eval()
    expected = live(X)

    with pytest.raises(RuntimeError, match="Missing key"):  # what plain torch does
        TinyModule().load_state_dict(state_dict, strict=True)

    fresh = TinyModule().eval()
    restored = restore_pruning(fresh, state_dict)
    assert restored == [t.name for t in select_parameters(live)]
    fresh.load_state_dict(state_dict, strict=True)
    assert torch.equal(fresh(X), expected)
    assert sparsity_report(fresh).per_tensor() == sparsity_report(live).per_tensor()

    for cls in (AutoLoadingModule, HookLoadingModule):
        loaded = cls.load_from_checkpoint(path, strict=True).eval()
        assert torch.equal(loaded(X), expected), cls.__name__


def test_restore_pruning_on_load_refreshes_masked_weights(tmp_path: Path) -> None:
    path, live = _masked_checkpoint(tmp_path)
    fresh = TinyModule()
    restore_pruning_on_load(fresh)
    assert restore_pruning_on_load(fresh) is restore_pruning_on_load(fresh)  # installed once
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"], strict=True)
    conv = fresh.model.conv1
    assert torch.equal(conv.weight, conv.weight_orig * conv.weight_mask)  # not stale until the next forward


def test_permanent_checkpoint_loads_as_is(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    trainer = make_trainer([PruningScheduleCallback(0.5, verbose=False)], max_epochs=1)
    trainer.fit(module, random_loader())
    path = tmp_path / "permanent.ckpt"
    trainer.save_checkpoint(path)
    loaded = TinyModule.load_from_checkpoint(path, strict=True).eval()
    assert torch.equal(loaded(X), module.eval()(X))
    assert sparsity_report(loaded).sparsity == pytest.approx(0.5, abs=0.01)


def test_resume_trainer_fit_restores_masks_into_fresh_model(tmp_path: Path) -> None:
    """``trainer.fit(fresh, ckpt_path=...)`` strict: the callback's load hook re-creates the masks. Resumed
    after the first of three halvings, the run reaches 0.875 (Lightning's ModelPruning stops at 0.75)."""
    path, live = _masked_checkpoint(tmp_path, epochs=1)
    assert sparsity_report(live).sparsity == pytest.approx(0.5, abs=0.01)
    fresh = TinyModule()
    callback = PruningScheduleCallback(schedule=HALVINGS, make_permanent=False, verbose=False)
    recorder = SparsityRecorder()
    trainer = make_trainer([callback, recorder], max_epochs=3)
    trainer.fit(fresh, random_loader(), ckpt_path=path)
    assert sorted(recorder.at_epoch) == [1, 2]
    assert recorder.at_epoch[1].sparsity == pytest.approx(0.75, abs=0.01)
    assert recorder.at_epoch[2].sparsity == pytest.approx(0.875, abs=0.01)  # the third halving came


class EvalModule(TinyModule):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)


def test_validate_and_test_with_ckpt_path_load_masks_into_fresh_model(tmp_path: Path) -> None:
    path, live = _masked_checkpoint(tmp_path)
    for run in ("validate", "test"):
        fresh = EvalModule()
        trainer = make_trainer([PruningScheduleCallback(schedule=HALVINGS, verbose=False)])
        getattr(trainer, run)(fresh, random_loader(16), ckpt_path=path, verbose=False)
        assert sparsity_report(fresh).per_tensor() == sparsity_report(live).per_tensor(), run


class SavedZeros(pl.Callback):
    """Stores, in each checkpoint, which entries are zero in the live model as it is saved."""

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        with torch.no_grad():
            checkpoint["live_zeros"] = {t.name: t.effective() == 0 for t in select_parameters(pl_module)}
        checkpoint["live_masked"] = any(t.is_masked for t in select_parameters(pl_module))


class Crash(pl.Callback):
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 13:
            raise RuntimeError("crash for the on_exception checkpoint")


def test_model_checkpoint_saves_live_masks_on_every_trigger(tmp_path: Path) -> None:
    """Step, epoch, ``save_last``, exception and end-of-training checkpoints: each holds the masks (or, after
    ``make_permanent``, the zeros) of the live model at that moment."""

    def callback() -> PruningScheduleCallback:
        return PruningScheduleCallback(
            0.875, schedule=Polynomial(start_epoch=0, end_epoch=3, every_n_steps=2), verbose=False
        )

    pl.seed_everything(0, verbose=False)
    crashing = make_trainer(
        [
            callback(),
            SavedZeros(),
            Crash(),
            ModelCheckpoint(dirpath=tmp_path, filename="s{step}", every_n_train_steps=3, save_top_k=-1),
            ModelCheckpoint(dirpath=tmp_path, filename="e{epoch}", save_top_k=-1, save_last=True),
            ModelCheckpoint(dirpath=tmp_path, filename="x{step}", save_on_exception=True, every_n_epochs=0),
        ],
        max_epochs=4,
        enable_checkpointing=True,
    )
    with pytest.raises(RuntimeError, match="crash"):
        crashing.fit(TinyModule(), random_loader(), random_loader(16))
    end = ModelCheckpoint(dirpath=tmp_path / "end", save_last=True, every_n_epochs=0)
    trainer = make_trainer([callback(), SavedZeros(), end], max_epochs=4, enable_checkpointing=True)
    trainer.fit(TinyModule(), random_loader(), random_loader(16))

    names = {f.name for f in tmp_path.glob("*.ckpt")}
    assert {"sstep=3.ckpt", "sstep=12.ckpt", "eepoch=0.ckpt", "eepoch=2.ckpt", "last.ckpt", "xstep=13.ckpt"} <= names
    assert (tmp_path / "end" / "last.ckpt").exists()
    masked = 0
    for file in [*tmp_path.glob("*.ckpt"), tmp_path / "end" / "last.ckpt"]:
        checkpoint = torch.load(file, weights_only=False)
        fresh = TinyModule()
        restore_pruning(fresh, checkpoint["state_dict"])
        fresh.load_state_dict(checkpoint["state_dict"], strict=True)
        saved = {t.name: t.effective() == 0 for t in select_parameters(fresh)}
        assert checkpoint["live_zeros"].keys() == saved.keys()
        for name, zeros in checkpoint["live_zeros"].items():
            assert torch.equal(saved[name], zeros), (file.name, name)
        has_masks = any(k.endswith("_mask") for k in checkpoint["state_dict"])
        assert has_masks == checkpoint["live_masked"], file.name
        masked += has_masks
    assert masked == len(names)  # the crashing run never reached make_permanent
    assert not any(k.endswith("_mask") for k in torch.load(tmp_path / "end" / "last.ckpt")["state_dict"])


def test_l1_importance_uses_orig_times_mask_not_stale_weight() -> None:
    """After a step changes ``weight_orig``, torch's cached ``weight`` is stale until the next forward; the
    ranking must use ``weight_orig * weight_mask``."""
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    net = nn.Sequential(layer)
    method = resolve_method("l1_unstructured")
    method.prune_local(select_parameters(net), [0.25], seed=0)
    assert layer.weight_mask.tolist() == [[0.0, 1.0, 1.0, 1.0]]
    with torch.no_grad():
        layer.weight_orig.copy_(torch.tensor([[1.0, 10.0, 0.5, 4.0]]))  # no forward: layer.weight is stale
    assert layer.weight.tolist() == [[0.0, 2.0, 3.0, 4.0]]
    method.prune_local(select_parameters(net), [0.5], seed=1)
    assert layer.weight_mask.tolist() == [[0.0, 1.0, 0.0, 1.0]]  # 0.5 pruned, not the stale 2.0
    method.prune_global(select_parameters(net), 0.75, seed=2)
    assert layer.weight_mask.tolist() == [[0.0, 1.0, 0.0, 0.0]]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_reaches_final_sparsity(tmp_path: Path) -> None:
    """Kill -9 inside an epoch, run the same command again: it resumes from ``last.ckpt`` and ends at the
    same sparsity as an uninterrupted run; every checkpoint left behind loads."""
    command = [sys.executable, str(HERE / "resume_script.py"), str(tmp_path), "--pause-at-step", "8"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "paused").exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
            assert time.monotonic() < deadline, "the script never reached the pause"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (tmp_path / "final.pt").exists()
    for file in tmp_path.glob("*.ckpt"):
        torch.load(file, weights_only=False)  # nothing half-written
    assert (tmp_path / "last.ckpt").exists()

    done = subprocess.run(command, env=env, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert final["resumed_from_step"] == 8  # checkpoints every 2 steps: step 8 is epoch 1, batch 3 of 5
    (tmp_path / "reference").mkdir()
    reference = resume_script.run(tmp_path / "reference")  # the same run, never interrupted
    assert reference["resumed_from_step"] is None
    assert final["zeros"] == reference["zeros"]
    assert (final["steps"], final["applied"]) == (reference["steps"], reference["applied"])
    assert reference["applied"]["model.fc1.weight"] == pytest.approx(0.875)
    for file in tmp_path.glob("*.ckpt"):
        torch.load(file, weights_only=False)
