"""Learning rates that let a pruned model recover: a check of the rate left when the ramp ends, and a re-warm.

A pruning ramp that ends where the configured scheduler has decayed the rate close to zero leaves the model no
rate to recover with (0.3's ViT lost 1.7 points at 90% to a cosine schedule that left 12% of its peak after the
ramp). :func:`rate_after_ramp` computes that rate by stepping a copy of each configured scheduler (on a stand-in
optimizer that holds the same parameter-group settings, never the model's parameters) to the step at which the
ramp ends; the pruning callback warns when ``fit`` starts if it is below a fraction of the peak
(:func:`warn_if_rate_low`).

:class:`LearningRateRewarm` re-warms the rate after each pruning step, as oBERT's recipe restarts its rate at
each step: the rate the optimizer sees is the user's scheduled rate times a factor that jumps to ``factor`` at
each pruning step and decays back to 1 over ``decay_steps`` optimizer steps. It composes with any scheduler:
the factor is applied just before each ``optimizer.step`` and taken off just after (optimizer step hooks), so
the scheduler, chainable or not, never sees it.

Example::

    >>> cb = LearningRateRewarm(factor=3.0, decay_steps=4, shape="linear")
    >>> [cb.multiplier(t) for t in range(6)]
    [3.0, 2.5, 2.0, 1.5, 1.0, 1.0]
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from lightning_prune._utils.checks import allowed, check_choice, check_int, check_number
from lightning_prune._utils.lightning import CallbackBase, rank_zero_warn
from lightning_prune.schedules import Schedule

__all__ = ["LearningRateRewarm", "RateAtRampEnd", "rate_after_ramp", "warn_if_rate_low"]

Shape = Literal["cosine", "linear"]


@dataclass(frozen=True)
class RateAtRampEnd:
    """The rate of one scheduler when the pruning ramp ends, against its peak until then.

    Attributes:
        scheduler: the scheduler's class name.
        step: the optimizer step (``interval="step"``) or epoch (``"epoch"``) at which the ramp ends.
        rate: the rate there (the lowest over the parameter groups, relative to each group's peak).
        peak: that group's highest rate up to there.
    """

    scheduler: str
    step: int
    rate: float
    peak: float

    @property
    def fraction(self) -> float:
        return self.rate / self.peak if self.peak > 0 else 1.0


def _stand_in(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An optimizer with the same parameter-group settings and one scalar parameter per group."""
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [torch.zeros(1)]} for g in optimizer.param_groups
    ]
    return torch.optim.SGD(groups, lr=optimizer.param_groups[0]["lr"])


