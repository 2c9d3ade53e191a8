"""``to_sparse_inference``: converted layers of every kind against the dense ones (exact up to float32 summation
order), the per-layer fallback, inference-only errors, saving, the path from a sparse file, the model left untouched
and a GPT-2 that generates the same tokens. ``min_speedup=0`` forces every layer that is sparse enough into a
sparse form, so no test depends on timing; ``min_speedup`` too large to reach forces every layer to stay dense."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_prune import load_sparse, save_sparse, to_sparse_inference
from lightning_prune.inference import SparseInferenceReport, SparseLinear, SparseMultiheadAttention, inference_report

ROOT = Path(__file__).resolve().parent.parent
TOL = {"rtol": 1e-5, "atol": 1e-5}


def prune_randomly_(weight: Tensor, sparsity: float, seed: int = 0) -> None:
    """Zero exactly ``round(sparsity * n)`` entries of ``weight``, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(weight.numel(), generator=g)[: round(sparsity * weight.numel())]
    with torch.no_grad():
        weight.view(-1)[order] = 0.0


def prune_blocks_(weight: Tensor, block: int, sparsity: float, seed: int = 0) -> None:
    """Zero whole ``block x block`` blocks of a 2-D ``weight``, ``round(sparsity * blocks)`` of them."""
    rows, cols = weight.shape[0] // block, weight.shape[1] // block
    keep = torch.ones(rows * cols)
    prune_randomly_(keep, sparsity, seed)
    mask = keep.view(rows, 1, cols, 1).expand(rows, block, cols, block).reshape(weight.shape)
    with torch.no_grad():
        weight.mul_(mask)


def prune_all_(model: nn.Module, sparsity: float) -> None:
    for i, p in enumerate(model.parameters()):
        if p.dim() >= 2:
            prune_randomly_(p, sparsity, seed=i)


def forced(model: nn.Module, example: Any, **kwargs: Any) -> nn.Module:
    """Every layer sparse enough in a sparse form (no timing decides), one timed run."""
    return to_sparse_inference(model, example, **{"min_speedup": 0, "repeats": 1, **kwargs})


