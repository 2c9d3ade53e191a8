"""The second phase of :func:`~lightning_prune.to_sparse_inference`: for each weight matrix, which sparse form, and
for which row counts.

1. The forms that can hold the matrix (BSR only where its blocks store at most twice the nonzeros) are built and
   run on the captured calls; a form that fails or gives other results is dropped, with the reason.
2. A cheap cost model drops, untimed, the forms that cannot beat the dense layer (a stored value of CSR costs
   about three dense entries: the value, its column index and the gathered input; a block of BSR little more than
   its values) and those predicted at more than twice the best form's cost.
3. The dense layer and the remaining forms are timed at the row counts the examples give the layer (random
   inputs of as many vectors; above :data:`ROWS_CAP` rows, at the cap and scaled). The form chosen is the one
   whose calls take least, each on the faster of it and the dense copy (without a dense copy: itself); it
   replaces the layer where, at one of those row counts at least, the dense time is ``min_speedup`` times its own.
4. From that row count, the chosen form is timed against the dense layer up and down a ladder of row counts
   (:data:`LADDER`, and the examples' own), until it stops paying each way: it serves the rows between, the
   dense copy the others (so examples of several shapes each get the faster path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from lightning_prune.inference.capture import Matrix
from lightning_prune.inference.layers import BLOCKS, Form, SparseLinear, SparsePointwiseConv2d
from lightning_prune.inference.report import LayerChoice
from lightning_prune.inference.timing import Timer, Timing

__all__ = ["LADDER", "ROWS_CAP", "Trial", "decide", "fitting_forms", "prepare", "same", "time_modules", "total_seconds"]

LADDER = (1, 8, 64, 512, 2048)  # row counts at which a chosen form is checked against the dense layer
ROWS_CAP = LADDER[-1]  # larger row counts are timed at the cap (both kernels' time grows in proportion beyond it)
_MAX_BLOCK_FILL = 2.0  # BSR is tried where its blocks store at most this many values per nonzero
_CSR_COST = 3.0  # dense entries' worth of work per stored value (value, index, gathered input)


@dataclass
class Trial:
    """A matrix with the sparse modules that ran and gave the dense layer's results; after :func:`decide`, the
    choice and the module chosen (``None``: dense)."""

    matrix: Matrix
    choice: LayerChoice
    candidates: dict[str, SparseLinear | SparsePointwiseConv2d]
    module: nn.Module | None = None


def _tensors(output: object) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    return []


def same(sparse: object, dense: object) -> bool:
    """Equal within float summation tolerance (relative to the largest output entry)."""
    pairs = list(zip(_tensors(sparse), _tensors(dense)))
    return bool(pairs) and all(
        s.shape == d.shape
        and torch.allclose(s.float(), d.float(), rtol=1e-3, atol=1e-4 * float(d.abs().nan_to_num().max()) + 1e-6)
        for s, d in pairs
    )


def _stored(weight: Tensor, form: str) -> int | None:
    """Values ``form`` stores for ``weight`` (whole blocks for BSR), or ``None`` where the blocks do not fit."""
    nonzero = weight != 0
    b, (rows, cols) = BLOCKS[form], weight.shape
    if b is None:
        return int(nonzero.sum())
    if rows % b or cols % b:
        return None
    return int(nonzero.view(rows // b, b, cols // b, b).any(dim=3).any(dim=1).sum()) * b * b


def fitting_forms(matrix: Matrix, forms: Sequence[Form]) -> dict[Form, int]:
    """``{form: stored values}`` of ``forms`` that fit the matrix: BSR blocks dividing it, holding few zeros."""
    w, out = matrix.weight.detach(), {}
    nnz = max(int((w != 0).sum()), 1)
    for form in forms:
        b, stored = BLOCKS[form], _stored(w, form)
        if stored is None or (b is not None and (matrix.row_block or w.shape[0]) % b):
            continue
        if b is not None and stored > _MAX_BLOCK_FILL * nnz:
            continue
        out[form] = stored
    return out


def _value_cost(form: Form) -> float:
    """Dense entries' worth of work per value that ``form`` stores."""
    block = BLOCKS[form]
    return _CSR_COST if block is None else 1 + 2 / block


def _screen(stored: dict[Form, int], numel: int) -> list[Form]:
    """The forms the cost model keeps: predicted cheaper than dense, and within twice the best prediction."""
    cost = {f: n * _value_cost(f) for f, n in stored.items()}
    best = min(cost.values(), default=0.0)
    return [f for f, c in cost.items() if c < numel and c <= 2 * best]


def prepare(matrix: Matrix, forms: Sequence[Form], min_sparsity: float, screen: bool) -> Trial:
    """The matrix's sparsity and the sparse forms that may replace it (built, and checked on the captured calls);
    ``screen``: drop the forms that the cost model says cannot pay."""
    w = matrix.weight.detach()
    sparsity = float((w == 0).sum()) / max(w.numel(), 1)
    rows = tuple(matrix.rows)
    trial = Trial(
        matrix, LayerChoice(matrix.name, matrix.kind, (w.shape[0], w.shape[1]), sparsity, "dense", rows=rows), {}
    )
    if sparsity < min_sparsity or sparsity == 0:
        return _dense(trial, f"sparsity below min_sparsity {min_sparsity:g}")
    if not matrix.runs:
        return _dense(trial, "not run by example_inputs")
    stored = fitting_forms(matrix, forms)
    kept = _screen(stored, w.numel()) if screen else list(stored)
    if stored and not kept:
        return _dense(trial, "no sparse form can pay: too few zeros for the cost model")
    reference = [run(matrix.dense) for run in matrix.runs]
    failures = []
    for form in kept:
        try:
            module = matrix.build(w, matrix.bias, form).eval()
            if not all(same(run(module), ref) for run, ref in zip(matrix.runs, reference)):
                failures.append(f"{form}: results differ from the dense layer's")
                continue
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
            failures.append(f"{form}: {str(err).splitlines()[0][:90]}")
            continue
        trial.candidates[form] = module
    if not trial.candidates:
        return _dense(trial, "no sparse form ran: " + ("; ".join(failures) or "none fits"))
    return trial


