"""How :func:`~lightning_prune.to_sparse_inference` and :func:`~lightning_prune.inference.plan_speedup` measure:
a :class:`Timer` takes named runs (:class:`Timing`: which layer, which form, how many input rows) and returns a time
for each. The default, :class:`WallClock`, runs them interleaved under a budget; a test or a cost model passes its
own timer (any callable with the same signature), so that no decision depends on the machine's speed.

Example::

    >>> clock = WallClock(repeats=3)
    >>> times = clock({Timing("fc", "dense", rows=1): lambda: sum(range(1000)), Timing("fc", "csr", rows=1): list})
    >>> sorted(t.form for t in times), all(s > 0 for s in times.values())
    (['csr', 'dense'], True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Timer", "Timing", "WallClock"]


@dataclass(frozen=True)
class Timing:
    """What one timed run computes.

    Attributes:
        layer: the matrix's name (as in :class:`~lightning_prune.inference.LayerChoice`); ``""`` for the whole
            model on ``example_inputs``.
        form: ``"dense"`` or a sparse form (``"csr"``, ``"bsr8"``, ...) for a layer; ``"dense"`` or ``"sparse"``
            for the whole model.
        rows: the input vectors given to the layer (``0`` for the whole model).
        nonzeros: the values the layer stores (its ``numel`` when dense); ``0`` for the whole model.
        sparse: for the whole model, the matrices in a sparse form during the run.
        example: for the whole model, which inputs: ``0`` for ``example_inputs``, ``i`` for ``other_inputs[i - 1]``.
    """

    layer: str
    form: str
    rows: int = 0
    nonzeros: int = 0
    sparse: tuple[str, ...] = ()
    example: int = 0


class Timer(Protocol):
    """Anything called with ``{Timing: run}`` that returns ``{Timing: seconds}`` for the same keys (it may run
    each ``run()`` as often as it likes, or never)."""

    def __call__(self, runs: Mapping[Timing, Callable[[], object]]) -> dict[Timing, float]: ...


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class WallClock:
    """Wall time of runs interleaved round by round (the order reversed every other round), under a budget.

    A first round warms up (it counts when a run takes longer than ``long_s``: a long run is little changed by
    warming up); then up to ``repeats`` rounds, but a run that is ``drop`` times slower than the fastest is not
    run again (a clearly slower form stops early), and the rounds end once two are done and ``budget_s`` is
    spent (or one round, when even the fastest run takes ``long_s``). A time is the fastest run (the least
    disturbed by other processes: on a busy machine a median mostly measures the other processes), the whole
    model's as a layer's, so that layers' gains and the model's time compare.

    Args:
        repeats: the most timed rounds.
        budget_s: seconds after which, two rounds done, no further round starts.
        drop: a run this many times slower than the fastest is dropped.
        long_s: a warm-up run at least this long counts as a timed one.
        model_s: ``budget_s`` and ``long_s`` when every run is the whole model (``Timing.layer == ""``).
    """

    def __init__(
        self, repeats: int = 7, budget_s: float = 0.05, drop: float = 2.0, long_s: float = 0.02, model_s: float = 1.0
    ) -> None:
        if repeats < 1:
            raise ValueError(f"`repeats` must be an integer >= 1, got {repeats}.")
        self.repeats, self.budget_s, self.drop, self.long_s, self.model_s = repeats, budget_s, drop, long_s, model_s

    def __call__(self, runs: Mapping[Timing, Callable[[], object]]) -> dict[Timing, float]:
        samples: dict[Timing, list[float]] = {key: [] for key in runs}
        live, start, rounds = list(runs), time.perf_counter(), 0
        whole = all(key.layer == "" for key in runs)  # the whole model: a larger budget (it varies most)
        budget, long_s = (self.model_s, self.model_s) if whole else (self.budget_s, self.long_s)
        warm = True
        while live and rounds < self.repeats:
            for key in live if rounds % 2 == 0 else live[::-1]:
                _sync()
                began = time.perf_counter()
                runs[key]()
                _sync()
                seconds = time.perf_counter() - began
                if not warm or seconds >= long_s:
                    samples[key].append(seconds)
            if warm and not all(samples[key] for key in live):
                warm = False
                continue
            warm, rounds = False, rounds + 1
            best = min(min(samples[key]) for key in live)
            live = [key for key in live if min(samples[key]) <= self.drop * best]
            spent = time.perf_counter() - start >= budget
            if len(live) < 2 <= len(runs) or (spent and (rounds >= 2 or best >= long_s)):
                break
        return {k: min(v) for k, v in samples.items()}
