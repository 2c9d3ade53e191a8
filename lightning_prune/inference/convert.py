"""The conversion, :func:`to_sparse_inference`, in three phases: capture (:mod:`.capture`: the eligible layers and
their inputs on the examples), decide (:mod:`.decide`: per weight matrix, a sparse form and the row counts it
serves, measured), install (here: the chosen modules put in place, the whole model checked against the dense one
end to end on each example, and layers backed off, the least gain first, until it pays or every layer is dense)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_prune._utils.checks import allowed, check_choice, check_fraction, check_int, check_number
from lightning_prune.inference.capture import call, capture, eligible, expert_rows, matrices
from lightning_prune.inference.decide import Trial, decide, prepare
from lightning_prune.inference.layers import Form, SparseMultiheadAttention
from lightning_prune.inference.report import REPORT_ATTRIBUTE, LayerChoice, SparseInferenceReport
from lightning_prune.inference.timing import Timer, Timing, WallClock

__all__ = ["DEFAULT_FORMS", "NOT_SLOWER", "to_sparse_inference"]

DEFAULT_FORMS: tuple[Form, ...] = ("csr", "bsr4", "bsr8", "bsr16")
MAX_BACK_OFF_STEPS = 4  # timed back-off steps (1, 2, 4, 8 layers); after them, every layer is dense
NOT_SLOWER = 0.97  # on other_inputs, the least fraction of the dense speed kept (the timing's spread, the dispatch)


@dataclass
class _Unit:
    """One layer of the model that may be replaced: its matrices' trials and the module put in its place."""

    module: nn.Module
    trials: list[Trial]
    converted: nn.Module | None = None

    @property
    def gain(self) -> float:
        """Seconds saved on the example by its sparse matrices, as measured layer by layer."""
        chosen = [t.choice for t in self.trials if t.module is not None]
        return sum((c.dense_seconds or 0.0) - (c.sparse_seconds or 0.0) for c in chosen)

    @property
    def names(self) -> list[str]:
        return [t.matrix.name for t in self.trials if t.module is not None]


def _build(kind: str, unit: _Unit) -> nn.Module | None:
    """The module that replaces the layer (an attention layer with its sparse and dense projections)."""
    if all(t.module is None for t in unit.trials):
        return None
    if kind != "MultiheadAttention":
        return unit.trials[0].module
    parts = {t.matrix.name.rpartition(".")[2]: t.module or t.matrix.dense for t in unit.trials}
    attention = cast(nn.MultiheadAttention, unit.module)  # the kind says so
    return SparseMultiheadAttention(attention, parts).eval()


class _Swap:
    """Puts the dense or the converted modules in place in the copy, and turns off the fused paths of
    ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` (which read dense weights) around converted ones."""

    def __init__(self, root: nn.Module, units: Sequence[_Unit]) -> None:
        names: dict[nn.Module, list[str]] = {u.module: [] for u in units}
        for name, module in root.named_modules(remove_duplicate=False):
            if module in names:
                names[module].append(name)
        self.root = root
        self.places: list[tuple[nn.Module, str, _Unit]] = []  # (parent, child name, unit)
        self.flags: list[tuple[nn.Module, str, object, object, list[_Unit]]] = []  # attribute, dense/sparse value
        for u in units:
            for name in names[u.module]:
                parent, _, child = name.rpartition(".")
                if name:
                    self.places.append((root.get_submodule(parent), child, u))
        for name, module in root.named_modules():
            inside = [u for u in units for p in names[u.module] if not name or p.startswith(f"{name}.")]
            if inside and isinstance(module, nn.TransformerEncoderLayer):
                self.flags.append((module, "activation_relu_or_gelu", module.activation_relu_or_gelu, 0, inside))
            elif inside and isinstance(module, nn.TransformerEncoder):
                value = getattr(module, "use_nested_tensor", False)
                self.flags.append((module, "use_nested_tensor", value, False, inside))

    def install(self, active: Sequence[_Unit]) -> nn.Module:
        """Put ``active`` units in their converted form, the others dense; the module to call."""
        for parent, child, unit in self.places:
            setattr(parent, child, unit.converted if unit in active else unit.module)
        for module, attribute, dense_value, sparse_value, inside in self.flags:
            setattr(module, attribute, sparse_value if any(u in active for u in inside) else dense_value)
        top = next((u.converted for u in active if u.module is self.root), None)  # the model is itself one layer
        return self.root if top is None else top


