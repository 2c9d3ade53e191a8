"""Neuron/channel pruning on LeNet/MNIST: accuracy, size, MACs and CPU latency of the compact model.

Every run trains the LeNet of ``examples/mnist.py`` with the same budget as
``benchmarks/accuracy_vs_sparsity.py`` (5 epochs, batch 128, Adam 2e-3, a cubic ``Polynomial`` ramp from
epoch 1 to epoch 3 pruning every 50 optimizer steps, then fine-tuning). The pruning callback runs
:class:`~lightning_prune.NeuronPruning` (L2 importance of each neuron's row and its columns in the next
layer) to a target fraction of the prunable neurons and channels (conv1, conv2, fc1, fc2: 226; the output
layer fc3 is kept). After training the masked model is tested, compacted with
:func:`lightning_prune.compact` (neurons physically removed), checked against the masked outputs and
tested again. The dense baseline trains the same model without pruning.

Latency: dense and compact models are timed side by side in the same process (alternating, so that load
from other processes hits both alike), ``torch.no_grad()``, eval mode, ``--threads`` CPU threads, batch 1
and batch 256; each figure is the median of ``--repeats`` timed calls after warm-up. The table is followed
by two timings of the dense and 50% shapes at batch 256 (random weights, only the shapes matter): one per
operation of the forward pass, and one per CPU execution mode (eager, ``channels_last``, TorchScript
``trace`` + ``freeze``, and with ``--compile`` ``torch.compile``), with the ratio of speed-up to MAC
reduction. ``--table-only`` rebuilds the table from the CSV and re-times those two, without training.

Usage (from the repository root)::

    python benchmarks/structured.py --data-dir /path/to/data
    python benchmarks/structured.py --data-dir DIR --seeds 0 --targets 0.5 --epochs 2
    python benchmarks/structured.py --data-dir DIR --smoke      # every row and timing on a tiny budget (seconds)

Writes ``<out-dir>/<name>.csv`` (one row per run, appended as runs finish; ``--resume`` skips runs already
there) and ``<name>.md`` (the table, also printed). ``--smoke`` runs dense and both scopes at 0.5 for one seed,
2 epochs on at most 512 training images, with a few timed calls, into ``--out-dir`` or a new temporary folder
(never ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import Columns, fit_and_test, mean_std, prepare, training_parser, write_results  # noqa: E402
from examples.mnist import LeNet, MNISTDataModule  # noqa: E402
from lightning_prune import NeuronPruning, PruningScheduleCallback, compact  # noqa: E402
from lightning_prune.report import count_macs  # noqa: E402
from lightning_prune.schedules import Polynomial  # noqa: E402

EXAMPLE = torch.zeros(1, 1, 28, 28)
FIELDS = (
    "scope",
    "target",
    "seed",
    "neurons_kept",
    "widths",
    "test_acc_masked",
    "test_acc",
    "max_abs_diff",
    "params",
    "file_bytes",
    "macs",
    "ms_b1_dense",
    "ms_b1",
    "ms_b256_dense",
    "ms_b256",
    "fit_seconds",
    "epochs",
)
COLUMNS = Columns(
    FIELDS,
    floats=("target", "test_acc_masked", "test_acc", "ms_b1_dense", "ms_b1", "ms_b256_dense", "ms_b256", "fit_seconds"),
    ints=("seed", "neurons_kept", "params", "file_bytes", "macs", "epochs"),
    key=("scope", "target", "seed"),
)
LAYERS = ("conv1", "conv2", "fc1", "fc2")


def file_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def widths(model: nn.Module) -> list[int]:
    return [getattr(model, n).weight.shape[0] for n in LAYERS]


def latency_ms(models: Sequence[nn.Module], batch: int, repeats: int, x: torch.Tensor | None = None) -> list[float]:
    """Median milliseconds of one forward pass of each model, timed in alternating order on one input."""
    x = torch.randn(batch, 1, 28, 28) if x is None else x
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for m in models:
            if isinstance(m, nn.Module):
                m.eval()
            for _ in range(5):
                m(x)
        for r in range(repeats):
            order = list(enumerate(models)) if r % 2 == 0 else list(reversed(list(enumerate(models))))
            for i, m in order:  # alternate which model goes first
                start = time.perf_counter()
                m(x)
                times[i].append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def lenet_of(shape: str) -> LeNet:
    """The example's LeNet with the widths ``"conv1-conv2-fc1-fc2"`` (random weights; only shapes matter)."""
    c1, c2, f1, f2 = (int(v) for v in shape.split("-"))
    net = LeNet()
    net.conv1, net.conv2 = nn.Conv2d(1, c1, 3), nn.Conv2d(c1, c2, 3)
    net.fc1, net.fc2, net.fc3 = nn.Linear(c2 * 25, f1), nn.Linear(f1, f2), nn.Linear(f2, 10)
    return net.eval()


