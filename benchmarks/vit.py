"""Vision Transformer on MNIST: magnitude and activation-aware (Wanda) pruning of every attention and MLP weight
matrix, on a gradual schedule while training and in one shot after it.

Model: torchvision's ``VisionTransformer(image_size=28, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64,
mlp_dim=128, num_classes=10)`` with a 1-channel patch embedding (torchvision's expects 3 channels), trained from
scratch with AdamW (linear warm-up, then cosine decay to zero, or with ``--lr-schedule constant`` the same rate
to the end) on the MNIST training images (``--train-size`` of the 60,000, a fixed subset when fewer), the same
images and batch order for every run of a seed; tested on the 10,000 test images.

Pruned: the 16 weight matrices of the attention and MLP blocks, ``in_proj_weight``, ``out_proj.weight`` and both
MLP ``Linear`` weights of each of the 4 layers (:data:`PARAMETERS`; the patch embedding, the class token, the
position embedding, the norms and the head stay dense). Rows:

* ``dense``: no pruning;
* ``l1-schedule``: ``PruningScheduleCallback(s, scope="global", schedule=Polynomial(...))``: a cubic ramp from
  ``--ramp-start`` to ``--ramp-end``, a step every ``--every-n-steps`` optimizer steps, then training on at
  the final sparsity;
* ``wanda-schedule``: the same schedule with ``method=Wanda(--calibration-batches)`` (per output row, so
  ``scope="local"``); each step waits for its window of training batches;
* ``modelpruning``: Lightning's ``ModelPruning("l1_unstructured", use_global_unstructured=True,
  use_lottery_ticket_hypothesis=False)``, pruning at the end of each ramp epoch by the fraction of the remaining
  weights that brings the cumulative sparsity to the same schedule's target at the next epoch start. It prunes
  through torch's reparametrization, which cannot prune ``out_proj.weight``: ``nn.MultiheadAttention`` reads that
  weight without calling ``out_proj``'s forward, so the masked weight torch computes once at the pruning step is
  reused by every later batch and the second backward fails (:func:`modelpruning_out_proj_failure` reproduces it
  and the result records its message). It therefore prunes the other 12 matrices to the target, and its
  measured sparsity over all 16 is lower;
* ``oneshot-l1`` (global magnitude), ``oneshot-l1-local`` (magnitude per tensor), ``oneshot-wanda`` (Wanda per
  output row, as in the paper, from ``--oneshot-batches`` training batches), ``oneshot-wanda-tensor`` and
  ``oneshot-wanda-global`` (Wanda in the two magnitude rows' comparison groups, so that only the score differs):
  the dense model of the same seed pruned once after training (:func:`lightning_prune.prune_once`,
  :func:`lightning_prune.wanda_prune`), without fine-tuning;
* ``oneshot-sparsegpt``: :class:`lightning_prune.SparseGPT` per output row from ``--oneshot-batches`` training
  batches (each layer's inputs taken through the layers already pruned, the kept weights updated), without
  fine-tuning; beside ``oneshot-l1-local`` and ``oneshot-wanda`` it shows what repairing the kept weights buys.

The dense model of each seed is trained once and kept in ``--cache-dir`` (a file per seed and training
configuration), so the one-shot rows and ``benchmarks/recovery.py``'s ViT rows reuse it.

Usage (from the repository root)::

    python benchmarks/vit.py --data-dir ../shared/data         # the full budget: 3 seeds, ~3 h on 2 CPUs
    python benchmarks/vit.py --data-dir DIR --smoke            # every row on a tiny budget (seconds)

``--smoke`` writes into ``--out-dir`` or, when none is given, a new temporary folder (never
``benchmarks/results/``).

The defaults are the rows that say something at the full budget: dense, global L1 and Wanda on the schedule at
70/90/95%, and ``ModelPruning`` at ``--modelpruning-targets``; the one-shot rows run when named in ``--methods``.

Writes ``<out-dir>/<name>.csv`` (one row per run, appended as runs finish; ``--resume`` skips those there),
``<name>.md`` (the mean ± std table, the goals, the command and the machine, also printed) and ``<name>.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.callbacks import ModelPruning  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchvision.models import VisionTransformer  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import Columns, aggregate, machine, quiet_lightning, training_parser, write_results  # noqa: E402
from lightning_prune import Polynomial, PruningScheduleCallback, SparseGPT, Wanda, prune_once, sparsity_report  # noqa: E402
from lightning_prune.step import wanda_prune as wanda_once  # noqa: E402

PARAMETERS = ("*self_attention.in_proj_weight", "*self_attention.out_proj.weight", "*mlp*.weight")
SCHEDULED = ("l1-schedule", "wanda-schedule", "modelpruning")
ONESHOT = (
    "oneshot-l1", "oneshot-l1-local", "oneshot-wanda", "oneshot-wanda-tensor", "oneshot-wanda-global",
    "oneshot-sparsegpt",
)  # fmt: skip
METHODS = ("dense", *SCHEDULED, *ONESHOT)
FIELDS = ("method", "target", "sparsity", "seed", "test_acc", "seconds", "epochs", "train_size")
COLUMNS = Columns(FIELDS, floats=("target", "sparsity", "test_acc", "seconds"), ints=("seed", "epochs", "train_size"))
MEANS = {"sparsity": "sparsity", "seconds": "seconds"}  # figure of the table -> its column, averaged over seeds
LABELS = {
    "dense": "dense",
    "l1-schedule": "global L1, our schedule",
    "wanda-schedule": "Wanda (per row), our schedule",
    "modelpruning": "Lightning ModelPruning (global L1, no out_proj)",
    "oneshot-l1": "one-shot global L1, no fine-tuning",
    "oneshot-l1-local": "one-shot L1 per tensor, no fine-tuning",
    "oneshot-wanda": "one-shot Wanda (per row), no fine-tuning",
    "oneshot-wanda-tensor": "one-shot Wanda per tensor, no fine-tuning",
    "oneshot-wanda-global": "one-shot global Wanda, no fine-tuning",
    "oneshot-sparsegpt": "one-shot SparseGPT (per row), no fine-tuning",
}


def make_vit() -> VisionTransformer:
    """The small ViT: patch 4 on 28x28 (49 patches and a class token), width 64, depth 4, 4 heads, MLP 128, with
    a 1-channel patch embedding initialized as torchvision initializes its own. Torchvision initializes the
    classification head to zeros: it trains (its gradient is not zero), but a magnitude or Wanda step before
    training would find every head weight tied at zero; it is not in :data:`PARAMETERS`."""
    vit = VisionTransformer(
        image_size=28, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    vit.conv_proj = nn.Conv2d(1, 64, kernel_size=4, stride=4)
    nn.init.trunc_normal_(vit.conv_proj.weight, std=math.sqrt(1.0 / (1 * 4 * 4)))
    nn.init.zeros_(vit.conv_proj.bias)
    return vit


class LitViT(pl.LightningModule):
    """The ViT with cross-entropy, AdamW and a per-step linear warm-up, then cosine decay to zero or (``"constant"``)
    the same rate to the end."""

    def __init__(
        self, lr: float = 2e-3, weight_decay: float = 0.05, warmup: float = 0.1, lr_schedule: str = "cosine"
    ) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.warmup, self.lr_schedule = lr, weight_decay, warmup, lr_schedule
        self.model = make_vit()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(int(self.warmup * total), 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if self.lr_schedule == "constant":
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ------------------------------------------------------------------------------------------------ data


def load_data(args: argparse.Namespace) -> tuple[TensorDataset, TensorDataset] | None:
    """The fixed training subset (the first ``--train-size`` images of a fixed permutation of the training
    split, the same for every run) and the test set; ``None`` after an error message when MNIST is missing."""
    from examples.mnist import MNISTDataModule, MNISTNotFoundError

    data = MNISTDataModule(data_dir=args.data_dir, batch_size=args.batch_size, quick=args.smoke, download=False)
    try:
        data.setup("fit")
    except MNISTNotFoundError as missing:
        print(f"error: {missing}", file=sys.stderr)
        return None
    # every training image: the data module's training split and its validation hold-out (no run validates)
    x = torch.cat([data.train_dataloader().dataset.tensors[0], data.val_dataloader().dataset.tensors[0]])
    y = torch.cat([data.train_dataloader().dataset.tensors[1], data.val_dataloader().dataset.tensors[1]])
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))[: args.train_size]
    return TensorDataset(x[keep], y[keep]), data.test_dataloader().dataset


def train_loader(train: TensorDataset, args: argparse.Namespace, seed: int) -> DataLoader:
    return DataLoader(
        train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed), drop_last=True
    )


@torch.no_grad()
def accuracy(model: nn.Module, test: TensorDataset) -> float:
    model.eval()
    correct = 0
    for x, y in DataLoader(test, batch_size=1000):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(test)


# ------------------------------------------------------------------------------------------------ runs


def schedule(args: argparse.Namespace, every_n_steps: int | None) -> Polynomial:
    return Polynomial(
        start_epoch=args.ramp_start, end_epoch=args.ramp_end, every_n_steps=every_n_steps or None, power=3
    )


def modelpruning_amount(args: argparse.Namespace, target: float) -> Callable[[int], float]:
    """ModelPruning's ``amount`` is a fraction of the weights still live, applied at the end of epoch ``e``: the
    fraction that brings the cumulative sparsity from the schedule's target at the start of ``e`` to its target
    at the start of ``e + 1``."""
    ramp = schedule(args, None)

    def amount(epoch: int) -> float:
        before, after = ramp.sparsity(epoch, target), ramp.sparsity(epoch + 1, target)
        return 0.0 if after <= before else (after - before) / (1.0 - before)

    return amount


def callbacks_for(method: str, target: float, args: argparse.Namespace, module: LitViT) -> list[Any]:
    if method == "l1-schedule":
        return [
            PruningScheduleCallback(
                target, parameters=list(PARAMETERS), scope="global", schedule=schedule(args, args.every_n_steps),
                verbose=False, log_per_tensor=False,
            )
        ]  # fmt: skip
    if method == "wanda-schedule":
        return [
            PruningScheduleCallback(
                target, parameters=list(PARAMETERS), method=Wanda(args.calibration_batches, group="row"),
                schedule=schedule(args, args.every_n_steps), verbose=False, log_per_tensor=False,
            )
        ]  # fmt: skip
    if method == "modelpruning":
        from lightning_prune import select_parameters

        chosen = [(t.module, t.param) for t in select_parameters(module, list(PARAMETERS))]
        without_out_proj = [
            (m, p) for m, p in chosen if not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)
        ]
        return [
            ModelPruning(
                "l1_unstructured", parameters_to_prune=without_out_proj, use_global_unstructured=True,
                amount=modelpruning_amount(args, target), use_lottery_ticket_hypothesis=False, verbose=0,
            )
        ]  # fmt: skip
    return []


def fit(seed: int, args: argparse.Namespace, train: TensorDataset, callbacks: Callable[[LitViT], list[Any]]) -> LitViT:
    pl.seed_everything(seed, verbose=False)
    module = LitViT(lr=args.lr, lr_schedule=args.lr_schedule)
    trainer = pl.Trainer(
        max_epochs=args.epochs, callbacks=callbacks(module), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        accelerator="cpu", deterministic=True,
    )  # fmt: skip
    trainer.fit(module, train_loader(train, args, seed))
    return module


def measured_sparsity(module: nn.Module) -> float:
    return sparsity_report(module, list(PARAMETERS)).sparsity


class Runner:
    """Runs one (method, target, seed) and keeps the dense weights of each seed for the one-shot rows."""

    def __init__(self, args: argparse.Namespace, train: TensorDataset, test: TensorDataset) -> None:
        self.args, self.train, self.test = args, train, test
        self.dense = cache(self._dense)

    def _dense(self, seed: int) -> tuple[dict[str, Tensor], float, float]:
        """The dense weights of ``seed``, their test accuracy and the seconds their training took, read from
        ``--cache-dir`` when a run with the same training configuration saved them."""
        a = self.args
        config = [a.epochs, a.batch_size, a.lr, a.lr_schedule, a.optimizer, len(self.train), seed]
        key = hashlib.sha1(json.dumps(config).encode()).hexdigest()[:12]
        path = Path(a.cache_dir) / f"dense-seed{seed}-{key}.pt" if a.cache_dir else None  # --smoke: no cache
        if path is not None and path.exists():
            saved = torch.load(path, weights_only=True)
            return saved["state"], float(saved["accuracy"]), float(saved["seconds"])
        start = time.perf_counter()
        module = fit(seed, a, self.train, lambda m: [])
        seconds = time.perf_counter() - start
        state, acc = {k: v.clone() for k, v in module.state_dict().items()}, accuracy(module, self.test)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": state, "accuracy": acc, "seconds": seconds}, path)
        return state, acc, seconds

    def __call__(self, method: str, target: float, seed: int) -> dict[str, Any]:
        args = self.args
        if method == "dense":
            _, acc, seconds = self.dense(seed)
            module = None
        elif method in ONESHOT:
            state = self.dense(seed)[0]
            module = LitViT(lr=args.lr, lr_schedule=args.lr_schedule)
            module.load_state_dict(state)
            start = time.perf_counter()
            if method == "oneshot-sparsegpt":
                calibration = train_loader(self.train, args, seed)
                method_ = SparseGPT(args.oneshot_batches)
                prune_once(module, target, method=method_, parameters=list(PARAMETERS), dataloader=calibration)
            elif method.startswith("oneshot-wanda"):
                group = {"oneshot-wanda": "row", "oneshot-wanda-tensor": "tensor"}.get(method, "global")
                calibration = train_loader(self.train, args, seed)
                wanda_once(
                    module, calibration, target, parameters=list(PARAMETERS), group=group, batches=args.oneshot_batches
                )
            else:
                scope = "global" if method == "oneshot-l1" else "local"
                prune_once(module, target, scope=scope, parameters=list(PARAMETERS))
            seconds = time.perf_counter() - start
            acc = accuracy(module, self.test)
        else:
            start = time.perf_counter()
            module = fit(seed, args, self.train, lambda m: callbacks_for(method, target, args, m))
            seconds = time.perf_counter() - start
            acc = accuracy(module, self.test)
        return {
            "method": method,
            "target": target,
            "sparsity": round(measured_sparsity(module), 6) if module is not None else 0.0,
            "seed": seed,
            "test_acc": round(acc, 6),
            "seconds": round(seconds, 2),
            "epochs": args.epochs,
            "train_size": len(self.train),
        }


def modelpruning_out_proj_failure() -> str:
    """What happens when Lightning's ``ModelPruning`` prunes ``nn.MultiheadAttention``'s ``out_proj.weight``: two
    epochs of a few random batches, pruning after the first. Returns the error, or ``"no error"``."""
    pl.seed_everything(0, verbose=False)
    module = LitViT()
    out_proj = [(m.out_proj, "weight") for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
    pruning = ModelPruning(
        "l1_unstructured", parameters_to_prune=out_proj, amount=lambda epoch: 0.5 if epoch == 0 else 0.0,
        use_lottery_ticket_hypothesis=False, verbose=0,
    )  # fmt: skip
    data = TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[pruning], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    try:
        trainer.fit(module, DataLoader(data, batch_size=8))
    except RuntimeError as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return "no error"


# ------------------------------------------------------------------------------------------------ results


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV this script wrote, with their types (empty when there is no file)."""
    return common.read_rows(path, COLUMNS)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (method, target): test accuracy mean ± std over seeds, in points, and the gap to dense."""
    lines = [
        "| method | target | measured sparsity | test acc. % (mean ± std) | vs dense (points) | seeds | s/run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += common.accuracy_lines(aggregate(rows, MEANS), METHODS, lambda v: f"{v['seconds']:.0f}", LABELS)
    return "\n".join(lines)


GOALS = {0.9: 0.5, 0.95: 1.0}
"""Target sparsity -> the largest accuracy loss against dense, in points, that the goal allows."""


def goals(rows: Sequence[dict[str, Any]]) -> str:
    """The goals (pruning while training within :data:`GOALS` of dense), stated from the figures: met or not."""
    stats = aggregate(rows, MEANS)
    dense = stats.get(("dense", 0.0))
    lines = []
    for target, allowed in GOALS.items():
        for method in ("l1-schedule", "wanda-schedule"):
            v = stats.get((method, target))
            if dense is not None and v is not None:
                gap = v["acc"][0] - dense["acc"][0]
                verdict = "met" if gap >= -allowed else "missed"
                lines.append(
                    f"- {LABELS[method]} at {target:g}: {gap:+.2f} points vs dense (goal: within {allowed}): {verdict}."
                )
    return "\n".join(lines)


def paired(rows: Sequence[dict[str, Any]]) -> str:
    """Differences between two methods on the same seed (same initialization, batches and dense model), at each
    target: each seed's difference and their mean."""
    acc = {(r["method"], r["target"], r["seed"]): 100 * r["test_acc"] for r in rows}
    pairs = [
        ("wanda-schedule", "l1-schedule"),
        ("oneshot-wanda", "oneshot-l1"),
        ("oneshot-wanda", "oneshot-l1-local"),
        ("oneshot-wanda-tensor", "oneshot-l1-local"),
        ("oneshot-wanda-global", "oneshot-l1"),
        ("oneshot-sparsegpt", "oneshot-wanda"),
        ("oneshot-sparsegpt", "oneshot-l1-local"),
    ]
    lines = ["| A | B | target | A - B per seed (points) | mean |", "|---|---|---:|---|---:|"]
    for a, b in pairs:
        for target in sorted({r["target"] for r in rows if r["method"] == a}):
            seeds = sorted(s for (m, t, s) in acc if m == a and t == target and (b, t, s) in acc)
            if seeds:
                diffs = [acc[(a, target, s)] - acc[(b, target, s)] for s in seeds]
                each = ", ".join(f"{d:+.2f}" for d in diffs)
                lines.append(f"| {a} | {b} | {target:g} | {each} | {statistics.fmean(diffs):+.2f} |")
    return "\n".join(lines)