def _timings(swap: _Swap, units: list[_Unit], examples: Sequence[Any], timer: Timer, dense: bool) -> list[dict]:
    """End-to-end seconds on each example of the model with ``units`` converted (``"sparse"``) and, with ``dense``,
    without, interleaved; the examples timed apart (a timer drops runs far slower than the fastest)."""
    names = tuple(n for u in units for n in u.names)

    def run(active: list[_Unit], x: Any) -> Callable[[], object]:
        return lambda: call(swap.install(active), x)

    out = []
    for i, example in enumerate(examples):
        runs = {Timing("", "sparse", sparse=names, example=i): run(units, example)} if units else {}
        if dense:
            runs[Timing("", "dense", example=i)] = run([], example)
        out.append({key.form: seconds for key, seconds in timer(runs).items()})
    return out


@dataclass
class _Outcome:
    """The end-to-end check: the units kept sparse, those backed off, and the latencies of the model returned on
    each example (``example_inputs`` first)."""

    active: list[_Unit]
    backed_off: list[_Unit]
    dense_seconds: list[float]
    sparse_seconds: list[float]
    note: str = ""


def _speeds(dense: Sequence[float], sparse: Sequence[float]) -> str:
    names = ["example_inputs", *(f"other_inputs[{i}]" for i in range(len(dense) - 1))]
    return ", ".join(f"{d / s:.2f}x on {n}" for n, d, s in zip(names, dense, sparse))


def _confirm(swap: _Swap, units: list[_Unit], examples: Sequence[Any], min_speedup: float, timer: Timer) -> _Outcome:
    """Time the dense model on each example and, unless twice the layers' measured gains could not make it
    ``min_speedup`` times faster on the first, the converted one; while that is slower than ``min_speedup`` times
    the dense one on the first example, or than :data:`NOT_SLOWER` times on another, make layers dense again, the
    least gain first (1, then 2, 4, 8 at a time), each step timed again, and after :data:`MAX_BACK_OFF_STEPS` steps
    all of them; with none left, the model is dense."""
    active = sorted(units, key=lambda u: u.gain)
    dense = [t["dense"] for t in _timings(swap, [], examples, timer, dense=True)]
    gain = sum(u.gain for u in units)
    if units and min_speedup > 0 and dense[0] < min_speedup * (dense[0] - min(2 * gain, dense[0])):
        note = (
            f"every layer dense: the layers' measured gains ({gain * 1e3:.3f} ms) cannot make the model "
            f"(dense {dense[0] * 1e3:.3f} ms) min_speedup {min_speedup:g} times faster end to end"
        )
        return _Outcome([], active, dense, dense, note)

    def short(sparse: list[float]) -> bool:
        slower = any(d < NOT_SLOWER * s for d, s in zip(dense[1:], sparse[1:]))
        return min_speedup > 0 and (dense[0] < min_speedup * sparse[0] or slower)

    sparse = [t["sparse"] for t in _timings(swap, active, examples, timer, dense=False)] if active else dense
    first, backed, step = sparse, [], 1
    while active and short(sparse):
        step = step if step < 2**MAX_BACK_OFF_STEPS else len(active)
        backed += active[:step]
        active, step = active[step:], 2 * step
        if active:
            sparse = [t["sparse"] for t in _timings(swap, active, examples, timer, dense=False)]
    if units and not active:
        note = (
            f"every layer dense: the converted model was {_speeds(dense, first)} end to end, below min_speedup "
            f"{min_speedup:g}{f' or {NOT_SLOWER:g}x' if len(examples) > 1 else ''}, and still below with the "
            "layers of least gain backed off"
        )
        return _Outcome([], backed, dense, dense, note)
    return _Outcome(active, backed, dense, sparse)


