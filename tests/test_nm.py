"""N:M sparsity through the public API: the pattern and the kept entries against oracles computed here (groups
reshaped and sorted in the test), Conv and Linear layouts, skipped tensors, masks that only narrow, zeros that
stay zero while fine-tuning, resume from a checkpoint, the report's N:M flag, bad arguments, and the accuracy
benchmark end to end on tiny data. The CUDA conversion of 2:4 weights is in ``test_inference_semi_structured.py``."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.utils.prune as prune
from helpers import MaskRecorder, TinyModule, make_trainer, random_loader, write_tiny_mnist
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_prune import (
    AtEpochs,
    NMPruning,
    OneShot,
    PruningScheduleCallback,
    nm_satisfied,
    sparsity_report,
)

# TinyNet: conv1 has 1 input channel (no group of 4), conv2 4, fc1 32, fc2 24, fc3 16 inputs
ELIGIBLE_4 = ("model.conv2.weight", "model.fc1.weight", "model.fc2.weight", "model.fc3.weight")


def groups(w: torch.Tensor, m: int) -> torch.Tensor:
    """Groups of ``m`` along the input dimension, built here: Linear ``(out, in)`` -> ``(out, in/m, m)``;
    Conv2d ``(out, in, kh, kw)`` -> ``(out, kh, kw, in/m, m)`` (input channels at each kernel position)."""
    if w.dim() == 2:
        return w.reshape(w.shape[0], w.shape[1] // m, m)
    out, cin, kh, kw = w.shape
    return w.permute(0, 2, 3, 1).reshape(out, kh, kw, cin // m, m)


def top_n_reference(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``True`` where an entry is among the ``n`` largest magnitudes of its group, from Python's sort (ties: lower
    index first), shaped as the groups."""
    g = groups(w.abs(), m).reshape(-1, m)
    keep = torch.zeros(g.shape, dtype=torch.bool)
    for row, values in enumerate(g.tolist()):
        for j in sorted(range(m), key=lambda j: (-values[j], j))[:n]:
            keep[row, j] = True
    return keep.reshape(groups(w, m).shape)


