"""Layer sensitivity analysis: how much each tensor can lose on its own, and per-layer targets from it.

:func:`sensitivity_analysis` prunes one tensor at a time, at each of a list of sparsities, evaluates a
metric, and puts the weights back: the model's ``state_dict`` is bit-identical afterwards.
:func:`suggest_sparsity` turns the resulting :class:`SensitivityTable` into per-tensor targets that reach an
overall sparsity with the least predicted loss, as a mapping that
``PruningScheduleCallback(sparsity=...)`` takes as it is. :func:`plot_sensitivity` draws the curves
(needs ``matplotlib``: ``pip install 'lightning-prune[plot]'``).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(32, 4)
    >>> loader = DataLoader(TensorDataset(x, net(x).argmax(1)), batch_size=8)
    >>> accuracy = lambda preds, target: (preds.argmax(1) == target).float().mean().item()
    >>> table = sensitivity_analysis(net, loader, accuracy, sparsities=(0.5, 0.9))
    >>> table.names, table.sparsities, table.baseline
    (('0.weight', '2.weight'), (0.5, 0.9), 1.0)
    >>> plan = suggest_sparsity(table, 0.5)
    >>> round(sum(plan[n] * table.numels[n] for n in plan) / sum(table.numels.values()), 6)
    0.5
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_prune import reparam
from lightning_prune._utils.checks import check_fraction, check_number, is_number
from lightning_prune._utils.lightning import CallbackBase
from lightning_prune._utils.modules import to_device
from lightning_prune._utils.table import format_table
from lightning_prune.files.atomic import atomic_write, write_text
from lightning_prune.methods import ImportanceFn, MethodName, PruningMethod, resolve_method
from lightning_prune.selection import ParameterSpec, PruningTarget, select_parameters
from lightning_prune.step import due_for, prune_step
from lightning_prune.store import MaskStore

__all__ = ["MetricLike", "SensitivityTable", "plot_sensitivity", "sensitivity_analysis", "suggest_sparsity"]

MetricLike = Metric | Callable[[Tensor, Tensor], float] | str
DEFAULT_SPARSITIES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class SensitivityTable:
    """The metric with each tensor pruned alone, at each sparsity, and with none pruned.

    Attributes:
        names: qualified tensor names, in model order.
        sparsities: the sparsities tried, increasing.
        metrics: ``{name: (metric at each sparsity, ...)}``.
        numels: ``{name: number of entries}``.
        baseline: the metric of the dense (unpruned) model.
        higher_is_better: whether a larger metric is better (accuracy) or worse (a loss).
        metric_name: a label for tables and plots.
    """

    names: tuple[str, ...]
    sparsities: tuple[float, ...]
    metrics: Mapping[str, tuple[float, ...]]
    numels: Mapping[str, int]
    baseline: float
    higher_is_better: bool = True
    metric_name: str = "metric"

    def value(self, name: str, sparsity: float) -> float:
        """The measured metric with ``name`` pruned to ``sparsity`` (one of :attr:`sparsities`, or 0)."""
        if sparsity == 0:
            return self.baseline
        return self.metrics[name][self.sparsities.index(sparsity)]

    def drops(self, name: str) -> tuple[float, ...]:
        """The loss against the dense model at each sparsity (positive: worse), whatever the metric's sense."""
        sign = 1.0 if self.higher_is_better else -1.0
        return tuple(sign * (self.baseline - m) for m in self.metrics[name])

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per measurement (``tensor``, ``numel``, ``sparsity``, ``metric``, ``drop``); the first row
        is the dense model (``tensor="<dense>"``, sparsity 0)."""
        rows: list[dict[str, Any]] = [
            {
                "tensor": "<dense>",
                "numel": sum(self.numels.values()),
                "sparsity": 0.0,
                "metric": self.baseline,
                "drop": 0.0,
            }
        ]
        for name in self.names:
            for s, m, d in zip(self.sparsities, self.metrics[name], self.drops(name)):
                rows.append({"tensor": name, "numel": self.numels[name], "sparsity": s, "metric": m, "drop": d})
        return rows

    def to_csv(self, path: str | Path | None = None) -> str:
        """The rows of :meth:`to_rows` as CSV text, also written to ``path`` (UTF-8) when given.

        The file is written beside ``path`` and renamed over it once complete, so that a failed write leaves the
        previous file as it was.

        Raises:
            OSError: naming ``path``, when the file cannot be written.
        """
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["tensor", "numel", "sparsity", "metric", "drop"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.to_rows())
        text = out.getvalue()
        if path is not None:
            write_text(path, text)
        return text

    def __str__(self) -> str:
        header = ["tensor", "numel", *(f"{s:g}" for s in self.sparsities)]
        rows = [header]
        for name in self.names:
            rows.append([name, str(self.numels[name]), *(f"{m:.4f}" for m in self.metrics[name])])
        lines = format_table(rows)
        sense = "higher is better" if self.higher_is_better else "lower is better"
        title = (
            f"{self.metric_name} with one tensor pruned (columns: its sparsity); dense: {self.baseline:.4f} ({sense})"
        )
        return "\n".join([title, *lines])


# ---------------------------------------------------------------------------------------------- checks


def _check_sparsities(sparsities: Iterable[float]) -> tuple[float, ...]:
    values = tuple(sparsities) if not isinstance(sparsities, (str, bytes)) else ()
    bad = [s for s in values if not is_number(s) or not 0 < float(s) < 1]
    if not values or bad or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"`sparsities` must be a non-empty, strictly increasing list of values in (0, 1), got {sparsities!r}."
        )
    return tuple(float(s) for s in values)


def _check_metric(metric: object) -> None:
    if not (isinstance(metric, (str, Metric)) or callable(metric)):
        raise ValueError(
            "`metric` must be a torchmetrics Metric, a function (preds, target) -> float, or the key of a metric "
            f"logged in `validation_step` (str), got {metric!r}."
        )


# ---------------------------------------------------------------------------------------------- pruning one copy


def _pruned_copy(target: PruningTarget, method: PruningMethod, sparsity: float, seed: int) -> Tensor:
    """The tensor's weights pruned to ``sparsity`` by ``method`` (one :func:`~lightning_prune.prune_step`),
    computed on a detached copy."""
    holder = nn.Module()
    with torch.no_grad():
        holder.register_parameter(target.param, nn.Parameter(target.tensor.detach().clone()))
    copy = PruningTarget(target.name, target.module_name, holder, target.param, sparsity, layout=target.layout)
    prune_step(method, [copy], due_for(method, [copy], sparsity, "local"), MaskStore(), seed=seed)
    return copy.tensor.detach()


class _Swap:
    """Put a pruned copy into a tensor's storage in place, and the saved values back afterwards."""

    def __init__(self, target: PruningTarget, method: PruningMethod, sparsity: float, seed: int) -> None:
        self.target, self.method, self.sparsity, self.seed = target, method, sparsity, seed
        self._saved: Tensor | None = None

    def __enter__(self) -> None:
        pruned = _pruned_copy(self.target, self.method, self.sparsity, self.seed)
        tensor = self.target.tensor
        with torch.no_grad():
            self._saved = tensor.detach().clone()
            tensor.copy_(pruned)

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            with torch.no_grad():
                self.target.tensor.copy_(self._saved)
            self._saved = None