def report(
    rows: Sequence[dict[str, Any]], setup: str, command: str, machine_line: str, wall: float, failure: str
) -> str:
    """The Markdown written to ``<name>.md``."""
    return (
        f"# ViT on MNIST: pruning every attention and MLP weight matrix\n\n{setup}.\n\n"
        f"Command: `{command}`\n\nMachine: {machine_line}\n\nWall time of this invocation: {wall:.0f} s\n\n"
        f"{format_table(rows)}\n\nGoals:\n\n{goals(rows)}\n\nPaired by seed:\n\n{paired(rows)}\n\n"
        f"Lightning's `ModelPruning` with `MultiheadAttention.out_proj.weight` in `parameters_to_prune`: {failure} "
        "(raised in training after its first pruning step); its rows prune the other 12 matrices.\n"
    )


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy against measured sparsity (mean over seeds; ModelPruning's lies left of its target, as it
    leaves ``out_proj`` dense): left, pruning while training; right, one shot without fine-tuning; mean ± std
    over seeds, the dense mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = aggregate(rows, MEANS)
    dense = stats.get(("dense", 0.0))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=False)
    for ax, methods, name in ((axes[0], SCHEDULED, "while training"), (axes[1], ONESHOT, "one shot, no fine-tuning")):
        if dense is not None:
            mean, std = dense["acc"]
            ax.axhline(mean, color="black", lw=1, ls="--", label=f"dense {mean:.2f}%")
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
        for i, method in enumerate(methods):
            targets = sorted(t for (m, t) in stats if m == method)
            if targets:
                ax.errorbar(
                    [stats[(method, t)]["sparsity"] for t in targets], [stats[(method, t)]["acc"][0] for t in targets],
                    yerr=[stats[(method, t)]["acc"][1] for t in targets], marker="osd^v<>p"[i % 8], capsize=3,
                    label=LABELS[method],
                )  # fmt: skip
        ax.set_xlabel("measured sparsity of the 16 attention and MLP matrices")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("test accuracy, % (mean ± std over seeds)")
    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = training_parser(__doc__, name="vit", targets=[0.0, 0.7, 0.9, 0.95], ramp_end=4)
    p.set_defaults(epochs=5, lr=1e-3, every_n_steps=50, threads=2, batch_size=128)
    p.add_argument(
        "--lr-schedule", choices=("cosine", "constant"), default="cosine", help="after the warm-up: decay to 0, or not"
    )
    p.add_argument("--train-size", type=int, default=60000, help="training images (a fixed subset when < 60,000)")
    p.add_argument("--calibration-batches", type=int, default=8, help="Wanda's window before each scheduled step")
    p.add_argument("--oneshot-batches", type=int, default=8, help="Wanda's calibration batches in one shot")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["dense", *SCHEDULED])
    p.add_argument("--modelpruning-targets", type=float, nargs="+", default=[0.9, 0.95], help="ModelPruning's rows")
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "vit"), help="the dense models, one per seed")
    p.add_argument("--smoke", "--quick", action="store_true", help="every row on a tiny budget: 1 seed, 2 epochs")
    return p


