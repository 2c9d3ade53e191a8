"""The inference-only layers that :func:`~lightning_prune.to_sparse_inference` puts in place of dense ones.

Each holds its weight as an ``(out, in)`` sparse matrix in torch's compressed layouts (``"csr"``, or ``"bsr<b>"``
with ``b x b`` blocks), with 32-bit indices wherever they fit (torch's CPU kernels call MKL, which takes 32-bit
indices as they are and converts 64-bit ones on every call). The matrix is kept as three plain buffers
(``crow_indices``, ``col_indices``, ``values``) beside a dense ``bias``, so that the module pickles, deep-copies
and moves like any other; the sparse tensor over them is built on first use and cached.

* :class:`SparseLinear` replaces ``nn.Linear`` and Hugging Face's ``Conv1D``: ``y = x @ W.T + b`` over the last
  dimension of ``x``, any leading dimensions;
* :class:`SparsePointwiseConv2d` replaces a 1x1 ``nn.Conv2d`` with stride 1, no padding and one group;
* :class:`SparseMultiheadAttention` replaces ``nn.MultiheadAttention``: its projections are dense or sparse layers
  and its forward is torch's ordinary path (``F.multi_head_attention_forward``) around them.

They compute ``W @ x.T`` (the sparse matrix on the left, which is what torch's CPU kernels are fast at) and return
contiguous outputs, as the dense layers do. Inference only: in training mode, or when an input requires gradients
with autograd on, they raise a ``RuntimeError`` that says what to do.

**Row counts.** A sparse kernel pays up to some number of input vectors (rows: tokens times batch, or pixels for a
1x1 convolution) and loses to the dense kernel beyond it. :meth:`~_SparseMatrix.serve_rows` gives a layer the range
of row counts in which it uses its sparse matrix; outside it, the layer multiplies by a dense copy of its weight,
kept (as the buffer ``fallback``) only when the range is bounded. :func:`~lightning_prune.to_sparse_inference`
sets the range from its measurements.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BLOCKS",
    "Form",
    "SparseLinear",
    "SparseMultiheadAttention",
    "SparsePointwiseConv2d",
    "compress",
    "project_in",
    "seq_first",
]

Form = Literal["csr", "bsr4", "bsr8", "bsr16", "bsr32"]
BLOCKS: dict[str, int | None] = {"csr": None, "bsr4": 4, "bsr8": 8, "bsr16": 16, "bsr32": 32}
_INT32_MAX = 2**31 - 1


def compress(weight: Tensor, form: Form) -> tuple[Tensor, Tensor, Tensor]:
    """``(crow_indices, col_indices, values)`` of the ``(out, in)`` matrix ``weight`` in ``form``; the indices are
    ``int32`` unless a count exceeds it. Entries equal to zero (``-0.0`` too) are dropped."""
    block = BLOCKS[form]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        w = weight.detach().contiguous()
        s = w.to_sparse_csr() if block is None else w.to_sparse_bsr((block, block))
        crow, col, values = s.crow_indices(), s.col_indices(), s.values()
        if max(*w.shape, values.numel()) <= _INT32_MAX:
            crow, col = crow.to(torch.int32), col.to(torch.int32)
        return crow.contiguous(), col.contiguous(), values.contiguous().clone()


def _check_inference(module: nn.Module, *inputs: Tensor | None) -> None:
    name = type(module).__name__
    if module.training:
        raise RuntimeError(
            f"{name} (made by to_sparse_inference) is for inference only and is in training mode: call .eval() on "
            "the converted model; to train or fine-tune, use the dense model and convert it again afterwards."
        )
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        raise RuntimeError(
            f"{name} (made by to_sparse_inference) has no gradients, and its input requires grad: run it under "
            "torch.no_grad() or torch.inference_mode() with inputs that do not require grad; for gradients, use the "
            "dense model."
        )


class _SparseMatrix(nn.Module):
    """The shared part: the compressed ``(out, in)`` weight as buffers, the dense bias, the cached matrix."""

    crow_indices: Tensor  # buffers, registered in __init__
    col_indices: Tensor
    values: Tensor
    bias: Tensor | None
    fallback: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None, form: Form) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"`weight` must be an (out, in) matrix, got shape {tuple(weight.shape)}.")
        crow, col, values = compress(weight, form)
        self.out_features, self.in_features = weight.shape
        self.form: Form = form
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("fallback", None)
        self.min_rows, self.max_rows = 0, None
        self._cache: dict[tuple[int, int], Tensor] = {}

    min_rows: int = 0  # class defaults: modules pickled by 0.3 have neither attribute
    max_rows: int | None = None

    def serve_rows(self, min_rows: int = 0, max_rows: int | None = None) -> None:
        """Use the sparse matrix for ``min_rows <= rows <= max_rows`` input vectors (``None``: no upper bound) and a
        dense copy of the weight (made here, kept as the buffer ``fallback``) for the others."""
        if min_rows < 0 or (max_rows is not None and max_rows < max(min_rows, 1)):
            raise ValueError(f"need 0 <= `min_rows` <= `max_rows`, got {min_rows} and {max_rows}.")
        self.min_rows, self.max_rows = int(min_rows), max_rows
        if min_rows == 0 and max_rows is None:
            self.fallback = None
        elif self.fallback is None:
            self.fallback = self.dense_weight().contiguous()

    def sparse_for(self, rows: int) -> bool:
        """Whether ``rows`` input vectors are multiplied by the sparse matrix (else by ``fallback``)."""
        if self.fallback is None:
            return True
        return self.min_rows <= rows and (self.max_rows is None or rows <= self.max_rows)

    def _fallback_for(self, rows: int) -> Tensor | None:
        """The dense copy that multiplies ``rows`` input vectors, or ``None`` where the sparse matrix does."""
        return None if self.sparse_for(rows) else self.fallback

    def __setstate__(self, state: dict[str, Any]) -> None:  # a module pickled by 0.3 has no fallback buffer
        super().__setstate__(state)
        self._buffers.setdefault("fallback", None)

    @property
    def nnz(self) -> int:
        """Stored values (for ``"bsr<b>"`` whole blocks, zeros inside a block included)."""
        return self.values.numel()

    def _compressed(self, start: int, stop: int) -> Tensor:
        """The sparse tensor over rows ``start:stop`` of the buffers (views, no copy of the values), cached."""
        key = (start, stop)
        if key not in self._cache:
            block = BLOCKS[self.form] or 1
            crow = self.crow_indices[start // block : stop // block + 1]
            lo, hi = int(crow[0]), int(crow[-1])
            self._cache[key] = torch.sparse_compressed_tensor(
                crow - lo if lo else crow,
                self.col_indices[lo:hi],
                self.values[lo:hi],
                (stop - start, self.in_features),
                layout=torch.sparse_csr if BLOCKS[self.form] is None else torch.sparse_bsr,
                check_invariants=False,
            )
        return self._cache[key]

    def matrix(self) -> Tensor:
        """The weight as a sparse ``(out, in)`` tensor (sharing the buffers' memory)."""
        return self._compressed(0, self.out_features)

    def dense_weight(self) -> Tensor:
        """The weight as a dense ``(out, in)`` tensor (a copy)."""
        return self.matrix().to_dense()

    def _product(self, columns: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """``W[start:stop] @ columns + b[start:stop, None]``: ``(rows, n)`` from ``columns`` ``(in, n)``."""
        stop = self.out_features if stop is None else stop
        matrix, bias = self._compressed(start, stop), None if self.bias is None else self.bias[start:stop]
        if columns.shape[1] == 1:  # a matrix-vector product: torch's kernel for it is 2-3x faster on one column
            vector = columns[:, 0]
            return (torch.mv(matrix, vector) if bias is None else torch.addmv(bias, matrix, vector)).unsqueeze(1)
        return torch.mm(matrix, columns) if bias is None else torch.addmm(bias[:, None], matrix, columns)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(), .half(), ...: the buffers are new tensors
        self._cache = {}
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # pickled and deep-copied without the cached sparse tensors
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def extra_repr(self) -> str:
        rows = "" if self.fallback is None else f", sparse rows {self.min_rows}..{self.max_rows or 'any'}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"form={self.form!r}, nnz={self.nnz}{rows}"
        )


class SparseLinear(_SparseMatrix):
    """``y = x @ W.T + b`` with a sparse ``W``: in place of ``nn.Linear`` (``weight`` as it is) and Hugging Face's
    ``Conv1D`` (its ``(in, out)`` weight transposed). ``x``: ``(..., in)``; ``y``: ``(..., out)``, contiguous."""

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(self, x)
        return self.rows(x, 0, self.out_features)

    def rows(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Output features ``start:stop`` only (an attention layer's packed projection, one part of it)."""
        flat = x.reshape(-1, self.in_features)
        fallback = self._fallback_for(flat.shape[0])
        if fallback is not None:
            bias = None if self.bias is None else self.bias[start:stop]
            return F.linear(x, fallback[start:stop], bias)
        if flat.shape[0] == 1:
            return self._product(flat.t(), start, stop).view(*x.shape[:-1], stop - start)
        product = torch.mm(self._compressed(start, stop), flat.t())  # (rows, n): transposed into y below
        y = torch.empty(flat.shape[0], stop - start, dtype=product.dtype, device=product.device)
        if self.bias is None:
            y.copy_(product.t())
        else:  # the bias added in the same pass as the transposition
            torch.add(product.t(), self.bias[start:stop], out=y)
        return y.view(*x.shape[:-1], stop - start)


class SparsePointwiseConv2d(_SparseMatrix):
    """A 1x1 convolution (stride 1, no padding, one group) with a sparse ``(out, in)`` weight: in place of such an
    ``nn.Conv2d``. ``x``: ``(N, C, H, W)`` or ``(C, H, W)``; the output has the dense layer's shape, contiguous."""

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(self, x)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n, c, h, w = x.shape
        fallback = self._fallback_for(n * h * w)
        if fallback is not None:
            y = F.conv2d(x, fallback[:, :, None, None], self.bias)
            return y.squeeze(0) if unbatched else y
        columns = x.reshape(c, h * w) if n == 1 else x.transpose(0, 1).reshape(c, n * h * w)
        y = self._product(columns).view(self.out_features, n, h, w).transpose(0, 1).contiguous()
        return y.squeeze(0) if unbatched else y


def _project(layer: nn.Module, x: Tensor, start: int | None = None, stop: int | None = None) -> Tensor:
    """``layer(x)``, or only its output features ``start:stop``; ``layer``: ``nn.Linear`` or :class:`SparseLinear`."""
    if start is None or stop is None:
        return layer(x)
    if isinstance(layer, SparseLinear):
        return layer.rows(x, start, stop)
    dense = cast(nn.Linear, layer)  # the other kind of projection
    bias = None if dense.bias is None else dense.bias[start:stop]
    return F.linear(x, dense.weight[start:stop], bias)


def project_in(
    projections: Mapping[str, nn.Module] | nn.ModuleDict, query: Tensor, key: Tensor, value: Tensor, embed_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v``: the input projections of an attention layer, as torch computes them: one packed product when
    ``query is key is value`` (self-attention), the query and a packed key-value product when ``key is value``,
    else three; ``projections`` holds ``in_proj`` (packed, ``3E x E``) or ``q_proj``, ``k_proj``, ``v_proj``."""
    if "in_proj" not in projections:
        return projections["q_proj"](query), projections["k_proj"](key), projections["v_proj"](value)
    packed, e = projections["in_proj"], embed_dim
    if key is value and query is key:  # views of one product (reshaped by the caller, copied only where needed)
        q, k, v = _project(packed, query).chunk(3, dim=-1)
        return q, k, v
    if key is value:
        q = _project(packed, query, 0, e)
        k, v = _project(packed, key, e, 3 * e).chunk(2, dim=-1)
        return q, k, v
    return _project(packed, query, 0, e), _project(packed, key, e, 2 * e), _project(packed, value, 2 * e, 3 * e)


def seq_first(query: Tensor, key: Tensor, value: Tensor, batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, N, E)`` views of an attention layer's inputs (``batch_first`` ones transposed, unbatched ones given a
    batch of one), keeping which of them are the same tensor (that decides how they are projected)."""
    if query.dim() == 3 and not batch_first:
        return query, key, value
    change = (lambda x: x.transpose(1, 0)) if query.dim() == 3 else (lambda x: x.unsqueeze(1))
    q = change(query)
    k = q if key is query else change(key)
    v = k if value is key else (q if value is query else change(value))
    return q, k, v


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask as an additive float mask (``-inf`` where ``True``), as ``nn.MultiheadAttention`` does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


class SparseMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` for inference with some projections sparse: the same arguments, masks,
    ``batch_first``, ``need_weights``/``average_attn_weights``, ``is_causal``, ``bias_k``/``bias_v``,
    ``add_zero_attn`` and ``kdim``/``vdim``, and the same results within float32 summation tolerance.

    Its children ``in_proj`` (packed ``3E x E``; or ``q_proj``, ``k_proj``, ``v_proj`` when ``kdim``/``vdim`` differ
    from ``embed_dim``) and ``out_proj`` are each an ``nn.Linear`` or a :class:`SparseLinear`. The attention between
    them is torch's ordinary path (``F.multi_head_attention_forward``), not the fused one of
    ``torch._native_multi_head_attention``, which reads dense weights.

    ``in_proj_bias`` is always ``None``: ``nn.TransformerEncoderLayer`` reads it to decide whether to take its fused
    path (which reads dense weights too), and takes its ordinary path, which calls this module.
    """

    in_proj_bias = None
    bias_k: Tensor | None  # buffers, registered in __init__
    bias_v: Tensor | None

    def __init__(self, attention: nn.MultiheadAttention, projections: dict[str, nn.Module]) -> None:
        super().__init__()
        self.embed_dim, self.kdim, self.vdim = attention.embed_dim, attention.kdim, attention.vdim
        self.num_heads, self.head_dim = attention.num_heads, attention.head_dim
        self.batch_first, self.add_zero_attn = attention.batch_first, attention.add_zero_attn
        self.dropout = attention.dropout
        self._qkv_same_embed_dim = attention._qkv_same_embed_dim
        self.projections = nn.ModuleDict({k: v for k, v in projections.items() if k != "out_proj"})
        self.out_proj = projections["out_proj"]
        for name in ("bias_k", "bias_v"):
            value = getattr(attention, name)
            self.register_buffer(name, None if value is None else value.detach().clone())

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` in eval mode."""
        _check_inference(self, query, key, value)
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("SparseMultiheadAttention does not take nested tensors; pass padded tensors and masks.")
        is_batched = query.dim() == 3
        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
        query, key, value = seq_first(query, key, value, self.batch_first)
        if not is_batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        output, weights = self._attend(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        if not is_batched:
            output = output.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            output = output.transpose(1, 0)
        return output, weights

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``F.multi_head_attention_forward`` in eval mode on ``(L, N, E)`` inputs, with this module's projections."""
        tgt_len, bsz, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention's own causal mask
        elif key_padding_mask is not None:
            is_causal = False
        q, k, v = project_in(self.projections, query, key, value, self.embed_dim)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, key.shape[0]):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, key.shape[0])}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() != 3:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(
                    f"expecting key_padding_mask shape of {(bsz, src_len)}, but got {key_padding_mask.shape}"
                )
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        return self._weigh(q, k, v, attn_mask, need_weights, average_attn_weights, is_causal)

    def _weigh(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        need_weights: bool,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """The attention of ``(N * heads, L, head_dim)`` projections, through the output projection."""
        heads, head_dim, src_len = self.num_heads, self.head_dim, k.size(1)
        bsz, tgt_len, embed_dim = q.shape[0] // heads, q.shape[1], heads * head_dim
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            output = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            output = self.out_proj(output).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            return output, weights.mean(dim=1) if average_attn_weights else weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)
        q = q.view(bsz, heads, tgt_len, head_dim)
        k = k.view(bsz, heads, src_len, head_dim)
        v = v.view(bsz, heads, src_len, head_dim)
        output = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
        output = output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        return self.out_proj(output).view(tgt_len, bsz, -1), None
