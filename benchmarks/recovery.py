"""Keeping accuracy at high sparsity: 0.3's recipe against distillation, a re-warmed rate and ERK allocation.

Every pruned run is 0.3's gradual recipe (``PruningScheduleCallback(target, scope="global",
schedule=Polynomial(...))``) plus some of three ingredients (issue 29), one row per recipe:

* ``0.3``: the recipe alone (global magnitude, one ranking);
* ``distill``: + :class:`~lightning_prune.distillation.Distillation` (a frozen copy of the model taken when the
  ramp starts, temperature ``--temperature``, hardness ``--hardness``);
* ``rewarm``: + :class:`~lightning_prune.learning_rate.LearningRateRewarm` (``--rewarm-factor`` times the
  scheduled rate at each pruning step, decaying back over ``--rewarm-steps`` optimizer steps);
* ``erk``: ``allocation="erk"`` (RigL's Erdos-Renyi-Kernel shares of the global target);
* ``distill+rewarm``: distillation and the re-warmed rate, one global ranking (the recipe the guide recommends);
* ``all``: the three together.

Workloads:

* ``lenet``: LeNet/MNIST as ``benchmarks/accuracy_vs_sparsity.py`` (the same model, data, optimizer, ramp and
  epochs), test accuracy in percent; the dense baseline is the ``dense`` row. With ``--baseline-csv`` the
  ``dense`` and ``0.3`` rows are read from that script's CSV (its ``dense`` and ``callback`` rows at the same
  seeds and targets: the runs are deterministic) instead of being trained again.
* ``gpt``: the byte-level GPT of ``benchmarks/lm.py`` (its dense model per seed, cached in ``--cache-dir``),
  gradual pruning during its continued steps, bits per byte on the validation text; the dense baseline is
  ``dense-continued`` (the same steps without pruning); ``--lm-args`` (last) passes options to its parser;
* ``vit``: the ViT of ``benchmarks/vit.py`` at its defaults (the full budget, the cosine schedule), the 16
  attention and MLP matrices, test accuracy in percent; ``--vit-args`` passes options to its parser.

``--teacher dense`` distils from the dense model trained for the whole budget (LeNet: the ``dense`` row's
model; gpt: the dense model the continued steps start from; vit: its ``dense`` row's model) instead of the copy
taken when the ramp starts.

The table's columns are ``| workload | target | recipe | dense | pruned | gap | seeds |``: dense and pruned as
mean ± std over seeds, the gap in points of accuracy (lenet) or in percent of bits per byte (gpt).

Usage (from the repository root)::

    python benchmarks/recovery.py --data-dir /work/shared/data --targets 0.98 0.99 \\
        --baseline-csv benchmarks/results/accuracy_vs_sparsity.csv
    python benchmarks/recovery.py --workloads gpt --gpt-targets 0.9 --seeds 0 1
    python benchmarks/recovery.py --workloads vit --data-dir DIR --vit-targets 0.9 0.95 --seeds 0 1 --recipes 0.3 all
    python benchmarks/recovery.py --data-dir DIR --smoke   # every recipe on a tiny budget (seconds)

Writes ``<out-dir>/<name>.csv`` (one row per run, appended as runs finish; ``--resume`` skips those there) and
``<name>.md`` (the table, the command and the machine); ``--smoke`` writes into ``--out-dir`` or a new temporary
folder (never ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import shlex
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

from benchmarks import common  # noqa: E402
from benchmarks.common import Columns, fit_and_test, machine, training_parser, write_results  # noqa: E402
from lightning_prune import PruningScheduleCallback  # noqa: E402
from lightning_prune.distillation import Distillation  # noqa: E402
from lightning_prune.learning_rate import LearningRateRewarm  # noqa: E402
from lightning_prune.schedules import Polynomial  # noqa: E402

RECIPES = ("0.3", "distill", "rewarm", "erk", "distill+rewarm", "all")
INGREDIENTS = {"0.3": (), "distill": ("distill",), "rewarm": ("rewarm",), "erk": ("erk",)}
INGREDIENTS["distill+rewarm"] = ("distill", "rewarm")
INGREDIENTS["all"] = ("distill", "rewarm", "erk")
DENSE = {"lenet": "dense", "gpt": "dense-continued", "vit": "dense"}
DIGITS = {"lenet": 2, "gpt": 4, "vit": 2}  # accuracy in percent, bits per byte
FIELDS = ("workload", "recipe", "target", "seed", "value", "sparsity", "fit_seconds", "source")
COLUMNS = Columns(
    FIELDS,
    floats=("target", "value", "sparsity", "fit_seconds"),
    ints=("seed",),
    key=("workload", "recipe", "target", "seed"),
)


def callbacks_for(
    recipe: str,
    target: float,
    schedule: Polynomial,
    args: argparse.Namespace,
    teacher: Any = None,
    parameters: Sequence[str] | None = None,
) -> list[Any]:
    """The pruning callback of ``recipe`` and its companions (none for a dense row); ``teacher``: the model to
    distil from (``None``: the copy taken when the ramp starts)."""
    if recipe in DENSE.values():
        return []
    parts = INGREDIENTS[recipe]
    allocation = "erk" if "erk" in parts else "global"
    out: list[Any] = [
        PruningScheduleCallback(
            target,
            parameters=None if parameters is None else list(parameters),
            scope="global",
            schedule=schedule,
            allocation=allocation,
            verbose=False,
            log_per_tensor=False,
        )
    ]
    if "distill" in parts:
        out.append(Distillation(temperature=args.temperature, hardness=args.hardness, teacher=teacher, module="model"))
    if "rewarm" in parts:
        out.append(LearningRateRewarm(factor=args.rewarm_factor, decay_steps=args.rewarm_steps))
    return out


def lenet_run(recipe: str, target: float, seed: int, args: argparse.Namespace, data: Any) -> dict[str, Any]:
    from lightning_prune import sparsity_report

    every = args.every_n_steps or None
    schedule = Polynomial(start_epoch=args.ramp_start, end_epoch=args.ramp_end, every_n_steps=every, power=3)
    teacher = (
        lenet_teacher(seed, args, data)
        if args.teacher == "dense" and "distill" in INGREDIENTS.get(recipe, ())
        else None
    )
    module, _, seconds, test = fit_and_test(seed, args, data, callbacks_for(recipe, target, schedule, args, teacher))
    if recipe == "dense" and args.teacher == "dense":
        keep_teacher(module, seed, args)
    sparsity = sparsity_report(module.model).sparsity
    return row("lenet", recipe, target, seed, 100 * float(test["test_acc"]), sparsity, seconds, "run")


def teacher_path(seed: int, args: argparse.Namespace) -> Path:
    return Path(args.out_dir) / "teachers" / f"lenet-seed{seed}-epochs{args.epochs}.pt"


def lenet_teacher(seed: int, args: argparse.Namespace, data: Any) -> Any:
    """The dense LeNet of ``seed`` trained for the whole budget (``--teacher dense``): the ``dense`` row's model,
    kept in the output folder (trained here when that row was not run)."""
    import torch

    from examples.mnist import LeNet

    path = teacher_path(seed, args)
    if not path.exists():
        keep_teacher(fit_and_test(seed, args, data, [])[0], seed, args)
    net = LeNet()
    net.load_state_dict(torch.load(path, weights_only=True))
    return net


def keep_teacher(module: Any, seed: int, args: argparse.Namespace) -> None:
    import torch

    path = teacher_path(seed, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.model.state_dict(), path)


def row(
    workload: str, recipe: str, target: float, seed: int, value: float, sparsity: float, seconds: float, source: str
) -> dict[str, Any]:
    return {
        "workload": workload,
        "recipe": recipe,
        "target": target,
        "seed": seed,
        "value": round(value, 5),
        "sparsity": round(sparsity, 6),
        "fit_seconds": round(seconds, 1),
        "source": source,
    }


def baseline_rows(path: Path, seeds: Sequence[int], targets: Sequence[float]) -> list[dict[str, Any]]:
    """The ``dense`` and ``0.3`` rows of LeNet from ``benchmarks/accuracy_vs_sparsity.py``'s CSV."""
    from benchmarks.accuracy_vs_sparsity import read_rows

    out = []
    for r in read_rows(path):
        if r["seed"] not in seeds:
            continue
        if r["method"] == "dense" or (r["method"] == "callback" and r["target"] in targets):
            recipe = "dense" if r["method"] == "dense" else "0.3"
            out.append(
                row(
                    "lenet",
                    recipe,
                    r["target"],
                    r["seed"],
                    100 * r["test_acc"],
                    r["sparsity"],
                    r["fit_seconds"],
                    path.name,
                )
            )
    return out