def run(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model(*args, **kwargs)


def forms(model: nn.Module) -> dict[str, str]:
    return {layer.name: layer.form for layer in inference_report(model).layers}


# ---------------------------------------------------------------------------------------------- linear layers


@pytest.mark.parametrize("shape", [(16,), (5, 16), (2, 3, 16), (1, 1, 16)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("form", ["csr", "bsr4", "bsr8"])
def test_linear_equals_dense(shape: tuple[int, ...], bias: bool, form: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32, bias=bias), nn.ReLU(), nn.Linear(32, 8, bias=bias)).eval()
    for layer in (net[0], net[2]):
        prune_blocks_(layer.weight, 8, 0.75) if form != "csr" else prune_randomly_(layer.weight, 0.8)
    x = torch.randn(shape)
    fast = forced(net, x, forms=(form,))
    assert [type(m) for m in fast] == [SparseLinear, nn.ReLU, SparseLinear]
    assert forms(fast) == {"0": form, "2": form}
    for y in (x, torch.randn(shape)):  # the inputs it was measured on, and others of the same shape
        out = run(fast, y)
        assert out.shape == run(net, y).shape and out.is_contiguous()
        torch.testing.assert_close(out, run(net, y), **TOL)


def test_linear_takes_other_batch_sizes_than_measured() -> None:
    torch.manual_seed(0)
    net = nn.Linear(64, 48).eval()
    prune_randomly_(net.weight, 0.9)
    fast = forced(net, torch.randn(1, 64))
    assert isinstance(fast, SparseLinear)  # the model was itself one layer
    for x in (torch.randn(64), torch.randn(1, 64), torch.randn(7, 64), torch.randn(3, 5, 64), torch.randn(0, 64)):
        torch.testing.assert_close(run(fast, x), run(net, x), **TOL)


def test_random_zeros_are_not_stored_as_blocks() -> None:
    torch.manual_seed(0)
    net = nn.Linear(64, 64).eval()
    prune_randomly_(net.weight, 0.9)  # nearly every 8x8 block holds a nonzero
    fast = forced(net, torch.randn(2, 64), forms=("bsr8",))
    assert isinstance(fast, nn.Linear) and not isinstance(fast, SparseLinear)
    assert inference_report(fast).layers[0].note.startswith("no sparse form ran")


def test_hugging_face_conv1d_equals_dense() -> None:
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D
    torch.manual_seed(0)
    net = nn.Sequential(conv1d(24, 16), nn.GELU(), conv1d(16, 24)).eval()  # Conv1D(nf=out, nx=in), weight (in, out)
    prune_all_(net, 0.85)
    x = torch.randn(2, 5, 16)
    fast = forced(net, x)
    assert isinstance(fast[0], SparseLinear) and isinstance(fast[2], SparseLinear)
    assert inference_report(fast).layers[0].shape == (24, 16)  # reported (out, in)
    torch.testing.assert_close(run(fast, x), run(net, x), **TOL)
    torch.testing.assert_close(run(fast, x[0, 0]), run(net, x[0, 0]), **TOL)


# ---------------------------------------------------------------------------------------------- 1x1 convolutions


@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_conv_equals_dense_and_other_convs_stay(batch: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),  # 3x3: not eligible
        nn.Conv2d(16, 32, 1),  # pointwise
        nn.ReLU(),
        nn.Conv2d(32, 32, 1, stride=2),  # strided: not eligible
        nn.Conv2d(32, 32, 1, groups=2),  # grouped: not eligible
        nn.Conv2d(32, 8, 1, bias=False),  # pointwise
    ).eval()
    prune_all_(net, 0.8)
    x = torch.randn(batch, 8, 6, 5)
    fast = forced(net, x)
    assert [type(m).__name__ for m in fast] == [
        "Conv2d",
        "SparsePointwiseConv2d",
        "ReLU",
        "Conv2d",
        "Conv2d",
        "SparsePointwiseConv2d",
    ]
    assert list(forms(fast)) == ["1", "5"]
    torch.testing.assert_close(run(fast, x), run(net, x), **TOL)
    torch.testing.assert_close(run(fast, x[0]), run(net, x[0]), **TOL)  # unbatched
    channels_last = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(run(fast, channels_last), run(net, channels_last), **TOL)


# ---------------------------------------------------------------------------------------------- attention


def attention_calls(bf: bool, cross_dim: int | None) -> list[tuple[tuple[Tensor, ...], dict[str, Any]]]:
    """Calls of an attention layer (embed 16, 4 heads) with every argument that changes what it computes."""
    torch.manual_seed(1)
    n, t, s, e = 3, 5, 7, 16

    def seq(length: int, dim: int = e) -> Tensor:
        return torch.randn((n, length, dim) if bf else (length, n, dim))

    padding = torch.zeros(n, s, dtype=torch.bool)
    padding[0, -2:] = padding[2, -1] = True
    causal = nn.Transformer.generate_square_subsequent_mask(t)
    if cross_dim is not None:  # kdim/vdim: separate projection weights, keys and values of another width
        k, v = seq(s, cross_dim), seq(s, cross_dim)
        return [
            ((seq(t), k, v), {}),
            ((seq(t), k, v), {"key_padding_mask": padding, "need_weights": False}),
            ((seq(t), k, v), {"attn_mask": torch.rand(t, s) < 0.3, "average_attn_weights": False}),
            ((seq(t)[:, 0] if bf else seq(t)[:, 0], k[:, 0] if bf else k[:, 0], v[:, 0] if bf else v[:, 0]), {}),
        ]
    x, m = seq(t), seq(s)
    unbatched = x[0] if bf else x[:, 0]
    self_padding = torch.zeros(n, t, dtype=torch.bool)
    self_padding[1, -1] = True
    return [
        ((x, x, x), {}),
        ((x, x, x), {"need_weights": False}),
        ((x, x, x), {"average_attn_weights": False}),
        ((x, x, x), {"attn_mask": causal, "is_causal": True, "need_weights": False}),
        ((x, x, x), {"attn_mask": causal, "is_causal": True}),
        ((x, x, x), {"attn_mask": causal > 0, "key_padding_mask": self_padding, "need_weights": False}),
        ((x, x, x), {"attn_mask": torch.randn(n * 4, t, t)}),
        ((unbatched, unbatched, unbatched), {"need_weights": False}),
        ((x, m, m), {"key_padding_mask": padding}),
        ((x, m, m), {"key_padding_mask": padding.float() * -1e4, "need_weights": False}),
        ((x, m, seq(s)), {"attn_mask": torch.rand(t, s) < 0.2, "need_weights": False}),
    ]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "options",
    [{}, {"bias": False}, {"add_bias_kv": True, "add_zero_attn": True}, {"kdim": 12, "vdim": 12}],
    ids=["plain", "no-bias", "bias-kv-zero-attn", "kdim-vdim"],
)
def test_attention_equals_dense(batch_first: bool, options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first, **options).eval()
    prune_all_(attention, 0.8)
    calls = attention_calls(batch_first, options.get("kdim"))
    fast = forced(attention, calls[0][0])
    assert isinstance(fast, SparseMultiheadAttention)
    packed = "kdim" not in options
    assert list(forms(fast)) == (["in_proj"] if packed else ["q_proj", "k_proj", "v_proj"]) + ["out_proj"]
    assert set(forms(fast).values()) == {"csr"}
    for args, kwargs in calls:
        expected, got = run(attention, *args, **kwargs), run(fast, *args, **kwargs)
        for e, g in zip(expected, got):
            assert (e is None) == (g is None), kwargs
            if e is not None:
                torch.testing.assert_close(g, e, **TOL, msg=lambda m, kw=kwargs: f"{kw}: {m}")