def _fallback_bytes(units: Sequence[_Unit]) -> int:
    copies = [getattr(m, "fallback", None) for u in units if u.converted is not None for m in u.converted.modules()]
    return sum(t.numel() * t.element_size() for t in copies if isinstance(t, Tensor))


def _tensor_bytes(model: nn.Module) -> int:
    storages = {}
    for t in (*model.parameters(), *model.buffers()):
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), t.device)] = storage.nbytes()
    return sum(storages.values())


def _check_arguments(
    model: nn.Module, example_inputs: Any, other_inputs: Sequence[Any], forms: Sequence[Form]
) -> tuple[Form, ...]:
    if isinstance(forms, str) or not forms:
        raise ValueError(f"`forms` must be a non-empty list of {list(allowed(Form))}, got {forms!r}.")
    checked = tuple(check_choice("forms", f, allowed(Form)) for f in forms)
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    if example_inputs is None:
        raise ValueError("`example_inputs` is required: the inputs of one forward pass, shaped as in serving.")
    if not isinstance(other_inputs, (list, tuple)) or any(x is None for x in other_inputs):
        raise ValueError(
            "`other_inputs` must be a list of forward passes' inputs (each as `example_inputs` is given), "
            f"got {type(other_inputs).__name__}."
        )
    return checked


def _decide_units(
    root: nn.Module,
    examples: Sequence[Any],
    forms: Sequence[Form],
    min_sparsity: float,
    min_speedup: float,
    timer: Timer,
    dense_copy: bool,
) -> tuple[list[_Unit], list[LayerChoice]]:
    """Capture and decide: a unit per eligible layer, and the choices of every matrix in model order."""
    layers = eligible(root)
    calls = capture(root, layers, *examples)
    units = []
    for module, (name, kind) in layers.items():
        trials = [prepare(m, forms, min_sparsity, min_speedup > 0) for m in matrices(name, module, kind, calls[module])]
        for trial in trials:
            decide(trial, min_speedup, timer, dense_copy)
        units.append(_Unit(module, trials))
        units[-1].converted = _build(kind, units[-1])
    return units, [t.choice for u in units for t in u.trials]