class GPTRunner:
    """The GPT workload: ``benchmarks/lm.py``'s dense model of each seed, then its continued steps with a recipe."""

    def __init__(self, args: argparse.Namespace) -> None:
        from benchmarks import lm

        self.lm = lm
        self.args = lm.build_parser().parse_args(args.lm_args)
        if args.smoke:
            lm.apply_smoke(self.args)
        self.args.cache_dir = args.cache_dir or self.args.cache_dir
        self.args.out_dir = args.out_dir
        self.args.resume = False
        self.runner = lm.Runner(self.args)
        self.recovery = args

    def __call__(self, recipe: str, target: float, seed: int) -> dict[str, Any]:
        a, lm = self.args, self.lm
        model = self.runner.model(seed)
        steps = a.continue_epochs * a.steps_per_epoch
        data = lm.windows(self.runner.train_data, steps * a.batch_size, a.context, 1000 + seed)
        schedule = Polynomial(0, a.continue_epochs - 1, every_n_steps=a.every_n_steps)
        distils = "distill" in INGREDIENTS.get(recipe, ())
        teacher = self.runner.model(seed) if distils and self.recovery.teacher == "dense" else None
        callbacks = callbacks_for(recipe, target, schedule, self.recovery, teacher)
        seconds = lm.train(
            model, data, a, epochs=a.continue_epochs, steps=a.steps_per_epoch, lr=a.continue_lr, warmup=0,
            callbacks=callbacks, seed=seed,
        )  # fmt: skip
        bpb = lm.bits_per_byte(model, self.runner.valid, a)
        return row("gpt", recipe, target, seed, bpb, lm.matrix_sparsity(model), seconds, "run")


