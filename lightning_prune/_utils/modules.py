"""Small ideas about modules and their inputs, written once: moving inputs to a device, calling a model on example
inputs of any form, and giving every submodule its train/eval mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["call_on", "device_of", "keep_modes", "to_device"]


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (also inside lists, tuples and dicts) moved to ``device``.

    Example::

        >>> to_device({"x": (torch.zeros(1), 3)}, torch.device("cpu"))
        {'x': (tensor([0.]), 3)}
    """
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(x, device) for x in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def call_on(model: nn.Module, example_inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple or list, else ``model(inputs)``, with the
    inputs on the model's device."""
    inputs = to_device(example_inputs, device_of(model))
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextmanager
def keep_modes(model: nn.Module) -> Iterator[None]:
    """Whatever the body does to train/eval modes, every submodule of ``model`` gets its own mode back."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
