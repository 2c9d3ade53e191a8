"""When to prune and to what cumulative sparsity: pure, Trainer-free schedule objects.

A schedule maps a point of training, measured in (possibly fractional) epochs, and a final target
sparsity to the cumulative sparsity that must hold from that point on. "Epoch ``e``" means *before the
training batches of epoch* ``e``, so epoch ``e`` trains and validates the pruned model.

Every value is a *cumulative* sparsity, the fraction of entries that are zero, never torch's per-call
``amount``. The callback turns it into an exact number of entries per step.

Example::

    >>> from lightning_prune.schedules import AtEpochs, OneShot, Polynomial
    >>> OneShot(epoch=1).sparsity(0, final=0.5), OneShot(epoch=1).sparsity(1, final=0.5)
    (0.0, 0.5)
    >>> [round(AtEpochs([1, 2, 3]).sparsity(e, final=0.6), 3) for e in range(5)]
    [0.0, 0.2, 0.4, 0.6, 0.6]
    >>> [round(Polynomial(start_epoch=0, end_epoch=4, power=1).sparsity(e, final=0.8), 2) for e in range(6)]
    [0.0, 0.2, 0.4, 0.6, 0.8, 0.8]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_prune._utils.checks import check_fraction, check_int, check_number
from lightning_prune.targets import Due, Global, Local, Trigger

__all__ = [
    "AtEpochs",
    "FunctionSchedule",
    "OneShot",
    "Polynomial",
    "Schedule",
    "ScheduleLike",
    "Progress",
    "TargetPlan",
    "as_schedule",
    "ends_too_early",
    "resolve_sparsity",
]

_EPS = 1e-12


def _check_epoch(name: str, value: object) -> int:
    return check_int(name, value, minimum=0)


class Schedule(ABC):
    """Base class: a pure function from training progress to a cumulative target sparsity.

    Subclasses implement :meth:`sparsity` and :attr:`last_epoch`. ``every_n_steps`` (``None`` for
    epoch-level schedules) asks the callback to also re-evaluate the schedule every that many optimizer
    steps, with ``epoch`` then fractional (``epoch + steps_done_in_epoch / steps_per_epoch``).
    """

    every_n_steps: int | None = None

    @abstractmethod
    def sparsity(self, epoch: float, final: float) -> float:
        """The cumulative sparsity that must hold from ``epoch`` on, for a final target ``final``."""

    @property
    @abstractmethod
    def last_epoch(self) -> int | None:
        """The epoch at whose start the final target is reached (``None``: unknown)."""

    @property
    def final_sparsity(self) -> float | None:
        """The absolute final sparsity the schedule itself defines, if any (``None``: given by the callback)."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class OneShot(Schedule):
    """Prune to the full target once, before the training batches of ``epoch``.

    Args:
        epoch: the epoch (0-based) at whose start the model is pruned.

    Raises:
        ValueError: if ``epoch`` is not a non-negative integer.

    Example::

        >>> [OneShot(epoch=2).sparsity(e, final=0.9) for e in range(4)]
        [0.0, 0.0, 0.9, 0.9]
    """

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = _check_epoch("epoch", epoch)

    def sparsity(self, epoch: float, final: float) -> float:
        return final if epoch >= self.epoch else 0.0

    @property
    def last_epoch(self) -> int:
        return self.epoch


class AtEpochs(Schedule):
    """Prune at the given epochs, each step a cumulative target.

    Args:
        epochs: either a strictly increasing list of epochs, over which the final target is spread evenly
            (``[1, 2, 3]`` with a target of 0.6 gives 0.2, 0.4, 0.6), or a mapping from epoch to a
            cumulative *absolute* sparsity (``{1: 0.3, 2: 0.6, 3: 0.8}``), non-decreasing in the epoch.
            With a mapping, the callback's ``sparsity`` may be left out (it is the last value); when it is
            a per-layer mapping, each layer follows the same shape scaled to its own target
            (``value / last value * layer target``).

    Raises:
        ValueError: for an empty list, epochs that are negative or not strictly increasing, or
            targets outside [0, 1) or decreasing.

    Example::

        >>> s = AtEpochs({1: 0.3, 2: 0.6, 3: 0.8})
        >>> [s.sparsity(e, final=0.8) for e in range(5)]
        [0.0, 0.3, 0.6, 0.8, 0.8]
    """

    def __init__(self, epochs: Sequence[int] | Mapping[int, float]) -> None:
        if isinstance(epochs, Mapping):
            keys = [_check_epoch("epochs", e) for e in epochs]
            targets = [check_fraction(f"epochs[{e}]", epochs[e]) for e in keys]
        else:
            if isinstance(epochs, (str, bytes)) or not isinstance(epochs, Sequence):
                raise ValueError(f"`epochs` must be a list of epochs or a mapping epoch -> sparsity, got {epochs!r}.")
            keys = [_check_epoch("epochs", e) for e in epochs]
            targets = None
        if not keys:
            raise ValueError("`epochs` must name at least one epoch, got an empty collection.")
        if any(b <= a for a, b in zip(keys, keys[1:])):
            raise ValueError(f"`epochs` must be strictly increasing, got {keys}.")
        if targets is not None:
            if any(b < a for a, b in zip(targets, targets[1:])):
                raise ValueError(f"`epochs` targets must be non-decreasing (cumulative), got {targets}.")
            if targets[-1] <= 0.0:
                raise ValueError(f"The last target of `epochs` must be above 0, got {targets[-1]}.")
        self.epochs: list[int] = keys
        self.targets: list[float] | None = targets

    def sparsity(self, epoch: float, final: float) -> float:
        done = sum(1 for e in self.epochs if e <= epoch)
        if done == 0:
            return 0.0
        if self.targets is None:
            return final * done / len(self.epochs)
        return self.targets[done - 1] * (final / self.targets[-1])

    @property
    def last_epoch(self) -> int:
        return self.epochs[-1]

    @property
    def final_sparsity(self) -> float | None:
        return None if self.targets is None else self.targets[-1]


