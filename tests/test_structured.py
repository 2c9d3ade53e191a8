"""Neuron/channel pruning: coupling, importance, masks, compaction, and the callback end to end."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import (
    TinyModule,
    TinyNet,
    decide_and_apply,
    expected_zeros,
    fit,
    kept_masks,
    make_trainer,
    random_loader,
    unpack_mask,
)
from torch import nn

from lightning_prune import MaskStore, NeuronPruning, PruningScheduleCallback, compact, load_compact_state_dict
from lightning_prune.methods.compaction import resize_to_state_dict
from lightning_prune.methods.neuron_graph import neuron_groups
from lightning_prune.methods.neurons import group_importance
from lightning_prune.reparam import install
from lightning_prune.schedules import AtEpochs
from lightning_prune.selection import select_parameters


class LeNet(nn.Module):
    """LeNet-5 shapes for 28x28 inputs: conv2's 16 channels feed fc1's 400 inputs (16 x 5 x 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))))


class ResNetLike(nn.Module):
    """A stem and one residual block: the stem's and conv_b's channels are added, so pruned together."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 8, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.stem(x)))
        r = self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(h)))))
        h = F.relu(h + r)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Depthwise(nn.Module):
    """A stem, a depthwise convolution (its channels are the stem's) with BatchNorm, a pointwise one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.dw(F.relu(self.stem(x)))))
        return self.head(F.adaptive_avg_pool2d(F.relu(self.pw(h)), 1).flatten(1))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))


