"""What a pruning step is due to reach: one of three small types, never a flag.

* :class:`Local`: each tensor's own cumulative target, by qualified name (tensors not named are left as they are);
* :class:`Global`: one cumulative target for all the chosen tensors together (one ranking across them);
* :class:`Trigger`: prune now, for methods that take no sparsity (N:M, a ``BasePruningMethod`` without
  ``amount``); ``progress`` says how far along its schedule the run is, so that a step fires once per point.

:class:`~lightning_prune.schedules.TargetPlan` returns them, :func:`~lightning_prune.prune_step` and
:func:`~lightning_prune.step.check_reachable` take them and dispatch on the type once. All three share one small
protocol (:meth:`scaled`, :meth:`beyond`, :meth:`at_least`, :meth:`overall`), pure arithmetic on names and sizes.

Example::

    >>> Local({"a": 0.5, "b": 0.25}).overall({"a": 10, "b": 30})
    0.3125
    >>> Global(0.8).beyond(Global(0.5)), Global(0.5).beyond(Global(0.5))
    (True, False)
    >>> Trigger(1.0).beyond(None)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["Due", "Global", "Local", "Trigger"]

_EPS = 1e-12


@dataclass(frozen=True)
class Local:
    """Each tensor to its own cumulative target (a fraction in [0, 1]), by qualified name."""

    sparsity: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", dict(self.sparsity))  # a copy: the caller's dict may change

    def scaled(self, by: Callable[[float], float]) -> Local:
        """Each final target through ``by`` (a schedule at one point)."""
        return Local({name: by(s) for name, s in self.sparsity.items()})

    def beyond(self, reached: Due | None) -> bool:
        """Whether some tensor's target goes beyond what ``reached`` holds."""
        before = reached.sparsity if isinstance(reached, Local) else {}
        return any(s > before.get(name, 0.0) + _EPS for name, s in self.sparsity.items())

    def at_least(self, reached: Due | None) -> Local:
        """These targets, never below those ``reached``."""
        before = reached.sparsity if isinstance(reached, Local) else {}
        return Local({name: max(s, before.get(name, 0.0)) for name, s in self.sparsity.items()})

    def overall(self, sizes: Mapping[str, int]) -> float:
        """The targets as one fraction of all entries (size-weighted; tensors not named count as 0)."""
        total = sum(sizes.values())
        return sum(self.sparsity.get(n, 0.0) * k for n, k in sizes.items()) / total if total else 0.0

    def get(self, name: str) -> float | None:
        """The target of tensor ``name``, or ``None`` when it has none."""
        return self.sparsity.get(name)


@dataclass(frozen=True)
class Global:
    """All chosen tensors together to one cumulative target (a fraction in [0, 1])."""

    sparsity: float = 0.0

    def scaled(self, by: Callable[[float], float]) -> Global:
        return Global(by(self.sparsity))

    def beyond(self, reached: Due | None) -> bool:
        before = reached.sparsity if isinstance(reached, Global) else 0.0
        return self.sparsity > before + _EPS

    def at_least(self, reached: Due | None) -> Global:
        before = reached.sparsity if isinstance(reached, Global) else 0.0
        return Global(max(self.sparsity, before))

    def overall(self, sizes: Mapping[str, int]) -> float:
        return self.sparsity


@dataclass(frozen=True)
class Trigger:
    """Prune now, with a method that takes no sparsity; ``progress`` is how far along its schedule (1.0 at the
    end): a step is due when the schedule's progress goes beyond the progress of the last step."""

    progress: float = 1.0

    def scaled(self, by: Callable[[float], float]) -> Trigger:
        return Trigger(by(self.progress))

    def beyond(self, reached: Due | None) -> bool:
        before = reached.progress if isinstance(reached, Trigger) else 0.0
        return self.progress > before + _EPS

    def at_least(self, reached: Due | None) -> Trigger:
        before = reached.progress if isinstance(reached, Trigger) else 0.0
        return Trigger(max(self.progress, before))

    def overall(self, sizes: Mapping[str, int]) -> float:
        raise TypeError("A Trigger carries no sparsity: the method decides how much it prunes.")


Due = Local | Global | Trigger
"""What one pruning step is due to reach."""
