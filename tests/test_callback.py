import csv
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.utils.prune as prune
from helpers import LightningTinyModule, TinyModule, fit, make_trainer, random_loader
from torch import nn

from lightning_prune import PruningScheduleCallback, sparsity_report
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial

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


def zeros_of(report, name):
    return next(t.zeros for t in report.tensors if t.name == name)


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
            assert abs(zeros_of(rec.at_epoch[epoch], name) - target * n) <= 1, (epoch, name)
    assert_plain(module, keys)
    final = sparsity_report(module)
    assert final.zeros >= rec.at_epoch[2].zeros  # zeros baked in
    # pruned entries kept: the zeros at epoch 2 are the zeros of the permanent model
    assert abs(final.per_tensor()["model.fc1.weight"] - 0.4) <= 1 / 768


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
    assert zeros_of(report, "model.conv1.weight") == round(0.3 * 36)
    assert report.zeros == zeros_of(report, "model.conv1.weight")
    assert sparsity_report(module, ["model.conv1.weight"]).zeros == 11


def test_global_atepochs_reaches_each_cumulative_target_exactly():
    cb = PruningScheduleCallback(sparsity=0.6, method="l1_unstructured", scope="global", schedule=AtEpochs([1, 2, 3]))
    module, rec, trainer = fit(cb, max_epochs=4)
    total = sum(SIZES.values())
    for epoch, target in [(0, 0.0), (1, 0.2), (2, 0.4), (3, 0.6)]:
        assert abs(rec.at_epoch[epoch].zeros - target * total) <= 1, epoch
    per_layer = rec.at_epoch[3].per_tensor()
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # one threshold, uneven per layer
    assert trainer.callback_metrics["pruning/sparsity"] == pytest.approx(rec.at_epoch[3].sparsity)
    assert trainer.callback_metrics["pruning/target"] == pytest.approx(0.6)


def test_cumulative_targets_are_not_compounded():
    cb = PruningScheduleCallback(scope="global", schedule=AtEpochs({1: 0.3, 2: 0.6, 3: 0.8}), verbose=False)
    _, rec, _ = fit(cb, max_epochs=4)
    total = sum(SIZES.values())
    for epoch, target in [(1, 0.3), (2, 0.6), (3, 0.8)]:  # not 0.3 / 0.72 / 0.944
        assert abs(rec.at_epoch[epoch].zeros - target * total) <= 1
    assert cb.sparsity == 0.8


