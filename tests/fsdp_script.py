"""Worker for test_fsdp.py: fits a small MLP under FSDP2 (Lightning's ``ModelParallelStrategy``, 2 CPU
processes over gloo), or in one process for reference.

``python tests/fsdp_script.py CASE OUT_DIR [--devices N] [--epochs E] [--ckpt PATH] [--distributed-ckpt 0/1]``
writes ``OUT_DIR/<CASE>_rank<r>.pt`` with the whole masks (``callback.masks.state_dict()``), the whole weights
(``DTensor.full_tensor()``), the logged ``pruning/*`` metrics and, for the refusal cases, the error message.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent.parent))
from lightning_prune import NeuronPruning, OneShot, Polynomial, PruningScheduleCallback, Rewind  # noqa: E402
from lightning_prune.store import MaskStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from helpers import exit_distributed_script  # noqa: E402

warnings.filterwarnings("ignore")


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 7), nn.ReLU(), nn.Linear(7, 3))


class Experts(nn.Module):
    """A fused Mixture-of-Experts tensor as transformers 5 stores it (``num_experts``, ``is_transposed``): each
    token goes through every expert (the mean), which is all pruning needs."""

    def __init__(self, experts: int, n_in: int, n_out: int) -> None:
        super().__init__()
        self.num_experts, self.is_transposed = experts, False
        self.proj = nn.Parameter(torch.randn(experts, n_out, n_in) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ni,eoi->no", x, self.proj) / self.num_experts


def moe_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), Experts(4, 12, 10), nn.ReLU(), nn.Linear(10, 3))


class MLP(pl.LightningModule):
    def __init__(self, experts: bool = False) -> None:
        super().__init__()
        self.model = moe_mlp() if experts else mlp()

    def configure_model(self) -> None:
        if self.device_mesh is None:  # one process: nothing to shard
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model:
            if isinstance(layer, (nn.Linear, Experts)):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


CASES: dict[str, dict[str, Any]] = {
    "global-oneshot": {"sparsity": 0.6, "scope": "global"},
    "local-oneshot": {"sparsity": 0.5},
    "random-oneshot": {"sparsity": 0.5, "method": "random_unstructured", "scope": "global"},
    "importance-oneshot": {"sparsity": 0.5, "importance": torch.square},
    "global-ramp": {"sparsity": 0.8, "scope": "global", "schedule": Polynomial(0, 3, every_n_steps=2)},
    "neurons": {"sparsity": 0.5, "method": NeuronPruning(example_inputs=torch.randn(1, 16))},
    "hook": {"sparsity": 0.5, "mask_mode": "hook"},
    "rewind": {"sparsity": 0.5, "rewind": Rewind()},
    "experts-local": {"sparsity": 0.5},  # each expert's matrix to 0.5, the experts sharded across processes
    "experts-random": {"sparsity": 0.5, "method": "random_unstructured"},
}


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def main() -> pl.Trainer:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES) + ["tensor-parallel"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--distributed-ckpt", type=int, default=1)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    module = MLP(experts=args.case.startswith("experts"))
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 3, (64,), generator=g)), 8)
    kwargs = dict(CASES.get(args.case, {"sparsity": 0.5}))
    kwargs.setdefault("schedule", OneShot(0))
    callback = PruningScheduleCallback(verbose=False, make_permanent=False, **kwargs)
    checkpoint = ModelCheckpoint(dirpath=args.out / f"ckpt{args.tag}", save_last=True)
    if args.devices > 1:
        tp = 2 if args.case == "tensor-parallel" else 1
        strategy: Any = ModelParallelStrategy(
            data_parallel_size=args.devices // tp,
            tensor_parallel_size=tp,
            save_distributed_checkpoint=bool(args.distributed_ckpt),
        )
    else:
        strategy = "auto"
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        callbacks=[callback, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    before = {n: whole(p) for n, p in module.named_parameters()}
    result: dict[str, Any] = {"error": None}
    try:
        trainer.fit(module, data, ckpt_path=args.ckpt)
    except ValueError as err:
        result["error"] = str(err)
        result["untouched"] = all(torch.equal(before[n], whole(p)) for n, p in module.named_parameters())
    else:
        result["masks"] = MaskStore.unpack(callback.masks.state_dict())
        result["weights"] = {n: whole(p) for n, p in module.named_parameters()}
        result["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("pruning")}
        result["steps"] = callback._steps
    torch.save(result, args.out / f"{args.case}{args.tag}_rank{trainer.global_rank}.pt")
    return trainer


if __name__ == "__main__":
    exit_distributed_script(main())