class Polynomial(Schedule):
    """Zhu & Gupta's (2017) gradual schedule: ``s_t = s_f + (s_i - s_f) (1 - p)^power``.

    ``p`` is the progress from ``start_epoch`` (0) to ``end_epoch`` (1). Before ``start_epoch`` nothing is
    pruned; from ``end_epoch`` on, the final target holds. ``power=3`` is the paper's cubic ramp, which
    prunes fast while many redundant weights remain and slowly near the end; ``power=1`` is linear.

    Args:
        start_epoch: the epoch at whose start the ramp begins (target ``initial_sparsity`` there).
        end_epoch: the epoch at whose start the final target is reached; must be after ``start_epoch``.
        every_n_steps: also prune every that many optimizer steps inside the ramp; ``None`` (default)
            prunes once an epoch, at each epoch start.
        power: the ramp's exponent, > 0.
        initial_sparsity: absolute sparsity at ``start_epoch``, in [0, 1); capped at each target.

    Raises:
        ValueError: for negative epochs, ``start_epoch >= end_epoch``, a non-positive ``every_n_steps`` or
            ``power``, or an ``initial_sparsity`` outside [0, 1).

    Example::

        >>> s = Polynomial(start_epoch=1, end_epoch=3, power=3)
        >>> [round(s.sparsity(e, final=0.8), 2) for e in (0, 1, 1.5, 2, 2.5, 3, 4)]
        [0.0, 0.0, 0.46, 0.7, 0.79, 0.8, 0.8]
    """

    def __init__(
        self,
        start_epoch: int,
        end_epoch: int,
        every_n_steps: int | None = None,
        power: float = 3.0,
        initial_sparsity: float = 0.0,
    ) -> None:
        self.start_epoch = _check_epoch("start_epoch", start_epoch)
        self.end_epoch = _check_epoch("end_epoch", end_epoch)
        if self.start_epoch >= self.end_epoch:
            raise ValueError(
                f"`start_epoch` must be before `end_epoch`, got start_epoch={start_epoch}, end_epoch={end_epoch}."
            )
        self.every_n_steps = None if every_n_steps is None else check_int("every_n_steps", every_n_steps, minimum=1)
        self.power = check_number("power", power, low=0.0, low_open=True)
        self.initial_sparsity = check_fraction("initial_sparsity", initial_sparsity)

    def sparsity(self, epoch: float, final: float) -> float:
        if epoch < self.start_epoch:
            return 0.0
        p = min(1.0, (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch))
        initial = min(self.initial_sparsity, final)
        return final + (initial - final) * (1.0 - p) ** self.power

    @property
    def last_epoch(self) -> int:
        return self.end_epoch


class FunctionSchedule(Schedule):
    """Wrap a plain function ``f(epoch) -> cumulative sparsity``, evaluated at each epoch start.

    The function's value is absolute: it is the target for every chosen tensor (local scope) or for all of
    them together (global scope); a decrease is ignored, since pruned entries stay pruned. ``last_epoch``
    is unknown, so no
    ``max_epochs`` check is made.

    Example::

        >>> s = FunctionSchedule(lambda epoch: min(0.5, 0.1 * epoch))
        >>> [s.sparsity(e, final=0.5) for e in (0, 3, 9)]
        [0.0, 0.30000000000000004, 0.5]
    """

    def __init__(self, fn: Callable[[int], float]) -> None:
        if not callable(fn):
            raise ValueError(f"`schedule` must be a Schedule or a callable f(epoch) -> sparsity, got {fn!r}.")
        self.fn = fn

    def sparsity(self, epoch: float, final: float) -> float:
        return check_fraction(f"schedule({int(epoch)})", self.fn(int(epoch)))

    @property
    def last_epoch(self) -> int | None:
        return None

    def __repr__(self) -> str:
        # the function's import path, never its memory address: the callback's checkpoint key is built from
        # this and must be the same in every process
        fn = self.fn
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        return f"FunctionSchedule(fn={getattr(fn, '__module__', None) or type(fn).__module__}.{name})"