def test_attention_with_one_sparse_projection_keeps_the_others_dense() -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    prune_randomly_(attention.out_proj.weight, 0.9)  # in_proj has no zeros
    x = torch.randn(2, 5, 16)
    fast = forced(attention, (x, x, x))
    assert forms(fast) == {"in_proj": "dense", "out_proj": "csr"}
    assert type(fast.projections["in_proj"]) is nn.Linear and isinstance(fast.out_proj, SparseLinear)
    torch.testing.assert_close(run(fast, x, x, x)[0], run(attention, x, x, x)[0], **TOL)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_takes_its_ordinary_path_around_sparse_layers() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    for name, p in encoder.named_parameters():  # every matrix of the first layer, one Linear of the second
        if p.dim() == 2 and (name.startswith("layers.0.") or name.startswith("layers.1.linear1")):
            prune_randomly_(p, 0.9)
    x = torch.randn(2, 6, 16)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True
    fast = forced(encoder, x)
    assert isinstance(fast.layers[0].self_attn, SparseMultiheadAttention)
    assert type(fast.layers[1].self_attn) is nn.MultiheadAttention and isinstance(fast.layers[1].linear1, SparseLinear)
    torch.testing.assert_close(run(fast, x), run(encoder, x), **TOL)
    # with a padding mask the dense encoder takes its nested-tensor path, whose padded positions are zeros
    dense, sparse = run(encoder, x, src_key_padding_mask=padding), run(fast, x, src_key_padding_mask=padding)
    torch.testing.assert_close(sparse[~padding], dense[~padding], **TOL)


# ---------------------------------------------------------------------------------------------- choices


def test_layers_without_zeros_stay_dense() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    prune_randomly_(net[2].weight, 0.9)
    prune_randomly_(net[4].weight, 0.3)
    fast = forced(net, torch.randn(2, 32), min_sparsity=0.5)
    assert [type(m).__name__ for m in fast] == ["Linear", "ReLU", "SparseLinear", "ReLU", "Linear"]
    report = inference_report(fast)
    assert [(c.form, c.sparsity) for c in report.layers] == [("dense", 0), ("csr", 922 / 1024), ("dense", 38 / 128)]
    assert report.layers[0].note == report.layers[2].note == "sparsity below min_sparsity 0.5"
    assert report.layers[0].dense_seconds is None  # not timed
    everything = forced(net, torch.randn(2, 32), min_sparsity=0, forms=("csr",))  # a layer without zeros never is
    assert [c.form for c in inference_report(everything).layers] == ["dense", "csr", "csr"]


