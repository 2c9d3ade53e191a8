"""Masks that follow any model: attention, tied weights, parametrized layers, manual optimization, endings,
bad input, and checkpoints that load into plain classes. Default arguments unless a test says otherwise."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import AtEpochs, Polynomial, PruningScheduleCallback, sparsity_report

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- models


class Encoder(nn.Module):
    def __init__(self, batch_first: bool = True, d: int = 16) -> None:
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.inp = nn.Linear(4, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, seq, 4)
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(dim=1))


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


class Wrapped(pl.LightningModule):
    """Any network on random data: classification of (batch, ...) inputs, or next-token LM for integer inputs."""

    def __init__(self, net: nn.Module, optimizer: str = "sgd") -> None:
        super().__init__()
        self.model = net
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        self.log("train_loss", loss, batch_size=len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val_loss", F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)), batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def sequence_data(n: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 5, 4, generator=g), torch.randint(0, 3, (n,), generator=g)), 8)


def image_data(n: int = 32, size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), 8)


def token_data(n: int = 32, vocab: int = 20, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, 7), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), 8)


def trainer(callbacks: list, max_epochs: int = 2, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("limit_train_batches", 4)
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def zeros(t: torch.Tensor) -> int:
    return int((t.detach() == 0).sum())


class PrunedStayZero(pl.Callback):
    """After every optimizer step (checked at the next batch), every masked entry is exactly zero; and live
    entries of ``watch`` change during training."""

    def __init__(self, pruning: PruningScheduleCallback, watch: str) -> None:
        self.pruning, self.watch = pruning, watch
        self.checked = 0
        self.live_before: torch.Tensor | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        for target, mask in self.pruning.masks.items():
            assert zeros(target.tensor[mask == 0]) == int((mask == 0).sum()), target.name
            self.checked += 1
        weight = pl_module.get_parameter(self.watch).detach()
        if self.live_before is None and len(self.pruning.masks):
            self.live_before = weight.clone()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        weight = pl_module.get_parameter(self.watch).detach()
        assert self.live_before is not None
        live = weight != 0
        assert not torch.equal(weight[live], self.live_before[live]), "live entries did not learn"


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_trains_with_defaults_and_out_proj_stays_pruned(batch_first: bool) -> None:
    pl.seed_everything(0, verbose=False)
    module = Wrapped(Encoder(batch_first))
    callback = PruningScheduleCallback(0.5, verbose=False, make_permanent=False)
    watch = "model.encoder.layers.0.self_attn.out_proj.weight"
    check = PrunedStayZero(callback, watch)
    trainer([callback, check], max_epochs=2).fit(module, sequence_data())
    names = [t.name for t in callback.targets]
    assert watch in names and "model.encoder.layers.1.linear2.weight" in names
    out_proj = module.get_parameter(watch)
    assert zeros(out_proj) == out_proj.numel() // 2
    assert check.checked > 0
    assert list(module.state_dict()) == list(Wrapped(Encoder(batch_first)).state_dict())


def test_vision_transformer_trains_with_defaults() -> None:
    torchvision = pytest.importorskip("torchvision")
    pl.seed_everything(0, verbose=False)
    vit = torchvision.models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    module = Wrapped(vit)
    callback = PruningScheduleCallback(0.6, verbose=False)
    trainer([callback], max_epochs=2).fit(module, image_data())
    report = sparsity_report(module)
    assert "model.encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in report.per_tensor()
    assert all(t.zeros == int(np.floor(0.6 * t.numel + 0.5)) for t in report.tensors)
    assert torch.isfinite(module(torch.randn(2, 3, 8, 8))).all()


def test_in_proj_weight_of_attention_can_be_named() -> None:
    pl.seed_everything(0, verbose=False)
    module = Wrapped(Encoder())
    callback = PruningScheduleCallback(
        0.5, parameters=["model.encoder.layers.*.self_attn.in_proj_weight"], verbose=False
    )
    trainer([callback], max_epochs=1).fit(module, sequence_data())
    for i in range(2):
        w = module.get_parameter(f"model.encoder.layers.{i}.self_attn.in_proj_weight")
        assert zeros(w) == w.numel() // 2


def test_hook_mode_refuses_attention_before_training_and_leaves_the_model_untouched() -> None:
    module = Wrapped(Encoder())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = PruningScheduleCallback(0.5, mask_mode="hook", verbose=False)
    with pytest.raises(ValueError, match=r"mask_mode='hook'.*model\.encoder\.layers\.0\.self_attn\.out_proj\.weight"):
        trainer([callback]).fit(module, sequence_data())
    after = module.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------- tied weights


def test_default_selection_leaves_a_tied_embedding_out_and_says_why() -> None:
    pl.seed_everything(0, verbose=False)
    module = Wrapped(TiedLM())
    callback = PruningScheduleCallback(0.5, verbose=False)
    before = module.model.emb.weight.detach().clone()
    trainer([callback], max_epochs=1).fit(module, token_data())
    assert [t.name for t in callback.targets] == ["model.mix.weight"]
    assert dict(callback.selection.left_out) == {"model.emb.weight": "embedding, tied to model.head.weight"}
    assert zeros(module.model.emb.weight) == zeros(before) == 0
    assert zeros(module.model.mix.weight) == module.model.mix.weight.numel() // 2
    assert module.model.head.weight is module.model.emb.weight


@pytest.mark.parametrize("named", [["model.head.weight"], ["model.emb.weight"], ["model.*.weight"]])
def test_tied_weights_are_one_target_and_survive_make_permanent(named: list[str]) -> None:
    pl.seed_everything(0, verbose=False)
    module = Wrapped(TiedLM())
    logs = []

    class Logged(pl.Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            logs.append(float(trainer.callback_metrics["pruning/sparsity/model.emb.weight"]))

    callback = PruningScheduleCallback(0.5, parameters=named, method="random_unstructured", verbose=False)
    tokens = torch.randint(0, 20, (3, 6))

    class Outputs(pl.Callback):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:  # runs before the pruning callback's end
            self.before = pl_module(tokens).detach().clone()

    outputs = Outputs()
    trainer([outputs, callback, Logged()], max_epochs=2).fit(module, token_data())
    shared = [t for t in callback.targets if "model.head.weight" in t.aliases]
    assert len(shared) == 1 and shared[0].aliases == ("model.emb.weight", "model.head.weight")
    assert module.model.head.weight is module.model.emb.weight
    emb = module.model.emb.weight
    assert zeros(emb) == emb.numel() // 2  # pruned once to 0.5, not 0.75
    assert logs and all(v == pytest.approx(0.5) for v in logs)
    assert torch.equal(module(tokens), outputs.before)


# ---------------------------------------------------------------------------------------------- parametrizations


def test_weight_norm_and_spectral_norm_layers_are_pruned_through_their_input_tensor() -> None:
    pl.seed_everything(0, verbose=False)
    net = nn.Sequential(
        nn.Flatten(),
        parametrizations.weight_norm(nn.Linear(3 * 8 * 8, 16)),
        nn.ReLU(),
        parametrizations.spectral_norm(nn.Linear(16, 3)),
    )
    module = Wrapped(net)
    callback = PruningScheduleCallback(0.5, verbose=False)
    trainer([callback], max_epochs=2).fit(module, image_data())
    assert [t.name for t in callback.targets] == [
        "model.1.parametrizations.weight.original1",
        "model.3.parametrizations.weight.original",
    ]
    for layer in (net[1], net[3]):
        weight = layer.weight  # computed by the parametrization
        assert zeros(weight) == weight.numel() // 2


def test_unknown_parametrization_is_left_out_with_a_warning_that_names_the_layer() -> None:
    net = nn.Sequential(nn.Flatten(), parametrizations.orthogonal(nn.Linear(3 * 8 * 8, 16)), nn.Linear(16, 3))
    module = Wrapped(net)
    callback = PruningScheduleCallback(0.5, verbose=False)
    with pytest.warns(UserWarning, match=r"leaves out \['model\.1'\].*parametrizations\.weight\.original"):
        trainer([callback], max_epochs=1).fit(module, image_data())
    assert [t.name for t in callback.targets] == ["model.2.weight"]


def test_selection_of_only_unknown_parametrizations_says_why_it_is_empty() -> None:
    net = nn.Sequential(nn.Flatten(), parametrizations.orthogonal(nn.Linear(3 * 8 * 8, 3)))
    callback = PruningScheduleCallback(0.5, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ValueError,
            match=r"selection is empty.*left out: model\.1\.parametrizations\.weight\.original "
            r"\(a parametrization computes model\.1\.weight\)",
        ):
            trainer([callback], max_epochs=1).fit(Wrapped(net), image_data())


# ---------------------------------------------------------------------------------------------- optimizers


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: A's step, then a check that A's pruned entries are zero before B's forward."""

    def __init__(self, pruning: PruningScheduleCallback) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 3)
        self.pruning = pruning
        self.checked = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()
        loss = F.cross_entropy(self.b(torch.relu(self.a(x))), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        mask = self.pruning.masks.mask(self.pruning.targets[0])
        if mask is not None:  # A's weights right after A's step, before anything else reads them
            assert zeros(self.a.weight[mask == 0]) == int((mask == 0).sum())
            self.checked += 1
        loss_b = F.cross_entropy(self.b(torch.relu(self.a(x))), y)
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        opt_b.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.a.parameters(), lr=0.1, momentum=0.9),
            torch.optim.Adam(self.b.parameters(), lr=0.01),
        ]


