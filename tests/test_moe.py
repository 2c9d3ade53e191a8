"""Mixture-of-Experts models: fused expert tensors ``(experts, out, in)`` are E matrices, each pruned to its own
target; routers are left out and named; Wanda reads the tokens routed to each expert; N:M and ``ln_structured``
work per expert; MACs count routed tokens; files round-trip. Oracles are written here from the definitions."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import expected_zeros
from torch import nn

from lightning_prune import (
    NMPruning,
    PruningScheduleCallback,
    Wanda,
    describe_selection,
    load_sparse,
    prune_once,
    register_matrix_layer,
    save_sparse,
    select_parameters,
    sparsity_report,
)

transformers = pytest.importorskip("transformers")
VOCAB = 64


def _mixtral(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config).eval()


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (2, 12), generator=g) for _ in range(n)]


class StackedExperts(nn.Module):
    """A fused experts layer of a user's own, stored (experts, in, out), declared with register_matrix_layer."""

    def __init__(self, experts: int = 3, n_in: int = 8, n_out: int = 6) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ni,eio->no", x, self.w)


def test_moe_local_target_is_exact_for_each_expert() -> None:
    model = _mixtral()
    prune_once(model, 0.3)
    for layer in model.model.layers:
        for tensor in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            for expert in tensor:
                assert int((expert == 0).sum()) == expected_zeros(0.3, expert.numel())
        assert int((layer.mlp.gate.weight == 0).sum()) == 0  # the router is left dense


def test_moe_global_threshold_spans_experts_and_other_matrices() -> None:
    model = _mixtral()
    targets = select_parameters(model)
    values = torch.cat([t.tensor.detach().abs().flatten() for t in targets])
    prune_once(model, 0.6, scope="global")
    threshold = values.sort().values[expected_zeros(0.6, values.numel()) - 1]
    for t in targets:  # one threshold: every zero at or below it, every survivor at or above it
        w = t.tensor.detach()
        assert bool((w[w != 0].abs() >= threshold).all()), t.name
    assert sum(int((t.tensor == 0).sum()) for t in targets) == expected_zeros(0.6, values.numel())


def test_moe_summary_names_routers_and_every_tensor_left_out() -> None:
    model = _mixtral()
    summary = describe_selection(model, select_parameters(model))
    assert dict(summary.left_out) == {
        "model.embed_tokens.weight": "embedding",
        "model.layers.0.mlp.gate.weight": "router",
        "model.layers.1.mlp.gate.weight": "router",
    }
    assert "model.layers.*.mlp.gate.weight (router, 2 tensors)" in str(summary)
    assert "model.layers.0.mlp.experts.gate_up_proj" in summary.chosen


def test_moe_router_named_in_parameters_is_pruned() -> None:
    model = _mixtral()
    prune_once(model, 0.5, parameters=["model.layers.*.mlp.gate.weight"])
    router = model.model.layers[0].mlp.gate.weight
    assert int((router == 0).sum()) == expected_zeros(0.5, router.numel())
    assert int((model.model.layers[0].mlp.experts.down_proj == 0).sum()) == 0


def test_exclude_keeps_named_tensors_dense_everywhere() -> None:
    model = _mixtral()
    masks = prune_once(model, 0.5, exclude=["lm_head", "model.layers.0.*"])
    assert not any(n.startswith(("lm_head", "model.layers.0.")) for n in masks)
    assert "model.layers.1.mlp.experts.down_proj" in masks
    assert int((model.lm_head.weight == 0).sum()) == 0
    callback = PruningScheduleCallback(0.5, exclude=["net.0"])
    assert callback.exclude == ("net.0",)
    with pytest.raises(ValueError, match="`exclude` entry 'nothing.here' matches no chosen tensor"):
        select_parameters(model, exclude=["nothing.here"])
    with pytest.raises(ValueError, match="`exclude` must be a list of names or glob patterns"):
        PruningScheduleCallback(0.5, exclude="lm_head")


