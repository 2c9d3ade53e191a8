"""``benchmarks/speed_target.py``'s ``train`` section: a speed plan against uniform pruning **after training**, at
equal measured speed-up.

Two workloads (``--model``):

* ``lm``: ``benchmarks/lm.py``'s byte-level GPT (its dense model of ``--seed``, trained once and cached; its options
  after ``--lm-args``) decoding the byte after the validation text's first ``--context`` bytes (one token, with the
  key-value cache), scored in bits per byte on the validation text; the pruned runs are ``lm.py``'s continued
  steps with ``PruningScheduleCallback`` on its cubic ramp (as its ``gradual-l1-global`` row);
* ``mlp``: an MLP (784 -> ``--width`` -> ``--width`` -> 10, ReLU) on MNIST (``--data-dir``) served one image at a
  time, scored by test accuracy; dense for ``--dense-epochs`` (Adam, ``--lr``, cached), then ``--epochs`` more with
  the callback on a cubic ramp over all but the last.

Each of ``--targets`` is planned by ``plan_speedup`` on the dense model's own weights (their magnitude is the
importance; the plan's names, made on the bare model, are moved under the LightningModule by the callback); the
plan and uniform global pruning at each of ``--uniform-sparsities`` are trained the same way, and only after all
the training is each model converted by ``to_sparse_inference`` on the served input and timed against its dense
form. A run's trained weights (and a plan with them) are kept in ``--cache-dir``, so that a second invocation
with the same options times the same models again without training or planning (on an idle machine, say).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.sparse_inference import OneToken, measure
from lightning_prune import Polynomial, PruningScheduleCallback, inference_report, sparsity_report, to_sparse_inference
from lightning_prune.inference import plan_speedup

__all__ = ["LMWorkload", "MLPWorkload", "add_arguments", "at_speed", "train_rows"]

ROOT = Path(__file__).resolve().parent.parent


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "speed_target"), help="train: trained models, plans")
    p.add_argument("--data-dir", default=None, help="mlp: the folder holding MNIST/raw/")
    p.add_argument("--width", type=int, default=2048, help="mlp: hidden width")
    p.add_argument("--dense-epochs", type=int, default=2, help="mlp: dense training")
    p.add_argument("--epochs", type=int, default=3, help="mlp: training with the pruning ramp (all but the last)")
    p.add_argument("--lr", type=float, default=1e-3, help="mlp: Adam's rate")
    p.add_argument("--lm-args", nargs=argparse.REMAINDER, default=[], help="lm: options for benchmarks/lm.py")


def trainer(epochs: int, callbacks: list[Any]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", deterministic=True,
    )  # fmt: skip


class LMWorkload:
    """``benchmarks/lm.py``'s GPT decoding one byte; scored in bits per byte (lower is better)."""

    metric, lower, digits = "bits per byte", True, 4

    def __init__(self, args: argparse.Namespace) -> None:
        from benchmarks import lm

        self.lm, self.args = lm, args
        self.la = lm.build_parser().parse_args(args.lm_args)
        if args.smoke:
            lm.apply_smoke(self.la)
            args.context = 16
        self.la.out_dir, self.la.resume = "", False
        self.runner = lm.Runner(self.la)
        self.key = self.runner._key(args.seed)
        self.schedule = Polynomial(0, self.la.continue_epochs - 1, every_n_steps=self.la.every_n_steps)

    def dense(self) -> nn.Module:
        return self.runner.model(self.args.seed)

    def served(self, model: nn.Module) -> tuple[nn.Module, Tensor]:
        """The decoding step (its model at ``model``, as in ``lm.LitLM``) and its input: the byte after the
        validation text's first ``--context`` bytes."""
        model.eval()
        text, n = self.runner.valid, self.args.context
        with torch.no_grad():
            out = model(input_ids=text[:n].view(1, -1), use_cache=True)
        return OneToken(model, getattr(out, "cache", None) or out.past_key_values), text[n : n + 1].view(1, 1)

    def train(self, model: nn.Module, callback: PruningScheduleCallback) -> float:
        a, lm = self.la, self.lm
        data = lm.windows(self.runner.train_data, a.continue_epochs * a.steps_per_epoch * a.batch_size, a.context,
                          1000 + self.args.seed)  # fmt: skip
        return lm.train(model, data, a, epochs=a.continue_epochs, steps=a.steps_per_epoch, lr=a.continue_lr,
                        warmup=0, callbacks=[callback], seed=self.args.seed)  # fmt: skip

    def score(self, model: nn.Module) -> float:
        return self.lm.bits_per_byte(model, self.runner.valid, self.la)

    def describe(self) -> str:
        a = self.la
        return (
            f"benchmarks/lm.py's GPT ({a.layers} x {a.width}, dense {a.dense_steps} steps, seed {self.args.seed}) "
            f"decoding one byte after {self.args.context} cached; pruned during {a.continue_epochs} x "
            f"{a.steps_per_epoch} continued steps (rate {a.continue_lr:g}, a cubic ramp every {a.every_n_steps} "
            f"steps over all but the last epoch); {self.metric} on {a.eval_windows} validation windows"
        )


