"""Wanda (activation-aware importance) through the public API: exact counts per row, tensor and across tensors
at every step of a schedule, scores against a hand-computed reference, hooks only inside the calibration
window, resume inside a window, convolutions and attention, one-shot use, bad arguments, several processes,
and the ViT benchmark end to end on a tiny synthetic MNIST (docs/check_snippets.py runs docs/transformers.md)."""

from __future__ import annotations

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
from helpers import exit_distributed_script, expected_zeros, make_trainer, run_ddp_script
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import AtEpochs, Polynomial, PruningScheduleCallback, Wanda, prune_once
from lightning_prune.step import wanda_prune

HERE = Path(__file__).parent
LINEAR_IN = 6


class Mlp(pl.LightningModule):
    """Linear(6, 8) -> ReLU -> Linear(8, 3); ``lr=0`` keeps the weights (and so the scores) fixed."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.model = nn.Sequential(nn.Linear(LINEAR_IN, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def scaled_loader(scales: list[float], n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Random inputs whose feature ``j`` has the scale ``scales[j]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(scales), generator=g) * torch.tensor(scales)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=batch_size)


def fit(callbacks: list, module: pl.LightningModule, loader: DataLoader, max_epochs: int = 3, **kwargs: Any) -> Any:
    trainer = make_trainer(callbacks, max_epochs=max_epochs, limit_val_batches=0, **kwargs)
    trainer.fit(module, loader)
    return trainer


def row_zeros(weight: torch.Tensor) -> list[int]:
    return (weight.detach().reshape(weight.shape[0], -1) == 0).sum(1).tolist()


class Capture(Wanda):
    """Wanda that keeps a copy of the scores it ranks at each step (read through the public ``scores``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, torch.Tensor]] = []

    def local_masks(self, targets, sparsities, seed, masks):  # type: ignore[no-untyped-def]
        self.seen.append({t.name: self.scores(t).clone() for t in targets})
        yield from super().local_masks(targets, sparsities, seed, masks)


class AtStepStart(pl.Callback):
    """Records, at every batch start (after the pruning callback ran), the zeros of each row and each tensor."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.rows: dict[tuple[int, int], dict[str, list[int]]] = {}
        self.zero_sets: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        params = dict(pl_module.named_parameters())
        self.rows[(trainer.current_epoch, batch_idx)] = {n: row_zeros(params[n]) for n in self.names}
        self.zero_sets.append({n: (params[n] == 0).clone() for n in self.names})


WEIGHTS = ["model.0.weight", "model.2.weight"]
STEPS = {0: 0.25, 1: 0.5, 2: 0.65}


@pytest.mark.parametrize("group", ["row", "tensor", "global"])
def test_wanda_exact_counts_after_each_step(group: str) -> None:
    """A step falls due at each epoch start and prunes after 2 batches: from then on every row (or tensor, or
    all tensors together) holds exactly round(s * n) zeros of that step's target, and zeros stay zeros."""
    pl.seed_everything(0, verbose=False)
    scope = "global" if group == "global" else "local"
    callback = PruningScheduleCallback(
        method=Wanda(calibration_batches=2, group=group), scope=scope, schedule=AtEpochs(STEPS), verbose=False
    )
    recorder = AtStepStart(WEIGHTS)
    module = Mlp()
    fit([callback, recorder], module, scaled_loader([1.0] * LINEAR_IN))
    shapes = {n: p.shape for n, p in module.named_parameters()}
    for (epoch, batch), rows in recorder.rows.items():
        s = STEPS[epoch] if batch >= 2 else STEPS.get(epoch - 1, 0.0)  # the step waits 2 batches
        if group == "row":
            for name, zeros in rows.items():
                assert zeros == [expected_zeros(s, shapes[name][1])] * shapes[name][0], (epoch, batch, name)
        elif group == "tensor":
            for name, zeros in rows.items():
                assert sum(zeros) == expected_zeros(s, shapes[name].numel()), (epoch, batch, name)
        else:
            total = sum(shapes[n].numel() for n in WEIGHTS)
            assert sum(sum(z) for z in rows.values()) == expected_zeros(s, total), (epoch, batch)
    assert len(recorder.rows) == 12
    for before, after in zip(recorder.zero_sets, recorder.zero_sets[1:]):
        for name in WEIGHTS:
            assert bool((after[name] | ~before[name]).all()), name  # pruned entries stay pruned
    assert callback.state_dict()["steps"] == 3


