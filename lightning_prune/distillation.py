"""Distillation from the dense model while pruning: a companion callback that wraps the user's loss.

:class:`Distillation` keeps a frozen copy of the model (the *teacher*), taken just before the pruning ramp
starts (or one the user passes), runs it on the inputs of every training forward of the student without
gradients, and mixes a temperature-scaled KL divergence between their outputs into the loss that
``training_step`` returns::

    loss = (1 - hardness) * user_loss + hardness * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(``hardness`` as in SparseML's distillation modifier and the oBERT recipe: 1.0 keeps only the teacher's
term, 0.5 weighs both alike). Nothing in ``training_step`` changes: a forward hook on the distilled module
(the ``LightningModule`` itself, or the submodule named by ``module``, e.g. ``"model"`` for a
``training_step`` that calls ``self.model(x)``) sees the student's outputs and inputs, and the
``training_step`` that Lightning calls is wrapped for the duration of ``fit`` to add the term. A
``training_step`` that calls no module's forward records its outputs with one line,
``distillation.record(outputs, *inputs)``.

Outputs may be tensors of logits (classes last), tuples or lists (the first element), mappings or Hugging Face
model outputs (``logits``).

Cost: one copy of the distilled module's weights (the teacher, copied without forward hooks; kept in the
callback's checkpoint state as well, so that a resumed run has it) and one forward of the teacher without
gradients per training forward.

Example::

    >>> import pytorch_lightning as pl
    >>> from lightning_prune import Polynomial, PruningScheduleCallback
    >>> pruning = PruningScheduleCallback(0.9, scope="global", schedule=Polynomial(start_epoch=1, end_epoch=4))
    >>> trainer = pl.Trainer(max_epochs=6, callbacks=[pruning, Distillation(temperature=2.0, hardness=1.0)])
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune._utils.checks import check_int, check_number
from lightning_prune._utils.lightning import CallbackBase, rank_zero_info, rank_zero_warn
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial, Schedule

__all__ = ["Distillation", "distillation_loss", "logits_of", "ramp_start"]

_SHARDING = ("ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy")
_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: a tensor, the first element of a tuple or list, ``output["logits"]`` or
    ``output.logits`` (Hugging Face).

    >>> logits_of((torch.ones(2, 3), "aux")).shape
    torch.Size([2, 3])

    Raises:
        TypeError: for an output without logits.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"Distillation needs logits: a tensor, a tuple whose first element is one, or `.logits`; got "
        f"{type(output).__name__}."
    )


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 2.0) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over every position (classes last).

    >>> s = torch.tensor([[2.0, 0.0, -1.0]])
    >>> float(distillation_loss(s, s))
    0.0
    """
    classes = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.detach().reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def ramp_start(schedule: Schedule) -> int:
    """The epoch at whose start a schedule's pruning can begin (0 when unknown).

    >>> ramp_start(Polynomial(start_epoch=2, end_epoch=5)), ramp_start(AtEpochs([3, 4])), ramp_start(OneShot(1))
    (2, 3, 1)
    """
    if isinstance(schedule, Polynomial):
        return schedule.start_epoch
    if isinstance(schedule, AtEpochs):
        return schedule.epochs[0]
    if isinstance(schedule, OneShot):
        return schedule.epoch
    return 0


