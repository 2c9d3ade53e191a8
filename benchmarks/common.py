"""Pieces shared by the benchmark scripts: quiet Lightning set-up, MNIST loading, one LeNet fit and test, a
one-line description of the machine, the resumable CSV of runs and its mean ± std table figures, and the
``--smoke`` mode's output folder.

Lightning and the example are imported inside the functions that need them, so that the micro-benchmarks
(``prune_step.py``, ``train_overhead.py``) that only use :func:`machine` do not load them.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT_DIR_HELP = "folder of the results files (none given: benchmarks/results/; with --smoke: a new temporary folder)"

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from examples.mnist import LitLeNet, MNISTDataModule


def training_parser(doc: str, *, name: str, targets: Sequence[float], ramp_end: int) -> argparse.ArgumentParser:
    """The options every training benchmark shares: the data, the training budget that :func:`prepare` and
    :func:`fit_and_test` read, the pruning ramp, and the resumable CSV of :func:`run_and_record`. Each script
    adds its own options to the parser returned."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", required=True, help="folder holding MNIST/raw/ (torchvision layout)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run (the same for every run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", type=float, nargs="+", default=list(targets), help="0: dense baseline")
    p.add_argument("--ramp-start", type=int, default=1, help="first epoch of the pruning ramp")
    p.add_argument("--ramp-end", type=int, default=ramp_end, help="epoch at whose start the target is reached")
    p.add_argument("--every-n-steps", type=int, default=50, help="prune every N steps in the ramp (0: per epoch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy small machine)")
    p.add_argument("--out-dir", default=None, help=OUT_DIR_HELP)
    p.add_argument("--name", default=name, help="file name stem of the CSV and the table")
    p.add_argument("--resume", action="store_true", help="keep the rows of an existing CSV and skip those runs")
    return p


def resolve_out_dir(args: argparse.Namespace, name: str) -> None:
    """Set ``args.out_dir`` where no ``--out-dir`` was given (``None``): ``benchmarks/results/``, or with
    ``--smoke`` a new temporary folder, so that a smoke run never writes over the committed results."""
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix=f"{name}-smoke-") if args.smoke else str(RESULTS)


def smoke_training(args: argparse.Namespace, targets: Sequence[float]) -> None:
    """The tiny budget of a LeNet benchmark's ``--smoke`` run: the first seed, ``targets``, 2 epochs of batches
    of 16, the ramp from epoch 0 to 1 with a step every optimizer step (:func:`load_mnist` reads at most 512
    training and 256 test images)."""
    args.seeds, args.targets, args.epochs, args.batch_size = args.seeds[:1], list(targets), 2, 16
    args.ramp_start, args.ramp_end, args.every_n_steps = 0, 1, 1


def check_budget(args: argparse.Namespace) -> None:
    """Exit with a message unless ``0 <= --ramp-start < --ramp-end <= --epochs`` and every target is in [0, 1)."""
    if not 0 <= args.ramp_start < args.ramp_end <= args.epochs:
        raise SystemExit(f"need 0 <= --ramp-start < --ramp-end <= --epochs, got {args.ramp_start}, {args.ramp_end}")
    if any(not 0 <= t < 1 for t in args.targets):
        raise SystemExit(f"--targets must be in [0, 1), got {args.targets}")