def _routed(model: nn.Module, batches: list[torch.Tensor]) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """For each layer, the (hidden states, top-k expert indices) its experts module was called with."""
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):

        def hook(module: nn.Module, args: tuple[Any, ...], i: int = i) -> None:
            seen.setdefault(i, []).append((args[0].detach().clone(), args[1].detach().clone()))

        handles.append(layer.mlp.experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return seen


def _row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = expected_zeros(sparsity, scores.shape[1])
    lowest = scores.sort(dim=1, stable=True).indices[:, :k]
    return torch.ones_like(scores, dtype=torch.uint8).scatter_(1, lowest, 0)


def test_wanda_scores_each_expert_by_the_tokens_routed_to_it() -> None:
    model, batches = _mixtral(), _batches()
    experts = model.model.layers[0].mlp.experts
    weight = experts.gate_up_proj.detach().clone()
    hidden, index = (torch.cat(parts) for parts in zip(*_routed(model, batches)[0]))
    prune_once(model, 0.5, method=Wanda(calibration_batches=3), dataloader=batches, parameters=["*.0.mlp.experts.*"])
    for e in range(4):
        tokens = (index == e).any(-1)
        rms = hidden[tokens].square().mean(0).sqrt()  # only the tokens the router sent to expert e
        expected = _row_mask(weight[e].abs() * rms, 0.5)
        assert torch.equal((experts.gate_up_proj[e] != 0).to(torch.uint8), expected), e


def test_wanda_expert_without_tokens_falls_back_to_magnitude_and_says_so() -> None:
    model, batches = _mixtral(), _batches()
    router = model.model.layers[0].mlp.gate

    def never_three(module: nn.Module, args: Any, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        logits, scores, index = out
        return logits, scores, torch.where(index == 3, torch.zeros_like(index), index)

    router.register_forward_hook(never_three)
    experts = model.model.layers[0].mlp.experts
    idle = experts.down_proj[3].detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_once(model, 0.5, method=Wanda(calibration_batches=3), dataloader=batches)
    messages = [str(w.message) for w in caught]
    assert any("experts [3] saw no token" in m and "layers.0.mlp.experts.down_proj" in m for m in messages)
    assert torch.equal((experts.down_proj[3] != 0).to(torch.uint8), _row_mask(idle.abs(), 0.5))


def test_nm_and_ln_structured_work_per_expert() -> None:
    model = _mixtral()
    prune_once(model, 0.0, method=NMPruning(2, 4))
    for expert in model.model.layers[1].mlp.experts.down_proj:  # groups of 4 along each expert's input dim
        assert bool(((expert.reshape(expert.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
    model = _mixtral()
    prune_once(model, 0.25, method="ln_structured")
    for expert in model.model.layers[1].mlp.experts.gate_up_proj:  # whole output rows, 25% of each expert's
        rows = (expert == 0).all(1)
        assert int(rows.sum()) == expected_zeros(0.25, expert.shape[0])


def test_registered_stacked_layer_is_selected_and_pruned_per_expert() -> None:
    handle = register_matrix_layer(StackedExperts, "w", layout="experts_in_out")
    try:
        torch.manual_seed(0)
        net = nn.Sequential(StackedExperts(), nn.ReLU(), nn.Linear(6, 2))
        targets = select_parameters(net)
        assert [(t.name, t.layout) for t in targets] == [("0.w", "experts_in_out"), ("2.weight", "out_in")]
        prune_once(net, 0.25, method="ln_structured")
        for expert in net[0].w:  # stored (in, out): an output unit is a column of each expert
            assert int((expert == 0).all(0).sum()) == expected_zeros(0.25, 6)
    finally:
        handle.remove()


def test_macs_count_each_token_once_per_expert_it_is_routed_to() -> None:
    model, x = _mixtral(), torch.randint(1, VOCAB, (1, 10))
    size = sparsity_report(model, example_inputs=x).size
    attention = 32 * 32 * 2 + 32 * 16 * 2  # q, o: 32x32; k, v: 16x32 (2 key-value heads of 8)
    experts = 2 * (96 * 32 + 32 * 48)  # top-2 of 4 experts: gate_up (96x32) and down (32x48) each
    assert size.macs_dense == 10 * 2 * (attention + experts) + 10 * VOCAB * 32


def test_save_sparse_round_trips_expert_tensors(tmp_path: Any) -> None:
    model = _mixtral()
    prune_once(model, 0.7)
    path = tmp_path / "moe.safetensors"
    save_sparse(model, path)
    loaded = load_sparse(path)
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    fresh = _mixtral(seed=5)
    fresh.load_state_dict(loaded, strict=True)
    x = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)
    assert F.mse_loss(fresh.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj) == 0


def test_sparse_checkpoint_io_round_trips_expert_tensors(tmp_path: Any) -> None:
    from lightning_prune import SparseCheckpointIO

    model = _mixtral()
    prune_once(model, 0.8)
    io = SparseCheckpointIO()
    path = tmp_path / "moe.ckpt"
    io.save_checkpoint({"state_dict": model.state_dict()}, path)
    loaded = io.load_checkpoint(path)["state_dict"]
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    dense = tmp_path / "dense.ckpt"
    torch.save({"state_dict": model.state_dict()}, dense)
    assert path.stat().st_size < 0.5 * dense.stat().st_size  # the expert tensors were written sparse


def _tiny(name: str) -> nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(num_key_value_heads=2, pad_token_id=0)),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(head_dim=8)),
        "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM, dict(state_size=4)),
        "gpt_oss": (
            transformers.GptOssConfig,
            transformers.GptOssForCausalLM,
            dict(num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
        ),
        "deepseek_v3": (
            transformers.DeepseekV3Config,
            transformers.DeepseekV3ForCausalLM,
            dict(
                n_routed_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=24,
                first_k_dense_replace=1,
                n_group=1,
                topk_group=1,
                q_lora_rank=16,
                kv_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
            ),
        ),  # fmt: skip
    }
    config_cls, model_cls, extra = configs[name]
    kwargs = {**common, **extra}
    if name == "mamba":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("intermediate_size", "num_attention_heads")}
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs))


