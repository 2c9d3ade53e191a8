"""The SparseGPT solve (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"): prune one weight matrix and update the weights it keeps so that the layer's output on calibration
inputs changes as little as possible.

Pure functions of tensors, with no model, hook or store: :class:`HessianSum` accumulates ``H = 2/n * sum x x^T``
(float32) from a layer's inputs, :func:`sparsegpt_solve` prunes a ``(out, in)`` matrix given ``H``, and
:func:`hessian_bytes` / :func:`check_hessian_size` bound the memory. :class:`~lightning_prune.SparseGPT` drives them
over a model.

The solve, for ``W`` of shape ``(rows, cols)`` (rows: output features, cols: input features):

1. inputs that never fired (``H[j, j] == 0``, "dead") get ``H[j, j] = 1`` and the saliency 0, so that they are
   pruned first (the paper's code zeroes their weights, which has the same effect on the calibration outputs);
   where a row's target leaves some of them kept, their weights stay as they were (exact counts);
2. ``H + lambda * mean(diag H) * I`` is factored: ``U`` = the upper Cholesky factor of its inverse. When a
   factorisation fails (a Hessian that is not positive definite in float32), ``lambda`` grows tenfold, with a
   warning, up to :data:`MAX_DAMPENING`; past it the identity replaces ``H`` (pruning by magnitude with no update,
   also with a warning), so the weights never hold a NaN;
3. columns are visited left to right in blocks of ``block_size``. At the start of a block each row chooses the
   entries it prunes in the block by the OBS saliency ``w^2 / U[j, j]^2`` of the weights as updated so far
   (N:M: at the start of each group of ``m`` columns, the ``m - n`` lowest of the group); then each column in turn
   is pruned (or kept) and its error spread onto the columns to its right through row ``j`` of ``U``.

Exact counts: each row ends with exactly ``round(sparsity * cols)`` zeros (the paper's local, per-row scope);
the count due is spread over the blocks in proportion to their live entries, and the last blocks take what is
left. Entries pruned before (``current_mask``) stay pruned and count towards the row's target (the cumulative
target of a schedule). A kept column is frozen once visited, so the result is the exact least-squares
reconstruction of each row over its kept entries only when every pruned entry lies left of every kept one;
otherwise it is the paper's approximation (the tests measure both).

Example::

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 8)
    >>> acc = HessianSum(8)
    >>> acc.add(x)
    >>> w = torch.randn(4, 8)
    >>> new, mask = sparsegpt_solve(w, acc.hessian(), 0.5)
    >>> (mask == 0).sum(1).tolist(), bool((new[mask == 0] == 0).all())
    ([4, 4, 4, 4], True)
    >>> pruned_only = w * mask  # the same mask without the update
    >>> bool(((x @ (new - w).T) ** 2).sum() < ((x @ (pruned_only - w).T) ** 2).sum())
    True
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lightning_prune.counting import count_for

__all__ = ["MAX_DAMPENING", "HessianSum", "check_hessian_size", "hessian_bytes", "sparsegpt_solve"]

MAX_DAMPENING = 10.0
"""The largest relative dampening tried (x ``mean(diag H)``) before the identity replaces the Hessian."""

COPIES = 3
"""Square float32 matrices held at once while one layer is solved: the sum, the damped Hessian, its factor."""


class HessianSum:
    """``sum x x^T`` over the rows of a layer's inputs, in float32, and the number of rows.

    Args:
        features: the input width (``in``; for a convolution, ``in_channels * kernel size``).
        device: where the ``(features, features)`` sum lives.

    Attributes:
        sum: the ``(features, features)`` float32 sum.
        rows: the rows added (a float tensor of one element, so that processes can sum it).
    """

    def __init__(self, features: int, device: torch.device | str | None = None) -> None:
        self.features = features
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.rows = torch.zeros(1, dtype=torch.float32, device=device)

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x`` (``(..., features)``: every leading dimension is a row)."""
        x = x.detach().reshape(-1, self.features).to(self.sum.device, torch.float32)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> Tensor:
        """``H = 2 / n * sum x x^T`` (zeros when nothing was added)."""
        return self.sum * (2.0 / self.rows.clamp(min=1.0))


def hessian_bytes(features: int) -> int:
    """Bytes of float32 square matrices held at once while a layer of ``features`` inputs is solved."""
    return COPIES * 4 * features * features


