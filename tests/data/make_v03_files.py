"""Written with lightning_prune 0.3.0 (commit ce7aac8): files this version must keep reading (tests/test_compat.py).

``git worktree add /tmp/v03 ce7aac8 && PYTHONPATH=/tmp/v03 python tests/data/make_v03_files.py tests/data``
"""

import sys
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, i):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: str) -> None:
    import lightning_prune
    from lightning_prune import AtEpochs, PruningScheduleCallback, SparseCheckpointIO, save_sparse

    assert lightning_prune.__version__ == "0.3.0", lightning_prune.__file__
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    for scope in ("local", "global"):
        torch.manual_seed(0)
        net = Net()
        schedule = AtEpochs({0: 0.5, 2: 0.75})
        cb = PruningScheduleCallback(schedule=schedule, scope=scope, make_permanent=False, verbose=False)
        trainer = pl.Trainer(
            max_epochs=1, callbacks=[cb], plugins=[SparseCheckpointIO()], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(net, DataLoader(TensorDataset(x, y), batch_size=8))
        trainer.save_checkpoint(f"{out}/callback_{scope}_v0.3.ckpt")
    save_sparse(net.model, f"{out}/model_v0.3.safetensors")
    torch.save(net.model.state_dict(), f"{out}/model_v0.3_dense.pt")


if __name__ == "__main__":
    main(sys.argv[1])
