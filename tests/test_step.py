"""The one pruning step (``prune_step``): exact counts against a sorting reference, the checks it makes before
any tensor changes, the method contract it enforces, and the callers that go through it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from helpers import expected_zeros, smallest_reference
from torch import nn

from lightning_prune import (
    Global,
    Local,
    MaskStore,
    NewMask,
    PruningError,
    PruningMethod,
    Trigger,
    prune_once,
    prune_step,
    select_parameters,
)
from lightning_prune.step import check_reachable


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("scope", ["local", "global"])
def test_prune_step_reaches_each_cumulative_target_exactly(scope: str) -> None:
    net = _net()
    targets, store = select_parameters(net), MaskStore()
    masks: list[torch.Tensor | None] = [None] * len(targets)
    for sparsity in (0.3, 0.55, 0.8):
        weights = [t.tensor.detach().abs().clone() for t in targets]
        if scope == "global":
            pruned = sum(0 if m is None else int((m == 0).sum()) for m in masks)
            k = expected_zeros(sparsity, sum(w.numel() for w in weights)) - pruned
            want = smallest_reference(weights, masks, k)
        else:
            want = [
                smallest_reference(
                    [w], [m], expected_zeros(sparsity, w.numel()) - (0 if m is None else int((m == 0).sum()))
                )[0]
                for w, m in zip(weights, masks)
            ]
        due = Global(sparsity) if scope == "global" else Local({t.name: sparsity for t in targets})
        report = prune_step("l1_unstructured", targets, due, store)
        masks = [store.mask(t).float() for t in targets]
        assert all(torch.equal(m, w) for m, w in zip(masks, want))
        assert all(bool((t.tensor[store.mask(t) == 0] == 0).all()) for t in targets)
        if scope == "global":
            assert report.zeros == expected_zeros(sparsity, report.numel)
        else:
            assert [r.zeros for r in report.tensors] == [expected_zeros(sparsity, r.numel) for r in report.tensors]
            assert [r.target for r in report.tensors] == [sparsity] * 3


def test_prune_step_takes_one_target_per_tensor() -> None:
    net = _net()
    targets = select_parameters(net)
    report = prune_step("l1_unstructured", targets, Local({"0.weight": 0.5, "4.weight": 0.25}), MaskStore())
    assert [r.zeros for r in report.tensors] == [60, 0, expected_zeros(0.25, 18)]
    assert [r.target for r in report.tensors] == [0.5, None, 0.25]


def test_prune_step_refuses_nan_weights_before_any_tensor_changes() -> None:
    net = _net()
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]
    store = MaskStore()
    with pytest.raises(PruningError, match=r"\['2\.weight'\] hold NaN"):
        prune_step("l1_unstructured", select_parameters(net), Global(0.5), store)
    assert len(store) == 0
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, net.parameters()))


def test_prune_step_calls_agree_after_deciding_and_before_applying() -> None:
    net = _net()
    seen: list[tuple[list[str], bool]] = []

    def agree(store: MaskStore, targets: list[Any]) -> None:
        seen.append(([t.name for t in targets], bool((net[0].weight != 0).all())))

    targets = select_parameters(net)
    prune_step("l1_unstructured", targets, Local({t.name: 0.5 for t in targets}), MaskStore(), agree=agree)
    assert seen == [(["0.weight", "2.weight", "4.weight"], True)]  # masks decided, weights not yet zeroed
    assert int((net[0].weight == 0).sum()) == 60


def test_prune_step_refuses_a_scope_the_method_does_not_work_in() -> None:
    with pytest.raises(ValueError, match=r"works in `scope='local'` only, got scope='global'"):
        prune_step("ln_structured", select_parameters(_net()), Global(0.5), MaskStore())


class FloatMasks(PruningMethod):
    """Breaks the contract: float masks."""

    name = "float_masks"
    scopes = ("local",)

    def local_masks(
        self, targets: Sequence[Any], sparsities: Sequence[float | None], seed: int, masks: Any
    ) -> Iterator[NewMask]:
        for t in targets:
            yield NewMask(t, torch.ones_like(t.tensor))


def test_method_masks_must_be_uint8_or_bool() -> None:
    with pytest.raises(TypeError, match="must be uint8 or bool"):
        prune_step(FloatMasks(), select_parameters(_net()), Local({"0.weight": 0.5}), MaskStore())


def test_check_reachable_refuses_a_target_that_empties_a_tensor() -> None:
    from lightning_prune.methods import resolve_method

    targets = select_parameters(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 40)))
    with pytest.raises(PruningError, match=r"every entry of \['0\.weight'\].*0\.9 of 4 entries"):
        check_reachable(resolve_method("l1_unstructured"), targets, Local({"0.weight": 0.9, "1.weight": 0.9}))
    check_reachable(resolve_method("l1_unstructured"), targets, Global(0.9))  # 76 of 84 together: fine
    check_reachable(resolve_method("l1_unstructured"), targets, Trigger())  # no sparsity: nothing to check
    with pytest.raises(PruningError, match="global target of 1.0 would prune all 84"):
        check_reachable(resolve_method("l1_unstructured"), targets, Global(1.0))
    prune_step("l1_unstructured", targets, Local({"0.weight": 0.9}), MaskStore())  # the step itself may (a sweep)
    assert int((targets[0].tensor == 0).sum()) == 4


def test_prune_once_is_one_step_on_a_fresh_store() -> None:
    net, reference = _net(), _net()
    masks = prune_once(net, 0.6, scope="global", parameters=["0.weight", "4.weight"])
    store = MaskStore()
    prune_step("l1_unstructured", select_parameters(reference, ["0.weight", "4.weight"]), Global(0.6), store)
    assert sorted(masks) == ["0.weight", "4.weight"]
    assert all(torch.equal(masks[t.name], m) for t, m in store.items())
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), reference.parameters()))


def test_a_trigger_prunes_a_method_that_takes_no_sparsity() -> None:
    from lightning_prune import NMPruning

    net = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    report = prune_step(NMPruning(2, 4), select_parameters(net), Trigger(), MaskStore())
    assert report.zeros == (32 + 16) // 2 and all(r.target is None for r in report.tensors)


def test_due_for_builds_the_type_the_scope_and_method_need() -> None:
    from lightning_prune import NMPruning
    from lightning_prune.methods import resolve_method
    from lightning_prune.step import due_for

    targets = select_parameters(_net())
    assert due_for(resolve_method("l1_unstructured"), targets, 0.3, "global") == Global(0.3)
    assert due_for(resolve_method("l1_unstructured"), targets, 0.3, "local") == Local({t.name: 0.3 for t in targets})
    assert due_for(NMPruning(), targets, None, "local") == Trigger()
    with pytest.raises(ValueError, match="works in `scope='local'` only"):
        due_for(resolve_method("ln_structured"), targets, 0.3, "global")
