"""One pruning step: the one place where masks are decided and applied.

The callback, one-shot pruning (:func:`prune_once`), sensitivity analysis, the benchmarks and the tests all
prune through :func:`prune_step`::

    targets and their cumulative sparsity due now
      -> the method decides new masks (magnitudes, random scores, activations, N:M groups, neurons, ...)
      -> the store narrows its masks and applies them (zeros in the weights and the optimizers' state)
      -> the measured report

Nothing else in the package decides or applies masks. Before any tensor changes, the step refuses what it
cannot do (a scope the method does not work in, weights that are NaN or infinite) with an error that says why;
:func:`check_reachable` refuses a target that would prune every entry of a tensor, for callers that plan ahead
(the callback, at ``fit`` and before each step).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune import Global, Local, MaskStore, select_parameters
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> targets, store = select_parameters(net), MaskStore()
    >>> report = prune_step("l1_unstructured", targets, Global(0.5), store)
    >>> report.zeros, report.numel, report.sparsity
    (40, 80, 0.5)
    >>> due = Local({"0.weight": 0.75, "2.weight": 0.5})  # each its own target, cumulative
    >>> report = prune_step("l1_unstructured", targets, due, store)
    >>> [t.zeros for t in report.tensors]
    [48, 8]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._utils.checks import check_fraction
from lightning_prune.allocation import Allocation
from lightning_prune.calibration import calibrate, default_forward
from lightning_prune.collective import Collective
from lightning_prune.counting import count_for
from lightning_prune.layers import is_stacked
from lightning_prune.methods import MethodName, PruningMethod, Scope, check_scope, resolve_method
from lightning_prune.methods.allocated import with_allocation
from lightning_prune.methods.wanda import Group, Wanda
from lightning_prune.report import SparsityReport, measure
from lightning_prune.selection import (
    ParameterSpec,
    PruningTarget,
    SparsitySpec,
    planned_targets,
    select_parameters,
)
from lightning_prune.shards import local_view
from lightning_prune.store import MaskStore
from lightning_prune.targets import Due, Global, Local, Trigger

__all__ = ["PruningError", "check_finite", "check_reachable", "due_for", "prune_once", "prune_step", "wanda_prune"]


class PruningError(ValueError):
    """A pruning step refused its input (weights that are NaN or infinite, a target that would prune every entry
    of a tensor); no tensor was pruned."""


def due_for(method: PruningMethod, targets: Sequence[PruningTarget], sparsity: float | None, scope: Scope) -> Due:
    """What a step to ``sparsity`` is due to reach: :class:`Trigger` for a method that takes no sparsity,
    :class:`Global` in global scope, else :class:`Local` with ``sparsity`` for every tensor.

    Raises:
        ValueError: for a scope that ``method`` does not work in, or no ``sparsity`` for a method that takes one.

    Example::

        >>> from torch import nn
        >>> from lightning_prune import select_parameters
        >>> from lightning_prune.methods import resolve_method
        >>> targets = select_parameters(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)))
        >>> due_for(resolve_method("l1_unstructured"), targets, 0.5, "local")
        Local(sparsity={'0.weight': 0.5, '1.weight': 0.5})
    """
    scope = check_scope(method, scope)
    if not method.takes_sparsity:
        return Trigger()
    if sparsity is None:
        raise ValueError(f"`method={method.name}` needs a `sparsity`.")
    return Global(sparsity) if scope == "global" else Local({t.name: sparsity for t in targets})


def _per_matrix(t: PruningTarget) -> int:
    """Entries of each matrix ``t`` holds: the whole tensor, or one expert's of a stacked tensor."""
    n = t.tensor.numel()
    return n // t.tensor.shape[0] if is_stacked(t.layout) else n


def check_reachable(method: PruningMethod, targets: Sequence[PruningTarget], due: Due | None) -> None:
    """Refuse a cumulative target that would prune every entry of a tensor (local; of an expert's matrix for a
    stacked tensor) or of all together (global).

    Raises:
        PruningError: naming the tensors.
    """
    if isinstance(due, Global):
        total = sum(t.tensor.numel() for t in targets)
        if count_for(due.sparsity, total) >= total:
            raise PruningError(
                f"A global target of {due.sparsity!r} would prune all {total} entries of the chosen tensors; give "
                "a lower `sparsity`."
            )
        return
    if not isinstance(due, Local) or method.structured:
        return
    empty = [
        (t.name, s, n) for t in targets if (s := due.get(t.name)) is not None and count_for(s, n := _per_matrix(t)) >= n
    ]
    if empty:
        raise PruningError(
            f"The target would prune every entry of {[name for name, _, _ in empty]} (sparsity "
            f"{max(s for _, s, _ in empty)!r} of {min(n for _, _, n in empty)} entries rounds to all of them); "
            "give a lower `sparsity`."
        )