class _SwapDuringValidation(CallbackBase):
    """Prunes one tensor's copy once the Trainer has placed the model, and restores it before teardown."""

    def __init__(self) -> None:
        self.swap: _Swap | None = None

    def on_validation_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.swap is not None:
            self.swap.__enter__()

    def on_validation_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.swap is not None:
            self.swap.__exit__()


# ---------------------------------------------------------------------------------------------- evaluation


def _evaluate_loop(model: nn.Module, dataloader: Iterable[Any], metric: Any) -> float:
    device = next(model.parameters()).device
    if isinstance(metric, Metric):
        metric.reset()
        metric.to(device)
    preds_all, target_all = [], []
    with torch.no_grad():
        for batch in dataloader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(
                    "Batches must be (inputs, target) pairs for `sensitivity_analysis` without a Trainer; got a "
                    f"{type(batch).__name__}. Pass `metric` as the key your `validation_step` logs to run it through "
                    "`Trainer.validate` instead."
                )
            preds = model(to_device(batch[0], device))
            target = to_device(batch[1], device)
            if isinstance(metric, Metric):
                metric.update(preds, target)
            else:
                preds_all.append(preds)
                target_all.append(target)
    if isinstance(metric, Metric):
        value = metric.compute()
        metric.reset()
    else:
        value = metric(torch.cat(preds_all), torch.cat(target_all))
    return float(value)