def apply_smoke(args: argparse.Namespace) -> None:
    args.seeds, args.targets, args.epochs = args.seeds[:1], [0.0, 0.5], 2
    args.modelpruning_targets = [0.5]
    args.ramp_start, args.ramp_end, args.every_n_steps = 0, 1, 1
    args.batch_size, args.calibration_batches, args.oneshot_batches = 16, 1, 1
    args.train_size, args.methods, args.cache_dir = 256, list(METHODS), None


def describe(args: argparse.Namespace, n_train: int, n_test: int) -> str:
    return (
        f"ViT (patch 4, width 64, depth 4, 4 heads, MLP 128) on MNIST: {n_train} training images, "
        f"{args.epochs} epochs, batch {args.batch_size}, AdamW lr={args.lr} (warm-up 10%, {args.lr_schedule}), "
        f"ramp epochs {args.ramp_start}->"
        f"{args.ramp_end} every {args.every_n_steps} steps, Wanda windows {args.calibration_batches} batches "
        f"(one shot: {args.oneshot_batches}), seeds {args.seeds}; {n_test} test images"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    common.resolve_out_dir(args, args.name)  # with --smoke and no --out-dir: a temporary folder
    if not 0 <= args.ramp_start < args.ramp_end <= args.epochs:
        raise SystemExit(f"need 0 <= --ramp-start < --ramp-end <= --epochs, got {args.ramp_start}, {args.ramp_end}")
    if any(not 0 <= t < 1 for t in args.targets):
        raise SystemExit(f"--targets must be in [0, 1), got {args.targets}")
    quiet_lightning(args.threads)
    data = load_data(args)
    if data is None:
        return 2
    train, test = data
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{args.name}.csv"
    runs = []  # seed by seed: an interrupted run leaves complete seeds
    for seed in args.seeds:
        runs += [("dense", 0.0, seed)] if "dense" in args.methods else []
        runs += [(m, t, seed) for m in args.methods if m in ONESHOT for t in args.targets if t > 0]
        runs += [
            (m, t, seed)
            for t in args.targets
            if t > 0
            for m in args.methods
            if m in SCHEDULED and (m != "modelpruning" or t in args.modelpruning_targets)
        ]
    rows, wall = common.run_resumable(
        csv_path,
        COLUMNS,
        runs,
        Runner(args, train, test),
        lambda key, row: (
            f"{key[0]:<16} target={key[1]:<4g} seed={key[2]} sparsity={row['sparsity']:.4f} "
            f"test_acc={100 * row['test_acc']:.2f}% {row['seconds']:.0f}s"
        ),
        resume=args.resume,
    )
    failure = modelpruning_out_proj_failure() if "modelpruning" in args.methods else "not run"
    setup = describe(args, len(train), len(test))
    command = "python benchmarks/vit.py " + " ".join(argv)
    text = report(rows, setup, command, machine(), wall, failure)
    write_results(out / f"{args.name}.md", text)  # keeps the hand-written "## Procedure and notes"
    plot(rows, out / f"{args.name}.png", setup)
    print(f"\n{text}\nwrote {csv_path}, {out / args.name}.md, {out / args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