ScheduleLike = Schedule | Callable[[int], float]


def as_schedule(schedule: ScheduleLike) -> Schedule:
    """Return ``schedule`` as a :class:`Schedule`, wrapping a plain callable in :class:`FunctionSchedule`."""
    return schedule if isinstance(schedule, Schedule) else FunctionSchedule(schedule)


def ends_too_early(schedule: Schedule, max_epochs: int | None) -> str | None:
    """What to warn of when training for ``max_epochs`` (``None`` or -1: no limit) ends before ``schedule``
    reaches its final target, else ``None``.

    Example::

        >>> ends_too_early(Polynomial(1, 5), 5)[:46]
        'Polynomial(start_epoch=1, end_epoch=5, every_n'
        >>> ends_too_early(Polynomial(1, 5), 6) is None
        True
    """
    last, epochs = schedule.last_epoch, -1 if max_epochs is None else max_epochs
    if last is None or not 0 <= epochs <= last:
        return None
    return (
        f"{schedule!r} reaches its final target at the start of epoch {last}, but `max_epochs` is {epochs}: "
        "training ends first (fine if the run will be resumed for longer)."
    )


def resolve_sparsity(
    sparsity: float | Mapping[Any, float] | None,
    schedule: Schedule,
    method_name: str,
    takes_sparsity: bool,
    scope: str = "local",
) -> float | dict[Any, float] | None:
    """The callback's final ``sparsity`` from its argument and its schedule: a fraction in [0, 1), a per-layer
    mapping (checked against the model later), the schedule's own last target, or ``None`` for a method that takes
    none.

    Raises:
        ValueError: for a value outside [0, 1), a ``sparsity`` beside a method that takes none, a ``sparsity``
            that differs from the schedule's own last target, none where one is needed, or a per-layer mapping in
            global scope or with a plain-function schedule.

    Example::

        >>> resolve_sparsity(None, AtEpochs({1: 0.3, 2: 0.6}), "l1_unstructured", True)
        0.6
    """
    if isinstance(sparsity, Mapping):
        if scope == "global":
            raise ValueError("A per-layer `sparsity` mapping needs `scope='local'`; global scope takes one target.")
        if isinstance(schedule, FunctionSchedule):
            raise ValueError(
                "A plain-function `schedule` returns one sparsity for all tensors; use a Schedule object "
                "(OneShot, AtEpochs, Polynomial) with a per-layer `sparsity` mapping."
            )
        if not takes_sparsity:
            raise ValueError(
                f"`sparsity` has no effect with `method={method_name}`, whose constructor takes no "
                f"`amount`; leave it out, got a per-layer mapping {dict(sparsity)!r}."
            )
        return dict(sparsity)
    if sparsity is not None:
        sparsity = check_fraction("sparsity", sparsity)
    if not takes_sparsity:
        if sparsity is not None:
            raise ValueError(
                f"`sparsity` has no effect with `method={method_name}`, whose constructor takes no `amount`; "
                f"leave it out, got {sparsity!r}."
            )
        return None
    defined = schedule.final_sparsity
    if defined is not None:
        if sparsity is not None and abs(sparsity - defined) > 1e-9:
            raise ValueError(
                f"`sparsity`={sparsity!r} differs from the schedule's last target {defined!r}; give one of them."
            )
        return defined
    if sparsity is None and not isinstance(schedule, FunctionSchedule):
        raise ValueError(f"`sparsity` is required with `method={method_name}` and {schedule!r}.")
    return sparsity


