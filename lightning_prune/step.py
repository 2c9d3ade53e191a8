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
    >>> from lightning_prune import MaskStore, select_parameters
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> targets, store = select_parameters(net), MaskStore()
    >>> report = prune_step("l1_unstructured", targets, 0.5, store, scope="global")
    >>> report.zeros, report.numel, report.sparsity
    (40, 80, 0.5)
    >>> report = prune_step("l1_unstructured", targets, [0.75, 0.5], store)  # each its own target, cumulative
    >>> [t.zeros for t in report.tensors]
    [48, 8]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._checks import check_fraction
from lightning_prune.allocated import with_allocation  # issue 29: allocation
from lightning_prune.allocation import Allocation  # issue 29: allocation
from lightning_prune.calibration import calibrate, default_forward
from lightning_prune.collective import Collective
from lightning_prune.counting import count_for
from lightning_prune.methods import MethodName, PruningMethod, Scope, check_scope, resolve_method
from lightning_prune.report import SparsityReport, measure
from lightning_prune.selection import ParameterSpec, PruningTarget, local_view, select_parameters
from lightning_prune.store import MaskStore

__all__ = ["PruningError", "check_finite", "check_reachable", "prune_once", "prune_step"]

SparsityDue = float | Sequence[float | None] | None


class PruningError(ValueError):
    """A pruning step refused its input (weights that are NaN or infinite, a target that would prune every entry
    of a tensor); no tensor was pruned."""


def _per_target(targets: Sequence[PruningTarget], sparsity: SparsityDue) -> list[float | None]:
    if sparsity is None or isinstance(sparsity, (int, float)) or not isinstance(sparsity, Sequence):
        return [None if sparsity is None else float(sparsity)] * len(targets)  # type: ignore[arg-type]
    if len(sparsity) != len(targets):
        raise ValueError(f"Expected one sparsity per target, got {len(sparsity)} for {len(targets)} targets.")
    return [None if s is None else float(s) for s in sparsity]


def check_reachable(
    method: PruningMethod, targets: Sequence[PruningTarget], sparsity: SparsityDue, scope: Scope = "local"
) -> None:
    """Refuse a cumulative target that would prune every entry of a tensor (local) or of all together (global).

    Raises:
        PruningError: naming the tensors.
    """
    if not method.takes_sparsity:
        return
    sizes = [t.tensor.numel() for t in targets]
    if scope == "global":
        total = sum(sizes)
        s = _per_target(targets[:1], sparsity)[0] if targets else None
        if s is not None and count_for(s, total) >= total:
            raise PruningError(
                f"A global target of {s!r} would prune all {total} entries of the chosen tensors; give a lower "
                "`sparsity`."
            )
        return
    if method.structured:
        return
    due = _per_target(targets, sparsity)
    empty = [(t.name, s, n) for t, s, n in zip(targets, due, sizes) if s is not None and count_for(s, n) >= n]
    if empty:
        raise PruningError(
            f"The target would prune every entry of {[name for name, _, _ in empty]} (sparsity "
            f"{max(s for _, s, _ in empty)!r} of {min(n for _, _, n in empty)} entries rounds to all of them); "
            "give a lower `sparsity`."
        )


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
    sparsity: SparsityDue,
    store: MaskStore,
    *,
    scope: Scope = "local",
    seed: int = 0,
    agree: Callable[[MaskStore, list[PruningTarget]], Any] | None = None,
) -> SparsityReport:
    """Bring ``targets`` to the cumulative ``sparsity`` due now: ``method`` decides the new masks, ``store`` narrows
    its masks and applies them. Entries pruned before stay pruned; each step prunes exactly what the target
    needs beyond them (``round(sparsity * n)`` zeros in all, per tensor or overall).

    Args:
        method: a :class:`~lightning_prune.methods.PruningMethod` or a built-in method's name
            (``"l1_unstructured"``, ...). A method that observes activations must have seen its calibration batches
            (:mod:`lightning_prune.calibration`).
        targets: the tensors (from :func:`~lightning_prune.select_parameters`).
        sparsity: the cumulative fraction of zeros due now: one number (each tensor in local scope; all together
            in global scope), one per target (local scope), or ``None`` for a method that takes none.
        store: the masks kept so far (a fresh :class:`~lightning_prune.MaskStore` for a first step).
        scope: ``"local"`` or ``"global"``.
        seed: seeds random methods (the callback derives one per step from its own ``seed``).
        agree: called with the store and the masked tensors once the masks are decided and before any weight
            changes (the callback makes the processes of a DDP run agree there).

    Returns:
        The measured figures of ``targets`` after the step (each tensor's target with it, in local scope).

    Raises:
        ValueError: for a scope that ``method`` does not work in.
        PruningError: for weights that are NaN or infinite (nothing is pruned then). A target may prune every
            entry of a tensor here (a sensitivity sweep measures that); the callback refuses such a target with
            :func:`check_reachable` first.
    """
    method = resolve_method(method)
    scope = check_scope(method, scope)
    masked = method.masked(targets)
    check_finite(masked, store.group)
    if scope == "global":
        decided = method.global_masks(targets, _per_target(targets[:1], sparsity)[0], seed, store)
        goals: dict[str, float] = {}
    else:
        due = _per_target(targets, sparsity)
        decided = method.local_masks(targets, due, seed, store)
        goals = {t.name: s for t, s in zip(targets, due) if s is not None}
    for new in decided:
        store.set(new.target, new.mask, new.zeros)
    if agree is not None:
        agree(store, masked)
    store.apply()
    return measure(targets, goals, store.group)


def prune_once(
    model: nn.Module,
    sparsity: float,
    *,
    method: PruningMethod | MethodName = "l1_unstructured",
    scope: Scope = "local",
    parameters: Sequence[ParameterSpec] | None = None,
    dataloader: Iterable[Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    seed: int = 0,
    allocation: Allocation = "global",  # issue 29
) -> dict[str, Tensor]:
    """Prune ``model`` once, in place and without training: one :func:`prune_step` of ``method`` to ``sparsity``.

    A method that observes activations (``Wanda``) first sees its ``calibration_batches`` batches of
    ``dataloader``, run through ``forward`` with the model in eval mode and gradients enabled (so that
    ``nn.TransformerEncoderLayer`` takes its ordinary path, which calls the hooked layers); nothing is
    trained. The pruned weights are set to zero; nothing else of the model changes.

    Args:
        model: the trained model (a ``LightningModule`` or any ``nn.Module``).
        sparsity: the fraction of zeros in [0, 1), of each tensor (``scope="local"``) or of all together
            (ignored by methods that take none, such as N:M).
        method: as the callback's ``method`` (a name or a :class:`~lightning_prune.methods.PruningMethod`).
        scope: ``"local"`` or ``"global"``, as the callback's.
        parameters: as the callback's ``parameters`` (default: every matrix weight but embeddings).
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
    sparsity = check_fraction("sparsity", sparsity)
    method = with_allocation(resolve_method(method), allocation)  # issue 29
    scope = check_scope(method, scope)
    targets = select_parameters(model, parameters)
    window = None
    if method.calibration_batches:
        window = calibrate(model, method, method.masked(targets), dataloader, forward or default_forward)
    store = MaskStore()
    try:
        prune_step(method, targets, sparsity if method.takes_sparsity else None, store, scope=scope, seed=seed)
    finally:
        if window is not None:
            window.close()
    return {t.name: mask for t, mask in store.items()}
