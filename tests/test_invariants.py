"""Invariants, tried hard (issue 4): pruned entries stay exactly zero whatever the optimizer does, sparsity
follows the schedule to the element over random models and configurations, and several fits or several
callbacks behave as documented."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import (
    TinyModule,
    expected_zeros,
    kept_masks,
    make_trainer,
    random_loader,
    tensors_of,
    weight_in_use,
    zero_sets,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import AtEpochs, OneShot, Polynomial, PruningScheduleCallback, select_parameters
from lightning_prune.schedules import Schedule

X = torch.randn(4, 1, 10, 10, generator=torch.Generator().manual_seed(5))


class ZerosStayZero(pl.Callback):
    """After every batch (so after every optimizer step): entries that the pruning callback's masks prune are
    exactly 0 in the weights in use and in the weight the forward uses; the set of zeros only grows."""

    def __init__(self, pruning: PruningScheduleCallback) -> None:
        self.checked = 0
        self.previous: dict[str, torch.Tensor] = {}
        self.pruning = pruning

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            pl_module(X.to(pl_module.device))  # the forward pre-hook (hook mode) recomputes module.weight
            for t in self.pruning.targets:
                mask = self.pruning.masks.mask(t)
                if mask is None:
                    continue
                pruned = mask == 0
                assert torch.all(weight_in_use(t.module, t.param)[pruned] == 0), t.name
                assert torch.all(getattr(t.module, t.param)[pruned] == 0), t.name
                if t.name in self.previous:
                    assert torch.all(pruned[self.previous[t.name]]), t.name  # never un-pruned
                self.previous[t.name] = pruned.clone()
                self.checked += 1


class MasksAtEnd(pl.Callback):
    """Placed before the pruning callback: its masks just before ``make_permanent`` drops them."""

    def __init__(self, pruning: PruningScheduleCallback) -> None:
        self.pruning = pruning

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.masks = kept_masks(self.pruning)


@pytest.mark.parametrize("mask_mode", ["hook", "inplace"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize(("clip", "accumulate"), [(None, 1), (0.05, 2)], ids=["plain", "clip-accumulate"])
def test_pruned_entries_stay_exactly_zero_after_every_optimizer_step(
    optimizer: str, clip: Any, accumulate: int, mask_mode: str
) -> None:
    """SGD with momentum and weight decay, Adam, AdamW (decoupled decay), clipping and accumulation, with
    torch's reparametrization and with the masks kept aside."""
    pl.seed_everything(0, verbose=False)
    module = TinyModule(optimizer=optimizer)
    callback = PruningScheduleCallback(
        0.8, schedule=Polynomial(0, 2, every_n_steps=2), verbose=False, mask_mode=mask_mode
    )
    check, at_end = ZerosStayZero(callback), MasksAtEnd(callback)
    trainer = make_trainer(
        [at_end, callback, check],
        max_epochs=3,
        limit_train_batches=6,
        gradient_clip_val=clip,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, random_loader())
    assert check.checked >= 5 * 14  # every tensor after every batch once masked (the first step prunes nothing)
    assert list(module.state_dict()) == list(TinyModule().state_dict())  # plain parameters at the end
    for t in select_parameters(module):  # the same zeros
        assert torch.all(t.tensor[at_end.masks[t.name] == 0] == 0), t.name
        assert int((t.tensor == 0).sum()) == expected_zeros(0.8, t.tensor.numel()), t.name


# ---------------------------------------------------------------- property-based


class PropModule(pl.LightningModule):
    def __init__(self, widths: list[int], conv: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, conv, 3)] if conv else []  # 5x5 inputs -> 3x3
        dims = [conv * 9 if conv else 25, *widths, 2]
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Flatten(), nn.Linear(a, b)] if not layers else [nn.ReLU(), nn.Flatten(), nn.Linear(a, b)]
        self.net = nn.Sequential(*layers)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def target_at(spec: tuple, epoch: float, final: float) -> float:
    """The cumulative target of a drawn schedule, from its definition (the schedule oracle)."""
    kind, args = spec
    if kind == "oneshot":
        return final if epoch >= args["epoch"] else 0.0
    if kind == "at":
        return final * sum(1 for e in args["epochs"] if e <= epoch) / len(args["epochs"])
    if epoch < args["start_epoch"]:
        return 0.0
    p = min(1.0, (epoch - args["start_epoch"]) / (args["end_epoch"] - args["start_epoch"]))
    return final - final * (1.0 - p) ** args["power"]  # Zhu & Gupta with an initial sparsity of 0