def check_hessian_size(name: str, features: int, bound: int) -> None:
    """Refuse a layer whose Hessian would need more than ``bound`` bytes.

    Raises:
        ValueError: naming the layer, its input width and the bytes.

    Example::

        >>> check_hessian_size("fc.weight", 1024, 2**30)
        >>> check_hessian_size("fc.weight", 65536, 2**30)
        Traceback (most recent call last):
        ...
        ValueError: SparseGPT: the Hessian of 'fc.weight' (65536 x 65536 inputs, float32) would need 51539607552 bytes while it is solved, over `max_hessian_bytes=1073741824`; leave the tensor out of `parameters` or raise the bound.
    """  # noqa: E501
    need = hessian_bytes(features)
    if need > bound:
        raise ValueError(
            f"SparseGPT: the Hessian of {name!r} ({features} x {features} inputs, float32) would need {need} bytes "
            f"while it is solved, over `max_hessian_bytes={bound}`; leave the tensor out of `parameters` or raise "
            "the bound."
        )


def _inverse_factor(hessian: Tensor, dampening: float, name: str) -> Tensor:
    """The upper Cholesky factor of ``(H + lambda * mean(diag H) * I)^-1``, ``lambda`` from ``dampening`` up."""
    mean = float(hessian.diagonal().mean())
    damp = dampening
    while damp <= MAX_DAMPENING * (1 + 1e-9):
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper
        warnings.warn(
            f"SparseGPT: the Hessian of {name!r} is not positive definite in float32 with dampening {damp:g}; "
            f"trying {damp * 10:g}.",
            stacklevel=3,
        )
        damp *= 10
    warnings.warn(
        f"SparseGPT: no dampening up to {MAX_DAMPENING:g} made the Hessian of {name!r} factor; it is pruned by "
        "magnitude per row, without updating the weights it keeps.",
        stacklevel=3,
    )
    return torch.eye(hessian.shape[0], dtype=torch.float32, device=hessian.device)


def _block_counts(keep: Tensor, needed: Tensor, i1: int, i2: int) -> Tensor:
    """How many more entries each row prunes in columns ``[i1, i2)``: its share of ``needed`` in proportion to the
    live entries of the block among the live entries from ``i1`` on, at least what the later columns cannot hold."""
    live_block = keep[:, i1:i2].sum(1)
    live_after = keep[:, i2:].sum(1)
    share = torch.round(needed * live_block / (live_block + live_after).clamp(min=1)).long()
    return torch.minimum(torch.maximum(share, needed - live_after), torch.minimum(needed, live_block))


def _saliency(w: Tensor, diag: Tensor, dead: Tensor) -> Tensor:
    """The OBS saliency ``w^2 / d^2`` of each entry, 0 on dead inputs."""
    return (w.square() / diag.square()).masked_fill(dead, 0.0)


def _choose_unstructured(w: Tensor, diag: Tensor, dead: Tensor, pruned: Tensor, count: Tensor) -> Tensor:
    """``pruned`` with, in each row, ``count`` more of its live entries of lowest saliency ``w^2 / d^2``."""
    saliency = _saliency(w, diag, dead).masked_fill(pruned, float("inf"))
    order = torch.sort(saliency, dim=1, stable=True).indices
    chosen = torch.arange(w.shape[1], device=w.device).expand_as(w) < count.unsqueeze(1)
    return pruned | torch.zeros_like(pruned).scatter_(1, order, chosen)


def _choose_nm(w: Tensor, diag: Tensor, dead: Tensor, pruned: Tensor, n: int, m: int) -> Tensor:
    """``pruned`` (one group of ``m`` columns) with the ``m - n`` lowest-saliency entries of each row pruned;
    entries pruned before come first, and a row that had more pruned keeps them all."""
    saliency = _saliency(w, diag, dead).masked_fill(pruned, float("-inf"))
    lowest = torch.sort(saliency, dim=1, stable=True).indices[:, : m - n]
    return pruned | torch.zeros_like(pruned).scatter_(1, lowest, True)


def _check_solve_args(weight: Tensor, hessian: Tensor, sparsity: float | None, nm: tuple[int, int] | None) -> None:
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"`weight` must be (out, in) and `hessian` (in, in), got {tuple(weight.shape)} and {tuple(hessian.shape)}."
        )
    if (sparsity is None) == (nm is None):
        raise ValueError(f"Give one of `sparsity` and `nm`, got sparsity={sparsity!r}, nm={nm!r}.")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r}.")
    if nm is not None and weight.shape[1] % nm[1]:
        raise ValueError(f"N:M groups need an input size that is a multiple of m={nm[1]}, got {weight.shape[1]}.")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("`hessian` holds NaN or infinite values: the layer's inputs are not finite.")


