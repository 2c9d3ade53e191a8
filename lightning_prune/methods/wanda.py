"""Wanda: pruning by weights and activations (Sun et al., 2023, "A Simple and Effective Pruning Approach for
Large Language Models").

The score of weight ``W[i, j]`` is ``|W[i, j]| * sqrt(mean of x_j^2)``, where ``x_j`` is input feature ``j`` of
the layer over the batches it saw (the paper's ``|W_ij| * ||X_j||_2``, divided by the square root of the
number of rows so that layers that see different numbers of rows compare in global scope; within a row or a
tensor the order is the same). :class:`Wanda` collects the statistics through forward pre-hooks during the
callback's calibration window, keeping one vector of sums of squares and one row count per tensor, and then
ranks exactly like the other score methods: per output row (the paper's comparison group), per tensor, or
across tensors. :func:`~lightning_prune.step.wanda_prune` prunes a trained model once, outside training, with
the same class, and :func:`~lightning_prune.prune_once` does the same for any method (e.g. one-shot magnitude
pruning to compare with).

Which input a tensor's scores read:

* ``nn.Linear.weight``, Hugging Face's ``Conv1D.weight`` (stored ``(in, out)``, so that a "row" is a column of
  the stored tensor) and the 2-D weights of registered matrix layers (:mod:`lightning_prune.layers`): the last
  dimension of the layer's input;
* ``nn.Conv1d/2d/3d.weight``: the input channels (squares summed over batch and positions), the score of
  channel ``c`` broadcast over the kernel positions; grouped and depthwise convolutions pair each output
  channel with its group's inputs;
* ``nn.MultiheadAttention.in_proj_weight``: rows ``[0, E)`` project the query, ``[E, 2E)`` the key and
  ``[2E, 3E)`` the value, so each third reads its own input (in self-attention, query = key = value and the
  three are equal); ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` likewise;
* ``nn.MultiheadAttention.out_proj.weight``: attention never calls ``out_proj``'s ``forward`` (it reads the
  weight), so its input, the heads' concatenated outputs, is computed again from the attention's own
  inputs with dropout off, once per calibration batch;
* anything else (biases, embeddings, normalization weights, transposed convolutions, recurrent layers, a layer
  whose input has an unexpected size or that did not run in the window): the magnitude ``|W|``, with a warning
  naming it once.

Only forward passes with gradients enabled are observed: training batches, not validation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune._utils.checks import allowed, check_choice, check_int
from lightning_prune._utils.lightning import rank_zero_warn
from lightning_prune.counting import count_for
from lightning_prune.layers import expert_call, input_dim, is_stacked, matrix_layer, to_out_in
from lightning_prune.methods import MaskReader, NewMask, PruningMethod, ScoreMethod
from lightning_prune.methods.nm import NMPruning, check_nm
from lightning_prune.selection import PruningTarget

__all__ = ["Group", "Wanda"]

Group = Literal["row", "tensor", "global"]
_QKV = ("query", "key", "value")
_MHA_ARGS = (*_QKV, "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
_SEPARATE = {"q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}


@dataclass(frozen=True)
class _Plan:
    """How one tensor's input statistics are observed.

    ``kind``: ``"linear"`` (the module's input, last dimension), ``"conv"`` (input channels), ``"qkv"`` (an
    attention's query/key/value inputs, one stream each, selected by ``streams``), ``"heads"`` (the attention
    output before ``out_proj``) or ``"experts"`` (a fused experts tensor: one stream per expert, each the inputs
    of the tokens routed to it). ``module`` is the module hooked; ``features`` the input width of each stream.
    """

    kind: str
    module: nn.Module
    features: int
    streams: tuple[int, ...] = (0,)
    dim: int = 1  # the weight's input dimension: 0 for weights stored (in, out)


class Wanda(PruningMethod):
    """Prune the weights with the smallest ``|W| * sqrt(mean x^2)``, from activations seen while training.

    When a pruning step falls due, the callback lets ``calibration_batches`` training batches run with the
    current masks while forward pre-hooks on the chosen layers sum the squares of their inputs per input
    feature; then the sums are added up over processes, the step prunes, and the hooks are removed. The
    statistics of a window that a checkpoint interrupts are saved with the callback's state, so a resumed run
    prunes as an uninterrupted one would. Pruned entries stay pruned; the cumulative targets of every schedule
    are exact counts: after each step each row (``group="row"``) has ``round(s * row length)`` zeros, or the
    tensor (``"tensor"``) ``round(s * n)``, or all tensors together (``"global"``) ``round(s * total)``.

    See the module docstring for which input each kind of tensor reads (``Linear``, ``Conv*d``, attention's
    ``in_proj_weight`` and ``out_proj``) and for the magnitude fallback.

    Args:
        calibration_batches: training batches observed before each step, >= 1. Each step waits that many
            batches after it falls due.
        group: the entries that compete: ``"row"`` (default, as in the paper: each output row of a tensor,
            ``weight[i]`` of an ``(out, in)`` weight, ``weight[:, i]`` of a Hugging Face ``Conv1D``, keeps its
            share), ``"tensor"`` (each tensor to its target) or ``"global"`` (one ranking across all tensors).
            ``"row"`` and ``"tensor"`` need the callback's ``scope="local"``, ``"global"`` needs
            ``scope="global"``.
        nm: ``(n, m)`` such as ``(2, 4)``: instead of a sparsity, the N:M pattern of
            :class:`~lightning_prune.NMPruning` (``n`` kept of every ``m`` consecutive weights along the input
            dimension) chosen by these scores, as the paper's 2:4 and 4:8 results; the method then takes no
            ``sparsity`` (give the callback a schedule of when).

    Raises:
        ValueError: for a ``calibration_batches`` that is not an integer >= 1 or an unknown ``group`` (here),
            for a ``group`` that does not match the callback's ``scope`` (when the callback is built), and at a
            step, for activations that are not finite.

    Example::

        >>> from lightning_prune import PruningScheduleCallback, Polynomial
        >>> callback = PruningScheduleCallback(
        ...     0.5, method=Wanda(calibration_batches=4), schedule=Polynomial(start_epoch=1, end_epoch=3)
        ... )
        >>> callback.method
        Wanda(calibration_batches=4, group='row')
    """

    def __init__(self, calibration_batches: int = 8, group: Group = "row", nm: tuple[int, int] | None = None) -> None:
        self.calibration_batches = check_int("calibration_batches", calibration_batches, minimum=1)
        self.group: Group = check_choice("group", group, allowed(Group))
        self.nm = None if nm is None else check_nm(*_pair("nm", nm))
        if self.nm is not None and group != "row":
            raise ValueError(f"`nm` keeps n of every m weights of each row; it needs group='row', got {group!r}.")
        self.name = f"wanda({group})" if self.nm is None else f"wanda({self.nm[0]}:{self.nm[1]})"
        self.scopes = ("global",) if group == "global" else ("local",)
        self.takes_sparsity = self.nm is None
        self._ranking = ScoreMethod(self.scores, self.name)
        self._pattern = None if self.nm is None else NMPruning(*self.nm, scores=self.scores)
        self._plans: dict[str, _Plan | None] = {}
        self._sums: dict[str, Tensor] = {}  # name -> (streams, features) sums of squares
        self._rows: dict[str, Tensor] = {}  # name -> (streams,) rows summed
        self._scales: dict[str, Tensor | None] = {}  # name -> (streams, features) sqrt(mean x^2), after the window
        self._handles: list[RemovableHandle] = []
        self._seen = 0  # batches observed in the window
        self._observed = False  # a forward pass was observed since calibration_done() last asked
        self._loaded: dict[str, Any] = {}
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        nm = "" if self.nm is None else f", nm={self.nm}"
        return f"Wanda(calibration_batches={self.calibration_batches}, group={self.group!r}{nm})"

    def masked(self, targets: Sequence[PruningTarget]) -> list[PruningTarget]:
        return list(targets) if self._pattern is None else self._pattern.masked(targets)

    def setup(self, pl_module: nn.Module, targets: Sequence[PruningTarget]) -> None:
        if self._pattern is not None:
            self._pattern.setup(pl_module, targets)

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the callback; hooks stay in this process
        return {**self.__dict__, "_handles": []}

    def scope_error(self, scope: str) -> str:
        need = "scope='global'" if self.group == "global" else "scope='local'"
        other = "Wanda(group='row') or Wanda(group='tensor')" if scope == "local" else "Wanda(group='global')"
        return f"{self!r} needs the callback's {need}, got scope={scope!r}; with scope={scope!r} use {other}."

    # -- calibration

    def start_calibration(self, pl_module: nn.Module, targets: Sequence[PruningTarget], resume: bool = False) -> None:
        self.stop_calibration()
        loaded, self._loaded, self._plans = self._loaded, {}, {}
        attention = {id(m.out_proj): m for m in pl_module.modules() if isinstance(m, nn.MultiheadAttention)}
        for t in targets:
            plan = self._plans[t.name] = _plan(pl_module, t, attention)
            if plan is None:
                self._fallback(t.name, "it is not the weight of a Linear, Conv1d/2d/3d or MultiheadAttention")
                continue
            device = t.tensor.device
            dtype = torch.float32 if device.type == "mps" else torch.float64
            sums = torch.zeros(len(plan.streams), plan.features, dtype=dtype, device=device)
            rows = torch.zeros(len(plan.streams), dtype=dtype, device=device)
            if resume and t.name in loaded.get("sums", {}):
                sums.copy_(loaded["sums"][t.name])
                rows.copy_(loaded["rows"][t.name])
            self._sums[t.name], self._rows[t.name] = sums, rows
            observe = functools.partial(self._observe, t.name, plan)
            self._handles.append(plan.module.register_forward_pre_hook(observe, with_kwargs=True))
        if resume:
            self._seen, self._observed = int(loaded.get("seen", 0)), bool(loaded.get("observed", False))

    def calibration_done(self) -> bool:
        # called before each training batch while the window is open: a batch ran if a hook saw it since the
        # last call (the callback may ask twice before one batch); with nothing to observe, nothing to wait for
        if not self._handles:
            return True
        if self._observed:
            self._seen, self._observed = self._seen + 1, False
        return self._seen >= self.calibration_batches

    def finish_calibration(self, reduce: Callable[[Tensor], Tensor]) -> None:
        names = list(self._sums)
        if names:  # one all-reduce for every sum and count, so that every process ranks the same scores
            parts = [self._sums[n] for n in names] + [self._rows[n] for n in names]
            device = parts[0].device
            flat = reduce(torch.cat([p.reshape(-1).to(device) for p in parts]))
            for part, value in zip(parts, flat.split([p.numel() for p in parts])):
                part.copy_(value.view(part.shape))
        self._scales = {}
        for name, plan in self._plans.items():
            if plan is None:
                self._scales[name] = None
                continue
            rows = self._rows[name]
            idle = [e for e, n in enumerate(rows.tolist()) if n == 0]
            if plan.kind == "experts" and 0 < len(idle) < len(rows):
                self._scales[name] = self._expert_scale(name, idle)
                continue
            if idle:
                self._fallback(name, "its layer did not run with gradients enabled in the calibration window")
                self._scales[name] = None
                continue
            scale = (self._sums[name] / rows.unsqueeze(1)).sqrt()
            if not bool(torch.isfinite(scale).all()):
                raise ValueError(f"Wanda: the inputs of {name!r} hold NaN or infinite values; no tensor was pruned.")
            self._scales[name] = scale

    def _expert_scale(self, name: str, idle: Sequence[int]) -> Tensor:
        """The scales of a fused experts tensor some of whose experts saw no token: those experts are scored by
        magnitude (a constant scale, the mean of the others', so that their weights rank in the same range)."""
        rows = self._rows[name]
        scale = (self._sums[name] / rows.clamp(min=1).unsqueeze(1)).sqrt()
        seen = rows > 0
        scale[~seen] = scale[seen].mean()
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"Wanda: the inputs of {name!r} hold NaN or infinite values; no tensor was pruned.")
        self._fallback(
            name, f"experts {list(idle)} saw no token in the calibration window (those experts by magnitude)", key=name
        )
        return scale

    def stop_calibration(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._sums, self._rows, self._scales = [], {}, {}, {}
        self._seen, self._observed = 0, False

    def state_dict(self) -> dict[str, Any]:
        if not self._handles:
            return {}
        return {
            "seen": self._seen,
            "observed": self._observed,
            "sums": {n: s.detach().cpu().clone() for n, s in self._sums.items()},
            "rows": {n: r.detach().cpu().clone() for n, r in self._rows.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._loaded = dict(state)

    def _observe(self, name: str, plan: _Plan, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled() and name in self._sums:  # training batches, not validation
            with torch.no_grad():
                self._accumulate(name, plan, module, args, kwargs)

    def _accumulate(self, name: str, plan: _Plan, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if plan.kind == "heads":
            inputs = [_attention_heads(cast(nn.MultiheadAttention, module), args, kwargs)]
        elif plan.kind == "qkv":
            bound = {**dict(zip(_MHA_ARGS, args)), **kwargs}
            inputs = [bound[_QKV[s]] for s in plan.streams]
        elif plan.kind == "experts":
            self._accumulate_experts(name, plan, module, args, kwargs)
            return
        else:
            inputs = [args[0] if args else kwargs["input"]]
        dim = -1
        if plan.kind == "conv":  # (N, C, *positions), or (C, *positions) unbatched
            dim = 1 if inputs[0].dim() == cast(Tensor, module.weight).dim() else 0
        if any(x.shape[dim] != plan.features for x in inputs):
            del self._sums[name], self._rows[name]
            self._plans[name] = None
            self._fallback(name, f"its input has {inputs[0].shape[dim]} features, not {plan.features}")
            return
        for stream, x in enumerate(inputs):
            x = x.detach().movedim(dim, -1).reshape(-1, plan.features)
            self._sums[name][stream] += x.float().square().sum(0).to(self._sums[name].dtype)
            self._rows[name][stream] += x.shape[0]
        self._observed = True

    def _accumulate_experts(
        self, name: str, plan: _Plan, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> None:
        """Sums of squares per expert, of the inputs of the tokens the router sent to it."""
        hidden, index = expert_call(args, kwargs)
        param = name.rpartition(".")[2]
        for expert, x in _routed_inputs(module, param, hidden.detach(), index, plan.features):
            if x is None:
                del self._sums[name], self._rows[name]
                self._plans[name] = None
                self._fallback(name, "its experts' inputs could not be computed from the module's forward")
                return
            self._sums[name][expert] += x.float().square().sum(0).to(self._sums[name].dtype)
            self._rows[name][expert] += x.shape[0]
        self._observed = True

    def _fallback(self, name: str, why: str, key: str | None = None) -> None:
        key = name if key is None else f"{key}:experts"
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"Wanda scores {name!r} by magnitude alone: {why}.")

    # -- scores and selection

    def scores(self, target: PruningTarget, seed: int = 0) -> Tensor:
        """``|W| * sqrt(mean x^2)`` of the tensor's input features, in the tensor's shape (after the window;
        the magnitude ``|W|`` for a tensor scored by magnitude)."""
        with torch.no_grad():
            weights = target.tensor.detach().abs()
            scale = self._scales.get(target.name)
            if scale is None:
                return weights
            plan = self._plans[target.name]
            if plan is None:
                return weights
            return weights * _broadcast(scale, plan, weights).to(weights.dtype)

    def local_masks(
        self, targets: Sequence[PruningTarget], sparsities: Sequence[float | None], seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        if self._pattern is not None:  # n:m: each group of m inputs keeps its n highest scores
            yield from self._pattern.local_masks(targets, sparsities, seed, masks)
            return
        if self.group == "tensor":
            yield from self._ranking.local_masks(targets, sparsities, seed, masks)
            return
        for t, s in zip(targets, sparsities):
            new = self._row_mask(t, s if s is not None else 0.0, masks.mask(t))
            if new is not None:
                yield new

    def global_masks(
        self, targets: Sequence[PruningTarget], sparsity: float | None, seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        yield from self._ranking.global_masks(targets, sparsity, seed, masks)

    def _row_mask(self, target: PruningTarget, sparsity: float, current: Tensor | None) -> NewMask | None:
        """Each output row (``weight[i]`` of an ``(out, in)`` weight, a column of an ``(in, out)`` one) to
        ``round(sparsity * row length)`` zeros: its lowest live scores."""
        layout = target.layout
        shape = to_out_in(target.tensor, layout).shape
        rows = shape[0] * shape[1] if is_stacked(layout) else shape[0] if len(shape) > 1 else 1  # experts: each row
        length = target.tensor.numel() // rows
        k = count_for(sparsity, length)
        if k >= length and length > 0:
            raise ValueError(
                f"Wanda(group='row') would prune every entry of each row of {target.name!r} (sparsity {sparsity!r} "
                f"of rows of {length}); give a lower `sparsity` or use group='tensor'."
            )
        live = None if current is None else to_out_in(current, layout).reshape(rows, length)
        pruned = (live == 0).sum(1) if live is not None else None
        if k == 0 or (pruned is not None and bool((pruned >= k).all())):
            return None
        scores = to_out_in(self.scores(target), layout).reshape(rows, length).float()
        if live is not None:  # pruned entries first: each row prunes k - (its pruned) more
            scores = scores.masked_fill(live == 0, float("-inf"))
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask = torch.ones(rows, length, dtype=torch.uint8, device=scores.device).scatter_(1, lowest, 0)
        if live is not None and pruned is not None:
            mask.mul_(live.to(mask.device))
            zeros = int(pruned.clamp(min=k).sum())
        else:
            zeros = rows * k
        return NewMask(target, to_out_in(mask.view(shape), layout), zeros)


def _pair(name: str, value: object) -> tuple[Any, Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"`{name}` must be a pair (n, m) such as (2, 4), got {value!r}.")
    return value[0], value[1]


def _plan(root: nn.Module, target: PruningTarget, attention: Mapping[int, nn.MultiheadAttention]) -> _Plan | None:
    """How to observe the input of ``target`` (through the first of its names whose owner can), or ``None``."""
    names = target.aliases or (target.name,)
    owners = [(root.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]
    shape = target.tensor.shape
    for module, param in [(target.module, target.param), *owners]:
        if isinstance(module, nn.MultiheadAttention):
            if param == "in_proj_weight":
                return _Plan("qkv", module, shape[1], (0, 1, 2))
            if param in _SEPARATE:
                return _Plan("qkv", module, shape[1], (_SEPARATE[param],))
        entry = matrix_layer(module, param)
        if entry is None:
            continue
        if is_stacked(entry.layout) and len(shape) == 3:  # one stream per expert: the tokens routed to it
            dim = input_dim(entry.layout)
            return _Plan("experts", module, shape[dim], tuple(range(shape[0])), dim=dim)
        if id(module) in attention:
            return _Plan("heads", attention[id(module)], shape[1])
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return _Plan("conv", module, shape[1] * module.groups)
        if len(shape) == 2 and not isinstance(module, (nn.modules.conv._ConvTransposeNd, nn.RNNBase)):
            dim = input_dim(entry.layout)  # Linear, Hugging Face's Conv1D, registered layers: x[..., in]
            return _Plan("linear", module, shape[dim], dim=dim)
    return None


def _broadcast(scale: Tensor, plan: _Plan, weights: Tensor) -> Tensor:
    """The per-input-feature ``scale`` (streams, features) in a shape that multiplies ``weights``."""
    if plan.kind == "conv":
        groups = cast(int, plan.module.groups)
        per_group = scale[0].view(groups, -1).repeat_interleave(weights.shape[0] // groups, dim=0)
        return per_group.view(*per_group.shape, *([1] * (weights.dim() - 2)))
    if plan.kind == "experts":  # (experts, features) against (experts, out, in) or (experts, in, out)
        return scale.unsqueeze(1) if plan.dim == 2 else scale.unsqueeze(2)
    if len(plan.streams) > 1:  # in_proj_weight: each third of the rows reads its own input
        return scale.repeat_interleave(weights.shape[0] // len(plan.streams), dim=0)
    return scale[0].unsqueeze(1) if plan.dim == 0 else scale[0]


def _attention_heads(mha: nn.MultiheadAttention, args: tuple, kwargs: Mapping[str, Any]) -> Tensor:
    """The input ``out_proj`` would see: the attention's output before its output projection (dropout off)."""
    bound = {**dict(zip(_MHA_ARGS, args)), **kwargs}
    query, key, value = (bound[n] for n in _QKV)
    if mha.batch_first and query.dim() == 3:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    eye = torch.eye(mha.embed_dim, dtype=query.dtype, device=query.device)
    heads, _ = F.multi_head_attention_forward(
        query, key, value, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias,
        mha.bias_k, mha.bias_v, mha.add_zero_attn, 0.0, eye, None, training=False,
        key_padding_mask=bound.get("key_padding_mask"), need_weights=False, attn_mask=bound.get("attn_mask"),
        use_separate_proj_weight=not mha._qkv_same_embed_dim, q_proj_weight=mha.q_proj_weight,
        k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight, is_causal=bool(bound.get("is_causal")),
    )  # fmt: skip
    return heads


def _routed_inputs(
    experts: nn.Module, param: str, hidden: Tensor, index: Any, features: int
) -> Iterator[tuple[int, Tensor | None]]:
    """``(expert, inputs of param's matrix for that expert's tokens)`` for each expert that saw a token, or one
    ``(0, None)`` when they cannot be computed. A ``transformers`` experts module: ``param`` reads the hidden
    states when its input width is theirs, else the gated intermediate (``gate_up_proj`` or ``up_proj`` applied
    to the expert's tokens, then ``_apply_gate``/``act_fn``, as the module's forward does)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    count = getattr(experts, "num_experts", None)
    if not isinstance(index, Tensor) or not isinstance(count, int) or index.shape[0] != hidden.shape[0]:
        yield 0, None
        return
    routed = (index.reshape(index.shape[0], -1).unsqueeze(-1) == torch.arange(count, device=index.device)).any(1)
    first = next((n for n in ("gate_up_proj", "up_proj") if isinstance(getattr(experts, n, None), Tensor)), None)
    for expert in routed.any(0).nonzero().flatten().tolist():
        x: Tensor | None = hidden[routed[:, expert]]
        if x is not None and x.shape[-1] != features:
            x = _intermediate(experts, first, expert, x) if first is not None and first != param else None
        yield expert, x if x is not None and x.shape[-1] == features else None


def _intermediate(experts: nn.Module, first: str, expert: int, x: Tensor) -> Tensor:
    """The input of an expert's second matrix: its first matrix applied to ``x`` and gated as the module does."""
    weight = getattr(experts, first)[expert]
    out = x @ weight if getattr(experts, "is_transposed", False) else F.linear(x, weight)
    bias = getattr(experts, f"{first}_bias", None)
    if isinstance(bias, Tensor):
        out = out + bias[expert]
    gate = experts._apply_gate if first == "gate_up_proj" and hasattr(experts, "_apply_gate") else experts.act_fn
    return cast(Callable[[Tensor], Tensor], gate)(out)


# Shared with SparseGPT, which reads the same layer inputs: how each tensor's input is observed.
InputPlan = _Plan
plan_input = _plan
attention_heads = _attention_heads
routed_inputs = _routed_inputs