def test_manual_optimization_with_two_optimizers_keeps_pruned_entries_zero_after_each_step() -> None:
    pl.seed_everything(0, verbose=False)
    callback = PruningScheduleCallback(0.5, schedule=AtEpochs([0, 1]), verbose=False, make_permanent=False)
    module = TwoOptimizers(callback)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)), 8)
    trainer([callback], max_epochs=3).fit(module, data)
    assert module.checked == 12
    assert zeros(module.a.weight) == 72 and zeros(module.b.weight) == 18


class Jitter(torch.optim.Optimizer):
    """An optimizer the store does not know: SGD that also adds noise everywhere."""

    def __init__(self, params: Any, lr: float = 0.05) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"]).add_(torch.randn_like(p), alpha=1e-3)
        return loss


class JitterModule(Wrapped):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return Jitter(self.parameters())


@pytest.mark.parametrize("extra", [{}, {"accumulate_grad_batches": 2, "gradient_clip_val": 0.1}])
def test_any_optimizer_leaves_pruned_entries_zero_after_every_step(extra: dict[str, Any]) -> None:
    pl.seed_everything(0, verbose=False)
    module = JitterModule(Encoder())
    callback = PruningScheduleCallback(0.7, scope="global", verbose=False, make_permanent=False)
    check = PrunedStayZero(callback, "model.inp.weight")
    trainer([callback, check], max_epochs=2, **extra).fit(module, sequence_data())
    assert check.checked > 0