def test_a_margin_too_large_keeps_every_layer_dense_with_its_timings() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    prune_all_(net, 0.9)
    x = torch.randn(3, 32)
    fast = to_sparse_inference(net, x, min_speedup=1e9, repeats=1)
    assert [type(m) for m in fast] == [nn.Linear, nn.ReLU, nn.Linear]
    for c in inference_report(fast).layers:
        assert c.form == "dense" and c.fastest_sparse == "csr" and c.dense_seconds > 0 and c.sparse_seconds > 0
        assert c.note.endswith("< min_speedup 1e+09")
    torch.testing.assert_close(run(fast, x), run(net, x), rtol=0, atol=0)


def test_layers_the_example_does_not_run_stay_dense() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    net = TwoHeads().eval()
    prune_all_(net, 0.9)
    fast = forced(net, torch.randn(2, 8))
    assert forms(fast) == {"used": "csr", "unused": "dense"}
    assert inference_report(fast).layers[1].note == "not run by example_inputs"


def test_a_layer_used_twice_is_replaced_everywhere() -> None:
    shared = nn.Linear(16, 16)
    net = nn.Sequential(shared, nn.Tanh(), shared).eval()
    prune_all_(net, 0.9)
    x = torch.randn(4, 16)
    fast = forced(net, x)
    assert isinstance(fast[0], SparseLinear) and fast[0] is fast[2]
    assert len(inference_report(fast).layers) == 1
    torch.testing.assert_close(run(fast, x), run(net, x), **TOL)


def test_bfloat16_layers_stay_dense_where_torch_has_no_sparse_kernel() -> None:
    try:
        w = torch.eye(4, dtype=torch.bfloat16).to_sparse_csr()
        torch.addmm(torch.zeros(4, 1, dtype=torch.bfloat16), w, torch.ones(4, 1, dtype=torch.bfloat16))
        kernel = True
    except (RuntimeError, NotImplementedError):
        kernel = False
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    prune_all_(net, 0.9)
    net = net.to(torch.bfloat16)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    fast = forced(net, x, forms=("csr",))
    for c in inference_report(fast).layers:
        if kernel:
            assert c.form == "csr"
        else:
            assert c.form == "dense" and c.note.startswith("no sparse form ran: csr:") and "BFloat16" in c.note
    torch.testing.assert_close(run(fast, x), run(net, x), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------- report


def test_report_table_dict_and_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    prune_randomly_(net[0].weight, 0.9)
    fast = forced(net, torch.randn(2, 32), verbose=True)
    report = inference_report(fast)
    assert isinstance(report, SparseInferenceReport)
    printed = capsys.readouterr().out
    assert printed.strip() == str(report)
    assert "64x32" in printed and "end to end on example_inputs" in printed and "1 of 2 matrices sparse" in printed
    d = report.to_dict()
    assert d["layers"][0]["name"] == "0" and d["layers"][0]["shape"] == [64, 32] and d["layers"][0]["form"] == "csr"
    assert d["speedup"] == report.speedup and d["threads"] == torch.get_num_threads() and d["min_speedup"] == 0
    assert d["sparse_bytes"] < d["dense_bytes"]
    with pytest.raises(ValueError, match="not made by to_sparse_inference"):
        inference_report(net)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_speedup": -1}, r"`min_speedup` must be in \[0, inf\]"),
        ({"min_sparsity": 1.5}, r"`min_sparsity` must be in \[0, 1\]"),
        ({"forms": ()}, r"`forms` must be a non-empty list"),
        ({"forms": "csr"}, r"`forms` must be a non-empty list"),
        ({"forms": ("coo",)}, r"`forms` must be one of \['csr', 'bsr4'"),
        ({"repeats": 0}, r"`repeats` must be an integer >= 1"),
        ({"example_inputs": None}, r"`example_inputs` is required"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], match: str) -> None:
    arguments = {"example_inputs": torch.randn(1, 4), **kwargs}
    with pytest.raises(ValueError, match=match):
        to_sparse_inference(nn.Linear(4, 4), arguments.pop("example_inputs"), **arguments)


