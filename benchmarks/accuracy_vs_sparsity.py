"""Accuracy against sparsity: LeNet on MNIST, this callback against Lightning's ``ModelPruning``.

Every run trains the same LeNet (``examples/mnist.py``) from the same seed-determined
initialization, on the same batches, with the same optimizer, batch size and number of epochs; only the
pruning callback differs:

* ``callback``: :class:`~lightning_prune.PruningScheduleCallback`, global L1, the recommended gradual
  schedule (``Polynomial`` cubic ramp from ``--ramp-start`` to ``--ramp-end``, pruning every
  ``--every-n-steps`` optimizer steps), then fine-tuning at the final sparsity;
* ``modelpruning``: ``pytorch_lightning.callbacks.ModelPruning("l1_unstructured")`` with its defaults
  (global, ``use_lottery_ticket_hypothesis=True``), pruning at the end of each epoch of the same ramp with
  the per-step ``amount`` ``a`` for which ``1 - (1 - a)^n`` is the target (``n`` pruning epochs);
* ``modelpruning-nolth``: the same with ``use_lottery_ticket_hypothesis=False``;
* ``dense``: no pruning (target 0), the baseline.

All prune the same five weight tensors (conv1, conv2, fc1, fc2, fc3; biases are not pruned) and reach the
target at the start of epoch ``--ramp-end``. Sparsity is measured (zeros in the final weights), not assumed.

Usage (from the repository root)::

    python benchmarks/accuracy_vs_sparsity.py --data-dir /path/to/data
    python benchmarks/accuracy_vs_sparsity.py --data-dir DIR --seeds 0 --targets 0 0.95 --methods callback
    python benchmarks/accuracy_vs_sparsity.py --data-dir DIR --smoke   # every row on a tiny budget (seconds)

Writes ``<out-dir>/<name>.csv`` (one row per run, appended as runs finish; ``--resume`` skips runs
already there), ``<name>.png`` and ``<name>.md`` (the mean ± std table, also printed). ``--smoke`` runs
every method, dense and one target (0.5) for one seed, 2 epochs on at most 512 training images, into
``--out-dir`` or a new temporary folder (never ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from pytorch_lightning.callbacks import ModelPruning  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import Columns, aggregate, fit_and_test, prepare, training_parser, write_results  # noqa: E402
from examples.mnist import LitLeNet, MNISTDataModule  # noqa: E402
from lightning_prune import PruningScheduleCallback, sparsity_report  # noqa: E402
from lightning_prune.schedules import Polynomial  # noqa: E402

METHODS = ("callback", "modelpruning", "modelpruning-nolth")
FIELDS = (
    "method",
    "target",
    "sparsity",
    "seed",
    "test_acc",
    "fit_seconds",
    "epochs",
    "compression_ratio",
    "theoretical_speedup",
    "params_nonzero",
    "macs_nonzero",
)
COLUMNS = Columns(
    FIELDS,
    floats=("target", "sparsity", "test_acc", "fit_seconds", "compression_ratio", "theoretical_speedup"),
    ints=("seed", "epochs", "params_nonzero", "macs_nonzero"),
)
MEANS = {  # figure of the table -> its column, averaged over seeds
    "sparsity": "sparsity",
    "compression": "compression_ratio",
    "speedup": "theoretical_speedup",
    "seconds": "fit_seconds",
}
EXAMPLE = torch.zeros(1, 1, 28, 28)


def per_step_amount(target: float, steps: int) -> float:
    """The fraction ``a`` of the remaining weights to prune at each of ``steps`` steps so that the
    compounded sparsity ``1 - (1 - a)^steps`` equals ``target``.

    >>> round(per_step_amount(0.75, 2), 6)
    0.5
    """
    return 1.0 - (1.0 - target) ** (1.0 / steps)


def make_pruning_callback(method: str, target: float, args: argparse.Namespace, module: LitLeNet) -> Any:
    """The pruning callback of one run (``None`` for the dense baseline)."""
    if method == "dense" or target == 0:
        return None
    if method == "callback":
        schedule = Polynomial(
            start_epoch=args.ramp_start, end_epoch=args.ramp_end, every_n_steps=args.every_n_steps or None, power=3
        )
        return PruningScheduleCallback(target, scope="global", schedule=schedule, verbose=False, log_per_tensor=False)
    steps = args.ramp_end - args.ramp_start
    amount = per_step_amount(target, steps)
    net = module.model
    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=[(getattr(net, n), "weight") for n in ("conv1", "conv2", "fc1", "fc2", "fc3")],
        use_global_unstructured=True,
        # ModelPruning prunes at the end of epoch e: epochs ramp_start .. ramp_end-1 match our schedule,
        # which reaches the target at the start of epoch ramp_end.
        amount=lambda epoch: amount if args.ramp_start <= epoch < args.ramp_end else 0.0,
        use_lottery_ticket_hypothesis=method == "modelpruning",
        verbose=0,
    )


def run_one(method: str, target: float, seed: int, args: argparse.Namespace, data: MNISTDataModule) -> dict[str, Any]:
    def callbacks(module: LitLeNet) -> list[Any]:
        pruning = make_pruning_callback(method, target, args, module)
        return [pruning] if pruning is not None else []

    module, _, fit_seconds, test = fit_and_test(seed, args, data, callbacks)
    size = sparsity_report(module.model, example_inputs=EXAMPLE).to_dict()  # with the size figures
    return {
        "method": method,
        "target": target,
        "sparsity": round(size["sparsity"], 6),
        "seed": seed,
        "test_acc": round(float(test["test_acc"]), 6),
        "fit_seconds": round(fit_seconds, 2),
        "epochs": args.epochs,
        "compression_ratio": round(size["compression_ratio"], 4),
        "theoretical_speedup": round(size["theoretical_speedup"], 4),
        "params_nonzero": size["params_nonzero"],
        "macs_nonzero": size["macs_nonzero"],
    }


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV this script wrote, with their types (empty when there is no file)."""
    return common.read_rows(path, COLUMNS)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one line per (method, target), accuracy as mean ± std over seeds (in points)."""
    lines = [
        "| method | target | measured sparsity | test acc. % (mean ± std) | vs dense (points) | seeds "
        "| compression | theor. speed-up | fit s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += common.accuracy_lines(
        aggregate(rows, MEANS),
        ("dense", *METHODS),
        lambda v: f"{v['compression']:.1f}x | {v['speedup']:.2f}x | {v['seconds']:.0f}",
    )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy against target sparsity (x: compression of the weights, log scale), one curve per
    method: mean ± std error bars and a min-max band over seeds; dense mean as a dashed line. Left: all
    points; right: zoomed on the top 3 points below dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = aggregate(rows, MEANS)
    dense = next((v for (m, _), v in stats.items() if m == "dense"), None)
    styles = {"callback": ("C0", "o"), "modelpruning": ("C3", "s"), "modelpruning-nolth": ("C1", "^")}
    labels = {
        "callback": "PruningScheduleCallback (global L1, polynomial)",
        "modelpruning": "ModelPruning (defaults: lottery-ticket reset)",
        "modelpruning-nolth": "ModelPruning (use_lottery_ticket_hypothesis=False)",
    }
    ticks = sorted({t for (_, t) in stats if t > 0})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax in axes:
        if dense is not None:
            mean, std = dense["acc"]
            ax.axhline(mean, color="black", lw=1, ls="--", label=f"dense {mean:.2f}%")
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
        for method in METHODS:
            targets = sorted(t for (m, t) in stats if m == method and t > 0)
            if not targets:
                continue
            x = [1.0 / (1.0 - t) for t in targets]
            acc = [[100 * r["test_acc"] for r in rows if r["method"] == method and r["target"] == t] for t in targets]
            color, marker = styles[method]
            ax.errorbar(
                x,
                [stats[(method, t)]["acc"][0] for t in targets],
                yerr=[stats[(method, t)]["acc"][1] for t in targets],
                color=color,
                marker=marker,
                capsize=3,
                label=labels[method],
            )
            ax.fill_between(x, [min(a) for a in acc], [max(a) for a in acc], color=color, alpha=0.12)
        ax.set_xscale("log")
        ax.set_xticks([1 / (1 - t) for t in ticks])
        ax.set_xticklabels([f"{t:.0%}\n({1 / (1 - t):.0f}x)" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("target sparsity of the weights (compression of the weights)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy, % (mean ± std; band: min-max over seeds)")
    axes[0].set_title("all runs", fontsize=10)
    axes[0].legend(fontsize=8, loc="lower left")
    if dense is not None:
        axes[1].set_ylim(dense["acc"][0] - 3.0, dense["acc"][0] + 0.4)
    axes[1].set_title("zoom: within 3 points of dense", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = training_parser(__doc__, name="accuracy_vs_sparsity", targets=[0.0, 0.5, 0.75, 0.9, 0.95, 0.98], ramp_end=4)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="dense runs at target 0")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="CSV",
        help="train nothing: combine these CSVs (e.g. one per seed, run in parallel) into <name>.csv/.png/.md",
    )
    p.add_argument("--smoke", action="store_true", help="every method on a tiny budget: 1 seed, target 0.5, 2 epochs")
    return p


def describe(args: argparse.Namespace) -> str:
    return (
        f"LeNet/MNIST, {args.epochs} epochs, batch {args.batch_size}, {args.optimizer} lr={args.lr} "
        f"({args.lr_schedule}), ramp epochs {args.ramp_start}->{args.ramp_end}, seeds {args.seeds}"
    )


def write_outputs(rows: Sequence[dict[str, Any]], out: Path, name: str, setup: str, note: str) -> str:
    table = format_table(rows)
    write_results(out / f"{name}.md", f"{setup}\n\n{table}\n\n{note}\n")
    plot(rows, out / f"{name}.png", setup)
    return table


def merge(args: argparse.Namespace) -> int:
    rows = [row for path in args.merge for row in read_rows(Path(path))]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{args.name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    args.seeds = sorted({r["seed"] for r in rows})
    setup = describe(args)
    table = write_outputs(rows, out, args.name, setup, f"merged from {len(args.merge)} CSV file(s), {len(rows)} runs")
    print(f"{setup}\n\n{table}\n\nwrote {out / args.name}.csv/.png/.md")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        common.smoke_training(args, targets=[0.0, 0.5])
        args.methods = list(METHODS)
    common.resolve_out_dir(args, args.name)
    common.check_budget(args)
    if args.merge:
        return merge(args)
    prepared = prepare(args)
    if prepared is None:
        return 2
    data, out = prepared
    csv_path = out / f"{args.name}.csv"
    runs = []  # seed by seed, so that an interrupted run leaves complete curves for the seeds done
    for seed in args.seeds:
        runs += [("dense", 0.0, seed)] if 0.0 in args.targets else []
        runs += [(m, t, seed) for t in args.targets if t > 0 for m in args.methods]
    rows, wall = common.run_resumable(
        csv_path,
        COLUMNS,
        runs,
        lambda method, target, seed: run_one(method, target, seed, args, data),
        lambda key, row: (
            f"{key[0]:<19} target={key[1]:<5g} seed={key[2]} sparsity={row['sparsity']:.4f} "
            f"test_acc={100 * row['test_acc']:.2f}% fit={row['fit_seconds']:.0f}s"
        ),
        resume=args.resume,
    )
    setup = describe(args)
    table = write_outputs(rows, out, args.name, setup, f"wall time of this invocation: {wall:.0f} s")
    print(f"\n{setup}\n\n{table}\n\nwall time: {wall:.0f} s; wrote {csv_path}, {out / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