# ---------------------------------------------------------------------------------------------- endings, logging


def test_max_steps_inside_the_ramp_warns_with_reached_and_planned_sparsity() -> None:
    pl.seed_everything(0, verbose=False)
    callback = PruningScheduleCallback(0.8, schedule=Polynomial(0, 4, every_n_steps=1), verbose=False)
    with pytest.warns(UserWarning, match=r"training ended at sparsity 0\.\d+, below the planned 0\.8000"):
        trainer([callback], max_steps=4, max_epochs=-1).fit(Wrapped(Encoder()), sequence_data())


def test_early_stopping_inside_the_ramp_warns() -> None:
    pl.seed_everything(0, verbose=False)
    callback = PruningScheduleCallback(0.8, schedule=Polynomial(0, 6, every_n_steps=1), verbose=False)
    stop = EarlyStopping("train_loss", patience=0, stopping_threshold=1e9)  # stops after the first epoch
    with pytest.warns(UserWarning, match=r"below the planned 0\.8000"):
        trainer([callback, stop], max_epochs=8).fit(Wrapped(Encoder()), sequence_data())
    assert callback.last_report is not None and 0.0 < callback.last_report.sparsity < 0.8


def test_a_run_that_reaches_its_target_does_not_warn() -> None:
    pl.seed_everything(0, verbose=False)
    callback = PruningScheduleCallback(0.8, schedule=Polynomial(0, 1), verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([callback], max_epochs=2).fit(Wrapped(Encoder()), sequence_data())
    assert not [w for w in caught if "below the planned" in str(w.message)]


def test_logged_epoch_value_is_the_last_one_measured_in_the_epoch(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    callback = PruningScheduleCallback(0.8, schedule=Polynomial(0, 2, every_n_steps=1), verbose=False)
    last: dict[int, float] = {}

    class Last(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            w = [t.tensor.detach() for t in callback.targets]
            last[trainer.current_epoch] = sum(zeros(x) for x in w) / sum(x.numel() for x in w)

    logger = CSVLogger(tmp_path, name="", version="")
    trainer([callback, Last()], max_epochs=3, logger=logger).fit(Wrapped(Encoder()), sequence_data())
    import csv

    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("pruning/sparsity")]
    logged = {int(r["epoch"]): float(r["pruning/sparsity"]) for r in rows}
    assert logged.keys() == last.keys()
    for epoch, value in logged.items():
        assert value == pytest.approx(last[epoch], abs=1e-6)


# ---------------------------------------------------------------------------------------------- bad input


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x.flatten(1)[:, :4]))


