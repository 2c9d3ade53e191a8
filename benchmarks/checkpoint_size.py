"""Checkpoint file sizes of a pruned run against the dense model's, by how the masks are kept.

One short fit (random data, ``--steps`` SGD steps with momentum) of an MLP (784-2048-2048-10, 5.8 M weights) per
row, each saving a Lightning checkpoint at the end (model, optimizer state with momentum, loops, callbacks):

Each checkpoint is the one ``ModelCheckpoint`` writes at the last training step (once training ends, the callback
drops the masks by default, and the model keeps only its zeros).

* ``dense``: no pruning;
* ``inplace`` (the default): ``PruningScheduleCallback(--sparsity, scope="global")``: plain weights with zeros in
  the ``state_dict``, ``uint8`` masks bit-packed in the callback's state;
* ``hook``: the same with ``mask_mode="hook"``: its checkpoints are converted to the model's own keys too;
* ``0.1 format``: what version 0.1 wrote: torch's ``weight_orig`` + float32 ``weight_mask`` in the
  ``state_dict`` (the ``inplace`` run's checkpoint rewritten in that form).

Also the model's ``state_dict`` alone (``torch.save``), dense and pruned: zeros do not make a dense file smaller
(see ``lightning_prune.save_sparse`` for files that are).

Usage (from the repository root)::

    python benchmarks/checkpoint_size.py
    python benchmarks/checkpoint_size.py --steps 2 --width 64
    python benchmarks/checkpoint_size.py --smoke        # every row on a tiny MLP (width 64, 2 steps)

It prints the table; the checkpoints are written in a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from lightning_prune import PruningScheduleCallback  # noqa: E402
from lightning_prune.store import MaskStore  # noqa: E402


class MLP(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def fit_and_save(args: argparse.Namespace, out: Path, mask_mode: str | None) -> Path:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)), 8
    )
    name = mask_mode or "dense"
    # written during training, at the last step (after it, the callback drops the masks: make_permanent=True)
    callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=out / name, every_n_train_steps=args.steps)]
    if mask_mode is not None:
        callbacks.append(PruningScheduleCallback(args.sparsity, scope="global", mask_mode=mask_mode, verbose=False))
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MLP(args.width), data)
    [path] = (out / name).glob("*.ckpt")
    return path


def as_version_01(path: Path, out: Path) -> Path:
    """The checkpoint in version 0.1's form: ``weight_orig`` and a float32 ``weight_mask`` per pruned tensor."""
    state = torch.load(path, weights_only=False)
    masks = {}
    for entry in state["callbacks"].values():
        masks.update(MaskStore.unpack(entry.get("masks") or {}))
        entry.pop("masks", None)
    old = {}
    for key, value in state["state_dict"].items():
        if key in masks:
            old[key + "_orig"] = value
            old[key + "_mask"] = masks[key].to(value.dtype)
        else:
            old[key] = value
    state["state_dict"] = old
    target = out / "v01.ckpt"
    torch.save(state, target)
    return target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="every row on a tiny budget: width 64, 2 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.width, args.steps = 64, 2
    warnings.filterwarnings("ignore")
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = {
            name: fit_and_save(args, out, mode)
            for name, mode in (("dense", None), ("inplace", "inplace"), ("hook", "hook"))
        }
        files["0.1 format"] = as_version_01(files["inplace"], out)
        for name in ("dense", "inplace"):
            sd = torch.load(files[name], weights_only=False)["state_dict"]
            torch.save(sd, out / f"{name}_state_dict.pt")
        dense = files["dense"].stat().st_size
        weights = sum(v.numel() for k, v in torch.load(files["dense"], weights_only=False)["state_dict"].items())
        print(
            f"\nMLP 784-{args.width}-{args.width}-10 ({weights / 1e6:.1f} M parameters), global L1 to {args.sparsity}, "
            f"{args.steps} SGD steps with momentum; Lightning checkpoint of the whole run\n"
        )
        print("| checkpoint | bytes | ratio to dense |")
        print("|---|---:|---:|")
        for name, path in files.items():
            size = path.stat().st_size
            print(f"| {name} | {size:,} | {size / dense:.3f} |")
        sd_dense = (out / "dense_state_dict.pt").stat().st_size
        sd_ours = (out / "inplace_state_dict.pt").stat().st_size
        print(f"| `torch.save(state_dict)`, dense | {sd_dense:,} | |")
        print(f"| `torch.save(state_dict)`, pruned | {sd_ours:,} | {sd_ours / sd_dense:.3f} of the dense state_dict |")


if __name__ == "__main__":
    main()
