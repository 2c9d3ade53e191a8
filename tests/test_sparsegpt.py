"""SparseGPT through the public API, with independent oracles: the solve against a direct least-squares solve over
the kept entries, the output error against magnitude's and Wanda's at the same budget, exact counts per row, N:M
in every group, earlier masks kept, adaptive dampening, the memory refusal, the sequential one-shot variant
against a layer-by-layer reference, Hugging Face's GPT-2 (Conv1D), attention and convolutions, the callback, and
two DDP processes."""

from __future__ import annotations

import copy
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import TinyModule, exit_distributed_script, expected_zeros, make_trainer, random_loader, run_ddp_script
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import (
    AtEpochs,
    PruningScheduleCallback,
    SparseGPT,
    Wanda,
    nm_satisfied,
    prune_once,
)
from lightning_prune.methods.sparsegpt_solver import HessianSum, sparsegpt_solve

HERE = Path(__file__).parent


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features of unequal scales (where an update of the kept weights pays)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    scales = torch.linspace(0.2, 3.0, features)
    return (torch.randn(n, features, generator=g) @ mix) * scales


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianSum(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def least_squares(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """The oracle: for each row, the kept entries minimising ``(w - w0)^T H (w - w0)`` with the pruned ones at 0,
    solved directly in float64 (``w_K = w0_K + H_KK^-1 H_KP w0_P``), with the solve's dampening."""
    h = hessian.double() + damp * hessian.diagonal().double().mean() * torch.eye(hessian.shape[0], dtype=torch.float64)
    out = torch.zeros_like(weight, dtype=torch.float64)
    for r in range(weight.shape[0]):
        k, p = keep[r].bool(), ~keep[r].bool()
        w0 = weight[r].double()
        out[r, k] = w0[k] + torch.linalg.solve(h[k][:, k], h[k][:, p] @ w0[p])
    return out


def output_error(new: torch.Tensor, old: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (new - old).T) ** 2).mean())


# ------------------------------------------------------------------------------------------------ the solve


def test_solve_equals_least_squares_when_pruned_entries_come_first() -> None:
    """With every pruned entry left of every kept one (each row its own order, via a permutation of the inputs),
    the solve is exact: it equals the direct least-squares solve over the kept entries of each row."""
    torch.manual_seed(0)
    x = correlated_inputs(400, 16, seed=1)
    w = torch.randn(5, 16)
    keep = torch.ones(5, 16, dtype=torch.uint8)
    keep[:, :6] = 0
    new, mask = sparsegpt_solve(w, hessian_of(x), 6 / 16, current_mask=keep, block_size=4, dampening=0.01)
    assert torch.equal(mask, keep)
    oracle = least_squares(w, hessian_of(x), keep, 0.01)
    assert torch.allclose(new.double(), oracle, atol=1e-4, rtol=1e-4)
    assert bool((new[:, :6] == 0).all())


def test_solve_with_any_fixed_mask_is_between_least_squares_and_no_update() -> None:
    """With a random fixed mask (kept columns are frozen once visited, the paper's approximation) the output
    error is at least the least-squares optimum and below pruning without an update."""
    torch.manual_seed(0)
    x = correlated_inputs(600, 24, seed=2)
    h = hessian_of(x)
    w = torch.randn(8, 24)
    keep = torch.ones(8, 24, dtype=torch.uint8)
    for r in range(8):
        keep[r, torch.randperm(24)[:12]] = 0
    new, mask = sparsegpt_solve(w, h, 0.5, current_mask=keep, block_size=8)
    assert torch.equal(mask, keep)
    optimum = output_error(least_squares(w, h, keep, 0.01).float(), w, x)
    assert optimum * 0.999 <= output_error(new, w, x) < output_error(w * keep, w, x)


@pytest.mark.parametrize(("rows", "cols", "sparsity", "block"), [(6, 37, 0.3, 8), (4, 16, 0.5, 128), (3, 50, 0.72, 7)])
def test_solve_exact_zeros_per_row(rows: int, cols: int, sparsity: float, block: int) -> None:
    torch.manual_seed(0)
    x = correlated_inputs(200, cols, seed=3)
    new, mask = sparsegpt_solve(torch.randn(rows, cols), hessian_of(x), sparsity, block_size=block)
    assert (mask == 0).sum(1).tolist() == [expected_zeros(sparsity, cols)] * rows
    assert torch.equal(new == 0, mask == 0)  # zeros exactly where pruned (random weights: no other zero)


