"""The method contract: a method *decides* masks and never applies them.

Given the tensors, what is due and the masks kept so far (a :class:`MaskReader`, the
:class:`~lightning_prune.store.MaskStore`), a :class:`PruningMethod` yields a :class:`NewMask` per tensor that
changes; :func:`~lightning_prune.prune_step` narrows the store's masks and applies them. :func:`check_scope` is the
one place scopes are checked. The built-in methods are in :mod:`lightning_prune.methods.builtin`, the others in
their own modules of this package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

from torch import Tensor, nn

from lightning_prune._utils.checks import allowed, check_choice
from lightning_prune.collective import Collective
from lightning_prune.selection import PruningTarget

__all__ = ["ImportanceFn", "MaskReader", "NewMask", "PruningMethod", "Scope", "check_scope"]

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
    values: Tensor | None = None


class PruningMethod(ABC):
    """One way of choosing entries to prune, for a list of tensors at one scheduled step.

    Subclasses implement :meth:`local_masks`, and :meth:`global_masks` when they work in global scope: they read
    the masks kept so far from ``masks`` and yield one :class:`NewMask` per tensor whose mask changes (``uint8``
    or ``bool``); they never change a weight themselves (one that updates the weights it keeps gives their new
    values in :attr:`NewMask.values`). :func:`lightning_prune.prune_step` calls them.

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

        >>> from lightning_prune.methods import resolve_method
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
