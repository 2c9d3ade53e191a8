import csv
import io

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from helpers import TinyModule, expected_zeros, make_trainer, random_loader, zero_counts
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.regression import MeanSquaredError

from lightning_prune import NeuronPruning, PruningScheduleCallback, select_parameters
from lightning_prune.sensitivity import SensitivityTable, plot_sensitivity, sensitivity_analysis, suggest_sparsity

SPARSITIES = (0.3, 0.6, 0.9)


def accuracy(preds, target):
    return (preds.argmax(1) == target).float().mean().item()


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bit_identical(before, module):
    after = module.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("premasked", [False, True])
def test_sensitivity_analysis_leaves_model_bit_identical(premasked):
    torch.manual_seed(0)
    module = TinyModule()
    if premasked:
        prune.l1_unstructured(module.model.fc3, "weight", amount=0.5)  # the last tensor the sweep prunes
    module.train()
    before = snapshot(module)
    table = sensitivity_analysis(module, random_loader(32), accuracy, sparsities=SPARSITIES)
    assert_bit_identical(before, module)
    assert module.training
    assert table.names[-1] == "model.fc3.weight"
    if premasked:  # torch's cached attribute is the masked weight again, not the last evaluated copy
        fc3 = module.model.fc3
        assert torch.equal(fc3.weight, fc3.weight_orig * fc3.weight_mask)


def test_sensitivity_analysis_table_has_every_tensor_and_sparsity():
    torch.manual_seed(0)
    module = TinyModule()
    table = sensitivity_analysis(module, random_loader(32), accuracy, sparsities=SPARSITIES)
    expected = tuple(t.name for t in select_parameters(module))
    assert table.names == expected
    assert table.sparsities == SPARSITIES
    assert set(table.metrics) == set(expected)
    assert all(len(table.metrics[n]) == len(SPARSITIES) for n in expected)
    assert table.numels == {t.name: t.tensor.numel() for t in select_parameters(module)}
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert len(rows) == 1 + len(expected) * len(SPARSITIES) == len(table.to_rows())
    assert rows[0]["tensor"] == "<dense>" and float(rows[0]["metric"]) == table.baseline
    measured = {(r["tensor"], float(r["sparsity"])) for r in rows[1:]}
    assert measured == {(n, s) for n in expected for s in SPARSITIES}
    text = str(table)
    assert all(n in text for n in expected) and "0.9" in text


