"""Calibration: the window in which a method that observes activations (:class:`~lightning_prune.Wanda`) sees
batches before a pruning step. One driver of the method's protocol (``start_calibration``, ``calibration_done``,
``finish_calibration``, ``stop_calibration``) for both cases: the callback's training batches and a one-shot
dataloader (:func:`calibrate`, used by :func:`~lightning_prune.prune_once`).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune import Wanda, select_parameters
    >>> net = nn.Sequential(nn.Linear(4, 3))
    >>> method = Wanda(calibration_batches=2)
    >>> window = CalibrationWindow(method)
    >>> window.begin(net, select_parameters(net))
    >>> with torch.enable_grad():
    ...     _ = net(torch.randn(5, 4))
    >>> window.ready(lambda t: t)  # one batch of two seen
    False
    >>> with torch.enable_grad():
    ...     _ = net(torch.randn(5, 4))
    >>> window.ready(lambda t: t)
    True
    >>> window.close()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._utils.modules import device_of, keep_modes, to_device
from lightning_prune.methods import PruningMethod
from lightning_prune.selection import PruningTarget

__all__ = ["CalibrationWindow", "calibrate", "default_forward"]


class CalibrationWindow:
    """The calibration window of one method: open while batches are observed, closed after the step.

    Args:
        method: the method whose protocol it drives (``method.calibration_batches > 0``).

    Attributes:
        waiting_at: the schedule point of the step that waits for this window (the callback's), or ``None``.
    """

    def __init__(self, method: PruningMethod) -> None:
        self.method = method
        self.open = False
        self.waiting_at: float | None = None
        self._resume = False

    def begin(self, model: nn.Module, targets: Sequence[PruningTarget]) -> None:
        """Open the window (hooks on the targets' layers) unless it is open; a window that a checkpoint saved
        open goes on with the statistics the checkpoint holds."""
        if not self.open:
            self.method.start_calibration(model, targets, resume=self._resume)
            self.open, self._resume = True, False

    def wait(
        self, model: nn.Module, targets: Sequence[PruningTarget], at: float, reduce: Callable[[Tensor], Tensor]
    ) -> bool:
        """A step is due at schedule point ``at``: open the window (if it is not), remember the first point that
        waits, and say whether the step can run now (see :meth:`ready`)."""
        self.begin(model, targets)
        self.waiting_at = at if self.waiting_at is None else self.waiting_at
        return self.ready(reduce)

    def ready(self, reduce: Callable[[Tensor], Tensor]) -> bool:
        """Whether the method has seen its batches; if so, its statistics are summed over the processes with
        ``reduce`` and the step can run now."""
        if not self.method.calibration_done():
            return False
        self.method.finish_calibration(reduce)
        return True

    def close(self) -> None:
        """Stop observing (remove the hooks); nothing waits any more."""
        if self.open:
            self.method.stop_calibration()
        self.open, self.waiting_at = False, None

    def state_dict(self) -> dict[str, Any]:
        return {"deferred": self.waiting_at, "calibrating": self.open, "method": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.waiting_at = state.get("deferred")
        self._resume = bool(state.get("calibrating", False))
        self.method.load_state_dict(state.get("method") or {})

    @property
    def resuming(self) -> bool:
        """A checkpoint was saved inside an open window: :meth:`begin` goes on where it stopped."""
        return self._resume


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch[0])`` for a tuple or list batch, else ``model(batch)``, on the device of the parameters."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(to_device(inputs, device_of(model)))


def calibrate(
    model: nn.Module,
    method: PruningMethod,
    targets: Sequence[PruningTarget],
    dataloader: Iterable[Any] | None,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
) -> CalibrationWindow:
    """Run ``method``'s calibration over ``dataloader`` (the model in eval mode, gradients enabled so that
    ``nn.TransformerEncoderLayer`` takes its ordinary path; nothing is trained) and return the window, ready for a
    step; close it after the step.

    Raises:
        ValueError: without a ``dataloader``, or one shorter than the calibration.
    """
    if dataloader is None:
        raise ValueError(f"`method={method!r}` observes activations: give a `dataloader` of calibration batches.")
    window = CalibrationWindow(method)
    with keep_modes(model):
        model.eval()
        window.begin(model, targets)
        try:
            batches = iter(dataloader)
            with torch.enable_grad():
                while not method.calibration_done():
                    batch = next(batches, None)
                    if batch is None:
                        raise ValueError(
                            f"`dataloader` ran out before the {method.calibration_batches} calibration batches of "
                            f"{method!r}; give more batches or a lower `calibration_batches`."
                        )
                    forward(model, batch)
            window.ready(lambda t: t)
        except BaseException:
            window.close()
            raise
    return window
