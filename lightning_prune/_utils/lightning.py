"""The one Lightning package the package imports: ``pytorch_lightning``, or ``lightning.pytorch`` where only the
unified ``lightning`` package is installed.

A ``Trainer`` of either package calls a callback's hooks by name, so the callback (a subclass of this package's
``Callback``) works with both, given in a list (``Trainer(callbacks=[callback])``). Checkpoint-IO plugins are
checked by type: :func:`register_checkpoint_io` makes a plugin class an (abstract) subclass of the other package's
``CheckpointIO`` as well, importing it only then.
"""

from __future__ import annotations

from typing import Any

try:  # pytorch_lightning first: a dependency of this package
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.io import TorchCheckpointIO
    from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
except ImportError:  # pragma: no cover - only the unified package is installed
    import lightning.pytorch as pl  # type: ignore[no-redef]
    from lightning.pytorch.plugins.io import TorchCheckpointIO  # type: ignore[assignment]
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["CallbackBase", "TorchCheckpointIOBase", "register_checkpoint_io", "rank_zero_info", "rank_zero_warn"]

CallbackBase: Any = pl.Callback
TorchCheckpointIOBase: Any = TorchCheckpointIO


def register_checkpoint_io(cls: type) -> None:
    """Make ``cls`` count as a ``CheckpointIO`` of both ``lightning_fabric`` and ``lightning.fabric`` (each an
    abstract base class), for the Trainer of either package; a package that is not installed is skipped."""
    for module in ("lightning_fabric.plugins.io", "lightning.fabric.plugins.io"):
        try:
            base = __import__(module, fromlist=["CheckpointIO"]).CheckpointIO
        except ImportError:  # pragma: no cover - depends on the environment
            continue
        if not issubclass(cls, base):
            base.register(cls)
