"""The LeNet model, its LightningModule and the MNIST data module that the examples, benchmarks, tests and docs share.

``examples/lenet_mnist.py`` (the pruning example) and ``examples/lenet_sensitivity.py`` train these (and run in
:func:`run_settings`); import them from the repository root::

    >>> from examples.mnist import LeNet
    >>> sum(p.numel() for p in LeNet().parameters())
    60074
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

__all__ = [
    "LR_SCHEDULES",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "OPTIMIZERS",
    "VAL_SPLIT_SEED",
    "LeNet",
    "LitLeNet",
    "MNISTDataModule",
    "MNISTNotFoundError",
    "run_settings",
    "show_progress",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
VAL_SPLIT_SEED = 1234
"""The validation hold-out is drawn with this fixed seed, whatever the training seed."""
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")


# ---------------------------------------------------------------------------------------------- model


class LeNet(nn.Module):
    """The classic small LeNet for 28x28 MNIST digits.

    conv 1->6 3x3, ReLU, 2x2 max-pool; conv 6->16 3x3, ReLU, 2x2 max-pool; Linear 400->120->84->10 with
    ReLU between. Input ``(N, 1, 28, 28)``, output ``(N, 10)`` logits. 60,074 parameters.

    Example::

        >>> LeNet()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LitLeNet(pl.LightningModule):
    """:class:`LeNet` (as ``self.model``) trained with cross-entropy, with micro-averaged accuracy metrics.

    Logs ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc``.

    Args:
        lr: learning rate, > 0.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 penalty, >= 0.
        lr_schedule: ``"constant"``, or ``"cosine"`` (annealed to 0 over all training steps, per step).

    Raises:
        ValueError: for an argument outside what is allowed.

    Example::

        >>> module = LitLeNet(lr=1e-3)
        >>> type(module.configure_optimizers()).__name__
        'Adam'
    """

    def __init__(
        self,
        lr: float = 2e-3,
        optimizer: str = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"`lr` must be a positive number, got {lr!r}.")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {list(OPTIMIZERS)}, got {optimizer!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
        if not weight_decay >= 0.0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"`lr_schedule` must be one of {list(LR_SCHEDULES)}, got {lr_schedule!r}.")
        self.save_hyperparameters()
        self.model = LeNet()
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, batch_size=len(y))
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return opt
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


# ----------------------------------------------------------------------------------------------- data


class MNISTNotFoundError(FileNotFoundError):
    """MNIST is neither in ``data_dir`` nor downloadable; the message says where to put the files."""


