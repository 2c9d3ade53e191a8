"""The code-health issue: its three defects, and public paths that no other test drives."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyModule, expected_zeros, make_trainer, random_loader
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import (
    AtEpochs,
    NeuronPruning,
    NewMask,
    Polynomial,
    PruningMethod,
    PruningScheduleCallback,
    Schedule,
    sensitivity_analysis,
)
from lightning_prune.distributed import check_strategy

ROOT = Path(__file__).resolve().parent.parent


def ramp(epoch: int) -> float:
    """A plain-function schedule (module level: a stable import path)."""
    return min(0.6, 0.2 * epoch)


def zeros(t: torch.Tensor) -> int:
    return int((t.detach() == 0).sum())


def weights(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if n.endswith("weight")}


# ---------------------------------------------------------------------------------------------- defects


def test_state_key_of_a_function_schedule_is_the_same_in_every_process() -> None:
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_code_health import ramp; "
        "from lightning_prune import PruningScheduleCallback as C; print(C(schedule=ramp).state_key)"
    )
    keys = {
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(keys) == 1 and "0x" not in keys.pop()


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
        assert zeros(target.tensor) == expected_zeros(0.6, target.tensor.numel())


def test_sensitivity_analysis_refuses_neuron_pruning_with_the_reason() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    with pytest.raises(ValueError, match=r"neurons\(l2\).*across coupled tensors"):
        sensitivity_analysis(net, data, lambda p, t: 0.0, method=NeuronPruning(example_inputs=torch.randn(1, 4)))


def test_per_layer_mapping_with_a_method_that_takes_no_amount_is_refused() -> None:
    from examples.custom_methods import EveryOther

    with pytest.raises(ValueError, match=r"`sparsity` has no effect with `method=EveryOther`.*per-layer mapping"):
        PruningScheduleCallback(sparsity={nn.Linear: 0.5}, method=EveryOther)


# ---------------------------------------------------------------------------------------------- public paths


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


class FirstEntries(PruningMethod):
    """A user method: prune the first entries (flat order) of each tensor, exactly to the target."""

    name = "first"

    def local_masks(
        self, targets: Sequence[Any], sparsities: Sequence[float | None], seed: int, masks: Any
    ) -> Iterator[NewMask]:
        for t, s in zip(targets, sparsities):
            mask = torch.ones(t.tensor.shape, dtype=torch.uint8)
            mask.view(-1)[: expected_zeros(s, t.tensor.numel())] = 0
            yield NewMask(t, mask)

    def global_masks(self, targets: Sequence[Any], sparsity: float | None, seed: int, masks: Any) -> Iterator[NewMask]:
        raise ValueError("local only")


def test_a_user_pruning_method_subclass_drives_the_callback() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    callback = PruningScheduleCallback(0.5, method=FirstEntries(), schedule=AtEpochs([0, 1]), verbose=False)
    make_trainer([callback], max_epochs=2).fit(module, random_loader())
    for name, w in weights(module).items():
        flat = w.detach().reshape(-1)
        k = expected_zeros(0.5, flat.numel())
        assert zeros(flat[:k]) == k and zeros(flat[k:]) == 0, name


def test_importance_with_ln_structured_ranks_channels_by_the_importance() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    order = torch.arange(24, dtype=torch.float32)

    def by_row_index(w: torch.Tensor) -> torch.Tensor:  # rows with a low index are the least important
        return order[: w.shape[0]].view(-1, *[1] * (w.dim() - 1)).expand_as(w).clone() + 1

    callback = PruningScheduleCallback(
        0.5, parameters=["model.fc1.weight"], method="ln_structured", importance=by_row_index, verbose=False
    )
    make_trainer([callback], max_epochs=1).fit(module, random_loader())
    rows = module.model.fc1.weight.detach().abs().sum(dim=1)
    assert (rows[:12] == 0).all() and (rows[12:] != 0).all()


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


def test_check_strategy_refuses_sharded_strategies_of_both_packages() -> None:
    import lightning.pytorch.strategies as lps
    import pytorch_lightning.strategies as pls

    for package in (pls, lps):
        check_strategy(package.DDPStrategy())
        for name in ("DeepSpeedStrategy", "FSDPStrategy"):
            cls = getattr(package, name)
            strategy = cls.__new__(cls)  # no process group or DeepSpeed needed to be refused
            with pytest.raises(ValueError, match=f"does not support `strategy={name}`"):
                check_strategy(strategy)