def test_pruned_entries_stay_pruned_across_steps():
    cb = PruningScheduleCallback(
        sparsity=0.6, scope="global", schedule=AtEpochs([0, 1, 2]), make_permanent=False, verbose=False
    )
    masks = {}

    class Grab(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            masks[trainer.current_epoch] = pl_module.model.fc1.weight_mask.clone()

    pl.seed_everything(0)
    trainer = make_trainer([cb, Grab()], max_epochs=3)
    trainer.fit(TinyModule(), random_loader())
    for a, b in [(0, 1), (1, 2)]:
        assert bool((masks[b] <= masks[a]).all())


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
    total = sum(SIZES.values())
    assert abs(rec.at_epoch[0].zeros - 0.25 * total) <= 5
    assert abs(rec.at_epoch[1].zeros - 0.5 * total) <= 5
    if scope == "local":  # every tensor at its own target
        assert int((module.model.fc1.weight_mask == 0).sum()) == 384


def test_importance_function_replaces_magnitude():
    cb = PruningScheduleCallback(
        parameters=["model.fc1.weight"],
        sparsity=0.25,
        importance=lambda w: -w.abs(),
        make_permanent=False,
        verbose=False,
    )
    module, _, _ = fit(cb, max_epochs=1, limit_train_batches=1)
    w = module.model.fc1.weight_orig.detach().abs()
    m = module.model.fc1.weight_mask.bool()
    assert int((~m).sum()) == 192
    assert w[~m].min() >= w[m].max() - 0.05  # the largest were pruned (weights moved a little while training)


def test_polynomial_every_n_steps_follows_cubic_ramp():
    schedule = Polynomial(start_epoch=1, end_epoch=3, every_n_steps=2, power=3)
    cb = PruningScheduleCallback(sparsity=0.95, scope="global", schedule=schedule, verbose=False)
    _, rec, _ = fit(cb, max_epochs=4)  # 4 optimizer steps per epoch
    total = sum(SIZES.values())
    pruned_at = []
    for step, report in sorted(rec.at_step.items()):
        if step % 2 == 0:
            epoch = step / 4
            assert abs(report.zeros - schedule.sparsity(epoch, 0.95) * total) <= 1, step
        if step and report.zeros > rec.at_step[step - 1].zeros:
            pruned_at.append(step)
    assert pruned_at == [6, 8, 10, 12]
    assert abs(rec.at_step[12].zeros - 0.95 * total) <= 1


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


def test_make_permanent_false_keeps_masks():
    cb = PruningScheduleCallback(sparsity=0.5, make_permanent=False, verbose=False)
    module, _, _ = fit(cb, max_epochs=1)
    assert all(hasattr(getattr(module.model, n), "weight_mask") for n in ("conv1", "fc1", "fc3"))
    assert "model.fc1.weight_orig" in module.state_dict()


def test_metrics_reach_csv_logger_and_callback_metrics(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    cb = PruningScheduleCallback(sparsity=0.5, scope="global", schedule=AtEpochs([0, 1]), verbose=False)
    _, rec, trainer = fit(cb, max_epochs=2, logger=CSVLogger(tmp_path, name="run"))
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["pruning/sparsity"]) for r in rows if r.get("pruning/sparsity")]
    assert logged == pytest.approx([rec.at_epoch[0].sparsity, rec.at_epoch[1].sparsity])
    assert {f"pruning/sparsity/{n}" for n in ALL} <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["pruning/sparsity/model.fc1.weight"] == pytest.approx(
        rec.at_epoch[1].per_tensor()["model.fc1.weight"]
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
    assert abs(sparsity_report(module).zeros - 0.5 * sum(SIZES.values())) <= 1
    assert trainer.callback_metrics["pruning/sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_pruning_under_reduced_precision(precision):
    cb = PruningScheduleCallback(
        sparsity=0.5, scope="global", schedule=AtEpochs([0, 1]), make_permanent=False, verbose=False
    )
    module, rec, _ = fit(cb, max_epochs=2, precision=precision)
    total = sum(SIZES.values())
    assert abs(rec.at_epoch[1].zeros - 0.5 * total) <= 1
    for m in (module.model.conv1, module.model.fc2):
        assert m.weight_mask.dtype == m.weight_orig.dtype and m.weight_mask.device == m.weight_orig.device


@pytest.mark.cuda
def test_masks_live_on_cuda():
    cb = PruningScheduleCallback(sparsity=0.5, scope="global", make_permanent=False, verbose=False)
    pl.seed_everything(0)
    module = TinyModule()
    trainer = make_trainer([cb], max_epochs=1, accelerator="cuda", limit_train_batches=2)
    trainer.fit(module, random_loader())
    assert module.model.fc1.weight_mask.is_cuda
    assert abs(sparsity_report(module).zeros - 0.5 * sum(SIZES.values())) <= 1


BAD_INIT = [
    (dict(sparsity=1.5), r"`sparsity` must be in \[0, 1\), got 1.5"),
    (dict(sparsity=-0.1), r"`sparsity` must be in \[0, 1\), got -0.1"),
    (dict(sparsity=True), r"`sparsity` must be in \[0, 1\)"),
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


def test_state_dict_round_trip_and_state_key():
    cb = PruningScheduleCallback(sparsity=0.5, scope="global", schedule=AtEpochs([0, 1]), verbose=False)
    fit(cb, max_epochs=2, limit_train_batches=1)
    state = cb.state_dict()
    other = PruningScheduleCallback(sparsity=0.5, scope="global", schedule=AtEpochs([0, 1]))
    other.load_state_dict(state)
    assert other.state_dict() == state and state["steps"] == 2
    assert math.isclose(state["applied"]["__global__"], 0.5)
    assert cb.state_key == other.state_key
    assert cb.state_key != PruningScheduleCallback(sparsity=0.5, scope="local").state_key
    other_target = PruningScheduleCallback(sparsity=0.6, scope="global", schedule=AtEpochs([0, 1]))
    assert cb.state_key != other_target.state_key  # two callbacks differing only in sparsity can coexist


def _four_uses():
    """The four configurations of the README, exactly as written there, with what each must measure."""
    total = sum(SIZES.values())
    return {
        "local": (
            lambda: PruningScheduleCallback(
                sparsity={nn.Conv2d: 0.2, nn.Linear: 0.4},
                method="l1_unstructured",
                scope="local",
                schedule=OneShot(epoch=1),
            ),
            lambda r: all(abs(t.zeros - (0.2 if "conv" in t.name else 0.4) * t.numel) <= 1 for t in r.tensors),
        ),
        "global": (
            lambda: PruningScheduleCallback(
                sparsity=0.6, method="l1_unstructured", scope="global", schedule=AtEpochs([1, 2, 3])
            ),
            lambda r: abs(r.zeros - 0.6 * total) <= 1,
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
            lambda r: abs(r.zeros - 0.95 * total) <= 1,
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
    assert check(sparsity_report(module))
    assert_plain(module, keys)


def test_random_structured_prunes_whole_channels_reproducibly():
    def run():
        cb = PruningScheduleCallback(
            parameters=["model.conv2.weight"],
            sparsity=0.5,
            method="random_structured",
            method_kwargs={"dim": 0},
            seed=3,
            verbose=False,
        )
        module, _, _ = fit(cb, max_epochs=1, limit_train_batches=1)
        return module.model.conv2.weight.detach()

    torch.manual_seed(123)
    first = run()
    torch.manual_seed(456)  # the caller's RNG state does not change the masks
    second = run()
    dead = first.flatten(1).abs().sum(1) == 0
    assert int(dead.sum()) == 4
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
    total = sum(SIZES.values())
    assert zeros_of(report, "model.fc1.weight") == round(0.3 * total) == report.zeros
