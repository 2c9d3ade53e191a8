"""Layer sensitivity of a trained LeNet: which layers can lose how much of their weights?

    python examples/lenet_sensitivity.py --data-dir ../shared/data --epochs 5 --sparsity 0.95 --output runs/sens

Trains LeNet dense (no pruning), then prunes one tensor at a time at each of :data:`SPARSITIES` on the validation
images and writes to ``--output``: ``sensitivity_loss.csv`` and ``sensitivity_accuracy.csv`` (the tables),
``sensitivity.png`` (accuracy curves; needs matplotlib) and ``sensitivity_suggested.json`` (per-layer targets that
reach ``--sparsity`` overall, which ``PruningScheduleCallback(sparsity=...)`` takes as they are).
:func:`analyze_lenet` is also used by ``benchmarks/sensitivity.py``.

Example::

    >>> from examples.mnist import LitLeNet
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> import torch
    >>> loader = DataLoader(TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))), batch_size=4)
    >>> import tempfile
    >>> result = analyze_lenet(LitLeNet(), loader, 0.9, tempfile.mkdtemp(), sparsities=(0.5, 0.95))
    >>> sorted(result["suggested"])
    ['model.conv1.weight', 'model.conv2.weight', 'model.fc1.weight', 'model.fc2.weight', 'model.fc3.weight']
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

if __name__ == "__main__":  # run as a script: `examples.*` importable from any directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.mnist import LitLeNet, MNISTDataModule, MNISTNotFoundError, run_settings, show_progress
from lightning_prune import plot_sensitivity, sensitivity_analysis, suggest_sparsity
from lightning_prune.files.atomic import write_text  # the package's own atomic writes (private)

__all__ = ["SPARSITIES", "analyze_lenet", "build_parser", "main"]

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)


def analyze_lenet(
    module: nn.Module,
    dataloader: Any,
    overall_sparsity: float,
    out_dir: str | Path,
    sparsities: Sequence[float] = SPARSITIES,
) -> dict[str, Any]:
    """Run the analysis twice on ``dataloader`` (cross-entropy loss, and accuracy), write
    ``sensitivity_loss.csv``, ``sensitivity_accuracy.csv``, ``sensitivity.png`` (accuracy curves) and
    ``sensitivity_suggested.json`` (per-layer targets for ``overall_sparsity``, from the loss curves: loss
    is smooth where accuracy is flat) to ``out_dir``; return the suggestion, the tables and the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loss = sensitivity_analysis(module, dataloader, F.cross_entropy, sparsities=sparsities, higher_is_better=False)
    accuracy_metric = MulticlassAccuracy(num_classes=10, average="micro")
    accuracy = sensitivity_analysis(module, dataloader, accuracy_metric, sparsities=sparsities)
    loss = replace(loss, metric_name="validation loss")
    accuracy = replace(accuracy, metric_name="validation accuracy")
    suggested = suggest_sparsity(loss, overall_sparsity)
    paths = {
        "loss_table": out / "sensitivity_loss.csv",
        "accuracy_table": out / "sensitivity_accuracy.csv",
        "plot": out / "sensitivity.png",
        "suggested": out / "sensitivity_suggested.json",
    }
    loss.to_csv(paths["loss_table"])
    accuracy.to_csv(paths["accuracy_table"])
    plot_sensitivity(accuracy, paths["plot"], title="LeNet/MNIST: validation accuracy, one tensor pruned (L1)")
    write_text(paths["suggested"], json.dumps({"overall_sparsity": overall_sparsity, "sparsity": suggested}, indent=2))
    return {"suggested": suggested, "loss": loss, "accuracy": accuracy, "files": {k: str(v) for k, v in paths.items()}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenet_sensitivity.py",
        description="Train LeNet on MNIST dense, then measure how much each layer's weights can be pruned.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--data-dir", default="./data", help="folder holding MNIST/raw/ (torchvision layout)")
    add("--no-download", action="store_true", help="never try to download MNIST")
    add("--epochs", type=int, default=5, help="dense training epochs")
    add("--sparsity", type=float, default=0.95, help="overall sparsity the suggested per-layer targets reach")
    add("--seed", type=int, default=0, help="seeds initialization and shuffling")
    add("--batch-size", type=int, default=128, help="training batch size")
    add("--lr", type=float, default=2e-3, help="learning rate (Adam)")
    add("--output", default="runs/lenet_sensitivity", help="folder for the tables, the plot and the suggestion")
    add("--quick", action="store_true", help="smoke test: a few batches of data per epoch")
    add("--verbose", action="store_true", help="print Lightning's messages")
    add("--quiet", action="store_true", help="no progress bar (the default when not on a terminal)")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is best on a busy CPU)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train dense, analyse on the validation images, print the accuracy table and the suggestion; return
    :func:`analyze_lenet`'s result.

    Raises:
        MNISTNotFoundError: before training, when the data is missing and cannot be downloaded.
    """
    pl.seed_everything(args.seed, workers=True, verbose=False)
    data = MNISTDataModule(
        args.data_dir, batch_size=args.batch_size, seed=args.seed, quick=args.quick, download=not args.no_download
    )
    data.setup("fit")  # raises MNISTNotFoundError before anything is written
    module = LitLeNet(lr=args.lr)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=show_progress(args.quiet),
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(module, datamodule=data)
    result = analyze_lenet(module, data.val_dataloader(), args.sparsity, args.output)
    print(
        f"{result['accuracy']}\nsuggested per-layer sparsity for {args.sparsity:.2%} overall: {result['suggested']}\n"
        f"saved: {', '.join(result['files'].values())}"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: returns 0, or exits with status 2 and a message (no traceback) on bad arguments
    or missing data."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    try:  # every argument checked before any data is read
        LitLeNet(lr=args.lr)
        MNISTDataModule(batch_size=args.batch_size)
    except ValueError as bad:
        parser.error(str(bad))
    try:
        with run_settings(threads=args.threads, verbose=args.verbose):
            run(args)
    except MNISTNotFoundError as missing:
        print(f"error: {missing}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
