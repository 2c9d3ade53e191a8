import csv
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.utils.prune as prune
from helpers import (
    LightningTinyModule,
    TinyModule,
    expected_zeros,
    fit,
    kept_masks,
    make_trainer,
    random_loader,
    smallest_reference,
    unpack_mask,
    weights,
    zero_counts,
    zeros,
)
from torch import nn

from lightning_prune import PruningScheduleCallback
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial

ROOT = Path(__file__).resolve().parent.parent

ALL = [f"model.{n}.weight" for n in ("conv1", "conv2", "fc1", "fc2", "fc3")]
SIZES = {
    "model.conv1.weight": 36,
    "model.conv2.weight": 288,
    "model.fc1.weight": 768,
    "model.fc2.weight": 384,
    "model.fc3.weight": 48,
}


class EveryOther(prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


TOTAL = sum(SIZES.values())


def zeros_of(report, name):
    return report.of(name)


def target_of(callback, name):
    return next(t for t in callback.targets if t.name == name)


def assert_plain(module, unpruned_keys):
    assert set(module.state_dict()) == unpruned_keys
    for m in module.modules():
        assert not m._forward_pre_hooks
        assert not any(n.endswith("_orig") for n in m._parameters)
        assert not any(n.endswith("_mask") for n in m._buffers)


def test_local_per_type_targets_oneshot_then_permanent():
    keys = set(TinyModule().state_dict())
    cb = PruningScheduleCallback(
        sparsity={nn.Conv2d: 0.2, nn.Linear: 0.4}, method="l1_unstructured", scope="local", schedule=OneShot(epoch=1)
    )
    module, rec, _ = fit(cb, max_epochs=3)
    assert rec.at_epoch[0].zeros == 0
    for epoch in (1, 2):
        for name, n in SIZES.items():
            target = 0.2 if "conv" in name else 0.4
            assert zeros_of(rec.at_epoch[epoch], name) == expected_zeros(target, n), (epoch, name)
    assert_plain(module, keys)
    final = zero_counts(module)
    assert final.zeros >= rec.at_epoch[2].zeros  # zeros baked in
    # pruned entries kept: the zeros at epoch 2 are the zeros of the permanent model
    assert final.of("model.fc1.weight") == expected_zeros(0.4, 768)


def test_single_tensor_by_name_random():
    cb = PruningScheduleCallback(
        parameters=["model.conv1.weight"],
        sparsity=0.3,
        method="random_unstructured",
        schedule=OneShot(epoch=0),
        verbose=False,
    )
    module, rec, _ = fit(cb, max_epochs=1)
    report = rec.at_epoch[0]
    assert zeros_of(report, "model.conv1.weight") == expected_zeros(0.3, 36) == 11
    assert report.zeros == zeros_of(report, "model.conv1.weight")
    assert zero_counts(module, ["model.conv1.weight"]).zeros == 11


def test_global_atepochs_reaches_each_cumulative_target_exactly():
    cb = PruningScheduleCallback(sparsity=0.6, method="l1_unstructured", scope="global", schedule=AtEpochs([1, 2, 3]))
    module, rec, trainer = fit(cb, max_epochs=4)
    for epoch, target in [(0, 0.0), (1, 0.2), (2, 0.4), (3, 0.6)]:
        assert rec.at_epoch[epoch].zeros == expected_zeros(target, TOTAL), epoch
    per_layer = rec.at_epoch[3].per_tensor()
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # one threshold, uneven per layer
    assert trainer.callback_metrics["pruning/sparsity"] == pytest.approx(rec.at_epoch[3].zeros / TOTAL)
    assert trainer.callback_metrics["pruning/target"] == pytest.approx(0.6)


def test_cumulative_targets_are_not_compounded():
    cb = PruningScheduleCallback(scope="global", schedule=AtEpochs({1: 0.3, 2: 0.6, 3: 0.8}), verbose=False)
    _, rec, _ = fit(cb, max_epochs=4)
    for epoch, target in [(1, 0.3), (2, 0.6), (3, 0.8)]:  # not 0.3 / 0.72 / 0.944
        assert rec.at_epoch[epoch].zeros == expected_zeros(target, TOTAL), epoch
    assert cb.sparsity == 0.8


def test_pruned_entries_stay_pruned_across_steps():
    cb = PruningScheduleCallback(
        sparsity=0.6, scope="global", schedule=AtEpochs([0, 1, 2]), make_permanent=False, verbose=False
    )
    masks = {}

    class Grab(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            masks[trainer.current_epoch] = kept_masks(cb)

    pl.seed_everything(0)
    trainer = make_trainer([cb, Grab()], max_epochs=3)
    trainer.fit(TinyModule(), random_loader())
    for a, b in [(0, 1), (1, 2)]:
        for name in ALL:
            assert bool((masks[b][name] <= masks[a][name]).all()), name
            assert int((masks[b][name] == 0).sum()) > int((masks[a][name] == 0).sum()), name


def test_custom_method_without_amount_applied_as_is():
    cb = PruningScheduleCallback(parameters=["model.fc3.weight"], method=EveryOther, schedule=OneShot(epoch=0))
    module, rec, _ = fit(cb, max_epochs=1)
    flat = module.model.fc3.weight.detach().view(-1)
    assert bool((flat[::2] == 0).all()) and bool((flat[1::2] != 0).all())
    assert rec.at_epoch[0].zeros == 24


class HalfAmount(prune.BasePruningMethod):
    """A custom method that takes `amount`: prunes the largest magnitudes (the opposite of L1)."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount):
        self.amount = amount

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        idx = torch.topk(t.abs().view(-1), k=self.amount).indices
        mask.view(-1)[idx] = 0
        return mask


@pytest.mark.parametrize("scope", ["local", "global"])
def test_custom_method_with_amount_is_driven_by_schedule(scope):
    cb = PruningScheduleCallback(
        sparsity=0.5, method=HalfAmount, scope=scope, schedule=AtEpochs([0, 1]), verbose=False, make_permanent=False
    )
    module, rec, _ = fit(cb, max_epochs=2)
    for epoch, target in [(0, 0.25), (1, 0.5)]:  # exact counts: torch's `amount` as an integer
        if scope == "local":  # every tensor at its own target
            for name, n in SIZES.items():
                assert zeros_of(rec.at_epoch[epoch], name) == expected_zeros(target, n), (epoch, name)
        else:
            assert rec.at_epoch[epoch].zeros == expected_zeros(target, TOTAL), epoch
    fc1 = cb.masks.mask(target_of(cb, "model.fc1.weight"))
    assert fc1.dtype == torch.uint8
    if scope == "local":
        assert int((fc1 == 0).sum()) == 384


def test_importance_function_replaces_magnitude():
    cb = PruningScheduleCallback(
        parameters=["model.fc1.weight"],
        sparsity=0.25,
        importance=lambda w: -w.abs(),
        make_permanent=False,
        verbose=False,
    )
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    w = module.model.fc1.weight.detach().abs().clone()  # pruned before the first batch: these weights
    fit(cb, max_epochs=1, limit_train_batches=1, module=module)
    m = cb.masks.mask(target_of(cb, "model.fc1.weight")).bool()
    assert int((~m).sum()) == expected_zeros(0.25, 768) == 192
    assert w[~m].min() >= w[m].max()  # the largest were pruned
    assert torch.equal(m, smallest_reference([-w], [None], 192)[0].bool())


def test_polynomial_every_n_steps_follows_cubic_ramp():
    schedule = Polynomial(start_epoch=1, end_epoch=3, every_n_steps=2, power=3)
    cb = PruningScheduleCallback(sparsity=0.95, scope="global", schedule=schedule, verbose=False)
    _, rec, _ = fit(cb, max_epochs=4)  # 4 optimizer steps per epoch
    pruned_at = []
    for step, report in sorted(rec.at_step.items()):
        if step % 2 == 0:
            p = min(1.0, max(0.0, (step / 4 - 1) / 2))  # Zhu & Gupta: s = s_f (1 - (1 - p)^3) from epoch 1 to 3
            assert report.zeros == expected_zeros(0.95 - 0.95 * (1 - p) ** 3, TOTAL), step
        if step and report.zeros > rec.at_step[step - 1].zeros:
            pruned_at.append(step)
    assert pruned_at == [6, 8, 10, 12]
    assert rec.at_step[12].zeros == expected_zeros(0.95, TOTAL)


def test_ln_structured_prunes_whole_rows():
    cb = PruningScheduleCallback(
        parameters=["model.fc1.weight"],
        sparsity=0.5,
        method="ln_structured",
        method_kwargs={"n": 2, "dim": 0},
        schedule=AtEpochs([0, 1]),
        verbose=False,
    )
    module, rec, _ = fit(cb, max_epochs=2)
    w = module.model.fc1.weight.detach()
    dead_rows = int((w.abs().sum(dim=1) == 0).sum())
    assert dead_rows == 12 and zeros_of(rec.at_epoch[1], "model.fc1.weight") == 12 * 32
    assert zeros_of(rec.at_epoch[0], "model.fc1.weight") == 6 * 32


@pytest.mark.parametrize("mask_mode", ["inplace", "hook"])
def test_make_permanent_false_keeps_masks(mask_mode):
    cb = PruningScheduleCallback(sparsity=0.5, make_permanent=False, verbose=False, mask_mode=mask_mode)
    module, _, _ = fit(cb, max_epochs=1)
    masks = kept_masks(cb)
    assert list(masks) == ALL
    for name, mask in masks.items():
        assert mask.dtype == torch.uint8 and int((mask == 0).sum()) == expected_zeros(0.5, SIZES[name]), name
    if mask_mode == "inplace":  # a plain model beside the kept masks
        assert set(module.state_dict()) == set(TinyModule().state_dict())
        assert torch.equal(module.model.fc1.weight.detach() == 0, masks["model.fc1.weight"] == 0)
    else:  # torch's own form, as code that asks for the hook expects
        assert all(hasattr(getattr(module.model, n), "weight_mask") for n in ("conv1", "fc1", "fc3"))
        assert "model.fc1.weight_orig" in module.state_dict()
        assert torch.equal(module.model.fc1.weight_mask, masks["model.fc1.weight"].float())


def test_metrics_reach_csv_logger_and_callback_metrics(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    cb = PruningScheduleCallback(sparsity=0.5, scope="global", schedule=AtEpochs([0, 1]), verbose=False)
    _, rec, trainer = fit(cb, max_epochs=2, logger=CSVLogger(tmp_path, name="run"))
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["pruning/sparsity"]) for r in rows if r.get("pruning/sparsity")]
    assert logged == pytest.approx([rec.at_epoch[e].zeros / TOTAL for e in (0, 1)])  # counted in the test
    assert rec.at_epoch[1].zeros == expected_zeros(0.5, TOTAL)
    assert {f"pruning/sparsity/{n}" for n in ALL} <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["pruning/sparsity/model.fc1.weight"] == pytest.approx(
        rec.at_epoch[1].of("model.fc1.weight") / 768
    )
    assert "pruning/sparsity" in trainer.progress_bar_metrics


def test_verbose_table_printed_on_rank_zero(caplog):
    cb = PruningScheduleCallback(sparsity=0.5, schedule=OneShot(epoch=0))
    with caplog.at_level("INFO"):
        fit(cb, max_epochs=1, limit_train_batches=1)
    text = caplog.text
    assert "Pruning step 1 at epoch 0" in text and "model.fc1.weight" in text and "Pruning finished" in text


def test_works_with_lightning_pytorch_trainer():
    import lightning.pytorch as L

    cb = PruningScheduleCallback(sparsity=0.5, scope="global", verbose=False)
    L.seed_everything(0)
    module = LightningTinyModule()
    trainer = make_trainer([cb], max_epochs=1, trainer_cls=L.Trainer)
    trainer.fit(module, random_loader())
    zeros = zero_counts(module).zeros
    assert zeros == expected_zeros(0.5, TOTAL)
    assert trainer.callback_metrics["pruning/sparsity"] == pytest.approx(zeros / TOTAL)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_pruning_under_reduced_precision(precision):
    cb = PruningScheduleCallback(
        sparsity=0.5, scope="global", schedule=AtEpochs([0, 1]), make_permanent=False, verbose=False
    )
    module, rec, _ = fit(cb, max_epochs=2, precision=precision)
    assert rec.at_epoch[1].zeros == expected_zeros(0.5, TOTAL)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    for t in cb.targets:
        mask, weight = cb.masks.mask(t), t.tensor.detach()
        assert weight.dtype == dtype and mask.dtype == torch.uint8 and mask.device == weight.device, t.name
        assert bool((weight[mask == 0] == 0).all()), t.name


@pytest.mark.cuda
def test_masks_live_on_cuda():
    cb = PruningScheduleCallback(sparsity=0.5, scope="global", make_permanent=False, verbose=False)
    pl.seed_everything(0)
    module = TinyModule()
    trainer = make_trainer([cb], max_epochs=1, accelerator="cuda", limit_train_batches=2)
    trainer.fit(module, random_loader())
    assert all(cb.masks.mask(t).is_cuda for t in cb.targets) and len(cb.masks) == 5
    assert zero_counts(module).zeros == expected_zeros(0.5, TOTAL)


BAD_INIT = [
    (dict(sparsity=1.5), r"`sparsity` must be in \[0, 1\), got 1.5"),
    (dict(sparsity=-0.1), r"`sparsity` must be in \[0, 1\), got -0.1"),
    (dict(sparsity=True), r"`sparsity` must be a number in \[0, 1\), got True \(bool\)"),
    (dict(sparsity=0.5, method="l3_magic"), r"`method` must be one of \['l1_unstructured', .*got 'l3_magic'"),
    (dict(sparsity=0.5, method=nn.Linear), r"`method` must be one of .*BasePruningMethod subclass, got"),
    (dict(sparsity=0.5, scope="everywhere"), r"`scope` must be one of \['local', 'global'\], got 'everywhere'"),
    (dict(sparsity=0.5, method="ln_structured", scope="global"), r"structured and works in `scope='local'` only"),
    (dict(sparsity={nn.Linear: 0.5}, scope="global"), r"per-layer `sparsity` mapping needs `scope='local'`"),
    (dict(), r"`sparsity` is required"),
    (dict(sparsity=0.5, method=EveryOther), r"`sparsity` has no effect with `method=EveryOther`"),
    (dict(sparsity=0.5, schedule=AtEpochs({1: 0.3, 2: 0.6})), r"differs from the schedule's last target 0.6"),
    (dict(sparsity=0.5, method_kwargs={"dim": 1}), r"`method_kwargs` for 'l1_unstructured' may hold nothing"),
    (dict(sparsity=0.5, method="ln_structured", method_kwargs={"p": 1}), r"may hold \['dim', 'n'\], got \['p'\]"),
    (dict(sparsity=0.5, method=HalfAmount, method_kwargs={"amount": 3}), r"`amount` is set by the schedule"),
    (dict(sparsity=0.5, importance=3), r"`importance` must be a function"),
    (dict(sparsity=0.5, method="random_unstructured", importance=torch.abs), r"no meaning with `method="),
    (dict(sparsity={nn.Linear: 0.5}, schedule=lambda e: 0.1), r"plain-function `schedule`"),
    (dict(sparsity=0.5, seed="x"), r"`seed` must be an integer"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_INIT)
def test_callback_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningScheduleCallback(**kwargs)


BAD_AT_FIT = [
    (dict(sparsity={nn.Conv3d: 0.5, nn.Linear: 0.2}), r"`sparsity` key Conv3d matches no chosen parameter"),
    (dict(sparsity=0.5, parameters=["model.fc9.weight"]), r"'model.fc9.weight' matches no parameter"),
    (dict(sparsity=0.5, parameters=["model.*.bogus"]), r"matches no parameter"),
    (dict(sparsity=0.5, parameters=[]), r"The selection is empty"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_AT_FIT)
def test_callback_rejects_bad_selection_before_first_batch_model_untouched(kwargs, match):
    module = TinyModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = PruningScheduleCallback(**kwargs)
    trainer = make_trainer([cb], max_epochs=1)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, random_loader())
    assert trainer.global_step == 0
    after = module.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_schedule_ending_after_max_epochs_warns():
    cb = PruningScheduleCallback(sparsity=0.5, schedule=Polynomial(start_epoch=0, end_epoch=5), verbose=False)
    with pytest.warns(UserWarning, match=r"start of epoch 5, but `max_epochs` is 2"):
        fit(cb, max_epochs=2, limit_train_batches=1)


def _same_state(a, b):
    """Equal nested states (tensors compared with ``torch.equal``)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("make_permanent", [True, False])
def test_state_dict_round_trip_and_state_key(make_permanent):
    cb = PruningScheduleCallback(
        sparsity=0.5, scope="global", schedule=AtEpochs([0, 1]), verbose=False, make_permanent=make_permanent
    )
    module, _, _ = fit(cb, max_epochs=2, limit_train_batches=1)
    state = cb.state_dict()
    other = PruningScheduleCallback(sparsity=0.5, scope="global", schedule=AtEpochs([0, 1]))
    other.load_state_dict(state)
    assert _same_state(other.state_dict(), state) and state["steps"] == 2
    assert math.isclose(state["applied"]["__global__"], 0.5)
    if make_permanent:  # the masks were dropped at the end; the zeros are plain weights
        assert state["masks"] == {}
    else:  # bit-packed masks, the zeros of the model
        assert sorted(state["masks"]) == sorted(ALL)
        for name, entry in state["masks"].items():
            zeros = module.get_parameter(name).detach() == 0
            assert torch.equal(unpack_mask(entry) == 0, zeros), name
    assert cb.state_key == other.state_key
    assert cb.state_key != PruningScheduleCallback(sparsity=0.5, scope="local").state_key
    other_target = PruningScheduleCallback(sparsity=0.6, scope="global", schedule=AtEpochs([0, 1]))
    assert cb.state_key != other_target.state_key  # two callbacks differing only in sparsity can coexist


def _four_uses():
    """The four configurations of the README, exactly as written there, with what each must measure."""
    total = TOTAL
    return {
        "local": (
            lambda: PruningScheduleCallback(
                sparsity={nn.Conv2d: 0.2, nn.Linear: 0.4},
                method="l1_unstructured",
                scope="local",
                schedule=OneShot(epoch=1),
            ),
            lambda r: all(t.zeros == expected_zeros(0.2 if "conv" in t.name else 0.4, t.numel) for t in r.tensors),
        ),
        "global": (
            lambda: PruningScheduleCallback(
                sparsity=0.6, method="l1_unstructured", scope="global", schedule=AtEpochs([1, 2, 3])
            ),
            lambda r: r.zeros == expected_zeros(0.6, total),
        ),
        "custom": (
            lambda: PruningScheduleCallback(
                parameters=["model.fc3.weight"], method=EveryOther, schedule=OneShot(epoch=0)
            ),
            lambda r: r.zeros == 24,
        ),
        "gradual": (
            lambda: PruningScheduleCallback(
                sparsity=0.95,
                scope="global",
                schedule=Polynomial(start_epoch=1, end_epoch=3, every_n_steps=2, power=3),
            ),
            lambda r: r.zeros == expected_zeros(0.95, total),
        ),
    }


@pytest.mark.parametrize("flavour", ["pytorch_lightning", "lightning.pytorch"])
@pytest.mark.parametrize("use", ["local", "global", "custom", "gradual"])
def test_four_uses_on_both_trainers(flavour, use):
    import lightning.pytorch as L

    build, check = _four_uses()[use]
    trainer_cls, module_cls = (
        (pl.Trainer, TinyModule) if flavour == "pytorch_lightning" else (L.Trainer, LightningTinyModule)
    )
    pl.seed_everything(0, verbose=False)
    module = module_cls()
    keys = set(module.state_dict())
    cb = build()
    cb.verbose = False
    trainer = make_trainer([cb], max_epochs=4, trainer_cls=trainer_cls)
    trainer.fit(module, random_loader())
    assert check(zero_counts(module))
    assert_plain(module, keys)


class SeedRightBefore(pl.Callback):
    """Placed before the pruning callback: sets the caller's global RNG state right before each epoch's pruning."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.drawn: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        torch.manual_seed(self.seed)
        self.drawn.append(float(torch.rand(())))  # the state differs from seed to seed (checked below)
        torch.manual_seed(self.seed)


def test_random_structured_prunes_whole_channels_reproducibly():
    def run(caller_seed):
        cb = PruningScheduleCallback(
            parameters=["model.conv2.weight"],
            sparsity=0.5,
            method="random_structured",
            method_kwargs={"dim": 0},
            seed=3,
            verbose=False,
        )
        pl.seed_everything(0, verbose=False)
        module, seeder = TinyModule(), SeedRightBefore(caller_seed)
        trainer = make_trainer([seeder, cb], max_epochs=1, limit_train_batches=1)
        trainer.fit(module, random_loader())  # no reseed between the caller's seed and the pruning
        return module.model.conv2.weight.detach(), seeder.drawn

    first, drawn_1 = run(1)
    second, drawn_2 = run(2)  # another RNG state of the caller: the same masks
    assert drawn_1 != drawn_2
    dead = first.flatten(1).abs().sum(1) == 0
    assert int(dead.sum()) == expected_zeros(0.5, 8) == 4
    assert torch.equal(dead, second.flatten(1).abs().sum(1) == 0)


def test_importance_function_in_global_scope():
    # Score every tensor but fc1 as all-important: the global ranking then prunes only inside fc1.
    def importance(w):
        return w.abs() if w.shape == (24, 32) else torch.full_like(w, 1e6)

    cb = PruningScheduleCallback(
        sparsity=0.3, scope="global", importance=importance, verbose=False, make_permanent=False
    )
    _, rec, _ = fit(cb, max_epochs=1, limit_train_batches=1)
    report = rec.at_epoch[0]
    assert zeros_of(report, "model.fc1.weight") == expected_zeros(0.3, TOTAL) == report.zeros


@pytest.mark.slow  # a subprocess or a whole benchmark: over ten seconds
def test_state_key_of_a_function_schedule_is_the_same_in_every_process() -> None:
    code = (
        "import sys; sys.path.insert(0, 'tests'); from helpers import ramp; "
        "from lightning_prune import PruningScheduleCallback as C; print(C(schedule=ramp).state_key)"
    )
    keys = {
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(keys) == 1 and "0x" not in keys.pop()


def test_per_layer_mapping_with_a_method_that_takes_no_amount_is_refused() -> None:
    from examples.custom_methods import EveryOther

    with pytest.raises(ValueError, match=r"`sparsity` has no effect with `method=EveryOther`.*per-layer mapping"):
        PruningScheduleCallback(sparsity={nn.Linear: 0.5}, method=EveryOther)


def test_per_layer_mapping_with_a_multi_step_schedule_and_initial_sparsity() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    schedule = Polynomial(start_epoch=1, end_epoch=3, power=1, initial_sparsity=0.2)
    callback = PruningScheduleCallback({nn.Conv2d: 0.4, "model.fc*": 0.8}, schedule=schedule, verbose=False)
    seen: dict[int, dict[str, int]] = {}

    class At(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            seen[trainer.current_epoch] = {n: zeros(w) for n, w in weights(pl_module).items()}

    make_trainer([callback, At()], max_epochs=4).fit(module, random_loader())
    for name, w in weights(module).items():
        final = 0.4 if "conv" in name else 0.8
        n = w.numel()
        # epoch 1: the initial 0.2; epoch 2: halfway from 0.2 to the final; epoch 3 on: the final target
        assert [seen[e][name] for e in range(4)] == [
            0,
            expected_zeros(0.2, n),
            expected_zeros(final + (0.2 - final) * 0.5, n),
            expected_zeros(final, n),
        ], name


def test_log_per_tensor_false_logs_only_the_overall_figures() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    callback = PruningScheduleCallback(0.5, log_per_tensor=False, verbose=False)
    trainer = make_trainer([callback], max_epochs=1)
    trainer.fit(module, random_loader())
    keys = {k for k in trainer.callback_metrics if k.startswith("pruning")}
    assert keys == {"pruning/sparsity", "pruning/target"}
    total = sum(w.numel() for w in weights(module).values())
    assert float(trainer.callback_metrics["pruning/sparsity"]) == pytest.approx(
        sum(zeros(w) for w in weights(module).values()) / total
    )


def test_last_report_holds_the_figures_measured_after_the_latest_step() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    callback = PruningScheduleCallback(0.7, scope="global", schedule=AtEpochs([0, 1]), verbose=False)
    assert callback.last_report is None
    make_trainer([callback], max_epochs=2).fit(module, random_loader())
    report = callback.last_report
    assert report is not None
    assert report.zeros == sum(zeros(w) for w in weights(module).values())
    assert report.zeros == expected_zeros(0.7, report.numel)