def test_wanda_steps_with_a_polynomial_step_schedule() -> None:
    """Steps fall due every 2 optimizer steps and each waits a window of 3 batches: at every batch start, each
    row holds exactly the zeros of the target applied last, and the run ends at the final target."""

    class Applied(pl.Callback):
        def __init__(self) -> None:
            self.targets: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            applied = callback.state_dict()["applied"]
            self.targets.append(applied.get(WEIGHTS[0], 0.0))
            for name in WEIGHTS:
                weight = pl_module.get_parameter(name)
                zeros = expected_zeros(applied.get(name, 0.0), weight.shape[1])
                assert row_zeros(weight) == [zeros] * weight.shape[0], (trainer.global_step, name)

    pl.seed_everything(0, verbose=False)
    callback = PruningScheduleCallback(
        0.7, method=Wanda(3), schedule=Polynomial(start_epoch=0, end_epoch=2, every_n_steps=2), verbose=False
    )
    applied = Applied()
    fit([callback, applied], Mlp(), scaled_loader([1.0] * LINEAR_IN), max_epochs=4)
    assert len(set(applied.targets)) == 4 and applied.targets[-1] == 0.7  # three steps, the last to 0.7
    assert callback.state_dict()["steps"] == 3


@pytest.mark.parametrize("group", ["row", "tensor"])
def test_wanda_scores_equal_hand_computed_reference(group: str) -> None:
    """|W_ij| * sqrt(mean over the window's rows of x_j^2), computed here from the batches the window saw."""
    pl.seed_everything(0, verbose=False)
    loader = scaled_loader([0.1, 1.0, 10.0, 3.0, 0.5, 2.0], n=32, batch_size=8)
    method = Capture(calibration_batches=3, group=group)
    callback = PruningScheduleCallback(0.5, method=method, schedule=AtEpochs([0]), verbose=False)
    module = Mlp(lr=0.0)
    weight = module.model[0].weight.detach().clone()
    fit([callback], module, loader, max_epochs=1)

    x = torch.cat([b[0] for b, _ in zip(loader, range(3))])  # the three batches of the window
    reference = weight.abs() * x.pow(2).mean(0).sqrt()
    (scores,) = method.seen
    torch.testing.assert_close(scores["model.0.weight"], reference)
    kept = module.model[0].weight != 0
    if group == "row":  # in each row, the 3 largest scores survive
        expected = torch.zeros_like(kept)
        expected.scatter_(1, reference.topk(3, dim=1).indices, True)
    else:
        expected = reference > reference.flatten().kthvalue(24).values
    assert torch.equal(kept, expected)


def test_wanda_hooks_only_inside_the_window() -> None:
    class Hooks(pl.Callback):
        def __init__(self) -> None:
            self.counts: list[tuple[int, int]] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            model = pl_module.model
            self.counts.append((len(model[0]._forward_pre_hooks), len(model[2]._forward_pre_hooks)))

    callback = PruningScheduleCallback(0.5, method=Wanda(2), schedule=AtEpochs([1]), verbose=False)
    hooks = Hooks()
    module = Mlp()
    fit([callback, hooks], module, scaled_loader([1.0] * LINEAR_IN), max_epochs=2)
    # epoch 0: no window; epoch 1: one hook per layer for batches 0 and 1, removed by the step at batch 2
    assert hooks.counts == [(0, 0)] * 4 + [(1, 1)] * 2 + [(0, 0)] * 2
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in module.modules())