def _trainer_for(model: nn.Module) -> Any:
    try:
        import lightning.pytorch as lp

        if isinstance(model, lp.LightningModule):
            return lp.Trainer
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    import pytorch_lightning as pl

    return pl.Trainer


class _Evaluator:
    """Evaluates the model as it is, either in a plain loop or through ``trainer.validate``."""

    def __init__(self, model: nn.Module, dataloader: Any, metric: MetricLike, trainer: Any) -> None:
        self.model, self.dataloader, self.metric = model, dataloader, metric
        self.trainer = trainer
        self.swapper = _SwapDuringValidation()
        if isinstance(metric, str) and self.trainer is None:
            self.trainer = _trainer_for(model)(
                accelerator="auto",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )

    def __call__(self, swap: _Swap | None) -> float:
        if not isinstance(self.metric, str):
            if swap is None:
                return _evaluate_loop(self.model, self.dataloader, self.metric)
            with swap:
                return _evaluate_loop(self.model, self.dataloader, self.metric)
        self.swapper.swap = swap
        self.trainer.callbacks.append(self.swapper)
        try:
            datamodule = hasattr(self.dataloader, "val_dataloader") and hasattr(self.dataloader, "setup")
            kwargs = {"datamodule": self.dataloader} if datamodule else {"dataloaders": self.dataloader}
            results = self.trainer.validate(self.model, verbose=False, **kwargs)
        finally:
            self.trainer.callbacks.remove(self.swapper)
            self.swapper.swap = None
            if swap is not None:
                swap.__exit__()  # a no-op unless validation failed before `on_validation_end`
        if not results or self.metric not in results[0]:
            logged = sorted(results[0]) if results else []
            raise ValueError(f"`metric`={self.metric!r} was not logged by `validation_step`; it logged {logged}.")
        return float(results[0][self.metric])


