"""LeNet on MNIST through ``LightningCLI``: the whole run, pruning included, from a YAML file.

Run it from the repository root (needs the ``cli`` extra: ``pip install 'lightning-prune[cli]'``)::

    python examples/lenet_mnist_cli.py fit --config examples/configs/gradual.yaml --data.data_dir /path/to/data
    python examples/lenet_mnist_cli.py fit --config examples/configs/local.yaml --print_config

The model (``LitLeNet``) and the data (``MNISTDataModule``) are those of ``examples/mnist.py``. Every
argument of :class:`~lightning_prune.PruningScheduleCallback` sits under the ``pruning:`` key: ``sparsity``
(a number, or a mapping whose keys are module type names such as ``Conv2d`` or name patterns such as
``model.fc*``), ``method`` (a built-in name, or the import path of a ``BasePruningMethod`` subclass),
``parameters`` (names or patterns), ``schedule`` (``class_path`` / ``init_args``), and the rest.
``--pruning.sparsity 0`` trains a dense model.

The callback also works without this script's ``pruning:`` key, in any ``LightningCLI`` config, as a
``trainer.callbacks`` entry with ``class_path: lightning_prune.PruningScheduleCallback``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples.*` importable from any directory

from examples.mnist import LitLeNet, MNISTDataModule  # noqa: E402
from lightning_prune import PruningScheduleCallback  # noqa: E402

__all__ = ["LeNetCLI", "main"]


class LeNetCLI(LightningCLI):
    """``LightningCLI`` for :class:`LitLeNet` on :class:`MNISTDataModule`, with the callback's arguments under
    ``pruning:`` (the callback is always added; ``sparsity: 0`` prunes nothing)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PruningScheduleCallback, "pruning")
        parser.set_defaults({"trainer.max_epochs": 10, "trainer.deterministic": True})


def main(args: list[str] | None = None, run: bool = True) -> LeNetCLI:
    """Build (and with ``run``, execute) the CLI; ``args`` default to ``sys.argv[1:]``."""
    return LeNetCLI(
        LitLeNet,
        MNISTDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