def test_wanda_keeps_a_small_weight_on_a_loud_feature() -> None:
    """Feature 0 is 1000 times louder than the others and its weights are the smallest: Wanda keeps them (their
    scores are the largest), magnitude pruning removes them."""

    def run(method: Any) -> torch.Tensor:
        pl.seed_everything(0, verbose=False)
        module = Mlp(lr=0.0)
        with torch.no_grad():
            module.model[0].weight[:, 0] = 0.01
            module.model[0].weight[:, 1:] = 0.5 * module.model[0].weight[:, 1:].sign()
        callback = PruningScheduleCallback(
            0.5, method=method, parameters=["model.0.weight"], schedule=AtEpochs([0]), verbose=False
        )
        fit([callback], module, scaled_loader([1000.0] + [1.0] * (LINEAR_IN - 1)), max_epochs=1)
        return module.model[0].weight.detach()

    wanda, magnitude = run(Wanda(2)), run("l1_unstructured")
    assert bool((wanda[:, 0] != 0).all())
    assert bool((magnitude[:, 0] == 0).all())
    assert not torch.equal(wanda == 0, magnitude == 0)


class ByStep(Mlp):
    """Takes its batch by (epoch, batch index), not from the loader: Lightning starts a loader again from its
    first batch when it resumes inside an epoch, so a resumed run would otherwise see other batches."""

    DATA = [scaled_loader([4.0, 1.0, 0.2, 2.0, 1.0, 0.5], n=40, batch_size=8, seed=e) for e in range(3)]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = list(self.DATA[self.current_epoch])[batch_idx]
        return super().training_step((x, y), batch_idx)


