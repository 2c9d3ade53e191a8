"""``plan_speedup`` with injected timings: the plan reaches the speed-up asked for at the least importance removed,
its targets feed ``prune_once``, ``select_parameters`` and the callback, and the conversion then confirms it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import (
    Polynomial,
    PruningScheduleCallback,
    inference_report,
    prune_once,
    select_parameters,
    to_sparse_inference,
)
from lightning_prune.inference import SpeedPlan, Timing, plan_speedup


def cost(runs: Mapping[Timing, Callable[[], object]]) -> dict[Timing, float]:
    """A dense layer costs its entries, CSR three times its stored values (per row, in microseconds); the model
    costs ``BASE`` plus its layers at the example's one row."""
    return {t: model_seconds(t) if t.layer == "" else layer_seconds(t) for t in runs}


def layer_seconds(t: Timing) -> float:
    return 1e-6 * t.rows * t.nonzeros * (1 if t.form == "dense" else 3)


LAYERS = {"0": 512 * 256, "2": 512 * 512, "4": 256 * 512}
BASE = 0.1  # seconds outside the matrices
DENSE = BASE + 1e-6 * sum(LAYERS.values())


def model_seconds(t: Timing) -> float:
    return DENSE if t.form == "dense" else float("nan")


def network() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256))
    with torch.no_grad():
        net[2].weight.mul_(0.1)  # the middle layer's weights are small: the cheapest to prune
    return net.eval()


def plan(speedup: float, **kwargs: Any) -> SpeedPlan:
    return plan_speedup(network(), torch.randn(1, 256), speedup, timer=cost, **kwargs)


def test_plan_reaches_the_speedup_removing_the_least_importance() -> None:
    p = plan(1.5)
    assert p.dense_seconds == pytest.approx(DENSE)
    assert p.reached and p.expected_speedup >= 1.5
    need = DENSE * (1 - 1 / 1.5)
    saved = sum(layer.saved_seconds for layer in p.layers)
    assert saved >= need
    assert list(p.sparsity) == ["0.weight", "2.weight", "4.weight"]
    by_name = {layer.name: layer for layer in p.layers}
    assert by_name["2"].sparsity >= max(by_name["0"].sparsity, by_name["4"].sparsity)  # small weights pruned first
    for layer in p.layers:  # the expected figures are the injected ones
        if layer.sparsity:
            nnz = round((1 - layer.sparsity) * LAYERS[layer.name])
            assert (
                layer.sparse_seconds == pytest.approx(3e-6 * nnz) and layer.dense_seconds == 1e-6 * LAYERS[layer.name]
            )
    text = str(p)
    assert "2.weight" in text and "expected gain" in text and "(reached;" in text


def test_plan_minimises_importance_against_every_uniform_choice() -> None:
    p = plan(1.5)
    net = network()
    weights = {
        name: m.weight.detach().abs().flatten().sort().values for name, m in net.named_children() if name in LAYERS
    }

    def removed(targets: dict[str, float]) -> float:
        return sum(float(weights[n][: round(s * weights[n].numel())].sum()) for n, s in targets.items())

    planned = removed({layer.name: layer.sparsity for layer in p.layers})
    for s in (0.8, 0.9, 0.95, 0.98):  # every uniform target that also reaches the speed-up removes more
        saved = sum(1e-6 * n - 3e-6 * round((1 - s) * n) for n in LAYERS.values())
        if saved >= DENSE * (1 - 1 / 1.5):
            assert planned < removed(dict.fromkeys(LAYERS, s))


def test_a_speedup_beyond_the_ladder_is_not_reached_and_says_so() -> None:
    p = plan(50.0)
    assert not p.reached and all(layer.sparsity == 0.98 for layer in p.layers)
    assert "NOT reached" in str(p)


def test_plan_targets_feed_prune_once_the_callback_and_the_conversion() -> None:
    p = plan(1.5)
    net = network()
    prune_once(net, p.sparsity)
    for layer in p.layers:
        weight = net.get_parameter(layer.parameter)
        assert int((weight == 0).sum()) == round(layer.sparsity * weight.numel())
    targets = select_parameters(network(), sparsity=p.sparsity)
    assert [(t.name, t.sparsity) for t in targets] == list(p.sparsity.items())
    PruningScheduleCallback(sparsity=p.sparsity)  # accepted as per-tensor targets
    fast = to_sparse_inference(net.eval(), torch.randn(1, 256), timer=_with_model_time(p))  # min_speedup 1.1
    report = inference_report(fast)
    assert {c.name for c in report.sparse_layers} == {layer.name for layer in p.layers if layer.sparsity}
    assert report.speedup == pytest.approx(p.expected_speedup) and report.speedup >= 1.5


