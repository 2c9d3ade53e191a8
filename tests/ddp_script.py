"""Worker for test_ddp.py: fits TinyModule on 2 CPU processes (gloo) under ``ddp`` or ``ddp_spawn``.

``python tests/ddp_script.py STRATEGY OUT_DIR [--modes broadcast,no-broadcast]`` fits once per mode with
one callback per method and scope (CALLBACKS, on disjoint tensors) and writes ``OUT_DIR/<mode>_rank<r>.pt``
with the zero pattern of every tensor at every epoch and batch start, the logged ``pruning/...`` metrics
and how many pruning messages that rank printed. Each rank seeds its global RNG differently once training
is set up, so agreement cannot come from a shared RNG. ``no-broadcast`` turns off the callback's check that
the ranks' masks agree (``agree_masks``, which takes rank 0's where they do not; ``ddp`` only: ``ddp_spawn``
re-imports the modules), to show what seeding alone does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import lightning_utilities.core.rank_zero as rank_zero_module
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyModule, exit_distributed_script, random_loader, zero_sets  # noqa: E402

import lightning_prune.callback  # noqa: E402
from lightning_prune import AtEpochs, Polynomial, PruningScheduleCallback  # noqa: E402
from lightning_prune.methods import ScoreMethod  # noqa: E402
from lightning_prune.selection import PruningTarget  # noqa: E402


def _rank_dependent_scores(target: PruningTarget, seed: int) -> torch.Tensor:
    """Scores that differ between ranks (seeded from the rank's own global seed): only a broadcast agrees."""
    return torch.rand(target.tensor.shape, generator=torch.Generator().manual_seed(torch.initial_seed() + seed))


# Every method and both scopes in one fit: one callback per group of tensors of TinyNet (disjoint groups).
CALLBACKS: dict[str, dict[str, Any]] = {
    "l1-local": {"parameters": ["model.conv1.weight"], "sparsity": 0.875, "schedule": AtEpochs([0, 1, 2])},
    "l1-global-steps": {
        "parameters": ["model.fc3.weight", "model.conv1.bias"],
        "sparsity": 0.8,
        "scope": "global",
        "schedule": Polynomial(0, 3, every_n_steps=2),
    },
    "random-local": {
        "parameters": ["model.conv2.bias", "model.fc3.bias"],
        "sparsity": 0.5,
        "method": "random_unstructured",
        "schedule": Polynomial(0, 2, every_n_steps=3),
    },
    "random-global": {
        "parameters": ["model.fc1.bias", "model.fc2.bias"],
        "sparsity": 0.7,
        "method": "random_unstructured",
        "scope": "global",
        "schedule": AtEpochs([0, 2]),
    },
    "ln-structured": {
        "parameters": ["model.conv2.weight"],
        "sparsity": 0.5,
        "method": "ln_structured",
        "schedule": AtEpochs([0, 1]),
    },
    "random-structured": {
        "parameters": ["model.fc1.weight"],
        "sparsity": 0.5,
        "method": "random_structured",
        "schedule": AtEpochs([0, 1]),
    },
    "rank-dependent": {
        "parameters": ["model.fc2.weight"],
        "sparsity": 0.6,
        "method": "rank_dependent",
        "schedule": AtEpochs([0, 1]),
        "mask_mode": "hook",  # both mask modes agree through the same check (agree_masks)
    },
}
RANK_DEPENDENT = "model.fc2.weight"


def make_callbacks() -> list[PruningScheduleCallback]:
    callbacks = []
    for config in CALLBACKS.values():
        kwargs = dict(config)
        if kwargs.get("method") == "rank_dependent":
            kwargs["method"] = ScoreMethod(_rank_dependent_scores, "rank_dependent")
        callbacks.append(PruningScheduleCallback(kwargs.pop("sparsity"), verbose=True, **kwargs))
    return callbacks


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.messages += "Pruning step" in record.getMessage()


class RankRecorder(pl.Callback):
    """Saves what this rank holds; the test compares ranks."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name
        self.zeros: dict[str, dict[str, torch.Tensor]] = {}
        self.handler: _Count | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        torch.manual_seed(1000 + 17 * trainer.global_rank)  # a different RNG state on every rank
        self.handler = _Count()
        logger = rank_zero_module.log  # the logger rank_zero_info writes to (set by whichever package loaded last)
        logger.setLevel(logging.INFO)
        logger.addHandler(self.handler)

    def _record(self, trainer: Any, pl_module: Any, where: str) -> None:
        self.zeros[where] = zero_sets(pl_module, ["model.*"])

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._record(trainer, pl_module, f"epoch{trainer.current_epoch}")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._record(trainer, pl_module, f"step{trainer.global_step}")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        rank_zero_module.log.removeHandler(self.handler)
        result = {
            "zeros": self.zeros,
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("pruning/")},
            "messages": self.handler.messages if self.handler else -1,
            "world_size": trainer.world_size,
        }
        torch.save(result, self.out / f"{self.name}_rank{trainer.global_rank}.pt")


def fit(strategy: str, out: Path, name: str, devices: int = 2) -> pl.Trainer:
    """One fit of TinyModule with all of CALLBACKS; writes ``out/<name>_rank<r>.pt``."""
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=3,
        limit_train_batches=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*make_callbacks(), RankRecorder(out, name)],
    )
    trainer.fit(module, random_loader())
    return trainer


def main() -> list[pl.Trainer]:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy")
    parser.add_argument("out", type=Path)
    parser.add_argument("--modes", default="broadcast", help="comma-separated: broadcast, no-broadcast")
    args = parser.parse_args()
    agree = lightning_prune.callback.agree_masks
    trainers = []
    for mode in args.modes.split(","):
        lightning_prune.callback.agree_masks = (
            agree if mode == "broadcast" else (lambda store, targets, strategy: False)
        )
        trainers.append(fit(args.strategy, args.out, mode))
    return trainers


if __name__ == "__main__":
    exit_distributed_script(*main())
