"""2:4 inference on CUDA through the public API: ``to_semi_structured`` refuses without CUDA and for weights the
kernels do not take (saying why), leaves the others dense with a warning naming each, and on a GPU converts the 2:4
``Linear`` weights of a model pruned by ``NMPruning`` into torch's semi-structured tensors with the dense model's
outputs. It lives in ``lightning_prune.inference``, not in the N:M method's module."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyModule, make_trainer
from torch import nn

import lightning_prune
from lightning_prune import NMPruning, OneShot, PruningScheduleCallback, sparsity_report, to_semi_structured
from lightning_prune.methods import nm


def test_to_semi_structured_is_an_inference_form_exported_from_the_root() -> None:
    from lightning_prune import inference

    assert lightning_prune.to_semi_structured is inference.to_semi_structured is to_semi_structured
    assert to_semi_structured.__module__ == "lightning_prune.inference.semi_structured"
    assert not hasattr(nm, "to_semi_structured") and "to_semi_structured" not in nm.__all__


def test_to_semi_structured_without_cuda_says_the_kernels_need_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a no-op on a machine without CUDA
    with pytest.raises(RuntimeError, match=r"to_semi_structured needs CUDA.*compute capability 8\.0"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 32)))


class MlpModule(TinyModule):
    """Linear(128, 64) -> ReLU -> Linear(64, 64) -> ReLU -> Linear(64, 3): the first two fit the 2:4 kernels."""

    def __init__(self) -> None:
        super().__init__(lr=0.01)
        self.model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))


@pytest.mark.cuda
def test_to_semi_structured_converts_2_4_linear_layers_and_matches_the_dense_model() -> None:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(32, 128, generator=g), torch.randint(0, 3, (32,), generator=g)),
        batch_size=8,
    )
    module = MlpModule()
    callback = PruningScheduleCallback(method=NMPruning(), schedule=OneShot(0), verbose=False)
    make_trainer([callback], max_epochs=1, limit_val_batches=0).fit(module, loader)
    model = module.model.cuda().half().eval()
    x = torch.randn(32, 128, generator=g).cuda().half()
    with torch.inference_mode():
        dense = model(x).float()
    assert [t.nm for t in sparsity_report(model, nm=(2, 4)).tensors] == [True, True, True]
    with pytest.warns(UserWarning, match=r"leaves \['4\.weight'\] dense: '4\.weight': shape \(3, 64\)"):
        converted = to_semi_structured(model)  # 4.weight: 2:4, but fewer rows than the kernels' smallest block
    assert converted == ["0.weight", "2.weight"]
    assert all(isinstance(model[i].weight, torch.sparse.SparseSemiStructuredTensor) for i in (0, 2))
    assert type(model[4].weight) is nn.Parameter
    with torch.inference_mode():
        sparse = model(x).float()
    torch.testing.assert_close(sparse, dense, rtol=1e-2, atol=1e-2)


def test_to_semi_structured_refuses_float32_weights_on_the_cpu_and_leaves_other_layers_dense(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a CUDA machine, with the model not moved
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 64), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match=r"leaves \['0\.weight', '1\.weight', '2\.weight'\] dense") as record:
        assert to_semi_structured(model) == []
    [message] = [str(w.message) for w in record if "leaves" in str(w.message)]
    assert "'0.weight': not 2:4 sparse along its rows" in message
    assert "'2.weight': input size 6 is not a multiple of m=4" in message
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(32))
    with pytest.raises(ValueError, match=r"'0\.weight' is a torch\.float32 tensor on cpu.*model\.cuda\(\)\.half\(\)"):
        to_semi_structured(model)
    assert type(model[0].weight) is nn.Parameter  # nothing converted
