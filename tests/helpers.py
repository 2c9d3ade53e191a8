"""Shared test helpers: a tiny LeNet-shaped LightningModule on random data, a tiny Trainer, and oracles that
compute expected counts and masks independently of the package (exact rational arithmetic, sorting)."""

from __future__ import annotations

import fnmatch
import math
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import prune_step
from lightning_prune.methods import resolve_method
from lightning_prune.step import due_for


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.fc1 = nn.Linear(8 * 2 * 2, 24)
        self.fc2 = nn.Linear(24, 16)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _TinyModuleMixin:
    """The LightningModule body, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` variants."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, batch_size=len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr / 10)
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr / 10, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-3)


class TinyModule(_TinyModuleMixin, pl.LightningModule):
    pass


try:
    import lightning.pytorch as _lp

    class LightningTinyModule(_TinyModuleMixin, _lp.LightningModule):
        """``TinyModule`` on the unified ``lightning`` package."""

except ImportError:  # pragma: no cover
    LightningTinyModule = None


def ramp(epoch: int) -> float:
    """A plain-function schedule (module level: a stable import path, the same in every process)."""
    return min(0.6, 0.2 * epoch)


def zeros(t: torch.Tensor) -> int:
    return int((t.detach() == 0).sum())


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's ``weight`` parameters by name."""
    return {n: p for n, p in module.named_parameters() if n.endswith("weight")}


def random_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 10, 10, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def expected_zeros(sparsity: float, n: int) -> int:
    """The oracle for exact counts: ``round(sparsity * n)``, half up, in exact rational arithmetic, at most ``n``."""
    return min(n, math.floor(Fraction(sparsity) * n + Fraction(1, 2)))


def smallest_reference(
    scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], k: int
) -> list[torch.Tensor]:
    """A sorting reference for exact selection: prune the ``k`` smallest live scores (compared in float32,
    ``-0.0 == +0.0``), ties broken in tensor order, then flat index. Returns float32 masks (1 = kept)."""
    items = []
    for ti, (s, m) in enumerate(zip(scores, masks)):
        flat = s.to(torch.float32).reshape(-1).tolist()
        alive = [True] * len(flat) if m is None else (m.reshape(-1) != 0).tolist()
        items += [(v + 0.0, ti, j) for j, v in enumerate(flat) if alive[j]]
    items.sort()
    out = [
        (torch.ones(s.shape) if m is None else m.to(torch.float32).clone()).reshape(-1) for s, m in zip(scores, masks)
    ]
    for _, ti, j in items[:k]:
        out[ti][j] = 0.0
    return [o.reshape(s.shape) for o, s in zip(out, scores)]


def l1_reference(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], sparsity: float, scope: str
) -> list[torch.Tensor]:
    """What exact L1 pruning to the cumulative ``sparsity`` gives, from sorting: each tensor (``"local"``) or all
    together (``"global"``) pruned to ``expected_zeros`` by the smallest live magnitudes."""
    if scope == "global":
        pruned = sum(0 if m is None else int((m == 0).sum()) for m in masks)
        k = expected_zeros(sparsity, sum(w.numel() for w in weights)) - pruned
        return smallest_reference([w.abs() for w in weights], masks, max(k, 0))
    out = []
    for w, m in zip(weights, masks):
        k = expected_zeros(sparsity, w.numel()) - (0 if m is None else int((m == 0).sum()))
        out += smallest_reference([w.abs()], [m], max(k, 0))
    return out


def decide_and_apply(method: Any, targets: Sequence[Any], sparsity: float, scope: str, seed: int, store: Any) -> Any:
    """One pruning step as the callback takes it (``lightning_prune.prune_step``): every target to ``sparsity``,
    each alone or all together. Returns the store."""
    prune_step(method, targets, due_for(resolve_method(method), targets, sparsity, scope), store, seed=seed)
    return store


def trainable(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter an optimizer updates: ``<name>_orig`` under torch's pruning, else the parameter itself."""
    orig = module._parameters.get(name + "_orig")
    return orig if orig is not None else module._parameters[name]


def weight_in_use(module: nn.Module, name: str) -> torch.Tensor:
    """The weights a module computes with: ``<name>_orig * <name>_mask`` under torch's pruning (never its cached,
    possibly stale attribute), else the parameter itself."""
    if hasattr(module, name + "_mask") and hasattr(module, name + "_orig"):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name)


@dataclass(frozen=True)
class Counted:
    """Zeros counted here, in the test, for one tensor."""

    name: str
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


@dataclass(frozen=True)
class Counts:
    """Zeros counted here, in the test (``int((w == 0).sum())``), not by the package's own counting."""

    tensors: tuple[Counted, ...]

    @property
    def zeros(self) -> int:
        return sum(t.zeros for t in self.tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel

    def per_tensor(self) -> dict[str, float]:
        return {t.name: t.sparsity for t in self.tensors}

    def of(self, name: str) -> int:
        return next(t.zeros for t in self.tensors if t.name == name)


def tensors_of(module: nn.Module, parameters: Any = None) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, owner, name)`` of the chosen tensors, found here (not by the package's selection): every
    Conv/Linear weight, or the names and glob patterns given; in torch's pruning form too (``weight_orig``)."""
    found = []
    for module_name, owner in module.named_modules():
        for pname in list(owner._parameters):
            name = pname[: -len("_orig")] if pname.endswith("_orig") and hasattr(owner, pname[:-5] + "_mask") else pname
            qual = f"{module_name}.{name}" if module_name else name
            if parameters is None:
                chosen = name == "weight" and isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd))
            else:
                chosen = any(fnmatch.fnmatchcase(qual, p) for p in parameters)
            if chosen:
                found.append((qual, owner, name))
    return found