def _resumable_run(tmp: Path, ckpt_path: str | None = None) -> tuple[nn.Module, PruningScheduleCallback]:
    pl.seed_everything(0, verbose=False)
    callback = PruningScheduleCallback(0.75, method=Wanda(3), schedule=AtEpochs([1, 2]), verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    module = ByStep()
    trainer = make_trainer(
        [callback, checkpoint], max_epochs=3, limit_val_batches=0, limit_train_batches=5, enable_checkpointing=True
    )
    trainer.fit(module, scaled_loader([1.0] * LINEAR_IN, n=40), ckpt_path=ckpt_path)
    return module, callback


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")  # ByStep
def test_wanda_resume_inside_a_calibration_window(tmp_path: Path) -> None:
    """A checkpoint after the first two batches of a 3-batch window: its statistics travel in the callback's
    state, and the resumed run prunes to the same masks as the uninterrupted one."""
    full, _ = _resumable_run(tmp_path / "full")
    inside = tmp_path / "full" / "step=7.ckpt"  # epoch 1 (5 batches) starts at step 5: its second batch
    state = next(v for k, v in torch.load(inside, weights_only=False)["callbacks"].items() if "Pruning" in k)
    assert state["calibrating"] and state["method"]["seen"] == 1 and state["method"]["observed"]
    assert set(state["method"]["sums"]) == set(WEIGHTS)
    resumed, _ = _resumable_run(tmp_path / "resumed", ckpt_path=str(inside))
    for name in WEIGHTS:
        assert torch.equal(full.get_parameter(name) == 0, resumed.get_parameter(name) == 0), name
        torch.testing.assert_close(full.get_parameter(name), resumed.get_parameter(name))


def test_wanda_conv_scores_per_input_channel_and_group() -> None:
    """Conv2d: one scale per input channel (squares over batch and positions), broadcast over the kernel; a
    grouped convolution pairs each output channel with its own group's inputs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten())
    batches = [torch.randn(2, 4, 5, 5) * torch.tensor([5.0, 1.0, 0.1, 2.0]).view(1, 4, 1, 1) for _ in range(3)]
    method = Capture(calibration_batches=3)
    weight = net[0].weight.detach().clone()
    prune_once(net, 0.5, method=method, dataloader=batches)
    x = torch.cat(batches)
    norms = x.pow(2).mean(dim=(0, 2, 3)).sqrt()  # per input channel
    # output channels 0-2 read inputs 0-1 (group 0), 3-5 read inputs 2-3 (group 1)
    scale = torch.stack([norms[:2]] * 3 + [norms[2:]] * 3).view(6, 2, 1, 1)
    (scores,) = method.seen
    torch.testing.assert_close(scores["0.weight"], weight.abs() * scale)
    assert row_zeros(net[0].weight) == [expected_zeros(0.5, 18)] * 6  # 9 of each output channel's 18
    nine_largest = scores["0.weight"].view(6, -1).topk(9, dim=1).indices
    assert torch.equal(
        net[0].weight.view(6, -1) != 0, torch.zeros(6, 18, dtype=torch.bool).scatter_(1, nine_largest, True)
    )


@pytest.mark.parametrize("batch_first", [False, True])
def test_wanda_attention_reads_query_key_value_and_heads(batch_first: bool) -> None:
    """``in_proj_weight``: each third of the rows reads its own input (query, key, value); ``out_proj.weight``:
    the heads' output, computed here through an attention whose ``out_proj`` is the identity."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    q, k, v = (torch.randn(5, 3, 8) * s for s in (1.0, 3.0, 0.2))
    if batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, batch: Any) -> torch.Tensor:
            return self.attn(*batch, need_weights=False)[0]

    net = Cross()
    dense = {k: v.clone() for k, v in mha.state_dict().items()}
    method = Capture(calibration_batches=1)
    prune_once(
        net, 0.5, method=method, parameters=["attn.in_proj_weight", "attn.out_proj.weight"], dataloader=[[(q, k, v)]]
    )
    (scores,) = method.seen
    rms = [t.reshape(-1, 8).pow(2).mean(0).sqrt() for t in (q, k, v)]
    expected_in = dense["in_proj_weight"].abs() * torch.cat([r.expand(8, 8) for r in rms])
    torch.testing.assert_close(scores["attn.in_proj_weight"], expected_in)

    reference = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    reference.load_state_dict(dense)
    with torch.no_grad():
        reference.out_proj.weight.copy_(torch.eye(8))
        reference.out_proj.bias.zero_()
        heads = reference(q, k, v, need_weights=False)[0]
    out_rms = heads.reshape(-1, 8).pow(2).mean(0).sqrt()
    torch.testing.assert_close(scores["attn.out_proj.weight"], dense["out_proj.weight"].abs() * out_rms)
    assert row_zeros(mha.in_proj_weight) == [4] * 24 and row_zeros(mha.out_proj.weight) == [4] * 8


