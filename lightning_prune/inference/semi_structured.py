"""2:4 inference on CUDA: :func:`to_semi_structured` hands a pruned model's 2:4-sparse ``nn.Linear`` weights to
torch's semi-structured sparse kernels (:func:`torch.sparse.to_sparse_semi_structured`: cuSPARSELt or CUTLASS),
whose matrix products run on the sparse tensor cores of NVIDIA GPUs of compute capability 8.0 and newer.

The pattern is the one that :class:`~lightning_prune.NMPruning` with ``n=2, m=4`` leaves: at most 2 nonzeros in
every 4 consecutive entries of each row of the ``(out, in)`` weight (along the input dimension;
:func:`~lightning_prune.nm_satisfied` checks it). The conversion is in place and keeps the model's ``forward``;
on the CPU there is no such kernel: run the pruned model as it is, or use
:func:`~lightning_prune.to_sparse_inference` for unstructured sparsity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._utils.lightning import rank_zero_warn
from lightning_prune.layers import input_dim
from lightning_prune.patterns import nm_satisfied
from lightning_prune.selection import ParameterSpec, PruningTarget, select_parameters

__all__ = ["to_semi_structured"]

_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def to_semi_structured(model: nn.Module, parameters: Sequence[ParameterSpec] | None = None) -> list[str]:
    """Convert a trained model's 2:4-sparse ``nn.Linear`` weights, in place, into torch's semi-structured sparse
    tensors (:func:`torch.sparse.to_sparse_semi_structured`), whose matrix products run on sparse tensor cores.

    For inference: move the model to the GPU in half precision and to eval mode first
    (``model.cuda().half().eval()``); the converted weights are frozen (``requires_grad=False``) and the model
    keeps its ``forward``. A chosen ``Linear`` weight that does not satisfy 2:4 along its rows (see
    :func:`~lightning_prune.nm_satisfied`), or whose shape the kernels do not take (both dimensions multiples of
    torch's minimum block, e.g. 32 x 64 for CUTLASS, 16 x 16 for cuSPARSELt in fp16), or that is not a plain
    parameter, stays dense with a warning naming it; other chosen tensors (convolutions, biases) are ignored.

    Args:
        model: the pruned model (masks made permanent, e.g. at the end of the callback's training).
        parameters: as the callback's ``parameters``; default: every ``nn.Linear`` weight.

    Returns:
        The qualified names of the converted weights.

    Raises:
        RuntimeError: without CUDA, or on a GPU of compute capability below 8.0: the kernels need CUDA.
        ValueError: for a chosen 2:4 weight that is not on a CUDA device or not ``float16``/``bfloat16``.

    Example (on a CUDA machine)::

        model = module.model.cuda().half().eval()
        converted = to_semi_structured(model)  # e.g. ['fc1.weight', 'fc2.weight']
        with torch.inference_mode():
            logits = model(images.cuda().half())
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured needs CUDA: torch's 2:4 semi-structured sparse kernels (cuSPARSELt, CUTLASS) run "
            "only on NVIDIA GPUs of compute capability 8.0 or newer, and no CUDA device is available here. "
            "On the CPU, run the pruned model as it is (dense weights with zeros)."
        )
    chosen = [t for t in select_parameters(model, parameters) if isinstance(t.module, nn.Linear)]
    dense, ready = _sorted_out(chosen)
    for t, weight in ready:
        _check_device(t, weight)
    converted = []
    for t, weight in ready:
        too_small = _block_misfit(weight)
        if too_small is not None:
            dense[t.name] = too_small
            continue
        sparse = torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
        t.module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(t.name)
    if dense:
        rank_zero_warn(
            f"to_semi_structured leaves {sorted(dense)} dense: "
            + "; ".join(f"{name!r}: {why}" for name, why in dense.items())
            + "."
        )
    return converted


def _shape_misfit(target: PruningTarget) -> str | None:
    """Why ``target`` cannot hold groups of 4 along its input dimension (``None``: it can)."""
    shape = tuple(target.tensor.shape)
    if target.layout is None or len(shape) < 2:
        return f"not a matrix layer's weight ({type(target.module).__name__}.{target.param})"
    size = shape[input_dim(target.layout)]
    if size % 4:
        return f"input size {size} is not a multiple of m=4"
    return None


def _sorted_out(chosen: Sequence[PruningTarget]) -> tuple[dict[str, str], list[tuple[PruningTarget, Tensor]]]:
    """``({name: why it stays dense}, [(target, weight) that is 2:4 sparse])`` of the chosen ``Linear`` tensors."""
    dense: dict[str, str] = {}
    ready: list[tuple[PruningTarget, Tensor]] = []
    for t in chosen:
        param = t.module._parameters.get("weight")
        why = _shape_misfit(t)
        if why is not None:
            dense[t.name] = why
        elif t.param != "weight" or param is None:
            dense[t.name] = "not a plain parameter (a parametrization or torch's pruning computes it)"
        elif not nm_satisfied(param, 2, 4):
            dense[t.name] = "not 2:4 sparse along its rows"
        else:
            ready.append((t, param))
    return dense, ready


def _check_device(target: PruningTarget, weight: Tensor) -> None:
    """A ``ValueError`` for a weight the kernels do not take, a ``RuntimeError`` for a GPU without them."""
    if not weight.is_cuda or weight.dtype not in _SEMI_STRUCTURED_DTYPES:
        raise ValueError(
            f"to_semi_structured: {target.name!r} is a {weight.dtype} tensor on {weight.device}; the kernels take "
            "float16 or bfloat16 CUDA tensors: call `model.cuda().half()` (or `.to('cuda', torch.bfloat16)`) "
            "first."
        )
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        raise RuntimeError(
            f"to_semi_structured: {torch.cuda.get_device_name(weight.device)} has compute capability "
            f"{torch.cuda.get_device_capability(weight.device)}; the 2:4 kernels need CUDA 8.0 or newer."
        )


def _block_misfit(weight: Tensor) -> str | None:
    """Why torch's semi-structured kernels cannot take ``weight``'s shape (``None``: they can)."""
    semi = torch.sparse.SparseSemiStructuredTensor
    backend: Any = (
        torch.sparse.SparseSemiStructuredTensorCUTLASS
        if getattr(semi, "_FORCE_CUTLASS", False)
        else torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    )
    constraints = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(weight.dtype)
    if constraints is None:
        return None  # unknown to this torch version: let torch decide
    rows, cols = weight.shape
    min_rows, min_cols = constraints.sparse_min_rows, constraints.sparse_min_cols
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return (
            f"shape {tuple(weight.shape)}: both dimensions must be multiples of ({min_rows}, {min_cols}) "
            f"for the {backend.BACKEND} kernels"
        )
    return None
