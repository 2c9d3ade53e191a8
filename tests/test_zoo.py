"""The default selection on the models people train, built from their own constructors with random weights
(torchvision, timm, Hugging Face transformers; nothing downloaded): every matrix weight pruned to the target,
embeddings and the tensors tied to them left alone, ties kept, the trained weights and the Trainer's checkpoint
strict into fresh instances with identical outputs. Also Wanda and 2:4 on GPT-2 and LLaMA, and neuron pruning on
the torchvision CNNs."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import expected_zeros
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import NeuronPruning, NMPruning, PruningScheduleCallback, Wanda, compact

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow

VOCAB, SEQ, IMAGE = 128, 16, 32


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _llama(tied: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=SEQ,
            tie_word_embeddings=tied,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return transformers.LlamaForCausalLM(config)

    return build


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=SEQ,
    )
    return transformers.BertForMaskedLM(config)


def _t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(config)


def _mixtral() -> nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=SEQ,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


def _qwen3_moe() -> nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(config)


VISION: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
    "vit_b_16": lambda: torchvision.models.vit_b_16(image_size=IMAGE, num_classes=10),
    "timm_deit_tiny": lambda: timm.create_model("deit_tiny_patch16_224", img_size=IMAGE, num_classes=10),
    "timm_convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=10),
}
TEXT: dict[str, Callable[[], nn.Module]] = {
    "gpt2": _gpt2,
    "bert_mlm": _bert,
    "llama_tied": _llama(True),
    "llama_untied": _llama(False),
    "t5": _t5,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
}
MOE = ("mixtral", "qwen3_moe")
BUILDERS = {**VISION, **TEXT}


class ZooModule(pl.LightningModule):
    """A plain LightningModule around one zoo model (nothing of lightning_prune in it)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(1)
        self.model = BUILDERS[name]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def outputs(self, batch: Any) -> torch.Tensor:
        x, y = batch
        if self.hparams.name in VISION:
            return self.model(x)
        if self.hparams.name == "t5":
            return self.model(input_ids=x, decoder_input_ids=y).logits
        return self.model(input_ids=x).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.hparams.name in VISION:
            return F.cross_entropy(self.model(x), y)
        return self.model(input_ids=x, labels=y).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _image(name: str) -> int:
    return 64 if name == "efficientnet_b0" else IMAGE  # at 32 pixels its eval-mode outputs are NaN, pruned or not


