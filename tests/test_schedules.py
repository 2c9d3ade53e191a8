from typing import Any

import pytest
import pytorch_lightning as pl
from helpers import TinyModule, expected_zeros, make_trainer, random_loader, zeros

from lightning_prune import PruningScheduleCallback
from lightning_prune.schedules import AtEpochs, FunctionSchedule, OneShot, Polynomial, Schedule, as_schedule


def test_oneshot_prunes_at_its_epoch_only():
    s = OneShot(epoch=2)
    assert [s.sparsity(e, 0.7) for e in range(4)] == [0.0, 0.0, 0.7, 0.7]
    assert s.last_epoch == 2 and s.every_n_steps is None


def test_atepochs_list_spreads_target_evenly():
    s = AtEpochs([1, 2, 3])
    assert [s.sparsity(e, 0.6) for e in range(5)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.6])
    assert s.last_epoch == 3 and s.final_sparsity is None


def test_atepochs_mapping_gives_absolute_targets_and_scales_per_layer():
    s = AtEpochs({1: 0.3, 2: 0.6, 3: 0.8})
    assert [s.sparsity(e, 0.8) for e in range(5)] == [0.0, 0.3, 0.6, 0.8, 0.8]
    assert s.final_sparsity == 0.8
    assert s.sparsity(2, 0.4) == pytest.approx(0.3)  # a layer with target 0.4 follows the same shape


@pytest.mark.parametrize("power", [1, 2, 3])
@pytest.mark.parametrize("initial", [0.0, 0.1])
def test_polynomial_matches_zhu_gupta_formula(power, initial):
    s = Polynomial(start_epoch=2, end_epoch=6, power=power, initial_sparsity=initial)
    for epoch in [0, 1, 1.99]:
        assert s.sparsity(epoch, 0.9) == 0.0
    for epoch in [2, 2.5, 3, 4.25, 5, 5.9, 6, 8]:
        p = min(1.0, (epoch - 2) / 4)
        assert s.sparsity(epoch, 0.9) == pytest.approx(0.9 + (initial - 0.9) * (1 - p) ** power)
    assert s.last_epoch == 6


def test_polynomial_is_non_decreasing_and_caps_initial():
    s = Polynomial(start_epoch=0, end_epoch=10, every_n_steps=5, initial_sparsity=0.5)
    values = [s.sparsity(e / 10, 0.3) for e in range(0, 120)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] == 0.3 and s.every_n_steps == 5  # initial capped at the layer's own target


def test_function_schedule_wraps_callables():
    s = as_schedule(lambda epoch: 0.1 * min(epoch, 5))
    assert isinstance(s, FunctionSchedule)
    assert s.sparsity(3, 0.99) == pytest.approx(0.3) and s.last_epoch is None
    with pytest.raises(ValueError, match=r"schedule\(2\).*\[0, 1\)"):
        FunctionSchedule(lambda e: 1.5).sparsity(2, 0.5)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: OneShot(epoch=-1), r"`epoch` must be an integer >= 0, got -1"),
        (lambda: OneShot(epoch=1.5), r"`epoch` must be an integer >= 0, got 1.5 \(float\)"),
        (lambda: AtEpochs([]), r"at least one epoch"),
        (lambda: AtEpochs([2, 1]), r"strictly increasing, got \[2, 1\]"),
        (lambda: AtEpochs([1, 1]), r"strictly increasing"),
        (lambda: AtEpochs([-1, 2]), r"`epochs` must be an integer >= 0, got -1"),
        (lambda: AtEpochs({1: 0.5, 2: 0.3}), r"non-decreasing"),
        (lambda: AtEpochs({1: 1.2}), r"`epochs\[1\]` must be in \[0, 1\), got 1.2"),
        (lambda: AtEpochs("123"), r"list of epochs or a mapping"),
        (lambda: Polynomial(start_epoch=3, end_epoch=3), r"`start_epoch` must be before `end_epoch`"),
        (lambda: Polynomial(start_epoch=5, end_epoch=2), r"start_epoch=5, end_epoch=2"),
        (
            lambda: Polynomial(start_epoch=0, end_epoch=2, every_n_steps=0),
            r"`every_n_steps` must be an integer >= 1, got 0",
        ),
        (lambda: Polynomial(start_epoch=0, end_epoch=2, power=0), r"`power` must be in \(0, inf\], got 0"),
        (
            lambda: Polynomial(start_epoch=0, end_epoch=2, initial_sparsity=1.0),
            r"`initial_sparsity` must be in \[0, 1\), got 1.0",
        ),
        (lambda: FunctionSchedule(3), r"callable"),
    ],
)
def test_schedule_rejects_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_schedule_repr_names_arguments():
    assert repr(Polynomial(start_epoch=1, end_epoch=8, every_n_steps=50)) == (
        "Polynomial(start_epoch=1, end_epoch=8, every_n_steps=50, power=3.0, initial_sparsity=0.0)"
    )
    assert repr(OneShot(epoch=2)) == "OneShot(epoch=2)"
    assert repr(AtEpochs([1, 3])) == "AtEpochs(epochs=[1, 3], targets=None)"
    assert repr(AtEpochs({1: 0.3, 2: 0.6})) == "AtEpochs(epochs=[1, 2], targets=[0.3, 0.6])"


class EveryEpochTenth(Schedule):
    """A user schedule: 0.1 more of the final target at each epoch, up to it."""

    def sparsity(self, epoch: float, final: float) -> float:
        return min(final, final * 0.25 * int(min(epoch, 4)))

    @property
    def last_epoch(self) -> int:
        return 4


def test_a_user_schedule_subclass_drives_the_callback() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    callback = PruningScheduleCallback(0.8, schedule=EveryEpochTenth(), verbose=False)
    seen = {}

    class At(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            w = pl_module.model.fc1.weight
            seen[trainer.current_epoch] = zeros(w)

    make_trainer([callback, At()], max_epochs=5).fit(module, random_loader())
    n = module.model.fc1.weight.numel()
    assert seen == {e: expected_zeros(0.8 * 0.25 * e, n) for e in range(5)}