def test_wanda_falls_back_to_magnitude_with_one_warning() -> None:
    """A bias has no input features of its own: scored by magnitude, with one warning that names it."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    method = Capture(calibration_batches=2)
    with pytest.warns(UserWarning, match=r"'0\.bias' by magnitude alone") as record:
        prune_once(net, 0.5, method=method, parameters=["0.bias", "0.weight"], dataloader=[torch.randn(4, 4)] * 2)
        bias = net[0].bias.detach().clone()
        prune_once(net, 0.75, method=method, parameters=["0.bias", "0.weight"], dataloader=[torch.randn(4, 4)] * 2)
    assert sum("0.bias" in str(w.message) for w in record) == 1
    first, second = method.seen
    torch.testing.assert_close(second["0.bias"], bias.abs())
    assert int((net[0].bias == 0).sum()) == expected_zeros(0.75, 6)


def test_wanda_prune_one_shot_matches_the_callback_window() -> None:
    """One-shot use: the same masks as the callback gets from the same batches (weights frozen), the model's
    mode kept and no hook left; the one-shot model is pruned in eval mode (no dropout)."""
    loader = scaled_loader([3.0, 1.0, 0.3, 1.0, 2.0, 0.1])
    pl.seed_everything(0, verbose=False)
    trained = Mlp(lr=0.0)
    shot = Mlp(lr=0.0)
    shot.load_state_dict(trained.state_dict())
    callback = PruningScheduleCallback(0.6, method=Wanda(4), schedule=AtEpochs([0]), verbose=False)
    fit([callback], trained, loader, max_epochs=2)  # epoch 0's 4 batches are the window; the step starts epoch 1
    shot.train()
    masks = wanda_prune(shot, loader, 0.6, batches=4)
    assert shot.training
    assert sorted(masks) == WEIGHTS
    for name in WEIGHTS:
        assert torch.equal(masks[name] == 0, trained.get_parameter(name) == 0), name
        assert torch.equal(shot.get_parameter(name) == 0, trained.get_parameter(name) == 0), name
    assert all(not m._forward_pre_hooks for m in shot.modules())


def test_wanda_one_shot_observes_every_matrix_of_a_transformer_encoder() -> None:
    """In eval mode without gradients, ``nn.TransformerEncoderLayer`` takes a fused path that calls none of its
    layers; one-shot calibration keeps gradients on, so every matrix is scored from its inputs (no warning)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    encoder.layers[0].dropout.eval()  # a submodule's own mode survives the calibration
    parameters = ["*self_attn.in_proj_weight", "*self_attn.out_proj.weight", "*linear*.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = wanda_prune(encoder, [torch.randn(4, 5, 16) for _ in range(3)], 0.5, parameters=parameters, batches=3)
    assert len(masks) == 8
    assert encoder.training and not encoder.layers[0].dropout.training
    for name, mask in masks.items():
        assert row_zeros(mask) == [mask.shape[1] // 2] * mask.shape[0], name


def test_wanda_callback_pickles_for_ddp_spawn() -> None:
    callback = PruningScheduleCallback(0.5, method=Wanda(4, group="tensor"), verbose=False)
    copy = pickle.loads(pickle.dumps(callback))
    assert repr(copy.method) == "Wanda(calibration_batches=4, group='tensor')"
    assert copy.state_key == callback.state_key


def test_prune_once_global_magnitude_exact_count() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    masks = prune_once(net, 0.65, scope="global")
    assert sum(int((m == 0).sum()) for m in masks.values()) == expected_zeros(0.65, 91)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Wanda(calibration_batches=0), r"`calibration_batches` must be an integer >= 1, got 0"),
        (lambda: Wanda(calibration_batches=2.0), r"`calibration_batches` must be an integer >= 1, got 2.0"),
        (lambda: Wanda(calibration_batches=True), r"`calibration_batches` must be an integer >= 1, got True"),
        (lambda: Wanda(group="column"), r"`group` must be one of \['row', 'tensor', 'global'\], got 'column'"),
        (
            lambda: PruningScheduleCallback(0.5, method=Wanda(), scope="global"),
            r"Wanda\(calibration_batches=8, group='row'\) needs the callback's scope='local', got scope='global'; "
            r"with scope='global' use Wanda\(group='global'\)",
        ),
        (
            lambda: PruningScheduleCallback(0.5, method=Wanda(group="global")),
            r"group='global'\) needs the callback's scope='global', got scope='local'",
        ),
        (
            lambda: prune_once(nn.Linear(4, 2), 0.5, method=Wanda()),
            r"observes activations: give a `dataloader`",
        ),
        (
            lambda: prune_once(nn.Linear(4, 2), 0.5, method=Wanda(3), dataloader=[torch.randn(2, 4)] * 2),
            r"`dataloader` ran out before the 3 calibration batches",
        ),
        (
            lambda: wanda_prune(nn.Linear(1, 4), [torch.randn(2, 1)], 0.5, batches=1),
            r"would prune every entry of each row of 'weight' \(sparsity 0.5 of rows of 1\)",
        ),
        (lambda: wanda_prune(nn.Linear(4, 2), [torch.randn(2, 4)], 1.0), r"`sparsity` must be in \[0, 1\), got 1.0"),
    ],
)
def test_wanda_refuses_bad_arguments(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_wanda_refuses_non_finite_activations() -> None:
    net = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"inputs of 'weight' hold NaN or infinite values"):
        wanda_prune(net, [torch.full((2, 4), float("inf"))], 0.5, batches=1)
    assert not net._forward_pre_hooks