def _dense(trial: Trial, note: str) -> Trial:
    trial.choice = trial.choice.with_(note=note)
    return trial


def time_modules(matrix: Matrix, modules: Mapping[str, nn.Module], rows: int, timer: Timer) -> dict[str, float]:
    """Seconds of each of ``modules`` (by label) on a random input of ``rows`` vectors (at most the cap)."""
    x, rows = matrix.probe(min(rows, ROWS_CAP)), min(rows, ROWS_CAP)
    runs: dict[Timing, Callable[[], object]] = {}
    labels: dict[Timing, str] = {}
    for label, module in modules.items():
        stored = getattr(module, "nnz", matrix.weight.numel())
        form = getattr(module, "form", "dense")
        key = Timing(matrix.name, form, rows, int(stored))
        runs[key], labels[key] = partial(module, x), label
    return {labels[key]: seconds for key, seconds in timer(runs).items()}


def _time_at(trial: Trial, forms: Sequence[str], rows: int, timer: Timer) -> dict[str, float]:
    """Seconds of the dense layer and of ``forms`` on an input of ``rows`` vectors (at most the cap)."""
    modules = {"dense": trial.matrix.dense, **{f: trial.candidates[f] for f in forms}}
    return time_modules(trial.matrix, modules, rows, timer)


def total_seconds(
    times: Mapping[int, Mapping[str, float]],
    label: str,
    rows: Sequence[int],
    serves: Callable[[int], bool] | None = None,
) -> float:
    """``label``'s seconds summed over the captured calls' ``rows`` (beyond the cap: the cap's time, scaled); with
    ``serves``, the row counts it refuses at the dense time."""

    def at(r: int) -> float:
        return times[min(r, ROWS_CAP)][label if serves is None or serves(r) else "dense"] * max(r / ROWS_CAP, 1.0)

    return sum(at(r) for r in rows)


def _faster(times: Mapping[int, Mapping[str, float]], form: str) -> Callable[[int], bool]:
    return lambda r: times[min(r, ROWS_CAP)][form] <= times[min(r, ROWS_CAP)]["dense"]


def _within(low: int, high: int | None) -> Callable[[int], bool]:
    return lambda r: low <= r and (high is None or r <= high)


def decide(trial: Trial, min_speedup: float, timer: Timer, dense_copy: bool = True) -> None:
    """Choose the form and the row counts it serves (module docstring); sets ``trial.choice`` and
    ``trial.module``. ``min_speedup=0`` or ``dense_copy=False``: the form serves every row count (no ladder), and
    pays or not by its total over the calls."""
    if not trial.candidates:
        return
    rows = trial.matrix.rows or [1]
    times = {r: _time_at(trial, list(trial.candidates), r, timer) for r in sorted({min(r, ROWS_CAP) for r in rows})}
    dense = total_seconds(times, "dense", rows)
    ranged = min_speedup > 0 and dense_copy

    def cost(f: str) -> tuple[float, float]:  # with a dense copy, each row count on the faster path; then alone
        alone = total_seconds(times, f, rows)
        return (total_seconds(times, f, rows, _faster(times, f)) if ranged else alone), alone

    costs = {f: cost(f) for f in trial.candidates}
    form = min(costs, key=costs.__getitem__)
    alone = costs[form][1]

    def pays(r: int) -> float:
        return times[r]["dense"] / max(times[r][form], 1e-12)

    best = max(times, key=pays)  # the row count where the form pays most
    ratio = pays(best) if ranged else dense / max(alone, 1e-12)
    choice = trial.choice.with_(dense_seconds=dense, sparse_seconds=alone, fastest_sparse=form)
    if ratio < min_speedup:
        trial.choice = choice.with_(note=f"{ratio:.2f}x < min_speedup {min_speedup:g}")
        return
    ladder = {r: (t["dense"], t[form]) for r, t in times.items()}
    low, high = _serving_range(trial, form, ladder, best, timer) if ranged else (0, None)
    module = trial.candidates[form]
    module.serve_rows(low, high)
    trial.module = module
    ladder_rows = tuple((r, d, s) for r, (d, s) in sorted(ladder.items()))
    served = total_seconds(times, form, rows, _within(low, high))
    trial.choice = choice.with_(form=form, sparse_seconds=served, min_rows=low, max_rows=high, ladder=ladder_rows)


def _serving_range(
    trial: Trial, form: str, ladder: dict[int, tuple[float, float]], start: int, timer: Timer
) -> tuple[int, int | None]:
    """``(min_rows, max_rows)``: the ladder and the examples' row counts walked up and down from ``start``, each
    way until the sparse form is slower than the dense layer (``ladder`` gains the timings)."""
    points = sorted(set(LADDER) | set(ladder))
    bounds: list[int | None] = []
    for walk in ([r for r in points if r > start], [r for r in reversed(points) if r < start]):
        bound, last = None, start
        for r in walk:
            if r not in ladder:
                seconds = _time_at(trial, [form], r, timer)
                ladder[r] = (seconds["dense"], seconds[form])
            if ladder[r][0] < ladder[r][1]:
                bound = last
                break
            last = r
        bounds.append(bound)
    return bounds[1] or 0, bounds[0]
