"""Measured sparsity of any model, masked or permanent: zeros counted in the weights the model uses, and,
given example inputs, what they are worth: parameters, multiply-accumulates, compression and speed-up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune import reparam
from lightning_prune._utils.modules import call_on
from lightning_prune._utils.table import format_table
from lightning_prune.collective import Collective
from lightning_prune.counting import count_zeros
from lightning_prune.layers import expert_call, input_dim, is_stacked, layout_of, matrix_layer, output_dim
from lightning_prune.patterns import check_nm, nm_satisfied
from lightning_prune.selection import (
    ParameterSpec,
    PruningTarget,
    iter_parameters,
    matrix_weight_names,
    select_parameters,
)
from lightning_prune.shards import local_view

__all__ = ["ModelSize", "SparsityReport", "TensorSparsity", "count_macs", "sparsity_report"]


@dataclass(frozen=True)
class TensorSparsity:
    """Measured figures for one tensor.

    Attributes:
        name: qualified parameter name.
        shape: the tensor's shape.
        numel: its number of entries.
        zeros: entries equal to zero in the weights the model uses (``orig * mask`` under torch's pruning).
        target: the cumulative target it was last pruned to, if known.
        nm: whether it satisfies the N:M pattern that :func:`sparsity_report` was asked about (``nm=(n, m)``):
            at most ``n`` nonzeros in every ``m`` consecutive entries along dim 1 (see
            :func:`~lightning_prune.methods.nm.nm_satisfied`); ``None`` when not asked or when dim 1 has no such groups.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    target: float | None = None
    nm: bool | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class ModelSize:
    """What the zeros of a whole model are worth (see :func:`sparsity_report` with ``example_inputs``).

    Attributes:
        params_total: every parameter entry of the model, biases and normalization included.
        params_nonzero: those that are not zero.
        macs_dense: multiply-accumulates of one forward pass on the example inputs, in every matrix layer
            (``Conv*d``, ``Linear``, Hugging Face's ``Conv1D``, ``MultiheadAttention``'s projections, registered
            layers; see :func:`count_macs`), counting every weight.
        macs_nonzero: the same counting only the nonzero weights: the work left to an ideal sparse kernel.
    """

    params_total: int
    params_nonzero: int
    macs_dense: int
    macs_nonzero: int

    @property
    def compression_ratio(self) -> float:
        """``params_total / params_nonzero``."""
        return self.params_total / max(self.params_nonzero, 1)

    @property
    def theoretical_speedup(self) -> float:
        """``macs_dense / macs_nonzero``: an upper bound that dense kernels do not reach."""
        return self.macs_dense / max(self.macs_nonzero, 1)


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor and overall measured sparsity; ``str(report)`` is a compact table.

    Attributes:
        tensors: one :class:`TensorSparsity` per tensor, in model order.
        size: parameters and MACs of the whole model, when :func:`sparsity_report` had example inputs.
        nm: the ``(n, m)`` pattern that :func:`sparsity_report` checked (then ``str(report)`` has a column for it).
    """

    tensors: tuple[TensorSparsity, ...]
    size: ModelSize | None = None
    nm: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def zeros(self) -> int:
        return sum(t.zeros for t in self.tensors)

    @property
    def sparsity(self) -> float:
        """Zeros over entries, across all reported tensors."""
        return self.zeros / self.numel if self.numel else 0.0

    def per_tensor(self) -> dict[str, float]:
        """``{qualified name: sparsity}``."""
        return {t.name: t.sparsity for t in self.tensors}

    def metrics(
        self, prefix: str = "pruning", target: float | None = None, per_tensor: bool = True
    ) -> dict[str, float]:
        """The figures a logger receives: ``<prefix>/sparsity``, ``<prefix>/target`` (when given) and, with
        ``per_tensor``, ``pruning/sparsity/<name>`` for every tensor."""
        out = {f"{prefix}/sparsity": self.sparsity}
        if target is not None:
            out[f"{prefix}/target"] = target
        if per_tensor:
            out.update({f"pruning/sparsity/{t.name}": t.sparsity for t in self.tensors})
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON: overall and per-tensor figures, and the model's size when measured."""
        out: dict[str, Any] = {
            "sparsity": self.sparsity,
            "weights_total": self.numel,
            "weights_nonzero": self.numel - self.zeros,
            "sparsity_per_tensor": self.per_tensor(),
            "weights_per_tensor": {t.name: [t.numel - t.zeros, t.numel] for t in self.tensors},
        }
        if self.size is not None:
            out.update(
                params_total=self.size.params_total,
                params_nonzero=self.size.params_nonzero,
                compression_ratio=self.size.compression_ratio,
                macs_dense=self.size.macs_dense,
                macs_nonzero=self.size.macs_nonzero,
                theoretical_speedup=self.size.theoretical_speedup,
            )
        if self.nm is not None:
            out.update(nm=list(self.nm), nm_per_tensor={t.name: t.nm for t in self.tensors})
        return out

    def __str__(self) -> str:
        nm = () if self.nm is None else (f"{self.nm[0]}:{self.nm[1]}",)
        goal = ("target",) if any(t.target is not None for t in self.tensors) else ()  # a column only when known
        flag = {True: "yes", False: "no", None: "-"}
        rows = [("tensor", "shape", "zeros", "sparsity", *goal, *nm)]
        for t in self.tensors:
            target = ("" if t.target is None else f"{t.target:.4f}",) if goal else ()
            row = (t.name, "x".join(map(str, t.shape)), f"{t.zeros}/{t.numel}", f"{t.sparsity:.4f}", *target)
            rows.append(row + ((flag[t.nm],) if nm else ()))
        rows.append(("total", "", f"{self.zeros}/{self.numel}", f"{self.sparsity:.4f}", *("" for _ in goal + nm)))
        lines = format_table(rows)
        if self.size is not None:
            z = self.size
            lines.append(
                f"parameters {z.params_nonzero}/{z.params_total} nonzero (compression {z.compression_ratio:.2f}x), "
                f"MACs {z.macs_nonzero}/{z.macs_dense} (theoretical speed-up {z.theoretical_speedup:.2f}x)"
            )
        return "\n".join(lines)


def measure(
    targets: Sequence[PruningTarget], goals: Mapping[str, float] | None = None, group: Collective | None = None
) -> SparsityReport:
    """Measure the given tensors (see :func:`sparsity_report`); ``group``: the tensors are sharded across
    processes, whose counts are summed."""
    goals = goals or {}
    with torch.no_grad():
        zeros = [count_zeros(local_view(t.tensor)) for t in targets]
    if group is not None:
        zeros = group.sum(zeros)
    rows = [
        TensorSparsity(t.name, tuple(t.tensor.shape), t.tensor.numel(), z, goals.get(t.name))
        for t, z in zip(targets, zeros)
    ]
    return SparsityReport(tuple(rows))


def _nonzero(t: Tensor) -> int:
    return int(torch.count_nonzero(t.detach()))


def count_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_inputs``: ``(dense, nonzero)``.

    ``dense`` counts every weight of every matrix layer that runs (:mod:`lightning_prune.layers`: ``Conv*d``,
    transposed too, ``Linear``, Hugging Face's ``Conv1D``, ``MultiheadAttention``'s projections and layers you
    registered) once for each position it is applied at, and each expert of a Mixture-of-Experts layer's fused
    tensors once for each token routed to it (top-k of E experts per token); ``nonzero`` only the weights that
    are not zero, the work left to an ideal sparse kernel (Blalock et al., 2020). Biases, normalization,
    activations, pooling, the attention products (which have no weights) and recurrent layers are not counted.
    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     _ = net[0].weight[0].zero_()
        >>> count_macs(net, torch.zeros(1, 4))
        (18, 14)
    """
    counter = _MacCounter()
    handles = [counter.hook(m) for m in _counted_modules(model)]
    try:
        with torch.no_grad():
            call_on(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counter.dense, counter.nonzero


def _counted_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward hooks count MACs: attention (its ``out_proj`` through it), experts and matrix
    layers; not recurrent layers."""
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
        or (not isinstance(m, nn.RNNBase) and id(m) not in inside_attention and matrix_weight_names(m))
    ]