# ---------------------------------------------------------------------------------------------- processes

DDP_TIMEOUT_S = 240


class LocalSums(Wanda):
    """Wanda that keeps this rank's own sums of squares, before they are added up over the ranks."""

    def finish_calibration(self, reduce: Any) -> None:
        self.local = [s.clone() for s in self.state_dict()["sums"].values()]
        super().finish_calibration(reduce)


def _ddp_worker(out: Path) -> pl.Trainer:
    """Run by the DDP test in a subprocess (and by Lightning again for rank 1): each rank sees other batches
    (DistributedSampler) and seeds its RNG differently; all must draw the same masks by themselves, without
    the callback's fallback that puts rank 0's masks on every rank where they differ."""
    import lightning_prune.callback as callback_module

    replaced = []
    agree = callback_module.agree_masks
    callback_module.agree_masks = lambda *args, **kwargs: replaced.append(agree(*args, **kwargs)) or replaced[-1]
    pl.seed_everything(0, verbose=False)
    module = Mlp()
    method = LocalSums(2, group="global")
    callback = PruningScheduleCallback(
        0.6, method=method, scope="global", schedule=AtEpochs({0: 0.3, 1: 0.6}), verbose=False
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    torch.manual_seed(100 + int(os.environ.get("LOCAL_RANK", "0")))
    trainer.fit(module, scaled_loader([5.0, 1.0, 0.2, 1.0, 3.0, 0.5], n=64))
    masks = {name: (module.get_parameter(name) == 0) for name in WEIGHTS}
    torch.save({"masks": masks, "replaced": replaced, "local": method.local}, out / f"rank{trainer.global_rank}.pt")
    return trainer


@pytest.mark.slow
def test_wanda_ddp_every_rank_draws_the_same_masks(tmp_path: Path) -> None:
    run_ddp_script(Path(__file__), tmp_path, DDP_TIMEOUT_S)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["replaced"] == rank1["replaced"] == [False, False]  # two steps, masks equal without a broadcast
    assert not torch.equal(rank0["local"][0], rank1["local"][0])  # each rank saw its own batches
    total = sum(m.numel() for m in rank0["masks"].values())
    assert sum(int(m.sum()) for m in rank0["masks"].values()) == expected_zeros(0.6, total)
    for name in WEIGHTS:
        assert torch.equal(rank0["masks"][name], rank1["masks"][name]), name


# ---------------------------------------------------------------------------------------------- benchmark


if __name__ == "__main__" and sys.argv[1:2] == ["ddp"]:
    exit_distributed_script(_ddp_worker(Path(sys.argv[2])))


def test_wanda_nm_keeps_the_two_highest_wanda_scores_of_every_four_inputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
    batches = [torch.randn(6, 8) for _ in range(3)]
    before = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    with torch.no_grad():  # the inputs each layer sees, computed here
        x0 = torch.cat(batches)
        x2 = torch.tanh(x0 @ before[0].t() + net[0].bias)
    method = Wanda(calibration_batches=3, nm=(2, 4))
    assert (method.takes_sparsity, method.name) == (False, "wanda(2:4)")
    masks = prune_once(net, 0.0, method=method, dataloader=batches)
    for w, x, name in ((before[0], x0, "0.weight"), (before[1], x2, "2.weight")):
        scores = w.abs() * x.pow(2).mean(0).sqrt()  # |W_ij| * ||X_j|| / sqrt(rows)
        for i in range(w.shape[0]):
            for g in range(0, w.shape[1], 4):
                best = sorted(range(4), key=lambda j: -float(scores[i, g + j]))[:2]
                assert {j for j in range(4) if masks[name][i, g + j]} == set(best), (name, i, g)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"nm": (2, 4), "group": "tensor"}, "needs group='row'"), ({"nm": 4}, "pair")]
)
def test_wanda_nm_refuses_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Wanda(**kwargs)