def sensitivity_analysis(
    model: nn.Module,
    dataloader: Any,
    metric: MetricLike,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    parameters: Sequence[ParameterSpec] | None = None,
    method: MethodName | type | PruningMethod = "l1_unstructured",
    *,
    method_kwargs: Mapping[str, Any] | None = None,
    importance: ImportanceFn | None = None,
    trainer: Any = None,
    higher_is_better: bool | None = None,
    seed: int = 0,
) -> SensitivityTable:
    """Prune each chosen tensor alone at each sparsity, evaluate, and restore it: a sensitivity table.

    Each evaluation prunes a *copy* of one tensor's weights with ``method`` and puts it into the tensor's storage in
    place, under ``torch.no_grad``; the saved values go back right after, so the model's ``state_dict`` is bit-
    identical afterwards (the model also returns to its train/eval mode, and to its device after a Trainer moved
    it). Cost: ``1 + len(names) * len(sparsities)`` evaluations.

    Args:
        model: the network, or the ``LightningModule`` holding it (then the names are relative to it, as the
            callback's are: ``"model.conv1.weight"``).
        dataloader: the evaluation batches. Without a Trainer each batch is ``(inputs, target)`` and
            ``model(inputs)`` gives the predictions; with a Trainer, anything ``Trainer.validate`` takes
            (dataloaders or a ``LightningDataModule``).
        metric: a ``torchmetrics.Metric`` (reset before each evaluation, moved to the model's device), a
            function ``(preds, target) -> float`` over the whole set's concatenated predictions, or the key
            of a metric that ``model.validation_step`` logs (``"val_acc"``): then every evaluation runs
            through ``trainer.validate``, on whatever device and strategy that Trainer has.
        sparsities: the sparsities to try, strictly increasing, in (0, 1).
        parameters: which tensors, as in :class:`~lightning_prune.PruningScheduleCallback` (default: the
            weight of every ``nn.Conv*d`` and ``nn.Linear``).
        method: how each copy is pruned, as in the callback (name, ``BasePruningMethod`` subclass that takes
            an ``amount``, or a :class:`~lightning_prune.methods.PruningMethod`).
        method_kwargs: extra arguments for the method, as in the callback.
        importance: a scoring function replacing the magnitude, as in the callback.
        trainer: the Trainer used when ``metric`` is a logged key (default: a quiet one-device Trainer with
            ``accelerator="auto"``); ignored otherwise.
        higher_is_better: the metric's sense; default: the metric's own ``higher_is_better`` attribute, else
            ``True``. Needed by :func:`suggest_sparsity` to tell a loss from a gain.
        seed: seeds random methods.

    Returns:
        A :class:`SensitivityTable`.

    Raises:
        ValueError: for sparsities outside (0, 1) or not increasing, a metric of another kind, a method that
            takes no amount, a selection that matches nothing, or a logged key that ``validation_step`` does
            not log.
    """
    sparsities = _check_sparsities(sparsities)
    _check_metric(metric)
    resolved = resolve_method(method, method_kwargs, importance)
    if not resolved.takes_sparsity:
        raise ValueError(f"`method={resolved.name}` takes no amount; a sensitivity sweep needs one that does.")
    if not resolved.per_tensor:
        raise ValueError(
            f"`method={resolved.name}` decides masks across coupled tensors (a neuron's row and its columns in the "
            "next layer), so pruning one tensor alone would measure nothing; sweep neuron pruning with "
            "`method='ln_structured'` on each layer, or compare whole runs of the callback."
        )
    if higher_is_better is None:
        higher_is_better = bool(getattr(metric, "higher_is_better", True) is not False)
    evaluate = _Evaluator(model, dataloader, metric, trainer)
    was_training = model.training
    with reparam.plain(model):  # a model in torch's pruning form is read as plain parameters, then put back
        targets = select_parameters(model, parameters)
        numels = {t.name: t.tensor.numel() for t in targets}
        device = targets[0].tensor.device
        model.eval()
        try:
            baseline = evaluate(None)
            metrics = {t.name: tuple(evaluate(_Swap(t, resolved, s, seed)) for s in sparsities) for t in targets}
        finally:
            model.train(was_training)
            if targets[0].tensor.device != device:  # a Trainer's teardown moves the model to the CPU
                model.to(device)
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", type(metric).__name__)
    return SensitivityTable(
        names=tuple(t.name for t in targets),
        sparsities=sparsities,
        metrics=metrics,
        numels=numels,
        baseline=baseline,
        higher_is_better=higher_is_better,
        metric_name=str(name),
    )


# ---------------------------------------------------------------------------------------------- suggestion


def _drop_at(xs: Sequence[float], ys: Sequence[float], s: float) -> float:
    """Linear interpolation of the monotone curve through (0, 0) and (xs, ys) at ``s``."""
    px, py = 0.0, 0.0
    for x, y in zip(xs, ys):
        if s <= x:
            return py + (y - py) * (s - px) / (x - px)
        px, py = x, y
    return py