class LitMLP(pl.LightningModule):
    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)


class MLPWorkload:
    """An MLP on MNIST served one image at a time; scored by test accuracy in % (higher is better)."""

    metric, lower, digits = "test accuracy (%)", False, 2

    def __init__(self, args: argparse.Namespace) -> None:
        from examples.mnist import MNISTDataModule

        if args.data_dir is None:
            raise SystemExit("--model mlp needs --data-dir (the folder holding MNIST/raw/)")
        if args.smoke:
            args.width, args.dense_epochs, args.epochs = 64, 1, 2
        self.args = args
        self.data = MNISTDataModule(data_dir=args.data_dir, batch_size=128, quick=args.smoke, download=False)
        self.data.setup("fit")
        config = [args.width, args.dense_epochs, args.epochs, args.lr, args.seed, args.smoke]
        self.key = hashlib.sha1(json.dumps(config).encode()).hexdigest()[:12]
        self.schedule = Polynomial(0, args.epochs - 1, every_n_steps=2 if args.smoke else 50)
        self._dense: dict[str, Tensor] | None = None

    def network(self) -> nn.Module:
        w = self.args.width
        return nn.Sequential(nn.Flatten(), nn.Linear(784, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))

    def dense(self) -> nn.Module:
        if self._dense is None:
            path = Path(self.args.cache_dir) / f"mlp-dense-{self.key}.pt"
            if path.exists():
                self._dense = torch.load(path, weights_only=True)
            else:
                pl.seed_everything(self.args.seed, verbose=False)
                model = self.network()
                trainer(self.args.dense_epochs, []).fit(LitMLP(model, self.args.lr), self.data.train_dataloader())
                self._dense = {k: v.clone() for k, v in model.state_dict().items()}
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self._dense, path)
        model = self.network()
        model.load_state_dict(self._dense)
        return model.eval()

    def served(self, model: nn.Module) -> tuple[nn.Module, Tensor]:
        return model.eval(), next(iter(self.data.test_dataloader()))[0][:1]

    def train(self, model: nn.Module, callback: PruningScheduleCallback) -> float:
        pl.seed_everything(self.args.seed, verbose=False)
        start = time.perf_counter()
        trainer(self.args.epochs, [callback]).fit(LitMLP(model, self.args.lr), self.data.train_dataloader())
        return time.perf_counter() - start

    @torch.no_grad()
    def score(self, model: nn.Module) -> float:
        model.eval()
        right = total = 0
        for x, y in self.data.test_dataloader():
            right, total = right + int((model(x).argmax(1) == y).sum()), total + len(y)
        return 100.0 * right / total

    def describe(self) -> str:
        a = self.args
        return (
            f"An MLP 784 -> {a.width} -> {a.width} -> 10 on MNIST (seed {a.seed}), dense {a.dense_epochs} epochs, "
            f"then {a.epochs} with the pruning ramp (Adam {a.lr:g}, batch 128), served one image at a time; "
            f"{self.metric} on the {self.data.split_sizes()['test']} test images"
        )


def _path(r: dict[str, Any], work: LMWorkload | MLPWorkload, args: argparse.Namespace) -> Path:
    slug = re.sub(r"[^a-z0-9.]+", "-", r["label"].lower())
    return Path(args.cache_dir) / f"{args.model}-{slug}-seed{args.seed}-{work.key}.pt"


def _planned(r: dict[str, Any], work: LMWorkload | MLPWorkload, args: argparse.Namespace) -> None:
    """Plan the run ``r`` (for a target, unless its training is cached)."""
    if r["target"] is None or _path(r, work, args).exists():
        return
    start = time.perf_counter()
    step, x = work.served(work.dense())
    r["plan"] = plan_speedup(step, x, r["target"])
    r["planning"] = time.perf_counter() - start
    print(r["plan"], flush=True)