class TargetPlan:
    """The cumulative targets of one run, read from its schedule: those due at a point of training beyond the ones
    reached, the final ones, and their size-weighted overall value. Pure arithmetic on names and sizes.

    Args:
        schedule: when, and how far.
        finals: the final targets: :class:`~lightning_prune.targets.Local` (each tensor's, by name),
            :class:`~lightning_prune.targets.Global` (all tensors together) or
            :class:`~lightning_prune.targets.Trigger` (a method that takes no sparsity: the schedule says when).
        sizes: each tensor's number of entries, by name.

    Example::

        >>> plan = TargetPlan(AtEpochs([1, 2]), Local({"a": 0.8, "b": 0.4}), {"a": 30, "b": 10})
        >>> plan.due(1.0, None)
        Local(sparsity={'a': 0.4, 'b': 0.2})
        >>> reached = Local({"a": 0.4, "b": 0.2})
        >>> plan.due(1.0, reached) is None, plan.overall(reached)
        (True, 0.35)
        >>> plan.short_of(reached)  # the planned overall target, not reached
        0.7
        >>> TargetPlan(AtEpochs([1, 2]), Global(0.8), {"a": 30}).due(2.0, Global(0.4))
        Global(sparsity=0.8)
    """

    def __init__(self, schedule: Schedule, finals: Due, sizes: Mapping[str, int]) -> None:
        self.schedule = schedule
        self.finals = finals
        self.sizes = dict(sizes)

    def at(self, epoch: float) -> Due:
        """The cumulative targets the schedule asks for at ``epoch``."""
        return self.finals.scaled(lambda final: self.schedule.sparsity(epoch, final))

    def due(self, epoch: float, reached: Due | None) -> Due | None:
        """The targets to prune to at ``epoch`` (never below those ``reached``); ``None`` when none goes beyond."""
        wanted = self.at(epoch)
        return wanted.at_least(reached) if wanted.beyond(reached) else None

    def final(self) -> Due | None:
        """The targets at the schedule's last epoch (``None`` when the schedule does not know it)."""
        last = self.schedule.last_epoch
        return None if last is None else self.at(float(last))

    def overall(self, targets: Due | None) -> float:
        """``targets`` as one fraction of all entries (the global target itself, or the size-weighted mean)."""
        return 0.0 if targets is None else targets.overall(self.sizes)

    def short_of(self, reached: Due | None) -> float | None:
        """The planned final overall target when some final target is not ``reached``, else ``None``."""
        final = self.final()
        if final is not None and final.beyond(reached):
            return self.overall(final)
        return None


class Progress:
    """How far one run got along its :class:`TargetPlan`: the targets reached, what is due next, the figures
    derived from them, and the form the callback's saved state keeps them in (``{name: s}``, or one value under a
    fixed key for a global target or a trigger, as since 0.2, so that older checkpoints resume).

    Args:
        schedule: when, and how far.
        finals: the final targets (their type says the kind: per tensor, global, or a trigger); the values may be
            given later with :meth:`plan` (the callback learns them when ``fit`` starts).

    Example::

        >>> progress = Progress(AtEpochs([1, 2]), Global(0.8))
        >>> progress.plan(Global(0.8), {"a": 10})
        >>> progress.reach(progress.due(1.0)); progress.state()
        {'__global__': 0.4}
        >>> progress.short_of(), progress.overall()
        (0.8, 0.4)
    """

    _KEY = "__global__"

    def __init__(self, schedule: Schedule, finals: Due) -> None:
        self._plan = TargetPlan(schedule, finals, {})
        self.reached: Due | None = None

    def plan(self, finals: Due, sizes: Mapping[str, int]) -> None:
        """Set the final targets and the tensors' sizes (when ``fit`` starts)."""
        self._plan = TargetPlan(self._plan.schedule, finals, sizes)

    @property
    def sizes(self) -> dict[str, int]:
        return self._plan.sizes

    def final(self) -> Due | None:
        return self._plan.final()

    def due(self, epoch: float) -> Due | None:
        """The targets to prune to at ``epoch`` beyond those reached, or ``None``."""
        return self._plan.due(epoch, self.reached)

    def reach(self, due: Due | None) -> None:
        self.reached = due

    def goals(self, due: Due | None = None) -> dict[str, float]:
        """Each tensor's target reached (or ``due``), for per-tensor targets; empty otherwise."""
        due = self.reached if due is None else due
        return dict(due.sparsity) if isinstance(due, Local) else {}

    def overall(self) -> float | None:
        """The overall target reached (``None`` for a trigger, which carries no sparsity)."""
        return None if isinstance(self._plan.finals, Trigger) else self._plan.overall(self.reached)

    def short_of(self) -> float | None:
        """The planned final overall target when it was not reached (``None`` for a trigger, or when reached)."""
        return None if isinstance(self._plan.finals, Trigger) else self._plan.short_of(self.reached)

    def state(self) -> dict[str, float]:
        """The targets reached as the callback's state holds them."""
        reached = self.reached
        if isinstance(reached, Local):
            return dict(reached.sparsity)
        if isinstance(reached, Global):
            return {self._KEY: reached.sparsity}
        return {} if reached is None else {self._KEY: reached.progress}

    def load(self, state: Mapping[str, float]) -> None:
        """Restore :meth:`state` (of this version or of 0.2/0.3)."""
        if not state:
            self.reached = None
        elif self._KEY in state:
            value = float(state[self._KEY])
            self.reached = Trigger(value) if isinstance(self._plan.finals, Trigger) else Global(value)
        else:
            self.reached = Local({name: float(s) for name, s in state.items()})