def zero_counts(module: nn.Module, parameters: Any = None) -> Counts:
    """Count the zeros of the chosen tensors (default: every Conv/Linear weight) in the weights in use."""
    with torch.no_grad():
        rows = []
        for name, owner, pname in tensors_of(module, parameters):
            w = weight_in_use(owner, pname)
            rows.append(Counted(name, w.numel(), int((w == 0).sum())))
    return Counts(tuple(rows))


def zero_sets(module: nn.Module, parameters: Any = None) -> dict[str, torch.Tensor]:
    """``{name: weights in use == 0}`` (copies) of the chosen tensors."""
    with torch.no_grad():
        return {name: (weight_in_use(owner, p) == 0).cpu().clone() for name, owner, p in tensors_of(module, parameters)}


def kept_masks(callback: Any) -> dict[str, torch.Tensor]:
    """Copies of the masks a pruning callback keeps (``callback.masks``), by tensor name."""
    return {t.name: mask.detach().cpu().clone() for t, mask in callback.masks.items()}


def unpack_mask(entry: dict[str, Any]) -> torch.Tensor:
    """A bit-packed mask of a checkpoint (``{"shape", "bits"}``) unpacked here, with numpy (MSB first)."""
    shape = tuple(entry["shape"])
    bits = np.unpackbits(entry["bits"].numpy())[: math.prod(shape)]
    return torch.from_numpy(bits.copy()).reshape(shape)


class SparsityRecorder(pl.Callback):
    """Records the zeros (counted in the test) right after the pruning callback ran, at every epoch and batch
    start."""

    def __init__(self, parameters: Any = None) -> None:
        self.parameters = parameters
        self.at_epoch: dict[int, Counts] = {}
        self.at_step: dict[int, Counts] = {}

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.at_epoch[trainer.current_epoch] = zero_counts(pl_module, self.parameters)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.at_step[trainer.global_step] = zero_counts(pl_module, self.parameters)


def make_trainer(
    callbacks: list, max_epochs: int = 3, trainer_cls: type = pl.Trainer, accelerator: str = "cpu", **kwargs: Any
) -> pl.Trainer:
    kwargs.setdefault("limit_train_batches", 4)
    kwargs.setdefault("limit_val_batches", 1)
    kwargs.setdefault("logger", False)
    return trainer_cls(
        max_epochs=max_epochs,
        callbacks=callbacks,
        accelerator=accelerator,
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        num_sanity_val_steps=0,
        **kwargs,
    )


def fit(callback: Any, max_epochs: int = 3, module: pl.LightningModule | None = None, **kwargs: Any):
    """Train ``TinyModule`` with ``callback`` (and a recorder after it); return (module, recorder, trainer)."""
    pl.seed_everything(0, verbose=False)
    module = module or TinyModule()
    recorder = SparsityRecorder()
    trainer = make_trainer([callback, recorder], max_epochs=max_epochs, **kwargs)
    trainer.fit(module, random_loader(), random_loader(16))
    return module, recorder, trainer


class MaskRecorder(pl.Callback):
    """Records ``{global_step: {name: weights in use == 0}}`` (copies) at every epoch and batch start (issue 4)."""

    def __init__(self, parameters: Any = None) -> None:
        self.parameters = parameters
        self.zeros: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.zeros[trainer.global_step] = zero_sets(pl_module, self.parameters)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.zeros[trainer.global_step] = zero_sets(pl_module, self.parameters)


def write_tiny_mnist(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """Write MNIST-format IDX files (torchvision's layout: ``root/MNIST/raw/``) with learnable digits: each class
    lights a different 4-row band of the 28x28 image, plus noise. Returns ``root`` (issue 7)."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=generator, dtype=torch.uint8)
        images = torch.randint(0, 60, (n, 28, 28), generator=generator, dtype=torch.uint8)
        for i, label in enumerate(labels.tolist()):
            images[i, 2 * label + 4 : 2 * label + 8, 4:24] = 255
        header = struct.pack(">IIII", 2051, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.numpy().tobytes())
    return root


def exit_distributed_script(*trainers: pl.Trainer) -> None:
    """Leave a distributed test script without the interpreter's teardown, which gloo's threads can abort
    ("terminate called without an active exception", exit -6) after every result is written. The launching process
    first waits for the rank processes its trainers started, and fails if one of them failed."""
    launched = [p for t in trainers for p in getattr(t.strategy.launcher, "procs", [])]
    children = [p for p in launched if isinstance(p, subprocess.Popen)]  # spawned ranks are joined by Lightning
    failed = any(child.wait() != 0 for child in children)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)


def run_ddp_script(script: Path, out: Path, timeout_s: int) -> None:
    """Run ``python script ddp out`` (a test module that starts 2 gloo processes itself) with a hard timeout, the
    tests folder and the checkout on the path; fail the test with the end of its output if it breaks."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, str(script), "ddp", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the DDP run did not finish in {timeout_s}s:\n{output.decode()[-3000:]}") from None
    assert process.returncode == 0, output.decode()[-3000:]
