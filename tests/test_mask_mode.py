"""``mask_mode="inplace"``: plain parameters with masks kept aside give the same training as torch's hook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import (
    TinyModule,
    decide_and_apply,
    expected_zeros,
    l1_reference,
    make_trainer,
    random_loader,
    unpack_mask,
    weight_in_use,
    zero_sets,
)
from torch import nn

from lightning_prune import MaskStore, PruningScheduleCallback, select_parameters
from lightning_prune.methods import resolve_method
from lightning_prune.schedules import AtEpochs, Polynomial


class ZerosAfterStep(pl.Callback):
    """After every optimizer step: how many chosen entries are zero, and the zero sets themselves."""

    def __init__(self) -> None:
        self.zeros: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.zeros.append(zero_sets(pl_module))


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
    for p in (t.tensor for t in select_parameters(inplace)):
        assert isinstance(p, nn.Parameter)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_mask_mode_inplace_keeps_pruned_entries_zero_after_every_step(optimizer: str) -> None:
    module, zeros, callback = run("inplace", optimizer)
    assert len(zeros.zeros) == 12
    for before, after in zip(zeros.zeros, zeros.zeros[1:]):
        for name in before:
            assert bool(after[name][before[name]].all()), name  # once zero (pruned), zero after every step
    total = sum(t.tensor.numel() for t in select_parameters(module))
    final = sum(int(z.sum()) for z in zeros.zeros[-1].values())
    assert final == expected_zeros(0.7, total)


@pytest.mark.parametrize("mask_mode", ["inplace", "hook"])
def test_mask_mode_parameters_between_steps_and_at_the_end(mask_mode: str) -> None:
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            seen.append(any(name.endswith("_orig") for name, _ in pl_module.named_parameters()))

    callback = PruningScheduleCallback(sparsity=0.5, mask_mode=mask_mode, verbose=False, make_permanent=False)
    trainer = make_trainer([callback, Probe()], max_epochs=2)
    module = TinyModule()
    trainer.fit(module, random_loader(), random_loader(16))
    assert len(seen) == 8 and all(s == (mask_mode == "hook") for s in seen)  # torch's form only in "hook"
    # make_permanent=False: the masks are kept by the callback in both modes, and on the model in "hook"
    assert [t.name for t, _ in callback.masks.items()] == [t.name for t in callback.targets]
    for t in callback.targets:
        assert hasattr(t.module, "weight_mask") == (mask_mode == "hook"), t.name
        assert torch.equal(weight_in_use(t.module, t.param).detach() == 0, callback.masks.mask(t) == 0), t.name


def test_mask_mode_rejects_unknown_value() -> None:
    with pytest.raises(ValueError, match=r"`mask_mode` must be one of \['inplace', 'hook'\], got 'fast'"):
        PruningScheduleCallback(sparsity=0.5, mask_mode="fast")


def test_benchmarks_run_on_a_tiny_model() -> None:
    from benchmarks import prune_step, train_overhead

    assert prune_step.main(["--layers", "2", "--width", "32", "--rounds", "1", "--no-memory"]) == 0
    assert (
        train_overhead.main(["--models", "mlp", "--batch", "4", "--rounds", "1", "--steps", "1", "--warmup", "0"]) == 0
    )


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_score_method_steps_on_a_mask_store_beside_plain_parameters(scope: str, method: str) -> None:
    """Three steps of a schedule with a training step between them: plain parameters (the same objects) zeroed
    in place, ``uint8`` masks that only narrow, exact counts, and for L1 the masks of a sorting reference."""
    torch.manual_seed(0)
    model = TinyModule().model
    store, pruning = MaskStore(), resolve_method(method)
    params = [id(p) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    store.attach([optimizer])
    before: list[torch.Tensor | None] = [None] * 5
    for step, sparsity in enumerate((0.3, 0.6, 0.8)):
        targets = select_parameters(model)
        weights = [t.tensor.detach().clone() for t in targets]
        decide_and_apply(pruning, targets, sparsity, scope, step, store)
        masks = [store.mask(t).clone() for t in targets]
        assert [id(p) for p in model.parameters()] == params  # plain, the same Parameter objects throughout
        assert not any(name.endswith(("_orig", "_mask")) for name in model.state_dict())
        assert all(m.dtype == torch.uint8 for m in masks)
        for t, mask, old in zip(targets, masks, before):
            assert bool((t.tensor[mask == 0] == 0).all()), t.name  # zeroed in place
            assert old is None or bool((mask <= old).all()), t.name  # pruned entries stay pruned
        counts = [int((m == 0).sum()) for m in masks]
        if scope == "local":
            assert counts == [expected_zeros(sparsity, w.numel()) for w in weights]
        else:
            assert sum(counts) == expected_zeros(sparsity, sum(w.numel() for w in weights))
        if method == "l1_unstructured":
            reference = l1_reference(weights, before, sparsity, scope)
            assert all(torch.equal(m.float(), r) for m, r in zip(masks, reference))
        before = masks
        for p in model.parameters():  # a training step between pruning steps
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        store.mask_grads(optimizer)  # as the callback's on_before_optimizer_step does
        optimizer.step()
        for t, mask in zip(targets, masks):
            assert bool((t.tensor[mask == 0] == 0).all()) and bool((t.tensor[mask == 1] != 0).all()), t.name
    store.detach()


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
    checkpoint = torch.load(path, weights_only=False)
    assert list(checkpoint["state_dict"]) == list(TinyModule().state_dict())  # the model's own keys
    state = next(v for k, v in checkpoint["callbacks"].items() if "Pruning" in k)
    entry = state["masks"]["model.fc1.weight"]
    assert entry["bits"].dtype == torch.uint8 and entry["bits"].numel() == 768 // 8  # bit-packed
    saved = unpack_mask(entry)
    assert saved.reshape(-1)[live_zero["index"]] == 1
    assert int((saved == 0).sum()) == expected_zeros(0.3, 768)  # the first of two steps to 0.6
    assert set(state["masks"]) == {t.name for t in first.targets}

    seen: dict[str, torch.Tensor] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:  # after the pruning callback's
            (target,) = [t for t in resumed.targets if t.name == "model.fc1.weight"]
            seen["mask"] = resumed.masks.mask(target).clone()

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