def _due(method: PruningMethod, targets: Sequence[PruningTarget], sparsity: object, scope: Scope) -> Due:
    """:func:`due_for`, or each tensor's own target where ``sparsity`` was a mapping (resolved by the selection)."""
    if isinstance(sparsity, Mapping) and method.takes_sparsity:
        return Local({t.name: t.sparsity for t in targets if t.sparsity is not None})
    return due_for(method, targets, sparsity if isinstance(sparsity, float) else None, scope)


def check_finite(targets: Sequence[PruningTarget], group: Collective | None = None) -> None:
    """Refuse weights that hold NaN or infinite values, before any tensor is pruned.

    Raises:
        PruningError: naming the tensors.
    """
    flags = [int(not bool(torch.isfinite(local_view(t.tensor)).all())) for t in targets]
    if group is not None:
        flags = group.sum(flags)
    bad = [t.name for t, flag in zip(targets, flags) if flag]
    if bad:
        raise PruningError(
            f"{bad} hold NaN or infinite values; no tensor was pruned. Check the learning rate, the loss or the data."
        )


def prune_step(
    method: PruningMethod | MethodName,
    targets: Sequence[PruningTarget],
    due: Due,
    store: MaskStore,
    *,
    seed: int = 0,
    agree: Callable[[MaskStore, list[PruningTarget]], Any] | None = None,
) -> SparsityReport:
    """Bring ``targets`` to what is ``due``: ``method`` decides the new masks, ``store`` narrows its masks and
    applies them. Entries pruned before stay pruned; each step prunes exactly what the target needs beyond them
    (``round(sparsity * n)`` zeros in all, per tensor or overall).

    Args:
        method: a :class:`~lightning_prune.methods.PruningMethod` or a built-in method's name
            (``"l1_unstructured"``, ...). A method that observes activations must have seen its calibration batches
            (:mod:`lightning_prune.calibration`).
        targets: the tensors (from :func:`~lightning_prune.select_parameters`).
        due: :class:`~lightning_prune.targets.Local` (each tensor's cumulative target, by name; tensors not named
            stay as they are), :class:`~lightning_prune.targets.Global` (all together, one ranking) or
            :class:`~lightning_prune.targets.Trigger` (a method that takes no sparsity). :func:`due_for` builds one
            from a number and a scope.
        store: the masks kept so far (a fresh :class:`~lightning_prune.MaskStore` for a first step).
        seed: seeds random methods (the callback derives one per step from its own ``seed``).
        agree: called with the store and the masked tensors once the masks are decided and before any weight
            changes (the callback makes the processes of a DDP run agree there).

    Returns:
        The measured figures of ``targets`` after the step (each tensor's target with it, for ``Local``).

    Raises:
        ValueError: for a ``due`` whose scope ``method`` does not work in.
        PruningError: for weights that are NaN or infinite (nothing is pruned then). A target may prune every
            entry of a tensor here (a sensitivity sweep measures that); the callback refuses such a target with
            :func:`check_reachable` first.
    """
    method = resolve_method(method)
    check_scope(method, "global" if isinstance(due, Global) else "local")
    masked = method.masked(targets)
    check_finite(masked, store.group)
    goals: dict[str, float] = {}
    if isinstance(due, Global):
        decided = method.global_masks(targets, due.sparsity, seed, store)
    elif isinstance(due, Local):
        decided = method.local_masks(targets, [due.get(t.name) for t in targets], seed, store)
        goals = {t.name: s for t in targets if (s := due.get(t.name)) is not None}
    else:
        decided = method.local_masks(targets, [None] * len(targets), seed, store)
    for new in decided:
        if new.values is not None:  # a method that updates the weights it keeps (SparseGPT)
            with torch.no_grad():
                local_view(new.target.tensor).copy_(new.values)
        store.set(new.target, new.mask, new.zeros)
    if agree is not None:
        agree(store, masked)
    store.apply()
    return measure(targets, goals, store.group)


