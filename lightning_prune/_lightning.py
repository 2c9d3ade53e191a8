"""One callback base that both ``pytorch_lightning`` and ``lightning.pytorch`` accept.

The two packages ship separate but identical ``Callback`` classes, and each Trainer checks for its own.
Inheriting from both (where ``lightning`` is installed) makes one callback class work with either Trainer.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["CallbackBase", "rank_zero_info", "rank_zero_warn"]

_bases: list[type] = [pl.Callback]
try:  # the unified ``lightning`` package is optional
    import lightning.pytorch as _lp

    _bases.append(_lp.Callback)
except ImportError:  # pragma: no cover - depends on the environment
    pass

CallbackBase: type = type("CallbackBase", tuple(_bases), {"__module__": __name__})