def test_solve_keeps_earlier_masks_and_reaches_the_cumulative_target() -> None:
    torch.manual_seed(0)
    x = correlated_inputs(300, 32, seed=4)
    w = torch.randn(6, 32)
    first, m1 = sparsegpt_solve(w, hessian_of(x), 0.25, block_size=8)
    second, m2 = sparsegpt_solve(first, hessian_of(x), 0.6, block_size=8, current_mask=m1)
    assert bool((m2 <= m1).all())  # pruned entries stay pruned
    assert (m2 == 0).sum(1).tolist() == [expected_zeros(0.6, 32)] * 6
    assert bool((second[m2 == 0] == 0).all())


def test_solve_nm_holds_in_every_group() -> None:
    torch.manual_seed(0)
    x = correlated_inputs(300, 32, seed=5)
    w = torch.randn(7, 32)
    new, mask = sparsegpt_solve(w, hessian_of(x), nm=(2, 4), block_size=8)
    assert nm_satisfied(new, 2, 4)
    assert mask.view(7, 8, 4).sum(-1).eq(2).all()
    # against the magnitude 2:4 mask with no update: a lower output error
    top = w.abs().view(7, 8, 4).topk(2, dim=-1).indices
    keep = torch.zeros(7, 8, 4).scatter_(-1, top, 1.0).view(7, 32)
    assert output_error(new, w, x) < output_error(w * keep, w, x)


def test_adaptive_dampening_on_a_hessian_that_does_not_factor() -> None:
    """An indefinite 'Hessian' fails the Cholesky factorisation at 0.01, 0.1 and 1: the dampening grows with a
    warning until it factors; the weights stay finite and the counts exact."""
    h = torch.tensor([[1.0, 3.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    w = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="not positive definite") as record:
        new, mask = sparsegpt_solve(w, h, 0.5)
    assert len([r for r in record if "not positive definite" in str(r.message)]) == 3
    assert bool(torch.isfinite(new).all())
    assert (mask == 0).sum(1).tolist() == [2, 2, 2]


def test_dead_inputs_are_pruned_first_and_the_counts_stay_exact() -> None:
    torch.manual_seed(0)
    x = correlated_inputs(200, 8, seed=6)
    x[:, [2, 5, 6]] = 0.0  # inputs that never fire
    w = torch.randn(4, 8) * 10
    new, mask = sparsegpt_solve(w, hessian_of(x), 0.25)
    assert bool((mask[:, [2, 5]] == 0).all()) and (mask == 0).sum(1).tolist() == [2] * 4
    assert torch.equal(new[:, 6], w[:, 6])  # a dead input the target leaves kept: as it was
    assert bool(torch.isfinite(new).all())


# ------------------------------------------------------------------------------------------------ one shot


def mlp_and_batches(seed: int = 0) -> tuple[nn.Sequential, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6))
    data = correlated_inputs(8 * 64 + 256, 24, seed=seed + 10)
    return net, list(data[: 8 * 64].split(64)), data[8 * 64 :]


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_one_shot_output_error_below_magnitude_and_wanda(sparsity: float) -> None:
    """At the same masks' budget (each row to ``sparsity``), held-out outputs move less with SparseGPT."""
    net, batches, held = mlp_and_batches()
    dense = net(held).detach()
    errors = {}
    for name, method in (("magnitude", "l1_unstructured"), ("wanda", Wanda(8)), ("sparsegpt", SparseGPT(8))):
        pruned = copy.deepcopy(net)
        masks = prune_once(pruned, sparsity, method=method, dataloader=batches)
        for weight_name, mask in masks.items():  # the same budget: each tensor's zeros (per row, or per tensor)
            rows, n = mask.shape
            expected = expected_zeros(sparsity, rows * n) if name == "magnitude" else rows * expected_zeros(sparsity, n)
            assert int((mask == 0).sum()) == expected and abs(expected - sparsity * rows * n) <= rows, weight_name
        errors[name] = float(((pruned(held).detach() - dense) ** 2).mean())
    assert errors["sparsegpt"] < errors["magnitude"] and errors["sparsegpt"] < errors["wanda"], errors


def test_one_shot_sequential_equals_a_layer_by_layer_reference() -> None:
    """The oracle: prune layer 0 from the inputs, then layer 2 from the outputs of the pruned layer 0, and so on,
    with the solver alone; prune_once(SparseGPT) gives the same weights."""
    net, batches, _ = mlp_and_batches(1)
    reference = copy.deepcopy(net)
    x = torch.cat(batches)
    with torch.no_grad():
        for layer in (reference[0], reference[2], reference[4]):
            new, _ = sparsegpt_solve(layer.weight, hessian_of(x), 0.5)
            layer.weight.copy_(new)
            x = layer(x)
            x = F.relu(x)
    prune_once(net, 0.5, method=SparseGPT(8), dataloader=batches)
    for a, b in zip(net, reference):
        if isinstance(a, nn.Linear):
            assert torch.allclose(a.weight, b.weight, atol=1e-5), a
    parallel = mlp_and_batches(1)[0]
    prune_once(parallel, 0.5, method=SparseGPT(8, sequential=False), dataloader=batches)
    assert not torch.allclose(parallel[4].weight, reference[4].weight, atol=1e-5)  # the variants differ


def test_one_shot_gpt2_conv1d_rows_and_error() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = [torch.randint(0, 64, (4, 32)) for _ in range(4)]
    held = torch.randint(0, 64, (8, 32))
    dense = model(held).logits.detach()
    errors = {}
    for name, method in (("magnitude", "l1_unstructured"), ("sparsegpt", SparseGPT(4))):
        pruned = copy.deepcopy(model)
        masks = prune_once(pruned, 0.6, method=method, dataloader=batches)
        errors[name] = float(((pruned(held).logits - dense) ** 2).mean())
    attn = pruned.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out), a row is a column
    assert (attn == 0).sum(0).tolist() == [expected_zeros(0.6, 32)] * 96
    assert "transformer.h.1.mlp.c_proj.weight" in masks
    assert errors["sparsegpt"] < errors["magnitude"], errors
    nm = copy.deepcopy(model)
    prune_once(nm, 0.0, method=SparseGPT(4, nm=(2, 4), block_size=8), dataloader=batches)
    for block in nm.transformer.h:
        assert nm_satisfied(block.mlp.c_fc.weight, 2, 4, dim=0)


class AttentionConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv1d = nn.Conv1d(8, 8, 3, stride=2)
        self.grouped = nn.Conv1d(8, 8, 1, groups=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)
        h, _ = self.attention(h, h, h)
        h = self.grouped(self.conv1d(h.transpose(1, 2)))
        return self.head(h.transpose(1, 2))


def test_one_shot_attention_and_convolutions() -> None:
    """Conv2d/Conv1d as unfolded matrices (the reference: the solve with the Hessian of ``F.unfold`` patches),
    attention's in_proj per query/key/value third, and a grouped convolution by magnitude with a warning."""
    torch.manual_seed(0)
    net = AttentionConv().eval()
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    patches = torch.cat([F.unfold(b, 3, padding=1).transpose(1, 2).reshape(-1, 27) for b in batches])
    expected, _ = sparsegpt_solve(net.conv.weight.detach().reshape(8, -1), hessian_of(patches), 0.5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        masks = prune_once(net, 0.5, method=SparseGPT(3), dataloader=batches)
    assert torch.allclose(net.conv.weight.reshape(8, -1), expected, atol=1e-5)  # the first layer: same inputs
    assert [str(r.message) for r in record if "SparseGPT" in str(r.message)] == [
        "SparseGPT prunes 'grouped.weight' by magnitude per row, without updating it: it is not the weight of a "
        "Linear, Conv1D, Conv1d/2d (one group) or MultiheadAttention."
    ]
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert (rows == 0).sum(1).tolist() == [expected_zeros(0.5, rows.shape[1])] * rows.shape[0], name


def test_memory_refusal_names_the_tensor_and_the_bytes_before_any_change() -> None:
    net, batches, _ = mlp_and_batches()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"Hessian of '2.weight' \(32 x 32 inputs, float32\) would need 12288 bytes"):
        prune_once(net, 0.5, method=SparseGPT(8, max_hessian_bytes=8000), dataloader=batches)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"dampening": 0.0}, r"`dampening` must be in \(0, 1\]"),
        ({"nm": (2, 4), "block_size": 6}, "multiple of m=4"),
        ({"nm": (4, 4)}, "`n` must be below `m`"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_refuses_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseGPT(**kwargs)


def test_refused_under_fsdp2_before_training_and_pickles_for_ddp_spawn() -> None:
    from lightning_prune.distributed import check_sharding

    with pytest.raises(ValueError, match="needs whole tensors"):
        check_sharding(SparseGPT(2), "inplace", rewinds=False)
    callback = PruningScheduleCallback(0.5, method=SparseGPT(2))
    assert repr(pickle.loads(pickle.dumps(callback)).method) == repr(callback.method)


def test_refuses_global_scope() -> None:
    with pytest.raises(ValueError, match="scope='local'"):
        PruningScheduleCallback(0.5, method=SparseGPT(2), scope="global")


# ------------------------------------------------------------------------------------------------ the callback


def test_callback_reconstructs_at_each_step_and_keeps_earlier_masks() -> None:
    """Two scheduled steps (0.3, then 0.6): each row of every weight holds exactly its target after each step,
    entries pruned at the first step stay pruned, and the kept weights changed beyond training (the update)."""
    pl.seed_everything(0, verbose=False)
    module = TinyModule(lr=0.0)  # no training: any change to a kept weight is the method's
    dense = {n: p.detach().clone() for n, p in module.named_parameters()}
    seen: list[dict[str, torch.Tensor]] = []

    class AfterStep(pl.Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            seen.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if n.endswith("weight")})

    callback = PruningScheduleCallback(
        0.6, method=SparseGPT(2), schedule=AtEpochs({0: 0.3, 1: 0.6}), verbose=False, make_permanent=True
    )
    trainer = make_trainer([callback, AfterStep()], max_epochs=2, limit_val_batches=0)
    trainer.fit(module, random_loader())
    for step, target in enumerate((0.3, 0.6)):
        for name, w in seen[step].items():
            rows = w.reshape(w.shape[0], -1)
            assert (rows == 0).sum(1).tolist() == [expected_zeros(target, rows.shape[1])] * rows.shape[0], name
    for name in seen[0]:
        assert bool(((seen[1][name] == 0) | (seen[0][name] != 0)).all()), name  # pruned stays pruned
        kept = seen[1][name] != 0
        assert not torch.equal(seen[1][name][kept], dense[name][kept]), name  # the kept weights were updated