class ViTRunner:
    """The ViT workload: ``benchmarks/vit.py``'s model, data and budget (its defaults: the full budget, the cosine
    schedule), with a recipe instead of its own rows; ``dense`` is its dense row."""

    def __init__(self, args: argparse.Namespace) -> None:
        from benchmarks import vit

        self.vit = vit
        self.args = vit.build_parser().parse_args(
            ["--data-dir", str(args.data_dir), *shlex.split(args.vit_args), *(["--smoke"] if args.smoke else [])]
        )
        if args.smoke:
            vit.apply_smoke(self.args)
        data = vit.load_data(self.args)
        if data is None:
            raise SystemExit(2)
        self.train, self.test = data
        self.runner = vit.Runner(self.args, self.train, self.test)
        self.recovery = args

    def __call__(self, recipe: str, target: float, seed: int) -> dict[str, Any]:
        vit, a = self.vit, self.args
        if recipe == "dense":
            _, acc, seconds = self.runner.dense(seed)
            return row("vit", recipe, target, seed, 100 * acc, 0.0, seconds, "run")
        teacher = None
        if "distill" in INGREDIENTS[recipe] and self.recovery.teacher == "dense":
            teacher = vit.LitViT(lr=a.lr, lr_schedule=a.lr_schedule)
            teacher.load_state_dict(self.runner.dense(seed)[0])
            teacher = teacher.model
        schedule = vit.schedule(a, a.every_n_steps)
        start = time.perf_counter()
        module = vit.fit(
            seed,
            a,
            self.train,
            lambda m: callbacks_for(recipe, target, schedule, self.recovery, teacher, vit.PARAMETERS),
        )
        seconds = time.perf_counter() - start
        acc = vit.accuracy(module, self.test)
        return row("vit", recipe, target, seed, 100 * acc, vit.measured_sparsity(module), seconds, "run")