class WeightsAt(pl.Callback):
    """Copies of every ``*.weight`` at each epoch start (before or after the pruning callback, by list order)."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.at[trainer.current_epoch] = {
            n: p.detach().clone() for n, p in pl_module.named_parameters() if n.endswith("weight")
        }


def fit_nm(
    method: NMPruning,
    max_epochs: int = 2,
    module: pl.LightningModule | None = None,
    loader: torch.utils.data.DataLoader | None = None,
    **kwargs: Any,
) -> tuple[pl.LightningModule, PruningScheduleCallback, WeightsAt, WeightsAt, pl.Trainer]:
    """Train ``module`` (default ``TinyModule``) with an N:M callback between two :class:`WeightsAt`."""
    pl.seed_everything(0, verbose=False)
    module = module or TinyModule()
    callback = PruningScheduleCallback(
        method=method, schedule=kwargs.pop("schedule", OneShot(epoch=1)), verbose=False, **kwargs.pop("cb", {})
    )
    before, after = WeightsAt(), WeightsAt()
    trainer = make_trainer([before, callback, after], max_epochs=max_epochs, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*leaves .* dense.*")
        trainer.fit(module, loader or random_loader())
    return module, callback, before, after, trainer


# ---------------------------------------------------------------------------------------------- the pattern


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (2, 8)])
def test_nm_pruning_keeps_the_n_largest_of_every_m_along_the_input_dimension(n: int, m: int) -> None:
    _, _, before, after, _ = fit_nm(NMPruning(n, m))
    eligible = [name for name, w in before.at[1].items() if w.dim() > 1 and w.shape[1] % m == 0]
    assert ("model.conv2.weight" in eligible) == (m == 4) and len(eligible) >= 3
    for name in eligible:
        w0, w1 = before.at[1][name], after.at[1][name]
        zeros = (groups(w1, m) == 0).sum(dim=-1)
        assert bool((zeros == m - n).all()), name  # nothing else pruned them: exactly m - n in every group
        keep = top_n_reference(w0, n, m)
        assert torch.equal(groups(w1, m) != 0, keep), name  # kept: the n largest magnitudes of each group
        assert torch.equal(groups(w1, m)[keep], groups(w0, m)[keep]), name  # and untouched
    for name in set(before.at[1]) - set(eligible):  # left dense
        assert torch.equal(before.at[1][name], after.at[1][name]), name


class ConvModule(TinyModule):
    """Conv2d(8, 3, 3) -> Flatten -> Linear(192, 3) on 8-channel 10x10 inputs; ``lr=0`` keeps the weights."""

    def __init__(self) -> None:
        super().__init__(lr=0.0)
        self.model = nn.Sequential(nn.Conv2d(8, 3, 3), nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


def test_conv2d_groups_run_over_input_channels_at_each_kernel_position() -> None:
    pl.seed_everything(0, verbose=False)
    module = ConvModule()
    with torch.no_grad():  # |w| in [0.9 c, c] for channel c = 1..8: channels 3, 4 and 7, 8 win at every position
        scale = torch.arange(1.0, 9.0).view(1, 8, 1, 1)
        module.model[0].weight.copy_(scale * torch.rand(3, 8, 3, 3).mul(0.1).add(0.9) * torch.randn(3, 8, 3, 3).sign())
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.randn(16, 8, 10, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        ),
        batch_size=8,
    )
    fit_nm(NMPruning(2, 4), max_epochs=1, module=module, loader=loader, schedule=OneShot(epoch=0))
    w = module.model[0].weight
    assert (w != 0).any(dim=(0, 2, 3)).tolist() == [False, False, True, True, False, False, True, True]
    assert bool((w != 0).sum(dim=1).eq(4).all())  # 2 of each 4 channels at every (out, kh, kw)
    assert nm_satisfied(w, 2, 4)
    assert not nm_satisfied(w.reshape(3, -1), 2, 4)  # a row-major flattening would group a channel's kernel


def test_importance_function_replaces_the_magnitude() -> None:
    module, _, before, after, _ = fit_nm(NMPruning(2, 4, importance=lambda w: -w.abs()), max_epochs=2)
    w0, w1 = before.at[1]["model.fc1.weight"], after.at[1]["model.fc1.weight"]
    smallest = top_n_reference(-w0.abs() + w0.abs().max() + 1, 2, 4)  # the two smallest magnitudes, as the largest
    assert torch.equal(groups(w1, 4) != 0, smallest)


def test_tensors_without_groups_are_skipped_with_a_warning_naming_them() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    callback = PruningScheduleCallback(
        parameters=["model.conv1.weight", "model.fc1.*", "model.fc2.weight"], method=NMPruning(), verbose=False
    )
    with pytest.warns(UserWarning, match=r"model\.conv1\.weight.*input size 1 is not a multiple of m=4") as record:
        make_trainer([callback], max_epochs=1).fit(module, random_loader())
    [message] = [str(w.message) for w in record if "leaves" in str(w.message)]
    assert "'model.fc1.bias': not a matrix layer's weight (Linear.bias)" in message  # no input dimension
    assert int((module.model.conv1.weight == 0).sum()) == 0  # trained, never pruned
    assert {t.name for t, _ in callback.masks.items()} == set()  # permanent at the end: the masks are dropped
    assert sparsity_report(module, ["model.fc*.weight"], nm=(2, 4)).tensors[0].nm is True


def test_a_selection_without_any_eligible_tensor_is_refused_before_training() -> None:
    module = TinyModule()
    callback = PruningScheduleCallback(parameters=["model.conv1.weight"], method=NMPruning(), verbose=False)
    with pytest.raises(ValueError, match=r"none of the chosen tensors.*model\.conv1\.weight"):
        make_trainer([callback], max_epochs=1).fit(module, random_loader())


# ---------------------------------------------------------------------------------------------- masks over time


def test_masks_only_narrow_and_a_repeated_step_changes_nothing() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    prune.l1_unstructured(module.model.fc1, "weight", amount=0.7)  # pruned before: many groups have > 2 zeros
    pruned_before = groups(module.model.fc1.weight_mask == 0, 4)
    masks_at: dict[int, dict[str, torch.Tensor]] = {}

    class Masks(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            masks_at[trainer.current_epoch] = {t.name: m.clone() for t, m in callback.masks.items()}

    callback = PruningScheduleCallback(method=NMPruning(), schedule=AtEpochs([1, 2]), verbose=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*leaves .* dense.*")
        make_trainer([callback, Masks()], max_epochs=3).fit(module, random_loader())
    fc1 = groups(module.model.fc1.weight, 4)
    assert bool(pruned_before.sum(dim=-1).gt(2).any())
    assert bool((fc1[pruned_before] == 0).all())  # pruned before, still pruned
    expected = pruned_before.sum(dim=-1).clamp(min=2)  # at least m - n, more where more were pruned
    assert torch.equal((fc1 == 0).sum(dim=-1), expected)
    assert masks_at[1].keys() == masks_at[2].keys() and masks_at[1]
    for name, mask in masks_at[1].items():
        assert torch.equal(mask, masks_at[2][name]), name  # the second step found the pattern and kept it


@pytest.mark.parametrize("mask_mode", ["inplace", "hook"])
def test_pruned_entries_stay_zero_after_every_optimizer_step(mask_mode: str) -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule(optimizer="adamw")
    recorder = MaskRecorder(list(ELIGIBLE_4))
    callback = PruningScheduleCallback(
        method=NMPruning(), schedule=OneShot(epoch=1), verbose=False, mask_mode=mask_mode
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*leaves .* dense.*")
        make_trainer([callback, recorder], max_epochs=3).fit(module, random_loader())
    step = min(s for s, z in recorder.zeros.items() if bool(z["model.fc1.weight"].any()))
    later = [s for s in recorder.zeros if s > step]
    assert len(later) >= 7  # the batches of epochs 1 and 2 after the step
    for s in later:
        for name in ELIGIBLE_4:
            assert bool(recorder.zeros[s][name][recorder.zeros[step][name]].all()), (s, name)
    report = sparsity_report(module, list(ELIGIBLE_4), nm=(2, 4))
    assert [t.nm for t in report.tensors] == [True] * 4
    assert report.sparsity == pytest.approx(0.5)


def test_resume_from_a_checkpoint_keeps_the_pattern_and_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    def run(epochs: int, ckpt_path: str | None = None) -> tuple[TinyModule, PruningScheduleCallback, Any]:
        pl.seed_everything(0, verbose=False)
        module = TinyModule()
        callback = PruningScheduleCallback(
            method=NMPruning(), schedule=OneShot(epoch=1), verbose=False, make_permanent=False
        )
        checkpoint = ModelCheckpoint(dirpath=tmp_path / str(epochs), save_last=True)
        trainer = make_trainer([callback, checkpoint], max_epochs=epochs, enable_checkpointing=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*leaves .* dense.*")
            trainer.fit(module, random_loader(), ckpt_path=ckpt_path)
        return module, callback, trainer

    full, full_cb, trainer = run(4)
    run(2)
    resumed, resumed_cb, _ = run(4, str(tmp_path / "2" / "last.ckpt"))
    for (name, w), (_, v) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(w, v), name
    assert sorted(t.name for t, _ in resumed_cb.masks.items()) == sorted(ELIGIBLE_4)
    for target, mask in full_cb.masks.items():
        assert torch.equal(mask, resumed_cb.masks.mask(target)), target.name
        assert nm_satisfied(target.tensor, 2, 4), target.name
    logged = trainer.callback_metrics  # the measured figures, logged at the end of each epoch
    assert float(logged["pruning/sparsity"]) == pytest.approx(sparsity_report(full).sparsity)
    assert float(logged["pruning/sparsity/model.fc1.weight"]) == 0.5 and "pruning/target" not in logged


# ---------------------------------------------------------------------------------------------- report


def test_sparsity_report_says_whether_each_tensor_satisfies_the_pattern() -> None:
    net = nn.Sequential(nn.Linear(8, 2), nn.Linear(8, 2), nn.Conv2d(4, 1, (1, 4)), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0, 1.0, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0], [0.0] * 8]))
        net[1].weight.copy_(torch.tensor([[0.0, 1.0, 5.0, -2.0, 3.0, 0.0, 0.0, 0.0], [0.0] * 8]))  # 3 in a group
        net[2].weight.zero_()
        net[2].weight[0, :2] = 1.0  # channels 0, 1 at every kernel position: 2 of 4 channels, 4 of 4 in a row
    report = sparsity_report(net, nm=(2, 4))
    assert [t.nm for t in report.tensors] == [True, False, True, None]
    assert [t.nm for t in sparsity_report(net, nm=(1, 4)).tensors] == [False, False, False, None]
    assert [t.nm for t in sparsity_report(net).tensors] == [None] * 4
    assert nm_satisfied(net[0].weight, 2, 4) and not nm_satisfied(net[1].weight, 2, 4)
    lines = str(report).splitlines()
    assert lines[0].split()[-1] == "2:4" and lines[2].split()[-1] == "yes" and lines[3].split()[-1] == "no"
    assert lines[5].split()[-1] == "-"
    assert "2:4" not in str(sparsity_report(net))
    assert report.to_dict()["nm_per_tensor"] == {
        "0.weight": True,
        "1.weight": False,
        "2.weight": True,
        "3.weight": None,
    }
    assert "nm_per_tensor" not in sparsity_report(net).to_dict()


# ---------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 4, "m": 4}, r"`n` must be below `m`.*n=4, m=4"),
        ({"n": 5}, r"`n` must be below `m`"),
        ({"n": 0}, r"`n` must be an integer >= 1, got 0"),
        ({"n": 2.0}, r"`n` must be an integer >= 1, got 2\.0"),
        ({"m": 4.5}, r"`m` must be an integer >= 1, got 4\.5"),
        ({"m": 0}, r"`m` must be an integer >= 1, got 0"),
        ({"m": -4}, r"`m` must be an integer >= 1, got -4"),
        ({"m": True}, r"`m` must be an integer"),
        ({"importance": "abs"}, r"`importance` must be a function"),
    ],
)
def test_bad_arguments_are_refused_with_the_argument_named(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NMPruning(**kwargs)


def test_global_scope_and_a_sparsity_are_refused_when_the_callback_is_built() -> None:
    with pytest.raises(ValueError, match=r"NMPruning\(n=2, m=4\).*scope='local'.*got scope='global'"):
        PruningScheduleCallback(method=NMPruning(), scope="global")
    with pytest.raises(ValueError, match=r"`sparsity` has no effect"):
        PruningScheduleCallback(0.5, method=NMPruning())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: nm_satisfied(torch.ones(2, 6), 2, 4), r"multiple of m=4, got shape \(2, 6\)"),
        (lambda: nm_satisfied(torch.ones(8), 2, 4), r"multiple of m=4, got shape \(8,\)"),
        (lambda: nm_satisfied(torch.ones(2, 4), 4, 4), r"`n` must be below `m`"),
        (lambda: sparsity_report(nn.Linear(4, 2), nm=2), r"`nm` must be a pair \(n, m\)"),
        (lambda: sparsity_report(nn.Linear(4, 2), nm=(2, 0)), r"`m` must be an integer >= 1"),
    ],
)
def test_bad_input_to_the_checks_is_refused(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- benchmark


def test_nm_accuracy_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    from benchmarks import nm_accuracy

    data = write_tiny_mnist(tmp_path / "data", n_train=96, n_test=32)
    out = tmp_path / "out"
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric")]
    levels, threads = [logger.level for logger in loggers], torch.get_num_threads()
    try:  # the script quiets Lightning's loggers and sets torch's threads: leave later tests as they were
        with warnings.catch_warnings():
            assert nm_accuracy.main(["--data-dir", str(data), "--out-dir", str(out), "--quick", "--seeds", "0"]) == 0
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        torch.set_num_threads(threads)
    rows = nm_accuracy.read_rows(out / "nm_accuracy.csv")
    assert {r["method"] for r in rows} == set(nm_accuracy.METHODS)
    by_method = {r["method"]: r for r in rows}
    assert by_method["dense"]["sparsity"] == 0.0
    assert by_method["nm-2:4"]["sparsity"] == 0.5 and by_method["nm-2:4"]["nm_satisfied"] is True
    table = (out / "nm_accuracy.md").read_text()
    assert "| method |" in table and "nm-2:4" in table
