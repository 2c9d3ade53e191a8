"""Checkpoints and exact resume (issue 4): a checkpoint's ``state_dict`` holds the model's own keys (zeros at
the pruned entries) in either mask mode, the masks (bit-packed) and the callback's place in the schedule travel
in its state, and a fresh model resumed with ``ckpt_path`` ends bit-identical. Version 0.1 checkpoints (torch's
``weight_orig``/``weight_mask`` keys) load into plain models and resume through the callback."""

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
from helpers import (
    MaskRecorder,
    SparsityRecorder,
    TinyModule,
    expected_zeros,
    kept_masks,
    l1_reference,
    make_trainer,
    ramp,
    random_loader,
    tensors_of,
    trainable,
    unpack_mask,
    weight_in_use,
    weights,
    zero_counts,
    zero_sets,
)
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_prune import AtEpochs, Polynomial, PruningScheduleCallback, select_parameters
from lightning_prune.migration import convert_on_load, upgrade_state_dict
from lightning_prune.reparam import loaded_masks

HERE = Path(__file__).parent
X = torch.randn(5, 1, 10, 10, generator=torch.Generator().manual_seed(3))
HALVINGS = AtEpochs({0: 0.5, 1: 0.75, 2: 0.875})  # three halvings of the live weights
PLAIN_KEYS = list(TinyModule().state_dict())
# a checkpoint's keys (in hook mode ``weight`` takes the place of torch's ``weight_orig``, after ``bias``)
OWN_KEYS = sorted(PLAIN_KEYS)
ALL = [f"model.{n}.weight" for n in ("conv1", "conv2", "fc1", "fc2", "fc3")]
MODES = ["inplace", "hook"]


def _callback(case: dict[str, Any]) -> PruningScheduleCallback:
    return PruningScheduleCallback(
        case.get("sparsity", 0.875),
        method=case.get("method", "l1_unstructured"),
        scope=case.get("scope", "local"),
        schedule=case["schedule"],
        mask_mode=case.get("mask_mode", "inplace"),
        verbose=False,
    )


class MasksAtEnd(pl.Callback):
    """Placed before the pruning callback: its masks just before ``make_permanent`` drops them."""

    def __init__(self, pruning: PruningScheduleCallback) -> None:
        self.pruning = pruning
        self.masks: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.masks = kept_masks(self.pruning)


def _run(case: dict[str, Any], dirpath: Path, ckpt_path: str | None = None, seed: int = 0, **ckpt: Any):
    """Fit TinyModule for 4 epochs of 4 batches with a ModelCheckpoint; a fresh model and callback each time."""
    pl.seed_everything(seed, verbose=False)
    module = TinyModule(optimizer=case.get("optimizer", "sgd"))
    callback, masks, sparsity = _callback(case), MaskRecorder(), SparsityRecorder()
    at_end = MasksAtEnd(callback)
    ckpt.setdefault("every_n_epochs", 1)
    checkpoint = ModelCheckpoint(dirpath=dirpath, filename="{epoch}-{step}", save_top_k=-1, **ckpt)
    trainer = make_trainer(
        [at_end, callback, masks, sparsity, checkpoint],
        max_epochs=4,
        enable_checkpointing=True,
        limit_train_batches=case.get("batches", 4),
    )
    trainer.fit(module, random_loader(), random_loader(16), ckpt_path=ckpt_path)
    return module, callback, masks, sparsity, at_end.masks


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
    "sgd-epochs-ln-structured-hook": {
        "optimizer": "sgd",
        "method": "ln_structured",
        "schedule": AtEpochs([0, 2, 3]),
        "mask_mode": "hook",
    },
    "adam-steps-l1-hook": {
        "optimizer": "adam",
        "mask_mode": "hook",
        "schedule": Polynomial(start_epoch=0, end_epoch=3, every_n_steps=2),
    },
}


