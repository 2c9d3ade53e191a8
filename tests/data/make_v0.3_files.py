"""Written with lightning_prune 0.3.0 (commit ce7aac8): files the 0.4 code must keep reading."""
import sys, warnings
import torch, pytorch_lightning as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning_prune
from lightning_prune import PruningScheduleCallback, save_sparse, SparseCheckpointIO, AtEpochs
assert lightning_prune.__version__ == "0.3.0", lightning_prune.__file__
warnings.filterwarnings("ignore")
out = sys.argv[1]

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)), batch_size=8)
for scope in ("local", "global"):
    torch.manual_seed(0)
    net = Net()
    cb = PruningScheduleCallback(schedule=AtEpochs({0: 0.5, 2: 0.75}), scope=scope, make_permanent=False, verbose=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], plugins=[SparseCheckpointIO()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(net, data)
    trainer.save_checkpoint(f"{out}/callback_{scope}_v0.3.ckpt")
save_sparse(net.model, f"{out}/model_v0.3.safetensors")
torch.save(net.model.state_dict(), f"{out}/model_v0.3_dense.pt")
print("written")