def prune_once(
    model: nn.Module,
    sparsity: SparsitySpec,
    *,
    method: PruningMethod | MethodName = "l1_unstructured",
    scope: Scope = "local",
    parameters: Sequence[ParameterSpec] | None = None,
    exclude: Sequence[str] = (),
    dataloader: Iterable[Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    seed: int = 0,
    allocation: Allocation = "global",
) -> dict[str, Tensor]:
    """Prune ``model`` once, in place and without training: one :func:`prune_step` of ``method`` to ``sparsity``.

    A method that observes activations (``Wanda``) first sees its ``calibration_batches`` batches of
    ``dataloader``, run through ``forward`` with the model in eval mode and gradients enabled (so that
    ``nn.TransformerEncoderLayer`` takes its ordinary path, which calls the hooked layers); nothing is
    trained. The pruned weights are set to zero; nothing else of the model changes.

    Args:
        model: the trained model (a ``LightningModule`` or any ``nn.Module``).
        sparsity: the fraction of zeros in [0, 1), of each tensor (``scope="local"``) or of all together
            (ignored by methods that take none, such as N:M); or a mapping of targets per tensor as
            :func:`~lightning_prune.select_parameters` takes it (local scope; e.g. a speed plan's ``sparsity``).
        method: as the callback's ``method`` (a name or a :class:`~lightning_prune.methods.PruningMethod`).
        scope: ``"local"`` or ``"global"``, as the callback's.
        parameters: as the callback's ``parameters`` (default: every matrix weight but embeddings and routers).
        exclude: names or glob patterns left dense, as the callback's ``exclude``.
        dataloader: calibration batches (needed by methods that observe activations).
        forward: ``forward(model, batch)`` runs one batch; default: ``model(batch[0])`` for a tuple or list
            batch, else ``model(batch)``, on the device of the model's parameters.
        seed: seeds random methods.
        allocation: with ``scope="global"``, how the target is shared out: ``"global"`` (one ranking),
            ``"uniform"``, ``"erk"`` or ``"owl"`` (see :mod:`lightning_prune.allocation`).

    Returns:
        ``{qualified name: uint8 mask}`` (1 = kept) of every chosen tensor that was pruned.

    Raises:
        ValueError: for a bad argument, a method/scope pair that does not go together, or a ``dataloader``
            missing or shorter than the calibration.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> masks = prune_once(net, 0.5, scope="global")
        >>> sorted(masks), int((net[0].weight == 0).sum() + (net[2].weight == 0).sum())
        (['0.weight', '2.weight'], 24)
    """
    sparsity = planned_targets(sparsity, model)[0]
    per_tensor = isinstance(sparsity, Mapping)
    if not per_tensor:
        sparsity = check_fraction("sparsity", sparsity)
    elif scope != "local":
        raise ValueError(f"A `sparsity` mapping gives each tensor its target: `scope` must be 'local', got {scope!r}.")
    method = with_allocation(resolve_method(method), allocation)
    check_scope(method, scope)
    targets = select_parameters(model, parameters, sparsity if per_tensor else None, exclude)
    window = None
    if method.calibration_batches:
        window = calibrate(model, method, method.masked(targets), dataloader, forward or default_forward)
    store = MaskStore()
    try:
        prune_step(method, targets, _due(method, targets, sparsity, scope), store, seed=seed)
    finally:
        if window is not None:
            window.close()
    return {t.name: mask for t, mask in store.items()}


def wanda_prune(
    model: nn.Module,
    dataloader: Iterable[Any],
    sparsity: float,
    *,
    parameters: Sequence[ParameterSpec] | None = None,
    group: Group = "row",
    batches: int = 8,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, Tensor]:
    """Prune a trained model once with :class:`Wanda` from ``batches`` batches of ``dataloader`` (no training).

    The same as ``prune_once(model, sparsity, method=Wanda(batches, group), scope=..., ...)``, with the scope
    that ``group`` needs. Returns ``{qualified name: uint8 mask}`` of the pruned tensors.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> masks = wanda_prune(net, [torch.randn(16, 4) for _ in range(2)], 0.5, batches=2)
        >>> [int((m == 0).sum(1).max()) for m in masks.values()]  # half of each row
        [2, 4]
    """
    scope: Scope = "global" if group == "global" else "local"
    return prune_once(
        model,
        sparsity,
        method=Wanda(batches, group),
        scope=scope,
        parameters=parameters,
        dataloader=dataloader,
        forward=forward,
    )