# ---------------------------------------------------------------------------------------------- inference only


def test_training_mode_and_autograd_raise_saying_what_to_do() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    prune_all_(net, 0.9)
    x = torch.randn(2, 16)
    fast = forced(net.train(), x)  # a model in training mode: the copy is put in eval mode
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    fast(x)  # autograd on, but nothing requires grad
    with pytest.raises(RuntimeError, match=r"requires grad: run it under torch.no_grad\(\).*use the dense model"):
        fast(x.clone().requires_grad_())
    with torch.no_grad():
        fast(x.clone().requires_grad_())
    fast.train()
    with pytest.raises(RuntimeError, match=r"inference only and is in training mode: call \.eval\(\)"):
        run(fast, x)
    attention = nn.MultiheadAttention(8, 2).eval()
    prune_all_(attention, 0.9)
    q = torch.randn(3, 1, 8)
    fast_attention = forced(attention, (q, q, q)).train()
    with pytest.raises(RuntimeError, match="training mode"):
        run(fast_attention, q, q, q)


class Every(nn.Module):
    """A layer of each kind."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(self.attention(x, x, x, need_weights=False)[0])  # (n, t, 8)
        return self.conv(y.transpose(1, 2).unsqueeze(-1))


def test_torch_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = Every().eval()
    prune_all_(dense, 0.9)
    x = torch.randn(2, 5, 32)
    fast = forced(dense, x, forms=("csr", "bsr4"))
    path = tmp_path / "fast.pt"
    torch.save(fast, path)
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(run(loaded, x), run(fast, x))
    assert inference_report(loaded) == inference_report(fast)
    assert path.stat().st_size < len(_saved(dense))  # the report's pickle weighs on so small a model
    assert inference_report(fast).sparse_bytes < 0.5 * inference_report(fast).dense_bytes
    copied = copy.deepcopy(fast)
    assert torch.equal(run(copied, x), run(fast, x))
    torch.testing.assert_close(run(loaded, x), run(dense, x), **TOL)


def _saved(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def test_from_a_sparse_file_through_load_sparse(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    prune_all_(trained, 0.95)
    path = tmp_path / "model.safetensors"
    save_sparse(trained, path)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))  # the documented path
    model.load_state_dict(load_sparse(path))
    fast = forced(model.eval(), torch.randn(1, 64))
    assert forms(fast) == {"0": "csr", "2": "csr"}
    x = torch.randn(4, 64)
    torch.testing.assert_close(run(fast, x), run(trained.eval(), x), **TOL)


def test_the_model_argument_is_left_untouched() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 4)).train()
    prune_all_(model, 0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m), m.training) for n, m in model.named_modules()]
    grads = [p.requires_grad for p in model.parameters()]
    fast = forced(model, torch.randn(2, 5, 16))
    assert any(isinstance(m, SparseLinear) for m in fast.modules())
    assert [(n, type(m), m.training) for n, m in model.named_modules()] == modules
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert model[0].layers[0].activation_relu_or_gelu == 1 and torch.backends.mha.get_fastpath_enabled()


# ---------------------------------------------------------------------------------------------- GPT-2


def test_gpt2_generates_the_same_tokens() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64)
    lm = transformers.GPT2LMHeadModel(config).eval()
    for name, p in lm.named_parameters():
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            prune_randomly_(p, 0.8)
    prompt = torch.randint(0, 97, (1, 8))
    fast = forced(lm, {"input_ids": prompt})
    sparse = {c.name for c in inference_report(fast).layers if c.form != "dense"}
    assert sparse == {
        f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert inference_report(fast).layers[-1].name == "lm_head"  # tied to the embedding, no zeros: dense
    with torch.no_grad():
        expected = lm.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        got = fast.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(fast(prompt).logits, lm(prompt).logits, **TOL)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_benchmark_smoke_run() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/sparse_inference.py", "--smoke", "--out-dir", ""],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "x |" in done.stdout and "smoke" in done.stdout


# ---------------------------------------------------------------------------------------------- registry, experts


class InOutLinear(nn.Module):
    """A layer of the user's own: ``y = x @ w + b``, ``w`` stored ``(in, out)``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w + self.bias


