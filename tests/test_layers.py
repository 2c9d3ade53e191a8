"""The table of matrix layers: Hugging Face's ``Conv1D`` (weights stored ``(in, out)``), attention's input
projections, recurrent weights and users' own layers, read by the selection, the methods and the report. The
oracles here are written from the layer's definition (``y = x @ W`` for ``Conv1D``), with sorting."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import expected_zeros
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import NMPruning, PruningScheduleCallback, Wanda, prune_once, sparsity_report
from lightning_prune.layers import matrix_layer, register_matrix_layer
from lightning_prune.report import count_macs
from lightning_prune.schedules import OneShot
from lightning_prune.selection import describe_selection, select_parameters

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D


class HFMLP(nn.Module):
    """GPT-2's MLP: two Conv1D layers (``weight`` is ``(in, out)``)."""

    def __init__(self, d: int = 8, hidden: int = 16, out: int = 4) -> None:
        super().__init__()
        self.c_fc = Conv1D(hidden, d)
        self.c_proj = Conv1D(out, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x)))


class InOut(nn.Module):
    """A user's own linear layer, weight stored (in, out) under another name."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


class Lit(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data(d: int = 8, out: int = 4, n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, d, generator=g), torch.randn(n, 3, out, generator=g)), 4)


def _fit(net: nn.Module, callback: PruningScheduleCallback, batches: int = 2) -> Lit:
    module = Lit(net)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=batches,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _data())
    return module


def test_matrix_layer_table_knows_the_built_in_kinds() -> None:
    mha = nn.MultiheadAttention(8, 2)
    assert matrix_layer(Conv1D(4, 8), "weight").layout == "in_out"
    assert matrix_layer(nn.ConvTranspose2d(2, 3, 3), "weight").layout == "in_out"
    assert matrix_layer(mha, "in_proj_weight").layout == "out_in"
    assert matrix_layer(mha.out_proj, "weight").layout == "out_in"
    assert matrix_layer(nn.LSTM(4, 6), "weight_hh_l0").layout == "out_in"
    assert matrix_layer(nn.LSTM(4, 6), "bias_ih_l0") is None
    assert matrix_layer(nn.Embedding(5, 3), "weight") is None
    assert matrix_layer(nn.LayerNorm(3), "weight") is None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((int, "w"), "nn.Module subclass"),
        (("NoDot", "w"), "class path"),
        ((InOut, ""), "parameter name"),
        ((InOut, "w", "rows"), "layout"),
    ],
)
def test_register_matrix_layer_refuses_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        register_matrix_layer(*args)


def test_a_registered_layer_is_selected_and_handled_with_its_layout() -> None:
    net = nn.Sequential(InOut(8, 6), nn.Tanh(), nn.Linear(6, 4))
    assert [t.name for t in select_parameters(net)] == ["2.weight"]
    handle = register_matrix_layer(InOut, "w", layout="in_out")
    try:
        (first, second) = select_parameters(net)
        assert (first.name, first.layout, second.layout) == ("0.w", "in_out", "out_in")
        # the report counts its multiply-accumulates: 3 positions x 48 weights, 3 x 24
        assert count_macs(net, torch.randn(3, 8)) == (3 * 48 + 3 * 24, 3 * 48 + 3 * 24)
        # N:M groups run down its columns (dim 0, the input dimension)
        callback = PruningScheduleCallback(method=NMPruning(2, 4), schedule=OneShot(0), verbose=False)
        module = _fit(net, callback)
        w = module.model[0].w.detach()
        assert bool(((w.t().reshape(6, 2, 4) != 0).sum(-1) == 2).all())
    finally:
        handle.remove()
    assert [t.name for t in select_parameters(net)] == ["2.weight"]


def test_gpt2_selection_summary_names_what_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    config.bos_token_id = config.eos_token_id = 0
    model = transformers.GPT2LMHeadModel(config)
    targets = select_parameters(model)
    assert len(targets) == 8 and all(t.layout == "in_out" for t in targets)
    summary = describe_selection(model, targets)
    assert dict(summary.left_out) == {
        "transformer.wte.weight": "embedding, tied to lm_head.weight",
        "transformer.wpe.weight": "embedding",
    }
    assert summary.chosen_numel == sum(t.tensor.numel() for t in targets)
    assert summary.model_numel == sum(p.numel() for p in model.parameters())
    assert str(summary).startswith(f"pruning 8 tensors, {summary.chosen_numel / 1e3:.1f} k of the model's")

    class LM(Lit):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch[0], labels=batch[0]).loss

    ids = torch.randint(0, 64, (4, 8))
    callback = PruningScheduleCallback(0.5)  # verbose: the summary is printed when fit starts
    assert callback.selection is None
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False, callbacks=[callback]
    )
    said: list[str] = []
    monkeypatch.setattr("lightning_prune.callback.rank_zero_info", said.append)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LM(model), DataLoader(TensorDataset(ids), batch_size=2))
    assert set(callback.selection.chosen) == {f"model.{t.name}" for t in targets}
    assert said[0] == f"PruningScheduleCallback: {callback.selection}"
    assert "model.transformer.wte.weight (embedding, tied to model.lm_head.weight)" in said[0]


def _columns_by_l2(w: torch.Tensor, n: int) -> set[int]:
    """Output units of a Conv1D weight (its columns) with the n smallest L2 norms, by sorting."""
    norms = [(float(w[:, j].norm()), j) for j in range(w.shape[1])]
    return {j for _, j in sorted(norms)[:n]}


def test_ln_structured_prunes_output_units_of_conv1d() -> None:
    torch.manual_seed(0)
    net = HFMLP()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    callback = PruningScheduleCallback(0.5, method="ln_structured", schedule=OneShot(0), verbose=False)
    module = _fit(net, callback, batches=1)
    for name in ("c_fc.weight", "c_proj.weight"):
        w = module.model.get_parameter(name).detach()
        dead = {j for j in range(w.shape[1]) if bool((w[:, j] == 0).all())}
        assert dead == _columns_by_l2(before[name], expected_zeros(0.5, w.shape[1])), name
        assert not any(bool((w[i] == 0).all()) for i in range(w.shape[0]))  # no input row emptied


def test_nm_on_conv1d_keeps_the_largest_two_of_every_four_inputs() -> None:
    torch.manual_seed(0)
    net = HFMLP(d=8, hidden=16)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    prune_once(net, 0.0, method=NMPruning(2, 4))
    for name in ("c_fc.weight", "c_proj.weight"):
        w, old = net.get_parameter(name).detach(), before[name]
        for j in range(w.shape[1]):  # each output unit's column, in groups of 4 consecutive inputs
            for g in range(0, w.shape[0], 4):
                ranked = sorted(range(4), key=lambda i: -abs(float(old[g + i, j])))
                kept = {i for i in range(4) if w[g + i, j] != 0}
                assert kept == set(ranked[:2]), (name, j, g)
    report = sparsity_report(net, nm=(2, 4))
    assert all(t.nm for t in report.tensors)


def test_wanda_on_conv1d_ranks_each_output_column_by_weight_times_input_norm() -> None:
    torch.manual_seed(0)
    net = HFMLP()
    batches = [torch.randn(5, 3, 8) for _ in range(2)]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    inputs: dict[str, list[torch.Tensor]] = {"c_fc.weight": [], "c_proj.weight": []}
    with torch.no_grad():
        for x in batches:  # the inputs each layer sees, computed here from y = x @ W + b
            h = x @ before["c_fc.weight"] + before["c_fc.bias"]
            inputs["c_fc.weight"].append(x.reshape(-1, 8))
            inputs["c_proj.weight"].append(torch.tanh(h).reshape(-1, 16))
    prune_once(net, 0.5, method=Wanda(calibration_batches=2), dataloader=batches)
    for name, xs in inputs.items():
        x = torch.cat(xs)
        norm = x.pow(2).mean(0).sqrt()
        scores = before[name].abs() * norm[:, None]  # (in, out)
        w = net.get_parameter(name).detach()
        for j in range(w.shape[1]):
            order = sorted(range(w.shape[0]), key=lambda i: float(scores[i, j]))
            expected = set(order[: expected_zeros(0.5, w.shape[0])])
            assert {i for i in range(w.shape[0]) if w[i, j] == 0} == expected, (name, j)


def test_report_counts_conv1d_and_attention_input_projection_macs() -> None:
    net = HFMLP()
    with torch.no_grad():
        net.c_fc.weight[:4].zero_()
    x = torch.randn(2, 3, 8)
    positions = 6
    assert count_macs(net, x) == (positions * (8 * 16 + 16 * 4), positions * (4 * 16 + 16 * 4))
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    assert count_macs(Attn(), torch.randn(2, 5, 8))[0] == 10 * (3 * 64 + 64)


def test_default_selection_takes_attention_input_projections_and_recurrent_weights() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    names = [t.name for t in select_parameters(encoder)]
    assert names == [
        f"layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")
    ]
    lstm = nn.LSTM(4, 6, num_layers=2, proj_size=3)
    assert [t.name for t in select_parameters(lstm)] == [
        "weight_ih_l0",
        "weight_hh_l0",
        "weight_hr_l0",
        "weight_ih_l1",
        "weight_hh_l1",
        "weight_hr_l1",
    ]
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    assert [t.name for t in select_parameters(separate)] == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj.weight",
    ]


def test_embedding_named_in_parameters_is_pruned() -> None:
    emb = nn.Embedding(10, 4)
    model = nn.ModuleDict({"emb": emb, "lin": nn.Linear(4, 4)})
    assert [t.name for t in select_parameters(model)] == ["lin.weight"]
    assert [t.name for t in select_parameters(model, ["emb.weight"])] == ["emb.weight"]
    prune_once(model, 0.5, parameters=["emb.weight"])
    assert int((emb.weight == 0).sum()) == 20
    with pytest.raises(ValueError, match="leaves embeddings out"):
        select_parameters(model, sparsity={nn.Embedding: 0.5})


def test_neuron_pruning_refuses_conv1d_naming_it() -> None:
    from lightning_prune import NeuronPruning

    callback = PruningScheduleCallback(
        0.5, method=NeuronPruning(example_inputs=torch.randn(1, 3, 8)), scope="global", verbose=False
    )
    with pytest.raises(ValueError, match=r"Torch-Pruning.*model\.c_fc \(Conv1D\)"):
        _fit(HFMLP(), callback)