@pytest.mark.parametrize("name", ["phi3", "gemma3", "mamba", "gpt_oss", "deepseek_v3"])
def test_default_selection_leaves_dense_only_embeddings_routers_and_non_matrices(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _tiny(name)
    targets = select_parameters(model)
    summary = describe_selection(model, targets)
    reasons = set(summary.left_out.values())
    assert reasons <= {"embedding", "embedding, tied to lm_head.weight", "router", "bias, not a matrix"} | (
        {"not a matrix layer's weight"} if name == "mamba" else set()  # Mamba's A_log: the state decay, no product
    ), summary.left_out
    chosen = {t.name for t in targets}
    for qual, p in model.named_parameters():  # every Linear weight and every fused expert tensor is chosen
        module = model.get_submodule(qual.rpartition(".")[0])
        if (isinstance(module, nn.Linear) and qual.endswith(".weight") and qual not in summary.left_out) or (
            p.dim() == 3 and type(module).__name__.endswith("Experts")
        ):
            assert qual in chosen, qual
    if name in ("gpt_oss", "deepseek_v3"):
        assert any(t.layout in ("experts_out_in", "experts_in_out") for t in targets)
        assert "router" in reasons
    if name == "gpt_oss":  # stored (experts, in, out): GPT-OSS's experts say is_transposed
        assert {t.layout for t in targets if t.tensor.dim() == 3} == {"experts_in_out"}


def test_sparsegpt_reconstructs_each_expert_from_the_tokens_routed_to_it() -> None:
    from lightning_prune import SparseGPT
    from lightning_prune.methods.sparsegpt_solver import sparsegpt_solve

    model, batches = _mixtral(), _batches()
    experts = model.model.layers[0].mlp.experts
    weight = experts.gate_up_proj.detach().clone()
    hidden, index = (torch.cat(parts) for parts in zip(*_routed(model, batches)[0]))
    prune_once(
        model, 0.5, method=SparseGPT(calibration_batches=3), dataloader=batches, parameters=["*.0.*gate_up_proj"]
    )
    for e in range(4):
        x = hidden[(index == e).any(-1)].double()  # only the tokens the router sent to expert e
        hessian = (2.0 / x.shape[0]) * x.T @ x
        expected, keep = sparsegpt_solve(weight[e], hessian.float(), 0.5)
        pruned = experts.gate_up_proj[e].detach()
        assert torch.equal(pruned != 0, keep.bool()), e
        torch.testing.assert_close(pruned, expected * keep, rtol=1e-4, atol=1e-5)
        assert ((pruned == 0).sum(1) == 16).all()  # half of each of the expert's rows
        magnitude = weight[e] * _row_mask(weight[e].abs(), 0.5)  # the same budget, no update
        error = (x.float() @ (pruned - weight[e]).T).square().mean()
        assert error < (x.float() @ (magnitude - weight[e]).T).square().mean(), e


def test_sparsegpt_expert_without_tokens_is_pruned_by_magnitude_and_says_so() -> None:
    from lightning_prune import SparseGPT

    model, batches = _mixtral(), _batches()

    def never_three(module: nn.Module, args: Any, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        logits, scores, index = out
        return logits, scores, torch.where(index == 3, torch.zeros_like(index), index)

    model.model.layers[0].mlp.gate.register_forward_hook(never_three)
    experts = model.model.layers[0].mlp.experts
    idle = experts.down_proj[3].detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_once(
            model, 0.5, method=SparseGPT(calibration_batches=3), dataloader=batches, parameters=["*.0.*down_proj"]
        )
    assert any("experts [3]" in str(w.message) and "no token was routed" in str(w.message) for w in caught)
    torch.testing.assert_close(experts.down_proj[3].detach(), idle * _row_mask(idle.abs(), 0.5))
