"""Matrix layers: which parameters enter a matrix product, and how their weights are laid out.

Every layer kind is described here once, by one small table, and read by everything that reasons about rows,
columns or the input dimension: the default selection (:func:`~lightning_prune.select_parameters`), the methods
(torch's structured methods, :class:`~lightning_prune.NMPruning`, :class:`~lightning_prune.Wanda`),
:func:`~lightning_prune.sparsity_report`'s multiply-accumulates and :func:`~lightning_prune.to_sparse_inference`.

A weight's *layout* says which dimension is which:

* ``"out_in"``: ``weight[i, j, ...]`` connects input feature ``j`` to output feature ``i``: ``nn.Linear``
  (``y = x @ W.T``), ``nn.Conv1d/2d/3d`` (``(out, in / groups, *kernel)``), ``nn.MultiheadAttention``'s
  ``in_proj_weight`` and ``q/k/v_proj_weight``, the input and hidden weights of ``nn.RNN/LSTM/GRU``;
* ``"in_out"``: ``weight[j, i, ...]``: Hugging Face's ``Conv1D`` (GPT-2 and its descendants, ``y = x @ W``),
  recognised by its class path without importing ``transformers``, and ``nn.ConvTranspose1d/2d/3d``
  (``(in, out / groups, *kernel)``);
* ``"experts_out_in"`` and ``"experts_in_out"``: a *stack* of matrices, ``weight[e]`` being expert ``e``'s matrix in
  the ``"out_in"`` or ``"in_out"`` layout: the fused expert tensors of Mixture-of-Experts models, such as
  ``gate_up_proj`` ``(experts, 2 x intermediate, hidden)`` and ``down_proj`` ``(experts, hidden, intermediate)`` of
  Mixtral, Qwen3-MoE, DeepSeek-V3 or OLMoE in ``transformers`` 5, or GPT-OSS's ``(experts, in, out)`` tensors. A
  tensor in a stacked layout holds ``weight.shape[0]`` matrices: local targets, ``ln_structured``, N:M and Wanda
  treat each expert as its own matrix (:func:`matrices`).

``transformers`` marks its expert modules (``@use_experts_implementation``: ``num_experts`` and ``is_transposed``
attributes); every parameter of such a module with ``num_experts`` matrices of two dimensions is an expert tensor,
``"experts_in_out"`` when the module says ``is_transposed``. Other fused expert layers are declared with
:func:`register_matrix_layer` and a stacked layout. A Mixture-of-Experts *router* (the ``gate`` beside ``experts``,
or a module whose class name says ``Router``) scores experts rather than transforming features: it is left out of
the default selection (:func:`is_router`), and pruned like any matrix when named in ``parameters``.

Attention's ``out_proj`` is an ``nn.Linear`` (``NonDynamicallyQuantizableLinear``), so it is in the table through
``nn.Linear``. Embeddings (``nn.Embedding``, ``nn.EmbeddingBag``) look tokens up rather than multiply, and are not
matrix layers; a tensor tied to one (a language model's output head) is left out of the default selection too.

A layer of your own joins the table with :func:`register_matrix_layer`; it is then selected by default and
handled like the built-in ones.

Example::

    >>> import torch
    >>> from torch import nn
    >>> class MyLinear(nn.Module):  # y = x @ w, w stored (in, out)
    ...     def __init__(self, n_in, n_out):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.randn(n_in, n_out))
    ...     def forward(self, x):
    ...         return x @ self.w
    >>> handle = register_matrix_layer(MyLinear, "w", layout="in_out")
    >>> matrix_layer(MyLinear(3, 2), "w").layout
    'in_out'
    >>> handle.remove()
    >>> matrix_layer(MyLinear(3, 2), "w") is None
    True
    >>> matrix_layer(nn.Linear(3, 2), "weight").layout, matrix_layer(nn.Linear(3, 2), "bias")
    ('out_in', None)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from lightning_prune._utils.checks import allowed, check_choice

__all__ = [
    "EMBEDDING_TYPES",
    "STACKED_LAYOUTS",
    "Layout",
    "MatrixLayer",
    "MatrixLayerHandle",
    "expert_call",
    "input_dim",
    "is_embedding",
    "is_router",
    "is_stacked",
    "layout_of",
    "matrices",
    "matrix_layer",
    "matrix_layout",
    "output_dim",
    "register_matrix_layer",
    "to_out_in",
]

Layout = Literal["out_in", "in_out", "experts_out_in", "experts_in_out"]
STACKED_LAYOUTS: tuple[Layout, ...] = ("experts_out_in", "experts_in_out")
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class MatrixLayer:
    """One row of the table: a layer kind, the parameters of it that are matrices, and their layout.

    Attributes:
        kind: a module class (its subclasses match too), or a class path ``"package.module.ClassName"`` matched
            against the names of a module's classes (so that a library need not be imported to be known).
        weights: the parameter names (or :mod:`fnmatch` patterns: ``"weight_ih_l*"``) that are matrices.
        layout: ``"out_in"``, ``"in_out"``, or a stacked layout (see the module docstring).
    """

    kind: type | str
    weights: tuple[str, ...]
    layout: Layout

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind."""
        if isinstance(self.kind, type):
            return isinstance(module, self.kind)
        return any(f"{c.__module__}.{c.__qualname__}" == self.kind for c in type(module).__mro__)

    def takes(self, param: str) -> bool:
        """Whether ``param`` (a name in the module) is one of this kind's matrices."""
        return any(fnmatch.fnmatchcase(param, w) for w in self.weights)

    @property
    def label(self) -> str:
        return self.kind.__name__ if isinstance(self.kind, type) else self.kind.rpartition(".")[2]


