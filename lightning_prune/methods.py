"""How entries are chosen: built-in and custom pruning methods behind one small interface.

Every method is driven by *cumulative* targets and turns them into exact counts:

* score methods (``"l1_unstructured"``, ``"random_unstructured"``, or an importance function) rank live
  entries with :func:`lightning_prune.thresholds.select_smallest`, per tensor (local) or across all
  tensors (global), and prune exactly ``round(sparsity * n) - already pruned`` more;
* torch methods (``"ln_structured"``, ``"random_structured"`` and any ``BasePruningMethod`` subclass whose
  constructor takes ``amount``) run through torch's own ``apply`` / ``global_unstructured`` with an integer
  ``amount``, which torch's ``PruningContainer`` applies to the entries (or channels) still live;
* a ``BasePruningMethod`` subclass without ``amount`` is applied as it is at each scheduled step.

Randomness comes from generators seeded by the callback's ``seed`` and the step index, so every process
of a distributed run draws the same masks.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
import torch.nn.utils.prune as prune
from torch import Tensor

from lightning_prune.inplace import InplaceMasks
from lightning_prune.masking import (
    apply_mask,
    count_for,
    count_zeros,
    mask_zeros,
    pruned_count,
    remember_pruned_count,
)
from lightning_prune.selection import PruningTarget
from lightning_prune.thresholds import iter_smallest, iter_smallest_each

__all__ = [
    "ImportanceFn",
    "MethodName",
    "PruningMethod",
    "ScoreMethod",
    "TorchMethod",
    "resolve_method",
]

MethodName = Literal["l1_unstructured", "random_unstructured", "ln_structured", "random_structured"]
# Returns a Tensor of scores (checked at run time). `Any`, not `Tensor`, as the return type: jsonargparse
# (LightningCLI) then accepts import paths of functions without a return annotation, such as `torch.abs`.
ImportanceFn = Callable[[Tensor], Any]
Scope = Literal["local", "global"]


def _step_seed(seed: int, step: int, index: int = 0) -> int:
    return (seed * 1_000_003 + step * 10_007 + index) % (2**63 - 1)


@contextmanager
def _seeded(seed: int, targets: Sequence[PruningTarget]) -> Iterator[None]:
    """Run torch's global-RNG code with a fixed seed, leaving the caller's RNG state as it was."""
    devices = sorted({t.original.device.index or 0 for t in targets if t.original.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class PruningMethod(ABC):
    """One way of choosing entries to prune, for a list of tensors at one scheduled step.

    Attributes:
        name: shown in logs and errors.
        structured: whether whole slices are pruned.
        takes_sparsity: whether cumulative targets drive it (``False``: applied as it is at each step).
        supports_global: whether ``scope="global"`` is allowed (default: for unstructured methods only).
    """

    name: str = "method"
    structured: bool = False
    takes_sparsity: bool = True

    @property
    def supports_global(self) -> bool:
        return not self.structured

    def setup(self, pl_module: Any, targets: Sequence[PruningTarget]) -> None:
        """Called once when ``fit`` starts, before any pruning, with the whole module (optional hook)."""
        return None

    def masked(self, targets: Sequence[PruningTarget]) -> list[PruningTarget]:
        """Every tensor this method may mask (made permanent at the end); default: the chosen ones."""
        return list(targets)

    def metrics(self) -> dict[str, float]:
        """Extra figures logged after each pruning step (optional hook)."""
        return {}

    @abstractmethod
    def prune_local(self, targets: Sequence[PruningTarget], sparsities: Sequence[float], seed: int) -> None:
        """Bring each tensor to its own cumulative sparsity (``None`` entries for methods without one)."""

    @abstractmethod
    def prune_global(self, targets: Sequence[PruningTarget], sparsity: float, seed: int) -> None:
        """Bring all tensors together to one cumulative sparsity."""

    def __repr__(self) -> str:
        return self.name


class ScoreMethod(PruningMethod):
    """Prune the live entries with the lowest scores, exactly to the target count.

    Args:
        scores: ``(target, seed) -> scores`` of the tensor's shape; called more than once per step, it must
            return the same scores each time.
        name: for messages.
    """

    def __init__(self, scores: Callable[[PruningTarget, int], Tensor], name: str) -> None:
        self._scores = scores
        self.name = name

    def prune_local(
        self,
        targets: Sequence[PruningTarget],
        sparsities: Sequence[float],
        seed: int,
        masks: InplaceMasks | None = None,
    ) -> None:
        """See :class:`PruningMethod`. With ``masks``, the tensors are plain parameters whose masks ``masks``
        keeps (``mask_mode="inplace"``): the step narrows those masks and zeros the weights in place."""
        store = _MaskStore(masks)
        chosen, fns, ks, pruned = [], [], [], []
        for i, (t, s) in enumerate(zip(targets, sparsities)):
            already = store.pruned(t)
            k = count_for(s, t.original.numel()) - already
            if k > 0:
                seed_i = _step_seed(_step_seed(seed, 1, i), 0, 0)
                chosen.append(t)
                fns.append(lambda t=t, seed_i=seed_i: self._scores(t, seed_i))
                ks.append(k)
                pruned.append(already)
        current = [store.mask(t) for t in chosen]
        zeroed = self._zero_where_pruned(masks)
        new_masks = iter_smallest_each(fns, current, ks, pruned, inplace=True, zero_where_pruned=zeroed)
        for t, mask, k, already in zip(chosen, new_masks, ks, pruned):
            store.install(t, mask, already + k)  # exactly k more: the next step need not count them

    def prune_global(
        self, targets: Sequence[PruningTarget], sparsity: float, seed: int, masks: InplaceMasks | None = None
    ) -> None:
        """See :class:`PruningMethod` and :meth:`prune_local` for ``masks``."""
        store = _MaskStore(masks)
        total = sum(t.original.numel() for t in targets)
        pruned = [store.pruned(t) for t in targets]
        k = count_for(sparsity, total) - sum(pruned)
        if k <= 0:
            return
        current = [store.mask(t) for t in targets]
        fns = [(lambda t=t, i=i: self._scores(t, _step_seed(seed, 0, i))) for i, t in enumerate(targets)]
        zeroed = self._zero_where_pruned(masks)
        for t, mask in zip(targets, iter_smallest(fns, current, k, pruned, inplace=True, zero_where_pruned=zeroed)):
            store.install(t, mask, None)  # each mask as soon as it is built

    def _zero_where_pruned(self, masks: InplaceMasks | None) -> bool:
        """Whether the scores are +0.0 at pruned entries: magnitudes of plain weights zeroed in place."""
        return masks is not None and isinstance(self._scores, _Magnitude) and self._scores.importance is None


class _MaskStore:
    """Where a score method reads and puts masks: torch's reparametrization, or ``InplaceMasks``."""

    def __init__(self, masks: InplaceMasks | None) -> None:
        self.masks = masks

    def mask(self, t: PruningTarget) -> Tensor | None:
        return t.mask if self.masks is None else self.masks.mask_of(t)

    def pruned(self, t: PruningTarget) -> int:
        return pruned_count(t) if self.masks is None else mask_zeros(self.masks.mask_of(t))

    def install(self, t: PruningTarget, mask: Tensor, zeros: int | None) -> None:
        if self.masks is None:
            apply_mask(t, mask)
        else:
            self.masks.install(t, mask)
        if zeros is not None:
            remember_pruned_count(self.mask(t), zeros)


