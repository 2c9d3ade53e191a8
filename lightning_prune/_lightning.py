"""One callback base and one checkpoint-IO base that both ``pytorch_lightning`` and ``lightning.pytorch`` accept.

The two packages ship separate but identical ``Callback`` classes, and each Trainer checks for its own.
Inheriting from both (where ``lightning`` is installed) makes one callback class work with either Trainer.
The same holds for ``TorchCheckpointIO``: ``pytorch_lightning``'s is ``lightning_fabric``'s, and the
``lightning.pytorch`` Trainer checks ``isinstance(plugin, lightning.fabric.plugins.io.CheckpointIO)``.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["CallbackBase", "TorchCheckpointIOBase", "rank_zero_info", "rank_zero_warn"]

_bases: list[type] = [pl.Callback]
_io_bases: list[type] = [TorchCheckpointIO]
try:  # the unified ``lightning`` package is optional
    import lightning.pytorch as _lp
    from lightning.fabric.plugins.io import TorchCheckpointIO as _LightningTorchCheckpointIO

    _bases.append(_lp.Callback)
    _io_bases.append(_LightningTorchCheckpointIO)
except ImportError:  # pragma: no cover - depends on the environment
    pass

CallbackBase: type = type("CallbackBase", tuple(_bases), {"__module__": __name__})
TorchCheckpointIOBase: type = type("TorchCheckpointIOBase", tuple(_io_bases), {"__module__": __name__})