@torch.no_grad()
def sparsegpt_solve(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float | None = None,
    *,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    current_mask: Tensor | None = None,
    name: str = "the layer",
) -> tuple[Tensor, Tensor]:
    """Prune ``weight`` (``(out, in)``) to ``sparsity`` per row, or to the N:M pattern ``nm`` along its inputs,
    updating the kept weights to reconstruct the output on the inputs that ``hessian`` summarises.

    Args:
        weight: the ``(out, in)`` matrix (any float dtype; solved in float32, returned in its dtype).
        hessian: ``(in, in)``, ``2/n * sum x x^T`` of the layer's inputs (:class:`HessianSum`).
        sparsity: the cumulative fraction of zeros in each row: ``round(sparsity * in)`` zeros exactly.
        nm: ``(n, m)`` instead: at most ``n`` kept of every ``m`` consecutive inputs of each row.
        block_size: columns whose masks are chosen together (lazy updates); a multiple of ``m`` with ``nm``.
        dampening: ``lambda`` of ``H + lambda * mean(diag H) * I``, > 0.
        current_mask: ``(out, in)``, 1 = kept; its zeros stay pruned and count towards the target (a nonzero
            weight under a zero of the mask is pruned like the others, its error spread onto the columns after it).
        name: the layer, for messages.

    Returns:
        ``(new weight, mask)``: the weights (zeros where pruned, the kept ones updated) and the ``uint8`` mask.

    Raises:
        ValueError: for shapes that do not match, both or neither of ``sparsity`` and ``nm``, a target that
            would prune whole rows, or a Hessian that is not finite.
    """
    _check_solve_args(weight, hessian, sparsity, nm)
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"`block_size` must be a multiple of m={nm[1]} with `nm`, got {block_size}.")
    w = weight.detach().to(torch.float32).clone()
    rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool) if current_mask is None else current_mask.to(w.device).bool().clone()
    h = hessian.detach().to(w.device, torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    upper = _inverse_factor(h, dampening, name)
    del h
    needed = torch.zeros(rows, dtype=torch.long, device=w.device)
    if sparsity is not None:
        k = count_for(sparsity, cols)
        if k >= cols > 0:
            raise ValueError(f"SparseGPT would prune every entry of each row of {name!r} (sparsity {sparsity!r}).")
        needed = (k - (~keep).sum(1)).clamp(min=0)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        _solve_block(w, keep, upper, dead, needed, (i1, i2), nm)
    if not bool(torch.isfinite(w).all()):  # not reached with a finite Hessian; refuse rather than write NaN
        raise ValueError(f"SparseGPT: the solve of {name!r} gave non-finite weights; nothing was written.")
    return w.to(weight.dtype), keep.to(torch.uint8)


def _solve_block(
    w: Tensor,
    keep: Tensor,
    upper: Tensor,
    dead: Tensor,
    needed: Tensor,
    columns: tuple[int, int],
    nm: tuple[int, int] | None,
) -> None:
    """Columns ``[i1, i2)``: choose their masks, prune column by column, spread the errors (in place)."""
    i1, i2 = columns
    block = w[:, i1:i2].clone()
    u = upper[i1:i2, i1:i2]
    diag, dead = u.diagonal().unsqueeze(0), dead[i1:i2].unsqueeze(0)
    pruned = ~keep[:, i1:i2]
    if nm is None:
        count = _block_counts(keep, needed, i1, i2)
        pruned = _choose_unstructured(block, diag, dead, pruned, count)
        needed -= count
    errors = torch.zeros_like(block)
    for i in range(i2 - i1):
        if nm is not None and i % nm[1] == 0:
            g = slice(i, i + nm[1])
            pruned[:, g] = _choose_nm(block[:, g], diag[:, g], dead[:, g], pruned[:, g], *nm)
        column = block[:, i]
        err = column.masked_fill(~pruned[:, i], 0.0) / u[i, i]  # (w - q) / d, q = w kept or 0 pruned
        block[:, i:].sub_(err.unsqueeze(1) * u[i, i:].unsqueeze(0))
        block[:, i].masked_fill_(pruned[:, i], 0.0)
        errors[:, i] = err
    w[:, i1:i2] = block
    w[:, i2:].sub_(errors @ upper[i1:i2, i2:])
    keep[:, i1:i2] = ~pruned
