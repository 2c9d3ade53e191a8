"""Mask bookkeeping: counting zeros, the remembered counts, and torch's cached ``weight`` attribute."""

from __future__ import annotations

import torch
import torch.nn.utils.prune as prune
from torch import nn

from lightning_prune.masking import apply_mask, count_zeros, mask_zeros, pruned_count, refresh_weight
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


def test_pruned_count_follows_steps_and_external_changes() -> None:
    net = nn.Linear(8, 4)
    (target,) = select_parameters(net)
    assert pruned_count(target) == 0
    prune.l1_unstructured(net, "weight", amount=10)
    assert pruned_count(target) == 10
    net.weight_mask.view(-1)[:20] = 0.0  # e.g. a checkpoint loaded in place
    assert pruned_count(target) == int((net.weight_mask == 0).sum())


def test_refresh_weight_writes_into_torchs_cached_attribute_when_it_can() -> None:
    net = nn.Linear(6, 3)
    prune.l1_unstructured(net, "weight", amount=5)
    (target,) = select_parameters(net)
    net(torch.randn(2, 6))  # the forward pre-hook caches weight = weight_orig * weight_mask
    cached = net.weight
    with torch.no_grad():
        net.weight_orig.add_(1.0)
    refresh_weight(target)
    assert net.weight is cached  # reused: no allocation of the tensor's size
    torch.testing.assert_close(net.weight, net.weight_orig * net.weight_mask)
    with torch.inference_mode():  # Lightning validates under inference mode: the cached tensor is frozen
        net(torch.randn(2, 6))
    frozen = net.weight
    apply_mask(target, (torch.rand(3, 6) > 0.5).float())
    assert net.weight is not frozen and not net.weight.is_inference()
    torch.testing.assert_close(net.weight, net.weight_orig * net.weight_mask)
