"""Measured sparsity of any model, masked or permanent: zeros counted in the weights the model uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_prune.counting import count_zeros
from lightning_prune.selection import ParameterSpec, PruningTarget, select_parameters

__all__ = ["SparsityReport", "TensorSparsity", "sparsity_report"]


@dataclass(frozen=True)
class TensorSparsity:
    """Measured figures for one tensor.

    Attributes:
        name: qualified parameter name.
        shape: the tensor's shape.
        numel: its number of entries.
        zeros: entries equal to zero in the weights the model uses (``orig * mask`` under torch's pruning).
        target: the cumulative target it was last pruned to, if known.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    target: float | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor and overall measured sparsity; ``str(report)`` is a compact table.

    Attributes:
        tensors: one :class:`TensorSparsity` per tensor, in model order.
    """

    tensors: tuple[TensorSparsity, ...]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def zeros(self) -> int:
        return sum(t.zeros for t in self.tensors)

    @property
    def sparsity(self) -> float:
        """Zeros over entries, across all reported tensors."""
        return self.zeros / self.numel if self.numel else 0.0

    def per_tensor(self) -> dict[str, float]:
        """``{qualified name: sparsity}``."""
        return {t.name: t.sparsity for t in self.tensors}

    def __str__(self) -> str:
        rows = [("tensor", "shape", "zeros", "sparsity", "target")]
        for t in self.tensors:
            target = "" if t.target is None else f"{t.target:.4f}"
            rows.append((t.name, "x".join(map(str, t.shape)), f"{t.zeros}/{t.numel}", f"{t.sparsity:.4f}", target))
        rows.append(("total", "", f"{self.zeros}/{self.numel}", f"{self.sparsity:.4f}", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def measure(targets: Sequence[PruningTarget], goals: Mapping[str, float] | None = None) -> SparsityReport:
    """Measure the given tensors (see :func:`sparsity_report`)."""
    goals = goals or {}
    rows = []
    with torch.no_grad():
        for t in targets:
            w = t.value()
            rows.append(TensorSparsity(t.name, tuple(w.shape), w.numel(), count_zeros(w), goals.get(t.name)))
    return SparsityReport(tuple(rows))


def sparsity_report(model: nn.Module, parameters: Sequence[ParameterSpec] | None = None) -> SparsityReport:
    """Count the zeros of a model's tensors, whether pruning masks are in place or were made permanent.

    Args:
        model: any module.
        parameters: as in :class:`~lightning_prune.PruningScheduleCallback` (names, glob patterns or
            ``(module, name)`` pairs); default: the ``weight`` of every ``nn.Conv*d`` and ``nn.Linear``.

    Example::

        >>> import torch.nn as nn, torch.nn.utils.prune as prune
        >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
        >>> _ = prune.l1_unstructured(net[0], "weight", amount=30)
        >>> report = sparsity_report(net)
        >>> report.per_tensor()["0.weight"], report.zeros, report.numel
        (0.3, 30, 120)
    """
    return measure(select_parameters(model, parameters))
