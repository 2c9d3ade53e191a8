"""Distillation from the dense model (issue 29): the teacher frozen and untouched, the KL term in the loss, logged
and in the gradients, outputs as tuples and ``.logits``, refusals before training."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune import Polynomial, PruningScheduleCallback
from lightning_prune.distillation import Distillation, distillation_loss, logits_of
from tests.helpers import TinyModule, TinyNet, make_trainer, random_loader, zeros


class Snapshot(pl.Callback):
    """The model's weights at the end of each epoch (copies)."""

    def __init__(self) -> None:
        self.at_end: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.at_end[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


class Grads(pl.Callback):
    """The gradients of the first optimizer step, and the batch that made them."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.batch: Any = None
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.batch is None:
            self.batch = batch
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


class TupleModule(TinyModule):
    """A model whose forward returns ``(logits, aux)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(x), x.mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x)[0], y)


class LogitsModule(TinyModule):
    """A model whose forward returns a Hugging Face output (``.logits``)."""

    def forward(self, x: torch.Tensor) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.model(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).logits, y)


class SubmoduleStep(TinyModule):
    """A training_step that calls ``self.model(x)``, not ``self(x)`` (as LitLeNet's)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)


def _fit(module: pl.LightningModule, callbacks: list, max_epochs: int = 3, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(callbacks, max_epochs=max_epochs, **kwargs)
    trainer.fit(module, random_loader(), random_loader(16))
    return trainer


def test_distillation_teacher_is_the_dense_model_at_the_ramp_frozen_and_untouched() -> None:
    pruning = PruningScheduleCallback(0.8, scope="global", schedule=Polynomial(1, 3), verbose=False)
    distill, snapshot = Distillation(module="model"), Snapshot()
    module = SubmoduleStep()
    _fit(module, [pruning, distill, snapshot], max_epochs=4)
    teacher = distill.teacher
    assert teacher is not None and teacher is not module.model
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    before_ramp = snapshot.at_end[0]  # the weights when epoch 1 (the ramp's first) starts
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before_ramp[name]), name
    assert sum(zeros(p) for p in teacher.parameters()) == 0  # dense
    assert sum(zeros(t.tensor) for t in pruning.targets) > 0  # while the student is pruned
    assert not torch.equal(module.model.fc1.weight, teacher.fc1.weight)


def test_distillation_term_is_finite_logged_and_training_step_restored() -> None:
    pruning = PruningScheduleCallback(0.5, scope="global", schedule=Polynomial(1, 2), verbose=False)
    distill = Distillation(temperature=2.0)
    module = TinyModule()
    trainer = _fit(module, [pruning, distill], max_epochs=3)
    logged = trainer.callback_metrics["pruning/distill_loss"]
    assert math.isfinite(float(logged)) and float(logged) > 0.0
    assert distill.last_loss is not None and distill.last_loss > 0.0
    assert "training_step" not in module.__dict__  # the wrapper is gone
    assert not module._forward_hooks and not module._forward_hooks_with_kwargs


@pytest.mark.parametrize("hardness", [1.0, 0.25])
def test_distillation_gradient_is_the_mixed_loss_gradient(hardness: float) -> None:
    torch.manual_seed(1)
    teacher = TinyNet()
    module = SubmoduleStep()
    grads = Grads()
    distill = Distillation(temperature=3.0, hardness=hardness, teacher=teacher, start=0, module="model")
    _fit(module, [distill, grads], max_epochs=1, limit_train_batches=1)

    plain, plain_grads = SubmoduleStep(), Grads()  # the same start, without distillation
    _fit(plain, [plain_grads], max_epochs=1, limit_train_batches=1)

    oracle = SubmoduleStep()  # the oracle: the mixed loss, by hand, on the same batch and weights
    oracle.load_state_dict(grads.weights)
    x, y = grads.batch
    out = oracle.model(x)
    with torch.no_grad():
        t = teacher(x)
    kl = F.kl_div(F.log_softmax(out / 3.0, -1), F.log_softmax(t / 3.0, -1), log_target=True, reduction="batchmean")
    loss = (1 - hardness) * F.cross_entropy(out, y) + hardness * 9.0 * kl
    loss.backward()
    for name, p in oracle.named_parameters():
        assert torch.allclose(grads.grads[name], p.grad, atol=1e-6), name
    assert any(not torch.allclose(grads.grads[n], g) for n, g in plain_grads.grads.items())
    assert all(p.grad is None for p in teacher.parameters()) and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("module_cls", [TupleModule, LogitsModule])
def test_distillation_reads_tuples_and_logits(module_cls: type) -> None:
    torch.manual_seed(5)
    teacher = module_cls()  # another initialization, of the same output kind
    distill = Distillation(start=0, teacher=teacher)
    trainer = _fit(module_cls(), [distill], max_epochs=1, limit_val_batches=0)
    logged = float(trainer.callback_metrics["pruning/distill_loss"])
    assert math.isfinite(logged) and logged > 1e-4


def test_logits_of_every_output_kind() -> None:
    from transformers.modeling_outputs import CausalLMOutput

    x = torch.randn(2, 3)
    assert logits_of(x) is x and logits_of((x, 1)) is x and logits_of([x]) is x
    assert logits_of({"logits": x}) is x and logits_of(CausalLMOutput(logits=x)) is x
    with pytest.raises(TypeError, match="needs logits"):
        logits_of("text")


def test_distillation_loss_matches_the_definition() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4, 5, 7), torch.randn(4, 5, 7)  # (batch, positions, classes)
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    oracle = 4.0 * (p * (p.log() - q.log())).sum() / 20
    assert torch.allclose(distillation_loss(s, t, 2.0), oracle, atol=1e-6)


def test_distillation_warns_when_the_module_is_not_called() -> None:
    with pytest.warns(UserWarning, match="saw no forward of the distilled module"):
        _fit(SubmoduleStep(), [Distillation(start=0)], max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "`temperature` must be in"),
        ({"hardness": 1.5}, "`hardness` must be in"),
        ({"start": -1}, "`start` must be an integer >= 0"),
        ({"teacher": "bert"}, "`teacher` must be an nn.Module"),
        ({"module": 3}, "`module` must be"),
    ],
)
def test_distillation_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Distillation(**kwargs)


def test_distillation_refuses_a_ramp_without_pruning_and_a_missing_module() -> None:
    with pytest.raises(ValueError, match="no PruningScheduleCallback"):
        _fit(TinyModule(), [Distillation()], max_epochs=1)
    with pytest.raises(ValueError, match="no such submodule"):
        _fit(TinyModule(), [Distillation(start=0, module="encoder")], max_epochs=1)


def test_distillation_refuses_fsdp2_before_training() -> None:
    from pytorch_lightning.strategies import ModelParallelStrategy

    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), callbacks=[])
    with pytest.raises(ValueError, match="does not support `strategy=ModelParallelStrategy`"):
        Distillation(start=0).setup(trainer, TinyModule(), "fit")


def test_distillation_teacher_survives_a_checkpoint(tmp_path: Any) -> None:
    pruning = PruningScheduleCallback(0.5, scope="global", schedule=Polynomial(1, 2), verbose=False)
    distill = Distillation()
    _fit(TinyModule(), [pruning, distill], max_epochs=3)
    state = distill.state_dict()
    again = Distillation()
    again.load_state_dict(state)
    module = TinyModule()
    again._student = module
    again.on_train_start(SimpleNamespace(current_epoch=2), module)
    again._release()
    assert again.teacher is not None
    for name, value in distill.teacher.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(again.teacher.state_dict()[name], value)


def test_distillation_leaves_a_model_without_hooks_in_the_teacher() -> None:
    module = TinyModule()
    module.model.fc1.register_forward_hook(lambda m, a, o: None)
    teacher = Distillation._copy(module.model, object())
    assert not teacher.fc1._forward_hooks and module.model.fc1._forward_hooks
    assert isinstance(teacher, nn.Module)


@pytest.mark.slow
def test_distillation_and_rewarm_under_ddp(tmp_path: Any) -> None:
    """2 gloo processes: the same teacher on both ranks, the term finite on both, the ranks' weights equal, the
    rate re-warmed at the pruning steps on both."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(here / "distill_ddp_script.py"), str(tmp_path)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the DDP run did not finish in 300 s")
    assert process.returncode == 0, output.decode()[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    for key in ("teacher", "weights"):
        assert rank0[key].keys() == rank1[key].keys()
        assert all(torch.equal(rank0[key][k], rank1[key][k]) for k in rank0[key]), key
    assert all(math.isfinite(r["distill_loss"]) and r["distill_loss"] > 0 for r in (rank0, rank1))
    assert rank0["rates"] == rank1["rates"] and max(rank0["rates"]) > min(rank0["rates"])  # re-warmed
    assert sum(zeros(v) for k, v in rank0["weights"].items() if k.endswith("weight")) > 0
