"""N:M patterns as arithmetic: at most ``n`` nonzeros in every ``m`` consecutive entries along a weight's input
dimension (see :mod:`lightning_prune.methods.nm` for the layouts). Read by the N:M method, the reports and the
semi-structured inference form alike; imports nothing that changes a module.

Example::

    >>> import torch
    >>> w = torch.tensor([[0.0, -3.0, 0.0, 2.0, 5.0, 0.0, 0.0, 0.0]])
    >>> nm_satisfied(w, 2, 4), nm_satisfied(w, 1, 4)
    (True, False)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_prune._utils.checks import check_int

__all__ = ["check_nm", "grouped", "nm_satisfied", "ungrouped"]


def check_nm(n: object, m: object) -> tuple[int, int]:
    """``(n, m)`` as integers with ``1 <= n < m``, else a ``ValueError`` naming the argument."""
    m = check_int("m", m, minimum=1)
    n = check_int("n", n, minimum=1)
    if n >= m:
        raise ValueError(f"`n` must be below `m` (keep n of every m weights), got n={n}, m={m}.")
    return n, m


def grouped(x: Tensor, m: int, dim: int = 1) -> Tensor:
    """``x`` (a weight-shaped tensor whose input dimension is ``dim``) as ``(..., in / m, m)``: the input dimension
    moved last (channels-last), cut into groups."""
    moved = x.movedim(dim, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def ungrouped(g: Tensor, shape: Sequence[int], dim: int = 1) -> Tensor:
    """The inverse of :func:`grouped` for a tensor of ``shape``."""
    moved = (*shape[:dim], *shape[dim + 1 :], shape[dim])
    return g.reshape(moved).movedim(-1, dim).contiguous()


def nm_satisfied(tensor: Tensor, n: int, m: int, dim: int = 1) -> bool:
    """Whether every group of ``m`` consecutive entries along ``dim``, the input dimension (1 for ``Linear`` and
    ``Conv*d`` weights, 0 for weights stored ``(in, out)`` such as Hugging Face's ``Conv1D``; see the module
    docstring), holds at most ``n`` nonzeros.

    Args:
        tensor: at least 2-D, with ``tensor.shape[dim]`` a multiple of ``m``.
        n: nonzeros allowed per group, ``1 <= n < m``.
        m: the group size.
        dim: the input dimension: 0 or 1 for a matrix, 1 or 2 for a stacked experts tensor ``(experts, ...)``.

    Raises:
        ValueError: for a bad ``n``/``m``/``dim`` or a tensor whose shape has no such groups.

    Example::

        >>> nm_satisfied(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]), 2, 4)
        True
        >>> nm_satisfied(torch.ones(2, 4), 2, 4)
        False
        >>> nm_satisfied(torch.tensor([[1.0], [0.0], [0.0], [1.0]]), 2, 4, dim=0)  # (in, out): down each column
        True
    """
    n, m = check_nm(n, m)
    if not isinstance(dim, int) or not 0 <= dim < max(tensor.dim(), 2):
        raise ValueError(f"`dim` must be a dimension of the weight (its input dimension), got {dim!r}.")
    if tensor.dim() < 2 or tensor.shape[dim] % m:
        raise ValueError(
            f"N:M groups run along dim {dim}, whose size must be a multiple of m={m}, got shape {tuple(tensor.shape)}."
        )
    with torch.no_grad():
        return bool((grouped(tensor.detach(), m, dim) != 0).sum(dim=-1).le(n).all())