class Expected(pl.Callback):
    """Placed after the pruning callback: at each point, the zeros counted here against the schedule's target,
    computed here from the schedule's definition."""

    def __init__(self, spec: tuple, final: float, scope: str, structured: bool, names: list[str]) -> None:
        self.spec, self.final, self.scope, self.structured = spec, final, scope, structured
        self.every = spec[1].get("every_n_steps")
        self.names = names
        self.target = 0.0
        self.history: list[int] = []

    def _check(self, pl_module: Any, point: float | None, names: list[str]) -> None:
        if point is not None:
            self.target = max(self.target, target_at(self.spec, point, self.final))
        weights = [weight_in_use(owner, p) for _, owner, p in tensors_of(pl_module, names)]
        zeros = [int((w == 0).sum()) for w in weights]
        self.history.append(sum(zeros))
        assert self.history == sorted(self.history)  # never decreases
        if self.scope == "global":
            total = sum(w.numel() for w in weights)
            assert abs(sum(zeros) - expected_zeros(self.target, total)) <= 1
        elif self.structured:  # whole output rows (dim 0)
            for w in weights:
                rows = w.shape[0]
                dead = int((w.reshape(rows, -1) == 0).all(dim=1).sum())
                assert abs(dead - expected_zeros(self.target, rows)) <= 1
        else:
            for w, z in zip(weights, zeros):
                assert abs(z - expected_zeros(self.target, w.numel())) <= 1

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._check(pl_module, float(trainer.current_epoch), self.names)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        due = self.every is not None and batch_idx > 0 and trainer.global_step % self.every == 0
        point = trainer.current_epoch + batch_idx / trainer.num_training_batches if due else None
        self._check(pl_module, point, self.names)


@st.composite
def configurations(draw: st.DrawFn) -> dict[str, Any]:
    widths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    conv = draw(st.sampled_from([0, 0, 2, 3]))
    module = PropModule(widths, conv)
    names = [n for n, p in module.named_parameters()]
    method = draw(st.sampled_from(["l1_unstructured", "random_unstructured", "ln_structured", "random_structured"]))
    if method.endswith("_structured"):
        names = [n for n in names if n.endswith("weight")]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    scope = "local" if method.endswith("_structured") else draw(st.sampled_from(["local", "global"]))
    epochs = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["oneshot", "at", "poly", "poly-steps"]))
    if kind == "oneshot":
        args: dict[str, Any] = {"epoch": draw(st.integers(0, epochs - 1))}
        schedule: Schedule = OneShot(**args)
    elif kind == "at":
        args = {"epochs": sorted(draw(st.sets(st.integers(0, epochs), min_size=1, max_size=3)))}
        schedule = AtEpochs(args["epochs"])
    else:
        start = draw(st.integers(0, epochs - 1))
        args = {
            "start_epoch": start,
            "end_epoch": draw(st.integers(start + 1, epochs + 1)),
            "power": draw(st.sampled_from([1.0, 3.0])),
            "every_n_steps": draw(st.integers(1, 3)) if kind == "poly-steps" else None,
        }
        schedule = Polynomial(**args)
    sparsity = draw(st.sampled_from([0.1, 0.3, 0.5, 0.77, 0.9]))
    return {
        "widths": widths, "conv": conv, "method": method, "names": chosen, "scope": scope,
        "schedule": schedule, "spec": (kind, args), "epochs": epochs, "sparsity": sparsity,
        "batches": draw(st.integers(2, 5)),
        "mask_mode": draw(st.sampled_from(["hook", "inplace"])),
    }  # fmt: skip


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(configurations())
def test_sparsity_follows_schedule_to_the_element_property(config: dict[str, Any]) -> None:
    """Random small models, selections, methods, scopes, schedules and mask modes: sparsity never decreases,
    equals the schedule's target within one element per tensor (global: overall) at every point, and the
    final ``state_dict`` has the unpruned keys. (Targets that would prune every entry of an unstructured
    selection are refused before training, and so are not drawn.)"""
    pl.seed_everything(0, verbose=False)
    module = PropModule(config["widths"], config["conv"])
    keys = list(module.state_dict())
    sizes = [module.get_parameter(name).numel() for name in config["names"]]
    if not config["method"].endswith("_structured"):
        groups = [sum(sizes)] if config["scope"] == "global" else sizes
        assume(all(expected_zeros(config["sparsity"], n) < n for n in groups))
    callback = PruningScheduleCallback(
        config["sparsity"],
        parameters=config["names"],
        method=config["method"],
        scope=config["scope"],
        schedule=config["schedule"],
        verbose=False,
        log_per_tensor=False,
        mask_mode=config["mask_mode"],
    )
    structured = config["method"].endswith("_structured")
    expected = Expected(config["spec"], config["sparsity"], config["scope"], structured, config["names"])
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 5, 5, generator=g), torch.randint(0, 2, (16,), generator=g))
    trainer = make_trainer([callback, expected], max_epochs=config["epochs"], limit_train_batches=config["batches"])
    trainer.fit(module, DataLoader(data, batch_size=3))
    assert len(expected.history) == config["epochs"] * (1 + config["batches"])
    assert list(module.state_dict()) == keys


