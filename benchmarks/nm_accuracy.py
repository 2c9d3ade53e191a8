"""2:4 sparsity on LeNet's Linear layers: test accuracy against the dense model, on MNIST.

Every run trains the LeNet of ``examples/mnist.py`` (the example's budget: Adam, lr 2e-3, batch 128, 5 epochs) from
the same seed-determined initialization, on the same batches; only the pruning differs:

* ``dense``: no pruning, the baseline;
* ``nm-2:4``: :class:`~lightning_prune.NMPruning` ``(n=2, m=4)`` on ``fc1``, ``fc2`` and ``fc3`` (inputs 400, 120
  and 84, all multiples of 4; the convolutions have 1 and 6 input channels and stay dense), applied once at the
  start of epoch ``--prune-epoch`` (after the dense epoch 0), then fine-tuned for the rest of the same budget;
* ``l1-0.5``: a control at the same sparsity without the pattern: unstructured L1 pruning of each of the same
  three weights to 50% at the same step.

Sparsity and the 2:4 check are measured on the final weights (:func:`lightning_prune.sparsity_report` with
``nm=(2, 4)``), not assumed.

Usage (from the repository root)::

    python benchmarks/nm_accuracy.py --data-dir ../shared/data
    python benchmarks/nm_accuracy.py --data-dir DIR --smoke       # every row, 1 seed, 512 images, 2 epochs

Writes ``<out-dir>/<name>.csv`` (one row per run, appended as runs finish; ``--resume`` skips runs already
there) and ``<name>.md`` (the mean ± std table with the command and the machine, also printed). ``--smoke``
(alias ``--quick``) writes into ``--out-dir`` or, when none is given, a new temporary folder (never
``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    OUT_DIR_HELP,
    fit_and_test,
    load_mnist,
    machine,
    quiet_lightning,
    resolve_out_dir,
    run_and_record,
)
from examples.mnist import MNISTDataModule  # noqa: E402
from lightning_prune import NMPruning, OneShot, PruningScheduleCallback, sparsity_report  # noqa: E402

LINEAR = ["model.fc1.weight", "model.fc2.weight", "model.fc3.weight"]
METHODS = ("dense", "nm-2:4", "l1-0.5")
TYPES = {
    "method": str,
    "seed": int,
    "test_acc": float,
    "sparsity": float,
    "nm_satisfied": lambda value: value == "True",
    "linear_nonzero": int,
    "linear_total": int,
    "fit_seconds": float,
}
FIELDS = tuple(TYPES)


def make_callback(method: str, prune_epoch: int) -> PruningScheduleCallback | None:
    """The pruning callback of one run (``None`` for the dense baseline)."""
    if method == "dense":
        return None
    common: dict[str, Any] = {
        "parameters": LINEAR,
        "schedule": OneShot(epoch=prune_epoch),
        "verbose": False,
        "log_per_tensor": False,
    }
    if method == "nm-2:4":
        return PruningScheduleCallback(method=NMPruning(2, 4), **common)
    return PruningScheduleCallback(0.5, **common)


def run_one(method: str, seed: int, args: argparse.Namespace, data: MNISTDataModule) -> dict[str, Any]:
    callback = make_callback(method, args.prune_epoch)
    module, _, fit_seconds, test = fit_and_test(seed, args, data, [callback] if callback is not None else [])
    report = sparsity_report(module, LINEAR, nm=(2, 4))
    return {
        "method": method,
        "seed": seed,
        "test_acc": round(float(test["test_acc"]), 6),
        "sparsity": round(report.sparsity, 6),
        "nm_satisfied": all(t.nm for t in report.tensors),
        "linear_nonzero": report.numel - report.zeros,
        "linear_total": report.numel,
        "fit_seconds": round(fit_seconds, 2),
    }


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV this script wrote, with their types (empty when there is no file)."""
    if not path.exists():
        return []
    with path.open() as f:
        return [{key: TYPES[key](value) for key, value in row.items()} for row in csv.DictReader(f)]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one line per method, test accuracy as mean ± std over seeds (in points)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["method"]].append(row)
    mean = {m: statistics.fmean(100 * r["test_acc"] for r in g) for m, g in groups.items()}
    lines = [
        "| method | Linear sparsity | 2:4 on fc1-fc3 | Linear weights nonzero | test acc. % (mean ± std) "
        "| vs dense (points) | seeds | fit s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for method in [m for m in METHODS if m in groups]:
        g = groups[method]
        acc = [100 * r["test_acc"] for r in g]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        delta = f"{mean[method] - mean['dense']:+.2f}" if "dense" in mean else "n/a"
        nm = "yes" if all(r["nm_satisfied"] for r in g) else "no"
        lines.append(
            f"| {method} | {statistics.fmean(r['sparsity'] for r in g):.4f} | {nm} "
            f"| {g[0]['linear_nonzero']:,} / {g[0]['linear_total']:,} | {mean[method]:.2f} ± {std:.2f} | {delta} "
            f"| {len(g)} | {statistics.fmean(r['fit_seconds'] for r in g):.0f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", required=True, help="folder holding MNIST/raw/ (torchvision layout)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--epochs", type=int, default=5, help="epochs per run, the same for every run")
    p.add_argument("--prune-epoch", type=int, default=1, help="the one-shot step comes before this epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy small machine)")
    p.add_argument("--smoke", "--quick", action="store_true", help="every row on 512 training images, 1 seed, 2 epochs")
    p.add_argument("--out-dir", default=None, help=OUT_DIR_HELP)
    p.add_argument("--name", default="nm_accuracy", help="file name stem of the CSV and the table")
    p.add_argument("--resume", action="store_true", help="keep the rows of an existing CSV and skip those runs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.seeds, args.methods, args.epochs = args.seeds[:1], list(METHODS), 2
    resolve_out_dir(args, args.name)
    if not 0 <= args.prune_epoch < args.epochs:
        raise SystemExit(f"need 0 <= --prune-epoch < --epochs, got {args.prune_epoch} and {args.epochs}")
    quiet_lightning(args.threads)
    data = load_mnist(args)  # at most 512 training images with --smoke
    if data is None:
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{args.name}.csv"
    rows = read_rows(csv_path) if args.resume else []
    done = {(r["method"], r["seed"]) for r in rows}
    runs = [(method, seed) for seed in args.seeds for method in args.methods]  # seed by seed

    def describe(key: tuple[str, int], row: dict[str, Any]) -> str:
        return (
            f"{key[0]:<7} seed={key[1]} sparsity={row['sparsity']:.4f} 2:4={row['nm_satisfied']} "
            f"test_acc={100 * row['test_acc']:.2f}% fit={row['fit_seconds']:.0f}s"
        )

    def run(method: str, seed: int) -> dict[str, Any]:
        return run_one(method, seed, args, data)

    wall = run_and_record(csv_path, FIELDS, runs, done, rows, run, describe)
    sizes = data.split_sizes()
    setup = (
        f"LeNet/MNIST ({sizes['train']:,} training, {sizes['test']:,} test images), {args.epochs} epochs, batch "
        f"{args.batch_size}, {args.optimizer} lr={args.lr}, pruned once before epoch {args.prune_epoch}, "
        f"seeds {sorted({r['seed'] for r in rows})}"
    )
    command = "python benchmarks/nm_accuracy.py " + shlex.join(argv)
    table = format_table(rows)
    footer = f"Command: `{command}`\n\nMachine: {machine()}\n\nWall time of this invocation: {wall:.0f} s"
    (out / f"{args.name}.md").write_text(f"{setup}\n\n{table}\n\n{footer}\n")
    print(f"\n{setup}\n\n{table}\n\n{footer}\nwrote {csv_path}, {out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
