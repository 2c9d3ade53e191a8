"""SparseCheckpointIO through real Trainers: smaller files, exact resume, validate and load_from_checkpoint."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import make_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import SparseCheckpointIO
from lightning_prune.files.checkpoint import _Pickled, save_dense_checkpoint, sparse_state_dict
from lightning_prune.files.codec import SparseParts

ROOT = Path(__file__).resolve().parent.parent
PRUNED = ("net.0.weight", "net.3.weight", "net.5.weight")


class _WideMixin:
    """Three Linear layers (74.5K weights) and a BatchNorm, trained with SGD and momentum."""

    def __init__(self, width: int = 256, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers = [nn.Linear(32, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class WideModule(_WideMixin, pl.LightningModule):
    pass


class PruneWeights(pl.Callback):
    """Stands in for a pruning callback: after every step, zero the smallest 90% of each Linear weight the way torch's
    pruning does (``weight * mask``, so that a pruned negative weight becomes -0.0)."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if name in PRUNED:
                    p.mul_(p.abs() > p.abs().flatten().kthvalue(int(0.9 * p.numel())).values)


def loader(n: int = 48, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 3, (n,), generator=g)), 16)


def trainer(
    folder: Path | None, plugins: list[Any], trainer_cls: type = pl.Trainer, extra: tuple = (), max_epochs: int = 2
) -> Any:
    """A tiny CPU Trainer with :class:`PruneWeights` (and ``extra`` callbacks), saving every epoch into ``folder``."""
    callbacks = [PruneWeights(), *extra]
    if folder is not None:
        callbacks.append(ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1))
    return make_trainer(
        callbacks,
        max_epochs,
        trainer_cls,
        limit_train_batches=3,
        enable_checkpointing=folder is not None,
        plugins=plugins,
    )


def fit(folder: Path, plugins: list[Any]) -> tuple[WideModule, Any]:
    pl.seed_everything(0, verbose=False)
    module = WideModule()
    t = trainer(folder, plugins)
    t.fit(module, loader(), loader(16, seed=1))
    return module, t


def bits(t: Tensor) -> Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same_tensors(a: Any, b: Any) -> None:
    """Nested dicts, lists and tuples equal, tensors bit for bit (so -0.0 differs from +0.0)."""
    assert type(a) is type(b)
    if isinstance(a, Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WideModule, Any]:
    """One 2-epoch run with the plugin: its checkpoint folder (epoch=0.ckpt, epoch=1.ckpt), module and trainer."""
    folder = tmp_path_factory.mktemp("sparse")
    module, t = fit(folder, [SparseCheckpointIO()])
    return folder, module, t


def test_sparse_checkpoint_io_accepted_by_both_trainers() -> None:
    import lightning.pytorch as lp

    for trainer_cls in (pl.Trainer, lp.Trainer):
        plugin = SparseCheckpointIO()
        assert trainer(None, [plugin], trainer_cls).strategy.checkpoint_io is plugin


