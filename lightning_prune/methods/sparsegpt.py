"""SparseGPT as a pruning method: prune each layer and update the weights it keeps from calibration activations.

:class:`SparseGPT` collects, for each chosen tensor, the sum ``sum x x^T`` of its layer's inputs over the
calibration batches (float32, ``in x in``), and at the step solves each tensor with
:func:`~lightning_prune.methods.sparsegpt_solver.sparsegpt_solve`. The new weights travel to the step in
:class:`~lightning_prune.NewMask`'s ``values``; :func:`~lightning_prune.prune_step` writes them into the parameter
before the store applies the masks, so files, checkpoints and reports see an ordinary pruned weight.

Sequential, as the paper: layers are solved in the order they run, and each layer's inputs are taken with the
layers before it already pruned and updated. The method records the inputs of the model's own ``forward``
during the calibration batches; before solving a tensor whose inputs may have changed (a tensor solved earlier in
the step runs before it), it runs the recorded batches again with a hook on that tensor's layer only, which stops
the forward pass as soon as the layer's input is seen (so the cost is one forward pass through the layers up to
it, per tensor and batch). A layer that runs more than once per forward pass runs to the end. Where the model's
``forward`` did not run as itself (a ``LightningModule`` whose ``training_step`` calls a submodule, or under DDP,
where Lightning's wrapper routes the call to ``training_step``), or with ``sequential=False``, every tensor is
solved from the Hessians of the calibration window (the inputs of the model as it was before the step).

Which input each tensor's Hessian reads (the plans of :class:`~lightning_prune.Wanda`):

* ``nn.Linear``, Hugging Face's ``Conv1D`` (stored ``(in, out)``) and registered 2-D matrix layers: the input's
  last dimension;
* ``nn.MultiheadAttention.in_proj_weight``: rows ``[0, E)`` from the query, ``[E, 2E)`` the key, ``[2E, 3E)`` the
  value, each third with the Hessian of its own input (``q/k/v_proj_weight`` likewise); ``out_proj``: the heads'
  output, computed again from the attention's inputs;
* ``nn.Conv1d`` and ``nn.Conv2d`` with ``groups=1``, zero padding given as numbers (or ``"valid"``): the unfolded
  input patches, the weight as its ``(out, in * kernel)`` matrix;
* fused Mixture-of-Experts tensors (``(E, out, in)`` or ``(E, in, out)``, see :mod:`lightning_prune.layers`): each
  expert's rows with the Hessian of the tokens its router sent to it (``down_proj`` from the gated intermediate of
  those tokens, as Wanda reads it); an expert that saw no token is pruned by magnitude per row, with a warning;
* anything else (grouped convolutions, ``Conv3d``, transposed convolutions, recurrent layers, biases, a layer that
  did not run): pruned per row by magnitude with no update (the solve with an identity Hessian), with a warning
  naming it. :meth:`SparseGPT._pieces` maps a tensor to ``(rows of its (out, in) matrix, Hessian)`` pieces.

Memory: one ``in x in`` float32 sum per tensor during the window (the callback observes every layer at once),
three such matrices while one tensor is solved; a tensor whose Hessian would need more than ``max_hessian_bytes``
is refused before any batch runs, with a message naming it and the bytes. Not for FSDP2 (DTensor) parameters:
refused before training (the callback) or before calibration (:func:`~lightning_prune.prune_once`). Under DDP the
Hessians are summed over the processes and rank 0's new weights and masks are sent to all (one all-reduce of each
tensor per step), so every process holds the same model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from lightning_prune._utils.checks import check_int
from lightning_prune._utils.lightning import rank_zero_warn
from lightning_prune.counting import count_for
from lightning_prune.layers import expert_call, is_stacked, to_out_in
from lightning_prune.methods import MaskReader, NewMask, PruningMethod
from lightning_prune.methods.nm import NMPruning
from lightning_prune.methods.sparsegpt_solver import HessianSum, check_hessian_size, sparsegpt_solve
from lightning_prune.methods.wanda import InputPlan as _Plan
from lightning_prune.methods.wanda import attention_heads as _attention_heads
from lightning_prune.methods.wanda import plan_input as _plan
from lightning_prune.methods.wanda import routed_inputs as _routed_inputs
from lightning_prune.patterns import check_nm
from lightning_prune.selection import PruningTarget

__all__ = ["SparseGPT"]

_QKV = ("query", "key", "value")
_MHA_ARGS = (*_QKV, "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


class _Stop(Exception):
    """Raised by a replay hook once it has seen its layer's input: the rest of the forward pass is skipped."""


