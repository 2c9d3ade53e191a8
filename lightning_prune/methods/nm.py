"""N:M semi-structured sparsity: at most ``n`` nonzero weights in every ``m`` consecutive ones along the input
dimension, the pattern that GPU sparse tensor cores accelerate (2:4 on NVIDIA Ampere and later).

Layout. Groups run along the *input* dimension, dim 1 of the weight, the reduction dimension of the layer's
matrix product:

* ``nn.Linear`` weight ``(out, in)``: each row ``weight[i]`` is cut into ``in / m`` groups of ``m`` consecutive
  entries, ``weight[i, m*g : m*(g+1)]``. In a contiguous (row-major) weight these are ``m`` neighbours in memory,
  which is the layout that :func:`torch.sparse.to_sparse_semi_structured` expects for 2:4 (at most 2 nonzeros
  in every 4 consecutive entries of each row of the 2-D tensor); ``F.linear(x, W)`` computes ``x @ W.T``, so
  the groups lie along the dimension that the product sums over.
* ``nn.Conv1d/2d/3d`` weight ``(out, in / groups, *kernel)``: for each output channel and kernel position
  ``(o, kh, kw)``, the input channels ``weight[o, m*g : m*(g+1), kh, kw]`` form a group: the channels-last
  ``(out, *kernel, in)`` view grouped along its last dimension, as NVIDIA's ASP prunes convolutions for
  implicit-GEMM kernels.
* weights stored ``(in, out)`` (Hugging Face's ``Conv1D``, used as ``x @ W``; transposed convolutions): the
  groups run along dim 0, the input dimension, i.e. down each column ``weight[m*g : m*(g+1), i]``; attention's
  ``in_proj_weight`` and every other matrix weight of :mod:`lightning_prune.layers` likewise along its input
  dimension.

A weight whose input size is not a multiple of ``m`` (a depthwise convolution has one input channel per
group), and any tensor that is not a matrix layer's weight, is skipped with a warning. :func:`nm_satisfied`
checks the pattern; :func:`~lightning_prune.inference.to_semi_structured` hands 2:4 ``Linear`` weights to torch's
sparse kernels for inference on CUDA.

Example::

    >>> w = torch.tensor([[0.0, -3.0, 0.0, 2.0, 5.0, 0.0, 0.0, 0.0]])
    >>> nm_satisfied(w, 2, 4), nm_satisfied(w, 1, 4)
    (True, False)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from lightning_prune._utils.lightning import rank_zero_warn
from lightning_prune.layers import input_dim
from lightning_prune.methods import ImportanceFn, MagnitudeScores, MaskReader, NewMask, PruningMethod
from lightning_prune.patterns import check_nm, grouped, nm_satisfied, ungrouped
from lightning_prune.selection import PruningTarget

__all__ = ["NMPruning", "nm_satisfied"]


def _skip_reason(target: PruningTarget, m: int) -> str | None:
    """Why ``target`` cannot take an N:M pattern (``None``: it can)."""
    shape = tuple(target.tensor.shape)
    if target.layout is None or len(shape) < 2:
        return f"not a matrix layer's weight ({type(target.module).__name__}.{target.param})"
    size = shape[input_dim(target.layout)]
    if size % m:
        return f"input size {size} is not a multiple of m={m}"
    return None


class NMPruning(PruningMethod):
    """Keep the ``n`` largest of every ``m`` consecutive weights along the input dimension (N:M sparsity).

    The pattern defines the sparsity, ``(m - n) / m`` of every eligible tensor, so the method takes no
    ``sparsity``: give the callback a schedule of *when* (``OneShot(epoch=1)`` after dense training, as NVIDIA's
    recipe does: train dense, prune 2:4 once, fine-tune with the same budget) and leave ``sparsity`` out. At each
    scheduled step every group keeps its ``n`` live entries with the largest magnitude (or ``importance``
    score); ties go to the lower index. A gradual ramp (1:4, then 2:4) is not offered: hardware accelerates
    exactly n:m, and one step followed by fine-tuning recovers the accuracy (see ``docs/nm-sparsity.md``).

    Masks only narrow: entries pruned before (an earlier step, a checkpoint, torch's pruning on the model)
    stay pruned, so a group that had more than ``m - n`` pruned entries keeps them all; a later step on a tensor
    that already satisfies the pattern changes nothing. Eligible tensors: the weights of matrix layers
    (:mod:`lightning_prune.layers`: ``Linear``, ``Conv*d``, Hugging Face's ``Conv1D``, attention's input
    projections, ...) whose input size is a multiple of ``m`` (layout: see the module docstring); other chosen
    tensors are left dense, with a warning naming them when ``fit`` starts. Local scope only; the masks are a
    function of the weights, so every DDP process decides the same. Not for FSDP2 shards.

    Args:
        n: entries kept per group, ``1 <= n < m``.
        m: group size along the input dimension.
        importance: a function ``tensor -> scores`` of the same shape (higher is kept) replacing the magnitude.
        scores: a function ``(target, seed) -> scores`` instead, for scores that are not a function of the weights
            alone (``Wanda(nm=(2, 4))`` passes its activation-aware scores).

    Raises:
        ValueError: for ``n``/``m`` that are not integers with ``1 <= n < m`` or an ``importance`` that is not
            callable (here); with the callback, for ``scope="global"`` (when it is built), a selection with no
            eligible tensor (when ``fit`` starts), and scores that are NaN or of the wrong shape (at a step).

    Example::

        >>> from lightning_prune import OneShot, PruningScheduleCallback
        >>> callback = PruningScheduleCallback(method=NMPruning(2, 4), schedule=OneShot(epoch=1))
        >>> callback.method, callback.sparsity
        (NMPruning(n=2, m=4), None)
    """

    takes_sparsity = False

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        importance: ImportanceFn | None = None,
        *,
        scores: Callable[[PruningTarget, int], Tensor] | None = None,
    ) -> None:
        self.n, self.m = check_nm(n, m)
        if importance is not None and not callable(importance):
            raise ValueError(f"`importance` must be a function tensor -> scores, got {importance!r}.")
        if scores is not None and (importance is not None or not callable(scores)):
            raise ValueError("`scores` is a function (target, seed) -> scores and replaces `importance`; give one.")
        self.importance = importance
        self._scores = scores if scores is not None else MagnitudeScores(importance)
        self.name = f"nm({self.n}:{self.m})"

    def __repr__(self) -> str:
        extra = "" if self.importance is None else f", importance={getattr(self.importance, '__name__', '...')}"
        return f"NMPruning(n={self.n}, m={self.m}{extra})"

    scopes = ("local",)

    def scope_error(self, scope: str) -> str:
        return (
            f"{self!r} keeps n of every m weights within each tensor and works in `scope='local'` only, "
            f"got scope={scope!r}."
        )

    def skipped(self, targets: Sequence[PruningTarget]) -> dict[str, str]:
        """``{name: reason}`` of the chosen tensors that cannot take the pattern (left dense)."""
        return {t.name: why for t in targets if (why := _skip_reason(t, self.m)) is not None}

    def masked(self, targets: Sequence[PruningTarget]) -> list[PruningTarget]:
        return [t for t in targets if _skip_reason(t, self.m) is None]

    def setup(self, pl_module: nn.Module, targets: Sequence[PruningTarget]) -> None:
        skipped = self.skipped(targets)
        if len(skipped) == len(targets):
            raise ValueError(
                f"{self!r}: none of the chosen tensors can take the pattern: "
                + "; ".join(f"{name!r}: {why}" for name, why in skipped.items())
                + ". Choose Linear or Conv weights whose input size is a multiple of m in `parameters`."
            )
        if skipped:
            rank_zero_warn(
                f"{self!r} leaves {sorted(skipped)} dense: "
                + "; ".join(f"{name!r}: {why}" for name, why in skipped.items())
                + ". Leave them out of `parameters` to silence this."
            )

    def _new_mask(self, target: PruningTarget, current: Tensor | None) -> Tensor | None:
        """The narrowed mask of ``target``, or ``None`` when the pattern holds already."""
        scores = self._scores(target, 0)
        if bool(torch.isnan(scores).any()):
            raise ValueError(f"{self!r}: the scores of {target.name!r} hold NaN.")
        shape, dim = tuple(scores.shape), input_dim(target.layout)
        groups = grouped(scores, self.m, dim)
        if current is not None:  # a pruned entry is never among the kept ones while a live one is left
            groups = groups.masked_fill(grouped(current, self.m, dim) == 0, float("-inf"))
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros(groups.shape, dtype=torch.uint8, device=groups.device)
        keep.scatter_(-1, order[..., : self.n], 1)
        mask = ungrouped(keep, shape, dim)
        if current is not None:
            mask.mul_(current)
            if torch.equal(mask, current):
                return None
        return mask

    def local_masks(
        self, targets: Sequence[PruningTarget], sparsities: Sequence[float | None], seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        for t in self.masked(targets):
            mask = self._new_mask(t, masks.mask(t))
            if mask is not None:
                yield NewMask(t, mask)
