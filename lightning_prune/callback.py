"""``PruningScheduleCallback``: prune a model on a cumulative-sparsity schedule while it trains."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch.nn.utils.prune as prune
from torch import nn

from lightning_prune._lightning import CallbackBase, rank_zero_info, rank_zero_warn
from lightning_prune.checkpoint import parameter_slots, restore_pruning_on_load, restore_slots
from lightning_prune.distributed import broadcast_inplace_masks, broadcast_masks, check_strategy
from lightning_prune.inplace import InplaceMasks
from lightning_prune.masking import apply_mask, make_permanent
from lightning_prune.methods import ImportanceFn, MethodName, PruningMethod, resolve_method
from lightning_prune.report import SparsityReport, measure
from lightning_prune.rewind import Rewind, capture, rewind
from lightning_prune.schedules import FunctionSchedule, OneShot, Schedule, ScheduleLike, as_schedule
from lightning_prune.selection import ParameterSpec, PruningTarget, SparsitySpec, select_parameters

__all__ = ["PruningScheduleCallback"]

Scope = Literal["local", "global"]
MaskMode = Literal["hook", "inplace"]
_GLOBAL = "__global__"
_EPS = 1e-12


class PruningScheduleCallback(CallbackBase):
    """Prune a model while it trains, to exact cumulative sparsity targets, and make it permanent at the end.

    At each scheduled point the chosen tensors are brought to the schedule's *cumulative* target: after the
    step, the fraction of zeros is the target (within one entry per tensor in local scope, one entry
    overall in global scope), whatever was pruned before. Pruning uses torch's reparametrization
    (``<name>_orig``, ``<name>_mask``, a forward pre-hook), and entries once pruned stay pruned.

    "Epoch ``e``" means before the training batches of epoch ``e``: that epoch trains, and validates, the
    pruned model. Step schedules (``every_n_steps``) also prune before the batch that starts every
    ``n``-th optimizer step.

    Checkpoints and processes: the masks travel in the model's checkpoint (in ``mask_mode="inplace"``, as
    ``uint8`` in the callback's state) and the callback's progress in its ``state_dict``;
    ``trainer.fit(fresh_model, ckpt_path=...)`` re-creates the masks (in the parameter order the optimizer
    state needs) and resumes exactly (see :mod:`lightning_prune.checkpoint`). Under DDP the masks are
    broadcast from rank 0 after each step; sharded strategies (FSDP, DeepSpeed) are refused. With several
    pruning callbacks in one Trainer (on disjoint tensors), each logs ``pruning/<i>/sparsity``,
    ``pruning/<i>/target`` and its method's figures under ``pruning/<i>/``. A later ``fit`` keeps the
    progress and masks again the zeros left by ``make_permanent``.

    Args:
        sparsity: the final cumulative target: a fraction in [0, 1) of every chosen tensor (local) or of all
            chosen tensors together (global), or a per-layer mapping from module types (``nn.Conv2d``),
            type names (``"Conv2d"``) or name patterns (``"model.fc*"``) to targets (local only; the first
            matching key wins). May be left out for a method that takes no amount, or when the schedule
            defines it (``AtEpochs({...})``, a plain function).
        parameters: which tensors: qualified names relative to the ``LightningModule``
            (``"model.conv1.weight"``), glob patterns, or ``(module, "weight")`` pairs. Default: the
            ``weight`` of every ``nn.Conv*d`` and ``nn.Linear``; biases only when named.
        method: ``"l1_unstructured"`` (default), ``"random_unstructured"``, ``"ln_structured"``,
            ``"random_structured"``, or any ``torch.nn.utils.prune.BasePruningMethod`` subclass. A class
            whose constructor takes ``amount`` is driven by the schedule (with an exact integer amount);
            one that does not is applied as it is at each scheduled step.
        scope: ``"local"`` (each tensor to its own target) or ``"global"`` (one ranking, and so one
            magnitude threshold, across all chosen tensors). ``ln_structured`` and ``random_structured`` are
            local only; ``NeuronPruning`` ranks neurons across layers.
        schedule: a :class:`~lightning_prune.schedules.Schedule` (``OneShot``, ``AtEpochs``,
            ``Polynomial``) or a plain function ``f(epoch) -> cumulative sparsity``. Default:
            ``OneShot(epoch=0)``.
        method_kwargs: extra arguments for the method (``n`` and ``dim`` for ``ln_structured``, ``dim`` for
            ``random_structured``, a custom class's own arguments).
        importance: a function ``tensor -> scores`` of the same shape (higher is kept) that replaces the
            magnitude in L1 pruning, local or global, and is passed to torch as ``importance_scores`` for
            other methods.
        make_permanent: at the end of training, ``prune.remove`` every pruned tensor so that the model has
            plain parameters with the zeros baked in and its unpruned ``state_dict`` keys.
        compact: at the end of training, physically remove the pruned neurons and channels (with
            ``method=NeuronPruning(...)`` only; see :func:`lightning_prune.compact`): the model gets smaller
            layers. Implies removing the masks.
        verbose: print a table (tensor, shape, zeros, sparsity, target) on rank zero at each pruning step
            and a summary at the end.
        seed: seeds random methods, identically on every process, so that all ranks draw the same masks.
        log_per_tensor: also log ``pruning/sparsity/<qualified name>`` for every tensor.
        rewind: lottery-ticket rewinding, off by default. ``"init"`` or a :class:`~lightning_prune.rewind.Rewind`
            (``Rewind(epoch=2)``, ``Rewind(step=500)``): after each pruning step, the pruned tensors'
            surviving entries go back to their values at that point and the optimizer's state for them is
            dropped. The saved values are copies and travel in the callback's checkpoint state.
        mask_mode: how masks act between pruning steps. ``"hook"`` (default): torch's reparametrization,
            ``weight = weight_orig * mask`` recomputed by a forward pre-hook at every forward pass.
            ``"inplace"``: plain parameters with the masks kept aside
            (:class:`~lightning_prune.inplace.InplaceMasks`, ``uint8``); the gradients of pruned entries
            are zeroed before every optimizer step and the pruned weights after it. Same guarantees (pruned
            entries are zero after every optimizer step, the live ones get the same updates, the model at
            the end is the same), cheaper training steps on large layers, and pruning steps of the score
            methods that allocate a quarter of the model (the first ``uint8`` masks) instead of twice it
            (see the README's performance section). Checkpoints then hold the plain weights, not the masks.

    Raises:
        ValueError: for any argument outside what is allowed (see the messages); selection errors (a name,
            pattern or key that matches nothing, a non-floating tensor, an empty selection) are raised when
            ``fit`` starts, before the first batch, with the model untouched.

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_prune.schedules import Polynomial
        >>> callback = PruningScheduleCallback(
        ...     sparsity=0.9, scope="global", schedule=Polynomial(start_epoch=1, end_epoch=5, power=3)
        ... )
        >>> trainer = pl.Trainer(max_epochs=8, callbacks=[callback], logger=False, enable_checkpointing=False)
    """

    def __init__(
        self,
        sparsity: SparsitySpec = None,
        *,
        parameters: Sequence[ParameterSpec] | None = None,
        method: MethodName | type[prune.BasePruningMethod] | PruningMethod = "l1_unstructured",
        scope: Scope = "local",
        schedule: ScheduleLike | None = None,
        method_kwargs: Mapping[str, Any] | None = None,
        importance: ImportanceFn | None = None,
        make_permanent: bool = True,
        compact: bool = False,
        verbose: bool = True,
        seed: int = 0,
        log_per_tensor: bool = True,
        rewind: Rewind | Literal["init"] | None = None,
        mask_mode: MaskMode = "hook",
    ) -> None:
        if scope not in ("local", "global"):
            raise ValueError(f"`scope` must be one of ['local', 'global'], got {scope!r}.")
        self.method = resolve_method(method, method_kwargs, importance)
        self.schedule: Schedule = OneShot(epoch=0) if schedule is None else as_schedule(schedule)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        if scope == "global" and not self.method.supports_global:
            raise ValueError(
                f"`method={self.method.name}` is structured and works in `scope='local'` only, got scope='global'."
            )
        if compact and not callable(getattr(self.method, "compact", None)):
            raise ValueError(
                "`compact=True` removes pruned neurons and needs `method=NeuronPruning(...)`, "
                f"got method={self.method.name}."
            )
        if scope == "global" and isinstance(sparsity, Mapping):
            raise ValueError("A per-layer `sparsity` mapping needs `scope='local'`; global scope takes one target.")
        if isinstance(self.schedule, FunctionSchedule) and isinstance(sparsity, Mapping):
            raise ValueError(
                "A plain-function `schedule` returns one sparsity for all tensors; use a Schedule object "
                "(OneShot, AtEpochs, Polynomial) with a per-layer `sparsity` mapping."
            )
        sparsity = self._check_sparsity(sparsity)
        self.sparsity = sparsity
        self.parameters = parameters
        self.scope: Scope = scope
        self.make_permanent = make_permanent
        self.compact = compact
        self.verbose = verbose
        self.seed = seed
        self.log_per_tensor = log_per_tensor
        self._targets: list[PruningTarget] = []
        self._applied: dict[str, float] = {}
        self._steps = 0
        self._last_report: SparsityReport | None = None
        if rewind == "init":
            rewind = Rewind()
        if rewind is not None and not isinstance(rewind, Rewind):
            raise ValueError(
                f"`rewind` must be None, 'init' or a Rewind(epoch=...) / Rewind(step=...) object, got {rewind!r}."
            )
        self.rewind: Rewind | None = rewind
        self._rewind_to: dict[str, Any] | None = None
        self._slots: list[tuple[nn.Module, list[str]]] = []
        self._log_prefix = "pruning"  # "pruning/<i>" when several pruning callbacks share a Trainer
        if mask_mode not in ("hook", "inplace"):
            raise ValueError(f"`mask_mode` must be one of ['hook', 'inplace'], got {mask_mode!r}.")
        self.mask_mode: MaskMode = mask_mode
        self._inplace: InplaceMasks | None = None  # mask_mode="inplace": the masks, between pruning steps
        self._saved_masks: dict[str, Any] = {}  # inplace masks from a checkpoint, until training starts

    def _check_sparsity(self, sparsity: SparsitySpec) -> SparsitySpec:
        if isinstance(sparsity, Mapping):
            return sparsity  # keys and values are checked against the model in setup()
        if sparsity is not None and (
            isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0
        ):
            raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r}.")
        defined = self.schedule.final_sparsity
        if not self.method.takes_sparsity:
            if sparsity is not None:
                raise ValueError(
                    f"`sparsity` has no effect with `method={self.method.name}`, whose constructor takes no `amount`; "
                    f"leave it out, got {sparsity!r}."
                )
            return None
        if defined is not None:
            if sparsity is not None and abs(sparsity - defined) > 1e-9:
                raise ValueError(
                    f"`sparsity`={sparsity!r} differs from the schedule's last target {defined!r}; give one of them."
                )
            return defined
        if sparsity is None and not isinstance(self.schedule, FunctionSchedule):
            raise ValueError(f"`sparsity` is required with `method={self.method.name}` and {self.schedule!r}.")
        return sparsity

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            parameters=repr(self.parameters),
            sparsity=repr(self.sparsity),
            method=self.method.name,
            scope=self.scope,
            schedule=repr(self.schedule),
        )

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        restore_pruning_on_load(pl_module)  # fit/validate/test(ckpt_path=...) into a fresh model loads the masks
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        local_sparsity = self.sparsity if self.scope == "local" else None
        self._targets = select_parameters(pl_module, self.parameters, local_sparsity)
        self._check_overlap(trainer)
        peers = [c for c in trainer.callbacks if isinstance(c, PruningScheduleCallback)]
        self._log_prefix = "pruning" if len(peers) <= 1 else f"pruning/{peers.index(self)}"
        self.method.setup(pl_module, self._targets)
        self._slots = parameter_slots(t.module for t in self.method.masked(self._targets))
        last = self.schedule.last_epoch
        max_epochs = trainer.max_epochs
        if last is not None and max_epochs is not None and max_epochs >= 0 and last >= max_epochs:
            rank_zero_warn(
                f"{self.schedule!r} reaches its final target at the start of epoch {last}, but `max_epochs` is "
                f"{max_epochs}: training ends first (fine if the run will be resumed for longer)."
            )

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        every = self.schedule.every_n_steps
        if every is not None and math.isinf(trainer.num_training_batches):
            raise ValueError(
                f"`{self.schedule!r}` prunes every {every} steps, which needs a train dataloader with a length."
            )
        if self._steps and not self.compact:
            self._reinstall_masks()
        self._masks_aside()

    def on_train_epoch_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._capture_rewind(trainer, epoch_start=True)
        self._prune_to(trainer, pl_module, float(trainer.current_epoch))

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        every = self.schedule.every_n_steps
        accumulate = trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:
            self._capture_rewind(trainer, epoch_start=False)
        if every is None or batch_idx == 0 or batch_idx % accumulate or trainer.global_step % every:
            return
        steps_per_epoch = math.ceil(trainer.num_training_batches / accumulate)
        self._prune_to(trainer, pl_module, trainer.current_epoch + (batch_idx // accumulate) / steps_per_epoch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        if self._inplace is not None:
            self._inplace.zero_grads()

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._inplace is not None:
            self._inplace.zero_weights()

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._masks_back()
        if not self._targets:
            return
        report = measure(self._targets, self._goals())
        if self.compact:
            widths = self.method.compact(pl_module)
        elif self.make_permanent:
            make_permanent(self.method.masked(self._targets))
            restore_slots(self._slots)
        if self.verbose and trainer.is_global_zero:
            how = "made permanent (prune.remove)" if self.make_permanent else "masks kept"
            if self.compact:
                how = "compacted, widths " + ", ".join(f"{n}: {a}->{b}" for n, (a, b) in widths.items())
            rank_zero_info(f"Pruning finished after {self._steps} step(s), {how}:\n{report}")

    def state_dict(self) -> dict[str, Any]:
        state = {"applied": dict(self._applied), "steps": self._steps, "rewind": self._rewind_to}
        if self._inplace is not None:  # inplace mode: the model's state holds plain weights, the masks go here
            masked = ((t.name, self._inplace.mask_of(t)) for t in self.method.masked(self._targets))
            state["masks"] = {name: mask for name, mask in masked if mask is not None}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._applied = dict(state_dict.get("applied", {}))
        self._steps = int(state_dict.get("steps", 0))
        self._rewind_to = state_dict.get("rewind")
        self._saved_masks = dict(state_dict.get("masks") or {})

    # ------------------------------------------------------------------ checkpoints, processes, rewinding

    def _check_overlap(self, trainer: Any) -> None:
        mine = {(id(t.module), t.param): t.name for t in self._targets}
        for other in trainer.callbacks:
            if other is self or not isinstance(other, PruningScheduleCallback):
                continue
            shared = sorted(mine[k] for k in {(id(t.module), t.param) for t in other._targets} & mine.keys())
            if shared:
                raise ValueError(
                    f"Two PruningScheduleCallbacks in one Trainer both prune {shared}; give them disjoint "
                    "`parameters` (one callback per tensor)."
                )

    def _reinstall_masks(self) -> None:
        """Resuming from an ``inplace``-mode checkpoint: put back the masks saved in the callback's state.
        A later ``fit`` after ``make_permanent``: mask the zeros again so that pruned entries stay pruned."""
        saved, self._saved_masks = self._saved_masks, {}
        for t in self.method.masked(self._targets):
            if t.is_masked:
                continue
            value = t.original.detach()
            mask = saved.get(t.name)
            if mask is not None:
                if tuple(mask.shape) != tuple(value.shape):
                    raise ValueError(
                        f"The checkpoint's mask for {t.name!r} has shape {tuple(mask.shape)}, but the tensor has "
                        f"{tuple(value.shape)}: the checkpoint belongs to another model."
                    )
                apply_mask(t, mask.to(device=value.device, dtype=value.dtype))
            elif not bool(value.ne(0).all()):
                apply_mask(t, value.ne(0).to(value.dtype))
        restore_slots(self._slots)

    def _capture_rewind(self, trainer: Any, epoch_start: bool) -> None:
        if self.rewind is None or self._rewind_to is not None or not self._targets:
            return
        if self.rewind.reached(trainer.current_epoch, trainer.global_step, epoch_start):
            self._rewind_to = capture(self._targets)

    def _rewind(self, trainer: Any) -> None:
        if self._rewind_to is None:
            rank_zero_warn(
                f"Pruning step {self._steps + 1} comes before the rewind point {self.rewind!r}: not rewound.",
            )
            return
        rewind(self._targets, self._rewind_to, trainer.optimizers)

    # ------------------------------------------------------------------ pruning

    def _goals(self) -> dict[str, float]:
        if self.scope == "global":
            return {}
        return {t.name: self._applied[t.name] for t in self._targets if t.name in self._applied}

    def _targets_at(self, epoch: float) -> dict[str, float]:
        """Cumulative targets due at ``epoch`` (``{_GLOBAL: s}`` in global scope), never below those applied."""
        if not self.method.takes_sparsity:
            return {_GLOBAL: self.schedule.sparsity(epoch, 1.0)}
        if self.scope == "global":
            return {_GLOBAL: self.schedule.sparsity(epoch, self.sparsity if self.sparsity is not None else 1.0)}
        return {
            t.name: self.schedule.sparsity(epoch, t.sparsity if t.sparsity is not None else 1.0) for t in self._targets
        }

    def _prune_to(self, trainer: Any, pl_module: nn.Module, epoch: float) -> None:
        due = self._targets_at(epoch)
        if not any(s > self._applied.get(name, 0.0) + _EPS for name, s in due.items()):
            return
        due = {name: max(s, self._applied.get(name, 0.0)) for name, s in due.items()}
        # inplace mode, score methods: the step works on the plain parameters and the masks kept aside
        # (no float32 mask or `weight` copy from torch's reparametrization); other methods need torch's
        kept = self._inplace if self.rewind is None and _steps_on_inplace_masks(self.method) else None
        if kept is None:
            self._masks_back()
        extra = {} if kept is None else {"masks": kept}
        seed = self.seed * 7919 + self._steps
        takes = self.method.takes_sparsity
        if self.scope == "global":
            self.method.prune_global(self._targets, due[_GLOBAL] if takes else None, seed, **extra)
        else:
            sparsities = [due[t.name] if takes else None for t in self._targets]
            self.method.prune_local(self._targets, sparsities, seed, **extra)
        restore_slots(self._slots)  # keep `module.parameters()` in the order the optimizer was built with
        if kept is None:
            broadcast_masks(self.method.masked(self._targets))  # every rank holds rank 0's masks
        else:
            broadcast_inplace_masks(kept)
        if self.rewind is not None:
            self._rewind(trainer)
        self._applied.update(due)
        self._steps += 1
        self._report(trainer, pl_module, epoch)
        self._masks_aside()

    # ------------------------------------------------------------------ mask_mode="inplace"

    def _masks_aside(self) -> None:
        """``inplace`` mode: take torch's reparametrization off, keeping the masks (between pruning steps)."""
        if self.mask_mode != "inplace" or self._inplace is not None or not self._targets:
            return
        self._inplace = InplaceMasks.from_targets(self.method.masked(self._targets))
        restore_slots(self._slots)

    def _masks_back(self) -> None:
        """``inplace`` mode: put torch's reparametrization back (for a pruning step, or at the end)."""
        if self._inplace is None:
            return
        self._inplace.restore()
        self._inplace = None
        restore_slots(self._slots)

    def _overall_target(self) -> float | None:
        if not self.method.takes_sparsity:
            return None
        if self.scope == "global":
            return self._applied.get(_GLOBAL)
        sizes = {t.name: t.original.numel() for t in self._targets}
        return sum(self._applied.get(n, 0.0) * k for n, k in sizes.items()) / sum(sizes.values())

    def _report(self, trainer: Any, pl_module: nn.Module, epoch: float) -> None:
        report = measure(self._targets, self._goals())
        self._last_report = report
        target = self._overall_target()
        log = {f"{self._log_prefix}/sparsity": report.sparsity}
        if target is not None:
            log[f"{self._log_prefix}/target"] = target
        if self.log_per_tensor:
            log.update({f"pruning/sparsity/{t.name}": t.sparsity for t in report.tensors})
        for key, value in self.method.metrics().items():  # "pruning/x" -> "pruning/<i>/x" beside other callbacks
            log[self._log_prefix + key[len("pruning") :] if key.startswith("pruning/") else key] = value
        for key, value in log.items():
            pl_module.log(
                key,
                value,
                on_step=False,
                on_epoch=True,
                reduce_fx="max",
                prog_bar=key == f"{self._log_prefix}/sparsity",
                batch_size=1,
            )
        if self.verbose and trainer.is_global_zero:
            goal = "" if target is None else f", target {target:.4f}"
            rank_zero_info(
                f"Pruning step {self._steps} at epoch {epoch:g} (global step {trainer.global_step}): "
                f"sparsity {report.sparsity:.4f}{goal}\n{report}"
            )

    @property
    def targets(self) -> list[PruningTarget]:
        """The tensors being pruned (resolved when ``fit`` starts)."""
        return list(self._targets)

    @property
    def last_report(self) -> SparsityReport | None:
        """The measured figures after the latest pruning step."""
        return self._last_report


def _steps_on_inplace_masks(method: PruningMethod) -> bool:
    """Whether the method's steps take ``masks=InplaceMasks`` (``ScoreMethod`` does, and so do subclasses that
    keep that keyword), so that ``mask_mode="inplace"`` needs no reparametrization for them."""
    return all("masks" in inspect.signature(fn).parameters for fn in (method.prune_local, method.prune_global))
