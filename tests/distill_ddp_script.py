"""Worker for test_distillation.py's DDP test: TinyModule on 2 CPU processes (gloo) under ``ddp`` with pruning,
:class:`~lightning_prune.Distillation` and :class:`~lightning_prune.LearningRateRewarm`; each rank writes
``OUT_DIR/rank<r>.pt`` with its teacher's weights, its final weights, the logged distillation term and the rates its
optimizer saw. ``python tests/distill_ddp_script.py OUT_DIR``"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyModule, exit_distributed_script, random_loader  # noqa: E402

from lightning_prune import Distillation, LearningRateRewarm, Polynomial, PruningScheduleCallback  # noqa: E402


class Recorder(pl.Callback):
    def __init__(self, out: Path, distill: Distillation) -> None:
        self.out, self.distill, self.rates = out, distill, []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        trainer.optimizers[0].register_step_pre_hook(lambda opt, a, k: self.rates.append(opt.param_groups[0]["lr"]))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        teacher = self.distill.teacher
        assert teacher is not None
        result = {
            "teacher": {k: v.detach().clone() for k, v in teacher.state_dict().items()},
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "distill_loss": float(trainer.callback_metrics["pruning/distill_loss"]),
            "rates": self.rates,
            "world_size": trainer.world_size,
        }
        torch.save(result, self.out / f"rank{trainer.global_rank}.pt")


def main() -> pl.Trainer:
    out = Path(sys.argv[1])
    pl.seed_everything(0, verbose=False)
    pruning = PruningScheduleCallback(0.8, scope="global", schedule=Polynomial(1, 2, every_n_steps=2), verbose=False)
    distill = Distillation(module="model")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, limit_train_batches=4, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[pruning, distill, LearningRateRewarm(factor=2.0, decay_steps=2), Recorder(out, distill)],
    )  # fmt: skip
    trainer.fit(TinyModule(), random_loader())
    return trainer


if __name__ == "__main__":
    exit_distributed_script(main())
