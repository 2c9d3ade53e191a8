"""LeNet on MNIST, pruned while it trains with :class:`~lightning_prune.PruningScheduleCallback`.

Run it with no arguments (downloads MNIST to ``./data`` where it can)::

    python examples/lenet_mnist.py
    python examples/lenet_mnist.py --data-dir /path/to/data --sparsity 0.98 --output runs/lenet98

The default is the schedule recommended by ``benchmarks/results/accuracy_vs_sparsity.md`` (5 epochs, Adam, lr 2e-3,
batch 128): a dense warm-up epoch, a gradual global L1 ramp (Zhu & Gupta's cubic ``Polynomial``, pruning
every 50 optimizer steps) to 95% of the weights over epochs 1-3, then a fine-tuning epoch at the final
sparsity. The script tests on the official 10,000 images and prints a summary; ``--output`` gets
the checkpoint, the final permanent model's ``state_dict`` (it loads into a plain ``LeNet()`` with
``strict=True``), the same weights as a sparse safetensors file (``lightning_prune.load_sparse``), the
metrics CSV and ``summary.json``. A progress bar shows when the output is a terminal (not in CI, not with
``--quiet``).

The model, data module and training code are importable (run from the repository root)::

    >>> from examples.lenet_mnist import LeNet
    >>> sum(p.numel() for p in LeNet().parameters())
    60074
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune import PruningScheduleCallback, save_sparse, sparsity_report
from lightning_prune._atomic import save_torch, write_text  # the package's own atomic writes (private)
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial, Schedule

__all__ = [
    "LeNet",
    "LitLeNet",
    "MNISTDataModule",
    "MNISTNotFoundError",
    "build_callback",
    "build_parser",
    "main",
    "run",
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
SCHEDULES = ("polynomial", "at-epochs", "one-shot")
METHODS = ("l1_unstructured", "random_unstructured", "ln_structured", "random_structured")


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


# ------------------------------------------------------------------------------------------- measures


# ---------------------------------------------------------------------------------------------- CLI


def default_ramp(epochs: int) -> tuple[int, int]:
    """Default ``(start_epoch, end_epoch)`` of the pruning ramp for a run of ``epochs`` epochs: one dense
    warm-up epoch (when there are at least 3), a long ramp, then a quarter of the epochs (at least one) to
    fine-tune at the final sparsity (see ``benchmarks/results/accuracy_vs_sparsity.md`` for the measurements).

    >>> default_ramp(5), default_ramp(10), default_ramp(2)
    ((1, 4), (1, 8), (0, 1))
    """
    start = 1 if epochs >= 3 else 0
    end = max(start + 1, epochs - max(1, epochs // 4))
    return start, end


def build_schedule(args: argparse.Namespace) -> Schedule:
    """The :class:`~lightning_prune.schedules.Schedule` the CLI arguments describe."""
    start, end = default_ramp(args.epochs)
    start = start if args.start_epoch is None else args.start_epoch
    end = end if args.end_epoch is None else args.end_epoch
    if args.schedule == "one-shot":
        return OneShot(epoch=start)
    if args.schedule == "at-epochs":
        return AtEpochs(args.at_epochs if args.at_epochs else list(range(start + 1, end + 1)))
    every = args.every_n_steps if args.every_n_steps and args.every_n_steps > 0 else None
    return Polynomial(start_epoch=start, end_epoch=end, every_n_steps=every, power=args.power)


def build_callback(args: argparse.Namespace) -> PruningScheduleCallback:
    """Map the CLI arguments to a :class:`~lightning_prune.PruningScheduleCallback`.

    Raises:
        ValueError: for a combination the callback or the schedule rejects.
    """
    return PruningScheduleCallback(
        sparsity=args.sparsity,
        method=args.method,
        scope=args.scope,
        schedule=build_schedule(args),
        seed=args.seed,
        verbose=args.verbose,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenet_mnist.py",
        description="Train LeNet on MNIST while pruning it with lightning_prune's PruningScheduleCallback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default="./data", help="folder holding MNIST/raw/ (torchvision layout)")
    parser.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (warm-up + ramp + fine-tune)")
    parser.add_argument("--sparsity", type=float, default=0.95, help="final cumulative sparsity, in [0, 1)")
    parser.add_argument("--scope", choices=("local", "global"), default="global", help="one ranking or per tensor")
    parser.add_argument("--method", choices=METHODS, default="l1_unstructured", help="pruning method")
    parser.add_argument("--schedule", choices=SCHEDULES, default="polynomial", help="when to prune")
    parser.add_argument(
        "--start-epoch", type=int, default=None, help="ramp start, or the one-shot epoch (None: 1, or 0 if epochs < 3)"
    )
    parser.add_argument(
        "--end-epoch",
        type=int,
        default=None,
        help="epoch the final target is reached (None: epochs - max(1, epochs // 4))",
    )
    parser.add_argument(
        "--every-n-steps", type=int, default=50, help="polynomial: also prune every N optimizer steps (0: per epoch)"
    )
    parser.add_argument("--power", type=float, default=3.0, help="polynomial: exponent of the ramp (3: cubic)")
    parser.add_argument(
        "--at-epochs", type=int, nargs="+", default=None, help="at-epochs: the epochs (None: start+1 .. end)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds initialization, shuffling and random pruning")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="optimizer")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    parser.add_argument("--output", default="runs/lenet_mnist", help="folder for checkpoint, model, metrics, summary")
    parser.add_argument("--quick", action="store_true", help="smoke test: a few batches of data per epoch")
    parser.add_argument("--verbose", action="store_true", help="print Lightning's messages and each pruning step")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (the default when not on a terminal)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is best on a busy CPU)"
    )
    parser.add_argument(
        "--sensitivity",
        action="store_true",
        help="train dense (no pruning), then run the layer sensitivity analysis on the validation images and write "
        "its tables, sensitivity.png and per-layer targets for --sparsity (sensitivity_suggested.json) to --output",
    )
    return parser


def show_progress(args: argparse.Namespace) -> bool:
    """Lightning's progress bar: on when the output is a terminal, off in CI (``CI`` set) and with ``--quiet``."""
    return not args.quiet and sys.stdout.isatty() and not os.environ.get("CI")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, prune, test and save as the arguments say; return the summary (also in ``summary.json``).

    Raises:
        MNISTNotFoundError: before training, when the data is missing and cannot be downloaded.
        ValueError: for arguments the callback, the module or the data module reject.
    """
    callback = build_callback(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    data = MNISTDataModule(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        seed=args.seed,
        quick=args.quick,
        download=not args.no_download,
    )
    data.prepare_data()
    data.setup("fit")
    module = LitLeNet(lr=args.lr, optimizer=args.optimizer)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(dirpath=out, filename="last", enable_version_counter=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[checkpoint] if args.sensitivity else [callback, checkpoint],
        logger=CSVLogger(save_dir=out, name="", version=""),
        enable_progress_bar=show_progress(args),
        enable_model_summary=False,
        log_every_n_steps=50,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start
    (test,) = trainer.test(module, datamodule=data, verbose=False)
    seconds = time.perf_counter() - start
    model_path = out / "lenet_pruned.pt"
    save_torch(module.model.state_dict(), model_path)  # torch.save, written beside the file and renamed into place
    sparse_path = out / "lenet_pruned.safetensors"
    save_sparse(module.model, sparse_path)
    report = sparsity_report(module.model, example_inputs=torch.zeros(1, 1, 28, 28))
    summary = {
        "test_acc": float(test["test_acc"]),
        "test_loss": float(test["test_loss"]),
        **report.to_dict(),
        "file_bytes_dense": model_path.stat().st_size,
        "file_bytes_sparse": sparse_path.stat().st_size,
        "target_sparsity": args.sparsity,
        "scope": args.scope,
        "method": args.method,
        "schedule": repr(callback.schedule),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "seed": args.seed,
        "quick": args.quick,
        "images": data.split_sizes(),
        "fit_seconds": fit_seconds,
        "seconds": seconds,
        "files": {
            "checkpoint": str(checkpoint.last_model_path or checkpoint.best_model_path),
            "model": str(model_path),
            "model_sparse": str(sparse_path),
            "metrics": str(out / "metrics.csv"),
            "summary": str(out / "summary.json"),
        },
    }
    if args.sensitivity:
        try:
            from examples.lenet_sensitivity import analyze_lenet
        except ImportError:  # run as a script: examples/ is on the path
            from lenet_sensitivity import analyze_lenet
        analysis = analyze_lenet(module, data.val_dataloader(), args.sparsity, out)
        summary["sensitivity"] = {"suggested": analysis["suggested"], "table": str(analysis["accuracy"])}
        summary["files"].update(analysis["files"])
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The short human summary ``main`` prints."""
    lines = [
        f"LeNet on MNIST: {summary['epochs']} epochs, {summary['scope']} {summary['method']}, {summary['schedule']}",
        f"{'layer':<14}{'nonzero / total':>18}{'sparsity':>10}",
    ]
    for name, (nonzero, total) in summary["weights_per_tensor"].items():
        lines.append(f"{name:<14}{f'{nonzero:,} / {total:,}':>18}{summary['sparsity_per_tensor'][name]:>10.2%}")
    nonzero, total = summary["weights_nonzero"], summary["weights_total"]
    zeros = summary["params_total"] - summary["params_nonzero"]
    lines += [
        f"{'all weights':<14}{f'{nonzero:,} / {total:,}':>18}{summary['sparsity']:>10.2%}",
        f"parameters (dense-equivalent, biases included): {summary['params_total']:,}; "
        f"nonzero: {summary['params_nonzero']:,}; zeros: {zeros:,}",
        f"compression ratio: {summary['compression_ratio']:.1f}x; MACs per image: {summary['macs_dense']:,} dense, "
        f"{summary['macs_nonzero']:,} nonzero (theoretical speed-up {summary['theoretical_speedup']:.1f}x)",
        f"test accuracy: {summary['test_acc']:.2%} on {summary['images']['test']:,} images "
        f"(fit {summary['fit_seconds']:.0f} s, total {summary['seconds']:.0f} s)",
        f"files: {summary['files']['model']} {summary['file_bytes_dense']:,} bytes; "
        f"{summary['files']['model_sparse']} {summary['file_bytes_sparse']:,} bytes "
        f"({summary['file_bytes_sparse'] / summary['file_bytes_dense']:.2f}x, lightning_prune.load_sparse reads it)",
        f"saved: {summary['files']['summary']}, {summary['files']['metrics']}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: returns 0, or exits with status 2 and a message (no traceback) on bad
    arguments or missing data."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    try:
        build_callback(args)
    except ValueError as bad:
        parser.error(str(bad))
    if not args.verbose:
        for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning internals
    try:
        summary = run(args)
    except MNISTNotFoundError as missing:
        print(f"error: {missing}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_summary(summary))
    if "sensitivity" in summary:
        print(f"{summary['sensitivity']['table']}\nsuggested per-layer sparsity: {summary['sensitivity']['suggested']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