NETS = {
    "tinynet": (TinyNet, (1, 1, 10, 10)),
    "lenet": (LeNet, (1, 1, 28, 28)),
    "resnet": (ResNetLike, (1, 1, 8, 8)),
    "mlp": (mlp, (1, 12)),
    "depthwise": (Depthwise, (1, 1, 8, 8)),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    factory, shape = NETS[name]
    net = factory()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine entries
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval(), torch.randn(*shape)


def by_name(groups: list) -> dict[str, Any]:
    return {g.name: g for g in groups}


class Pruned:
    """A neuron-pruning method set up on a network, and the store that holds the masks it decided."""

    def __init__(self, net: nn.Module, x: torch.Tensor, parameters: Any = None, **kwargs: Any) -> None:
        self.method = NeuronPruning(example_inputs=x, **kwargs)
        self.targets = select_parameters(net, parameters)
        self.method.setup(net, self.targets)
        self.store = MaskStore()

    def step(self, sparsity: float, scope: str = "local", seed: int = 0) -> Pruned:
        """One pruning step, as the callback takes it: the method decides, the store narrows and applies."""
        decide_and_apply(self.method, self.targets, sparsity, scope, seed, self.store)
        return self

    def mask(self, name: str) -> torch.Tensor:
        return {t.name: m for t, m in self.store.items()}[name].bool()

    def metrics(self) -> dict[str, float]:
        return self.method.metrics(self.store)

    @property
    def groups(self) -> list:
        return self.method.groups


def masked_neurons(net: nn.Module, x: torch.Tensor, sparsity: float, scope: str = "local", **kwargs: Any) -> Pruned:
    return Pruned(net, x, **kwargs).step(sparsity, scope)


def hand_conv2_importance(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 and L1 of each of TinyNet's conv2 channels over its filter and its 4 columns of fc1, by hand."""
    w, consumer = net.conv2.weight.detach(), net.fc1.weight.detach()
    hand_l2, hand_l1 = [], []
    for c in range(8):
        row, cols = w[c], consumer[:, 4 * c : 4 * c + 4]  # conv2 output is 8 x 2 x 2: channel c -> 4 columns
        hand_l2.append(torch.sqrt(row.pow(2).sum() + cols.pow(2).sum()))
        hand_l1.append(row.abs().sum() + cols.abs().sum())
    return torch.stack(hand_l2), torch.stack(hand_l1)


# ------------------------------------------------------------------------------------------- coupling


def test_neuron_groups_lenet_flatten_maps_each_channel_to_its_block_of_columns():
    net, x = build("lenet")
    groups = by_name(neuron_groups(net, x))
    assert set(groups) == {"conv1", "conv2", "fc1", "fc2"}  # fc3, the output layer, is no group
    conv2 = groups["conv2"]
    assert conv2.size == 16
    columns = [s for s in conv2.slices if s.name == "fc1.weight"]
    assert len(columns) == 1 and columns[0].dim == 1 and columns[0].kind == "in"
    assert torch.equal(columns[0].index, torch.arange(400))
    assert torch.equal(columns[0].owner, torch.arange(16).repeat_interleave(25))
    assert [(s.name, s.dim) for s in conv2.slices if s.kind == "out"] == [("conv2.weight", 0), ("conv2.bias", 0)]


def test_neuron_groups_residual_block_couples_added_channels_and_batchnorm():
    net, x = build("resnet")
    groups = neuron_groups(net, x)
    added = [g for g in groups if "stem" in g.layers]
    assert len(added) == 1
    group = added[0]
    assert sorted(group.layers) == ["conv_b", "stem"] and group.size == 8
    names = {(s.name, s.kind) for s in group.slices}
    assert {("stem.weight", "out"), ("conv_b.weight", "out"), ("bn0.weight", "out"), ("bn_b.bias", "out")} <= names
    assert {("conv_a.weight", "in"), ("head.weight", "in")} <= names
    assert [g.layers for g in groups if g is not group] == [("conv_a",)]


def test_neuron_groups_mlp_output_layer_and_exclude():
    net, x = build("mlp")
    assert [g.name for g in neuron_groups(net, x)] == ["2", "0"]
    assert [g.name for g in neuron_groups(net, x, exclude=["2"])] == ["0"]
    assert [g.name for g in neuron_groups(net, x, exclude=[net[0]])] == ["2"]


def test_neuron_groups_depthwise_channels_follow_their_input():
    net, x = build("depthwise")
    groups = by_name(neuron_groups(net, x))
    assert sorted(groups["dw"].layers) == ["dw", "stem"]
    assert {s.name for s in groups["dw"].slices} >= {"stem.weight", "dw.weight", "bn.weight", "pw.weight"}


def test_neuron_groups_skip_layernorm_groups_with_a_warning():
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match=r"couples LayerNorm '1'.*cannot remove exactly"):
        groups = neuron_groups(net, torch.randn(1, 4))
    assert [g.name for g in groups] == ["2"]


def test_neuron_groups_keeps_train_mode():
    net, x = build("resnet")
    net.train()
    neuron_groups(net, x)
    assert all(m.training for m in net.modules())


# ------------------------------------------------------------------------------------------- importance


def test_group_importance_l2_and_l1_match_hand_computation():
    net, x = build("tinynet")
    group = by_name(neuron_groups(net, x))["conv2"]
    hand_l2, hand_l1 = hand_conv2_importance(net)
    assert torch.allclose(group_importance(group, "l2"), hand_l2)
    assert torch.allclose(group_importance(group, "l1"), hand_l1)


def test_group_importance_random_is_seeded_and_custom_is_checked():
    net, x = build("mlp")
    group = neuron_groups(net, x)[0]
    assert torch.equal(group_importance(group, "random", seed=3), group_importance(group, "random", seed=3))
    assert not torch.equal(group_importance(group, "random", seed=3), group_importance(group, "random", seed=4))
    assert torch.equal(group_importance(group, lambda g: torch.arange(g.size).float()), torch.arange(10).float())
    with pytest.raises(ValueError, match=r"one score per neuron, shape \(10,\)"):
        group_importance(group, lambda g: torch.ones(3))


# ------------------------------------------------------------------------------------------- masks


def test_neuron_pruning_local_removes_least_important_with_all_their_synapses():
    net, x = build("tinynet")
    before, _ = hand_conv2_importance(net)
    method = masked_neurons(net, x, 0.5)
    expected = set(torch.argsort(before)[:4].tolist())
    pruned = {c for c in range(8) if not bool(method.mask("conv2.weight")[c].any())}
    assert pruned == expected
    for c in range(8):
        gone = c in pruned
        assert bool((net.conv2.weight[c] == 0).all()) == gone
        assert bool(net.conv2.bias[c] == 0) == gone
        assert bool((method.mask("fc1.weight")[:, 4 * c : 4 * c + 4] == 0).all()) == gone
        assert bool((net.fc1.weight[:, 4 * c : 4 * c + 4] == 0).all()) == gone
    widths = {k: v for k, v in method.metrics().items() if k.startswith("pruning/width/")}
    assert widths == {
        "pruning/width/fc2": 8,
        "pruning/width/fc1": 12,
        "pruning/width/conv2": 4,
        "pruning/width/conv1": 2,
    }
    assert method.metrics()["pruning/neurons_removed"] == 26 and method.metrics()["pruning/neuron_sparsity"] == 0.5
    fc3 = method.mask("fc3.weight")
    assert fc3.shape == (3, 16) and bool(fc3.any(dim=1).all())  # rows all kept


def test_neuron_pruning_local_is_cumulative_and_keeps_one_neuron():
    net, x = build("mlp")
    method = masked_neurons(net, x, 0.3)
    first = {g.name: g.alive(method.store).clone() for g in method.groups}
    assert {n: int((~a).sum()) for n, a in first.items()} == {
        "2": expected_zeros(0.3, 10),
        "0": expected_zeros(0.3, 20),
    }
    method.step(0.99, seed=1)
    for g in method.groups:
        alive = g.alive(method.store)
        assert int(alive.sum()) == 1
        assert bool((first[g.name] | ~alive).all())  # once pruned, stays pruned


def test_neuron_pruning_residual_masks_every_coupled_tensor():
    net, x = build("resnet")
    method = masked_neurons(net, x, 0.5)
    dead = ~method.mask("stem.weight").flatten(1).any(dim=1)
    assert int(dead.sum()) == 4
    for name in ("conv_b.weight", "bn0.weight", "bn_b.bias", "stem.bias", "conv_b.bias"):
        assert torch.equal(~method.mask(name).reshape(8, -1).any(dim=1), dead), name
        assert bool((net.get_parameter(name).reshape(8, -1)[dead] == 0).all()), name  # zeroed in place
    assert torch.equal(~method.mask("conv_a.weight").transpose(0, 1).flatten(1).any(dim=1), dead)
    assert torch.equal(~method.mask("head.weight").any(dim=0), dead)


@pytest.mark.parametrize("floor", [1, 3])
def test_neuron_pruning_global_one_ranking_with_per_layer_floor(floor):
    net, x = build("mlp")
    with torch.no_grad():
        net[2].weight.mul_(100.0)  # layer "2" scores far higher when raw
    method = masked_neurons(net, x, 0.8, scope="global", min_neurons=floor, normalize=None)
    alive = {g.name: int(g.alive(method.store).sum()) for g in method.groups}
    assert 30 - sum(alive.values()) == expected_zeros(0.8, 30)
    assert alive["0"] == floor  # the low-scoring layer is cut down to its floor, not emptied
    assert alive["2"] == 30 - expected_zeros(0.8, 30) - floor


# ------------------------------------------------------------------------------------------- compaction


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("name", list(NETS))
def test_compact_outputs_allclose_to_masked_and_output_width_kept(name, scope):
    net, x = build(name)
    masked_neurons(net, x, 0.5, scope=scope)
    inputs = torch.randn(16, *x.shape[1:])
    with torch.no_grad():
        expected = net(inputs)
    params_before = sum(p.numel() for p in net.parameters())
    widths = compact(net, x)
    assert widths and all(after < before for before, after in widths.values())
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in net.named_parameters())
    assert not any(n.endswith("_mask") for n, _ in net.named_buffers())
    assert sum(p.numel() for p in net.parameters()) < params_before
    with torch.no_grad():
        got = net(inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compact_lenet_conv2_16_to_8_makes_fc1_take_200():
    net, x = build("lenet")
    Pruned(net, x, ["conv2.weight"]).step(0.5)
    assert compact(net, x) == {"conv2": (16, 8)}
    assert net.conv2.weight.shape == (8, 6, 3, 3) and net.conv2.bias.shape == (8,)
    assert net.fc1.weight.shape == (120, 200) and net.fc1.in_features == 200
    assert net.fc3.weight.shape == (10, 84)


@pytest.mark.parametrize("form", ["permanent", "torch"])
def test_compact_works_on_permanent_zeros_and_torch_form_and_leaves_dense_models_alone(form):
    net, x = build("tinynet")
    pruned = masked_neurons(net, x, 0.5)
    if form == "torch":  # the masks on the model in torch's form (weight_orig, weight_mask): removed first
        install(pruned.store.items())
        assert hasattr(net.fc1, "weight_mask") and hasattr(net.fc1, "bias_mask")
    pruned.store.clear()  # the store forgets its masks, the zeros stay
    assert compact(net, x) == {"fc2": (16, 8), "fc1": (24, 12), "conv2": (8, 4), "conv1": (4, 2)}
    assert not any(n.endswith(("_orig", "_mask")) for n in net.state_dict())
    dense, x = build("tinynet")
    assert compact(dense, x) == {}
    assert dense.fc1.weight.shape == (24, 32)


@pytest.mark.parametrize("name", list(NETS))
def test_resize_to_state_dict_loads_compact_weights_into_fresh_model(name):
    net, x = build(name)
    masked_neurons(net, x, 0.5)
    compact(net, x)
    fresh, _ = build(name, seed=1)
    resized = resize_to_state_dict(fresh, net.state_dict())
    assert resized
    load_compact_state_dict(fresh, net.state_dict())
    inputs = torch.randn(8, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(fresh(inputs), net(inputs))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


# ------------------------------------------------------------------------------------------- callback


class TracedModule(TinyModule):
    """``TinyModule`` with an ``example_input_array`` and compact-checkpoint loading."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.example_input_array = torch.zeros(1, 1, 10, 10)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resize_to_state_dict(self, checkpoint["state_dict"])


class Widths:
    """Records the neuron counts of the pruning method at each epoch start (after the pruning callback)."""

    def __init__(self, method: NeuronPruning) -> None:
        self.method = method
        self.removed: dict[int, float] = {}

    def callback(self) -> Any:
        recorder = self

        class _Recorder(pl.Callback):
            def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
                masks = next(c for c in trainer.callbacks if isinstance(c, PruningScheduleCallback)).masks
                recorder.removed[trainer.current_epoch] = recorder.method.metrics(masks)["pruning/neurons_removed"]

        return _Recorder()


def test_callback_neuron_pruning_compacts_at_end(tmp_path):
    method = NeuronPruning()
    callback = PruningScheduleCallback(sparsity=0.5, method=method, compact=True, verbose=False)
    module, _, trainer = fit(callback, max_epochs=2, module=TracedModule())
    net = module.model
    assert net.conv2.weight.shape == (4, 2, 3, 3) and net.fc1.weight.shape == (12, 16)
    assert net.fc2.weight.shape == (8, 12) and net.fc3.weight.shape == (3, 8)  # output width kept
    assert not any(n.endswith("_orig") for n, _ in module.named_parameters())
    assert trainer.callback_metrics["pruning/neurons_removed"] == 26
    assert trainer.callback_metrics["pruning/width/model.conv2"] == 4
    path = tmp_path / "compact.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    loaded = TracedModule.load_from_checkpoint(path)
    inputs = torch.randn(5, 1, 10, 10)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), module(inputs))


def test_callback_neuron_pruning_schedule_global_and_permanent():
    method = NeuronPruning(importance="l1")
    widths = Widths(method)
    callback = PruningScheduleCallback(
        method=method, scope="global", schedule=AtEpochs({1: 0.25, 2: 0.5}), verbose=False
    )
    pl.seed_everything(0, verbose=False)
    module = TracedModule()
    trainer = make_trainer([callback, widths.callback()], max_epochs=3)
    trainer.fit(module, random_loader(), random_loader(16))
    assert widths.removed == {0: 0, 1: expected_zeros(0.25, 52), 2: expected_zeros(0.5, 52)}
    assert not any(n.endswith("_orig") for n, _ in module.named_parameters())  # biases unmasked too
    assert not any(n.endswith("_mask") for n, _ in module.named_buffers())
    assert module.model.fc1.weight.shape == (24, 32)  # zeros baked in, shapes unchanged without compact
    assert int((module.model.fc1.weight.abs().sum(dim=1) == 0).sum()) == 24 - int(
        trainer.callback_metrics["pruning/width/model.fc1"]
    )


def test_callback_neuron_pruning_exclude_and_parameters():
    method = NeuronPruning(exclude=["model.fc1"], example_inputs=torch.zeros(1, 1, 10, 10))
    callback = PruningScheduleCallback(
        sparsity=0.5, parameters=["model.conv*.weight", "model.fc*.weight"], method=method, compact=True
    )
    module, _, _ = fit(callback, max_epochs=1)
    net = module.model
    assert net.fc1.out_features == 24 and net.conv2.out_channels == 4 and net.fc2.out_features == 8


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NeuronPruning(importance="l3"), r"`importance` must be one of \['l2', 'l1', 'random'\].*got 'l3'"),
        (lambda: NeuronPruning(importance=3), r"`importance` must be one of .*got 3"),
        (lambda: NeuronPruning(exclude="model.fc1"), r"`exclude` must be a list .*got 'model.fc1'"),
        (lambda: NeuronPruning(exclude=[1]), r"`exclude` entries must be .*got 1"),
        (lambda: NeuronPruning(min_neurons=0), r"`min_neurons` must be an integer >= 1, got 0"),
        (lambda: NeuronPruning(normalize="max"), r"`normalize` must be one of \['mean', None\], got 'max'"),
        (
            lambda: PruningScheduleCallback(sparsity=0.5, compact=True),
            r"`compact=True` removes pruned neurons and needs a method that can \(`method=NeuronPruning\(...\)`\), "
            r"got method=l1_unstructured",
        ),
        (
            lambda: PruningScheduleCallback(sparsity=0.5, method="ln_structured", scope="global"),
            r"structured and works in `scope='local'` only",
        ),
    ],
)
def test_neuron_pruning_rejects_bad_config(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("method", "match"),
    [
        (lambda: NeuronPruning(), r"give `example_inputs=` or set `self.example_input_array`"),
        (
            lambda: NeuronPruning(exclude=["model.nothing"], example_inputs=torch.zeros(1, 1, 10, 10)),
            "matches no module",
        ),
    ],
)
def test_neuron_pruning_setup_errors_before_training(method, match):
    module = TinyModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fit(PruningScheduleCallback(sparsity=0.5, method=method()), max_epochs=1, module=module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_neuron_pruning_rejects_selection_without_prunable_layer():
    method = NeuronPruning(example_inputs=torch.zeros(1, 1, 10, 10))
    with pytest.raises(ValueError, match="no prunable layer among the chosen `parameters`"):
        fit(PruningScheduleCallback(sparsity=0.5, parameters=["model.fc3.weight"], method=method), max_epochs=1)


@pytest.mark.cuda
def test_callback_neuron_pruning_on_cuda_compacts_on_device():
    method = NeuronPruning(example_inputs=torch.zeros(1, 1, 10, 10))
    callback = PruningScheduleCallback(sparsity=0.5, method=method, scope="global", compact=True, verbose=False)
    pl_module = TracedModule()
    trainer = make_trainer([callback], max_epochs=1, accelerator="cuda", limit_train_batches=2)
    trainer.fit(pl_module, random_loader())
    assert all(p.is_cuda for p in pl_module.parameters())
    assert sum(pl_module.model.fc1.weight.shape) < 24 + 32


@pytest.mark.filterwarnings("ignore:AtEpochs.*reaches its final target")
def test_callback_neuron_pruning_resumes_from_checkpoint(tmp_path):
    def callback(**kwargs: Any) -> PruningScheduleCallback:
        method = NeuronPruning()
        return PruningScheduleCallback(method=method, schedule=AtEpochs({1: 0.25, 2: 0.5}), verbose=False, **kwargs)

    pl.seed_everything(0, verbose=False)
    first = TracedModule()
    first_cb = callback(make_permanent=False)
    trainer = make_trainer([first_cb], max_epochs=2)  # masks in the checkpoint
    trainer.fit(first, random_loader(), random_loader(16))
    path = tmp_path / "epoch2.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint["state_dict"]) == list(TracedModule().state_dict())  # the model's own keys
    state = next(v for k, v in checkpoint["callbacks"].items() if "PruningScheduleCallback" in k)
    saved = {name: unpack_mask(entry) for name, entry in state["masks"].items()}
    assert {"model.fc1.weight", "model.fc1.bias", "model.conv2.bias"} <= set(saved)  # biases masked too
    assert all(torch.equal(saved[n], m) for n, m in kept_masks(first_cb).items())
    kept = saved["model.fc1.weight"].any(dim=1)
    assert torch.equal(saved["model.fc1.bias"].bool(), kept)

    resumed = TracedModule()  # fresh, unmasked: the checkpoint's masks (biases' too) are loaded into it
    cb = callback()
    trainer = make_trainer([cb], max_epochs=3)
    trainer.fit(resumed, random_loader(), random_loader(16), ckpt_path=path)
    assert cb.state_dict()["steps"] == 2
    assert int(trainer.callback_metrics["pruning/neurons_removed"]) == sum(
        expected_zeros(0.5, n) for n in (24, 16, 8, 4)
    )
    net = resumed.model
    assert net.fc1.weight.shape == (24, 32)  # no compaction: permanent zeros, full shapes
    rows_kept = net.fc1.weight.abs().sum(dim=1) != 0
    assert bool((kept | ~rows_kept).all())  # neurons pruned before the checkpoint stay pruned
    assert bool((net.fc1.bias[~rows_kept] == 0).all())


def test_neuron_metrics_are_prefixed_per_callback_beside_another_pruning_callback() -> None:
    neurons = PruningScheduleCallback(sparsity=0.5, method=NeuronPruning(), verbose=False)
    biases = PruningScheduleCallback(sparsity=0.5, parameters=["model.fc3.bias"], verbose=False)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer([neurons, biases], max_epochs=1)
    trainer.fit(TracedModule(), random_loader(), random_loader(16))
    logged = trainer.callback_metrics
    assert logged["pruning/0/neurons_removed"] == 26 and logged["pruning/0/width/model.conv2"] == 4
    assert "pruning/neurons_removed" not in logged  # no key shared by the two callbacks
    assert logged["pruning/1/sparsity"] == pytest.approx(2 / 3)  # fc3.bias: round(0.5 * 3) = 2 of 3 entries
