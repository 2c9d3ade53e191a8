"""Custom pruning methods that YAML configs can name by import path (``examples.custom_methods.EveryOther``).

A custom method is any ``torch.nn.utils.prune.BasePruningMethod`` subclass; the callback takes the class
itself (Python) or its import path (YAML, through LightningCLI), and its constructor's other arguments come
from ``method_kwargs``.

Example::

    >>> import torch
    >>> EveryOther().compute_mask(torch.ones(6), torch.ones(6))
    tensor([0., 1., 0., 1., 0., 1.])
    >>> EveryOther(offset=1).compute_mask(torch.ones(6), torch.ones(6))
    tensor([1., 0., 1., 0., 1., 0.])
"""

from __future__ import annotations

import torch.nn.utils.prune as prune
from torch import Tensor

__all__ = ["EveryOther"]


class EveryOther(prune.BasePruningMethod):
    """Prune every other entry of the flattened tensor (the ``torch.nn.utils.prune`` tutorial's method).

    Its constructor takes no ``amount``, so the callback applies it as it is at each scheduled step (leave
    ``sparsity`` out).

    Args:
        offset: the first entry pruned, 0 or 1.

    Raises:
        ValueError: if ``offset`` is not 0 or 1.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, offset: int = 0) -> None:
        if offset not in (0, 1) or isinstance(offset, bool):
            raise ValueError(f"`offset` must be 0 or 1, got {offset!r}.")
        self.offset = offset

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        mask = default_mask.clone()
        mask.view(-1)[self.offset :: 2] = 0
        return mask
