"""The first phase of :func:`~lightning_prune.to_sparse_inference`: which layers may be converted, and what the
example gives each of them.

Eligible layers are read from the table of :mod:`lightning_prune.layers`: ``nn.Linear`` (any leading dimensions),
Hugging Face's ``Conv1D``, ``nn.MultiheadAttention``'s projections, 1x1 ``nn.Conv2d`` (stride 1, no padding, one
group), and every layer declared with :func:`~lightning_prune.register_matrix_layer` whose one 2-D weight is
multiplied over the last dimension of its input (tried as a linear layer; where its outputs differ, it stays
dense and the report says why). A Mixture-of-Experts layer's fused expert tensors (a stacked layout of the table,
such as transformers' ``MixtralExperts.gate_up_proj``, ``(experts, out, in)``) stay dense: there is no measured
sparse kernel for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_prune.inference.layers import Form, SparseLinear, SparsePointwiseConv2d, project_in, seq_first
from lightning_prune.inference.report import LayerChoice
from lightning_prune.layers import Layout, is_stacked, layout_of, matrix_layer, to_out_in

__all__ = ["Matrix", "call", "capture", "eligible", "expert_rows", "matrices"]

MAX_CALLS = 4  # captured calls per layer and example (a layer used several times in one forward)
_NOT_LINEAR = (nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)


@dataclass
class Matrix:
    """One weight matrix to decide: how to build its sparse module, how to run the captured calls on a module,
    and how to make an input of any number of rows for timing."""

    name: str
    kind: str
    param: str  # the qualified parameter name (for speed plans)
    weight: Tensor  # (out, in)
    bias: Tensor | None
    dense: nn.Module
    build: Callable[[Tensor, Tensor | None, Form], SparseLinear | SparsePointwiseConv2d]
    runs: Sequence[Callable[[nn.Module], Any]]
    rows: list[int] = field(default_factory=list)  # input vectors of each captured call
    row_block: int | None = None  # BSR blocks must divide it (a packed projection is sliced at its multiples)

    def probe(self, rows: int) -> Tensor:
        """A random input of ``rows`` vectors for this matrix's modules (a 1x1 convolution's: ``(1, in, rows, 1)``)."""
        w = self.weight
        shape = (1, w.shape[1], rows, 1) if self.kind == "Conv2d 1x1" else (rows, w.shape[1])
        return torch.randn(shape, dtype=w.dtype, device=w.device)


def _is_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.groups == 1
    )


def _registered_weight(module: nn.Module) -> tuple[str, Layout] | None:
    """``(parameter, layout)`` of a layer of the table that is not a built-in kind: one 2-D matrix weight."""
    if isinstance(module, _NOT_LINEAR):
        return None
    found = []
    for param, tensor in module.named_parameters(recurse=False):
        entry = matrix_layer(module, param)
        if entry is not None and tensor.dim() == 2:
            found.append((param, entry.layout))
    return found[0] if len(found) == 1 else None


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.MultiheadAttention):
        return "MultiheadAttention"
    if isinstance(module, nn.Linear):
        return "Linear"
    if _is_pointwise(module):
        return "Conv2d 1x1"
    weight = _registered_weight(module)
    if weight is None:
        return None
    entry = matrix_layer(module, weight[0])
    return "Conv1D" if entry is not None and entry.label == "Conv1D" else entry.label if entry else None


def eligible(model: nn.Module) -> dict[nn.Module, tuple[str, str]]:
    """``{module: (name, kind)}`` of the layers that may be converted, in model order."""
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    found: dict[nn.Module, tuple[str, str]] = {}
    for name, module in model.named_modules():
        if id(module) in inside_attention:
            continue  # attention's out_proj is decided with its attention layer, which reads its weight
        kind = _kind(module)
        if kind is not None:
            found[module] = (name, kind)
    return found


def expert_rows(model: nn.Module) -> list[LayerChoice]:
    """A dense row for each fused expert tensor (a parameter whose layout in the table of
    :mod:`lightning_prune.layers` is stacked: ``"experts_out_in"``/``"experts_in_out"``), with one expert's
    ``(out, in)``: kept dense, no measured kernel."""
    rows = []
    for name, module in model.named_modules():
        for param, tensor in module.named_parameters(recurse=False):
            layout = layout_of(module, param)
            if not is_stacked(layout):
                continue
            experts, n_out, n_in = to_out_in(tensor, layout).shape
            sparsity = float((tensor == 0).sum()) / max(tensor.numel(), 1)
            note = f"experts kept dense: no measured kernel ({experts} experts)"
            label = f"{name}.{param}" if name else param
            rows.append(LayerChoice(label, "experts", (n_out, n_in), sparsity, "dense", note=note))
    return rows


def _detached(value: Any, memo: dict[int, Tensor]) -> Any:
    """A copy of a tensor argument (one copy per tensor: an attention layer's ``query is key`` stays true)."""
    if not isinstance(value, Tensor):
        return value
    if id(value) not in memo:
        memo[id(value)] = value.detach().clone()
    return memo[id(value)]


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a dict as keyword inputs, a tuple or list as positional ones."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def capture(model: nn.Module, layers: dict[nn.Module, Any], *examples: Any) -> dict[nn.Module, list]:
    """The ``(args, kwargs)`` of the first calls of each layer in one forward pass on each of ``examples`` (with
    torch's fused attention paths off, so that every attention layer's own ``forward`` runs)."""
    calls: dict[nn.Module, list] = {m: [] for m in layers}
    taken: dict[nn.Module, int] = {}  # calls taken in the current forward pass

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if taken.get(module, 0) < MAX_CALLS:
            taken[module] = taken.get(module, 0) + 1
            memo: dict[int, Tensor] = {}
            copied = tuple(_detached(a, memo) for a in args), {k: _detached(v, memo) for k, v in kwargs.items()}
            calls[module].append(copied)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            for example in examples:
                taken.clear()
                call(model, example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for handle in handles:
            handle.remove()
    return calls


def _first(x: Tensor) -> Tensor:
    """The first sample of a batched input (a leading dimension above 2-D), the input itself otherwise."""
    return x[:1] if x.dim() >= 3 and x.shape[0] > 1 else x


def _dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are ``weight`` and ``bias`` themselves (no copy)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return layer


def _run_on(x: Tensor) -> Callable[[nn.Module], Any]:
    """A captured call: the module (dense or sparse) called on ``x``."""
    return lambda m: m(x)


def _linear_matrices(name: str, module: nn.Module, kind: str, calls: list) -> list[Matrix]:
    inputs = [args[0] if args else kwargs.get("input", kwargs.get("x")) for args, kwargs in calls]
    inputs = [x for x in inputs if isinstance(x, Tensor) and not x.is_nested]
    runs = [_run_on(x) for x in map(_first, inputs)]  # checked on the first sample; timed at any rows
    prefix = f"{name}." if name else ""
    if kind == "Conv2d 1x1":
        conv = cast(nn.Conv2d, module)  # the kind says so (_is_pointwise)
        rows = [x.numel() // x.shape[-3] for x in inputs]
        return [Matrix(name, kind, prefix + "weight", conv.weight[:, :, 0, 0], conv.bias, module,
                       SparsePointwiseConv2d, runs, rows)]  # fmt: skip
    found: tuple[str, Layout] | None = ("weight", "out_in") if kind == "Linear" else _registered_weight(module)
    param, layout = found or ("weight", "in_out")
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, Tensor) and bias.dim() == 1 else None
    weight = to_out_in(getattr(module, param), layout)
    rows = [x.numel() // max(x.shape[-1], 1) if x.dim() else 0 for x in inputs]
    return [Matrix(name, kind, prefix + param, weight, bias, module, SparseLinear, runs, rows)]


def _attention_matrices(name: str, module: nn.MultiheadAttention, calls: list) -> list[Matrix]:
    e, prefix = module.embed_dim, f"{name}." if name else ""
    qkv, out_inputs, g = [], [], torch.Generator(module.out_proj.weight.device).manual_seed(0)
    rows: list[int] = []
    in_rows: list[int] = []
    part_rows: list[list[int]] = []
    for args, kwargs in calls:
        named = dict(zip(("query", "key", "value"), args)) | kwargs
        q, k, v = (named.get(n) for n in ("query", "key", "value"))
        if all(isinstance(x, Tensor) and not x.is_nested for x in (q, k, v)):
            q, k, v = seq_first(q, k, v, module.batch_first)
            rows.append(q.shape[0] * q.shape[1])
            in_rows.append(sum(t.shape[0] * t.shape[1] for t in dict.fromkeys((q, k, v))))  # a product per tensor
            part_rows.append([t.shape[0] * t.shape[1] for t in (q, k, v)])
            first = {id(t): t[:, :1] for t in (q, k, v)}  # the first sample only, ``query is key`` kept
            qkv.append((first[id(q)], first[id(k)], first[id(v)]))
            out_inputs.append(torch.randn(q.shape[0], e, generator=g, device=q.device).to(q.dtype))
    kind, bias = "MultiheadAttention", module.in_proj_bias
    if module._qkv_same_embed_dim:

        def packed(x: tuple[Tensor, Tensor, Tensor]) -> Callable[[nn.Module], Any]:
            return lambda m: project_in({"in_proj": m}, *x, e)

        dense = _dense_linear(module.in_proj_weight, bias)
        runs, param = [packed(x) for x in qkv], prefix + "in_proj_weight"
        weight = module.in_proj_weight
        matrices = [Matrix(prefix + "in_proj", kind, param, weight, bias, dense, SparseLinear, runs, in_rows, e)]
    else:
        biases = (None, None, None) if bias is None else bias.chunk(3)
        matrices = []
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            weight = getattr(module, f"{part}_weight")
            runs = [_run_on(x[i]) for x in qkv]
            dense = _dense_linear(weight, biases[i])
            param, counts = f"{prefix}{part}_weight", [r[i] for r in part_rows]
            matrices.append(Matrix(prefix + part, kind, param, weight, biases[i], dense, SparseLinear, runs, counts))
    out = module.out_proj
    runs = [_run_on(x) for x in out_inputs]
    param = prefix + "out_proj.weight"
    matrices.append(Matrix(prefix + "out_proj", kind, param, out.weight, out.bias, out, SparseLinear, runs, rows))
    return matrices


def matrices(name: str, module: nn.Module, kind: str, calls: list) -> list[Matrix]:
    """The weight matrices of one eligible layer (an attention layer's projections each on its own)."""
    if kind == "MultiheadAttention":
        return _attention_matrices(name, cast(nn.MultiheadAttention, module), calls)  # the kind says so
    return _linear_matrices(name, module, kind, calls)
