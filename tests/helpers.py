"""Shared test helpers: a tiny LeNet-shaped LightningModule on random data, and a tiny Trainer."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import sparsity_report


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.fc1 = nn.Linear(8 * 2 * 2, 24)
        self.fc2 = nn.Linear(24, 16)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _TinyModuleMixin:
    """The LightningModule body, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` variants."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, batch_size=len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr / 10)
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr / 10, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-3)


class TinyModule(_TinyModuleMixin, pl.LightningModule):
    pass


try:
    import lightning.pytorch as _lp

    class LightningTinyModule(_TinyModuleMixin, _lp.LightningModule):
        """``TinyModule`` on the unified ``lightning`` package."""

except ImportError:  # pragma: no cover
    LightningTinyModule = None


def random_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 10, 10, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class SparsityRecorder(pl.Callback):
    """Records the measured sparsity right after the pruning callback ran, at every epoch and batch start."""

    def __init__(self, parameters: Any = None) -> None:
        self.parameters = parameters
        self.at_epoch: dict[int, Any] = {}
        self.at_step: dict[int, Any] = {}

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.at_epoch[trainer.current_epoch] = sparsity_report(pl_module, self.parameters)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.at_step[trainer.global_step] = sparsity_report(pl_module, self.parameters)


def make_trainer(
    callbacks: list, max_epochs: int = 3, trainer_cls: type = pl.Trainer, accelerator: str = "cpu", **kwargs: Any
) -> pl.Trainer:
    kwargs.setdefault("limit_train_batches", 4)
    kwargs.setdefault("limit_val_batches", 1)
    kwargs.setdefault("logger", False)
    return trainer_cls(
        max_epochs=max_epochs,
        callbacks=callbacks,
        accelerator=accelerator,
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        num_sanity_val_steps=0,
        **kwargs,
    )


def fit(callback: Any, max_epochs: int = 3, module: pl.LightningModule | None = None, **kwargs: Any):
    """Train ``TinyModule`` with ``callback`` (and a recorder after it); return (module, recorder, trainer)."""
    pl.seed_everything(0, verbose=False)
    module = module or TinyModule()
    recorder = SparsityRecorder()
    trainer = make_trainer([callback, recorder], max_epochs=max_epochs, **kwargs)
    trainer.fit(module, random_loader(), random_loader(16))
    return module, recorder, trainer


class MaskRecorder(pl.Callback):
    """Records ``{global_step: {name: effective == 0}}`` (copies) at every epoch and batch start (issue 4)."""

    def __init__(self, parameters: Any = None) -> None:
        self.parameters = parameters
        self.zeros: dict[int, dict[str, torch.Tensor]] = {}

    def _record(self, trainer: Any, pl_module: Any) -> None:
        from lightning_prune import select_parameters

        with torch.no_grad():
            self.zeros[trainer.global_step] = {
                t.name: (t.effective() == 0).cpu().clone() for t in select_parameters(pl_module, self.parameters)
            }

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._record(trainer, pl_module)


def write_tiny_mnist(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """Write MNIST-format IDX files (torchvision's layout: ``root/MNIST/raw/``) with learnable digits: each class
    lights a different 4-row band of the 28x28 image, plus noise. Returns ``root`` (issue 7)."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=generator, dtype=torch.uint8)
        images = torch.randint(0, 60, (n, 28, 28), generator=generator, dtype=torch.uint8)
        for i, label in enumerate(labels.tolist()):
            images[i, 2 * label + 4 : 2 * label + 8, 4:24] = 255
        header = struct.pack(">IIII", 2051, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.numpy().tobytes())
    return root