def _trained(r: dict[str, Any], work: LMWorkload | MLPWorkload, args: argparse.Namespace) -> None:
    """Train the run ``r`` to its plan or its uniform target, or read it back from ``--cache-dir``; ``r`` gains
    the model, its score and zeros."""
    path, model = _path(r, work, args), work.dense()
    if path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved.pop("state"))
        r.update(saved, cached=True)
    else:
        sparsity = r["plan"] if r["target"] is not None else r["sparsity"]
        scope = "local" if r["target"] is not None else "global"
        callback = PruningScheduleCallback(sparsity, scope=scope, schedule=work.schedule, verbose=False)
        r["seconds"] = work.train(model.train(), callback)
        r["score"], r["zeros"] = work.score(model), sparsity_report(model).sparsity
        keep = {k: r[k] for k in ("plan", "planning", "seconds", "score", "zeros") if k in r}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**keep, "state": model.state_dict()}, path)
    r["model"] = model
    print(f"{r['label']}: {work.metric} {r['score']:.{work.digits}f}, zeros {r['zeros']:.3f}", flush=True)


def at_speed(uniform: list[dict[str, Any]], speedup: float) -> float | None:
    """Uniform pruning's score at ``speedup``, interpolated between the uniform rows around it (``None`` outside).

    Example::

        >>> at_speed([{"speedup": 1.0, "score": 2.0}, {"speedup": 2.0, "score": 3.0}], 1.5)
        2.5
    """
    points = sorted((r["speedup"], r["score"]) for r in uniform)
    for (s0, b0), (s1, b1) in zip(points, points[1:]):
        if s0 <= speedup <= s1:
            return b0 if s1 == s0 else b0 + (b1 - b0) * (speedup - s0) / (s1 - s0)
    return None


def train_rows(args: argparse.Namespace) -> list[str]:
    """The plans and uniform pruning, each trained, then (all the training done) converted and timed."""
    work: LMWorkload | MLPWorkload = LMWorkload(args) if args.model == "lm" else MLPWorkload(args)
    runs = [{"label": f"plan_speedup {t:g}x", "target": t} for t in args.targets]
    runs += [{"label": f"uniform global {s:g}", "target": None, "sparsity": s} for s in args.uniform_sparsities]
    for r in runs:  # the plans first (a few seconds each), then the training, then the timing
        _planned(r, work, args)
    for r in runs:
        _trained(r, work, args)
    for r in runs:
        step, x = work.served(r.pop("model"))
        fast = to_sparse_inference(step, x)
        r.update(measure(step, fast, x, args.repeats), report=inference_report(fast))
        print(f"{r['label']}: {r['speedup']:.2f}x measured", flush=True)
    return train_table(runs, work, work.score(work.dense()))


def train_table(runs: list[dict[str, Any]], work: LMWorkload | MLPWorkload, dense: float) -> list[str]:
    uniform = [r for r in runs if r["target"] is None]
    d = work.digits
    lines = [
        f"{work.describe()}. The dense model: {dense:.{d}f}. `uniform at that speed`: the uniform rows' {work.metric} "
        "interpolated at the plan's measured speed-up; `difference`: the plan's less that "
        f"({'lower' if work.lower else 'higher'} is better).",
        "",
        "| pruning | target | plan: expected | zeros | sparse layers | measured speed-up | reached (>= 0.9x) | "
        f"{work.metric} | uniform at that speed | difference | check |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    plans = []
    for r in runs:
        target, plan = r["target"], r.get("plan")
        equal = None if target is None else at_speed(uniform, r["speedup"])
        difference = "" if equal is None else f"{r['score'] - equal:+.{d}f}"
        lines.append(
            f"| {r['label']} | {'' if target is None else f'{target:g}x'} | "
            f"{'' if plan is None else f'{plan.expected_speedup:.2f}x'} | {r['zeros']:.3f} | "
            f"{len(r['report'].sparse_layers)}/{len(r['report'].layers)} | {r['speedup']:.2f}x | "
            f"{'' if target is None else ('yes' if r['speedup'] >= 0.9 * target else 'no')} | {r['score']:.{d}f} | "
            f"{'' if equal is None else f'{equal:.{d}f}'} | {difference} | {r['error']:.1e} |"
        )
        print(lines[-1], flush=True)
        if plan is not None:
            plans += [
                "",
                f"The plan for {target:g}x ({r['planning']:.0f} s):",
                "",
                "```",
                *str(plan).splitlines(),
                "```",
            ]
    cached = [r["label"] for r in runs if r.get("cached")]
    note = f"Read from the cache (trained and planned by an earlier invocation): {', '.join(cached)}." if cached else ""
    return lines + ([""] + [note] if note else []) + plans