# ------------------------------------------------------------------------------------------------ DDP

DDP_TIMEOUT_S = 240


def _ddp_worker(out: Path) -> pl.Trainer:
    """Each rank sees other batches; the Hessians are summed and rank 0's weights sent, so all ranks agree."""
    pl.seed_everything(0, verbose=False)
    module = TinyModule(lr=0.0)
    callback = PruningScheduleCallback(0.5, method=SparseGPT(2), schedule=AtEpochs({0: 0.5}), verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], limit_train_batches=4,
        limit_val_batches=0,
    )  # fmt: skip
    torch.manual_seed(100 + int(os.environ.get("LOCAL_RANK", "0")))
    g = torch.Generator().manual_seed(int(os.environ.get("LOCAL_RANK", "0")))
    x = torch.randn(64, 1, 10, 10, generator=g)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 3, (64,), generator=g)), batch_size=8)
    trainer.fit(module, loader)
    state = {n: p.detach().clone() for n, p in module.named_parameters()}
    torch.save(state, out / f"rank{trainer.global_rank}.pt")
    return trainer


@pytest.mark.slow
def test_ddp_ranks_hold_the_same_weights(tmp_path: Path) -> None:
    run_ddp_script(Path(__file__), tmp_path, DDP_TIMEOUT_S)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, w in rank0.items():
        assert torch.equal(w, rank1[name]), name
    fc = rank0["model.fc1.weight"]
    assert (fc == 0).sum(1).tolist() == [expected_zeros(0.5, fc.shape[1])] * fc.shape[0]


if __name__ == "__main__" and sys.argv[1:2] == ["ddp"]:
    exit_distributed_script(_ddp_worker(Path(sys.argv[2])))