def quiet_lightning(threads: int) -> None:
    """Use ``threads`` torch CPU threads, hide the data-loader-workers and ``LeafSpec`` warnings and show only
    warnings and errors of the Lightning loggers."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def load_mnist(args: argparse.Namespace) -> MNISTDataModule | None:
    """MNIST from ``args.data_dir`` (never downloaded) in batches of ``args.batch_size``, set up for fitting, in
    the data module's ``quick`` mode (at most 512 training images) when ``args.smoke``; ``None`` after printing an
    error to stderr when the files are not there."""
    from examples.mnist import MNISTDataModule, MNISTNotFoundError

    quick = bool(getattr(args, "smoke", False))
    data = MNISTDataModule(data_dir=args.data_dir, batch_size=args.batch_size, quick=quick, download=False)
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

    from examples.mnist import LitLeNet

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


class Columns(NamedTuple):
    """The columns of a benchmark's CSV: their names in order, those that hold floats and integers (the others
    hold strings), and those that name a run (the key of :func:`run_resumable`)."""

    names: tuple[str, ...]
    floats: tuple[str, ...] = ()
    ints: tuple[str, ...] = ()
    key: tuple[str, ...] = ("method", "target", "seed")


def read_rows(path: Path, columns: Columns) -> list[dict[str, Any]]:
    """The rows of a CSV a benchmark wrote, with the floats and integers of ``columns`` converted; ``[]`` when
    there is no file."""
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.update({key: float(row[key]) for key in columns.floats})
        row.update({key: int(row[key]) for key in columns.ints})
    return rows


def run_resumable(
    csv_path: Path,
    columns: Columns,
    runs: Sequence[tuple],
    run: Callable[..., dict[str, Any]],
    describe: Callable[[tuple, dict[str, Any]], str],
    *,
    resume: bool,
) -> tuple[list[dict[str, Any]], float]:
    """:func:`run_and_record` into ``csv_path``; with ``resume``, after the rows already there (read with
    :func:`read_rows`), skipping the runs whose key (``columns.key``) they hold. Returns all the rows and the
    wall time in seconds."""
    rows = read_rows(csv_path, columns) if resume else []
    done = {tuple(row[key] for key in columns.key) for row in rows}
    return rows, run_and_record(csv_path, columns.names, runs, done, rows, run, describe)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: Sequence[dict[str, Any]], means: Mapping[str, str]) -> dict[tuple[str, float], dict[str, Any]]:
    """The rows grouped by ``(method, target)``, in sorted order: for each group, its size ``n``, ``acc`` (the
    mean and standard deviation of ``test_acc`` in percent) and the mean of each column of ``means`` (figure
    name -> column)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["target"])].append(row)
    return {
        key: {
            "n": len(group),
            "acc": mean_std([100 * r["test_acc"] for r in group]),
            **{name: statistics.fmean(r[column] for r in group) for name, column in means.items()},
        }
        for key, group in sorted(groups.items())
    }


def accuracy_lines(
    stats: Mapping[tuple[str, float], dict[str, Any]],
    order: Sequence[str],
    extra: Callable[[dict[str, Any]], str],
    labels: Mapping[str, str] | None = None,
) -> list[str]:
    """Markdown lines of :func:`aggregate`'s figures, one per ``(method, target)``, by target, then by method in
    ``order`` (others last): the method (its label in ``labels``), the target, the measured sparsity, the test
    accuracy as mean ± std, its gap to the dense mean in points, the seeds, then the cells ``extra(figures)``."""
    dense = stats.get(("dense", 0.0))
    rank = {method: i for i, method in enumerate(order)}
    lines = []
    for (method, target), v in sorted(stats.items(), key=lambda kv: (kv[0][1], rank.get(kv[0][0], len(order)))):
        mean, std = v["acc"]
        delta = f"{mean - dense['acc'][0]:+.2f}" if dense is not None else "n/a"
        name = (labels or {}).get(method, method)
        lines.append(
            f"| {name} | {target:g} | {v['sparsity']:.4f} | {mean:.2f} ± {std:.2f} | {delta} | {v['n']} | {extra(v)} |"
        )
    return lines


NOTES_HEADING = "## Procedure and notes"


def write_results(path: Path, text: str) -> None:
    """Write a benchmark's generated table to ``path``, keeping the hand-written section that starts at
    ``## Procedure and notes`` in the file already there."""
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_HEADING in old:
            notes = "\n" + old[old.index(NOTES_HEADING) :]
    path.write_text(text.rstrip("\n") + "\n" + notes)


def finish(out_dir: str, name: str, text: str, wall: float, load_before: float, load_after: float) -> None:
    """Print the wall time and the 1-minute load average before and after, and write ``<out_dir>/<name>.md``
    (:func:`write_results`) unless ``out_dir`` is empty."""
    print(f"\nwall time {wall:.0f}s; load average before {load_before:.2f}, after {load_after:.2f}")
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_results(out / f"{name}.md", text)
        print(f"wrote {out / (name + '.md')}")


def mark_peak() -> int:
    """Reset the kernel's high-water mark of this process's resident memory (``VmHWM``) and return its resident
    memory now (``VmRSS``, bytes): ``read_status()["VmHWM"]`` minus it after a piece of work is that work's peak."""
    before = read_status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return before


def read_status() -> dict[str, int]:
    """This process's resident memory now and at its peak (``VmRSS``, ``VmHWM``), in bytes, from ``/proc``."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out