def _loader(name: str, n: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if name in VISION:
        size = _image(name)
        data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
    else:
        ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        data = TensorDataset(ids, ids)
    return DataLoader(data, batch_size=2)


def _expected_matrices(model: nn.Module) -> set[str]:
    """Written here from the model's modules: the weight of every Linear, Conv1d/2d/3d and Hugging Face Conv1D, and
    attention's input projections, except tensors that are an embedding's table."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    found: dict[int, str] = {}
    for name, m in model.named_modules():
        if type(m).__name__.endswith("Router") or (name.endswith(".gate") and "Moe" in type(m).__name__):
            continue  # a Mixture-of-Experts router scores experts: left out
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or type(m).__name__ == "Conv1D":
            names = ["weight"]
        elif type(m).__name__.endswith("Experts"):  # fused (experts, out, in) tensors
            names = ["gate_up_proj", "down_proj"]
        elif isinstance(m, nn.MultiheadAttention):
            names = ["in_proj_weight"] if m.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight"]
            names += [] if m.in_proj_weight is not None else ["v_proj_weight"]
        else:
            continue
        for p in names:
            tensor = getattr(m, p)
            if id(tensor) not in tables:
                found.setdefault(id(tensor), f"{name}.{p}")
    return set(found.values())


class _MaskCounts(pl.Callback):
    """Placed before the pruning callback: at the end of training, reads its masks (before they are dropped)."""

    def __init__(self, pruning: PruningScheduleCallback) -> None:
        self.pruning = pruning
        self.masks: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.masks = {t.name: m.detach().clone() for t, m in self.pruning.masks.items()}


def _fit(name: str, callback: PruningScheduleCallback, steps: int = 2) -> tuple[ZooModule, pl.Trainer, _MaskCounts]:
    module = ZooModule(name)
    counts = _MaskCounts(callback)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        callbacks=[counts, callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader(name))
    return module, trainer, counts


def _embeddings(model: nn.Module) -> dict[str, int]:
    """Zeros of every embedding table (a padding row may be zero from the start)."""
    return {n: int((m.weight == 0).sum()) for n, m in model.named_modules() if isinstance(m, nn.Embedding)}


def _ties(model: nn.Module) -> list[tuple[str, ...]]:
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return sorted(tuple(v) for v in names.values() if len(v) > 1)


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_zoo_default_selection_prunes_every_matrix_weight(name: str, scope: str, tmp_path: Any) -> None:
    fresh = ZooModule(name)
    embeddings_before, ties_before = _embeddings(fresh), _ties(fresh)
    callback = PruningScheduleCallback(sparsity=0.5, scope=scope, verbose=False)
    module, trainer, counts = _fit(name, callback)

    chosen = {t.name for t in callback.targets}
    assert chosen == _expected_matrices(module)
    assert set(counts.masks) == chosen
    sizes = {t.name: t.tensor.numel() for t in callback.targets}
    pruned = {n: int((m == 0).sum()) for n, m in counts.masks.items()}
    if scope == "local":
        assert all(abs(pruned[n] - expected_zeros(0.5, sizes[n])) <= 1 for n in chosen)
        for n in chosen & {t.name for t in callback.targets if t.tensor.dim() == 3}:  # each expert to the target
            per_expert = counts.masks[n].flatten(1)
            assert ((per_expert == 0).sum(1) == expected_zeros(0.5, per_expert.shape[1])).all(), n
    else:
        assert sum(pruned.values()) == expected_zeros(0.5, sum(sizes.values()))
        assert all(pruned[n] > 0 for n in chosen)
    weights = dict(module.named_parameters())
    for n, mask in counts.masks.items():  # the zeros are in the weights the model uses
        assert bool((weights[n][mask == 0] == 0).all()), n
    tables = {f"{n}.weight" for n in embeddings_before}
    assert not chosen & tables and not set(counts.masks) & tables
    after = _embeddings(module)  # no entry pruned: no more zeros than at the start (a padding row may train)
    assert all(after[n] <= embeddings_before[n] for n in after)
    assert _ties(module) == ties_before
    left = dict(callback.selection.left_out)
    if name in MOE:  # routers left out, named as routers, and untouched
        routers = {n for n, why in left.items() if why == "router"}
        assert routers == {f"model.model.layers.{i}.mlp.gate.weight" for i in range(2)}
        assert all(int((weights[r] == 0).sum()) == 0 for r in routers)
        assert any(t.tensor.dim() == 3 for t in callback.targets)
    params = dict(module.named_parameters(remove_duplicate=False))
    for tie in ties_before:  # a tied table is reported with what it is tied to (a tied bias is no matrix)
        assert params[tie[0]].dim() < 2 or any(n in left and "tied to" in left[n] for n in tie)

    batch = next(iter(_loader(name)))
    module.eval()
    with torch.no_grad():
        expected = module.outputs(batch)
        plain = ZooModule(name)
        plain.model.load_state_dict(module.model.state_dict(), strict=True)
        assert torch.equal(plain.eval().outputs(batch), expected)
        path = tmp_path / "zoo.ckpt"
        trainer.save_checkpoint(path)
        restored = ZooModule.load_from_checkpoint(path, strict=True, map_location="cpu")
        assert torch.equal(restored.eval().outputs(batch), expected)


def _rows(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """Output rows of a 2-D weight: ``weight`` for (out, in), its transpose for Hugging Face's (in, out)."""
    return weight.t() if layout == "in_out" else weight


@pytest.mark.parametrize("name", ["gpt2", "llama_tied", "mixtral", "qwen3_moe"])
def test_zoo_wanda_keeps_half_of_every_output_row(name: str) -> None:
    callback = PruningScheduleCallback(sparsity=0.5, method=Wanda(calibration_batches=1), verbose=False)
    module, _, counts = _fit(name, callback, steps=3)
    assert {t.name for t in callback.targets} == _expected_matrices(module)
    for t in callback.targets:
        rows = _rows(counts.masks[t.name], "in_out" if "Conv1D" in type(t.module).__name__ else "out_in")
        rows = rows.reshape(-1, rows.shape[-1])  # an experts tensor (experts, out, in): every expert's rows
        assert bool(((rows == 0).sum(1) == rows.shape[1] // 2).all()), t.name


@pytest.mark.parametrize("name", ["gpt2", "llama_untied", "mixtral"])
def test_zoo_two_four_along_the_input_dimension(name: str) -> None:
    from lightning_prune.schedules import OneShot

    callback = PruningScheduleCallback(method=NMPruning(2, 4), schedule=OneShot(epoch=0), verbose=False)
    module, _, counts = _fit(name, callback)
    weights = dict(module.named_parameters())
    for t in callback.targets:
        # the input dimension, written out here: dim 0 of a Conv1D weight, dim 1 of a Linear weight
        by_input = weights[t.name].detach().t() if type(t.module).__name__ == "Conv1D" else weights[t.name].detach()
        groups = by_input.reshape(-1, by_input.shape[-1] // 4, 4)  # experts (E, out, in): the last dim is input
        assert bool(((groups != 0).sum(-1) <= 2).all()), t.name
        assert int((counts.masks[t.name] == 0).sum()) == t.tensor.numel() // 2


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_zoo_neuron_pruning_on_torchvision_cnns(name: str) -> None:
    example = torch.randn(1, 3, _image(name), _image(name))
    method = NeuronPruning(example_inputs=example)
    callback = PruningScheduleCallback(sparsity=0.25, method=method, scope="global", verbose=False)
    module, _, _ = _fit(name, callback)
    total = sum(g.size for g in method.groups)
    assert total > 0
    model = module.model.eval()
    compacted = copy.deepcopy(model)
    widths = compact(compacted, example)
    removed = sum(before - after for before, after in widths.values())
    assert removed == expected_zeros(0.25, total)  # every pruned neuron is all zeros, and goes
    x = next(iter(_loader(name)))[0]
    with torch.no_grad():
        torch.testing.assert_close(compacted(x), model(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in compacted.parameters()) < sum(p.numel() for p in model.parameters())