@pytest.mark.parametrize("case", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_epoch_boundary_is_bit_identical(tmp_path: Path, case: dict[str, Any]) -> None:
    """Stopped after epoch 0 (a checkpoint), resumed in a fresh model: same masks at every later step, same
    final weights and kept masks bit for bit, with momentum and Adam states restored onto the right tensors."""
    full, full_cb, full_masks, full_sparsity, full_kept = _run(case, tmp_path / "a")
    first = sorted((tmp_path / "a").glob("epoch=0-*.ckpt"))
    assert len(first) == 1
    assert sorted(torch.load(first[0], weights_only=False)["state_dict"]) == OWN_KEYS  # the model's own keys
    resumed, resumed_cb, masks, sparsity, kept = _run(case, tmp_path / "b", ckpt_path=str(first[0]), seed=1)

    steps = sorted(masks.zeros)
    assert steps[0] == 4 and steps[-1] == 15  # the resumed run starts at epoch 1
    for step in steps:
        for name, zeros in masks.zeros[step].items():
            assert torch.equal(zeros, full_masks.zeros[step][name]), (step, name)
        assert sparsity.at_step[step].zeros == full_sparsity.at_step[step].zeros
    assert resumed_cb.state_dict()["applied"] == full_cb.state_dict()["applied"]
    assert resumed_cb.state_dict()["steps"] == full_cb.state_dict()["steps"]
    assert list(kept) == list(full_kept) == ALL  # the callback's masks at the end, before make_permanent
    for name, mask in full_kept.items():
        assert mask.dtype == torch.uint8 and torch.equal(kept[name], mask), name
    expected, got = full.state_dict(), resumed.state_dict()
    assert list(got) == list(expected) == PLAIN_KEYS  # made permanent: the unpruned keys, in the unpruned order
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert zero_counts(resumed).sparsity == pytest.approx(0.875, abs=0.02)
    for file in (tmp_path / "b").glob("*.ckpt"):  # what the resumed run wrote: the model's own keys too
        assert sorted(torch.load(file, weights_only=False)["state_dict"]) == OWN_KEYS, file.name


def test_resume_mid_epoch_keeps_place_in_schedule(tmp_path: Path) -> None:
    """A checkpoint inside an epoch: the same steps prune, to the same counts, and the run ends as sparse."""
    case = {"schedule": Polynomial(start_epoch=0, end_epoch=3, every_n_steps=2), "batches": 5}
    _, full_cb, _, full_sparsity, full_kept = _run(case, tmp_path / "a", every_n_epochs=None, every_n_train_steps=3)
    mid = tmp_path / "a" / "epoch=1-step=6.ckpt"  # epoch 1 has 5 batches: step 6 is its second
    assert mid.exists()
    resumed, resumed_cb, _, sparsity, kept = _run(
        case, tmp_path / "b", ckpt_path=str(mid), seed=1, every_n_epochs=None, every_n_train_steps=3
    )
    assert sorted(sparsity.at_step) == list(range(6, 20))
    for step, report in sparsity.at_step.items():
        assert report.per_tensor() == full_sparsity.at_step[step].per_tensor(), step
    assert resumed_cb.state_dict()["applied"] == full_cb.state_dict()["applied"]
    assert resumed_cb.state_dict()["steps"] == full_cb.state_dict()["steps"]
    # (not bit for bit: Lightning starts a resumed epoch's dataloader from its first batch)
    assert [int((m == 0).sum()) for m in kept.values()] == [int((m == 0).sum()) for m in full_kept.values()]
    final = zero_counts(resumed)
    assert [t.zeros for t in final.tensors] == [expected_zeros(0.875, t.numel) for t in final.tensors]


@pytest.mark.parametrize("mask_mode", MODES)
def test_resume_keeps_parameter_order_of_the_optimizer(tmp_path: Path, mask_mode: str) -> None:
    """Optimizer states are saved and restored by position: a fresh model resumed from a checkpoint has its
    optimizer over its parameters in the model's order, with the saved states on the right tensors; torch's
    reparametrization (hook mode) leaves the parameters in their order at the end."""
    names = [name for name, _ in TinyModule().named_parameters()]
    seen: dict[str, Any] = {}

    class Probe(pl.Callback):  # placed after the pruning callback: once the masks are back
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            optimizer = trainer.optimizers[0]
            by_id = {id(p): n.removesuffix("_orig") for n, p in pl_module.named_parameters()}
            params = optimizer.param_groups[0]["params"]
            seen["order"] = [by_id[id(p)] for p in params]
            seen["momentum"] = [optimizer.state[p]["momentum_buffer"].clone() for p in params]

    def callback() -> PruningScheduleCallback:
        return PruningScheduleCallback(0.5, schedule=AtEpochs([0, 1, 2]), mask_mode=mask_mode, verbose=False)

    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer([callback(), checkpoint], max_epochs=2, enable_checkpointing=True)
    trainer.fit(module, random_loader())
    assert [name for name, _ in module.named_parameters()] == names  # the order the model was built with
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)
    assert sorted(saved["state_dict"]) == OWN_KEYS

    fresh = TinyModule()
    trainer = make_trainer([callback(), Probe()], max_epochs=2)
    trainer.fit(fresh, random_loader(), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert seen["order"] == names
    state = saved["optimizer_states"][0]["state"]
    for i, (name, momentum) in enumerate(zip(names, seen["momentum"])):
        assert torch.equal(momentum, state[i]["momentum_buffer"]), name  # on the tensor it belongs to
    assert [name for name, _ in fresh.named_parameters()] == names


def _masked_checkpoint(
    tmp_path: Path, epochs: int = 2, mask_mode: str = "inplace"
) -> tuple[Path, TinyModule, PruningScheduleCallback]:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    callback = PruningScheduleCallback(schedule=HALVINGS, make_permanent=False, verbose=False, mask_mode=mask_mode)
    trainer = make_trainer([callback], max_epochs=epochs)  # mid-schedule (2 epochs: 0.75 on the way to 0.875)
    trainer.fit(module, random_loader())
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    return path, module, callback


def _v01_checkpoint(tmp_path: Path) -> tuple[Path, TinyModule]:
    """A checkpoint as version 0.1 wrote it after the first of the HALVINGS: the model's state in torch's form
    (``weight_orig``, ``weight_mask``), built here with ``torch.nn.utils.prune``, in a checkpoint that Lightning
    wrote (loops, optimizer states), with 0.1's callback state (its masks were in the model's state). Returns
    the path and the pruned model, in torch's form."""
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    trainer = make_trainer([], max_epochs=1)
    trainer.fit(module, random_loader())
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    checkpoint = torch.load(tmp_path / "dense.ckpt", weights_only=False)
    for t in select_parameters(module):
        prune.l1_unstructured(t.module, t.param, amount=0.5)
    checkpoint["state_dict"] = module.state_dict()
    assert "model.fc1.weight_orig" in checkpoint["state_dict"] and "model.fc1.weight" not in checkpoint["state_dict"]
    key = PruningScheduleCallback(schedule=HALVINGS).state_key
    checkpoint["callbacks"][key] = {"applied": dict.fromkeys(ALL, 0.5), "steps": 1, "rewind": None}
    path = tmp_path / "v01.ckpt"
    torch.save(checkpoint, path)
    return path, module


class AutoLoadingModule(TinyModule):
    """What a user writes for strict ``load_from_checkpoint`` of a 0.1 checkpoint: one line in ``__init__``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        convert_on_load(self)


@pytest.mark.parametrize("mask_mode", MODES)
def test_checkpoint_holds_the_models_own_keys_and_loads_into_the_plain_class(tmp_path: Path, mask_mode: str) -> None:
    path, live, callback = _masked_checkpoint(tmp_path, mask_mode=mask_mode)
    checkpoint = torch.load(path, weights_only=False)
    assert sorted(checkpoint["state_dict"]) == OWN_KEYS
    live.eval()
    expected = live(X)

    fresh = TinyModule().eval()
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)  # plain torch, nothing of ours
    assert torch.equal(fresh(X), expected)
    masks = kept_masks(callback)
    assert list(masks) == ALL
    for name, zeros in zero_sets(fresh).items():
        assert torch.equal(zeros, masks[name] == 0), name
        assert int(zeros.sum()) == expected_zeros(0.75, zeros.numel()), name
    loaded = TinyModule.load_from_checkpoint(path, strict=True).eval()
    assert torch.equal(loaded(X), expected)

    state = next(v for k, v in checkpoint["callbacks"].items() if "PruningScheduleCallback" in k)
    assert state["steps"] == 2 and list(state["masks"]) == ALL
    for name, entry in state["masks"].items():
        assert entry["bits"].dtype == torch.uint8 and torch.equal(unpack_mask(entry), masks[name]), name


def test_v01_checkpoint_loads_into_a_plain_model(tmp_path: Path) -> None:
    path, old = _v01_checkpoint(tmp_path)
    state_dict = torch.load(path, weights_only=False)["state_dict"]
    old.eval()
    expected = old(X)
    old_masks = {name: getattr(owner, p + "_mask").clone() for name, owner, p in tensors_of(old)}

    with pytest.raises(RuntimeError, match="Missing key"):  # what plain torch does
        TinyModule().load_state_dict(state_dict, strict=True)

    plain, masks = upgrade_state_dict(state_dict)
    assert set(plain) == set(PLAIN_KEYS) and list(masks) == ALL
    fresh = TinyModule().eval()
    fresh.load_state_dict(plain, strict=True)
    assert torch.equal(fresh(X), expected)
    for name, mask in old_masks.items():
        assert masks[name].dtype == torch.uint8 and torch.equal(masks[name], mask.to(torch.uint8)), name
        assert torch.equal(fresh.get_parameter(name).detach() == 0, mask == 0), name

    loaded = AutoLoadingModule.load_from_checkpoint(path, strict=True).eval()
    assert convert_on_load(loaded) is convert_on_load(loaded)  # installed once
    assert torch.equal(loaded(X), expected)
    assert list(loaded.state_dict()) == PLAIN_KEYS
    assert all(torch.equal(loaded_masks(loaded)[n], masks[n]) for n in ALL)


def test_v01_checkpoint_resumes_through_fit_with_the_callback(tmp_path: Path) -> None:
    """``trainer.fit(fresh, ckpt_path=<0.1 checkpoint>)`` strict: the callback converts the model's state, takes
    the masks, and the schedule goes on from its place (the second and third halvings), pruned entries staying
    pruned; what this run saves holds the model's own keys."""
    path, old = _v01_checkpoint(tmp_path)
    old_masks = {name: getattr(owner, p + "_mask").to(torch.uint8) for name, owner, p in tensors_of(old)}
    seen: dict[str, torch.Tensor] = {}

    class Probe(pl.Callback):  # placed after the pruning callback: the masks it took from the checkpoint
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            seen.update(kept_masks(callback))

    fresh = TinyModule()
    callback = PruningScheduleCallback(schedule=HALVINGS, make_permanent=False, verbose=False)
    recorder, zeros = SparsityRecorder(), MaskRecorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "new", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer([callback, Probe(), recorder, zeros, checkpoint], max_epochs=3, enable_checkpointing=True)
    trainer.fit(fresh, random_loader(), ckpt_path=path)
    assert list(seen) == ALL and all(torch.equal(seen[n], old_masks[n]) for n in ALL)
    assert sorted(recorder.at_epoch) == [1, 2]
    for epoch, target in ((1, 0.75), (2, 0.875)):
        for t in recorder.at_epoch[epoch].tensors:
            assert t.zeros == expected_zeros(target, t.numel), (epoch, t.name)
    for step, zero_set in zeros.zeros.items():
        for name, mask in old_masks.items():
            assert bool(zero_set[name][mask == 0].all()), (step, name)  # pruned in 0.1: still pruned
    assert callback.state_dict()["steps"] == 3
    for file in (tmp_path / "new").glob("*.ckpt"):
        assert sorted(torch.load(file, weights_only=False)["state_dict"]) == OWN_KEYS, file.name


def test_permanent_checkpoint_loads_as_is(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    trainer = make_trainer([PruningScheduleCallback(0.5, verbose=False)], max_epochs=1)
    trainer.fit(module, random_loader())
    path = tmp_path / "permanent.ckpt"
    trainer.save_checkpoint(path)
    loaded = TinyModule.load_from_checkpoint(path, strict=True).eval()
    assert torch.equal(loaded(X), module.eval()(X))
    assert all(t.zeros == expected_zeros(0.5, t.numel) for t in zero_counts(loaded).tensors)


@pytest.mark.parametrize("mask_mode", MODES)
def test_resume_trainer_fit_restores_masks_into_fresh_model(tmp_path: Path, mask_mode: str) -> None:
    """``trainer.fit(fresh, ckpt_path=...)`` strict: the callback's state brings the masks back. Resumed after the
    first of three halvings, the run reaches 0.875 (Lightning's ModelPruning stops at 0.75)."""
    path, live, first = _masked_checkpoint(tmp_path, epochs=1, mask_mode=mask_mode)
    saved = kept_masks(first)
    assert all(t.zeros == expected_zeros(0.5, t.numel) for t in zero_counts(live).tensors)
    fresh = TinyModule()
    callback = PruningScheduleCallback(schedule=HALVINGS, make_permanent=False, verbose=False, mask_mode=mask_mode)
    recorder = SparsityRecorder()
    trainer = make_trainer([callback, recorder], max_epochs=3)
    trainer.fit(fresh, random_loader(), ckpt_path=path)
    assert sorted(recorder.at_epoch) == [1, 2]
    for epoch, target in ((1, 0.75), (2, 0.875)):  # the third halving came
        assert all(t.zeros == expected_zeros(target, t.numel) for t in recorder.at_epoch[epoch].tensors), epoch
    for name, mask in kept_masks(callback).items():
        assert bool((mask <= saved[name]).all()), name  # pruned before the checkpoint: still pruned


class EvalModule(TinyModule):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)


@pytest.mark.parametrize("kind", ["current", "v0.1"])
def test_validate_and_test_with_ckpt_path_load_masks_into_fresh_model(tmp_path: Path, kind: str) -> None:
    if kind == "current":
        path, live, _ = _masked_checkpoint(tmp_path)
    else:
        path, live = _v01_checkpoint(tmp_path)
    for run in ("validate", "test"):
        fresh = EvalModule()
        trainer = make_trainer([PruningScheduleCallback(schedule=HALVINGS, verbose=False)])
        getattr(trainer, run)(fresh, random_loader(16), ckpt_path=path, verbose=False)
        assert list(fresh.state_dict()) == PLAIN_KEYS, run
        assert zero_counts(fresh).per_tensor() == zero_counts(live).per_tensor(), run


class SavedZeros(pl.Callback):
    """Stores, in each checkpoint, which entries are zero in the live model as it is saved, and the masks the
    pruning callback keeps at that moment."""

    def __init__(self, pruning: PruningScheduleCallback) -> None:
        self.pruning = pruning

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint["live_zeros"] = zero_sets(pl_module)
        checkpoint["live_masks"] = kept_masks(self.pruning)


class Crash(pl.Callback):
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 13:
            raise RuntimeError("crash for the on_exception checkpoint")


@pytest.mark.parametrize("mask_mode", MODES)
def test_model_checkpoint_saves_live_masks_on_every_trigger(tmp_path: Path, mask_mode: str) -> None:
    """Step, epoch, ``save_last``, exception and end-of-training checkpoints: each holds the model's own keys with
    the zeros of the live model at that moment, and the masks the callback keeps then (none after
    ``make_permanent``)."""

    def callback() -> PruningScheduleCallback:
        return PruningScheduleCallback(
            0.875, schedule=Polynomial(start_epoch=0, end_epoch=3, every_n_steps=2), verbose=False, mask_mode=mask_mode
        )

    pl.seed_everything(0, verbose=False)
    pruning = callback()
    crashing = make_trainer(
        [
            pruning,
            SavedZeros(pruning),
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
    pruning = callback()
    trainer = make_trainer([pruning, SavedZeros(pruning), end], max_epochs=4, enable_checkpointing=True)
    trainer.fit(TinyModule(), random_loader(), random_loader(16))

    names = {f.name for f in tmp_path.glob("*.ckpt")}
    assert {"sstep=3.ckpt", "sstep=12.ckpt", "eepoch=0.ckpt", "eepoch=2.ckpt", "last.ckpt", "xstep=13.ckpt"} <= names
    assert (tmp_path / "end" / "last.ckpt").exists()
    with_masks = 0
    for file in [*tmp_path.glob("*.ckpt"), tmp_path / "end" / "last.ckpt"]:
        checkpoint = torch.load(file, weights_only=False)
        assert sorted(checkpoint["state_dict"]) == OWN_KEYS, file.name
        fresh = TinyModule()
        fresh.load_state_dict(checkpoint["state_dict"], strict=True)
        saved = zero_sets(fresh)
        assert checkpoint["live_zeros"].keys() == saved.keys()
        for name, zeros in checkpoint["live_zeros"].items():
            assert torch.equal(saved[name], zeros), (file.name, name)
        state = next(v for k, v in checkpoint["callbacks"].items() if "PruningScheduleCallback" in k)
        assert state["masks"].keys() == checkpoint["live_masks"].keys(), file.name
        for name, mask in checkpoint["live_masks"].items():
            assert torch.equal(unpack_mask(state["masks"][name]), mask), (file.name, name)
        with_masks += bool(state["masks"])
    assert with_masks == len(names)  # the crashing run never reached make_permanent
    last = torch.load(tmp_path / "end" / "last.ckpt", weights_only=False)
    assert last["live_masks"] == {}  # saved after make_permanent: no masks, the zeros in the weights
    assert sum(int(z.sum()) for z in last["live_zeros"].values()) > 0


@pytest.mark.parametrize("mask_mode", MODES)
def test_l1_ranks_the_weights_in_use_after_they_changed(mask_mode: str) -> None:
    """Weights changed between pruning steps without a forward pass (in hook mode, torch's cached ``weight`` is
    then stale): each step ranks the weights the model uses by magnitude, as a sorting reference does."""
    name = "model.fc3.weight"
    record: dict[str, dict[int, torch.Tensor]] = {"in_use": {}, "before": {}, "after": {}}

    class Rewrite(pl.Callback):  # placed before the pruning callback: new weights right before its step
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            epoch = trainer.current_epoch
            if epoch == 0:
                return
            (target,) = callback.targets
            mask = callback.masks.mask(target)
            new = torch.randn(3, 16, generator=torch.Generator().manual_seed(epoch))
            if mask_mode == "inplace":  # plain weights keep their pruned entries at zero
                new = new * mask
            with torch.no_grad():
                trainable(target.module, target.param).copy_(new)
            in_use = weight_in_use(target.module, target.param).detach().clone()
            if mask_mode == "hook":
                assert not torch.equal(pl_module.model.fc3.weight, in_use)  # torch's attribute is stale
            record["in_use"][epoch], record["before"][epoch] = in_use, mask.clone()

    class After(pl.Callback):  # placed after the pruning callback
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            record["after"][trainer.current_epoch] = kept_masks(callback)[name]

    callback = PruningScheduleCallback(
        parameters=[name],
        schedule=AtEpochs({0: 0.25, 1: 0.5, 2: 0.75}),
        mask_mode=mask_mode,
        make_permanent=False,
        verbose=False,
    )
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer([Rewrite(), callback, After()], max_epochs=3, limit_train_batches=1)
    trainer.fit(TinyModule(), random_loader())
    for epoch, sparsity in ((1, 0.5), (2, 0.75)):
        (want,) = l1_reference([record["in_use"][epoch]], [record["before"][epoch]], sparsity, "local")
        assert torch.equal(record["after"][epoch].float(), want), epoch


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_reaches_final_sparsity(tmp_path: Path) -> None:
    """Kill -9 inside an epoch, run the same command again: it resumes from ``last.ckpt`` and ends at the
    same sparsity as an uninterrupted run; every checkpoint left behind loads, with the model's own keys."""
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
    assert list(final["keys"]) == list(reference["keys"]) == PLAIN_KEYS
    for file in tmp_path.glob("*.ckpt"):
        assert sorted(torch.load(file, weights_only=False)["state_dict"]) == OWN_KEYS, file.name


def test_resume_with_a_function_schedule_keeps_its_progress_and_masks(tmp_path: Path) -> None:
    def run(epochs: int, ckpt_path: str | None = None) -> tuple[PruningScheduleCallback, TinyModule]:
        pl.seed_everything(0, verbose=False)
        callback = PruningScheduleCallback(schedule=ramp, verbose=False, make_permanent=False)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / str(epochs), save_last=True)
        module = TinyModule()
        trainer = make_trainer([callback, checkpoint], max_epochs=epochs, enable_checkpointing=True)
        trainer.fit(module, random_loader(), ckpt_path=ckpt_path)
        return callback, module

    full_cb, full = run(4)
    run(2)
    resumed_cb, resumed = run(4, str(tmp_path / "2" / "last.ckpt"))
    assert resumed_cb._steps == full_cb._steps == 3
    for name, w in weights(full).items():
        assert torch.equal(w, weights(resumed)[name]), name
    for target in full_cb.targets:
        assert torch.equal(full_cb.masks.mask(target), resumed_cb.masks.mask(target))
        assert int((target.tensor == 0).sum()) == expected_zeros(0.6, target.tensor.numel())