class SparseGPT(PruningMethod):
    """Prune each tensor per output row and update the weights it keeps to reconstruct the layer's output
    (SparseGPT, Frantar & Alistarh 2023), from the activations of ``calibration_batches`` batches.

    With :func:`~lightning_prune.prune_once` (``dataloader=`` the calibration batches) the layers are solved one
    after the other in the order they run, each from inputs that the layers before it, already pruned and
    updated, produce (see the module docstring). As the callback's ``method=``, each scheduled step observes
    ``calibration_batches`` training batches (as :class:`~lightning_prune.Wanda`), then solves every tensor to
    its new cumulative target: entries pruned before stay pruned and the kept ones are updated again. Each row
    ends with exactly ``round(s * row length)`` zeros (local scope only). A checkpoint saved inside a window
    keeps no Hessians (``in x in`` per tensor): a resumed run observes the window's batches again.

    Args:
        calibration_batches: batches observed before each step, >= 1.
        block_size: columns whose masks are chosen together (the paper's 128); a multiple of ``m`` with ``nm``.
        dampening: ``lambda`` added to the Hessian's diagonal as a fraction of its mean, > 0; raised tenfold, with
            a warning, when a Cholesky factorisation fails.
        nm: ``(n, m)`` such as ``(2, 4)``: keep ``n`` of every ``m`` consecutive inputs, chosen during the solve;
            the method then takes no ``sparsity``. Tensors whose input size is not a multiple of ``m`` stay dense
            with a warning (as :class:`~lightning_prune.NMPruning`).
        sequential: re-run the recorded batches so that each layer sees the already-pruned layers before it
            (default); ``False``: every layer from the window's activations (one pass, all layers at once).
        max_hessian_bytes: the memory one tensor's solve may take (default 4 GiB: inputs up to 18918 wide).

    Raises:
        ValueError: for arguments out of range (here), ``scope="global"`` (when the callback is built), a
            tensor too wide for ``max_hessian_bytes`` or FSDP2 parameters (before any batch runs), inputs that
            are not finite (at the step).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune import prune_once
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> batches = [torch.randn(64, 16) for _ in range(4)]
        >>> masks = prune_once(net, 0.5, method=SparseGPT(calibration_batches=4), dataloader=batches)
        >>> [int((m == 0).sum()) for m in masks.values()], int((net[0].weight == 0).sum(1).max())
        ([256, 64], 8)
    """

    scopes = ("local",)
    supports_sharding = False

    def __init__(
        self,
        calibration_batches: int = 8,
        block_size: int = 128,
        dampening: float = 0.01,
        nm: tuple[int, int] | None = None,
        sequential: bool = True,
        max_hessian_bytes: int = 4 * 2**30,
    ) -> None:
        self.calibration_batches = check_int("calibration_batches", calibration_batches, minimum=1)
        self.block_size = check_int("block_size", block_size, minimum=1)
        if isinstance(dampening, bool) or not isinstance(dampening, (int, float)) or not 0 < dampening <= 1:
            raise ValueError(f"`dampening` must be in (0, 1], got {dampening!r}.")
        self.dampening = float(dampening)
        self.nm = None if nm is None else check_nm(*_pair(nm))
        if self.nm is not None and self.block_size % self.nm[1]:
            raise ValueError(f"`block_size` must be a multiple of m={self.nm[1]} with `nm`, got {block_size}.")
        self.sequential = bool(sequential)
        self.max_hessian_bytes = check_int("max_hessian_bytes", max_hessian_bytes, minimum=1)
        self.name = "sparsegpt" if self.nm is None else f"sparsegpt({self.nm[0]}:{self.nm[1]})"
        self.takes_sparsity = self.nm is None
        self._pattern = None if self.nm is None else NMPruning(*self.nm)
        self._plans: dict[str, _Plan | None] = {}
        self._sums: dict[str, list[HessianSum]] = {}
        self._fired: dict[str, int] = {}  # calls of each tensor's layer in the window
        self._order: list[str] = []  # tensors in the order their layers first ran
        self._batches: list[tuple[tuple, dict[str, Any]]] = []  # the model's forward inputs, for the replays
        self._handles: list[RemovableHandle] = []
        self._root: nn.Module | None = None
        self._reduce: Callable[[Tensor], Tensor] = _identity
        self._seen, self._observed = 0, False
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        extra = "" if self.nm is None else f", nm={self.nm}"
        return (
            f"SparseGPT(calibration_batches={self.calibration_batches}, block_size={self.block_size}, "
            f"dampening={self.dampening:g}{extra})"
        )

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the callback; hooks stay in this process
        return {**self.__dict__, "_handles": [], "_root": None, "_batches": [], "_reduce": _identity}

    def scope_error(self, scope: str) -> str:
        return f"{self!r} prunes each output row to its target and works in `scope='local'` only, got {scope!r}."

    def masked(self, targets: Sequence[PruningTarget]) -> list[PruningTarget]:
        return list(targets) if self._pattern is None else self._pattern.masked(targets)

    def setup(self, pl_module: nn.Module, targets: Sequence[PruningTarget]) -> None:
        if self._pattern is not None:
            self._pattern.setup(pl_module, targets)
        self._check(pl_module, self.masked(targets))

    def _check(self, root: nn.Module, targets: Sequence[PruningTarget]) -> None:
        """Refuse, before any batch runs, sharded parameters and tensors too wide for ``max_hessian_bytes``."""
        sharded = [t.name for t in targets if isinstance(t.tensor, DTensor)]
        if sharded:
            raise ValueError(
                f"{self!r} needs whole weight tensors; {sharded[:3]} are sharded (FSDP2 / DTensor). Prune before "
                "sharding, or use a method that works on shards (L1, random)."
            )
        attention = {id(m.out_proj): m for m in root.modules() if isinstance(m, nn.MultiheadAttention)}
        for t in targets:
            plan = _plan(root, t, attention)
            if plan is not None and (features := _features(t, plan)) is not None:
                check_hessian_size(t.name, features, self.max_hessian_bytes)

    # -- calibration (the window)

    def start_calibration(self, pl_module: nn.Module, targets: Sequence[PruningTarget], resume: bool = False) -> None:
        self.stop_calibration()
        self._check(pl_module, targets)
        attention = {id(m.out_proj): m for m in pl_module.modules() if isinstance(m, nn.MultiheadAttention)}
        self._root = pl_module
        for t in targets:
            plan = self._plans[t.name] = _plan(pl_module, t, attention)
            if plan is None or _features(t, plan) is None:
                self._plans[t.name] = None
                continue
            self._sums[t.name] = self._new_sums(t, plan)
            self._fired[t.name] = 0
            hook = functools.partial(self._observe, t.name, plan, self._sums[t.name])
            self._handles.append(plan.module.register_forward_pre_hook(hook, with_kwargs=True))
        if self.sequential:
            self._handles.append(pl_module.register_forward_pre_hook(self._record, with_kwargs=True))

    def _new_sums(self, target: PruningTarget, plan: _Plan) -> list[HessianSum]:
        features = _features(target, plan)
        if features is None:  # callers ask only for tensors that have a Hessian
            raise ValueError(f"SparseGPT: {target.name!r} has no Hessian to sum.")
        return [HessianSum(features, target.tensor.device) for _ in plan.streams]

    def calibration_done(self) -> bool:
        if not self._sums:
            return True
        if self._observed:
            self._seen, self._observed = self._seen + 1, False
        return self._seen >= self.calibration_batches

    def finish_calibration(self, reduce: Callable[[Tensor], Tensor]) -> None:
        self._reduce = reduce
        for name, sums in self._sums.items():
            _reduce_sums(sums, reduce)
            if not all(bool(torch.isfinite(s.sum).all()) for s in sums):
                raise ValueError(f"SparseGPT: the inputs of {name!r} hold NaN or infinite values; nothing was pruned.")

    def stop_calibration(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._sums, self._fired, self._batches, self._order = [], {}, {}, [], []
        self._seen, self._observed, self._root, self._reduce = 0, False, None, _identity

    def _record(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if "forward" in module.__dict__:  # a forward patched for this call (Lightning's DDP wrapper): no replay
            return
        if torch.is_grad_enabled() and len(self._batches) < self.calibration_batches:
            detach = functools.partial(torch.utils._pytree.tree_map_only, Tensor, lambda x: x.detach().clone())
            self._batches.append((detach(args), detach(kwargs)))

    def _observe(
        self, name: str, plan: _Plan, sums: list[HessianSum], module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> None:
        if not torch.is_grad_enabled() or name not in self._sums:  # training batches, not validation
            return
        with torch.no_grad():
            _accumulate(plan, sums, module, args, kwargs, name.rpartition(".")[2])
        self._fired[name] += 1
        if name not in self._order:
            self._order.append(name)
        self._observed = True

    # -- the step

    def local_masks(
        self, targets: Sequence[PruningTarget], sparsities: Sequence[float | None], seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        due = {t.name: s for t, s in zip(targets, sparsities)}
        chosen = {t.name: t for t in self.masked(targets)}
        ran = [chosen[n] for n in self._order if n in chosen]  # in the order their layers ran
        ordered = ran + [t for n, t in chosen.items() if n not in self._order]
        changed = False
        for t in ordered:
            sparsity = due.get(t.name)
            if self.nm is None and (sparsity is None or count_for(sparsity, _row_length(t)) == 0):
                continue
            hessians = self._hessians(t, refresh=changed)
            new = self._solve(t, hessians, sparsity, masks.mask(t))
            if new is not None:
                changed = True
                yield new

    def _hessians(self, target: PruningTarget, refresh: bool) -> list[Tensor] | None:
        """The Hessians of ``target``'s input streams: from a replay of the recorded batches when tensors solved
        before it may have changed its inputs, else from the window; ``None`` for a tensor without a plan."""
        plan = self._plans.get(target.name)
        if plan is None or target.name not in self._sums:
            why = "it is not the weight of a Linear, Conv1D, Conv1d/2d (one group) or MultiheadAttention"
            self._fallback(target.name, why)
            return None
        sums = self._sums[target.name]
        if refresh and self._batches and self._root is not None:
            sums = self._replay(target, plan)
        idle = [i for i, s in enumerate(sums) if float(s.rows) == 0]
        if len(idle) == len(sums):
            self._fallback(target.name, "its layer did not run in the calibration batches")
            return None
        if idle:  # experts that no token was routed to: magnitude per row there (an identity Hessian)
            self._fallback(f"{target.name} experts {idle}", "no token was routed to them in the calibration batches")
        eye = torch.eye(sums[0].features, dtype=torch.float32, device=sums[0].sum.device)
        hessians = [eye if i in idle else s.hessian() for i, s in enumerate(sums)]
        if not all(bool(torch.isfinite(h).all()) for h in hessians):
            raise ValueError(f"SparseGPT: the inputs of {target.name!r} hold NaN or infinite values.")
        return hessians

    def _replay(self, target: PruningTarget, plan: _Plan) -> list[HessianSum]:
        """Run the recorded batches through the model (eval mode) with a hook on ``target``'s layer only."""
        sums = self._new_sums(target, plan)
        stop = self._fired.get(target.name, 0) <= len(self._batches)  # at most once per pass: stop after it

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            with torch.no_grad():
                _accumulate(plan, sums, module, args, kwargs, target.param)
            if stop:
                raise _Stop

        root = self._root
        assert root is not None
        modes = {m: m.training for m in root.modules()}
        handle = plan.module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            root.eval()
            with torch.enable_grad():  # the ordinary path of nn.TransformerEncoderLayer, as in the window
                for args, kwargs in self._batches:
                    with contextlib.suppress(_Stop):
                        root(*args, **kwargs)
        finally:
            handle.remove()
            for module, mode in modes.items():
                module.training = mode
        _reduce_sums(sums, self._reduce)
        return sums

    def _solve(
        self, target: PruningTarget, hessians: list[Tensor] | None, sparsity: float | None, current: Tensor | None
    ) -> NewMask | None:
        layout = target.layout
        weight = to_out_in(target.tensor.detach(), layout)
        matrix = _as_rows(weight, layout)
        keep = None if current is None else to_out_in(current, layout).reshape(matrix.shape)
        due = count_for(sparsity or 0.0, matrix.shape[1])
        if keep is not None and self.nm is None and bool(((keep == 0).sum(1) >= due).all()):
            return None  # every row has its zeros already
        new_w, new_keep = torch.empty_like(matrix), torch.empty(matrix.shape, dtype=torch.uint8, device=matrix.device)
        for rows, hessian in self._pieces(target, matrix, hessians):
            w, m = sparsegpt_solve(
                matrix[rows], hessian, sparsity, nm=self.nm, block_size=self.block_size, dampening=self.dampening,
                current_mask=None if keep is None else keep[rows], name=target.name,
            )  # fmt: skip
            new_w[rows], new_keep[rows] = w, m
        new_w, new_keep = self._agree(new_w), self._agree(new_keep.float()).round().to(torch.uint8)
        if keep is not None and torch.equal(new_keep, keep.to(torch.uint8)) and self.nm is not None:
            return None
        values = to_out_in(new_w.view(weight.shape), layout)
        mask = to_out_in(new_keep.view(weight.shape), layout)
        return NewMask(target, mask, int((new_keep == 0).sum()), values=values)

    def _pieces(
        self, target: PruningTarget, matrix: Tensor, hessians: list[Tensor] | None
    ) -> Iterator[tuple[slice, Tensor]]:
        """``(rows of the (out, in) matrix, their Hessian)``: one piece per input stream (three for an attention's
        ``in_proj_weight``, one per expert of a fused experts tensor), or the whole matrix with an identity Hessian
        (magnitude per row, no update)."""
        rows = matrix.shape[0]
        if hessians is None:
            yield slice(0, rows), torch.eye(matrix.shape[1], dtype=torch.float32, device=matrix.device)
            return
        per = rows // len(hessians)
        for i, hessian in enumerate(hessians):
            yield slice(i * per, (i + 1) * per), hessian

    def _agree(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` on every process (a sum where the others add zeros); itself in one process."""
        reduce = self._reduce
        if reduce is _identity or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return tensor
        if int(reduce(torch.ones(1, device=tensor.device)).item()) <= 1:
            return tensor
        mine = tensor if torch.distributed.get_rank() == 0 else torch.zeros_like(tensor)
        return reduce(mine.clone()).to(tensor.dtype)

    def _fallback(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            rank_zero_warn(f"SparseGPT prunes {name!r} by magnitude per row, without updating it: {why}.")


def _pair(value: object) -> tuple[Any, Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"`nm` must be a pair (n, m) such as (2, 4), got {value!r}.")
    return value[0], value[1]


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _as_rows(weight: Tensor, layout: Any) -> Tensor:
    """An ``(out, in, ...)`` weight as ``(out, in * kernel)`` rows; a stacked ``(experts, out, in)`` one as
    ``(experts * out, in)``: each expert's rows one after the other."""
    return weight.reshape(-1, weight.shape[-1]) if is_stacked(layout) else weight.reshape(weight.shape[0], -1)


def _row_length(target: PruningTarget) -> int:
    weight = to_out_in(target.tensor, target.layout)
    if weight.dim() <= 1:
        return weight.numel()
    return _as_rows(weight, target.layout).shape[1]


def _reduce_sums(sums: list[HessianSum], reduce: Callable[[Tensor], Tensor]) -> None:
    for s in sums:
        s.sum.copy_(reduce(s.sum))
        s.rows.copy_(reduce(s.rows))


def _unfoldable(module: nn.Module) -> bool:
    """A ``Conv1d``/``Conv2d`` whose input patches ``F.unfold`` can form: one group, zero padding by numbers."""
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and module.groups == 1
        and module.padding_mode == "zeros"
        and (not isinstance(module.padding, str) or module.padding == "valid")
    )


def _features(target: PruningTarget, plan: _Plan) -> int | None:
    """The width of the rows the Hessian sums (``None``: no Hessian for this tensor)."""
    if plan.kind == "conv":
        return target.tensor[0].numel() if _unfoldable(plan.module) else None
    if plan.kind == "experts":
        return plan.features
    return plan.features if target.tensor.dim() == 2 else None


def _patches(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """The input patches of ``conv``, ``(positions, in * kernel)``, in the order of ``weight.reshape(out, -1)``."""
    unbatched = x.dim() == conv.weight.dim() - 1
    if unbatched:
        x = x.unsqueeze(0)
    pad = (0,) * len(conv.kernel_size) if isinstance(conv.padding, str) else conv.padding
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    if isinstance(conv, nn.Conv1d):  # as a 2-D convolution of height 1
        x, kernel, dilation, pad, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (0, *pad), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, padding=pad, stride=stride)  # (N, in * kernel, positions)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _accumulate(
    plan: _Plan, sums: list[HessianSum], module: nn.Module, args: tuple, kwargs: Mapping[str, Any], param: str
) -> None:
    """Add one call's inputs to ``sums`` (one per stream; for fused experts, one per expert: the inputs of the
    tokens routed to it)."""
    if plan.kind == "experts":
        hidden, index = expert_call(args, kwargs)
        for expert, x in _routed_inputs(module, param, hidden.detach(), index, plan.features):
            if x is None:
                raise ValueError(f"SparseGPT: the routed inputs of {type(module).__name__}.{param} are unknown.")
            sums[expert].add(x)
        return
    if plan.kind == "heads":
        inputs = [_attention_heads(cast(nn.MultiheadAttention, module), args, kwargs)]
    elif plan.kind == "qkv":
        bound = {**dict(zip(_MHA_ARGS, args)), **kwargs}
        inputs = [bound[_QKV[s]] for s in plan.streams]
    else:
        inputs = [args[0] if args else kwargs["input"]]
    for s, x in zip(sums, inputs):
        if plan.kind == "conv":
            x = _patches(cast(nn.Conv1d | nn.Conv2d, module), x.detach())
        if x.shape[-1] != s.features:
            name = type(module).__name__
            raise ValueError(f"SparseGPT: an input of {name} has {x.shape[-1]} features, not {s.features}.")
        s.add(x)
