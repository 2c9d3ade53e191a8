"""``PruningScheduleCallback``: prune a model on a cumulative-sparsity schedule while it trains."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.utils.prune as prune
from torch import nn

from lightning_prune import reparam
from lightning_prune._checks import allowed, check_choice, check_fraction, check_int
from lightning_prune._lightning import CallbackBase, rank_zero_info, rank_zero_warn
from lightning_prune.counting import count_for
from lightning_prune.distributed import agree_masks, check_strategy, collective_for
from lightning_prune.methods import ImportanceFn, MethodName, PruningMethod, resolve_method
from lightning_prune.report import SparsityReport, measure
from lightning_prune.rewind import Rewind, capture, rewind
from lightning_prune.schedules import FunctionSchedule, OneShot, Schedule, ScheduleLike, as_schedule
from lightning_prune.seeding import derive_seed
from lightning_prune.selection import (
    ParameterSpec,
    PruningTarget,
    SelectionSummary,
    SparsitySpec,
    describe_selection,
    local_view,
    select_parameters,
)
from lightning_prune.store import MaskStore

__all__ = ["PruningScheduleCallback"]

Scope = Literal["local", "global"]
MaskMode = Literal["inplace", "hook"]
_GLOBAL = "__global__"
_EPS = 1e-12
_STATE_VERSION = 2


class PruningScheduleCallback(CallbackBase):
    """Prune a model while it trains, to exact cumulative sparsity targets, and make it permanent at the end.

    At each scheduled point the chosen tensors are brought to the schedule's *cumulative* target: after the
    step, the fraction of zeros is the target (within one entry per tensor in local scope, one entry
    overall in global scope), whatever was pruned before. Entries once pruned stay pruned.

    The model stays a plain model throughout: its parameters are the user's tensors with the pruned entries
    at zero, its ``state_dict`` has the user's keys, and the masks live beside it in the callback
    (:class:`~lightning_prune.store.MaskStore`, ``uint8``; bit-packed in checkpoints). Pruned entries are zero
    in every forward pass: gradients are masked after backward and before every optimizer step (before
    Lightning clips them), and the optimizer's state is masked at each pruning step, so that the optimizers
    of :data:`~lightning_prune.store.ZERO_KEEPING_OPTIMIZERS` leave them at exactly zero; after a step of any
    other optimizer the weights are masked again. Attention modules, tied weights and parametrized layers
    therefore read ordinary, pruned weights.

    "Epoch ``e``" means before the training batches of epoch ``e``: that epoch trains, and validates, the
    pruned model. Step schedules (``every_n_steps``) also prune before the batch that starts every
    ``n``-th optimizer step.

    Checkpoints: the model's ``state_dict`` loads into the user's own class with nothing of this package
    (strict ``load_from_checkpoint``, ``load_state_dict``); the masks and the callback's progress travel in its
    state, so ``trainer.fit(model, ckpt_path=...)`` resumes exactly. Version 0.1 checkpoints (torch's
    ``weight_orig``/``weight_mask`` keys) load too (see :mod:`lightning_prune.reparam`). Under DDP the ranks'
    masks are checked to agree after each step (rank 0's are taken where they do not). Under FSDP2
    (``ModelParallelStrategy`` with ``tensor_parallel_size=1``) the masks are kept per local shard and the
    selection sums histograms across processes; DeepSpeed, FSDP1 and tensor parallelism are refused. With
    several pruning callbacks in one Trainer (on disjoint tensors), each logs ``pruning/<i>/sparsity``,
    ``pruning/<i>/target`` and its method's figures under ``pruning/<i>/``.

    Args:
        sparsity: the final cumulative target: a fraction in [0, 1) of every chosen tensor (local) or of all
            chosen tensors together (global), or a per-layer mapping from module types (``nn.Conv2d``),
            type names (``"Conv2d"``) or name patterns (``"model.fc*"``) to targets (local only; the first
            matching key wins). May be left out for a method that takes no amount, or when the schedule
            defines it (``AtEpochs({...})``, a plain function).
        parameters: which tensors: qualified names relative to the ``LightningModule``
            (``"model.conv1.weight"``, any name of a shared tensor), glob patterns, or ``(module, "weight")``
            pairs. Default: every weight that enters a matrix product, each tensor once: ``nn.Linear``,
            ``nn.Conv*d``, Hugging Face's ``Conv1D``, attention's ``in_proj_weight`` (or ``q/k/v_proj_weight``),
            recurrent layers' weights and layers you registered (:mod:`lightning_prune.layers`); embedding tables
            and every tensor tied to one (a language model's tied output head), positional and class-token
            parameters, norms and biases are left out unless named. With ``verbose``, a summary of what was
            chosen and left out is printed when ``fit`` starts (:attr:`selection`).
        method: ``"l1_unstructured"`` (default), ``"random_unstructured"``, ``"ln_structured"``,
            ``"random_structured"``, any ``torch.nn.utils.prune.BasePruningMethod`` subclass, or a
            :class:`~lightning_prune.methods.PruningMethod` (``NeuronPruning(...)``). A class whose constructor
            takes ``amount`` is driven by the schedule (with an exact integer amount); one that does not is
            applied as it is at each scheduled step.
        scope: ``"local"`` (each tensor to its own target) or ``"global"`` (one ranking, and so one
            magnitude threshold, across all chosen tensors). ``ln_structured`` and ``random_structured`` are
            local only; ``NeuronPruning`` ranks neurons across layers.
        schedule: a :class:`~lightning_prune.schedules.Schedule` (``OneShot``, ``AtEpochs``,
            ``Polynomial``) or a plain function ``f(epoch) -> cumulative sparsity``. Default:
            ``OneShot(epoch=0)``.
        method_kwargs: extra arguments for the method (``n`` and ``dim`` for ``ln_structured``, ``dim`` for
            ``random_structured``, a custom class's own arguments).
        importance: a function ``tensor -> scores`` of the same shape (higher is kept) that replaces the
            magnitude in L1 pruning, local or global, and is passed to a torch method's ``compute_mask``.
        make_permanent: at the end of training, drop the masks: the model keeps its zeros as plain weights
            (a later ``fit`` with this callback masks those zeros again; other training may let them grow).
            ``False`` keeps the masks in the callback (and, with ``mask_mode="hook"``, torch's
            reparametrization on the model).
        compact: at the end of training, physically remove the pruned neurons and channels (with a method
            that can, ``NeuronPruning(...)``; see :func:`lightning_prune.compact`): the model gets smaller
            layers.
        verbose: print a table (tensor, shape, zeros, sparsity, target) on rank zero at each pruning step
            and a summary at the end.
        seed: seeds random methods, identically on every process, so that all ranks draw the same masks.
        log_per_tensor: also log ``pruning/sparsity/<qualified name>`` for every tensor.
        rewind: lottery-ticket rewinding, off by default. ``"init"`` or a :class:`~lightning_prune.rewind.Rewind`
            (``Rewind(epoch=2)``, ``Rewind(step=500)``): after each pruning step, the pruned tensors'
            surviving entries go back to their values at that point and the optimizer's state for them is
            dropped. The saved values are copies and travel in the callback's checkpoint state.
        mask_mode: ``"inplace"`` (default): plain parameters, masks kept aside, as described above.
            ``"hook"``: between pruning steps the masks are put on the model in torch's own form
            (``weight_orig``, ``weight_mask``, a forward pre-hook), for code that expects it; it cannot mask a
            weight read without its module's ``forward`` (attention's ``out_proj``) or a tied weight, and is
            refused for those when ``fit`` starts. Both modes train the same model, and checkpoints hold the
            model's own keys in both.

    Raises:
        ValueError: for any argument outside what is allowed (see the messages); selection errors (a name,
            pattern or key that matches nothing, a non-floating tensor, an empty selection, a target that
            would prune every entry of a tensor) are raised when ``fit`` starts, before the first batch,
            with the model untouched.

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
        mask_mode: MaskMode = "inplace",
    ) -> None:
        self.scope: Scope = check_choice("scope", scope, allowed(Scope))
        self.mask_mode: MaskMode = check_choice("mask_mode", mask_mode, allowed(MaskMode))
        self.method = resolve_method(method, method_kwargs, importance)
        self.schedule: Schedule = OneShot(epoch=0) if schedule is None else as_schedule(schedule)
        self.seed = check_int("seed", seed)
        self.method.check_scope(scope)
        if compact and not self.method.compacts:
            raise ValueError(
                "`compact=True` removes pruned neurons and needs a method that can (`method=NeuronPruning(...)`), "
                f"got method={self.method.name}."
            )
        if scope == "global" and isinstance(sparsity, Mapping):
            raise ValueError("A per-layer `sparsity` mapping needs `scope='local'`; global scope takes one target.")
        if isinstance(self.schedule, FunctionSchedule) and isinstance(sparsity, Mapping):
            raise ValueError(
                "A plain-function `schedule` returns one sparsity for all tensors; use a Schedule object "
                "(OneShot, AtEpochs, Polynomial) with a per-layer `sparsity` mapping."
            )
        self.sparsity = self._check_sparsity(sparsity)
        self.parameters = parameters
        self.make_permanent = make_permanent
        self.compact = compact
        self.verbose = verbose
        self.log_per_tensor = log_per_tensor
        if rewind == "init":
            rewind = Rewind()
        if rewind is not None and not isinstance(rewind, Rewind):
            raise ValueError(
                f"`rewind` must be None, 'init' or a Rewind(epoch=...) / Rewind(step=...) object, got {rewind!r}."
            )
        self.rewind: Rewind | None = rewind
        self._targets: list[PruningTarget] = []
        self._selection: SelectionSummary | None = None
        self._applied: dict[str, float] = {}
        self._steps = 0
        self._last_report: SparsityReport | None = None
        self._rewind_to: dict[str, Any] | None = None
        self._log_prefix = "pruning"  # "pruning/<i>" when several pruning callbacks share a Trainer
        self._store = MaskStore()
        self._saved_masks: dict[str, torch.Tensor] = {}  # masks from a checkpoint or the model, until training
        self._training = False
        self._refused = False  # a pruning step refused its input (the exception says why)
        self._deferred: float | None = None  # the point of a step that waits for the method's calibration
        self._calibrating = False
        self._resume_calibration = False

    def _check_sparsity(self, sparsity: SparsitySpec) -> SparsitySpec:
        if isinstance(sparsity, Mapping):
            if not self.method.takes_sparsity:
                raise ValueError(
                    f"`sparsity` has no effect with `method={self.method.name}`, whose constructor takes no "
                    f"`amount`; leave it out, got a per-layer mapping {dict(sparsity)!r}."
                )
            return dict(sparsity)  # keys and values are checked against the model in setup()
        if sparsity is not None:
            sparsity = check_fraction("sparsity", sparsity)
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
        # plain configuration values only (as ModelCheckpoint's key): equal configurations give equal keys in
        # every process, so a resumed run finds its state
        return self._generate_state_key(
            parameters=repr(self.parameters),
            sparsity=repr(self.sparsity),
            method=self.method.name,
            scope=self.scope,
            schedule=repr(self.schedule),
        )

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        reparam.convert_on_load(pl_module)  # fit/validate/test(ckpt_path=<a 0.1 checkpoint>) into a plain model
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        self._store.group = collective_for(trainer.strategy)
        if self._store.group is not None:
            self._check_sharding()
        self._saved_masks.update(reparam.take_over(pl_module))  # a model that torch's pruning has masked
        local_sparsity = self.sparsity if self.scope == "local" else None
        self._targets = select_parameters(pl_module, self.parameters, local_sparsity)
        self._selection = describe_selection(pl_module, self._targets)
        if self.verbose:
            rank_zero_info(f"{type(self).__name__}: {self._selection}")
        self._check_reachable()
        self._check_overlap(trainer)
        if self.mask_mode == "hook":
            reparam.check_hook_mode(pl_module, self.method.masked(self._targets))
        peers = [c for c in trainer.callbacks if isinstance(c, PruningScheduleCallback)]
        self._log_prefix = "pruning" if len(peers) <= 1 else f"pruning/{peers.index(self)}"
        self.method.setup(pl_module, self._targets)
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
        self._saved_masks.update(reparam.loaded_masks(pl_module, pop=True))
        self._restore_masks()
        if self._steps and self._last_report is None:  # resumed: log the figures of the steps taken before
            self._last_report = measure(self._targets, self._goals(), self._store.group)
        self._training = True
        if self._resume_calibration:  # a checkpoint inside a calibration window: keep observing where it stopped
            self.method.start_calibration(pl_module, self.method.masked(self._targets), resume=True)
            self._calibrating, self._resume_calibration = True, False
        if self.mask_mode == "hook":
            reparam.install(self._store.items())
        else:
            self._store.attach(trainer.optimizers)

    def on_train_epoch_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._capture_rewind(trainer, epoch_start=True)
        self._prune_to(trainer, pl_module, float(trainer.current_epoch))

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        every = self.schedule.every_n_steps
        accumulate = trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:
            self._capture_rewind(trainer, epoch_start=False)
        if self._deferred is not None and batch_idx % accumulate == 0:  # a step waiting for its calibration
            self._prune_to(trainer, pl_module, self._deferred)
        if every is None or batch_idx == 0 or batch_idx % accumulate or trainer.global_step % every:
            return
        steps_per_epoch = math.ceil(trainer.num_training_batches / accumulate)
        self._prune_to(trainer, pl_module, trainer.current_epoch + (batch_idx // accumulate) / steps_per_epoch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        if self.mask_mode == "inplace":
            self._store.mask_grads(optimizer)

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        # the epoch's value is the last one measured in it (a step schedule prunes several times an epoch)
        if self._last_report is not None:
            self._log(pl_module, self._last_report)

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._end_training()
        if not self._targets:
            return
        report = measure(self._targets, self._goals(), self._store.group)
        self._warn_if_short(report)
        widths: dict[str, tuple[int, int]] = {}
        if self.compact:
            widths = self.method.compact(pl_module)
            self._store.clear()
        elif self.make_permanent:
            self._store.clear()
        elif self.mask_mode == "hook":
            reparam.install(self._store.items())
        if self.verbose and trainer.is_global_zero:
            how = "masks dropped, zeros kept as plain weights" if self.make_permanent else "masks kept"
            if self.compact:
                how = "compacted, widths " + ", ".join(f"{n}: {a}->{b}" for n, (a, b) in widths.items())
            rank_zero_info(f"Pruning finished after {self._steps} step(s), {how}:\n{report}")

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        started, refused = self._training, self._refused
        self._end_training()
        if started and not refused and self._targets:  # a refusal of ours has said what is wrong already
            self._warn_if_short(
                measure(self._targets, self._goals(), self._store.group),
                f"training stopped by {type(exception).__name__}",
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "applied": dict(self._applied),
            "steps": self._steps,
            "rewind": self._rewind_to,
            "masks": {**MaskStore.pack(self._saved_masks), **self._store.state_dict()},  # loaded, not yet restored
            "deferred": self._deferred,
            "calibrating": self._calibrating,
            "method": self.method.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._applied = dict(state_dict.get("applied", {}))
        self._steps = int(state_dict.get("steps", 0))
        self._rewind_to = state_dict.get("rewind")
        self._saved_masks = MaskStore.unpack(state_dict.get("masks") or {})
        self._deferred = state_dict.get("deferred")
        self._resume_calibration = bool(state_dict.get("calibrating", False))
        self.method.load_state_dict(state_dict.get("method") or {})

    def on_save_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        if self.mask_mode == "hook" and "state_dict" in checkpoint:  # the model's own keys, as in inplace mode
            checkpoint["state_dict"] = reparam.upgrade_state_dict(checkpoint["state_dict"])[0]

    # ------------------------------------------------------------------ checks

    def _final_targets(self) -> dict[str, float]:
        """The final cumulative targets (``{_GLOBAL: s}`` in global scope); empty when unknown."""
        last = self.schedule.last_epoch
        if not self.method.takes_sparsity or last is None:
            return {}
        return self._targets_at(float(last))

    def _check_reachable(self, due: Mapping[str, float] | None = None) -> None:
        """Refuse a target that would prune every entry of a tensor (or of all tensors together)."""
        due = self._final_targets() if due is None else due
        sizes = {t.name: t.tensor.numel() for t in self._targets}
        if _GLOBAL in due:
            total = sum(sizes.values())
            if count_for(due[_GLOBAL], total) >= total:
                raise ValueError(
                    f"A global target of {due[_GLOBAL]!r} would prune all {total} entries of the chosen tensors; "
                    "give a lower `sparsity`."
                )
            return
        empty = [n for n, s in due.items() if n in sizes and count_for(s, sizes[n]) >= sizes[n]]
        if empty and not self.method.structured:
            raise ValueError(
                f"The target would prune every entry of {empty} (sparsity {max(due[n] for n in empty)!r} of "
                f"{min(sizes[n] for n in empty)} entries rounds to all of them); give a lower `sparsity`."
            )

    def _check_overlap(self, trainer: Any) -> None:
        mine = {t.name for t in self._targets}
        for other in trainer.callbacks:
            if other is self or not isinstance(other, PruningScheduleCallback):
                continue
            shared = sorted(mine & {t.name for t in other._targets})
            if shared:
                raise ValueError(
                    f"Two PruningScheduleCallbacks in one Trainer both prune {shared}; give them disjoint "
                    "`parameters` (one callback per tensor)."
                )

    def _check_sharding(self) -> None:
        """Under FSDP2, refuse before training what cannot work on row shards."""
        why = None
        if not self.method.supports_sharding:
            why = (
                f"`method={self.method.name}` needs whole tensors (structured, neuron and torch's own methods "
                "do); L1, random and importance-function methods work on shards"
            )
        elif self.mask_mode == "hook":
            why = "`mask_mode='hook'` (torch's reparametrization) cannot wrap sharded DTensor parameters"
        elif self.rewind is not None:
            why = "`rewind` would keep each process's shard of the rewind point, which a full checkpoint cannot hold"
        if why:
            raise ValueError(f"PruningScheduleCallback under FSDP2 (ModelParallelStrategy): {why}.")

    def _check_finite(self) -> None:
        targets = self.method.masked(self._targets)
        flags = [int(not bool(torch.isfinite(local_view(t.tensor)).all())) for t in targets]
        if self._store.group is not None:
            flags = self._store.group.sum(flags)
        bad = [t.name for t, flag in zip(targets, flags) if flag]
        if bad:
            raise ValueError(
                f"Pruning step {self._steps + 1}: {bad} hold NaN or infinite values; no tensor was pruned. "
                "Check the learning rate, the loss or the data."
            )

    def _warn_if_short(self, report: SparsityReport, why: str = "training ended") -> None:
        final = self._final_targets()
        if not any(self._applied.get(name, 0.0) < s - _EPS for name, s in final.items()):
            return
        if _GLOBAL in final:
            planned = final[_GLOBAL]
        else:
            sizes = {t.name: t.tensor.numel() for t in self._targets}
            planned = sum(final[n] * k for n, k in sizes.items()) / sum(sizes.values())
        rank_zero_warn(
            f"Pruning: {why} at sparsity {report.sparsity:.4f}, below the planned {planned:.4f} of "
            f"{self.schedule!r} (step {self._steps}); the model is left at {report.sparsity:.4f}."
        )

    # ------------------------------------------------------------------ masks, rewinding

    def _restore_masks(self) -> None:
        """Put back masks saved in a checkpoint (or taken from the model), and, for a later ``fit`` after the
        masks were dropped, mask the zeros again so that pruned entries stay pruned."""
        saved, self._saved_masks = self._saved_masks, {}
        for t in self.method.masked(self._targets):
            mask = next((saved[a] for a in t.aliases if a in saved), saved.get(t.name))
            value = local_view(t.tensor).detach()
            if mask is not None:
                if tuple(mask.shape) != tuple(t.tensor.shape):
                    raise ValueError(
                        f"The checkpoint's mask for {t.name!r} has shape {tuple(mask.shape)}, but the tensor has "
                        f"{tuple(t.tensor.shape)}: the checkpoint belongs to another model."
                    )
                self._store.replace(t, MaskStore.local_part(mask, t.tensor).to(value.device))
            elif t not in self._store and self._steps and not bool(value.ne(0).all()):
                self._store.replace(t, value.ne(0))
        self._store.apply()

    def _end_training(self) -> None:
        if not self._training:
            return
        self._training = False
        if self._calibrating:
            self.method.stop_calibration()
            self._calibrating = False
        if self.mask_mode == "hook":
            reparam.remove(t for t, _ in self._store.items())
        self._store.detach()

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
        rewind(self._targets, self._rewind_to, trainer.optimizers, self._store)

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
        if self.method.calibration_batches and not self._calibrated(pl_module, epoch):
            return
        self._refused = True
        if self.method.takes_sparsity:
            self._check_reachable(due)
        if self.mask_mode == "hook":
            reparam.remove(t for t, _ in self._store.items())
        self._check_finite()
        self._refused = False
        seed = derive_seed(self.seed, self._steps)
        takes = self.method.takes_sparsity
        if self.scope == "global":
            decided = self.method.global_masks(self._targets, due[_GLOBAL] if takes else None, seed, self._store)
        else:
            sparsities = [due[t.name] if takes else None for t in self._targets]
            decided = self.method.local_masks(self._targets, sparsities, seed, self._store)
        for new in decided:
            self._store.set(new.target, new.mask, new.zeros)
        agree_masks(self._store, self.method.masked(self._targets), trainer.strategy)
        self._store.apply()
        if self._calibrating:
            self.method.stop_calibration()
            self._calibrating, self._deferred = False, None
        if self.rewind is not None:
            self._rewind(trainer)
        self._applied.update(due)
        self._steps += 1
        self._report(trainer, pl_module, epoch)
        if self.mask_mode == "hook":
            reparam.install(self._store.items())

    def _calibrated(self, pl_module: nn.Module, epoch: float) -> bool:
        """For a method that observes activations: start its window when a step falls due, and tell whether
        the step can run now (the window has seen ``calibration_batches`` batches); else it waits."""
        if not self._calibrating:
            self.method.start_calibration(pl_module, self.method.masked(self._targets))
            self._calibrating = True
        if not self.method.calibration_done():
            self._deferred = epoch if self._deferred is None else self._deferred
            return False
        strategy = pl_module.trainer.strategy
        self.method.finish_calibration(lambda t: strategy.reduce(t, reduce_op="sum"))
        return True

    def _overall_target(self) -> float | None:
        if not self.method.takes_sparsity:
            return None
        if self.scope == "global":
            return self._applied.get(_GLOBAL)
        sizes = {t.name: t.tensor.numel() for t in self._targets}
        return sum(self._applied.get(n, 0.0) * k for n, k in sizes.items()) / sum(sizes.values())

    def _report(self, trainer: Any, pl_module: nn.Module, epoch: float) -> None:
        report = measure(self._targets, self._goals(), self._store.group)
        self._last_report = report
        counts = self._store.pruned_counts(self._targets)
        emptied = [t.name for t, n in zip(self._targets, counts) if n == t.tensor.numel()]
        if emptied:
            rank_zero_warn(f"Pruning step {self._steps} pruned every entry of {emptied}: their outputs are constant.")
        if self.verbose and trainer.is_global_zero:
            target = self._overall_target()
            goal = "" if target is None else f", target {target:.4f}"
            rank_zero_info(
                f"Pruning step {self._steps} at epoch {epoch:g} (global step {trainer.global_step}): "
                f"sparsity {report.sparsity:.4f}{goal}\n{report}"
            )

    def _log(self, pl_module: nn.Module, report: SparsityReport) -> None:
        log = {f"{self._log_prefix}/sparsity": report.sparsity}
        target = self._overall_target()
        if target is not None:
            log[f"{self._log_prefix}/target"] = target
        if self.log_per_tensor:
            log.update({f"pruning/sparsity/{t.name}": t.sparsity for t in report.tensors})
        for key, value in self.method.metrics(self._store).items():  # "pruning/x" -> "pruning/<i>/x" if shared
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

    @property
    def targets(self) -> list[PruningTarget]:
        """The tensors being pruned (resolved when ``fit`` starts)."""
        return list(self._targets)

    @property
    def selection(self) -> SelectionSummary | None:
        """What the selection takes of the model and what it leaves out, with reasons (when ``fit`` starts)."""
        return self._selection

    @property
    def masks(self) -> MaskStore:
        """The masks kept beside the model's parameters."""
        return self._store

    @property
    def last_report(self) -> SparsityReport | None:
        """The measured figures after the latest pruning step."""
        return self._last_report
