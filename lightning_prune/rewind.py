"""Lottery-ticket rewinding: after each pruning step, surviving weights go back to saved values.

Frankle & Carbin (2019) reset the weights that survive pruning to their initial values; Frankle et al.
(2020, "late rewinding") reset them to their values after a few epochs or steps of training instead.
:class:`Rewind` says when the values are saved; :func:`capture` takes true copies of them (never views
of the live tensors, which training would change under them); :func:`rewind` writes them back into the
pruned tensors and drops the optimizer's state for those tensors (momentum, Adam moments, step count), so
that training after each rewind starts as it did from the saved point.

Only the pruned tensors (the callback's ``parameters``) are rewound; biases and other tensors that are
not pruned keep their trained values. Pruned entries stay zero: the rewound values are multiplied by the
masks kept in the given :class:`~lightning_prune.store.MaskStore`.

Example::

    >>> import torch, torch.nn as nn
    >>> from lightning_prune.selection import select_parameters
    >>> net = nn.Linear(3, 2)
    >>> targets = select_parameters(net)
    >>> saved = capture(targets)
    >>> with torch.no_grad():
    ...     _ = net.weight.add_(1.0)
    >>> rewind(targets, saved)
    ['weight']
    >>> torch.equal(net.weight, saved["weight"])
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_prune._utils.checks import check_int
from lightning_prune.selection import PruningTarget
from lightning_prune.store import MaskStore, apply_mask_

__all__ = ["Rewind", "as_rewind", "capture", "rewind"]


def _check_count(name: str, value: object) -> int | None:
    return None if value is None else check_int(f"Rewind({name}=...)", value, minimum=0)


@dataclass(frozen=True)
class Rewind:
    """The point whose weights the survivors are reset to after each pruning step.

    ``Rewind()`` (or ``rewind="init"`` on the callback) is initialisation, before the first training
    batch. ``Rewind(epoch=e)``: the weights at the start of epoch ``e``, after ``e`` epochs of training
    and before that epoch's pruning step. ``Rewind(step=s)``: the weights after ``s`` optimizer steps.
    A pruning step that comes before the point is not followed by a rewind (a warning says so).

    Args:
        epoch: the epoch, or ``None``.
        step: the optimizer step (``trainer.global_step``), or ``None``. Give at most one of the two.

    Raises:
        ValueError: for a negative or non-integer value, or both given.

    Example::

        >>> Rewind(), Rewind(epoch=2).reached(epoch=2, step=40, epoch_start=True)
        (Rewind(epoch=0, step=None), True)
    """

    epoch: int | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "epoch", _check_count("epoch", self.epoch))
        object.__setattr__(self, "step", _check_count("step", self.step))
        if self.epoch is not None and self.step is not None:
            raise ValueError(f"`Rewind` takes one of `epoch` or `step`, got epoch={self.epoch}, step={self.step}.")
        if self.epoch is None and self.step is None:
            object.__setattr__(self, "epoch", 0)

    def reached(self, epoch: int, step: int, epoch_start: bool) -> bool:
        """Whether the weights at this point are the ones to save (``epoch_start``: before an epoch's batches)."""
        if self.step is not None:
            return step == self.step
        return epoch_start and epoch == self.epoch


def as_rewind(value: Rewind | str | None) -> Rewind | None:
    """The callback's ``rewind`` argument as a :class:`Rewind` (``"init"`` is ``Rewind()``), or ``None``.

    Raises:
        ValueError: for anything else.
    """
    if value == "init":
        return Rewind()
    if value is not None and not isinstance(value, Rewind):
        raise ValueError(
            f"`rewind` must be None, 'init' or a Rewind(epoch=...) / Rewind(step=...) object, got {value!r}."
        )
    return value


def capture(targets: Iterable[PruningTarget]) -> dict[str, Tensor]:
    """True copies of the values of ``targets``, by qualified name."""
    with torch.no_grad():
        return {t.name: t.tensor.detach().clone() for t in targets}


def rewind(
    targets: Sequence[PruningTarget],
    saved: Mapping[str, Tensor],
    optimizers: Iterable[torch.optim.Optimizer] = (),
    masks: MaskStore | None = None,
) -> list[str]:
    """Write ``saved`` values back into ``targets`` and drop the optimizers' state for those tensors.

    Pruned entries stay pruned: each value is multiplied by its mask in ``masks``. Returns the names of the
    tensors rewound.

    Raises:
        ValueError: when a saved tensor is missing or has another shape than its target.
    """
    done = []
    params = []
    with torch.no_grad():
        for t in targets:
            value = saved.get(t.name)
            tensor = t.tensor
            if value is None or value.shape != tensor.shape:
                got = None if value is None else tuple(value.shape)
                raise ValueError(
                    f"The rewind point holds no value of shape {tuple(tensor.shape)} for {t.name!r}, got {got}."
                )
            tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
            mask = None if masks is None else masks.mask(t)
            if mask is not None:
                apply_mask_(tensor, mask)
            params.append(tensor)
            done.append(t.name)
    for optimizer in optimizers:
        for p in params:
            optimizer.state.pop(p, None)
    return done