def _mean_std(values: Sequence[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """``| workload | target | recipe | dense | pruned | gap | seeds |``: one line per (workload, target, recipe)."""
    groups: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["workload"], r["recipe"], float(r["target"]))].append(float(r["value"]))
    lines = ["| workload | target | recipe | dense | pruned | gap | seeds |", "|---|---:|---|---:|---:|---:|---:|"]
    order = {recipe: i for i, recipe in enumerate(RECIPES)}
    pruned = [k for k in groups if k[1] in order]
    for workload, recipe, target in sorted(pruned, key=lambda k: (k[0], k[2], order[k[1]])):
        values, dense = groups[(workload, recipe, target)], groups.get((workload, DENSE[workload], 0.0))
        if dense:
            mean_d, mean_p = statistics.fmean(dense), statistics.fmean(values)
            gap = f"{mean_p - mean_d:+.2f}" if workload != "gpt" else f"{100 * (mean_p - mean_d) / mean_d:+.1f}%"
            dense_cell = _mean_std(dense, DIGITS[workload])
        else:
            gap, dense_cell = "n/a", "n/a"
        cell = _mean_std(values, DIGITS[workload])
        lines.append(f"| {workload} | {target:g} | {recipe} | {dense_cell} | {cell} | {gap} | {len(values)} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = training_parser(__doc__, name="recovery", targets=[0.98, 0.99], ramp_end=4)
    p.set_defaults(data_dir=None)
    for action in p._actions:
        if action.dest == "data_dir":
            action.required = False
    p.add_argument("--workloads", nargs="+", choices=("lenet", "gpt", "vit"), default=["lenet"])
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--baseline-csv", default=None, help="read LeNet's dense and 0.3 rows from this CSV")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--hardness", type=float, default=1.0)
    p.add_argument(
        "--teacher",
        choices=("ramp", "dense"),
        default="ramp",
        help="lenet: distil from the copy taken when the ramp starts, or from the dense model trained for the budget",
    )
    p.add_argument("--rewarm-factor", type=float, default=2.0)
    p.add_argument("--rewarm-steps", type=int, default=50, help="optimizer steps over which the factor decays")
    p.add_argument("--gpt-targets", type=float, nargs="+", default=[0.9])
    p.add_argument("--vit-targets", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--vit-args", default="", help="options for benchmarks/vit.py, one string (e.g. '--threads 1')")
    p.add_argument("--cache-dir", default=None, help="benchmarks/lm.py's dense models (default: its own)")
    p.add_argument("--lm-args", nargs=argparse.REMAINDER, default=[], help="options for benchmarks/lm.py's model")
    p.add_argument("--smoke", action="store_true", help="every recipe on a tiny budget, one seed")
    p.add_argument("--cost", action="store_true", help="lenet: also time a training step with and without distillation")
    p.add_argument(
        "--merge", nargs="+", default=None, metavar="CSV", help="train nothing: combine these CSVs into <name>.csv/.md"
    )
    return p


def runs_for(args: argparse.Namespace, have: set[tuple]) -> list[tuple]:
    runs: list[tuple] = []
    for seed in args.seeds:
        for workload, targets in (("lenet", args.targets), ("gpt", args.gpt_targets), ("vit", args.vit_targets)):
            if workload not in args.workloads:
                continue
            runs.append((workload, DENSE[workload], 0.0, seed))
            runs += [(workload, r, t, seed) for t in targets for r in args.recipes]
    return [r for r in runs if r not in have]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.smoke:
        common.smoke_training(args, targets=[0.9])
        args.gpt_targets, args.vit_targets, args.rewarm_steps = [0.9], [0.9], 2
    common.resolve_out_dir(args, args.name)
    common.check_budget(args)
    common.quiet_lightning(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{args.name}.csv"
    if args.merge:
        rows = [r for path in args.merge for r in common.read_rows(Path(path), COLUMNS)]
        write_csv(csv_path, rows)
        return report(rows, out, args, argv, wall=None)
    rows = common.read_rows(csv_path, COLUMNS) if args.resume else []
    if args.baseline_csv and "lenet" in args.workloads and not rows:
        rows = baseline_rows(Path(args.baseline_csv), args.seeds, args.targets)
        write_csv(csv_path, rows)
    have = {tuple(r[k] for k in COLUMNS.key) for r in rows}
    if {"lenet", "vit"} & set(args.workloads) and args.data_dir is None:
        raise SystemExit("--data-dir (the folder holding MNIST/raw/) is needed for the lenet and vit workloads")
    data = common.load_mnist(args) if "lenet" in args.workloads else None
    if "lenet" in args.workloads and data is None:
        return 2
    gpt = GPTRunner(args) if "gpt" in args.workloads else None
    vit = ViTRunner(args) if "vit" in args.workloads else None

    def run(workload: str, recipe: str, target: float, seed: int) -> dict[str, Any]:
        if workload == "lenet":
            return lenet_run(recipe, target, seed, args, data)
        runner = gpt if workload == "gpt" else vit
        assert runner is not None
        return runner(recipe, target, seed)

    start = time.perf_counter()
    common.run_and_record(
        csv_path, FIELDS, runs_for(args, have), set(), rows, run,
        lambda key, r: f"{key[0]} {key[1]:<15} target={key[2]:<5g} seed={key[3]} value={r['value']:.4f} "
        f"sparsity={r['sparsity']:.4f} fit={r['fit_seconds']:.0f}s",
    )  # fmt: skip
    cost = distillation_cost(args, data, steps=2 if args.smoke else 20) if args.cost and data is not None else ""
    return report(rows, out, args, argv, wall=time.perf_counter() - start, extra=cost)


def distillation_cost(args: argparse.Namespace, data: Any, steps: int = 20, rounds: int = 5) -> str:
    """Seconds per training step of LeNet (batch ``--batch-size``) without and with :class:`Distillation` (a teacher
    given, so the term is on from the first step), ``rounds`` interleaved fits of ``steps`` steps each: medians."""
    import pytorch_lightning as pl

    from examples.mnist import LeNet, LitLeNet

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for distil in (False, True):
            pl.seed_everything(0, verbose=False)
            callbacks = [Distillation(teacher=LeNet(), start=0, module="model")] if distil else []
            trainer = pl.Trainer(
                max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
            )  # fmt: skip
            start = time.perf_counter()
            trainer.fit(LitLeNet(lr=args.lr), datamodule=data)
            times[distil].append((time.perf_counter() - start) / steps)
    plain, distilled = statistics.median(times[False]), statistics.median(times[True])
    return (
        f"Distillation's cost, LeNet, batch {args.batch_size}, {rounds} interleaved fits of {steps} steps: "
        f"{1000 * plain:.1f} ms per step without, {1000 * distilled:.1f} ms with ({distilled / plain:.2f}x); "
        f"the teacher's copy: {sum(p.numel() for p in LeNet().parameters())} parameters"
    )


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def report(
    rows: Sequence[dict[str, Any]], out: Path, args: argparse.Namespace, argv: Sequence[str], wall: Any, extra: str = ""
) -> int:
    """Write ``<name>.md`` (keeping its hand-written notes) and print it."""
    spent = "merged, nothing trained" if wall is None else f"{wall:.0f} s"
    text = (
        "# Keeping accuracy at high sparsity: the recipe and its ablation\n\n"
        f"Command: `python benchmarks/recovery.py {' '.join(argv)}`\n\nMachine: {machine()}\n\n"
        f"Wall time of this invocation: {spent}\n\n{format_table(rows)}\n" + (f"\n{extra}\n" if extra else "")
    )
    write_results(out / f"{args.name}.md", text)
    print(f"\n{text}\nwrote {out / args.name}.csv, {out / args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