class Distillation(CallbackBase):
    """Distil from a frozen dense copy of the model while it is pruned; the user's loss is wrapped, not replaced.

    Args:
        temperature: ``T`` > 0 of the softened distributions (2.0, as oBERT and Movement Pruning).
        hardness: in [0, 1]: the weight of the teacher's term; the user's loss keeps ``1 - hardness``.
        teacher: a module of your own to distil from (frozen here, moved to the student's device), used from the
            first training step; ``None``: a copy of the distilled module taken at ``start``.
        start: when the copy is taken, and the term starts: ``"ramp"`` (the first epoch at which a
            :class:`~lightning_prune.PruningScheduleCallback` of the Trainer may prune, the copy taken before any
            pruning) or an epoch (0: from the start).
        module: the name of the submodule whose forward the ``training_step`` calls (``"model"`` for
            ``self.model(x)``); ``None``: the ``LightningModule`` itself (``self(x)``).

    Raises:
        ValueError: for an argument outside what is allowed; when ``fit`` starts, under a strategy that shards
            the model (FSDP, DeepSpeed: the teacher would be a whole copy on every process), with manual
            optimization, with ``start="ramp"`` and no pruning callback, or for a ``module`` that is not there.

    Example::

        >>> Distillation(temperature=2.0, hardness=0.5, module="model").hardness
        0.5
    """

    def __init__(
        self,
        temperature: float = 2.0,
        hardness: float = 1.0,
        teacher: nn.Module | None = None,
        start: Literal["ramp"] | int = "ramp",
        module: str | None = None,
    ) -> None:
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True)
        self.hardness = check_number("hardness", hardness, low=0.0, high=1.0)
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise ValueError(f"`teacher` must be an nn.Module or None, got {type(teacher).__name__}.")
        if start != "ramp":
            start = check_int("start", start, minimum=0)
        if module is not None and not isinstance(module, str):
            raise ValueError(f"`module` must be a submodule's name or None, got {module!r}.")
        self.start = start
        self.module = module
        self.teacher: nn.Module | None = teacher
        self._given = teacher is not None
        self._start_epoch = 0 if start == "ramp" else int(start)
        self._student: nn.Module | None = None
        self._handle: RemovableHandle | None = None
        self._step_owner: Any = None
        self._capturing = False
        self._pending: Tensor | None = None
        self._saved: dict[str, Tensor] | None = None  # a teacher's weights from a checkpoint
        self._warned = False
        self.last_loss: float | None = None  # the latest term, before the hardness weight

    @property
    def state_key(self) -> str:
        return self._generate_state_key(temperature=self.temperature, hardness=self.hardness, module=self.module)

    @property
    def active(self) -> bool:
        """Whether the teacher is there and its term is added (after ``start``)."""
        return self.teacher is not None

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if stage != "fit":
            return
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if sharded := [n for n in _SHARDING if n in names]:
            raise ValueError(
                f"Distillation does not support `strategy={sharded[0]}`: the teacher would be a whole, unsharded "
                "copy of the model on every process. Use a single device or a data-parallel strategy ('ddp')."
            )
        if not getattr(pl_module, "automatic_optimization", True):
            raise ValueError(
                "Distillation adds its term to the loss that `training_step` returns; with manual optimization, "
                "add `distillation_loss(student_logits, teacher_logits)` to your loss yourself."
            )
        self._student = self._distilled(pl_module)
        if self.start == "ramp":
            from lightning_prune.callback import PruningScheduleCallback

            pruning = [c for c in trainer.callbacks if isinstance(c, PruningScheduleCallback)]
            if not pruning:
                raise ValueError(
                    "Distillation(start='ramp') copies the model when the pruning ramp starts, but the Trainer has "
                    "no PruningScheduleCallback; give `start=<epoch>`."
                )
            self._start_epoch = min(ramp_start(c.schedule) for c in pruning)

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        student = self._student
        assert student is not None
        if self._saved is not None and self.teacher is None:  # resumed after the copy was taken
            self.teacher = self._frozen(self._copy(student, trainer))
            self.teacher.load_state_dict(self._saved)
            self._saved = None
        if self.teacher is None and self._start_epoch <= trainer.current_epoch:
            self._take_teacher(trainer)
        if self._given and self.teacher is not None:
            self._frozen(self.teacher.to(next(student.parameters()).device))
        self._handle = student.register_forward_hook(self._observe, with_kwargs=True)
        original = pl_module.training_step
        self._step_owner = pl_module

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._wrapped_step(pl_module, original, *args, **kwargs)

        setattr(pl_module, "training_step", training_step)  # noqa: B010 (an instance attribute, removed at the end)

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.teacher is None and trainer.current_epoch + 1 >= self._start_epoch:
            self._take_teacher(trainer)  # the weights at the start of the next epoch, before any pruning

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._release()

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        self._release()

    def state_dict(self) -> dict[str, Any]:
        if self.teacher is None or self._given:
            return {}
        return {"teacher": {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict.get("teacher")

    # ------------------------------------------------------------------ the term

    def record(self, outputs: Any, *args: Any, **kwargs: Any) -> None:
        """Add the term for ``outputs`` of the student on inputs ``args``/``kwargs`` (for a ``training_step``
        that calls no forward of the distilled module; call it once per forward, inside ``training_step``)."""
        if self.teacher is None:
            return
        with torch.no_grad():
            teacher_out = self.teacher(*args, **kwargs)
        term = distillation_loss(logits_of(outputs), logits_of(teacher_out), self.temperature)
        self._pending = term if self._pending is None else self._pending + term

    def _observe(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._capturing and module is self._student and module.training and torch.is_grad_enabled():
            self.record(output, *args, **kwargs)

    def _wrapped_step(self, pl_module: nn.Module, original: Any, *args: Any, **kwargs: Any) -> Any:
        self._pending, self._capturing = None, True
        try:
            out = original(*args, **kwargs)
        finally:
            self._capturing = False
        term, self._pending = self._pending, None
        if self.teacher is None or out is None:
            return out
        if term is None:
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    "Distillation saw no forward of the distilled module in `training_step`: name the submodule it "
                    "calls with `module=` (e.g. 'model'), or call `distillation.record(outputs, *inputs)`."
                )
            return out
        self.last_loss = float(term.detach())
        pl_module.log("pruning/distill_loss", term.detach(), on_step=False, on_epoch=True, batch_size=1)
        if isinstance(out, Mapping):
            return {**out, "loss": self._mix(out["loss"], term)}
        return self._mix(out, term)

    def _mix(self, loss: Tensor, term: Tensor) -> Tensor:
        if self.hardness == 1.0:
            return term + 0.0 * loss  # the user's graph stays connected (DDP expects every gradient)
        return (1.0 - self.hardness) * loss + self.hardness * term.to(loss.dtype)

    # ------------------------------------------------------------------ the teacher

    def _distilled(self, pl_module: nn.Module) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as missing:
            raise ValueError(f"`module={self.module!r}`: the LightningModule has no such submodule.") from missing

    @staticmethod
    def _copy(student: nn.Module, trainer: Any) -> nn.Module:
        """A deep copy without the forward and backward hooks (ours, a calibration window's, ...)."""
        memo = {id(trainer): trainer}  # a LightningModule refers to its Trainer: never copy that
        saved = [(m, {k: m.__dict__[k] for k in _HOOKS if k in m.__dict__}) for m in student.modules()]
        try:
            for m, hooks in saved:
                m.__dict__.update({k: type(v)() for k, v in hooks.items()})
            return copy.deepcopy(student, memo)
        finally:
            for m, hooks in saved:
                m.__dict__.update(hooks)

    @staticmethod
    def _frozen(teacher: nn.Module) -> nn.Module:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _take_teacher(self, trainer: Any) -> None:
        assert self._student is not None
        self.teacher = self._frozen(self._copy(self._student, trainer))
        n = sum(p.numel() for p in self.teacher.parameters())
        rank_zero_info(f"Distillation: teacher copied at epoch {trainer.current_epoch} ({n} parameters).")

    def _release(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._step_owner is not None:
            self._step_owner.__dict__.pop("training_step", None)
            self._step_owner = None