def _simulate(scheduler: Any, steps: int) -> list[list[float]]:
    """The rates of every group after 0, 1, ..., ``steps`` scheduler steps of a copy of ``scheduler``."""
    stand_in = _stand_in(scheduler.optimizer)
    twin = copy.deepcopy(scheduler, {id(scheduler.optimizer): stand_in})
    rates = [[g["lr"] for g in stand_in.param_groups]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()", deprecations
        for _ in range(steps):
            twin.step()
            rates.append([g["lr"] for g in stand_in.param_groups])
    return rates


def rate_after_ramp(trainer: Any, schedule: Schedule) -> list[RateAtRampEnd]:
    """The rate of each configured scheduler when ``schedule`` reaches its final target (an empty list when the
    ramp's end is unknown, there is no scheduler, or the loader has no length). ``ReduceLROnPlateau`` depends on
    the metrics and is left out."""
    end, batches = schedule.last_epoch, trainer.num_training_batches
    if end is None or not isinstance(batches, int) and math.isinf(batches):
        return []
    per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
    out = []
    for config in getattr(trainer, "lr_scheduler_configs", []) or []:
        scheduler = config.scheduler
        if getattr(config, "reduce_on_plateau", False) or not hasattr(scheduler, "optimizer"):
            continue
        done = trainer.global_step if config.interval == "step" else trainer.current_epoch
        at = end * per_epoch if config.interval == "step" else end
        steps = max(0, at - done) // max(1, config.frequency)
        rates = _simulate(scheduler, steps)
        worst = min(range(len(rates[0])), key=lambda g: rates[-1][g] / max(r[g] for r in rates))
        peak = max(r[worst] for r in rates)
        out.append(RateAtRampEnd(type(scheduler).__name__, at, rates[-1][worst], peak))
    return out


def warn_if_rate_low(trainer: Any, schedule: Schedule, fraction: float = 0.25) -> list[RateAtRampEnd]:
    """Warn when a scheduler's rate at the end of the ramp is below ``fraction`` of its peak; return the rates."""
    rates = rate_after_ramp(trainer, schedule)
    for r in rates:
        if r.fraction < fraction:
            unit = "optimizer step" if r.step and trainer.lr_scheduler_configs[0].interval == "step" else "epoch"
            rank_zero_warn(
                f"The learning rate when the pruning ramp ends ({unit} {r.step}) is {r.fraction:.0%} of its peak "
                f"({r.rate:.3g} vs {r.peak:.3g}) under {r.scheduler}: the pruned model has little rate left to "
                "recover with. Keep the rate up after the ramp (a later decay, a constant rate), end the ramp "
                "earlier, or re-warm it after each pruning step (lightning_prune.learning_rate.LearningRateRewarm)."
            )
    return rates


class LearningRateRewarm(CallbackBase):
    """Multiply the scheduled learning rate by a factor that restarts at ``factor`` at each pruning step and decays
    back to 1 over ``decay_steps`` optimizer steps (oBERT-style re-warming, composed with your scheduler).

    Args:
        factor: the multiplier right after a pruning step, >= 1.
        decay_steps: optimizer steps over which it returns to 1, >= 1.
        shape: ``"cosine"`` or ``"linear"`` decay.

    Raises:
        ValueError: for an argument outside what is allowed, or when ``fit`` starts without a
            :class:`~lightning_prune.PruningScheduleCallback` in the Trainer.

    Example::

        >>> LearningRateRewarm(factor=2.0, decay_steps=50).multiplier(0)
        2.0
    """

    def __init__(self, factor: float = 2.0, decay_steps: int = 100, shape: Shape = "cosine") -> None:
        self.factor = check_number("factor", factor, low=1.0)
        self.decay_steps = check_int("decay_steps", decay_steps, minimum=1)
        self.shape: Shape = check_choice("shape", shape, allowed(Shape))
        self._pruning: list[Any] = []
        self._handles: list[Any] = []
        self._trainer: Any = None
        self._taken = 0  # entries pruned, seen at the latest optimizer step: a pruning step raises it
        self._restart: int | None = None  # the global step of the latest pruning step
        self._saved: list[list[float]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(factor=self.factor, decay_steps=self.decay_steps, shape=self.shape)

    def multiplier(self, since: int | None) -> float:
        """The factor ``since`` optimizer steps after a pruning step (1.0 before any)."""
        if since is None or since >= self.decay_steps:
            return 1.0
        left = 1.0 - since / self.decay_steps
        if self.shape == "cosine":
            left = 0.5 * (1.0 + math.cos(math.pi * since / self.decay_steps))
        return 1.0 + (self.factor - 1.0) * left

    @property
    def current(self) -> float:
        """The factor of the next optimizer step."""
        step = self._trainer.global_step if self._trainer is not None else 0
        return self.multiplier(None if self._restart is None else step - self._restart)

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        from lightning_prune.callback import PruningScheduleCallback

        self._pruning = [c for c in trainer.callbacks if isinstance(c, PruningScheduleCallback)]
        if not self._pruning:
            raise ValueError("LearningRateRewarm re-warms after pruning steps: add a PruningScheduleCallback.")
        self._trainer = trainer
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        cast(Any, pl_module).log("pruning/lr_factor", self.current, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._remove()

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        self._remove()

    def state_dict(self) -> dict[str, Any]:
        return {"taken": self._taken, "restart": self._restart}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._taken = int(state_dict.get("taken", 0))
        self._restart = state_dict.get("restart")

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        taken = sum(sum(c.masks.pruned_counts(c.targets)) for c in self._pruning)  # remembered counts: cheap
        if taken > self._taken:
            self._taken, self._restart = taken, self._trainer.global_step
        m = self.current
        self._saved.append([g["lr"] for g in optimizer.param_groups])
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * m

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        for g, lr in zip(optimizer.param_groups, self._saved.pop()):
            g["lr"] = lr

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._saved = [], []
