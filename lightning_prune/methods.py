"""How entries are chosen: built-in and custom pruning methods behind one small interface.

A method *decides* masks and never applies them: given the tensors, their cumulative targets and the masks
kept so far (a :class:`~lightning_prune.store.MaskStore`), it yields a :class:`NewMask` per tensor that
changes; the store narrows its masks and zeros the weights. Every method is driven by cumulative targets
and turns them into exact counts:

* score methods (``"l1_unstructured"``, ``"random_unstructured"``, or an importance function) rank live
  entries with :func:`lightning_prune.thresholds.iter_smallest`, per tensor (local) or across all tensors
  (global), and prune exactly ``round(sparsity * n) - already pruned`` more;
* torch methods (``"ln_structured"``, ``"random_structured"`` and any ``BasePruningMethod`` subclass) call the
  class's own ``compute_mask`` through torch's ``PruningContainer``, which applies an integer ``amount`` to
  the entries (or channels) still live, exactly as ``torch.nn.utils.prune`` composes repeated pruning, without
  its reparametrization; a subclass whose constructor takes no ``amount`` runs as it is at each step.

Randomness comes from generators seeded by the callback's ``seed`` and the step index
(:mod:`lightning_prune.seeding`), so every process of a distributed run draws the same masks, whatever the
caller's random state.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, NamedTuple, Protocol, get_args

import torch
import torch.nn.utils.prune as prune
from torch import Tensor, nn

from lightning_prune._checks import allowed, check_choice
from lightning_prune.collective import Collective
from lightning_prune.counting import count_for, mask_zeros
from lightning_prune.layers import to_out_in
from lightning_prune.seeding import derive_seed, uniform
from lightning_prune.selection import PruningTarget, local_view, shard_offset
from lightning_prune.thresholds import iter_smallest, iter_smallest_each

__all__ = [
    "ImportanceFn",
    "MagnitudeScores",
    "MaskReader",
    "MethodName",
    "NewMask",
    "PruningMethod",
    "Scope",
    "ScoreMethod",
    "TorchMethod",
    "check_scope",
    "resolve_method",
]

MethodName = Literal["l1_unstructured", "random_unstructured", "ln_structured", "random_structured"]
Scope = Literal["local", "global"]
# Returns a Tensor of scores (checked at run time). `Any`, not `Tensor`, as the return type: jsonargparse
# (LightningCLI) then accepts import paths of functions without a return annotation, such as `torch.abs`.
ImportanceFn = Callable[[Tensor], Any]


class MaskReader(Protocol):
    """What a method may read of the masks kept so far (a :class:`~lightning_prune.store.MaskStore`).

    ``mask`` is the part this process holds (a shard under FSDP2); ``pruned``/``pruned_counts`` count over
    all shards; ``group`` sums across the processes that hold shards (``None``: whole tensors here).
    """

    group: Collective | None

    def mask(self, target: PruningTarget) -> Tensor | None: ...

    def pruned(self, target: PruningTarget) -> int: ...

    def pruned_counts(self, targets: Sequence[PruningTarget]) -> list[int]: ...


class NewMask(NamedTuple):
    """A method's decision for one tensor: its new mask (``uint8`` or ``bool``, 1 = keep, the tensor's shape; it
    may be the kept mask, narrowed in place) and, when the method knows it, the number of pruned entries it holds.

    ``values``: new weights for the tensor (its shape), for a method that repairs the weights it keeps
    (:class:`~lightning_prune.SparseGPT`); :func:`~lightning_prune.prune_step` writes them into the parameter as
    soon as the method yields them, before the next tensor is decided and before the store applies the masks."""

    target: PruningTarget
    mask: Tensor
    zeros: int | None = None
    values: Tensor | None = None  # issue 30: a method may change the weights it keeps


@contextmanager
def _seeded(seed: int, targets: Sequence[PruningTarget]) -> Iterator[None]:
    """Run torch's global-RNG code with a fixed seed, leaving the caller's RNG state as it was."""
    devices = sorted({t.tensor.device.index or 0 for t in targets if t.tensor.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class PruningMethod(ABC):
    """One way of choosing entries to prune, for a list of tensors at one scheduled step.

    Subclasses implement :meth:`local_masks`, and :meth:`global_masks` when they work in global scope: they read
    the masks kept so far from ``masks`` and yield one :class:`NewMask` per tensor whose mask changes (``uint8``
    or ``bool``); they never change a weight themselves (one that updates the weights it keeps gives their new
    values in :attr:`NewMask.values`, issue 30). :func:`lightning_prune.prune_step` calls them.

    Attributes:
        name: shown in logs and errors.
        scopes: the scopes it works in, ``("local", "global")`` or one of them; :func:`check_scope` refuses
            the others (the callback, when it is built).
        structured: whether whole slices are pruned.
        takes_sparsity: whether cumulative targets drive it (``False``: applied as it is at each step).
        compacts: whether :meth:`compact` can remove the pruned slices physically at the end.
        per_tensor: whether each tensor's mask is decided from that tensor alone (``False`` for methods that
            couple tensors, such as neuron pruning's rows and columns).
        supports_sharding: whether it decides from row shards of the tensors, with counts and histograms
            summed across processes (FSDP2), without gathering a tensor.
    """

    name: str = "method"
    scopes: tuple[Scope, ...] = ("local", "global")
    structured: bool = False
    takes_sparsity: bool = True
    compacts: bool = False
    per_tensor: bool = True
    supports_sharding: bool = False

    def scope_error(self, scope: str) -> str | None:
        """A message of its own for a refused ``scope`` (optional; :func:`check_scope` has a general one)."""
        return None

    def setup(self, pl_module: nn.Module, targets: Sequence[PruningTarget]) -> None:
        """Called once when ``fit`` starts, before any pruning, with the whole module (optional hook)."""
        return None

    def masked(self, targets: Sequence[PruningTarget]) -> list[PruningTarget]:
        """Every tensor this method may mask; default: the chosen ones."""
        return list(targets)

    def metrics(self, masks: MaskReader) -> dict[str, float]:
        """Extra figures logged after each pruning step (optional hook)."""
        return {}

    # -- calibration: methods that look at activations (calibration_batches > 0)

    calibration_batches: int = 0
    """Training batches whose activations the method observes before each step (0: none). When a step is due,
    the callback calls :meth:`start_calibration`, lets that many batches train with the current masks, then
    :meth:`finish_calibration` and the step, then :meth:`stop_calibration`."""

    def start_calibration(  # noqa: B027 (an optional hook)
        self, pl_module: nn.Module, targets: Sequence[PruningTarget], resume: bool = False
    ) -> None:
        """Begin observing (e.g. register forward hooks on the targets' modules) with fresh statistics, or, with
        ``resume``, with those that :meth:`load_state_dict` restored (a checkpoint inside a window)."""

    def calibration_done(self) -> bool:
        """Whether enough batches were observed for the step."""
        return True

    def finish_calibration(self, reduce: Callable[[Tensor], Tensor]) -> None:  # noqa: B027 (an optional hook)
        """Called once before the step: ``reduce`` sums a tensor over every process (identity in one)."""

    def stop_calibration(self) -> None:  # noqa: B027 (an optional hook)
        """Stop observing (remove hooks); the statistics may be dropped."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to decide as an uninterrupted one would (e.g. statistics of a window that
        a checkpoint interrupted)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (an optional hook)
        """Restore :meth:`state_dict`."""

    def compact(self, pl_module: nn.Module) -> dict[str, tuple[int, int]]:
        """Remove the pruned slices physically (only where :attr:`compacts`); returns the changed widths."""
        raise ValueError(f"`method={self.name}` cannot remove pruned entries physically (`compact=True`).")

    @abstractmethod
    def local_masks(
        self, targets: Sequence[PruningTarget], sparsities: Sequence[float | None], seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        """Each tensor to its own cumulative sparsity (``None`` entries for methods that take none)."""

    def global_masks(
        self, targets: Sequence[PruningTarget], sparsity: float | None, seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        """All tensors together to one cumulative sparsity; only called when ``"global"`` is in :attr:`scopes`."""
        raise TypeError(f"`method={self.name}` has no global scope (its scopes: {self.scopes}).")

    def __repr__(self) -> str:
        return self.name


def check_scope(method: PruningMethod, scope: str) -> Scope:
    """Refuse a ``scope`` that ``method`` does not work in (the one place scopes are checked).

    Example::

        >>> check_scope(resolve_method("l1_unstructured"), "global")
        'global'
        >>> check_scope(resolve_method("ln_structured"), "global")
        Traceback (most recent call last):
        ...
        ValueError: `method=LnStructured` is structured and works in `scope='local'` only, got scope='global'.
    """
    scope = check_choice("scope", scope, allowed(Scope))
    if scope not in method.scopes:
        message = method.scope_error(scope)
        if message is None:
            how = "is structured and works" if method.structured else "works"
            where = " or ".join(f"`scope={s!r}`" for s in method.scopes)
            message = f"`method={method.name}` {how} in {where} only, got scope={scope!r}."
        raise ValueError(message)
    return scope


class ScoreMethod(PruningMethod):
    """Prune the live entries with the lowest scores, exactly to the target count.

    Args:
        scores: ``(target, seed) -> scores`` of the tensor's shape; called more than once per step, it must
            return the same scores each time.
        name: for messages.
        zero_where_pruned: the scores are +0.0 wherever an entry is pruned (magnitudes of weights that the
            store keeps at zero): the selection then need not read the masks.
    """

    supports_sharding = True

    def __init__(
        self, scores: Callable[[PruningTarget, int], Tensor], name: str, zero_where_pruned: bool = False
    ) -> None:
        self._scores = scores
        self.name = name
        self.zero_where_pruned = zero_where_pruned

    def local_masks(
        self, targets: Sequence[PruningTarget], sparsities: Sequence[float | None], seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        group = masks.group
        chosen, fns, ks, pruned = [], [], [], []
        for i, (t, s, already) in enumerate(zip(targets, sparsities, masks.pruned_counts(targets))):
            k = count_for(s if s is not None else 0.0, t.tensor.numel()) - already
            if k > 0:
                chosen.append(t)
                fns.append(partial(self._scores, t, derive_seed(seed, i)))
                ks.append(k)
                pruned.append(already)
        current = [masks.mask(t) for t in chosen]
        new = iter_smallest_each(
            fns,
            current,
            ks,
            None if group is not None else pruned,  # with shards: each counts its own
            inplace=True,
            zero_where_pruned=self.zero_where_pruned,
            group=group,
        )
        for t, mask, k, already in zip(chosen, new, ks, pruned):
            # exactly k more: the next step need not count them (a shard's own count is not known here)
            yield NewMask(t, _binary(mask), None if group is not None else already + k)

    def global_masks(
        self, targets: Sequence[PruningTarget], sparsity: float | None, seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        group = masks.group
        total = sum(t.tensor.numel() for t in targets)
        pruned = masks.pruned_counts(targets)
        k = count_for(sparsity if sparsity is not None else 0.0, total) - sum(pruned)
        if k <= 0:
            return
        current = [masks.mask(t) for t in targets]
        fns = [partial(self._scores, t, derive_seed(seed, i)) for i, t in enumerate(targets)]
        new = iter_smallest(
            fns,
            current,
            k,
            None if group is not None else pruned,
            inplace=True,
            zero_where_pruned=self.zero_where_pruned,
            group=group,
        )
        for t, mask in zip(targets, new):
            yield NewMask(t, _binary(mask))  # each mask as soon as it is built


class MagnitudeScores:
    """``(target, seed) -> scores``: the magnitude ``|W|``, or ``importance(W)``, of a target's weights (the part
    this process holds). A class, not a closure, so that the callback pickles: ``ddp_spawn`` sends it to the new
    processes."""

    def __init__(self, importance: ImportanceFn | None) -> None:
        self.importance = importance

    def __call__(self, target: PruningTarget, seed: int) -> Tensor:
        with torch.no_grad():
            weights = local_view(target.tensor).detach()
            if self.importance is None:
                return weights.abs()
            out = self.importance(weights)
        if not isinstance(out, Tensor) or out.shape != weights.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"`importance` must return scores of the tensor's shape {tuple(weights.shape)} "
                f"for {target.name!r}, got {got}."
            )
        return out


def _random_scores(target: PruningTarget, seed: int) -> Tensor:
    """Uniform scores in [0, 1), a function of ``seed`` and each entry's flat index in the whole tensor, so that
    any process holding any shard of it draws the scores one process would (and the caller's RNG is unused)."""
    tensor = target.tensor
    local = local_view(tensor)
    index = torch.arange(local.numel(), dtype=torch.int64, device=local.device).add_(shard_offset(tensor))
    return uniform(seed, index).view(local.shape)


def _binary(mask: Tensor) -> Tensor:
    """A 0/1 mask as ``uint8`` (the contract of :class:`NewMask`); selection hands out float32 on a first step."""
    return mask if mask.dtype in (torch.uint8, torch.bool) else mask.ne(0).to(torch.uint8)


def _pruned_slices(mask: Tensor, dim: int) -> int:
    other = [d for d in range(mask.dim()) if d != dim]
    return int((mask.sum(dim=other) == 0).sum()) if other else int((mask == 0).sum())


class TorchMethod(PruningMethod):
    """A ``torch.nn.utils.prune.BasePruningMethod`` subclass: its ``compute_mask`` decides, through torch's
    ``PruningContainer`` so that each step prunes among the entries (or channels) still live.

    In scope ``"local"`` the method sees each matrix weight in the ``(out, in, ...)`` layout (a Hugging Face
    ``Conv1D`` weight, stored ``(in, out)``, is shown transposed; see :mod:`lightning_prune.layers`), so that
    ``dim=0`` of ``ln_structured`` prunes output units of every layer kind.

    Args:
        cls: the method class (e.g. ``prune.LnStructured`` or your own).
        kwargs: extra constructor arguments (``n``, ``dim``, ...).
        importance: optional function giving the scores passed to ``compute_mask`` instead of the weights.
    """

    def __init__(
        self, cls: type[prune.BasePruningMethod], kwargs: Mapping[str, Any], importance: ImportanceFn | None
    ) -> None:
        self.cls = cls
        self.kwargs = dict(kwargs)
        self.importance = importance
        self.name = cls.__name__
        self.structured = getattr(cls, "PRUNING_TYPE", None) == "structured"
        self.scopes = ("local",) if self.structured else ("local", "global")
        self.takes_sparsity = "amount" in inspect.signature(cls.__init__).parameters

    def _scores(self, t: PruningTarget) -> Tensor:
        with torch.no_grad():
            w = t.tensor.detach()
            return w if self.importance is None else self.importance(w)

    def _count(self, t: PruningTarget, sparsity: float, current: Tensor) -> int:
        """Additional entries (unstructured) or slices (structured) to prune to reach ``sparsity``."""
        if not self.structured:
            return count_for(sparsity, current.numel()) - mask_zeros(current)
        dim = self.kwargs.get("dim", -1) % current.dim()
        return count_for(sparsity, current.shape[dim]) - _pruned_slices(current, dim)

    def _compute(self, scores: Tensor, current: Tensor, name: str, amount: int | None) -> Tensor:
        kwargs = dict(self.kwargs)
        if amount is not None:
            kwargs["amount"] = amount
        method = self.cls(**kwargs)
        method._tensor_name = name
        container = prune.PruningContainer(method)
        default = current.to(device=scores.device, dtype=torch.float32)
        return _binary(container.compute_mask(scores, default_mask=default))

    def local_masks(
        self, targets: Sequence[PruningTarget], sparsities: Sequence[float | None], seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        # the method sees every weight as (out, in, ...): `dim=0` means output units, whatever the layout
        with _seeded(seed, targets):
            for t, s in zip(targets, sparsities):
                current = masks.mask(t)
                current = torch.ones_like(t.tensor, dtype=torch.uint8) if current is None else current
                current = to_out_in(current, t.layout)
                amount = None
                if self.takes_sparsity:
                    amount = self._count(t, s if s is not None else 0.0, current)
                    if amount <= 0:
                        continue
                mask = self._compute(to_out_in(self._scores(t), t.layout), current, t.param, amount)
                yield NewMask(t, to_out_in(mask, t.layout))

    def global_masks(
        self, targets: Sequence[PruningTarget], sparsity: float | None, seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        amount = None
        if self.takes_sparsity:
            total = sum(t.tensor.numel() for t in targets)
            amount = count_for(sparsity if sparsity is not None else 0.0, total) - sum(masks.pruned_counts(targets))
            if amount <= 0:
                return
        scores = torch.cat([self._scores(t).reshape(-1) for t in targets])
        current = torch.cat(
            [
                (m if (m := masks.mask(t)) is not None else torch.ones_like(t.tensor, dtype=torch.uint8)).reshape(-1)
                for t in targets
            ]
        )
        with _seeded(seed, targets):
            flat = self._compute(scores, current, "temp", amount)
        offset = 0
        for t in targets:
            n = t.tensor.numel()
            yield NewMask(t, flat[offset : offset + n].view(t.tensor.shape))
            offset += n


class _Builtin(NamedTuple):
    """A method given by name: how to build it, the ``method_kwargs`` it takes, whether it scores by magnitude (an
    ``importance`` function can replace the magnitude) or by chance (then ``importance`` means nothing)."""

    build: Callable[[Mapping[str, Any], ImportanceFn | None], PruningMethod]
    kwargs: frozenset[str]
    random: bool


_BUILTIN: dict[str, _Builtin] = {
    "l1_unstructured": _Builtin(
        lambda kw, imp: ScoreMethod(MagnitudeScores(imp), "l1_unstructured", zero_where_pruned=imp is None),
        frozenset(),
        random=False,
    ),
    "random_unstructured": _Builtin(
        lambda kw, imp: ScoreMethod(_random_scores, "random_unstructured"), frozenset(), random=True
    ),
    "ln_structured": _Builtin(
        lambda kw, imp: TorchMethod(prune.LnStructured, {"n": 2, "dim": 0, **kw}, imp),
        frozenset({"n", "dim"}),
        random=False,
    ),
    "random_structured": _Builtin(
        lambda kw, imp: TorchMethod(prune.RandomStructured, {"dim": 0, **kw}, imp), frozenset({"dim"}), random=True
    ),
}
if set(_BUILTIN) != set(get_args(MethodName)):  # pragma: no cover - a programming error in this module
    raise RuntimeError("lightning_prune.methods: _BUILTIN and MethodName disagree.")


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
        if kwargs or importance is not None:
            given = [n for n, v in (("method_kwargs", kwargs), ("importance", importance)) if v]
            raise ValueError(
                f"{given} configure a method given by name or class; `method={method.name}` is an object built "
                "already: pass its options to its constructor."
            )
        return method
    if isinstance(method, str):
        if method not in _BUILTIN:
            raise ValueError(
                f"`method` must be one of {sorted(_BUILTIN)} or a BasePruningMethod subclass, got {method!r}."
            )
        builtin = _BUILTIN[method]
        extra = set(kwargs) - builtin.kwargs
        if extra:
            raise ValueError(
                f"`method_kwargs` for {method!r} may hold {sorted(builtin.kwargs) or 'nothing'}, got {sorted(extra)}."
            )
        if importance is not None and builtin.random:
            raise ValueError(f"`importance` replaces the magnitude; it has no meaning with `method={method!r}`.")
        return builtin.build(kwargs, importance)
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
