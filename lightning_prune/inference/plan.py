"""A speed-up asked for before training, resolved into per-layer sparsities: :func:`plan_speedup`.

The kernels' time is a function of a layer's shape, its row counts and its nonzeros, so a few measurements per
layer say what each sparsity would give: each eligible weight matrix is pruned (on a copy) by magnitude, or by
your ``importance`` scores, to each sparsity of a ladder, converted to its sparse form and timed against the dense
layer on the example's row counts. The plan then chooses per layer the sparsity that reaches the speed-up end to
end while removing the least importance: a greedy over the layers' options by time saved per importance removed
(a multiple-choice knapsack), then each layer lowered again where the target still holds. A layer counts only
where its sparse form would beat the dense one by ``min_speedup`` (as :func:`~lightning_prune.to_sparse_inference`
decides). A disturbed measurement only runs long, so each layer's dense time is at most the median cost per
entry and row of all layers times its own, a sparse form at more zeros is never slower than at fewer, and where
the layers timed alone add up to more than the whole model, their times are scaled down to the model's. The plan's
targets feed training (``PruningScheduleCallback(plan)``, which prints the plan when ``fit`` starts) or
:func:`~lightning_prune.prune_once` (``prune_once(model, plan)``), and after training
:func:`~lightning_prune.to_sparse_inference` measures what was reached. The plan takes the tensors the callback
would prune (the default selection, or ``parameters`` and ``exclude``), of those the layers the conversion can make
sparse: a head tied to the embedding stays dense.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.inference import Timing
    >>> def cost(runs):  # injected timings: a layer's time is its stored values; the model 1 s plus its layers
    ...     return {t: (1.0 if t.layer == "" else t.nonzeros * (1 if t.form == "dense" else 3) * 1e-6) for t in runs}
    >>> net = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    >>> plan = plan_speedup(net, torch.randn(1, 512), speedup=1.5, timer=cost, confirm=0)  # no end-to-end check
    >>> plan.reached, sorted(plan.sparsity)
    (True, ['0.weight', '2.weight'])
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_prune._utils.checks import check_int, check_number
from lightning_prune._utils.table import format_table
from lightning_prune.inference.capture import Matrix, call, capture, eligible, matrices
from lightning_prune.inference.convert import to_sparse_inference
from lightning_prune.inference.decide import ROWS_CAP, fitting_forms, time_modules, total_seconds
from lightning_prune.inference.layers import Form
from lightning_prune.inference.report import inference_report
from lightning_prune.inference.timing import Timer, Timing, WallClock
from lightning_prune.selection import ParameterSpec, select_parameters

__all__ = ["DEFAULT_SPARSITIES", "PlannedLayer", "SpeedPlan", "plan_speedup"]

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
Importance = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True)
class PlannedLayer:
    """One weight matrix's target in a :class:`SpeedPlan`.

    Attributes:
        name: the matrix's name (as in :class:`~lightning_prune.inference.LayerChoice`).
        parameter: the qualified parameter name (the key of :attr:`SpeedPlan.sparsity`).
        shape: the matrix's ``(out, in)``.
        sparsity: the target (``0``: left dense).
        dense_seconds: the dense layer's time on the example's row counts.
        sparse_seconds: the sparse form's time at the target (``None`` when left dense).
        importance_removed: the importance (scores) of the entries the target removes, over the layer's total
            (the plan minimises the sum of the removed scores over all layers, as global magnitude pruning does).
    """

    name: str
    parameter: str
    shape: tuple[int, int]
    sparsity: float
    dense_seconds: float
    sparse_seconds: float | None
    importance_removed: float

    @property
    def saved_seconds(self) -> float:
        """What the layer is expected to save on the example."""
        return 0.0 if self.sparse_seconds is None else self.dense_seconds - self.sparse_seconds


@dataclass(frozen=True)
class SpeedPlan:
    """Per-layer sparsity targets expected to make the model ``speedup`` times faster on the example inputs, on
    this machine; ``str(plan)`` is a table.

    Attributes:
        speedup: the speed-up asked for.
        dense_seconds: the dense model's time end to end on the example.
        layers: one :class:`PlannedLayer` per eligible weight matrix, in model order.
        threads: ``torch.get_num_threads()`` during the measurements.
        measured_speedup: the speed-up :func:`~lightning_prune.to_sparse_inference` measured end to end for the
            model pruned to the plan (by the plan's importance) and converted; ``None`` where not measured
            (``confirm=0``).
        rounds: the plans allocated, each after the previous one's measurement fell short.
    """

    speedup: float
    dense_seconds: float
    layers: tuple[PlannedLayer, ...]
    threads: int
    measured_speedup: float | None = None
    rounds: int = 1

    @property
    def expected_seconds(self) -> float:
        """The model's expected time: the dense time less every layer's saving."""
        return self.dense_seconds - sum(layer.saved_seconds for layer in self.layers)

    @property
    def expected_speedup(self) -> float:
        return self.dense_seconds / self.expected_seconds if self.expected_seconds > 0 else float("inf")

    @property
    def reached(self) -> bool:
        """Whether the plan reaches :attr:`speedup`: as measured end to end where it was, else as expected from
        the layers' timings. ``str(plan)`` says why not: measured short of the layers' timings, or even the
        ladder's fastest plan is expected short."""
        measured = self.measured_speedup
        achieved = measured if measured is not None and math.isfinite(measured) else self.expected_speedup
        return achieved >= self.speedup * (1 - 1e-9)

    @property
    def sparsity(self) -> dict[str, float]:
        """``{qualified parameter name: target}`` for ``PruningScheduleCallback(sparsity=...)``,
        ``prune_once`` and ``select_parameters``."""
        return {layer.parameter: layer.sparsity for layer in self.layers}

    def __str__(self) -> str:
        rows: list[tuple[str, ...]] = [
            ("parameter", "shape", "target", "dense ms", "sparse ms", "expected gain", "importance removed")
        ]
        for p in self.layers:
            gain = "" if p.sparse_seconds is None else f"{p.dense_seconds / p.sparse_seconds:.2f}x"
            sparse = "" if p.sparse_seconds is None else f"{p.sparse_seconds * 1e3:.3f}"
            shape = f"{p.shape[0]}x{p.shape[1]}"
            rows.append((p.parameter, shape, f"{p.sparsity:g}", f"{p.dense_seconds * 1e3:.3f}", sparse, gain))
            rows[-1] += (f"{p.importance_removed:.4f}",)
        verdict = "reached"
        if not self.reached:
            short = self.measured_speedup is not None and self.expected_speedup >= self.speedup
            verdict = "NOT reached: " + ("measured short of the layers' timings" if short else "the ladder's fastest")
        measured = "" if self.measured_speedup is None else f", {self.measured_speedup:.2f}x measured converted"
        return "\n".join(
            [
                *format_table(rows),
                f"speed-up {self.speedup:g}x asked, {self.expected_speedup:.2f}x expected from the layers{measured} "
                f"({verdict}; plan {self.rounds}) end to end on example_inputs, {self.threads} threads: dense "
                f"{self.dense_seconds * 1e3:.3f} ms, expected {self.expected_seconds * 1e3:.3f} ms",
            ]
        )


@dataclass(frozen=True)
class _Option:
    sparsity: float
    saved: float  # seconds saved on the example (0 where the sparse form would not be chosen)
    removed: float  # importance removed (the sum of the pruned entries' scores)
    sparse_seconds: float | None
    fraction: float = 0.0  # ``removed`` over the layer's total


def _pruned(weight: Tensor, scores: Tensor, sparsity: float) -> Tensor:
    """A copy of ``weight`` with its ``round(sparsity * n)`` entries of least score zeroed."""
    out = weight.detach().clone(memory_format=torch.contiguous_format)  # Conv1D's matrix is a transposed view
    k = round(sparsity * out.numel())
    out.view(-1)[scores.reshape(-1).argsort()[:k]] = 0
    return out


def _options(matrix: Matrix, sparsities: Sequence[float], scores: Tensor, forms: Sequence[Form], timer: Timer
             ) -> tuple[float, list[_Option]]:  # fmt: skip
    """The dense time on the example, and each sparsity's sparse time and importance removed (the first: dense)."""
    ordered = scores.reshape(-1).double().sort().values.cumsum(0)
    total = float(ordered[-1]) or 1.0
    modules: dict[str, nn.Module] = {"dense": matrix.dense}
    for s in sparsities:
        pruned = dataclasses.replace(matrix, weight=_pruned(matrix.weight, scores, s))
        stored = fitting_forms(pruned, forms)
        if stored:
            form = min(stored, key=stored.__getitem__)
            modules[f"{s}"] = matrix.build(pruned.weight, matrix.bias, form).eval()
    rows = matrix.rows or [1]
    times = {r: time_modules(matrix, modules, r, timer) for r in sorted({min(r, ROWS_CAP) for r in rows})}
    options, fastest = [_Option(0.0, 0.0, 0.0, None)], float("inf")
    for s in sparsities:
        k = round(s * matrix.weight.numel())
        removed = float(ordered[k - 1]) if k else 0.0
        sparse = total_seconds(times, f"{s}", rows) if f"{s}" in modules else None
        fastest = fastest if sparse is None else min(fastest, sparse)  # more zeros are never slower
        options.append(_Option(s, 0.0, removed, None if sparse is None else fastest, removed / total))
    return total_seconds(times, "dense", rows), options


def _settle(found: Sequence[Matrix], options: list[tuple[float, list[_Option]]], dense: float, min_speedup: float
            ) -> list[tuple[float, list[_Option]]]:  # fmt: skip
    """Each layer's dense time made robust (at most the median cost per entry and row of all layers times its
    own entries and rows: a disturbed measurement only runs long), all of them scaled to at most the model's time,
    and each option's saving where the sparse form beats the dense one by ``min_speedup``."""
    work = [m.weight.numel() * sum(m.rows or [1]) for m in found]
    per_unit = statistics.median(d / w for (d, _), w in zip(options, work))
    layer_dense = [min(d, per_unit * w) for (d, _), w in zip(options, work)]
    scale = min(1.0, dense / max(sum(layer_dense), 1e-30))  # layers timed alone add up to at most the model
    settled = []
    for d, (_, opts) in zip(layer_dense, options):
        d *= scale
        paying = [(o, None if o.sparse_seconds is None else o.sparse_seconds * scale) for o in opts]
        opts = [dataclasses.replace(o, saved=d - t, sparse_seconds=t) if t is not None and d >= min_speedup * t
                else dataclasses.replace(o, saved=0.0, sparse_seconds=None) for o, t in paying]  # fmt: skip
        settled.append((d, opts))
    return settled


def _allocate(options: Sequence[Sequence[_Option]], need: float) -> list[int]:
    """Per layer, the index of its option: greedy by seconds saved per importance removed until ``need`` seconds
    are saved, then each layer lowered again (the most importance first) where the saving still holds."""
    level = [0] * len(options)

    def saved() -> float:
        return sum(opts[i].saved for opts, i in zip(options, level))

    while saved() < need:
        best: tuple[float, int, int] | None = None
        for layer, opts in enumerate(options):
            now = opts[level[layer]]
            for j in range(level[layer] + 1, len(opts)):
                gain, cost = opts[j].saved - now.saved, opts[j].removed - now.removed
                if gain > 0 and (best is None or gain / max(cost, 1e-12) > best[0]):
                    best = (gain / max(cost, 1e-12), layer, j)
        if best is None:
            break
        level[best[1]] = best[2]
    if saved() >= need:
        for layer in sorted(range(len(options)), key=lambda i: -options[i][level[i]].removed):
            for j in range(level[layer]):
                previous, level[layer] = level[layer], j
                if saved() >= need:
                    break
                level[layer] = previous
    return level


def _check_sparsities(sparsities: Sequence[float]) -> tuple[float, ...]:
    if isinstance(sparsities, (str, bytes)) or not sparsities:
        raise ValueError(f"`sparsities` must be a non-empty list of fractions in (0, 1), got {sparsities!r}.")
    for s in sparsities:
        if not isinstance(s, (int, float)) or not 0 < s < 1:
            raise ValueError(f"`sparsities` entries must be in (0, 1), got {s!r}.")
    return tuple(sorted(set(float(s) for s in sparsities)))


def plan_speedup(
    model: nn.Module,
    example_inputs: object,
    speedup: float,
    *,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    importance: Importance | None = None,
    min_speedup: float = 1.1,
    forms: Sequence[Form] = ("csr",),
    repeats: int = 7,
    timer: Timer | None = None,
    parameters: Sequence[ParameterSpec] | None = None,
    exclude: Sequence[str] = (),
    confirm: int = 3,
) -> SpeedPlan:
    """Per-layer sparsity targets expected to make ``model`` ``speedup`` times faster on ``example_inputs`` here,
    removing the least importance (module docstring). ``model`` is not changed.

    Args:
        model: the dense (or partly pruned) model, before training to the plan.
        example_inputs: one forward pass's inputs, shaped as in serving (as :func:`to_sparse_inference` takes).
        speedup: the end-to-end speed-up asked for, above 1.
        sparsities: the ladder of sparsities measured per layer; the targets are among them (or 0).
        importance: ``importance(parameter name, weight as an (out, in) matrix)`` returns scores of the same shape
            (the least are pruned first); default: magnitudes.
        min_speedup: a layer saves time only where its sparse form beats the dense one by this much (as the
            conversion decides).
        forms: the sparse forms to consider (the one storing the fewest values is timed).
        repeats: the most timed runs per measurement.
        timer: measures instead of :class:`~lightning_prune.inference.WallClock` (for tests and cost models).
        parameters: the tensors the plan may prune, as the callback's ``parameters`` (default: every matrix
            weight but embeddings, tied heads and routers); of these, the layers the conversion can make sparse.
        exclude: names or glob patterns left dense, as the callback's ``exclude``.
        confirm: the most end-to-end checks: a copy of the model is pruned to the plan and converted by
            :func:`~lightning_prune.to_sparse_inference` (with ``min_speedup`` at most 1: a plan short of the
            conversion's default 1.1x measures what it gains, not the dense model), whose measured speed-up is
            the plan's ``measured_speedup``; where it falls short of ``speedup``, the plan is allocated again for the
            saving divided by the share of the expected saving that was realised (layers timed alone run warmer
            in the cache than inside the model), or for twice the saving last asked where none was realised, and
            checked again. ``0``: the layers' timings alone.

    Returns:
        The :class:`SpeedPlan` (``plan.reached`` says whether the ladder reaches the speed-up).

    Raises:
        ValueError: for a bad argument, or a model with no eligible layer run by the example.
    """
    speedup = check_number("speedup", speedup, low=1.0)
    sparsities = _check_sparsities(sparsities)
    min_speedup = check_number("min_speedup", min_speedup, low=0.0)
    timer = timer or WallClock(repeats)
    chosen = {name for t in select_parameters(model, parameters, exclude=exclude) for name in (t.name, *t.aliases)}
    root = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        layers = eligible(root)
        calls = capture(root, layers, example_inputs)
        found = [m for mod, (name, kind) in layers.items() for m in matrices(name, mod, kind, calls[mod]) if m.runs]
        found = [m for m in found if m.param in chosen]
        if not found:
            raise ValueError(
                "`model` has no eligible layer (see lightning_prune.inference) among the chosen tensors that the "
                "example runs."
            )
        dense = next(iter(timer({Timing("", "dense"): lambda: call(root, example_inputs)}).values()))
        options, scores = [], []
        for m in found:
            scores.append(m.weight.detach().abs() if importance is None else importance(m.param, m.weight.detach()))
            options.append(_options(m, sparsities, scores[-1], forms, timer))
        options = _settle(found, options, dense, min_speedup)
        need = asked = dense * (1 - 1 / speedup)
        level, rounds = _allocate([opts for _, opts in options], need), 1
        plan = _plan(speedup, dense, found, options, level)
        at_most_one = min(min_speedup, 1.0)  # a plan short of the conversion's 1.1x measures its gain, not dense
        convert = functools.partial(to_sparse_inference, min_speedup=at_most_one, forms=forms, timer=timer)
        for check in range(check_int("confirm", confirm, minimum=0)):
            plan = dataclasses.replace(
                plan, measured_speedup=_measure(root, found, plan, scores, example_inputs, convert)
            )
            realised = _realised(plan)
            if realised is None or check == confirm - 1:
                break
            asked = need / realised if realised > 0 else 2 * asked  # nothing realised: ask the layers for twice
            again = _allocate([opts for _, opts in options], asked)
            if again == level:
                break
            level, rounds = again, rounds + 1
            plan = _plan(speedup, dense, found, options, level, rounds)
    return plan


def _plan(speedup: float, dense: float, found: Sequence[Matrix], options: Sequence[tuple[float, list[_Option]]],
          level: Sequence[int], rounds: int = 1) -> SpeedPlan:  # fmt: skip
    planned = []
    for m, (layer_dense, opts), i in zip(found, options, level):
        o, shape = opts[i], (m.weight.shape[0], m.weight.shape[1])
        planned.append(PlannedLayer(m.name, m.param, shape, o.sparsity, layer_dense, o.sparse_seconds, o.fraction))
    return SpeedPlan(speedup, dense, tuple(planned), torch.get_num_threads(), rounds=rounds)


def _measure(root: nn.Module, found: Sequence[Matrix], plan: SpeedPlan, scores: Sequence[Tensor],
             example_inputs: object, convert: Callable[[nn.Module, object], nn.Module]) -> float:  # fmt: skip
    """The end-to-end speed-up of ``root`` pruned to ``plan`` and converted; ``root``'s weights are restored."""
    kept = [m.weight.detach().clone() for m in found]
    try:
        for m, layer, score in zip(found, plan.layers, scores):
            if layer.sparsity:
                m.weight.copy_(_pruned(m.weight, score, layer.sparsity))  # a view of root's parameter
        return inference_report(convert(root, example_inputs)).speedup
    finally:
        for m, weight in zip(found, kept):
            m.weight.copy_(weight)


def _realised(plan: SpeedPlan) -> float | None:
    """The share of the expected saving that the measurement realised (``0.0`` where none was: the conversion
    kept the model dense, say), or ``None`` where there is nothing to allocate again for (reached, or not
    measurable)."""
    measured, expected = plan.measured_speedup, plan.expected_speedup
    if measured is None or not math.isfinite(measured) or plan.reached or not 1 < expected < math.inf:
        return None
    return max((1 - 1 / measured) / (1 - 1 / expected), 0.0) if measured > 0 else 0.0
