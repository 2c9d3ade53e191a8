"""``PruningScheduleCallback``: its hooks say *when*; :func:`lightning_prune.prune_step` is what a step does, one
masking object (:class:`~lightning_prune.store.StoreMasking`, or torch's form) keeps pruned entries at zero between
steps, and a method that observes activations waits in a :class:`~lightning_prune.calibration.CalibrationWindow`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch.nn.utils.prune as prune
from torch import nn
from typing_extensions import override

from lightning_prune import reparam
from lightning_prune._utils.checks import allowed, check_choice, check_int
from lightning_prune._utils.lightning import CallbackBase, rank_zero_info, rank_zero_warn
from lightning_prune.calibration import CalibrationWindow
from lightning_prune.distributed import agree_masks, check_sharding, check_strategy, collective_for
from lightning_prune.learning_rate import warn_if_rate_low
from lightning_prune.methods import ImportanceFn, MethodName, PruningMethod, Scope, check_scope, resolve_method
from lightning_prune.methods.allocated import Allocation, with_allocation
from lightning_prune.report import SparsityReport, measure
from lightning_prune.rewind import Rewind, as_rewind, capture, rewind
from lightning_prune.schedules import (
    OneShot,
    Progress,
    Schedule,
    ScheduleLike,
    as_schedule,
    ends_too_early,
    resolve_sparsity,
)
from lightning_prune.seeding import derive_seed
from lightning_prune.selection import (
    ParameterSpec,
    PruningTarget,
    SelectionSummary,
    SparsitySpec,
    check_disjoint,
    check_exclude,
    describe_selection,
    planned_targets,
    select_parameters,
)
from lightning_prune.step import PruningError, check_reachable, prune_step
from lightning_prune.store import MaskStore, StoreMasking
from lightning_prune.targets import Due, Global, Local, Trigger

__all__ = ["PruningScheduleCallback"]

MaskMode = Literal["inplace", "hook"]
_STATE_VERSION = 2


class PruningScheduleCallback(CallbackBase):
    """Prune a model while it trains, to exact cumulative sparsity targets, and make it permanent at the end.

    At each scheduled point ("epoch ``e``": before the training batches of epoch ``e``; step schedules also before
    every ``n``-th optimizer step) the chosen tensors are brought to the schedule's *cumulative* target, exactly
    (one entry per tensor in local scope, one overall in global scope); entries once pruned stay pruned. The model
    stays a plain model: its parameters are the user's tensors with the pruned entries at zero and its
    ``state_dict`` has the user's keys, so checkpoints load into the user's own class with nothing of this
    package; the masks (:attr:`masks`) and the progress travel in the callback's state, and
    ``fit(ckpt_path=...)`` resumes exactly. Gradients are masked before every optimizer step (see
    :mod:`lightning_prune.store`). Under DDP the ranks' masks are checked to agree; under FSDP2
    (``ModelParallelStrategy(tensor_parallel_size=1)``) masks are kept per shard. Several pruning callbacks (on
    disjoint tensors) log under ``pruning/<i>/``. The guides (``docs/``) say more on each point.

    Args:
        sparsity: the final cumulative target, a fraction in [0, 1) of every chosen tensor (local) or of all
            together (global); or a per-layer mapping from module types, type names or name patterns to targets
            (local; the first matching key wins); or a plan such as :func:`~lightning_prune.inference.plan_speedup`
            returns (its per-tensor targets; the plan is kept in ``plan`` and printed when ``fit`` starts). Left
            out for a method that takes none, or when the schedule defines it (``AtEpochs({...})``, a function).
        parameters: qualified names relative to the ``LightningModule`` (any name of a shared tensor), glob
            patterns, or ``(module, "weight")`` pairs. Default: every matrix weight (:mod:`lightning_prune.layers`:
            ``Linear``, ``Conv*d``, Hugging Face's ``Conv1D``, attention's ``in_proj_weight``, ...), leaving out
            embedding tables and tensors tied to them, positional parameters, norms and biases unless named.
            What was chosen and left out is printed when ``fit`` starts (``verbose``) and kept in :attr:`selection`.
        exclude: names or glob patterns taken out of the selection after ``parameters`` or the default
            (``["model.conv1.*", "model.lm_head.*"]``: keep a first layer or an untied head dense).
        method: ``"l1_unstructured"`` (default), ``"random_unstructured"``, ``"ln_structured"``,
            ``"random_structured"``, a ``torch.nn.utils.prune.BasePruningMethod`` subclass (driven with exact
            integer amounts when its constructor takes ``amount``, else applied as it is at each step), or a
            :class:`~lightning_prune.methods.PruningMethod` (``NeuronPruning``, ``NMPruning``, ``Wanda``).
        scope: ``"local"`` (each tensor to its own target) or ``"global"`` (one ranking across all tensors).
        schedule: a :class:`~lightning_prune.schedules.Schedule` (``OneShot``, ``AtEpochs``, ``Polynomial``) or a
            function ``f(epoch) -> cumulative sparsity``. Default: ``OneShot(epoch=0)``.
        method_kwargs: extra arguments for a method given by name or class (``n``, ``dim`` for ``ln_structured``).
        importance: a function ``tensor -> scores`` (higher is kept) replacing the magnitude.
        make_permanent: at the end of training, drop the masks, keeping the zeros as plain weights; ``False`` keeps
            them in the callback (and, with ``mask_mode="hook"``, on the model in torch's form).
        compact: at the end, remove pruned neurons physically (``NeuronPruning``; see
            :func:`lightning_prune.compact`).
        verbose: print the selection, a table at each pruning step and a summary at the end, on rank zero.
        seed: seeds random methods, identically on every process.
        log_per_tensor: also log ``pruning/sparsity/<qualified name>`` for every tensor.
        rewind: lottery-ticket rewinding, off by default: ``"init"`` or a :class:`~lightning_prune.rewind.Rewind`;
            after each step the survivors go back to their values at that point.
        mask_mode: ``"inplace"`` (default; plain parameters, masks kept aside) or ``"hook"`` (torch's form,
            ``weight_orig`` and ``weight_mask``, between steps; it cannot mask attention's ``out_proj`` or a tied
            weight, and refuses them when ``fit`` starts). Checkpoints hold the model's own keys in both.
        allocation: how a global target is shared out: ``"global"``, ``"uniform"``, ``"erk"``, ``"owl"``.

    Raises:
        ValueError: for any argument outside what is allowed (see the messages); selection errors are raised when
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
        exclude: Sequence[str] = (),
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
        allocation: Allocation = "global",
    ) -> None:
        sparsity, self.plan = planned_targets(sparsity)
        self.scope: Scope = check_choice("scope", scope, allowed(Scope))
        self.mask_mode: MaskMode = check_choice("mask_mode", mask_mode, allowed(MaskMode))
        self.method = with_allocation(resolve_method(method, method_kwargs, importance), allocation, sparsity, verbose)
        self.schedule: Schedule = OneShot(epoch=0) if schedule is None else as_schedule(schedule)
        self.seed = check_int("seed", seed)
        check_scope(self.method, scope)
        if compact and not self.method.compacts:
            raise ValueError(
                "`compact=True` removes pruned neurons and needs a method that can (`method=NeuronPruning(...)`), "
                f"got method={self.method.name}."
            )
        self.sparsity = resolve_sparsity(sparsity, self.schedule, self.method.name, self.method.takes_sparsity, scope)
        self.parameters = parameters
        self.exclude = check_exclude(exclude)
        self.make_permanent = make_permanent
        self.compact = compact
        self.verbose = verbose
        self.log_per_tensor = log_per_tensor
        self.rewind = as_rewind(rewind)
        self._masking = reparam.TorchFormMasking() if mask_mode == "hook" else StoreMasking()
        self._calibration = CalibrationWindow(self.method)
        self._store = MaskStore()
        self._targets: list[PruningTarget] = []
        self._progress = Progress(self.schedule, self._finals([]))  # the targets planned and reached
        self._selection: SelectionSummary | None = None
        self._steps = 0
        self._last_report: SparsityReport | None = None
        self._rewind_to: dict[str, Any] | None = None
        self._log_prefix = "pruning"  # "pruning/<i>" when several pruning callbacks share a Trainer
        self._saved_masks: dict[str, Any] = {}  # masks from a checkpoint or the model, until training starts
        self._training = False

    @property
    def state_key(self) -> str:
        # configuration values only (as ModelCheckpoint's): equal in every process, so a resumed run finds its state
        return self._generate_state_key(
            parameters=repr(self.parameters),
            sparsity=repr(self.sparsity),
            method=self.method.name,
            scope=self.scope,
            schedule=repr(self.schedule),
            **({"exclude": repr(self.exclude)} if self.exclude else {}),
        )

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        reparam.convert_on_load(pl_module)  # fit/validate/test(ckpt_path=<a 0.1 checkpoint>) into a plain model
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        self._store.group = collective_for(trainer.strategy)
        if self._store.group is not None:
            check_sharding(self.method, self.mask_mode, self.rewind is not None)
        self._saved_masks.update(reparam.take_over(pl_module))  # a model that torch's pruning has masked
        self.sparsity = self.sparsity if self.plan is None else planned_targets(self.plan, pl_module)[0]  # to pl_module
        local = self.sparsity if self.scope == "local" else None
        self._targets = select_parameters(pl_module, self.parameters, local, self.exclude)
        self._progress.plan(self._finals(self._targets), {t.name: t.tensor.numel() for t in self._targets})
        self._selection = describe_selection(pl_module, self._targets)
        if self.verbose:
            plan = "" if self.plan is None else f"\nThe targets of {type(self.plan).__name__}:\n{self.plan}"
            rank_zero_info(f"{type(self).__name__}: {self._selection}{plan}")
        check_reachable(self.method, self._targets, self._progress.final())
        peers = [c for c in trainer.callbacks if isinstance(c, PruningScheduleCallback)]
        check_disjoint([t.name for t in self._targets], [t.name for p in peers if p is not self for t in p._targets])
        self._masking.check(pl_module, self.method.masked(self._targets))
        self._log_prefix = "pruning" if len(peers) <= 1 else f"pruning/{peers.index(self)}"
        self.method.setup(pl_module, self._targets)
        if (late := ends_too_early(self.schedule, trainer.max_epochs)) is not None:
            rank_zero_warn(late)

    @override
    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if (every := self.schedule.every_n_steps) is not None and math.isinf(trainer.num_training_batches):
            raise ValueError(f"`{self.schedule!r}` prunes every {every} steps: it needs a dataloader with a length.")
        self._saved_masks.update(reparam.loaded_masks(pl_module, pop=True))
        saved, self._saved_masks = MaskStore.unpack(self._saved_masks), {}
        self._store.restore(self.method.masked(self._targets), saved, mask_zeros=self._steps > 0)
        if self._steps and self._last_report is None:  # resumed: log the figures of the steps taken before
            self._last_report = measure(self._targets, self._progress.goals(), self._store.group)
        self._training = True
        warn_if_rate_low(trainer, self.schedule)  # the learning rate left when the ramp ends
        if self._calibration.resuming:  # a checkpoint inside a calibration window: keep observing where it stopped
            self._calibration.begin(pl_module, self.method.masked(self._targets))
        self._masking.start(self._store, trainer.optimizers)

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._capture_rewind(trainer, epoch_start=True)
        self._prune_to(trainer, pl_module, float(trainer.current_epoch))

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        every, accumulate = self.schedule.every_n_steps, trainer.accumulate_grad_batches
        if batch_idx % accumulate:
            return
        self._capture_rewind(trainer, epoch_start=False)
        if self._calibration.waiting_at is not None:  # a step waiting for its calibration batches
            self._prune_to(trainer, pl_module, self._calibration.waiting_at)
        if every is None or batch_idx == 0 or trainer.global_step % every:
            return
        steps_per_epoch = math.ceil(trainer.num_training_batches / accumulate)
        self._prune_to(trainer, pl_module, trainer.current_epoch + (batch_idx // accumulate) / steps_per_epoch)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        self._masking.before_optimizer_step(self._store, optimizer)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._last_report is not None:  # the last figures measured in the epoch (a step schedule prunes often)
            self._log(pl_module, self._last_report)

    @override
    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._end_training()
        if not self._targets:
            return
        report = measure(self._targets, self._progress.goals(), self._store.group)
        self._warn_if_short(report)
        how = "masks dropped, zeros kept as plain weights" if self.make_permanent else "masks kept"
        if self.compact:
            widths = self.method.compact(pl_module)
            how = "compacted, widths " + ", ".join(f"{n}: {a}->{b}" for n, (a, b) in widths.items())
        if self.compact or self.make_permanent:
            self._store.clear()
        else:
            self._masking.keep(self._store)
        if self.verbose and trainer.is_global_zero:
            rank_zero_info(f"Pruning finished after {self._steps} step(s), {how}:\n{report}")

    @override
    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        started = self._training
        self._end_training()
        if started and self._targets and not isinstance(exception, PruningError):  # a refusal said why already
            report = measure(self._targets, self._progress.goals(), self._store.group)
            self._warn_if_short(report, f"training stopped by {type(exception).__name__}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "applied": self._progress.state(),
            "steps": self._steps,
            "rewind": self._rewind_to,
            "masks": {**MaskStore.pack(self._saved_masks), **self._store.state_dict()},  # loaded, not yet restored
            **self._calibration.state_dict(),  # "deferred", "calibrating", "method"
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._progress.load(state_dict.get("applied") or {})
        self._steps = int(state_dict.get("steps", 0))
        self._rewind_to = state_dict.get("rewind")
        self._saved_masks = MaskStore.unpack(state_dict.get("masks") or {})
        self._calibration.load_state_dict(state_dict)

    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        self._masking.checkpoint(checkpoint)

    # ------------------------------------------------------------------ pruning

    def _prune_to(self, trainer: Any, pl_module: nn.Module, epoch: float) -> None:
        due = self._progress.due(epoch)
        if due is None:
            return
        if self.method.calibration_batches:  # observe activations first: the step waits for the window
            reduce = partial(trainer.strategy.reduce, reduce_op="sum")
            if not self._calibration.wait(pl_module, self.method.masked(self._targets), epoch, reduce):
                return
        self._masking.before_prune(self._store)
        check_reachable(self.method, self._targets, due)
        seed, agree = derive_seed(self.seed, self._steps), partial(agree_masks, strategy=trainer.strategy)
        report = prune_step(self.method, self._targets, due, self._store, seed=seed, agree=agree)
        self._calibration.close()
        if self.rewind is not None:
            self._rewind(trainer)
            report = measure(self._targets, self._progress.goals(due), self._store.group)
        self._progress.reach(due)
        self._steps += 1
        self._last_report = report
        counts, sizes = self._store.pruned_counts(self._targets), self._progress.sizes
        if emptied := [t.name for t, n in zip(self._targets, counts) if n == sizes[t.name]]:
            rank_zero_warn(f"Pruning step {self._steps} pruned every entry of {emptied}: their outputs are constant.")
        if self.verbose and trainer.is_global_zero:
            goal = "" if (target := self._progress.overall()) is None else f", target {target:.4f}"
            at = f"at epoch {epoch:g} (global step {trainer.global_step})"
            rank_zero_info(f"Pruning step {self._steps} {at}: sparsity {report.sparsity:.4f}{goal}\n{report}")
        self._masking.after_prune(self._store)

    def _finals(self, targets: Sequence[PruningTarget]) -> Due:
        """The run's final targets: each tensor's own (local), one for all (global; 1.0 with a function schedule,
        which gives the values), or a trigger for a method that takes none."""
        if not self.method.takes_sparsity:
            return Trigger()
        if self.scope == "global":
            return Global(self.sparsity if isinstance(self.sparsity, float) else 1.0)
        return Local({t.name: t.sparsity or 0.0 for t in targets})

    def _warn_if_short(self, report: SparsityReport, why: str = "training ended") -> None:
        planned = self._progress.short_of()
        if planned is not None:
            rank_zero_warn(
                f"Pruning: {why} at sparsity {report.sparsity:.4f}, below the planned {planned:.4f} of "
                f"{self.schedule!r} (step {self._steps}); the model is left at {report.sparsity:.4f}."
            )

    def _end_training(self) -> None:
        if self._training:
            self._training = False
            self._calibration.close()
            self._masking.end(self._store)

    def _capture_rewind(self, trainer: Any, epoch_start: bool) -> None:
        if self.rewind is None or self._rewind_to is not None or not self._targets:
            return
        if self.rewind.reached(trainer.current_epoch, trainer.global_step, epoch_start):
            with self._masking.plain(self._store):
                self._rewind_to = capture(self._targets)

    def _rewind(self, trainer: Any) -> None:
        if self._rewind_to is not None:
            rewind(self._targets, self._rewind_to, trainer.optimizers, self._store)
        else:
            rank_zero_warn(f"Pruning step {self._steps + 1} comes before the rewind point {self.rewind!r}: no rewind.")

    def _log(self, pl_module: Any, report: SparsityReport) -> None:
        logged = report.metrics(self._log_prefix, self._progress.overall(), self.log_per_tensor)
        for key, value in self.method.metrics(self._store).items():  # "pruning/x" -> "pruning/<i>/x" if shared
            logged[self._log_prefix + key[len("pruning") :] if key.startswith("pruning/") else key] = value
        for key, value in logged.items():
            prog_bar = key == f"{self._log_prefix}/sparsity"
            pl_module.log(key, value, on_step=False, on_epoch=True, reduce_fx="max", prog_bar=prog_bar, batch_size=1)

    # ------------------------------------------------------------------ read-only views

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