class _Magnitude:
    """Magnitude (or ``importance(orig * mask)``) scores. A class, not a closure, so that the callback pickles:
    ``ddp_spawn`` sends it to the new processes."""

    def __init__(self, importance: ImportanceFn | None) -> None:
        self.importance = importance

    def __call__(self, target: PruningTarget, seed: int) -> Tensor:
        importance = self.importance
        with torch.no_grad():
            if importance is None:  # pruned entries' scores are ignored by the selection: no orig * mask
                return target.original.abs()
            weights = target.effective()
            out = importance(weights)
        if not isinstance(out, Tensor) or out.shape != weights.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"`importance` must return scores of the tensor's shape {tuple(weights.shape)} "
                f"for {target.name!r}, got {got}."
            )
        return out


def _random_scores(target: PruningTarget, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(target.original.shape, generator=generator).to(target.original.device)


def _pruned_slices(mask: Tensor, dim: int) -> int:
    other = [d for d in range(mask.dim()) if d != dim]
    return int((mask.sum(dim=other) == 0).sum()) if other else int((mask == 0).sum())


class TorchMethod(PruningMethod):
    """A ``torch.nn.utils.prune.BasePruningMethod`` subclass, driven by torch's own ``apply``.

    Args:
        cls: the method class (e.g. ``prune.LnStructured`` or your own).
        kwargs: extra constructor arguments (``n``, ``dim``, ...).
        importance: optional function giving the ``importance_scores`` passed to torch.
    """

    def __init__(
        self, cls: type[prune.BasePruningMethod], kwargs: Mapping[str, Any], importance: ImportanceFn | None
    ) -> None:
        self.cls = cls
        self.kwargs = dict(kwargs)
        self.importance = importance
        self.name = cls.__name__
        self.structured = getattr(cls, "PRUNING_TYPE", None) == "structured"
        self.takes_sparsity = "amount" in inspect.signature(cls.__init__).parameters
        # torch's RandomStructured/RandomUnstructured.apply take no importance_scores (they need none)
        self._apply_takes_scores = "importance_scores" in inspect.signature(cls.apply).parameters

    def _scores(self, t: PruningTarget) -> Tensor:
        with torch.no_grad():
            w = t.effective()
            return w if self.importance is None else self.importance(w)

    def _count(self, t: PruningTarget, sparsity: float) -> int:
        """Additional entries (unstructured) or slices (structured) to prune to reach ``sparsity``."""
        mask = t.mask if t.mask is not None else torch.ones_like(t.original)
        if not self.structured:
            return count_for(sparsity, mask.numel()) - count_zeros(mask)
        dim = self.kwargs.get("dim", -1) % mask.dim()
        return count_for(sparsity, mask.shape[dim]) - _pruned_slices(mask, dim)

    def prune_local(self, targets: Sequence[PruningTarget], sparsities: Sequence[float | None], seed: int) -> None:
        with _seeded(seed, targets):
            for t, s in zip(targets, sparsities):
                kwargs = dict(self.kwargs)
                if self.takes_sparsity:
                    kwargs["amount"] = self._count(t, s)
                    if kwargs["amount"] <= 0:
                        continue
                if self._apply_takes_scores:
                    kwargs["importance_scores"] = self._scores(t)
                self.cls.apply(t.module, t.param, **kwargs)

    def prune_global(self, targets: Sequence[PruningTarget], sparsity: float | None, seed: int) -> None:
        kwargs = dict(self.kwargs)
        if self.takes_sparsity:
            total = sum(t.original.numel() for t in targets)
            kwargs["amount"] = count_for(sparsity, total) - sum(pruned_count(t) for t in targets)
            if kwargs["amount"] <= 0:
                return
        scores = {(t.module, t.param): self._scores(t) for t in targets}
        with _seeded(seed, targets):
            prune.global_unstructured(
                [(t.module, t.param) for t in targets], pruning_method=self.cls, importance_scores=scores, **kwargs
            )


_BUILTIN: dict[str, Callable[[Mapping[str, Any], ImportanceFn | None], PruningMethod]] = {
    "l1_unstructured": lambda kw, imp: ScoreMethod(_Magnitude(imp), "l1_unstructured"),
    "random_unstructured": lambda kw, imp: ScoreMethod(_random_scores, "random_unstructured"),
    "ln_structured": lambda kw, imp: TorchMethod(prune.LnStructured, {"n": 2, "dim": 0, **kw}, imp),
    "random_structured": lambda kw, imp: TorchMethod(prune.RandomStructured, {"dim": 0, **kw}, imp),
}
_BUILTIN_KWARGS = {
    "l1_unstructured": set(),
    "random_unstructured": set(),
    "ln_structured": {"n", "dim"},
    "random_structured": {"dim"},
}
assert set(_BUILTIN) == set(get_args(MethodName))


def resolve_method(
    method: MethodName | type[prune.BasePruningMethod] | PruningMethod,
    method_kwargs: Mapping[str, Any] | None = None,
    importance: ImportanceFn | None = None,
) -> PruningMethod:
    """Turn the callback's ``method`` argument into a :class:`PruningMethod`.

    Raises:
        ValueError: for an unknown name, a class that is not a ``BasePruningMethod``, keyword arguments
            the method does not take, an importance function that is not callable, or an importance function
            with random pruning.

    Example::

        >>> resolve_method("l1_unstructured")
        l1_unstructured
        >>> resolve_method("ln_structured", {"n": 1}).kwargs
        {'n': 1, 'dim': 0}
    """
    kwargs = dict(method_kwargs or {})
    if importance is not None and not callable(importance):
        raise ValueError(f"`importance` must be a function tensor -> scores, got {importance!r}.")
    if isinstance(method, PruningMethod):
        return method
    if isinstance(method, str):
        if method not in _BUILTIN:
            raise ValueError(
                f"`method` must be one of {sorted(_BUILTIN)} or a BasePruningMethod subclass, got {method!r}."
            )
        extra = set(kwargs) - _BUILTIN_KWARGS[method]
        if extra:
            raise ValueError(
                f"`method_kwargs` for {method!r} may hold {sorted(_BUILTIN_KWARGS[method]) or 'nothing'}, "
                f"got {sorted(extra)}."
            )
        if importance is not None and method.startswith("random"):
            raise ValueError(f"`importance` replaces the magnitude; it has no meaning with `method={method!r}`.")
        return _BUILTIN[method](kwargs, importance)
    if isinstance(method, type) and issubclass(method, prune.BasePruningMethod):
        params = inspect.signature(method.__init__).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = set(kwargs) - set(params) if not accepts_any else set()
        if unknown or "amount" in kwargs:
            bad = sorted(unknown | ({"amount"} & set(kwargs)))
            raise ValueError(
                f"`method_kwargs` {bad} are not accepted by {method.__name__}"
                " (`amount` is set by the schedule from `sparsity`)."
            )
        return TorchMethod(method, kwargs, importance)
    raise ValueError(
        f"`method` must be one of {sorted(_BUILTIN)} or a torch.nn.utils.prune.BasePruningMethod subclass, "
        f"got {method!r}."
    )
