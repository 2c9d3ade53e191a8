"""Do sensitivity-suggested per-layer sparsities beat uniform local and global pruning? LeNet on MNIST.

For each seed:

1. train a dense LeNet for the accuracy benchmark's budget (its ``dense`` run; test accuracy recorded);
2. run :func:`~lightning_prune.sensitivity_analysis` on it over the 5,000 validation images (never the test
   set), one tensor at a time, L1, at 13 sparsities from 0.1 to 0.995; write the tables, the plot
   (accuracy curves) and, from the loss curves, :func:`~lightning_prune.suggest_sparsity`'s per-layer
   targets for each overall target;
3. for each overall target, train three LeNets from the same seed with the same budget and the same
   gradual schedule (``Polynomial`` cubic ramp, as ``benchmarks/accuracy_vs_sparsity.py``), differing only
   in what the sparsity is: ``global`` (one L1 threshold across the five weight tensors), ``uniform``
   (local: every tensor to the target) and ``sensitivity`` (local: the suggested per-layer targets,
   which reach the same overall sparsity, measured).

The budget (epochs, ramp, step interval, optimizer, learning rate, batch size) defaults to that of
``benchmarks/accuracy_vs_sparsity.py`` (read from its parser). Usage (from the repository root)::

    python benchmarks/sensitivity.py --data-dir /path/to/data --seeds 0 --targets 0.9 0.95 0.98
    python benchmarks/sensitivity.py --data-dir DIR --smoke     # every step and kind on a tiny budget (seconds)

Writes ``<out-dir>/sensitivity.csv`` (one row per run), ``sensitivity.md`` (the mean table), and per seed
``sensitivity_seed<k>/`` (the analysis tables, ``sensitivity.png``, the suggestions). ``--smoke`` runs the
analysis and every kind at one target (0.5) for one seed, 2 epochs on at most 512 training images, into
``--out-dir`` or a new temporary folder (never ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.accuracy_vs_sparsity import build_parser as budget_parser  # noqa: E402
from benchmarks.common import (  # noqa: E402
    OUT_DIR_HELP,
    fit_and_test,
    prepare,
    resolve_out_dir,
    smoke_training,
    write_results,
)
from examples.lenet_sensitivity import analyze_lenet  # noqa: E402
from examples.mnist import LitLeNet, MNISTDataModule  # noqa: E402
from lightning_prune import (  # noqa: E402
    PruningScheduleCallback,
    sparsity_report,  # noqa: E402
    suggest_sparsity,
)
from lightning_prune.schedules import Polynomial  # noqa: E402

KINDS = ("global", "uniform", "sensitivity")
FIELDS = ("kind", "target", "sparsity", "seed", "test_acc", "fit_seconds", "epochs", "ramp", "per_layer")


def make_callback(kind: str, target: float, suggested: dict[str, float], args: argparse.Namespace) -> Any:
    schedule = Polynomial(
        start_epoch=args.ramp_start, end_epoch=args.ramp_end, every_n_steps=args.every_n_steps or None, power=3
    )
    common = {"schedule": schedule, "verbose": False, "log_per_tensor": False}
    if kind == "global":
        return PruningScheduleCallback(target, scope="global", **common)
    if kind == "uniform":
        return PruningScheduleCallback(target, scope="local", **common)
    return PruningScheduleCallback(suggested, scope="local", **common)


def train(seed: int, args: argparse.Namespace, data: MNISTDataModule, callback: Any) -> tuple[LitLeNet, dict]:
    module, _, fit_seconds, test = fit_and_test(seed, args, data, [callback] if callback is not None else [])
    size = sparsity_report(module.model).to_dict()
    return module, {
        "seed": seed,
        "test_acc": round(float(test["test_acc"]), 6),
        "sparsity": round(size["sparsity"], 6),
        "fit_seconds": round(fit_seconds, 2),
        "epochs": args.epochs,
        "ramp": f"{args.ramp_start}->{args.ramp_end}/{args.every_n_steps}",
        "per_layer": json.dumps({k: round(v, 4) for k, v in size["sparsity_per_tensor"].items()}),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["kind"], float(row["target"]))].append(row)
    lines = [
        "| target | kind | measured sparsity | test accuracy (mean ± std) | seeds |",
        "|---|---|---|---|---|",
    ]
    order = {k: i for i, k in enumerate(("dense", *KINDS))}
    for (kind, target), group in sorted(groups.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])):
        accs = [100 * float(r["test_acc"]) for r in group]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        sparsity = statistics.mean(float(r["sparsity"]) for r in group)
        lines.append(
            f"| {target:g} | {kind} | {sparsity:.4f} | {statistics.mean(accs):.2f} ± {std:.2f} | {len(group)} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    budget = budget_parser().parse_args(["--data-dir", "."])
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", required=True, help="folder holding MNIST/raw/ (torchvision layout)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--epochs", type=int, default=budget.epochs)
    p.add_argument("--ramp-start", type=int, default=budget.ramp_start)
    p.add_argument("--ramp-end", type=int, default=budget.ramp_end)
    p.add_argument("--every-n-steps", type=int, default=budget.every_n_steps)
    p.add_argument("--batch-size", type=int, default=budget.batch_size)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=budget.optimizer)
    p.add_argument("--lr", type=float, default=budget.lr)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=budget.lr_schedule)
    p.add_argument("--threads", type=int, default=budget.threads)
    p.add_argument("--out-dir", default=None, help=OUT_DIR_HELP)
    p.add_argument("--append", action="store_true", help="keep the rows already in sensitivity.csv (more seeds)")
    p.add_argument("--smoke", action="store_true", help="every kind on a tiny budget: 1 seed, target 0.5, 2 epochs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        smoke_training(args, targets=[0.5])
        args.kinds = list(KINDS)
    resolve_out_dir(args, "sensitivity")
    if any(not 0 < t < 1 for t in args.targets):
        raise SystemExit(f"--targets must be in (0, 1), got {args.targets}")
    prepared = prepare(args)
    if prepared is None:
        return 2
    data, out = prepared
    csv_path = out / "sensitivity.csv"
    rows: list[dict[str, Any]] = []
    if args.append and csv_path.exists():
        with csv_path.open() as f:
            rows = [{**r, "target": float(r["target"]), "seed": int(r["seed"])} for r in csv.DictReader(f)]
        budget = {(r.get("epochs"), r.get("ramp")) for r in rows}
        here = (str(args.epochs), f"{args.ramp_start}->{args.ramp_end}/{args.every_n_steps}")
        if budget - {here}:
            raise SystemExit(f"--append: {csv_path} holds runs with another budget {sorted(budget)}, not {here}")
    start = time.perf_counter()
    with csv_path.open("a" if rows else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if not rows:
            writer.writeheader()

        def record(row: dict[str, Any]) -> None:
            writer.writerow(row)
            f.flush()
            rows.append(row)
            print(
                f"[{time.perf_counter() - start:6.0f}s] {row['kind']:<12} target={row['target']:<5g} "
                f"seed={row['seed']} sparsity={row['sparsity']:.4f} test_acc={100 * row['test_acc']:.2f}% "
                f"per-layer={row['per_layer']}",
                flush=True,
            )

        for seed in args.seeds:
            dense, row = train(seed, args, data, None)
            record({"kind": "dense", "target": 0.0, **row})
            t0 = time.perf_counter()
            analysis = analyze_lenet(dense, data.val_dataloader(), args.targets[0], out / f"sensitivity_seed{seed}")
            suggestions = {t: suggest_sparsity(analysis["loss"], t) for t in args.targets}
            (out / f"sensitivity_seed{seed}" / "sensitivity_suggested.json").write_text(
                json.dumps({str(t): s for t, s in suggestions.items()}, indent=2) + "\n"
            )
            print(f"analysis: {time.perf_counter() - t0:.0f}s\n{analysis['accuracy']}\n{analysis['loss']}", flush=True)
            for target in args.targets:
                print(f"suggested for {target}: {suggestions[target]}", flush=True)
                for kind in args.kinds:
                    _, row = train(seed, args, data, make_callback(kind, target, suggestions[target], args))
                    record({"kind": kind, "target": target, **row})
    wall = time.perf_counter() - start
    setup = (
        f"LeNet/MNIST, {args.epochs} epochs, batch {args.batch_size}, {args.optimizer} lr={args.lr} "
        f"({args.lr_schedule}), cubic ramp epochs {args.ramp_start}->{args.ramp_end} every {args.every_n_steps} "
        f"steps, seeds {sorted({int(r['seed']) for r in rows})}"
    )
    table = format_table(rows)
    write_results(out / "sensitivity.md", f"{setup}\n\n{table}\n\nwall time of the last invocation: {wall:.0f} s\n")
    print(f"\n{setup}\n\n{table}\n\nwall time: {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
