"""Models converted and saved by lightning_prune 0.3 load with the current code and give the same outputs
(the pickled class paths ``lightning_prune._sparse_layers.*`` and ``lightning_prune.inference.*`` are permanent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_prune import inference_report
from lightning_prune._sparse_layers import SparseLinear, SparseMultiheadAttention, SparsePointwiseConv2d

FIXTURE = Path(__file__).parent / "data" / "inference_v0.3.pt"


@pytest.fixture(scope="module")
def saved() -> dict:
    return torch.load(FIXTURE, weights_only=False)


@pytest.mark.parametrize(
    ("case", "sparse_type", "count"),
    [
        ("mlp", SparseLinear, 2),
        ("bsr", SparseLinear, 2),
        ("conv", SparsePointwiseConv2d, 2),
        ("encoder", SparseLinear, 4),
    ],
)
def test_inference_v03_file_loads_with_equal_outputs(saved: dict, case: str, sparse_type: type, count: int) -> None:
    entry = saved[case]
    model = entry["model"]
    assert saved["version"] == "0.3.0"
    assert sum(isinstance(m, sparse_type) for m in model.modules()) == count
    with torch.no_grad():
        output = model(entry["input"])
    output = output[0] if isinstance(output, tuple) else output
    torch.testing.assert_close(output, entry["output"], rtol=0, atol=0)
    report = inference_report(model)
    assert len(report.sparse_layers) == count
    assert "matrices sparse" in str(report)


def test_inference_v03_attention_class_kept(saved: dict) -> None:
    attention = saved["encoder"]["model"].self_attn
    assert isinstance(attention, SparseMultiheadAttention)
    assert [m.form for m in saved["bsr"]["model"].modules() if isinstance(m, SparseLinear)] == ["bsr8", "bsr8"]
