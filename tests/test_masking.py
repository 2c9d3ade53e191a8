"""Mask bookkeeping: counting zeros, the remembered counts, and the mask store (narrowing, applying, optimizer
hooks, bit-packed state) beside plain parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from helpers import expected_zeros, unpack_mask
from torch import nn

from lightning_prune import MaskStore
from lightning_prune.counting import count_for, count_zeros, mask_zeros
from lightning_prune.reparam import install, remove, take_over
from lightning_prune.selection import select_parameters


def test_count_zeros_counts_both_signed_zeros_in_every_dtype() -> None:
    values = [0.0, -0.0, 1.5, -2.0, 0.0]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert count_zeros(torch.tensor(values, dtype=dtype)) == 3, dtype
    assert count_zeros(torch.tensor(values)[::2]) == 2  # a non-contiguous view: 0.0, 1.5, 0.0
    assert count_zeros(torch.tensor([0, 3, 0], dtype=torch.uint8)) == 2


def test_mask_zeros_is_remembered_until_the_mask_changes_in_place() -> None:
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert mask_zeros(mask) == 2 and mask_zeros(None) == 0
    mask[0] = 0.0  # any in-place change bumps the version counter: counted again
    assert mask_zeros(mask) == 3
    mask.mul_(torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]))
    assert mask_zeros(mask) == 4
    assert mask_zeros(torch.tensor([1, 0, 0], dtype=torch.uint8)) == 2
    with torch.inference_mode():  # inference tensors have no version counter: counted every time
        frozen = torch.tensor([0.0, 1.0])
    assert mask_zeros(frozen) == 1


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.6, 0.875, 0.95, 0.999])
def test_count_for_matches_exact_rounding_half_up(sparsity: float) -> None:
    for n in (1, 2, 3, 6, 7, 36, 288, 768, 1524, 10_007):
        assert count_for(sparsity, n) == expected_zeros(sparsity, n), n


def _linear_store(seed: int = 0) -> tuple[nn.Linear, MaskStore, object]:
    torch.manual_seed(seed)
    net = nn.Linear(8, 4)
    (target,) = select_parameters(net)
    return net, MaskStore(), target


def test_mask_store_pruned_count_follows_steps_and_external_changes() -> None:
    net, store, target = _linear_store()
    assert store.pruned(target) == 0 and store.mask(target) is None and target not in store
    first = torch.ones(4, 8, dtype=torch.uint8)
    first.view(-1)[:10] = 0
    store.set(target, first, zeros=10)
    assert store.pruned(target) == 10 and target in store and store.names == ["weight"]
    kept = store.mask(target)
    kept.view(-1)[:20] = 0  # e.g. a mask changed in place: counted again, not the remembered 10
    assert store.pruned(target) == int((kept == 0).sum()) == 20


def test_mask_store_narrows_masks_and_zeros_weights_as_positive_zero() -> None:
    net, store, target = _linear_store()
    with torch.no_grad():
        net.weight.copy_(-torch.arange(1.0, 33.0).view(4, 8))  # all negative: -x * 0 is -0.0
    param = net.weight
    first = (torch.arange(32) >= 8).view(4, 8)  # prunes the first 8
    second = (torch.arange(32) % 2 == 1).view(4, 8)  # prunes the even entries, some of them pruned already
    store.set(target, first)
    assert store.pending == ["weight"] and bool((net.weight != 0).all())  # weights change at apply()
    assert store.apply() == ["weight"] and store.pending == []
    with pytest.raises(TypeError, match="uint8 or bool"):  # the contract of a method's masks
        store.set(target, second.to(torch.float32))
    store.set(target, second)  # composed with the kept mask
    store.apply()
    mask = store.mask(target)
    assert mask.dtype == torch.uint8 and torch.equal(mask.bool(), first & second)  # masks only narrow
    assert store.pruned(target) == 8 + 12
    assert net.weight is param and list(net.state_dict()) == ["weight", "bias"]  # plain, the same Parameter
    pruned = net.weight.detach()[mask == 0]
    assert bool((pruned == 0).all()) and not bool(torch.signbit(pruned).any())  # +0.0, never -0.0
    assert torch.equal(net.weight.detach()[mask == 1], -torch.arange(1.0, 33.0).view(4, 8)[mask == 1])
    with pytest.raises(ValueError, match=r"must have the shape \(4, 8\) of the tensor, got \(8, 4\)"):
        store.set(target, torch.ones(8, 4, dtype=torch.uint8))


def test_mask_store_apply_zeros_the_optimizer_state_of_pruned_entries() -> None:
    net, store, target = _linear_store()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(3, 8)).sum().backward()
    optimizer.step()  # moments of every entry nonzero
    store.attach([optimizer])
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    store.set(target, mask)
    store.apply()
    state = optimizer.state[net.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert bool((state[key][~mask] == 0).all()) and bool((state[key][mask] != 0).all()), key
    assert bool((optimizer.state[net.bias]["exp_avg"] != 0).all())  # a tensor without a mask: untouched
    store.detach()


class _Unknown(torch.optim.Optimizer):
    """Not one of the zero-keeping optimizers: it moves every entry, whatever its gradient."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(group["lr"])


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, _Unknown], ids=["SGD", "unknown"])
def test_mask_store_keeps_pruned_entries_zero_through_a_raw_optimizer_step(optimizer_cls: type) -> None:
    """A step on the optimizer itself, outside Lightning's wrapper: the store's step pre-hook masks the
    gradients (a zero-keeping optimizer then leaves pruned entries at zero), its post-hook masks the weights
    after any other optimizer's step."""
    net, store, target = _linear_store()
    optimizer = optimizer_cls(net.parameters(), lr=0.5)
    mask = (torch.arange(32) % 3 != 0).view(4, 8)
    store.set(target, mask)
    store.apply()
    store.attach([optimizer])
    for _ in range(2):
        net.weight.grad = torch.ones(4, 8)
        optimizer.step()  # a step taken outside Lightning: the store's hooks mask gradients and weights
        assert bool((net.weight.detach()[~mask] == 0).all())
        assert bool((net.weight.detach()[mask] != 0).all())
    if optimizer_cls is torch.optim.SGD:
        assert torch.equal(net.weight.grad, mask.to(torch.float32))  # masked before the step
    store.detach()
    with torch.no_grad():
        before = net.weight.detach().clone()
    optimizer.step()  # detached: no hook touches the step any more
    if optimizer_cls is _Unknown:
        assert torch.equal(net.weight.detach(), before + 0.5)