def test_sparse_checkpoint_smaller_with_the_same_content(sparse_run: Any, tmp_path: Path) -> None:
    folder, module, _ = sparse_run
    fit(tmp_path, [])  # the same run with Lightning's default TorchCheckpointIO
    sparse, default = folder / "epoch=1.ckpt", tmp_path / "epoch=1.ckpt"
    pruned_bytes = sum(module.state_dict()[key].numel() * 4 for key in PRUNED)
    assert sparse.stat().st_size <= default.stat().st_size - 0.8 * pruned_bytes
    loaded_sparse, loaded_default = torch.load(sparse), torch.load(default)
    assert list(loaded_sparse) == list(loaded_default)
    for key in loaded_sparse.keys() - {"callbacks"}:  # ModelCheckpoint's state holds the run's folder
        assert_same_tensors(loaded_sparse[key], loaded_default[key])
    assert loaded_sparse["state_dict"]._metadata == loaded_default["state_dict"]._metadata
    weight = loaded_sparse["state_dict"]["net.3.weight"]
    assert int((weight == 0).sum()) >= int(0.9 * weight.numel()) and weight[weight == 0].signbit().any()


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_sparse_checkpoint_resume_identical(sparse_run: Any, tmp_path: Path) -> None:
    folder, finished, first = sparse_run
    saved = torch.load(folder / "epoch=0.ckpt")
    restored: dict[str, Any] = {}

    class Record(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            restored["global_step"] = trainer.global_step
            restored["state_dict"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            restored["optimizer"] = copy.deepcopy(trainer.optimizers[0].state_dict())  # it holds live tensors

    pl.seed_everything(1, verbose=False)
    module = WideModule()
    t = trainer(tmp_path, [SparseCheckpointIO()], extra=(Record(),))
    t.fit(module, loader(), loader(16, seed=1), ckpt_path=folder / "epoch=0.ckpt")

    assert restored["global_step"] == saved["global_step"] == 3
    assert_same_tensors(restored["state_dict"], dict(saved["state_dict"]))
    assert_same_tensors(restored["optimizer"], saved["optimizer_states"][0])
    assert t.global_step == first.global_step == 6
    assert_same_tensors(module.state_dict(), finished.state_dict())
    assert_same_tensors(t.optimizers[0].state_dict(), first.optimizers[0].state_dict())


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_sparse_checkpoint_validate_and_load_from_checkpoint(sparse_run: Any) -> None:
    folder, finished, first = sparse_run
    path = folder / "epoch=1.ckpt"
    (expected,) = first.validate(finished, loader(16, seed=1), verbose=False)
    for plugins in ([SparseCheckpointIO()], []):  # with the plugin, and with Lightning's own loader
        (metrics,) = trainer(None, plugins).validate(WideModule(width=256), loader(16, seed=1), ckpt_path=path)
        assert metrics == expected
    loaded = WideModule.load_from_checkpoint(path)
    assert_same_tensors(loaded.state_dict(), finished.state_dict())
    assert loaded.hparams.width == 256


def test_sparse_checkpoint_with_lightning_pytorch(tmp_path: Path) -> None:
    import lightning.pytorch as lp

    class LightningWide(_WideMixin, lp.LightningModule):
        pass

    pl.seed_everything(0, verbose=False)
    module = LightningWide()
    t = trainer(None, [SparseCheckpointIO()], lp.Trainer, max_epochs=1)
    t.fit(module, loader())
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    assert path.stat().st_size < 0.8 * sum(p.numel() * 8 for p in module.parameters())  # weights + momentum
    assert_same_tensors(LightningWide.load_from_checkpoint(path).state_dict(), module.state_dict())


@pytest.mark.slow
def test_sparse_checkpoint_without_lightning_prune_imported(sparse_run: Any, tmp_path: Path) -> None:
    """A process that never imports lightning_prune: torch's default ``weights_only=True`` refuses the file and
    names the rebuild function; ``weights_only=False`` loads it (pickle imports lightning_prune); a copy written
    by ``save_dense_checkpoint`` loads with the defaults and without lightning_prune."""
    folder, finished, _ = sparse_run
    path = folder / "epoch=1.ckpt"
    torch.save(finished.state_dict(), tmp_path / "expected.pt")
    save_dense_checkpoint(path, tmp_path / "dense.ckpt")
    script = textwrap.dedent(
        f"""
        import pickle, sys
        import pytorch_lightning as pl, torch
        from torch import nn

        class Plain(pl.LightningModule):
            def __init__(self, width=256, lr=0.05):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(32, width), nn.BatchNorm1d(width), nn.ReLU(),
                                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))

        expected = torch.load({str(tmp_path / "expected.pt")!r})
        def same(model):
            return all(torch.equal(v.view(torch.int32) if v.is_floating_point() else v, expected[k].view(torch.int32)
                       if v.is_floating_point() else expected[k]) for k, v in model.state_dict().items())

        dense = Plain.load_from_checkpoint({str(tmp_path / "dense.ckpt")!r})
        print("dense", same(dense), "lightning_prune" in sys.modules)
        try:
            Plain.load_from_checkpoint({str(path)!r})
        except pickle.UnpicklingError as err:
            print("refused", "_rebuild_from_bitmask_v1" in str(err))
        sparse = Plain.load_from_checkpoint({str(path)!r}, weights_only=False)
        print("sparse", same(sparse), "lightning_prune" in sys.modules)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-4:] == ["dense True False", "refused True", "sparse True True", ""]


def test_sparse_checkpoint_tied_weights_and_metadata() -> None:
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.Linear(64, 64, bias=False))
    model[2].weight = model[0].weight
    with torch.no_grad():
        model[0].weight.masked_fill_(model[0].weight.abs() < 0.1, 0.0)
    state = model.state_dict()
    assert state["0.weight"] is not state["2.weight"]  # state_dict detaches each key on its own
    buffer = io.BytesIO()
    torch.save(sparse_state_dict(state), buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()))
    assert loaded["2.weight"] is loaded["0.weight"] and torch.equal(loaded["0.weight"], model[0].weight)
    assert type(loaded) is type(state) and loaded._metadata == state._metadata
    assert_same_tensors(dict(loaded), dict(state))


def test_sparse_checkpoint_corrupt_tensor_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.ckpt"
    bad = SparseParts(torch.full((2,), 255, dtype=torch.uint8), (16,), torch.ones(3))
    torch.save({"state_dict": {"w": _Pickled(bad)}}, path)
    with pytest.raises(ValueError, match=rf"{path}: a sparse tensor in the checkpoint is corrupt: .*16 bits set"):
        SparseCheckpointIO().load_checkpoint(path)


def test_sparse_checkpoint_storage_options(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="storage_options"):
        SparseCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "x.ckpt", storage_options={"a": 1})


@pytest.mark.cuda
def test_sparse_checkpoint_rebuilds_on_the_mapped_device(tmp_path: Path) -> None:
    weight = torch.randn(64, 64)
    weight[weight.abs() < 1.0] = 0.0
    weight[0, :4] = -0.0
    path = tmp_path / "gpu.ckpt"
    SparseCheckpointIO().save_checkpoint({"state_dict": {"w": weight.cuda()}}, path)
    loaded = torch.load(path, map_location="cuda")["state_dict"]["w"]
    assert loaded.is_cuda and torch.equal(bits(loaded.cpu()), bits(weight))
