"""Files written by version 0.3 (``tests/data/*_v0.3.*``, made by ``tests/data/make_v03_files.py`` at commit
ce7aac8) read by this version: Lightning checkpoints written through ``SparseCheckpointIO`` (the pickled name
``lightning_prune.sparse_checkpoint._rebuild_from_bitmask_v1``) whose callback state resumes the schedule where it
stopped, local and global, and sparse safetensors files."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import expected_zeros
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import AtEpochs, PruningScheduleCallback, SparseCheckpointIO, load_sparse

DATA = Path(__file__).parent / "data"


class Net(pl.LightningModule):
    """The module of make_v03_files.py."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)), 8)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_a_checkpoint_of_version_0_3_resumes_its_schedule(scope: str, tmp_path: Path) -> None:
    path = DATA / f"callback_{scope}_v0.3.ckpt"
    saved = torch.load(path, weights_only=True)  # the sparse tensors unpickle through the permanent alias
    weights = {k.removeprefix("model."): v for k, v in saved["state_dict"].items()}
    pruned_then = {k: v == 0 for k, v in weights.items() if k.endswith("weight")}
    if scope == "local":  # 0.3 stopped after epoch 0: each tensor at 0.5, or all together
        assert all(int(m.sum()) == expected_zeros(0.5, m.numel()) for m in pruned_then.values())
    else:
        assert sum(int(m.sum()) for m in pruned_then.values()) == expected_zeros(0.5, 8 * 16 + 16 * 3)

    net = Net()
    callback = PruningScheduleCallback(
        schedule=AtEpochs({0: 0.5, 2: 0.75}), scope=scope, make_permanent=False, verbose=False
    )
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[callback], plugins=[SparseCheckpointIO()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, _data(), ckpt_path=str(path))
    params = dict(net.model.named_parameters())
    for name, was_pruned in pruned_then.items():  # what 0.3 pruned stays pruned
        assert bool((params[name][was_pruned] == 0).all()), name
    sizes = {n: p.numel() for n, p in params.items() if n.endswith("weight")}
    zeros = {n: int((params[n] == 0).sum()) for n in sizes}
    if scope == "local":  # epoch 2 took each tensor from 0.5 to 0.75, as an uninterrupted run would
        assert zeros == {n: expected_zeros(0.75, k) for n, k in sizes.items()}
    else:
        assert sum(zeros.values()) == expected_zeros(0.75, sum(sizes.values()))
    assert callback.last_report is not None and callback.last_report.sparsity == pytest.approx(0.75, abs=1e-3)


def test_a_sparse_file_of_version_0_3_loads_exactly() -> None:
    loaded = load_sparse(DATA / "model_v0.3.safetensors")
    dense = torch.load(DATA / "model_v0.3_dense.pt", weights_only=True)
    assert loaded.keys() == dense.keys()
    for key, value in dense.items():
        assert torch.equal(loaded[key], value), key