# ---------------------------------------------------------------- several fits, several callbacks


def test_second_fit_on_same_trainer_continues_schedule() -> None:
    """Documented: the callback keeps its progress; a later ``fit`` re-masks the zeros that ``make_permanent``
    left, so pruned entries stay pruned, and prunes further where the schedule asks."""
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    callback = PruningScheduleCallback(0.75, schedule=AtEpochs([0, 2]), verbose=False)
    trainer = make_trainer([callback], max_epochs=2)
    trainer.fit(module, random_loader())
    first = zero_sets(module)
    assert all(int(z.sum()) == expected_zeros(0.375, z.numel()) for z in first.values())
    trainer.fit_loop.max_epochs = 3
    trainer.fit(module, random_loader())
    second = zero_sets(module)
    for name, zeros in first.items():
        assert torch.all(second[name][zeros]), name
        assert int(second[name].sum()) == expected_zeros(0.75, zeros.numel()), name
    assert callback.state_dict()["steps"] == 2


def test_second_fit_with_new_trainer_keeps_pruned_entries() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    callback = PruningScheduleCallback(0.5, schedule=OneShot(epoch=0), verbose=False)
    make_trainer([callback], max_epochs=1).fit(module, random_loader())
    first = zero_sets(module)
    make_trainer([callback], max_epochs=2).fit(module, random_loader())  # trains 2 more epochs
    second = zero_sets(module)
    for name, zeros in first.items():
        assert torch.equal(second[name], zeros), name  # nothing regrew, nothing more was pruned
    assert callback.state_dict()["steps"] == 1


def test_two_callbacks_on_disjoint_parameters(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    convs = PruningScheduleCallback(0.5, parameters=["model.conv*.weight"], verbose=False)
    fcs = PruningScheduleCallback(
        0.8, parameters=["model.fc*.weight"], method="random_unstructured", scope="global", verbose=False
    )
    trainer = make_trainer([convs, fcs], max_epochs=1)
    trainer.fit(module, random_loader())
    assert convs.state_key != fcs.state_key
    conv = select_parameters(module, ["model.conv*.weight"])
    for t in conv:
        assert int((t.tensor == 0).sum()) == expected_zeros(0.5, t.tensor.numel())
    fc = select_parameters(module, ["model.fc*.weight"])
    fc_zeros, fc_total = sum(int((t.tensor == 0).sum()) for t in fc), sum(t.tensor.numel() for t in fc)
    assert fc_zeros == expected_zeros(0.8, fc_total)
    logged = {k for k in trainer.callback_metrics if k.startswith("pruning/") and "/sparsity/" not in k}
    assert logged == {"pruning/0/sparsity", "pruning/0/target", "pruning/1/sparsity", "pruning/1/target"}
    conv_zeros, conv_total = sum(int((t.tensor == 0).sum()) for t in conv), sum(t.tensor.numel() for t in conv)
    assert float(trainer.callback_metrics["pruning/0/sparsity"]) == pytest.approx(conv_zeros / conv_total)
    assert float(trainer.callback_metrics["pruning/1/sparsity"]) == pytest.approx(fc_zeros / fc_total)
    assert float(trainer.callback_metrics["pruning/0/target"]) == pytest.approx(0.5)
    assert float(trainer.callback_metrics["pruning/1/target"]) == pytest.approx(0.8)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert {convs.state_key, fcs.state_key} <= set(states)


def test_two_callbacks_on_overlapping_parameters_raise_before_training() -> None:
    module = TinyModule()
    keys = list(module.state_dict())
    first = PruningScheduleCallback(0.5, parameters=["model.fc*.weight"], verbose=False)
    second = PruningScheduleCallback(0.3, parameters=["model.fc1.weight", "model.conv1.weight"], verbose=False)
    trainer = make_trainer([first, second], max_epochs=1)
    with pytest.raises(ValueError, match=r"both prune \['model.fc1.weight'\]; give them disjoint `parameters`"):
        trainer.fit(module, random_loader())
    assert list(module.state_dict()) == keys and trainer.global_step == 0
    assert math.isfinite(float(module(X).sum()))