def _with_model_time(p: SpeedPlan) -> Callable[[Mapping[Timing, Callable[[], object]]], dict[Timing, float]]:
    def timer(runs: Mapping[Timing, Callable[[], object]]) -> dict[Timing, float]:
        model = {"dense": DENSE, "sparse": p.expected_seconds}
        return {t: model[t.form] if t.layer == "" else layer_seconds(t) for t in runs}

    return timer


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"speedup": 0.5}, r"`speedup` must be in \[1"),
        ({"sparsities": ()}, r"`sparsities` must be a non-empty list"),
        ({"sparsities": (0.5, 1.0)}, r"`sparsities` entries must be in \(0, 1\)"),
    ],
)
def test_plan_refuses_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    arguments = {"speedup": 2.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_speedup(nn.Linear(4, 4), torch.randn(1, 4), arguments.pop("speedup"), timer=cost, **arguments)


def test_prune_once_refuses_a_mapping_in_global_scope() -> None:
    with pytest.raises(ValueError, match="`scope` must be 'local'"):
        prune_once(network(), {"0.weight": 0.5}, scope="global")


class _PlanModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = network()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_callback_takes_the_plan_prunes_each_layer_to_its_target_and_prints_it(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    module = _PlanModule()
    p = plan_speedup(module.eval(), torch.randn(1, 256), 1.5, timer=cost)  # planned on the LightningModule itself
    assert list(p.sparsity) == ["model.0.weight", "model.2.weight", "model.4.weight"]
    callback = PruningScheduleCallback(p, schedule=Polynomial(0, 2), make_permanent=False)
    module.train()
    assert callback.plan is p and callback.sparsity == p.sparsity
    loader = DataLoader(TensorDataset(torch.randn(32, 256)), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    with caplog.at_level("INFO"):
        trainer.fit(module, loader)
    for layer in p.layers:  # each layer reaches the plan's own target, exactly
        weight = module.get_parameter(layer.parameter)
        assert int((weight == 0).sum()) == round(layer.sparsity * weight.numel()), layer.name
    assert any(layer.sparsity for layer in p.layers)
    text = caplog.text + capsys.readouterr().out
    assert "The targets of SpeedPlan" in text and "expected gain" in text and "(reached;" in text


def test_a_plan_made_on_the_inner_model_prunes_it_inside_the_lightning_module() -> None:
    p = plan(1.5)  # names of the bare network: "0.weight", ...
    assert list(p.sparsity) == ["0.weight", "2.weight", "4.weight"]
    module = _PlanModule().train()
    callback = PruningScheduleCallback(p, make_permanent=False)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 256)), batch_size=4))
    assert list(callback.sparsity) == ["model.0.weight", "model.2.weight", "model.4.weight"]
    wrapped = nn.ModuleDict({"net": network()})
    prune_once(wrapped, p)
    for layer in p.layers:
        for weight in (module.model.get_parameter(layer.parameter), wrapped["net"].get_parameter(layer.parameter)):
            assert int((weight == 0).sum()) == round(layer.sparsity * weight.numel()), layer.name


def test_a_plan_whose_names_fit_two_submodules_is_refused_naming_both() -> None:
    twins = nn.ModuleDict({"student": network(), "teacher": network()})
    with pytest.raises(ValueError, match=r"'0.weight' is not a parameter of the model.*\['student', 'teacher'\]"):
        prune_once(twins, plan(1.5))
    with pytest.raises(ValueError, match="under no submodule either"):
        prune_once(nn.Sequential(nn.Linear(256, 512)), plan(1.5))


def test_plan_on_a_tied_gpt2_plans_its_conv1d_matrices_leaves_the_tied_head_dense_and_prunes_to_the_plan() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 128, (1, 8))
    p = plan_speedup(lm, tokens, 1.2, timer=cost, sparsities=(0.5, 0.9))
    names = list(p.sparsity)
    assert "lm_head.weight" not in names and "transformer.wte.weight" not in names  # tied to the embedding
    assert len(names) == 2 * 4 and all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in names)
    assert p.reached and any(p.sparsity.values())
    prune_once(lm, p)  # Conv1D stores (in, out): the plan's targets are exact counts of each tensor
    for name, target in p.sparsity.items():
        weight = lm.get_parameter(name)
        assert int((weight == 0).sum()) == round(target * weight.numel()), name
    only = plan_speedup(lm, tokens, 1.2, timer=cost, sparsities=(0.5,), exclude=["*.mlp.*"])
    assert list(only.sparsity) == [n for n in names if ".mlp." not in n]