def to_sparse_inference(
    model: nn.Module,
    example_inputs: Any,
    *,
    other_inputs: Sequence[Any] = (),
    min_speedup: float = 1.1,
    min_sparsity: float = 0.5,
    forms: Sequence[Form] = DEFAULT_FORMS,
    repeats: int = 7,
    timer: Timer | None = None,
    dense_copy: bool = True,
    verbose: bool = False,
) -> nn.Module:
    """A new module for inference in which each eligible layer is sparse where measured faster, and which is never
    slower than the dense model end to end on ``example_inputs``, nor on ``other_inputs`` (see
    :mod:`lightning_prune.inference`).

    ``model`` is left untouched: the result is a deep copy, in eval mode and with ``requires_grad=False``, in
    which the chosen layers are replaced by :class:`~lightning_prune.inference.SparseLinear`,
    ``SparsePointwiseConv2d`` or ``SparseMultiheadAttention``. Each sparse layer serves the row counts (input
    vectors: batch times tokens) at which its kernel was measured faster and multiplies others by a dense copy of
    its weight (kept only where such row counts exist), so a model converted at batch 1 serves batch 64 at no loss.
    Outputs equal the dense model's within float32 summation tolerance. Save the result with
    ``torch.save(converted, path)`` and load it with ``torch.load(path, weights_only=False)``.

    Args:
        model: the pruned model (any mode; a copy is put in eval mode, the argument is not).
        example_inputs: one forward pass's inputs, shaped as in serving (batch size, sequence length, a key-value
            cache): a tensor, a tuple of positional inputs or a dict of keyword inputs.
        other_inputs: more forward passes' inputs the model will serve, each given as ``example_inputs`` is
            (other batch sizes or sequence lengths): each layer's form and the row counts it serves are decided on
            every example's row counts, and the converted model is timed on each; it is kept where it is
            ``min_speedup`` times faster on ``example_inputs`` and at least :data:`NOT_SLOWER` (0.97) times the
            dense speed on each of these (else layers are backed off).
        min_speedup: a layer is made sparse where its fastest sparse form takes at most ``1 / min_speedup`` of
            the dense time at one of the examples' row counts, and the converted model is kept where it takes at
            most ``1 / min_speedup`` of the dense model's time end to end (else layers are backed off); ``0`` makes
            every layer sparse that passes ``min_sparsity`` and has a sparse kernel, for every row count, and
            backs nothing off (for tests).
        min_sparsity: layers with a smaller fraction of zeros are left dense without being timed (a layer with
            no zeros always is).
        forms: the sparse forms to try, among ``"csr"``, ``"bsr4"``, ``"bsr8"``, ``"bsr16"``, ``"bsr32"``.
        repeats: the most timed runs per measurement (fewer where the budget of :class:`WallClock` is spent or
            a form is clearly slower).
        timer: measures instead of :class:`~lightning_prune.inference.WallClock` (``{Timing: run} -> {Timing:
            seconds}``): a cost model, or fixed figures in tests.
        dense_copy: keep a dense copy of a sparse layer's weight for the row counts where its sparse form is
            slower (measured on a ladder of row counts); ``False``: the sparse form serves every row count, as in
            version 0.3 (smaller, and no ladder timed, but slower than dense at row counts far from the example's).
        verbose: print the :class:`SparseInferenceReport`.

    Returns:
        The converted module; :func:`~lightning_prune.inference_report` gives its report.

    Raises:
        ValueError: for a bad argument.
    """
    min_speedup = check_number("min_speedup", min_speedup, low=0.0)
    min_sparsity = check_fraction("min_sparsity", min_sparsity, closed=True)
    repeats = check_int("repeats", repeats, minimum=1)
    forms = _check_arguments(model, example_inputs, other_inputs, forms)
    examples = [example_inputs, *other_inputs]
    start, dense_bytes = time.perf_counter(), _tensor_bytes(model)
    root = copy.deepcopy(model).eval().requires_grad_(False)
    timer = timer or WallClock(repeats)
    with torch.no_grad():
        units, choices = _decide_units(root, examples, forms, min_sparsity, min_speedup, timer, dense_copy)
        chosen = [u for u in units if u.converted is not None]
        swap = _Swap(root, chosen)
        outcome = _confirm(swap, chosen, examples, min_speedup, timer)
        converted = swap.install(outcome.active)
    backed = {t.matrix.name for u in outcome.backed_off for t in u.trials if t.module is not None}
    why = f"backed off: the converted model was slower than min_speedup {min_speedup:g} end to end"
    if outcome.note.startswith("every layer dense: the layers' measured gains"):
        why = f"backed off: the layers' gains could not make the model min_speedup {min_speedup:g} times faster"
    choices = [c.with_(form="dense", note=why) if c.name in backed else c for c in choices]
    converted.requires_grad_(False)
    report = SparseInferenceReport(
        (*choices, *expert_rows(root)),
        outcome.dense_seconds[0],
        outcome.sparse_seconds[0],
        dense_bytes,
        _tensor_bytes(converted),
        torch.get_num_threads(),
        min_speedup,
        repeats,
        fallback_bytes=_fallback_bytes(outcome.active),
        seconds=time.perf_counter() - start,
        backed_off=tuple(sorted(backed)),
        note=outcome.note,
        other_inputs=tuple(zip(outcome.dense_seconds[1:], outcome.sparse_seconds[1:])),
    )
    setattr(converted, REPORT_ATTRIBUTE, report)
    if verbose:
        print(report)
    return converted
