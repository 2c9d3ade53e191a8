import pytest
import torch
import torch.nn.utils.prune as prune
from helpers import TinyModule
from torch import nn

from lightning_prune import reparam, select_parameters, sparsity_report


def names(targets):
    return [t.name for t in targets]


def test_select_parameters_defaults_to_conv_and_linear_weights():
    module = TinyModule()
    assert names(select_parameters(module)) == [f"model.{n}.weight" for n in ("conv1", "conv2", "fc1", "fc2", "fc3")]


def test_select_parameters_accepts_names_patterns_and_pairs_in_model_order():
    module = TinyModule()
    chosen = select_parameters(module, ["model.fc*.weight", (module.model.conv1, "bias"), "model.conv2.weight"])
    assert names(chosen) == [
        "model.conv1.bias",
        "model.conv2.weight",
        "model.fc1.weight",
        "model.fc2.weight",
        "model.fc3.weight",
    ]


def test_select_parameters_mapping_by_type_type_name_and_pattern_first_key_wins():
    module = TinyModule()
    chosen = select_parameters(module, sparsity={"model.fc3": 0.1, nn.Linear: 0.4, "Conv2d": 0.2})
    assert {t.name: t.sparsity for t in chosen} == {
        "model.conv1.weight": 0.2,
        "model.conv2.weight": 0.2,
        "model.fc1.weight": 0.4,
        "model.fc2.weight": 0.4,
        "model.fc3.weight": 0.1,
    }


def test_a_model_in_torch_form_is_read_through_reparam_plain():
    module = TinyModule()
    prune.l1_unstructured(module.model.fc1, "weight", amount=0.5)
    fc1 = module.model.fc1
    with torch.no_grad():
        fc1.weight_orig.add_(1.0)  # torch's cached fc1.weight is stale until the next forward
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with reparam.plain(module) as masks:
        (chosen,) = select_parameters(module, ["model.fc1.weight"])
        assert chosen.tensor is fc1.weight and list(masks) == ["model.fc1.weight"]
        assert torch.equal(chosen.tensor, before["model.fc1.weight_orig"] * before["model.fc1.weight_mask"])
    after = module.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(fc1.weight, fc1.weight_orig * fc1.weight_mask)  # the cached weight recomputed
    assert [n for n, _ in fc1.named_parameters()] == ["bias", "weight_orig"]


def test_select_parameters_names_a_shared_tensor_once_with_all_its_aliases():
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    with pytest.raises(ValueError, match=r"selection is empty.*emb\.weight \(embedding, tied to head\.weight\)"):
        select_parameters(model)  # the default leaves an embedding table out, through any tied name
    (target,) = select_parameters(model, ["*.weight"])
    assert (target.name, target.aliases, target.tensor is emb.weight) == (
        "emb.weight",
        ("emb.weight", "head.weight"),
        True,
    )
    assert names(select_parameters(model, ["head.weight"])) == ["emb.weight"]


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.ints = nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)


@pytest.mark.parametrize(
    ("model", "parameters", "sparsity", "match"),
    [
        (TinyModule(), ["model.nothing*"], None, r"`parameters` entry 'model.nothing\*' matches no parameter"),
        (TinyModule(), [(nn.Linear(2, 2), "weight")], None, r"the module is not part of the model"),
        (TinyModule(), "model.fc1.weight", None, r"`parameters` must be a list"),
        (TinyModule(), [3], None, r"entries must be names"),
        (TinyModule(), None, {nn.LSTM: 0.5, nn.Linear: 0.2}, r"`sparsity` key LSTM matches no chosen parameter"),
        (TinyModule(), None, {"model.zzz": 0.5}, r"`sparsity` key 'model.zzz' matches no chosen parameter"),
        (TinyModule(), ["model.conv1.weight"], {nn.Linear: 0.2}, r"'model.conv1.weight' matches no key"),
        (TinyModule(), None, {nn.Linear: 1.0}, r"`sparsity\['Linear'\]` must be in \[0, 1\), got 1.0"),
        (TinyModule(), None, {}, r"`sparsity` mapping is empty"),
        (TinyModule(), None, {3: 0.1}, r"keys must be module types or name patterns"),
        (nn.Sequential(nn.ReLU()), None, None, r"The selection is empty"),
        (WithBuffers(), ["ints"], None, r"'ints' is a torch.int64 tensor; only floating"),
    ],
)
def test_select_parameters_rejects_bad_selection(model, parameters, sparsity, match):
    with pytest.raises(ValueError, match=match):
        select_parameters(model, parameters, sparsity)


def test_sparsity_report_counts_zeros_masked_and_permanent():
    module = TinyModule()
    prune.l1_unstructured(module.model.fc1, "weight", amount=100)
    masked = sparsity_report(module)
    assert masked.per_tensor()["model.fc1.weight"] == pytest.approx(100 / 768)
    assert masked.zeros == 100 and masked.numel == sum(p.numel() for p in module.model.parameters() if p.dim() > 1)
    prune.remove(module.model.fc1, "weight")
    assert sparsity_report(module).zeros == 100
    table = str(masked)
    assert "model.fc1.weight" in table and "100/768" in table and table.splitlines()[-1].startswith("total")
