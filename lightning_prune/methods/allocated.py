"""A global target shared out across tensors by a rule (``allocation="uniform"``, ``"erk"``, ``"owl"``).

:class:`AllocatedMethod` wraps an unstructured method that works per tensor (magnitude, random, an importance
function, ``Wanda(group="tensor")``): at each step of a global schedule it turns the cumulative global target
into exact per-tensor counts with :mod:`lightning_prune.allocation` (summing to ``round(s * N)``, never below
what a tensor has pruned already) and lets the wrapped method prune each tensor to its count. The callback and
:func:`~lightning_prune.prune_once` build it from their ``allocation=`` argument (with ``scope="global"``);
``allocation="global"`` is today's single ranking, and needs no wrapper.

``"owl"`` reads the outlier ratio of each tensor from the wrapped method's activation scores (it needs
:class:`~lightning_prune.Wanda`, whose calibration window supplies them): the fraction of the entries whose
score ``|W| * sqrt(mean x^2)`` passes ``outlier_factor`` times the tensor's mean score (OWL's ``M``).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune import Global, MaskStore, prune_step, select_parameters
    >>> from lightning_prune.methods import resolve_method
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> method = with_allocation(resolve_method("l1_unstructured"), "erk")
    >>> report = prune_step(method, select_parameters(net), Global(0.9), MaskStore())
    >>> report.zeros, [t.zeros for t in report.tensors]
    (576, [475, 101])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._utils.checks import allowed, check_choice, check_number
from lightning_prune._utils.lightning import rank_zero_info
from lightning_prune.allocation import Allocation, erk_counts, owl_counts, uniform_counts
from lightning_prune.collective import Collective
from lightning_prune.methods import MaskReader, NewMask, PruningMethod
from lightning_prune.selection import PruningTarget
from lightning_prune.shards import local_view

__all__ = ["Allocation", "AllocatedMethod", "outlier_ratio", "with_allocation"]


def outlier_ratio(scores: Tensor, factor: float = 5.0) -> tuple[int, int]:
    """``(entries whose score passes factor * mean score, entries)`` of one tensor's scores (OWL's outliers).

    >>> outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0]))
    (1, 10)
    """
    s = scores.detach().float().reshape(-1)
    if s.numel() == 0:
        return 0, 0
    return int(torch.count_nonzero(s > factor * s.mean())), s.numel()


class AllocatedMethod(PruningMethod):
    """``inner`` pruning each tensor to its share of one global target, the shares set by ``allocation``.

    Args:
        inner: a method that works in local scope, takes a sparsity and is unstructured.
        allocation: ``"uniform"``, ``"erk"`` or ``"owl"`` (see :mod:`lightning_prune.allocation`).
        owl_lambda: OWL's half-spread of the densities (0.08).
        outlier_factor: OWL's ``M``: a score is an outlier above ``M`` times its tensor's mean (5.0).
        final: the final global target, when known: :meth:`setup` prints the per-tensor targets for it.
        verbose: print them (on rank zero) when ``fit`` starts.

    Raises:
        ValueError: for a method that cannot take per-tensor targets, an unknown ``allocation``, or
            ``"owl"`` with a method that has no activation scores.
    """

    scopes = ("global",)

    def __init__(
        self,
        inner: PruningMethod,
        allocation: Allocation,
        owl_lambda: float = 0.08,
        outlier_factor: float = 5.0,
        final: float | None = None,
        verbose: bool = False,
    ) -> None:
        allocation = check_choice("allocation", allocation, allowed(Allocation))
        if allocation == "global":
            raise ValueError("`allocation='global'` is the single ranking of scope='global': no wrapper is needed.")
        if "local" not in inner.scopes or inner.structured or not inner.takes_sparsity:
            raise ValueError(
                f"`allocation={allocation!r}` gives each tensor its own target: it needs an unstructured method that "
                f"prunes each tensor to a sparsity (in local scope), got method={inner.name}."
            )
        if allocation == "owl" and not callable(getattr(inner, "scores", None)):
            raise ValueError(
                "`allocation='owl'` reads activation outliers: it needs `method=Wanda(group='tensor')` (or "
                f"group='row'), whose calibration window observes them, got method={inner.name}."
            )
        self.inner = inner
        self.allocation: Allocation = allocation
        self.owl_lambda = check_number("owl_lambda", owl_lambda, low=0.0, high=0.5)
        self.outlier_factor = check_number("outlier_factor", outlier_factor, low=0.0, low_open=True)
        self.name = f"{inner.name}+{allocation}"
        self.supports_sharding = inner.supports_sharding and allocation != "owl"
        self.calibration_batches = inner.calibration_batches
        self.per_tensor = inner.per_tensor
        self.last_counts: dict[str, int] = {}  # the per-tensor counts of the latest step, by tensor name
        self.final = final
        self.verbose = verbose

    def scope_error(self, scope: str) -> str:
        return (
            f"`allocation={self.allocation!r}` shares one global target out across the tensors: it needs "
            f"scope='global', got scope={scope!r}."
        )

    # -- everything but the decision goes to the wrapped method

    def setup(self, pl_module: nn.Module, targets: Sequence[PruningTarget]) -> None:
        self.inner.setup(pl_module, targets)
        if self.verbose:
            rank_zero_info(f"PruningScheduleCallback: {self.describe(targets, self.final)}")

    def masked(self, targets: Sequence[PruningTarget]) -> list[PruningTarget]:
        return self.inner.masked(targets)

    def metrics(self, masks: MaskReader) -> dict[str, float]:
        return self.inner.metrics(masks)

    def start_calibration(self, pl_module: nn.Module, targets: Sequence[PruningTarget], resume: bool = False) -> None:
        self.inner.start_calibration(pl_module, targets, resume)

    def calibration_done(self) -> bool:
        return self.inner.calibration_done()

    def finish_calibration(self, reduce: Callable[[Tensor], Tensor]) -> None:
        self.inner.finish_calibration(reduce)

    def stop_calibration(self) -> None:
        self.inner.stop_calibration()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def local_masks(
        self, targets: Sequence[PruningTarget], sparsities: Sequence[float | None], seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        return self.inner.local_masks(targets, sparsities, seed, masks)

    # -- the decision

    def counts(
        self, targets: Sequence[PruningTarget], sparsity: float, pruned: Sequence[int] | None = None, group: Any = None
    ) -> list[int]:
        """The zeros each tensor holds after a step to the global ``sparsity`` (summing to ``round(s * N)``)."""
        sizes = [t.tensor.numel() for t in targets]
        if self.allocation == "uniform":
            return uniform_counts(sizes, sparsity, pruned)
        if self.allocation == "erk":
            return erk_counts([tuple(t.tensor.shape) for t in targets], sparsity, pruned)
        ratios = self.outlier_ratios(targets, group)
        return owl_counts(sizes, [ratios[t.name] for t in targets], sparsity, pruned, self.owl_lambda)

    def outlier_ratios(self, targets: Sequence[PruningTarget], group: Collective | None = None) -> dict[str, float]:
        """Each tensor's OWL outlier ratio from the wrapped method's current scores (after its window)."""
        scores: Callable[..., Tensor] = self.inner.scores  # type: ignore[attr-defined]
        pairs = [outlier_ratio(local_view(scores(t, 0)), self.outlier_factor) for t in targets]
        if group is not None:
            flat = group.sum([v for pair in pairs for v in pair])
            pairs = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(targets))]
        return {t.name: (hits / n if n else 0.0) for t, (hits, n) in zip(targets, pairs)}

    def global_masks(
        self, targets: Sequence[PruningTarget], sparsity: float | None, seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        pruned = masks.pruned_counts(targets)
        counts = self.counts(targets, 0.0 if sparsity is None else sparsity, pruned, masks.group)
        self.last_counts = {t.name: c for t, c in zip(targets, counts)}
        # k / n is the fraction whose count_for(., n) is k again (exact in float64 for any tensor size here)
        shares = [c / t.tensor.numel() for t, c in zip(targets, counts)]
        return self.inner.local_masks(targets, shares, seed, masks)

    def describe(self, targets: Sequence[PruningTarget], sparsity: float | None) -> str:
        """One line of the per-tensor targets at ``sparsity`` (static allocations; OWL's depend on activations)."""
        if sparsity is None:
            return f"allocation {self.allocation}: per-tensor targets set at each step"
        if self.allocation == "owl":
            return f"allocation owl (lambda {self.owl_lambda:g}, M {self.outlier_factor:g}): set at each step"
        counts = self.counts(targets, sparsity)
        parts = [f"{t.name} {c / t.tensor.numel():.4f}" for t, c in zip(targets, counts)]
        return f"allocation {self.allocation} of {sparsity:g}: " + ", ".join(parts)

    def __repr__(self) -> str:
        return self.name


def with_allocation(
    method: PruningMethod, allocation: Allocation | None, final: object = None, verbose: bool = False
) -> PruningMethod:
    """``method`` itself for ``allocation`` ``None`` or ``"global"``, else an :class:`AllocatedMethod` around it
    (``final``: the final global target when it is a number, printed per tensor when ``fit`` starts if ``verbose``).

    Raises:
        ValueError: for an unknown ``allocation`` or a method it cannot wrap.

    >>> from lightning_prune.methods import resolve_method
    >>> with_allocation(resolve_method("l1_unstructured"), "uniform")
    l1_unstructured+uniform
    """
    if allocation is None or allocation == "global":
        return method
    known = float(final) if isinstance(final, (int, float)) and not isinstance(final, bool) else None
    return AllocatedMethod(method, allocation, final=known, verbose=verbose)
