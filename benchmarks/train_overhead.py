"""Cost of training with masks in place: one optimizer step, masked versus dense, side by side.

Models: the LeNet of ``examples/mnist.py``, a larger MLP (784-2048-2048-10, 5.8 M weights) and a
transformer encoder (the 28 rows of an image as 28 tokens, width 256, 4 layers of 4 heads, 3.2 M weights;
every Linear and attention ``out_proj`` pruned), on a fixed random batch of ``--batch`` MNIST-shaped images
(the data do not change the arithmetic). An
optimizer step is forward, cross-entropy, backward, ``SGD(momentum=0.9).step()`` and ``zero_grad()``.

Variants, each on its own copy of the same initial model:

* ``dense``: no pruning;
* ``hook``: pruned to ``--sparsity`` (global L1, ``lightning_prune``), the masks then put on the model in
  torch's reparametrization (``weight_orig`` + ``weight_mask`` + a forward pre-hook that computes
  ``weight = weight_orig * mask`` at every forward, and the matching multiplication in backward) -- the
  callback's ``mask_mode="hook"``;
* ``inplace``: the same masks with plain parameters (the callback's default ``mask_mode="inplace"``): a
  :class:`lightning_prune.store.MaskStore` (``uint8`` masks) attached to the optimizer, the object the
  callback uses; gradients of pruned entries are zeroed before the optimizer step
  (``store.mask_grads(optimizer)``, as the callback's ``on_before_optimizer_step`` does), which keeps
  them at zero through SGD's step. The encoder has no ``hook`` row: torch's reparametrization cannot mask
  attention's ``out_proj`` (the callback refuses that combination).

Timing: ``--rounds`` rounds; in each, every variant runs ``--steps`` steps in turn (so that load from other
processes hits all alike) after ``--warmup`` untimed steps in the first round; the table shows the median
step time over all timed steps and its ratio to ``dense``. ``--threads`` CPU threads.

Checks: after training, ``hook`` and ``inplace`` hold the same weights in use (the two modes train the same
model) and every pruned entry is zero in both; a failed check makes the script exit with status 1.

Usage (from the repository root)::

    python benchmarks/train_overhead.py
    python benchmarks/train_overhead.py --models lenet --rounds 3 --steps 10
    python benchmarks/train_overhead.py --smoke        # every model and mask mode, batch 8, one timed step each

The script prints its table and writes no file.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from lightning_prune import Global, prune_step, reparam  # noqa: E402
from lightning_prune.selection import select_parameters  # noqa: E402
from lightning_prune.store import MaskStore  # noqa: E402

VARIANTS = ("dense", "hook", "inplace")


class Encoder(nn.Module):
    """A transformer encoder on MNIST-shaped images: the 28 rows are 28 tokens of 28 features."""

    def __init__(self, width: int = 256, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(28, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.flatten(1, 2))).mean(dim=1))


def build_model(name: str) -> nn.Module:
    if name == "lenet":
        from examples.mnist import LeNet

        return LeNet()
    if name == "encoder":
        return Encoder()
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )


def variants_of(name: str) -> tuple[str, ...]:
    """torch's reparametrization cannot mask attention's out_proj (the callback refuses it): no hook row."""
    return ("dense", "inplace") if name == "encoder" else VARIANTS


class Variant:
    """One model copy with its optimizer and the per-step work of its mask mode."""

    def __init__(self, kind: str, model: nn.Module, sparsity: float, lr: float) -> None:
        self.kind = kind
        self.model = model
        self.store = MaskStore()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        if kind != "dense":
            targets = select_parameters(model)
            prune_step("l1_unstructured", targets, Global(sparsity), self.store)
            if kind == "hook":
                reparam.install(self.store.items())
            else:
                self.store.attach([self.optimizer])

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.kind == "inplace":
            self.store.mask_grads(self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(fn: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def effective_weights(model: nn.Module) -> list[torch.Tensor]:
    with reparam.plain(model):  # the weights the model computes with, in `hook` mode too
        return [t.tensor.detach().clone() for t in select_parameters(model)]


def run_model(name: str, args: argparse.Namespace) -> tuple[dict[str, list[float]], bool]:
    torch.manual_seed(args.seed)
    base = build_model(name)
    kinds = variants_of(name)
    variants = {kind: Variant(kind, copy.deepcopy(base), args.sparsity, args.lr) for kind in kinds}
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for kind in kinds:
        timed(lambda v=variants[kind]: v.step(x, y), args.warmup)
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else tuple(reversed(kinds)):
            times[kind] += timed(lambda v=variants[kind]: v.step(x, y), args.steps)
    inplace = effective_weights(variants["inplace"].model)
    masks = [m for _, m in variants["inplace"].store.items()]
    checked = [inplace]
    same = True
    if "hook" in variants:  # the two masked modes train the same model: same weights after the same steps
        hook = effective_weights(variants["hook"].model)
        same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(hook, inplace))
        checked.append(hook)
        print(f"{name}: hook and inplace effective weights equal after training: {same}")
    zeros = all(bool((w[m == 0] == 0).all()) for ws in checked for w, m in zip(ws, masks))
    print(f"{name}: pruned entries zero after every step: {zeros}")
    return times, same and zeros


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", nargs="+", choices=["lenet", "mlp", "encoder"], default=["lenet", "mlp", "encoder"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="every model and mask mode: batch 8, 1 round of 1 step")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.rounds, args.steps, args.warmup = ["lenet", "mlp", "encoder"], 8, 1, 1, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    rows = []
    checks_ok = True
    for name in args.models:
        times, ok = run_model(name, args)
        checks_ok &= ok
        med = {kind: statistics.median(v) for kind, v in times.items()}
        for kind in variants_of(name):
            rows.append((name, kind, med[kind], med[kind] / med["dense"], len(times[kind])))
    print(
        f"\nOptimizer step (SGD, momentum 0.9), batch {args.batch}, sparsity {args.sparsity}; median of "
        f"{args.rounds} x {args.steps} interleaved steps\n"
    )
    print("| model | mask mode | median step | ratio to dense |")
    print("|---|---|---:|---:|")
    for name, kind, t, ratio, _ in rows:
        print(f"| {name} | {kind} | {t * 1e3:.2f} ms | {ratio:.3f} |")
    print(f"\nall checks passed: {checks_ok}")
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