class Squared(InOutLinear):
    """Registered too, but not a linear map of its input: its sparse form would differ."""

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.w) ** 2


def test_a_registered_layer_is_converted_like_the_built_in_ones() -> None:
    from lightning_prune import register_matrix_layer

    handles = [register_matrix_layer(InOutLinear, "w", layout="in_out")]
    try:
        torch.manual_seed(0)
        net = nn.Sequential(InOutLinear(32, 48), nn.ReLU(), Squared(48, 8)).eval()
        prune_all_(net, 0.9)
        x = torch.randn(3, 5, 32)
        fast = forced(net, x)
        report = inference_report(fast)
        assert isinstance(fast[0], SparseLinear) and type(fast[2]) is Squared
        assert [(c.name, c.kind, c.shape, c.form) for c in report.layers] == [
            ("0", "InOutLinear", (48, 32), "csr"),
            ("2", "InOutLinear", (8, 48), "dense"),
        ]
        assert report.layers[1].note == "no sparse form ran: csr: results differ from the dense layer's"
        torch.testing.assert_close(run(fast, x), run(net, x), **TOL)
        torch.testing.assert_close(run(fast, x[0, 0]), run(net, x[0, 0]), **TOL)
    finally:
        for handle in handles:
            handle.remove()
    assert [c.form for c in inference_report(forced(net, x)).layers] == []  # unregistered: not a matrix layer


def test_mixtral_experts_stay_dense_and_the_report_says_so() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.MixtralForCausalLM(config).eval()
    for name, p in lm.named_parameters():
        if p.dim() >= 2 and "embed" not in name:
            prune_randomly_(p, 0.9)
    ids = torch.randint(0, 64, (1, 6))
    fast = forced(lm, {"input_ids": ids})
    report = inference_report(fast)
    experts = [c for c in report.layers if c.kind == "experts"]
    assert [c.name for c in experts] == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    ]
    assert all(c.form == "dense" and c.note == "experts kept dense: no measured kernel (4 experts)" for c in experts)
    assert experts[0].shape == (96, 32) and experts[0].sparsity == pytest.approx(0.9, abs=1e-3)
    sparse = {c.name for c in report.sparse_layers}
    assert "model.layers.0.self_attn.q_proj" in sparse and not any("experts" in n or "gate" in n for n in sparse)
    assert fast.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 96, 32)
    torch.testing.assert_close(run(fast, ids).logits, run(lm, ids).logits, **TOL)
    assert "experts kept dense: no measured kernel" in str(report)


class StackedExperts(nn.Module):
    """A fused layer of the user's own: one ``(in, out)`` matrix per expert in ``w`` ``(experts, in, out)``; every
    token goes to expert 0 (enough to be called by the example)."""

    def __init__(self, experts: int, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, n_in, n_out) / n_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w[0]


def test_experts_rows_follow_the_layer_table_not_the_class_name() -> None:
    from lightning_prune import register_matrix_layer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), StackedExperts(3, 32, 8)).eval()
    prune_all_(net, 0.9)
    x = torch.randn(4, 16)
    unknown = inference_report(forced(net, x))  # a 3-D parameter that the table does not know: no experts row
    assert [(c.name, c.kind) for c in unknown.layers] == [("0", "Linear")]
    handle = register_matrix_layer(StackedExperts, "w", layout="experts_in_out")
    try:
        fast = forced(net, x)
    finally:
        handle.remove()
    report = inference_report(fast)
    assert [(c.name, c.kind, c.shape, c.form) for c in report.layers] == [
        ("0", "Linear", (32, 16), "csr"),
        ("1.w", "experts", (8, 32), "dense"),  # one expert's (out, in), read through the stacked layout
    ]
    assert report.layers[1].note == "experts kept dense: no measured kernel (3 experts)"
    assert report.layers[1].sparsity == pytest.approx(0.9, abs=1e-3)
    assert fast[1].w.shape == (3, 32, 8) and torch.equal(fast[1].w, net[1].w)
    torch.testing.assert_close(run(fast, x), run(net, x), **TOL)
