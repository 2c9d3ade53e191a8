"""Pieces shared by the benchmark scripts: quiet Lightning set-up, MNIST loading, one LeNet fit and test, and
a one-line description of the machine.

Lightning and the example are imported inside the functions that need them, so that the micro-benchmarks
(``prune_step.py``, ``train_overhead.py``) that only use :func:`machine` do not load them.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from examples.lenet_mnist import LitLeNet, MNISTDataModule


def quiet_lightning(threads: int) -> None:
    """Use ``threads`` torch CPU threads, hide the data-loader-workers and ``LeafSpec`` warnings and show only
    warnings and errors of the Lightning loggers."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def load_mnist(args: argparse.Namespace) -> MNISTDataModule | None:
    """MNIST from ``args.data_dir`` (never downloaded) in batches of ``args.batch_size``, set up for fitting;
    ``None`` after printing an error to stderr when the files are not there."""
    from examples.lenet_mnist import MNISTDataModule, MNISTNotFoundError

    data = MNISTDataModule(data_dir=args.data_dir, batch_size=args.batch_size, download=False)
    try:
        data.setup("fit")
    except MNISTNotFoundError as missing:
        print(f"error: {missing}", file=sys.stderr)
        return None
    return data


def prepare(args: argparse.Namespace) -> tuple[MNISTDataModule, Path] | None:
    """The start of a training benchmark: :func:`quiet_lightning` with ``args.threads``, :func:`load_mnist`,
    then create ``args.out_dir``. Returns the data and the output folder, or ``None`` (nothing created) when
    MNIST is missing."""
    quiet_lightning(args.threads)
    data = load_mnist(args)
    if data is None:
        return None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return data, out


class Fitted(NamedTuple):
    """What :func:`fit_and_test` returns."""

    module: LitLeNet
    trainer: pl.Trainer
    fit_seconds: float
    test: dict[str, Any]


def fit_and_test(
    seed: int,
    args: argparse.Namespace,
    data: MNISTDataModule,
    callbacks: Sequence[Any] | Callable[[LitLeNet], Sequence[Any]] = (),
) -> Fitted:
    """Train a fresh LeNet from ``seed`` for ``args.epochs`` epochs (optimizer ``args.optimizer``, learning rate
    ``args.lr``, ``args.lr_schedule`` where the script has that option, else constant) on CPU, deterministic, with
    no validation, logger or checkpoints, then test it.

    ``callbacks`` is a list, or a function of the new module that returns one (for callbacks that need the
    module's parameters); it is called after the module is built. Returns the module, the trainer (to test
    again), the fit wall time in seconds and the test metrics."""
    import pytorch_lightning as pl

    from examples.lenet_mnist import LitLeNet

    pl.seed_everything(seed, verbose=False)
    data.seed = seed
    module = LitLeNet(lr=args.lr, optimizer=args.optimizer, lr_schedule=getattr(args, "lr_schedule", "constant"))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=list(callbacks(module) if callable(callbacks) else callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start
    (test,) = trainer.test(module, datamodule=data, verbose=False)
    return Fitted(module, trainer, fit_seconds, test)


def machine(cpu: str | None = None) -> str:
    """The CPU model (from ``/proc/cpuinfo``; else ``cpu``, by default ``platform.machine()``), CPU count, torch
    version and threads, and Python version, on one line."""
    cpu = platform.machine() if cpu is None else cpu
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def run_and_record(
    csv_path: Path,
    fields: Sequence[str],
    runs: Sequence[tuple],
    done: set,
    rows: list[dict[str, Any]],
    run: Callable[..., dict[str, Any]],
    describe: Callable[[tuple, dict[str, Any]], str],
) -> float:
    """Run each of ``runs`` not in ``done`` (``run(*key)``), appending its row to ``csv_path`` as soon as it
    is done, so an interrupted benchmark keeps what it finished; also appends it to ``rows``. The header is
    written only when ``rows`` (the rows already in the file) is empty. Prints one progress line per run
    (``describe(key, row)``) and returns the wall time in seconds."""
    start = time.perf_counter()
    with csv_path.open("a" if rows else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if not rows:
            writer.writeheader()
        for i, key in enumerate(runs):
            if key in done:
                continue
            row = run(*key)
            writer.writerow(row)
            f.flush()
            rows.append(row)
            print(f"[{i + 1}/{len(runs)} {time.perf_counter() - start:6.0f}s] {describe(key, row)}", flush=True)
    return time.perf_counter() - start