def _load_split(data_dir: str, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """Images normalized to ``(N, 1, 28, 28)`` float32 and int64 labels, via ``torchvision.datasets.MNIST``."""
    from torchvision.datasets import MNIST

    try:
        dataset = MNIST(root=data_dir, train=train, download=False)
    except RuntimeError as missing:
        if not download:
            raise MNISTNotFoundError(_missing_message(data_dir, "download disabled")) from missing
        try:
            dataset = MNIST(root=data_dir, train=train, download=True)
        except Exception as failed:  # no network, a proxy, a broken mirror: all end the same way
            reason = str(failed).strip().splitlines()[0] if str(failed).strip() else type(failed).__name__
            raise MNISTNotFoundError(_missing_message(data_dir, f"download failed: {reason}")) from failed
    images = dataset.data.unsqueeze(1).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return images, dataset.targets.long()


def _missing_message(data_dir: str, why: str) -> str:
    raw = Path(data_dir) / "MNIST" / "raw"
    files = ", ".join(MNIST_FILES)
    return (
        f"MNIST was not found in {str(raw)!r} ({why}).\n"
        f"Put the four MNIST files ({files}) in DIR/MNIST/raw/ and pass `--data-dir DIR` "
        f"(here DIR is {data_dir!r}); the files are at https://ossci-datasets.s3.amazonaws.com/mnist/."
    )


class MNISTDataModule(pl.LightningDataModule):
    """MNIST from ``torchvision.datasets.MNIST``, held in memory as normalized tensors.

    Training: the 60,000 training images less a validation hold-out of ``val_size`` images drawn with the
    fixed seed :data:`VAL_SPLIT_SEED` (the same split for every run); test: the official 10,000 images.
    Loaders are plain ``TensorDataset`` loaders in the main process (fast on CPU for a model this size).

    Args:
        data_dir: the folder holding ``MNIST/raw/`` (torchvision's layout).
        batch_size: training batch size, >= 1 (evaluation uses batches of 1,000).
        seed: seeds the shuffling of the training batches.
        quick: smoke-test mode: at most 512 training, 256 validation and 256 test images, and a validation
            hold-out of at most a sixth of the training images.
        val_size: validation hold-out, >= 1.
        download: try to download MNIST into ``data_dir`` when it is not there.

    Raises:
        ValueError: for an argument outside what is allowed.
        MNISTNotFoundError: from :meth:`prepare_data` / :meth:`setup` when the files are missing and cannot
            be downloaded.
    """

    def __init__(
        self,
        data_dir: str = "./data",
        batch_size: int = 128,
        seed: int = 0,
        quick: bool = False,
        val_size: int = 5000,
        download: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
            raise ValueError(f"`val_size` must be a positive integer, got {val_size!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.data_dir = str(data_dir)
        self.batch_size = batch_size
        self.seed = seed
        self.quick = quick
        self.val_size = val_size
        self.download = download
        self._splits: dict[str, TensorDataset] = {}

    def prepare_data(self) -> None:
        self._load()

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _load(self) -> None:
        if self._splits:
            return
        train_x, train_y = _load_split(self.data_dir, True, self.download)
        test_x, test_y = _load_split(self.data_dir, False, self.download)
        n = len(train_x)
        val_size = min(self.val_size, n // 6) if self.quick else self.val_size
        if not 1 <= val_size < n:
            raise ValueError(f"`val_size` must be below the {n} training images, got {self.val_size}.")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        val_idx, train_idx = order[:val_size], order[val_size:]
        if self.quick:
            train_idx, val_idx = train_idx[:512], val_idx[:256]
            test_x, test_y = test_x[:256], test_y[:256]
        self._splits = {
            "train": TensorDataset(train_x[train_idx], train_y[train_idx]),
            "val": TensorDataset(train_x[val_idx], train_y[val_idx]),
            "test": TensorDataset(test_x, test_y),
        }

    def split_sizes(self) -> dict[str, int]:
        """``{"train": ..., "val": ..., "test": ...}`` image counts (after :meth:`setup`)."""
        return {name: len(ds) for name, ds in self._splits.items()}

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._splits["train"], batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["val"], batch_size=1000)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["test"], batch_size=1000)


# -------------------------------------------------------------------------------- running the examples


def show_progress(quiet: bool) -> bool:
    """Lightning's progress bar: on when the output is a terminal, off in CI (``CI`` set) and when ``quiet``."""
    return not quiet and sys.stdout.isatty() and not os.environ.get("CI")


@contextlib.contextmanager
def run_settings(threads: int = 0, verbose: bool = False) -> Iterator[None]:
    """Within: ``threads`` torch CPU threads (0: unchanged) and, unless ``verbose``, Lightning's info messages and
    three harmless warnings off. All as they were afterwards, so that an example's ``main`` can run in a test.

    >>> before = logging.getLogger("pytorch_lightning").level
    >>> with run_settings():
    ...     logging.getLogger("pytorch_lightning").level
    30
    >>> logging.getLogger("pytorch_lightning").level == before
    True
    """
    before = torch.get_num_threads()
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        if threads > 0:
            torch.set_num_threads(threads)
        if not verbose:
            for logger in loggers:
                logger.setLevel(logging.WARNING)
            for message in ("does not have many workers", "is smaller than the logging interval", "LeafSpec"):
                warnings.filterwarnings("ignore", message=f".*{message}.*")
        try:
            yield
        finally:
            if threads > 0:
                torch.set_num_threads(before)
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