def execution_modes(shapes: Sequence[str], repeats: int, compile_too: bool, batch: int = 256) -> str:
    """Markdown: the dense shape (first) against each other shape at ``batch``, run the way PyTorch offers
    for CPU inference: eager (NCHW), eager ``channels_last``, TorchScript (``trace`` + ``freeze``) and, with
    ``compile_too``, ``torch.compile`` (inductor). Each mode times all shapes side by side (alternating)."""
    x = torch.randn(batch, 1, 28, 28)
    modes: dict[str, tuple[Any, torch.Tensor]] = {
        "eager": (lambda net: net, x),
        "eager, channels_last": (
            lambda net: net.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        ),
        "TorchScript trace + freeze": (lambda net: torch.jit.freeze(torch.jit.trace(net, x)), x),
    }
    if compile_too:
        modes["torch.compile (inductor)"] = (torch.compile, x)
    macs = [count_macs(lenet_of(shape), torch.zeros(1, 1, 28, 28))[0] for shape in shapes]
    header = (
        "| mode | "
        + " | ".join(f"ms, widths {s}" for s in shapes)
        + " | "
        + " | ".join(f"speed-up {s} (MAC reduction {macs[0] / m:.2f}x) / ratio" for s, m in zip(shapes[1:], macs[1:]))
    )
    lines = [header + " |", "|---|" + "---:|" * (2 * len(shapes) - 1)]
    for mode, (prepare_net, inputs) in modes.items():
        with torch.no_grad():
            nets = [prepare_net(lenet_of(shape)) for shape in shapes]
        ms = latency_ms(nets, batch, repeats, inputs)
        cells = [f"{m:.2f}" for m in ms] + [
            f"{ms[0] / m:.2f}x / {(ms[0] / m) / (macs[0] / mac):.2f}" for m, mac in zip(ms[1:], macs[1:])
        ]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_profile(shapes: Sequence[str], repeats: int, batch: int = 256) -> str:
    """Markdown: median ms of each operation of LeNet's forward pass at ``batch``, for each width string
    ``"conv1-conv2-fc1-fc2"`` (random weights; only the shapes matter), timed in alternating order."""
    import torch.nn.functional as F

    nets = [lenet_of(shape) for shape in shapes]
    ops = [
        ("conv1", lambda m, x: m.conv1(x)),
        ("relu1", lambda m, x: F.relu(x)),
        ("pool1", lambda m, x: F.max_pool2d(x, 2)),
        ("conv2", lambda m, x: m.conv2(x)),
        ("relu2", lambda m, x: F.relu(x)),
        ("pool2", lambda m, x: F.max_pool2d(x, 2)),
        ("fc1", lambda m, x: F.relu(m.fc1(torch.flatten(x, 1)))),
        ("fc2", lambda m, x: F.relu(m.fc2(x))),
        ("fc3", lambda m, x: m.fc3(x)),
    ]
    times = [[[] for _ in ops] for _ in nets]
    x0 = torch.randn(batch, 1, 28, 28)
    with torch.no_grad():
        for r in range(repeats + 3):
            order = list(enumerate(nets)) if r % 2 == 0 else list(reversed(list(enumerate(nets))))
            for i, m in order:
                x = x0
                for j, (_, op) in enumerate(ops):
                    start = time.perf_counter()
                    x = op(m, x)
                    if r >= 3:
                        times[i][j].append(time.perf_counter() - start)
    lines = [
        "| operation | " + " | ".join(f"ms, widths {s}" for s in shapes) + " |",
        "|---" + "|---:" * len(shapes) + "|",
    ]
    for j, (name, _) in enumerate(ops):
        lines.append(
            f"| {name} | " + " | ".join(f"{1000 * statistics.median(times[i][j]):.3f}" for i in range(len(nets))) + " |"
        )
    totals = [sum(1000 * statistics.median(t) for t in times[i]) for i in range(len(nets))]
    lines.append("| sum | " + " | ".join(f"{t:.3f}" for t in totals) + " |")
    return "\n".join(lines)