def test_mask_store_state_dict_round_trip_is_bit_packed() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3), nn.Conv1d(2, 3, 3))
    targets = select_parameters(net)
    store = MaskStore()
    masks = {t.name: torch.rand(t.tensor.shape) > 0.4 for t in targets}
    for t in targets:
        store.set(t, masks[t.name])
    state = store.state_dict()
    assert list(state) == ["0.weight", "1.weight"]
    for name, entry in state.items():
        assert entry["shape"] == list(masks[name].shape)
        assert entry["bits"].dtype == torch.uint8 and entry["bits"].numel() == -(-masks[name].numel() // 8)
        assert torch.equal(unpack_mask(entry).bool(), masks[name])  # unpacked here, independently
    unpacked = MaskStore.unpack(state)
    assert all(torch.equal(unpacked[n], masks[n].to(torch.uint8)) for n in masks)
    other = MaskStore()
    for t in targets:
        other.replace(t, unpacked[t.name])
    assert {n: e["shape"] for n, e in other.state_dict().items()} == {n: e["shape"] for n, e in state.items()}
    assert all(torch.equal(other.state_dict()[n]["bits"], state[n]["bits"]) for n in state)
    # version 0.1 kept plain mask tensors in the callback's state: read as they are
    legacy = MaskStore.unpack({"0.weight": masks["0.weight"].to(torch.float32)})
    assert torch.equal(legacy["0.weight"], masks["0.weight"].to(torch.uint8))


def test_mask_store_and_torchs_reparametrization_round_trip() -> None:
    """A model masked by ``torch.nn.utils.prune`` hands its masks to a store (the same Parameter object, now
    plain), and the store's masks go back on the model in torch's form and off again."""
    net = nn.Linear(6, 4)
    prune.l1_unstructured(net, "weight", amount=10)
    mask = net.weight_mask.clone()
    param = net.weight_orig
    masks = take_over(net)
    assert net.weight is param and list(net.state_dict()) == ["bias", "weight"]  # plain
    assert torch.equal(masks["weight"], mask.to(torch.uint8))
    assert int((net.weight == 0).sum()) == 10  # the zeros baked in
    (target,) = select_parameters(net)
    store = MaskStore()
    store.set(target, masks["weight"])
    install(store.items())
    assert net.weight_orig is param and torch.equal(net.weight_mask, mask)
    assert remove([target]) == ["weight"]
    assert net.weight is param and not hasattr(net, "weight_mask")
    assert bool((net.weight.detach()[mask == 0] == 0).all())
