"""``mask_mode="inplace"``: plain parameters with masks kept aside give the same training as torch's hook."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.utils.prune as prune
from helpers import TinyModule, make_trainer, random_loader
from torch import nn

from lightning_prune import PruningScheduleCallback, select_parameters
from lightning_prune.inplace import InplaceMasks
from lightning_prune.methods import resolve_method
from lightning_prune.schedules import AtEpochs, Polynomial


class ZerosAfterStep(pl.Callback):
    """After every optimizer step: how many chosen entries are zero, and the zero sets themselves."""

    def __init__(self) -> None:
        self.zeros: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.zeros.append({t.name: (t.effective() == 0).clone() for t in select_parameters(pl_module)})


def run(
    mask_mode: str, optimizer: str, scope: str = "global", **kwargs: Any
) -> tuple[TinyModule, ZerosAfterStep, PruningScheduleCallback]:
    pl.seed_everything(0, verbose=False)
    module = TinyModule(optimizer=optimizer)
    callback = PruningScheduleCallback(
        sparsity=0.7,
        scope=scope,
        schedule=Polynomial(start_epoch=0, end_epoch=2, every_n_steps=2),
        mask_mode=mask_mode,
        verbose=False,
        **kwargs,
    )
    zeros = ZerosAfterStep()
    trainer = make_trainer([callback, zeros], max_epochs=3)
    trainer.fit(module, random_loader(), random_loader(16))
    return module, zeros, callback


@pytest.mark.parametrize(
    ("optimizer", "scope", "kwargs"),
    [
        ("sgd", "global", {}),
        ("adamw", "global", {}),
        ("adamw", "local", {}),
        ("sgd", "local", {"method": "random_unstructured"}),
        ("adamw", "global", {"importance": torch.square}),
        ("sgd", "local", {"method": "ln_structured"}),  # through torch's reparametrization at each step
    ],
)
def test_mask_mode_inplace_trains_the_same_model_as_hook(optimizer: str, scope: str, kwargs: dict) -> None:
    hook, _, _ = run("hook", optimizer, scope, **kwargs)
    inplace, _, _ = run("inplace", optimizer, scope, **kwargs)
    a, b = hook.state_dict(), inplace.state_dict()
    assert list(a) == list(b)  # prune.remove at the end: same plain keys, same order
    assert not any(k.endswith(("_orig", "_mask")) for k in b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for p in (t.original for t in select_parameters(inplace)):
        assert isinstance(p, nn.Parameter)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_mask_mode_inplace_keeps_pruned_entries_zero_after_every_step(optimizer: str) -> None:
    module, zeros, callback = run("inplace", optimizer)
    assert len(zeros.zeros) == 12
    for before, after in zip(zeros.zeros, zeros.zeros[1:]):
        for name in before:
            assert bool(after[name][before[name]].all()), name  # once zero (pruned), zero after every step
    total = sum(t.original.numel() for t in select_parameters(module))
    final = sum(int(z.sum()) for z in zeros.zeros[-1].values())
    assert final == round(0.7 * total)


def test_mask_mode_inplace_parameters_are_plain_between_steps() -> None:
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            seen.append(any(name.endswith("_orig") for name, _ in pl_module.named_parameters()))

    callback = PruningScheduleCallback(sparsity=0.5, mask_mode="inplace", verbose=False, make_permanent=False)
    trainer = make_trainer([callback, Probe()], max_epochs=2)
    module = TinyModule()
    trainer.fit(module, random_loader(), random_loader(16))
    assert seen and not any(seen)
    # make_permanent=False: torch's masks are back at the end, as in hook mode
    assert all(t.is_masked for t in select_parameters(module))


def test_inplace_masks_restore_round_trip() -> None:
    net = nn.Linear(6, 4)
    prune.l1_unstructured(net, "weight", amount=10)
    mask = net.weight_mask.clone()
    param = net.weight_orig
    masks = InplaceMasks.from_targets(select_parameters(net))
    assert net.weight is param and len(masks) == 1  # the same Parameter object, now plain
    net.weight.grad = torch.ones_like(net.weight)
    masks.zero_grads()
    assert torch.equal(net.weight.grad, mask)
    with torch.no_grad():
        net.weight.add_(1.0)
    masks.zero_weights()
    assert torch.equal(net.weight == 0, mask == 0)
    masks.restore()
    assert net.weight_orig is param and torch.equal(net.weight_mask, mask) and len(masks) == 0


def test_mask_mode_rejects_unknown_value() -> None:
    with pytest.raises(ValueError, match=r"`mask_mode` must be one of \['hook', 'inplace'\], got 'fast'"):
        PruningScheduleCallback(sparsity=0.5, mask_mode="fast")


def test_benchmarks_run_on_a_tiny_model() -> None:
    from benchmarks import prune_step, train_overhead

    assert prune_step.main(["--layers", "2", "--width", "32", "--rounds", "1", "--no-memory"]) == 0
    assert (
        train_overhead.main(["--models", "mlp", "--batch", "4", "--rounds", "1", "--steps", "1", "--warmup", "0"]) == 0
    )


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_score_method_steps_on_inplace_masks_without_torchs_reparametrization(scope: str, method: str) -> None:
    torch.manual_seed(0)
    hooked = TinyModule().model
    plain = copy.deepcopy(hooked)
    store, pruning = InplaceMasks(), resolve_method(method)
    params = [id(p) for p in plain.parameters()]
    for step, sparsity in enumerate((0.3, 0.6, 0.8)):
        for model, masks in ((hooked, None), (plain, store)):
            targets = select_parameters(model)
            if scope == "local":
                pruning.prune_local(targets, [sparsity] * len(targets), seed=step, masks=masks)
            else:
                pruning.prune_global(targets, sparsity, seed=step, masks=masks)
        assert [id(p) for p in plain.parameters()] == params  # plain, the same Parameter objects throughout
        assert not any(name.endswith(("_orig", "_mask")) for name in plain.state_dict())
        assert all(m.dtype == torch.uint8 for m in store.masks)
        for t, kept in zip(select_parameters(hooked), store.masks):
            assert torch.equal(t.mask, kept.float())  # exactly torch-mode's masks
        for u, kept in zip(select_parameters(plain), store.masks):
            assert bool((u.original[kept == 0] == 0).all())  # zeroed in place
        with torch.no_grad():  # a training step between pruning steps, alike in both
            for t, u in zip(select_parameters(hooked), select_parameters(plain)):
                noise = torch.randn(t.original.shape, generator=torch.Generator().manual_seed(step))
                t.original.add_(noise)
                u.original.add_(noise)
        store.zero_weights()


def test_mask_mode_inplace_checkpoint_carries_the_masks_and_resume_uses_them(tmp_path: Path) -> None:
    """A live weight that is exactly zero when the checkpoint is written stays live after resuming: the masks
    come from the checkpoint (the callback's state, uint8), not from the zeros of the plain weights."""
    path = tmp_path / "mid.ckpt"
    live_zero: dict[str, int] = {}

    class ZeroALiveWeightThenSave(pl.Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 0:
                weight = pl_module.model.fc1.weight
                index = int(weight.detach().reshape(-1).ne(0).nonzero()[0])
                with torch.no_grad():
                    weight.view(-1)[index] = 0.0  # live (unpruned) yet exactly zero
                live_zero["index"] = index
                trainer.save_checkpoint(path)

    def callback() -> PruningScheduleCallback:
        return PruningScheduleCallback(
            sparsity=0.6, schedule=AtEpochs([0, 1]), mask_mode="inplace", verbose=False, make_permanent=False
        )

    first = callback()
    trainer = make_trainer([first, ZeroALiveWeightThenSave()], max_epochs=1)
    trainer.fit(TinyModule(), random_loader(), random_loader(16))
    state = next(v for k, v in torch.load(path, weights_only=False)["callbacks"].items() if "Pruning" in k)
    saved = state["masks"]["model.fc1.weight"]
    assert saved.dtype == torch.uint8 and saved.reshape(-1)[live_zero["index"]] == 1
    assert set(state["masks"]) == {t.name for t in first.targets}

    seen: dict[str, torch.Tensor] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:  # after the pruning callback's
            (target,) = [t for t in resumed.targets if t.name == "model.fc1.weight"]
            seen["mask"] = resumed._inplace.mask_of(target).clone()

    resumed = callback()
    trainer = make_trainer([resumed, Probe()], max_epochs=2)
    trainer.fit(TinyModule(), random_loader(), random_loader(16), ckpt_path=path)
    assert torch.equal(seen["mask"], saved)  # the checkpoint's mask, the live zero included
    assert resumed.state_dict()["steps"] == 2


@pytest.mark.cuda
@pytest.mark.parametrize("scope", ["local", "global"])
def test_mask_mode_inplace_on_cuda_matches_hook_in_deterministic_mode(scope: str) -> None:
    """On CUDA, with ``deterministic=True`` (no float-atomic bincount allowed): the same model as the hook."""
    models = []
    for mask_mode in ("hook", "inplace"):
        pl.seed_everything(0, verbose=False)
        module = TinyModule()
        callback = PruningScheduleCallback(
            sparsity=0.7, scope=scope, schedule=Polynomial(0, 1, every_n_steps=2), mask_mode=mask_mode, verbose=False
        )
        trainer = make_trainer([callback], max_epochs=2, accelerator="cuda", deterministic=True)
        trainer.fit(module, random_loader(), random_loader(16))
        models.append(module.cpu().state_dict())
    for key in models[0]:
        torch.testing.assert_close(models[0][key], models[1][key], rtol=1e-4, atol=1e-5)
