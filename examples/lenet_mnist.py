"""LeNet on MNIST, pruned while it trains with :class:`~lightning_prune.PruningScheduleCallback`.

    python examples/lenet_mnist.py --data-dir ../shared/data   # without it: MNIST downloaded to ./data
    python examples/lenet_mnist.py --data-dir /path/to/data --sparsity 0.98 --output runs/lenet98

Read :func:`run` top to bottom: data, model, the callback (the one part about pruning), fit, test, report, save.
The defaults are the schedule that ``benchmarks/results/accuracy_vs_sparsity.md`` recommends: 5 epochs (Adam, lr
2e-3, batch 128), a dense warm-up epoch, a cubic global L1 ramp to 95% of the weights over epochs 1-3 (pruning every
50 steps), a fine-tuning epoch. ``--output`` gets the checkpoint, the final model's ``state_dict`` (it loads into a
plain ``LeNet()``, strictly), the same weights sparse in safetensors (``lightning_prune.load_sparse``), the metrics
CSV and ``summary.json``. Model and data: ``examples/mnist.py``; sensitivity: ``examples/lenet_sensitivity.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

if __name__ == "__main__":  # run as a script: `examples.*` importable from any directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.mnist import OPTIMIZERS, LitLeNet, MNISTDataModule, MNISTNotFoundError, run_settings, show_progress
from lightning_prune import PruningScheduleCallback, save_sparse, sparsity_report
from lightning_prune.files.atomic import save_torch, write_text  # the package's own atomic writes (private)
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial

__all__ = ["build_callback", "build_parser", "main", "run"]

METHODS = ("l1_unstructured", "random_unstructured", "ln_structured", "random_structured")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenet_mnist.py",
        description="Train LeNet on MNIST while pruning it with lightning_prune's PruningScheduleCallback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--data-dir", default="./data", help="folder holding MNIST/raw/ (torchvision layout)")
    add("--no-download", action="store_true", help="never try to download MNIST")
    add("--epochs", type=int, default=5, help="training epochs (warm-up + ramp + fine-tune)")
    add("--sparsity", type=float, default=0.95, help="final cumulative sparsity, in [0, 1)")
    add("--scope", choices=("local", "global"), default="global", help="one ranking or per tensor")
    add("--method", choices=METHODS, default="l1_unstructured", help="pruning method")
    add("--schedule", choices=("polynomial", "at-epochs", "one-shot"), default="polynomial", help="when to prune")
    add("--start-epoch", type=int, help="ramp start, or the one-shot epoch (None: 1, or 0 if epochs < 3)")
    add("--end-epoch", type=int, help="epoch the final target is reached (None: epochs - max(1, epochs // 4))")
    add("--every-n-steps", type=int, default=50, help="polynomial: also prune every N optimizer steps (0: per epoch)")
    add("--power", type=float, default=3.0, help="polynomial: exponent of the ramp (3: cubic)")
    add("--at-epochs", type=int, nargs="+", help="at-epochs: the epochs (None: start+1 .. end)")
    add("--seed", type=int, default=0, help="seeds initialization, shuffling and random pruning")
    add("--batch-size", type=int, default=128, help="training batch size")
    add("--optimizer", choices=OPTIMIZERS, default="adam", help="optimizer")
    add("--lr", type=float, default=2e-3, help="learning rate")
    add("--output", default="runs/lenet_mnist", help="folder for checkpoint, model, metrics, summary")
    add("--quick", action="store_true", help="smoke test: a few batches of data per epoch")
    add("--verbose", action="store_true", help="print Lightning's messages and each pruning step")
    add("--quiet", action="store_true", help="no progress bar (the default when not on a terminal)")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is best on a busy CPU)")
    return parser


def build_callback(args: argparse.Namespace) -> PruningScheduleCallback:
    """The callback the arguments describe. The default ramp: one dense warm-up epoch (when there are at least 3),
    then to the target by the last quarter of the epochs (at least one), which fine-tunes at the final sparsity.

    Raises:
        ValueError: for a combination the callback or the schedule rejects.
    """
    default_start = 1 if args.epochs >= 3 else 0
    start = default_start if args.start_epoch is None else args.start_epoch
    end = max(default_start + 1, args.epochs - max(1, args.epochs // 4)) if args.end_epoch is None else args.end_epoch
    if args.schedule == "one-shot":
        schedule = OneShot(epoch=start)
    elif args.schedule == "at-epochs":
        schedule = AtEpochs(args.at_epochs or list(range(start + 1, end + 1)))
    else:
        schedule = Polynomial(start, end, every_n_steps=max(0, args.every_n_steps) or None, power=args.power)
    return PruningScheduleCallback(
        args.sparsity, method=args.method, scope=args.scope, schedule=schedule, seed=args.seed, verbose=args.verbose
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, prune, test, report and save as the arguments say; print the summary and return it (``summary.json``).

    Raises:
        MNISTNotFoundError: before training, when the data is missing and cannot be downloaded.
    """
    pl.seed_everything(args.seed, workers=True, verbose=False)
    # data: in memory; 5,000 training images held out for validation, the official 10,000 for the test
    data = MNISTDataModule(
        args.data_dir, batch_size=args.batch_size, seed=args.seed, quick=args.quick, download=not args.no_download
    )
    data.setup("fit")  # raises MNISTNotFoundError before anything is written
    # model: LeNet (as `module.model`) in a LightningModule that knows nothing of pruning
    module = LitLeNet(lr=args.lr, optimizer=args.optimizer)
    # the callback: prunes on its schedule, masks gradients, makes the zeros permanent at the end
    callback = build_callback(args)
    # fit
    out = Path(args.output)
    checkpoint = ModelCheckpoint(dirpath=out, filename="last", enable_version_counter=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[callback, checkpoint],
        logger=CSVLogger(save_dir=out, name="", version=""),
        enable_progress_bar=show_progress(args.quiet),
        enable_model_summary=False,
        log_every_n_steps=50,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start
    # test
    (test,) = trainer.test(module, datamodule=data, verbose=False)
    seconds = time.perf_counter() - start
    # report: zeros per tensor, parameters and MACs, measured on the final plain model
    report = sparsity_report(module.model, example_inputs=torch.zeros(1, 1, 28, 28))
    # save: a plain state_dict (written beside the file, then renamed into place) and a sparse safetensors file
    model_path, sparse_path = out / "lenet_pruned.pt", out / "lenet_pruned.safetensors"
    save_torch(module.model.state_dict(), model_path)
    save_sparse(module.model, sparse_path)
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
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    dense, sparse = summary["file_bytes_dense"], summary["file_bytes_sparse"]
    print(
        f"LeNet on MNIST: {args.epochs} epochs, {args.scope} {args.method}, {callback.schedule!r}\n{report}\n"
        f"test accuracy: {summary['test_acc']:.2%} on {summary['images']['test']:,} images "
        f"(fit {fit_seconds:.0f} s, total {seconds:.0f} s)\n"
        f"files: {model_path} {dense:,} bytes; {sparse_path} {sparse:,} bytes "
        f"({sparse / dense:.2f}x, lightning_prune.load_sparse reads it)\n"
        f"saved: {out / 'summary.json'}, {out / 'metrics.csv'}"
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: returns 0, or exits with status 2 and a message (no traceback) on bad arguments
    or missing data."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    try:  # every argument checked before any data is read
        build_callback(args)
        LitLeNet(lr=args.lr, optimizer=args.optimizer)
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