_BUILTIN: tuple[MatrixLayer, ...] = (
    MatrixLayer(nn.Linear, ("weight",), "out_in"),
    MatrixLayer(nn.Conv1d, ("weight",), "out_in"),
    MatrixLayer(nn.Conv2d, ("weight",), "out_in"),
    MatrixLayer(nn.Conv3d, ("weight",), "out_in"),
    MatrixLayer(nn.modules.conv._ConvTransposeNd, ("weight",), "in_out"),
    MatrixLayer(nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"), "out_in"),
    MatrixLayer(nn.RNNBase, ("weight_ih_l*", "weight_hh_l*", "weight_hr_l*"), "out_in"),
    MatrixLayer("transformers.pytorch_utils.Conv1D", ("weight",), "in_out"),
    MatrixLayer("transformers.modeling_utils.Conv1D", ("weight",), "in_out"),  # transformers < 4.30
)
_REGISTERED: list[MatrixLayer] = []


class MatrixLayerHandle:
    """Returned by :func:`register_matrix_layer`; :meth:`remove` takes the entry out of the table again."""

    def __init__(self, entry: MatrixLayer) -> None:
        self.entry = entry

    def remove(self) -> None:
        if self.entry in _REGISTERED:
            _REGISTERED.remove(self.entry)

    def __repr__(self) -> str:
        return f"MatrixLayerHandle({self.entry!r})"


def register_matrix_layer(
    kind: type[nn.Module] | str, weights: str | Sequence[str] = "weight", layout: Layout = "out_in"
) -> MatrixLayerHandle:
    """Declare a layer of your own as a matrix layer: its ``weights`` are selected by default and every method
    and tool reads their layout from here. Entries registered later take precedence over earlier ones and over the
    built-in table.

    Args:
        kind: the module class (subclasses match too), or its class path ``"package.module.ClassName"``.
        weights: the parameter name, or several names or :mod:`fnmatch` patterns.
        layout: ``"out_in"`` (``weight[out, in, ...]``, as ``nn.Linear``), ``"in_out"`` (``weight[in, out]``,
            as Hugging Face's ``Conv1D``), or ``"experts_out_in"`` / ``"experts_in_out"`` for a fused tensor of
            one matrix per expert (``weight[e]`` in the ``"out_in"`` / ``"in_out"`` layout).

    Returns:
        A handle whose ``remove()`` undoes the registration.

    Raises:
        ValueError: for a ``kind`` that is neither a module class nor a dotted class path, empty or non-string
            ``weights``, or an unknown ``layout``.
    """
    if isinstance(kind, type):
        if not issubclass(kind, nn.Module):
            raise ValueError(f"`kind` must be an nn.Module subclass or a class path, got {kind!r}.")
    elif not (isinstance(kind, str) and "." in kind):
        raise ValueError(f"`kind` must be an nn.Module subclass or a class path 'package.Class', got {kind!r}.")
    names = (weights,) if isinstance(weights, str) else tuple(weights)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"`weights` must be a parameter name or a list of names, got {weights!r}.")
    layout = check_choice("layout", layout, allowed(Layout))
    entry = MatrixLayer(kind, names, layout)
    _REGISTERED.append(entry)
    return MatrixLayerHandle(entry)


def matrix_layer(module: nn.Module, param: str) -> MatrixLayer | None:
    """The table's entry for parameter ``param`` of ``module``, or ``None`` when it is not a matrix weight."""
    for entry in (*reversed(_REGISTERED), *_BUILTIN):
        if entry.matches(module):
            return entry if entry.takes(param) else None
    return _experts_entry(module, param)


