"""sparsity_report with example inputs: parameters, MACs, compression and speed-up, checked against hand counts."""

from __future__ import annotations

import json

import torch
from torch import nn

from lightning_prune import sparsity_report
from lightning_prune.report import count_macs


def test_macs_of_conv_and_linear_are_counted_by_hand() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 5))
    # conv: 4x4 output positions per channel, 2 channels x 1 x 3 x 3 weights -> 16 * 18 = 288; linear: 32 * 5 = 160
    assert count_macs(net, torch.zeros(1, 1, 6, 6)) == (448, 448)
    with torch.no_grad():
        net[0].weight[1].zero_()  # 9 weights of channel 1: 16 positions each
        net[2].weight[:, :10].zero_()  # 50 weights, one position
    assert count_macs(net, torch.zeros(1, 1, 6, 6)) == (448, 448 - 16 * 9 - 50)


def test_macs_scale_with_the_batch_and_sequence_of_the_example_inputs() -> None:
    net = nn.Linear(4, 3)
    assert count_macs(net, torch.zeros(2, 5, 4)) == (2 * 5 * 12, 2 * 5 * 12)


def test_attention_projections_are_counted_once() -> None:
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        attention.out_proj.weight[:4].zero_()  # 32 of 64
        attention.in_proj_weight[:8].zero_()  # the whole query projection, 64 of 192
    x = torch.zeros(1, 3, 8)
    dense, nonzero = count_macs(attention, (x, x, x))
    # 3 positions x (3 projections of 64 + out_proj 64)
    assert dense == 3 * 256
    assert nonzero == 3 * (256 - 64 - 32)


def test_report_with_example_inputs_has_parameters_with_biases_and_a_json_summary() -> None:
    net = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    with torch.no_grad():
        net[0].weight[:5].zero_()  # 50 zeros
        net[0].bias[:2].zero_()  # biases count in the parameters, not in the weights' sparsity
    report = sparsity_report(net, example_inputs=torch.zeros(1, 10))
    assert (report.zeros, report.numel) == (50, 120)
    size = report.size
    assert size is not None
    assert (size.params_total, size.params_nonzero) == (132, 132 - 52)
    assert (size.macs_dense, size.macs_nonzero) == (120, 70)
    assert size.compression_ratio == 132 / 80 and size.theoretical_speedup == 120 / 70
    summary = json.loads(json.dumps(report.to_dict()))
    assert summary["params_nonzero"] == 80 and summary["weights_per_tensor"]["0.weight"] == [50, 100]
    assert "theoretical speed-up 1.71x" in str(report)


def test_report_without_example_inputs_has_no_size() -> None:
    report = sparsity_report(nn.Linear(3, 2))
    assert report.size is None and "params_total" not in report.to_dict()