class HalfRealised:
    """Layers cost as :func:`cost`; the converted model saves only half of what its layers' timings promise (as a
    model whose layers, timed alone, run warmer in the cache than inside it)."""

    def __init__(self) -> None:
        self.nonzeros: dict[str, int] = {}  # each layer's last sparse timing: the conversion's choice

    def saving(self, names: Sequence[str]) -> float:
        return sum(1e-6 * (LAYERS[n] - 3 * self.nonzeros[n]) for n in names)

    def __call__(self, runs: Mapping[Timing, Callable[[], object]]) -> dict[Timing, float]:
        out = {}
        for t in runs:
            if t.layer and t.form != "dense":
                self.nonzeros[t.layer] = t.nonzeros
            sparse = DENSE - 0.5 * self.saving(t.sparse)
            out[t] = layer_seconds(t) if t.layer else (DENSE if t.form == "dense" else sparse)
        return out


def test_plan_measured_short_is_allocated_again_until_the_converted_model_reaches_the_speedup() -> None:
    timer = HalfRealised()
    unchecked = plan(1.5, confirm=0)
    assert unchecked.measured_speedup is None and unchecked.rounds == 1
    checked = plan_speedup(network(), torch.randn(1, 256), 1.5, timer=timer)
    assert checked.rounds >= 2 and checked.reached
    assert checked.measured_speedup is not None and checked.measured_speedup >= 1.5
    assert checked.expected_speedup > 1.5 * 1.2  # it asked the layers for more than 1.5x, to measure 1.5x
    total = {name: sum(layer.sparsity * LAYERS[layer.name] for layer in p.layers) for name, p in
             (("unchecked", unchecked), ("checked", checked))}  # fmt: skip
    assert total["checked"] > total["unchecked"]
    nonzeros = {layer.name: LAYERS[layer.name] - round(layer.sparsity * LAYERS[layer.name]) for layer in checked.layers}
    sparse = [layer.name for layer in checked.layers if layer.sparsity]
    assert checked.measured_speedup == pytest.approx(  # what the timer says the converted model takes
        DENSE / (DENSE - 0.5 * sum(1e-6 * (LAYERS[n] - 3 * nonzeros[n]) for n in sparse))
    )
    assert "measured converted (reached; plan" in str(checked)
    with pytest.raises(ValueError, match="`confirm` must be"):
        plan(1.5, confirm=-1)


class NothingBelow(HalfRealised):
    """Layers cost as :func:`cost`; the converted model saves nothing until its layers save ``threshold`` seconds
    together, then all of it (the conversion then keeps the model dense: 1.00x measured)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def __call__(self, runs: Mapping[Timing, Callable[[], object]]) -> dict[Timing, float]:
        out = {}
        for t in runs:
            if t.layer and t.form != "dense":
                self.nonzeros[t.layer] = t.nonzeros
            saving = self.saving(t.sparse)
            sparse = DENSE - saving if saving >= self.threshold else DENSE
            out[t] = layer_seconds(t) if t.layer else (DENSE if t.form == "dense" else sparse)
        return out


def test_a_plan_measured_at_no_gain_asks_the_layers_for_twice_the_saving_until_it_pays() -> None:
    first = plan_speedup(network(), torch.randn(1, 256), 1.2, timer=NothingBelow(0.3), confirm=1)
    assert first.expected_speedup >= 1.2 and first.measured_speedup == pytest.approx(1.0) and not first.reached
    assert "NOT reached: measured short of the layers' timings; plan 1" in str(first)
    checked = plan_speedup(network(), torch.randn(1, 256), 1.2, timer=NothingBelow(0.3))
    assert checked.rounds == 3 and checked.reached and checked.measured_speedup is not None
    saved = DENSE - checked.expected_seconds  # the layers' saving the third plan asked for: four times the first's
    assert saved >= 0.3 and checked.measured_speedup == pytest.approx(DENSE / (DENSE - saved))
    ladder = plan_speedup(network(), torch.randn(1, 256), 50.0, timer=cost, confirm=0)
    assert not ladder.reached and "NOT reached: the ladder's fastest" in str(ladder)