def _experts_entry(module: nn.Module, param: str) -> MatrixLayer | None:
    """A ``transformers`` experts module's fused tensor (``@use_experts_implementation`` sets ``num_experts`` and
    ``is_transposed``): ``num_experts`` matrices of two dimensions each."""
    experts, transposed = getattr(module, "num_experts", None), getattr(module, "is_transposed", None)
    tensor = module._parameters.get(param)
    if not isinstance(experts, int) or not isinstance(transposed, bool) or tensor is None:
        return None
    if tensor.dim() != 3 or tensor.shape[0] != experts:
        return None
    return MatrixLayer(type(module), (param,), "experts_in_out" if transposed else "experts_out_in")


def layout_of(module: nn.Module, param: str) -> Layout | None:
    """The layout of ``param`` of ``module`` when it is a matrix weight, else ``None``."""
    entry = matrix_layer(module, param)
    return None if entry is None else entry.layout


def expert_call(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Tensor, Any]:
    """``(hidden states, the router's top-k expert indices)`` of one call of a ``transformers`` experts module
    (``forward(hidden_states, top_k_index, top_k_weights)``; GPT-OSS names the indices ``router_indices``)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    return hidden, index


def is_stacked(layout: Layout | None) -> bool:
    """Whether ``layout`` holds one matrix per entry of its first dimension (a fused experts tensor)."""
    return layout in STACKED_LAYOUTS


def matrix_layout(layout: Layout | None) -> Layout | None:
    """The layout of each matrix of a tensor in ``layout``: ``"out_in"`` for ``"experts_out_in"``, ``"in_out"``
    for ``"experts_in_out"``, ``layout`` itself otherwise."""
    if layout == "experts_out_in":
        return "out_in"
    if layout == "experts_in_out":
        return "in_out"
    return layout


def matrices(tensor: Tensor, layout: Layout | None) -> list[Tensor]:
    """The matrices ``tensor`` holds, as views: one per expert for a stacked layout, else ``[tensor]``. Each is
    in :func:`matrix_layout` ``(layout)``; narrowing a view in place narrows ``tensor``.

    Example::

        >>> import torch
        >>> [m.shape for m in matrices(torch.zeros(2, 3, 4), "experts_out_in")]
        [torch.Size([3, 4]), torch.Size([3, 4])]
        >>> len(matrices(torch.zeros(3, 4), "out_in"))
        1
    """
    return list(tensor.unbind(0)) if is_stacked(layout) else [tensor]


def is_router(module_name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """Whether ``module`` is a Mixture-of-Experts router: its class name says ``Router``, or it is the ``gate``
    (``router``, ``shared_expert_gate``) of a block that holds ``experts``."""
    if "router" in type(module).__name__.lower():
        return True
    last = module_name.rpartition(".")[2]
    return parent is not None and hasattr(parent, "experts") and last in ("gate", "router", "shared_expert_gate")


def is_embedding(module: nn.Module, param: str) -> bool:
    """Whether ``param`` of ``module`` is an embedding table (``nn.Embedding`` / ``nn.EmbeddingBag`` weight)."""
    return isinstance(module, EMBEDDING_TYPES) and param == "weight"


def input_dim(layout: Layout | None) -> int:
    """The dimension of a weight that indexes input features: 1 for ``"out_in"`` (and unknown layouts), 0 for
    ``"in_out"``, 2 for ``"experts_out_in"``, 1 for ``"experts_in_out"``."""
    return {"in_out": 0, "experts_out_in": 2, "experts_in_out": 1}.get(layout or "", 1)


def output_dim(layout: Layout | None) -> int:
    """The dimension of a weight that indexes output features: 0 for ``"out_in"``, 1 for ``"in_out"``, 1 for
    ``"experts_out_in"``, 2 for ``"experts_in_out"``."""
    return {"in_out": 1, "experts_out_in": 1, "experts_in_out": 2}.get(layout or "", 0)


def to_out_in(tensor: Tensor, layout: Layout | None) -> Tensor:
    """A view of ``tensor`` in the ``(out, in, ...)`` layout (``(experts, out, in)`` for a stacked layout; the
    tensor itself unless it is stored in-before-out). The same call turns such a tensor back into ``layout``.

    Example::

        >>> import torch
        >>> to_out_in(torch.zeros(3, 5), "in_out").shape, to_out_in(torch.zeros(3, 5), "out_in").shape
        (torch.Size([5, 3]), torch.Size([3, 5]))
        >>> to_out_in(torch.zeros(2, 3, 5), "experts_in_out").shape
        torch.Size([2, 5, 3])
    """
    if layout == "in_out" and tensor.dim() >= 2:
        return tensor.transpose(0, 1)
    if layout == "experts_in_out" and tensor.dim() >= 3:
        return tensor.transpose(1, 2)
    return tensor