def test_nan_in_the_second_tensor_is_refused_before_any_tensor_is_pruned() -> None:
    module = Wrapped(Two())
    with torch.no_grad():
        module.model.b.weight[0, 0] = float("nan")
    before = module.model.a.weight.detach().clone()
    callback = PruningScheduleCallback(0.5, verbose=False)
    with pytest.raises(ValueError, match=r"\['model\.b\.weight'\] hold NaN"):
        trainer([callback]).fit(module, image_data())
    assert torch.equal(module.model.a.weight, before)


def test_a_target_that_would_empty_a_tensor_is_refused_naming_it() -> None:
    callback = PruningScheduleCallback(0.999999, verbose=False)
    with pytest.raises(ValueError, match=r"every entry of \['model\.a\.weight', 'model\.b\.weight'\]"):
        trainer([callback]).fit(Wrapped(Two()), image_data())


def test_numpy_numbers_are_accepted_wherever_python_numbers_are() -> None:
    pl.seed_everything(0, verbose=False)
    callback = PruningScheduleCallback(
        np.float32(0.5), schedule=AtEpochs(list(np.arange(2))), seed=np.int64(3), verbose=False
    )
    module = Wrapped(Two())
    trainer([callback], max_epochs=2).fit(module, image_data())
    assert zeros(module.model.a.weight) == 8 and zeros(module.model.b.weight) == 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": "0.5"}, r"`sparsity` must be a number in \[0, 1\), got '0.5' \(str\)"),
        ({"sparsity": 1.5}, r"`sparsity` must be in \[0, 1\), got 1.5"),
        ({"sparsity": np.float64("nan")}, r"`sparsity` must be a number"),
        ({"sparsity": 0.5, "seed": 1.5}, r"`seed` must be an integer, got 1.5 \(float\)"),
        ({"sparsity": 0.5, "mask_mode": "torch"}, r"`mask_mode` must be one of \['inplace', 'hook'\], got 'torch'"),
        ({"sparsity": 0.5, "scope": "all"}, r"`scope` must be one of \['local', 'global'\], got 'all'"),
    ],
)
def test_bad_arguments_are_refused_with_what_was_given(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruningScheduleCallback(**kwargs)


# ---------------------------------------------------------------------------------------------- checkpoints


PLAIN_LOADER = """
import sys, torch
import pytorch_lightning as pl
from torch import nn

class Encoder(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.inp = nn.Linear(4, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)).mean(dim=1))

class Plain(pl.LightningModule):  # never heard of pruning
    def __init__(self):
        super().__init__()
        self.model = Encoder()

    def forward(self, x):
        return self.model(x)

path, x_path, out_path = sys.argv[1:]
module = Plain.load_from_checkpoint(path, strict=True)
net = Encoder()
net.load_state_dict({k[len("model."):]: v for k, v in torch.load(path)["state_dict"].items()}, strict=True)
x = torch.load(x_path)
module.eval(); net.eval()
with torch.no_grad():
    a, b = module(x), net(x)
assert torch.equal(a, b)
assert "lightning_prune" not in sys.modules
torch.save({"out": a, "zeros": int((net.inp.weight == 0).sum())}, out_path)
"""


@pytest.mark.slow  # a plain class loads each checkpoint in a subprocess
@pytest.mark.parametrize("mask_mode", ["inplace", "hook"])
def test_checkpoints_load_strictly_into_a_plain_class_without_this_package(tmp_path: Path, mask_mode: str) -> None:
    pl.seed_everything(0, verbose=False)
    module = Wrapped(Encoder())
    parameters = None if mask_mode == "inplace" else ["model.inp.weight", "model.head.weight", "model.*linear*"]
    callback = PruningScheduleCallback(0.5, parameters=parameters, mask_mode=mask_mode, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer([callback, ckpt], max_epochs=2, enable_checkpointing=True).fit(module, sequence_data())
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert not [k for k in state["state_dict"] if k.endswith(("_orig", "_mask"))]
    assert sorted(state["state_dict"]) == sorted(Wrapped(Encoder()).state_dict())
    x = torch.randn(3, 5, 4)
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(PLAIN_LOADER))
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "last.ckpt"), str(tmp_path / "x.pt"), str(tmp_path / "o.pt")],
        check=True,
        cwd=tmp_path,
    )
    loaded = torch.load(tmp_path / "o.pt")
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded["out"], module(x))
    assert loaded["zeros"] == module.model.inp.weight.numel() // 2
    masks = state["callbacks"][callback.state_key]["masks"]
    assert masks["model.inp.weight"]["bits"].dtype == torch.uint8
    assert masks["model.inp.weight"]["bits"].numel() == (module.model.inp.weight.numel() + 7) // 8