def run_one(scope: str, target: float, seed: int, args: argparse.Namespace, data: MNISTDataModule) -> dict[str, Any]:
    def make_callbacks(_: Any) -> list[Any]:  # built after the module, as before: same RNG state
        callbacks: list[Any] = []
        if target > 0:
            schedule = Polynomial(
                start_epoch=args.ramp_start, end_epoch=args.ramp_end, every_n_steps=args.every_n_steps or None, power=3
            )
            method = NeuronPruning(importance=args.importance, example_inputs=EXAMPLE)
            callbacks.append(
                PruningScheduleCallback(
                    target,
                    method=method,
                    scope=scope,
                    schedule=schedule,
                    make_permanent=False,  # keep the masks: the masked model is tested, then compacted below
                    verbose=False,
                    log_per_tensor=False,
                )
            )
        return callbacks

    module, trainer, fit_seconds, masked = fit_and_test(seed, args, data, make_callbacks)
    x = torch.randn(512, 1, 28, 28)
    module.eval()
    with torch.no_grad():
        before = module(x)
    compact(module.model, EXAMPLE)
    with torch.no_grad():
        diff = float((module(x) - before).abs().max())
    (final,) = trainer.test(module, datamodule=data, verbose=False)
    net = module.model
    dense = LeNet()
    b1 = latency_ms([dense, net], 1, args.repeats_b1)
    b256 = latency_ms([dense, net], 256, args.repeats_b256)
    return {
        "scope": scope if target > 0 else "dense",
        "target": target,
        "seed": seed,
        "neurons_kept": sum(widths(net)),
        "widths": "-".join(map(str, widths(net))),
        "test_acc_masked": round(float(masked["test_acc"]), 6),
        "test_acc": round(float(final["test_acc"]), 6),
        "max_abs_diff": f"{diff:.2e}",
        "params": sum(p.numel() for p in net.parameters()),
        "file_bytes": file_bytes(net),
        "macs": count_macs(net, torch.zeros(1, 1, 28, 28))[0],
        "ms_b1_dense": round(b1[0], 4),
        "ms_b1": round(b1[1], 4),
        "ms_b256_dense": round(b256[0], 3),
        "ms_b256": round(b256[1], 3),
        "fit_seconds": round(fit_seconds, 1),
        "epochs": args.epochs,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per (scope, target); accuracy mean ± std over seeds, sizes and latency medians."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["scope"], float(r["target"]))].append(r)
    dense = groups.get(("dense", 0.0))
    dense_acc = mean_std([100 * float(r["test_acc"]) for r in dense])[0] if dense else None
    dense_macs = int(dense[0]["macs"]) if dense else None
    lines = [
        "| model | neurons removed | widths conv1-conv2-fc1-fc2 | test acc. % (mean ± std) | vs dense (points) "
        "| params | file KiB | MACs | MAC reduction | ms b=1 dense / compact (speed-up) "
        "| ms b=256 dense / compact (speed-up) | speed-up / MAC reduction (b=256) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (scope, target), g in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mean, std = mean_std([100 * float(r["test_acc"]) for r in g])
        delta = f"{mean - dense_acc:+.2f}" if dense_acc is not None else "n/a"
        med = {
            k: statistics.median(float(r[k]) for r in g) for k in ("ms_b1_dense", "ms_b1", "ms_b256_dense", "ms_b256")
        }
        macs = statistics.median(int(r["macs"]) for r in g)
        reduction = dense_macs / macs if dense_macs else float("nan")
        # speed-up: the median over runs of each run's side-by-side ratio (the runs met different loads)
        s1 = statistics.median(float(r["ms_b1_dense"]) / float(r["ms_b1"]) for r in g)
        s256 = statistics.median(float(r["ms_b256_dense"]) / float(r["ms_b256"]) for r in g)
        shapes = sorted({r["widths"] for r in g})
        name = "dense" if scope == "dense" else f"neurons, {scope}"
        removed = f"{target:.0%} ({226 - int(g[0]['neurons_kept'])}/226)" if scope != "dense" else "0"
        lines.append(
            f"| {name} | {removed} | {', '.join(shapes)} | {mean:.2f} ± {std:.2f} (n={len(g)}) | {delta} "
            f"| {int(statistics.median(int(r['params']) for r in g)):,} "
            f"| {statistics.median(int(r['file_bytes']) for r in g) / 1024:.1f} | {int(macs):,} | {reduction:.2f}x "
            f"| {med['ms_b1_dense']:.3f} / {med['ms_b1']:.3f} ({s1:.2f}x) "
            f"| {med['ms_b256_dense']:.2f} / {med['ms_b256']:.2f} ({s256:.2f}x) | {s256 / reduction:.2f} |"
        )
    return "\n".join(lines)


def progress(key: tuple[str, float, int], row: dict[str, Any]) -> str:
    """The progress line of one run."""
    return (
        f"{key[0]:<6} target={key[1]:<4g} seed={key[2]} widths={row['widths']} acc={100 * row['test_acc']:.2f}% "
        f"(masked {100 * row['test_acc_masked']:.2f}%, max|diff|={row['max_abs_diff']}) "
        f"b256 {row['ms_b256_dense']:.2f}/{row['ms_b256']:.2f} ms fit={row['fit_seconds']:.0f}s"
    )


def build_parser() -> argparse.ArgumentParser:
    p = training_parser(__doc__, name="structured", targets=[0.0, 0.25, 0.5, 0.75], ramp_end=3)
    p.add_argument("--scopes", nargs="+", choices=("local", "global"), default=["local"])
    p.add_argument("--importance", choices=("l2", "l1", "random"), default="l2")
    p.add_argument("--repeats-b1", type=int, default=500, help="timed calls at batch 1 (median)")
    p.add_argument("--repeats-b256", type=int, default=100, help="timed calls at batch 256 (median)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from the existing CSV")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models (needs a C++ compiler)")
    p.add_argument("--smoke", action="store_true", help="every row on a tiny budget: 1 seed, target 0.5, 2 epochs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        common.smoke_training(args, targets=[0.0, 0.5])
        args.scopes, args.repeats_b1, args.repeats_b256 = ["local", "global"], 3, 2
    common.resolve_out_dir(args, args.name)
    common.check_budget(args)
    prepared = prepare(args)
    if prepared is None:
        return 2
    data, out = prepared
    csv_path = out / f"{args.name}.csv"
    runs = [("dense", 0.0, s) for s in args.seeds if 0.0 in args.targets]
    runs += [(sc, t, s) for t in args.targets if t > 0 for sc in args.scopes for s in args.seeds]
    if args.table_only:
        args.resume, runs = True, []
    run = partial(run_one, args=args, data=data)
    rows, wall = common.run_resumable(csv_path, COLUMNS, runs, run, progress, resume=args.resume)
    setup = (
        f"LeNet/MNIST, {args.epochs} epochs, batch {args.batch_size}, {args.optimizer} lr={args.lr}, "
        f"NeuronPruning({args.importance}), Polynomial ramp epochs {args.ramp_start}->{args.ramp_end} every "
        f"{args.every_n_steps} steps, seeds {args.seeds}, {args.threads} CPU thread(s), latency medians of "
        f"{args.repeats_b1} (b=1) / {args.repeats_b256} (b=256) calls"
    )
    table = format_table(rows)
    shapes = list(dict.fromkeys(r["widths"] for r in rows if float(r["target"]) in (0.0, 0.5)))
    profile = stage_profile(shapes, args.repeats_b256)
    modes = execution_modes(shapes, args.repeats_b256, args.compile)
    text = (
        f"{setup}\n\n{table}\n\nPer-operation CPU time at batch 256 (median of {args.repeats_b256} calls, "
        f"{args.threads} thread(s)):\n\n{profile}\n\nThe same shapes at batch 256 in each of PyTorch's CPU "
        f"execution modes (median ms of {args.repeats_b256} calls; ratio = speed-up / MAC reduction):"
        f"\n\n{modes}\n\nwall time of this invocation: {wall:.0f} s\n"
    )
    write_results(out / f"{args.name}.md", text)
    print(f"\n{text}\nwrote {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