class TwoBranches(nn.Module):
    """``out = big(x) + 0.01 * small(x)``: the ``big`` branch matters a hundred times more."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(16, 4)
        self.small = nn.Linear(16, 4)

    def forward(self, x):
        return self.big(x) + 0.01 * self.small(x)


def test_sensitivity_analysis_shows_larger_drop_for_layer_that_matters():
    torch.manual_seed(0)
    net = TwoBranches()
    x = torch.randn(64, 16)
    with torch.no_grad():
        loader = DataLoader(TensorDataset(x, net(x)), batch_size=16)
    table = sensitivity_analysis(net, loader, MeanSquaredError(), sparsities=SPARSITIES)
    assert table.higher_is_better is False  # taken from the metric
    assert table.baseline == pytest.approx(0.0, abs=1e-10)
    big, small = table.drops("big.weight"), table.drops("small.weight")
    assert all(b > 100 * s > 0 for b, s in zip(big, small))
    assert list(big) == sorted(big)  # more pruning, more loss
    plan = suggest_sparsity(table, 0.5)
    assert plan["small.weight"] > plan["big.weight"]


def test_sensitivity_analysis_through_trainer_validate_matches_plain_loop():
    torch.manual_seed(0)
    module = TinyModule()
    before = snapshot(module)
    trainer = make_trainer([], max_epochs=1, limit_val_batches=None)
    through_lightning = sensitivity_analysis(
        module, random_loader(32), "val_loss", sparsities=SPARSITIES, trainer=trainer
    )
    assert_bit_identical(before, module)
    assert trainer.callbacks == [] or all(type(c).__name__ != "_SwapDuringValidation" for c in trainer.callbacks)
    plain = sensitivity_analysis(
        module, random_loader(32), F.cross_entropy, sparsities=SPARSITIES, higher_is_better=False
    )
    assert through_lightning.higher_is_better is True  # a logged key carries no sense: say so
    assert through_lightning.baseline == pytest.approx(plain.baseline, rel=1e-5)
    for name in plain.names:
        assert through_lightning.metrics[name] == pytest.approx(plain.metrics[name], rel=1e-5)


def test_suggest_sparsity_reaches_overall_target_through_callback():
    torch.manual_seed(0)
    module = TinyModule()
    table = sensitivity_analysis(module, random_loader(32), accuracy, sparsities=(0.2, 0.4, 0.6, 0.8, 0.95))
    plan = suggest_sparsity(table, 0.7)
    assert list(plan) == list(table.names)
    assert all(0.0 <= s <= 0.95 for s in plan.values())
    assert len(set(plan.values())) > 1  # per layer, not uniform
    callback = PruningScheduleCallback(sparsity=plan, verbose=False)
    trainer = make_trainer([callback], max_epochs=1)
    trainer.fit(module, random_loader(), random_loader(16))
    report = zero_counts(module)
    assert [t.name for t in report.tensors] == list(plan)
    assert report.sparsity == pytest.approx(0.7, abs=len(plan) / report.numel)
    for t in report.tensors:
        assert t.zeros == expected_zeros(plan[t.name], t.numel), t.name


def test_suggest_sparsity_prunes_insensitive_tensors_first():
    table = SensitivityTable(
        names=("flat", "steep", "mid"),
        sparsities=(0.25, 0.5, 0.75),
        metrics={"flat": (1.0, 1.0, 0.99), "steep": (0.5, 0.1, 0.0), "mid": (0.99, 0.95, 0.8)},
        numels={"flat": 100, "steep": 100, "mid": 200},
        baseline=1.0,
    )
    plan = suggest_sparsity(table, 0.5)
    assert plan["flat"] == 0.75 and plan["steep"] < plan["mid"] < plan["flat"]
    assert sum(plan[n] * table.numels[n] for n in plan) == pytest.approx(0.5 * 400)
    assert suggest_sparsity(table, 0.0) == dict.fromkeys(table.names, 0.0)
    capped = suggest_sparsity(table, 0.5, max_sparsity=0.6)
    assert max(capped.values()) <= 0.6


def test_plot_sensitivity_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    table = SensitivityTable(
        names=("a", "b"),
        sparsities=(0.5, 0.9),
        metrics={"a": (0.9, 0.5), "b": (1.0, 0.9)},
        numels={"a": 3, "b": 4},
        baseline=1.0,
    )
    path = plot_sensitivity(table, tmp_path / "plots" / "sensitivity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class NoAmount(prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return default_mask


TABLE = SensitivityTable(names=("a",), sparsities=(0.5,), metrics={"a": (0.5,)}, numels={"a": 4}, baseline=1.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, dl: sensitivity_analysis(m, dl, accuracy, sparsities=()), r"`sparsities` must be a non-empty"),
        (
            lambda m, dl: sensitivity_analysis(m, dl, accuracy, sparsities=(0.5, 0.2)),
            r"strictly increasing.*got \(0.5, 0.2\)",
        ),
        (lambda m, dl: sensitivity_analysis(m, dl, accuracy, sparsities=(1.0,)), r"in \(0, 1\), got \(1.0,\)"),
        (lambda m, dl: sensitivity_analysis(m, dl, 3), r"`metric` must be a torchmetrics Metric.*got 3"),
        (lambda m, dl: sensitivity_analysis(m, dl, accuracy, method="l3"), r"`method` must be one of .*got 'l3'"),
        (lambda m, dl: sensitivity_analysis(m, dl, accuracy, method=NoAmount), r"`method=NoAmount` takes no amount"),
        (lambda m, dl: sensitivity_analysis(m, dl, accuracy, parameters=["nope*"]), r"'nope\*' matches no parameter"),
        (
            lambda m, dl: sensitivity_analysis(m, dl, "val_acc", sparsities=(0.5,), trainer=make_trainer([], 1)),
            r"`metric`='val_acc' was not logged by `validation_step`; it logged \['val_loss'\]",
        ),
        (lambda m, dl: suggest_sparsity(TABLE, 1.0), r"`overall_sparsity` must be in \[0, 1\), got 1.0"),
        (
            lambda m, dl: suggest_sparsity(TABLE, 0.6),
            r"`overall_sparsity`=0.6 cannot be reached with no tensor above 0.5",
        ),
        (lambda m, dl: suggest_sparsity(TABLE, 0.2, max_sparsity=1.0), r"`max_sparsity` must be in \(0, 1\), got 1.0"),
        (lambda m, dl: suggest_sparsity(TABLE, 0.2, step=0), r"`step` must be in \(0, 1\), got 0"),
    ],
)
def test_sensitivity_bad_arguments_raise_clear_errors(call, match):
    module = TinyModule()
    before = snapshot(module)
    with pytest.raises(ValueError, match=match):
        call(module, random_loader(16))
    assert_bit_identical(before, module)


def test_example_sensitivity_program_writes_plot_table_and_suggestion(tmp_path, capsys):
    import json

    pytest.importorskip("matplotlib")

    from helpers import write_tiny_mnist

    from examples.lenet_sensitivity import main
    from examples.mnist import LeNet

    data_dir = write_tiny_mnist(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--data-dir", str(data_dir), "--no-download", "--quick", "--epochs", "1", "--sparsity", "0.8"]
    assert main([*args, "--output", str(out)]) == 0
    suggested = json.loads((out / "sensitivity_suggested.json").read_text())["sparsity"]
    numels = {f"model.{name}": p.numel() for name, p in LeNet().named_parameters() if name.endswith("weight")}
    assert sorted(suggested) == sorted(numels)
    assert sum(s * numels[n] for n, s in suggested.items()) / sum(numels.values()) == pytest.approx(0.8, abs=1e-5)
    rows = list(csv.DictReader((out / "sensitivity_accuracy.csv").open()))
    assert len(rows) == 1 + 5 * 13
    assert len(list(csv.DictReader((out / "sensitivity_loss.csv").open()))) == 1 + 5 * 13
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "model.fc1.weight" in printed and str(out / "sensitivity_suggested.json") in printed


@pytest.mark.cuda
def test_sensitivity_analysis_through_trainer_on_cuda_leaves_model_in_place():
    import pytorch_lightning as pl

    torch.manual_seed(0)
    module = TinyModule().cuda()
    before = snapshot(module)
    trainer = pl.Trainer(accelerator="cuda", devices=1, logger=False, enable_progress_bar=False)
    on_gpu = sensitivity_analysis(module, random_loader(32), "val_loss", sparsities=SPARSITIES, trainer=trainer)
    assert next(module.parameters()).is_cuda  # moved back after the Trainer's teardown
    assert_bit_identical(before, module)
    on_cpu = sensitivity_analysis(
        module.cpu(), random_loader(32), F.cross_entropy, sparsities=SPARSITIES, higher_is_better=False
    )
    for name in on_cpu.names:
        assert on_gpu.metrics[name] == pytest.approx(on_cpu.metrics[name], rel=1e-3)


def test_sensitivity_analysis_refuses_neuron_pruning_with_the_reason() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    with pytest.raises(ValueError, match=r"neurons\(l2\).*across coupled tensors"):
        sensitivity_analysis(net, data, lambda p, t: 0.0, method=NeuronPruning(example_inputs=torch.randn(1, 4)))


class TinyData(pl.LightningDataModule):
    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 1, 10, 10, generator=g), torch.randint(0, 3, (32,), generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured", "ln_structured", "random_structured"])
def test_sensitivity_analysis_with_a_datamodule_and_each_method(method: str) -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    table = sensitivity_analysis(
        module, TinyData(), "val_loss", sparsities=(0.5, 0.9), parameters=["model.fc1.weight"], method=method
    )
    assert table.names == ("model.fc1.weight",) and len(table.metrics["model.fc1.weight"]) == 2
    assert table.metrics["model.fc1.weight"] != (table.baseline, table.baseline)  # pruning changed the loss
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
