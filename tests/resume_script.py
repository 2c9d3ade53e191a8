"""Training script for the SIGKILL test in test_resume.py: the same command starts or resumes a run.

``python tests/resume_script.py DIR [--pause-at-step N]``: trains TinyModule with a step schedule and
checkpoints every 2 steps (``DIR/last.ckpt``); resumes from ``DIR/last.ckpt`` when it exists. With
``--pause-at-step``, the first run writes ``DIR/paused`` at that step and sleeps, to be killed there.
At the end it writes ``DIR/final.pt`` (zeros counted here, callback progress, the model's keys).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyModule, make_trainer, random_loader, zero_counts  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

from lightning_prune import Polynomial, PruningScheduleCallback  # noqa: E402


class Pause(pl.Callback):
    def __init__(self, directory: Path, step: int | None) -> None:
        self.marker = directory / "paused"
        self.step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.step is not None and trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(trainer.global_step))
            time.sleep(600)  # killed here


def run(directory: Path, pause_at_step: int | None = None) -> dict[str, Any]:
    """Train (or resume from ``directory/last.ckpt``) and return the final figures."""
    last = directory / "last.ckpt"
    resume = str(last) if last.exists() else None
    resumed_from = torch.load(last, weights_only=False)["global_step"] if resume else None
    pl.seed_everything(0, verbose=False)
    callback = PruningScheduleCallback(
        0.875, schedule=Polynomial(start_epoch=0, end_epoch=3, every_n_steps=2), verbose=False
    )
    checkpoint = ModelCheckpoint(dirpath=directory, every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = make_trainer(
        [callback, Pause(directory, pause_at_step), checkpoint],
        max_epochs=4,
        limit_train_batches=5,
        enable_checkpointing=True,
    )
    module = TinyModule()
    trainer.fit(module, random_loader(), random_loader(16), ckpt_path=resume)
    report = zero_counts(module)
    return {
        "zeros": [t.zeros for t in report.tensors],
        "steps": callback.state_dict()["steps"],
        "applied": callback.state_dict()["applied"],
        "resumed_from_step": resumed_from,
        "keys": list(module.state_dict()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--pause-at-step", type=int, default=None)
    args = parser.parse_args()
    torch.save(run(args.directory, args.pause_at_step), args.directory / "final.pt")


if __name__ == "__main__":
    main()