def suggest_sparsity(
    table: SensitivityTable,
    overall_sparsity: float,
    *,
    max_sparsity: float | None = None,
    step: float = 0.01,
) -> dict[str, float]:
    """Per-tensor sparsities that reach ``overall_sparsity`` of all the table's entries with the least
    predicted loss.

    Each tensor's predicted loss at sparsity ``s`` is its measured drop against the dense model, made
    non-decreasing in ``s`` (a running maximum, so noise never makes more pruning look better) and
    interpolated linearly between the measured points, with no loss at 0. Losses are assumed to add up.
    Pruning grows greedily in steps of ``step`` of a tensor, each time on the tensor whose next step costs
    the least predicted loss per pruned entry, until the overall target (weighted by tensor size) is
    reached; the last step is cut so that the target is met exactly.

    Args:
        table: from :func:`sensitivity_analysis`.
        overall_sparsity: the fraction of all the table's entries to prune, in [0, 1).
        max_sparsity: no tensor goes above this (default: the largest sparsity measured; the curves say
            nothing beyond it).
        step: the resolution of the allocation, in (0, 1).

    Returns:
        ``{qualified name: sparsity}``, in the table's order: give it to
        ``PruningScheduleCallback(sparsity=...)`` as it is (exact names are patterns that match themselves)
        with the same model the table was measured on.

    Raises:
        ValueError: for targets outside [0, 1), a ``step`` outside (0, 1), or an overall target that the
            per-tensor cap cannot reach.

    Example::

        >>> table = SensitivityTable(
        ...     names=("a", "b"), sparsities=(0.5, 0.9), numels={"a": 100, "b": 100}, baseline=1.0,
        ...     metrics={"a": (0.99, 0.98), "b": (0.7, 0.2)},
        ... )
        >>> suggest_sparsity(table, 0.5)
        {'a': 0.9, 'b': 0.1}
    """
    overall_sparsity = check_fraction("overall_sparsity", overall_sparsity)
    cap = table.sparsities[-1] if max_sparsity is None else max_sparsity
    cap = check_number("max_sparsity", cap, low=0.0, high=1.0, low_open=True, high_open=True)
    step = check_number("step", step, low=0.0, high=1.0, low_open=True, high_open=True)
    total = sum(table.numels[n] for n in table.names)
    if overall_sparsity > cap + 1e-12:
        raise ValueError(
            f"`overall_sparsity`={overall_sparsity} cannot be reached with no tensor above {cap} "
            "(`max_sparsity`, default the largest sparsity in the table)."
        )
    curves = {}
    for name in table.names:
        running, ys = 0.0, []
        for d in table.drops(name):
            running = max(running, d)
            ys.append(running)
        curves[name] = ys
    current = dict.fromkeys(table.names, 0.0)
    need = overall_sparsity * total
    done = 0.0
    while need - done > 1e-9 * total:
        best, best_cost, best_next = None, math.inf, 0.0
        for name in table.names:
            s = current[name]
            if s >= cap - 1e-12:
                continue
            nxt = min(cap, s + step)
            cost = _drop_at(table.sparsities, curves[name], nxt) - _drop_at(table.sparsities, curves[name], s)
            cost /= (nxt - s) * table.numels[name]
            if cost < best_cost - 1e-15:
                best, best_cost, best_next = name, cost, nxt
        assert best is not None  # reachable: checked against the cap above
        gain = (best_next - current[best]) * table.numels[best]
        if done + gain > need:
            best_next = current[best] + (need - done) / table.numels[best]
            gain = need - done
        current[best] = best_next
        done += gain
    return {name: round(s, 6) for name, s in current.items()}


# ---------------------------------------------------------------------------------------------- plot


def plot_sensitivity(table: SensitivityTable, path: str | Path, *, title: str | None = None) -> Path:
    """Save one curve per tensor, the metric against that tensor's sparsity, as a PNG at ``path``.

    The dense model's metric is the curves' common point at sparsity 0 and a dashed line. The format follows the
    suffix of ``path`` (PNG without one, or for ``.png``; any other format that matplotlib writes, such as ``.svg``
    or ``.pdf``). The file is written beside ``path`` (whose folders are created) and renamed over it once complete.

    Raises:
        ImportError: without matplotlib (``pip install 'lightning-prune[plot]'``).
        ValueError: for a suffix that matplotlib cannot write.
        OSError: naming ``path``, when the file cannot be written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("`plot_sensitivity` needs matplotlib: pip install 'lightning-prune[plot]'.") from err
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)  # no pyplot: no global backend or figure state is touched
    ax = fig.add_subplot()
    xs = [0.0, *table.sparsities]
    for name in table.names:
        ax.plot(
            xs, [table.baseline, *table.metrics[name]], marker="o", markersize=3, label=f"{name} ({table.numels[name]})"
        )
    ax.axhline(table.baseline, color="grey", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("sparsity of the one pruned tensor")
    ax.set_ylabel(table.metric_name)
    ax.set_title(title or "Sensitivity: one tensor pruned at a time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    image_format = path.suffix[1:].lower() or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=image_format, dpi=120))
    return path