class _MacCounter:
    """Forward hooks that add up multiply-accumulates, dense and nonzero."""

    def __init__(self) -> None:
        self.dense = self.nonzero = 0

    def hook(self, module: nn.Module) -> Any:
        if isinstance(module, nn.MultiheadAttention):
            return module.register_forward_hook(self.attention, with_kwargs=True)
        if any(is_stacked(layout_of(module, n)) for n in matrix_weight_names(module)):
            return module.register_forward_hook(self.experts, with_kwargs=True)
        return module.register_forward_hook(self.matrix)

    def add(self, weight: Tensor, positions: int) -> None:
        self.dense += positions * weight.numel()
        self.nonzero += positions * _nonzero(weight)

    def matrix(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        for pname in matrix_weight_names(module):
            weight, entry = getattr(module, pname), matrix_layer(module, pname)
            if entry is None or not isinstance(output, Tensor):
                continue
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                positions = inputs[0].numel() // inputs[0].shape[1]  # each input position meets the whole kernel
            elif isinstance(module, nn.modules.conv._ConvNd):
                positions = output.numel() // output.shape[1]
            else:  # a product along the last dimension of the output: one position per output vector
                positions = output.numel() // weight.shape[output_dim(entry.layout)]
            self.add(weight, positions)

    def experts(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """Each token meets the experts its router chose (top-k of E), not all of them."""
        _, index = expert_call(args, kwargs)
        for pname in matrix_weight_names(module):
            weight, entry = getattr(module, pname), matrix_layer(module, pname)
            if entry is None or not is_stacked(entry.layout) or not isinstance(index, Tensor):
                continue
            routed = torch.bincount(index.reshape(-1).long(), minlength=weight.shape[0])[: weight.shape[0]]
            for tokens, matrix in zip(routed.tolist(), weight.unbind(0)):
                self.add(matrix, tokens)

    def attention(
        self, module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        names = ("query", "key", "value")
        q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
        if module.in_proj_weight is not None:
            projections = [(x, w) for x, w in zip((q, k, v), module.in_proj_weight.chunk(3))]
        else:
            projections = [(q, module.q_proj_weight), (k, module.k_proj_weight), (v, module.v_proj_weight)]
        projections.append((q, module.out_proj.weight))
        for x, w in projections:
            self.add(w, x.numel() // x.shape[-1])


def sparsity_report(
    model: nn.Module,
    parameters: Sequence[ParameterSpec] | None = None,
    example_inputs: Any = None,
    nm: tuple[int, int] | None = None,
) -> SparsityReport:
    """Count the zeros of a model's tensors, whether pruning masks are in place or were made permanent.

    Args:
        model: any module.
        parameters: as in :class:`~lightning_prune.PruningScheduleCallback` (names, glob patterns or
            ``(module, name)`` pairs); default: the callback's default, every matrix weight but embeddings.
        example_inputs: inputs of one forward pass (a tensor, a tuple or a dict): the report then also holds
            the model's :class:`ModelSize` (parameters total and nonzero with biases, MACs dense and nonzero,
            compression ratio, theoretical speed-up; see :func:`count_macs`).
        nm: an ``(n, m)`` pattern such as ``(2, 4)``: each tensor's :attr:`TensorSparsity.nm` then says whether it
            holds at most ``n`` nonzeros in every ``m`` consecutive entries along its input dimension (dim 1 of
            ``Linear`` and ``Conv*d`` weights, dim 0 of weights stored ``(in, out)`` such as Hugging Face's
            ``Conv1D``; ``None`` where that size is not a multiple of ``m``), and ``str(report)`` shows it.

    Example::

        >>> import torch.nn as nn, torch.nn.utils.prune as prune
        >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
        >>> _ = prune.l1_unstructured(net[0], "weight", amount=30)
        >>> report = sparsity_report(net, example_inputs=torch.zeros(1, 10))
        >>> report.per_tensor()["0.weight"], report.zeros, report.numel
        (0.3, 30, 120)
        >>> report.size.params_total, report.size.params_nonzero, report.size.macs_dense, report.size.macs_nonzero
        (132, 102, 120, 90)
        >>> mlp = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 3), nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     _ = mlp[0].weight.copy_(torch.tensor([1.0, 0.0, -2.0, 0.0]).repeat(4, 2))
        >>> [t.nm for t in sparsity_report(mlp, nm=(2, 4)).tensors]  # 2:4 / not 2:4 / in=3 has no groups of 4
        [True, False, None]
    """
    with reparam.plain(model):  # a model in torch's pruning form: the weights it computes with (orig * mask)
        return _report(model, parameters, example_inputs, nm)


def _report(
    model: nn.Module, parameters: Sequence[ParameterSpec] | None, example_inputs: Any, nm: tuple[int, int] | None
) -> SparsityReport:
    targets = select_parameters(model, parameters)
    report = measure(targets)
    if nm is not None:
        report = _with_nm(report, targets, nm)
    if example_inputs is None:
        return report
    values = [t.tensor for t in iter_parameters(model)]
    macs_dense, macs_nonzero = count_macs(model, example_inputs)
    size = ModelSize(
        params_total=sum(v.numel() for v in values),
        params_nonzero=sum(_nonzero(v) for v in values),
        macs_dense=macs_dense,
        macs_nonzero=macs_nonzero,
    )
    return SparsityReport(report.tensors, size, report.nm)


def _with_nm(report: SparsityReport, targets: Sequence[PruningTarget], nm: tuple[int, int]) -> SparsityReport:
    if isinstance(nm, (str, bytes)) or not isinstance(nm, Sequence) or len(nm) != 2:
        raise ValueError(f"`nm` must be a pair (n, m) such as (2, 4), got {nm!r}.")
    n, m = check_nm(*nm)
    flags = []
    with torch.no_grad():
        for t in targets:
            value = local_view(t.tensor)
            dim = input_dim(t.layout)
            groups = value.dim() >= 2 and value.shape[dim] % m == 0
            flags.append(nm_satisfied(value, n, m, dim) if groups else None)
    rows = tuple(replace(t, nm=flag) for t, flag in zip(report.tensors, flags))
    return SparsityReport(rows, report.size, (n, m))
