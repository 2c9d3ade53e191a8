"""A pruned model for CPU inference, sparse where sparse kernels are measured faster: :func:`to_sparse_inference`.

The training form and the inference form are separate: the callback trains a plain model, and this module builds
a new module from it for serving, in which each eligible layer holds its weight as a sparse matrix **only where that
is measured faster** than the dense layer, on the shapes that ``example_inputs`` produce at that layer, with the
current torch thread count, by ``min_speedup`` or more; every other layer stays as it was. Eligible layers (read
from the table of :mod:`lightning_prune.layers`):

* ``nn.Linear`` (any leading dimensions) and Hugging Face's ``Conv1D`` (weight stored ``(in, out)``);
* ``nn.MultiheadAttention``'s input projections (packed ``in_proj``, or ``q_proj``/``k_proj``/``v_proj`` when
  ``kdim``/``vdim`` differ) and ``out_proj``, each chosen on its own; the layer keeps all its arguments and masks;
* 1x1 ``nn.Conv2d`` with stride 1, no padding and one group.

Candidates are torch's compressed formats with 32-bit indices: CSR, and BSR with 4/8/16/32-wide square blocks
where the blocks hold at most twice the nonzeros (they pay on block-structured zeros; random zeros fill every
block). Each is timed against the dense layer on the captured inputs, all layers in model order (so that each meets
the caches as in a forward pass), forms interleaved, after a warm-up; a layer's time is the fastest of ``repeats``
runs (the least disturbed by other processes: on a busy machine most runs of a short kernel wait on a descheduled
thread). The choices, the timings and the end-to-end latency are in a :class:`SparseInferenceReport`, which
:func:`inference_report` returns from the converted model (it is also printed with ``verbose=True``).

Example::

    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(torch.rand(256, 256) > 0.95)  # stands in for pruning: 95% zeros
    >>> fast = to_sparse_inference(net.eval(), torch.randn(4, 256), min_speedup=0, forms=("csr",))
    >>> type(fast[0]).__name__, type(fast[2]).__name__  # min_speedup=0: every layer sparse enough, by force
    ('SparseLinear', 'Linear')
    >>> x = torch.randn(4, 256)
    >>> with torch.no_grad():
    ...     torch.allclose(fast(x), net(x), atol=1e-5)
    True
    >>> [(layer.name, layer.form) for layer in inference_report(fast).layers]
    [('0', 'csr'), ('2', 'dense')]
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._sparse_layers import (
    BLOCKS,
    Form,
    SparseLinear,
    SparseMultiheadAttention,
    SparsePointwiseConv2d,
    project_in,
    seq_first,
)
from lightning_prune._utils.checks import allowed, check_choice, check_fraction, check_int, check_number
from lightning_prune.layers import matrix_layer, to_out_in

__all__ = ["LayerChoice", "SparseInferenceReport", "inference_report", "to_sparse_inference"]

DEFAULT_FORMS: tuple[Form, ...] = ("csr", "bsr4", "bsr8", "bsr16")
_WARMUP = 2
_MAX_CALLS = 4  # captured calls per layer (a layer used several times in one forward)
_MAX_BLOCK_FILL = 2.0  # BSR is tried where its blocks store at most this many values per nonzero
_REPORT_ATTRIBUTE = "_lightning_prune_inference_report"


@dataclass(frozen=True)
class LayerChoice:
    """What :func:`to_sparse_inference` decided for one weight matrix.

    Attributes:
        name: the layer's qualified name; an attention layer's projections are ``<name>.in_proj`` (or
            ``.q_proj``/``.k_proj``/``.v_proj``) and ``<name>.out_proj``.
        kind: ``"Linear"``, ``"Conv1D"``, ``"Conv2d 1x1"`` or ``"MultiheadAttention"``.
        shape: the matrix's ``(out, in)``.
        sparsity: its fraction of zeros.
        form: ``"dense"`` or the sparse form in place: ``"csr"``, ``"bsr<b>"``.
        dense_seconds: the dense layer's time on the captured inputs, the fastest of ``repeats`` runs (``None``
            where not measured).
        sparse_seconds: the same for the fastest sparse form (``None`` where none was measured).
        fastest_sparse: that form, also where the layer stayed dense.
        note: why the layer stayed dense, or ``""``.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    sparsity: float
    form: str
    dense_seconds: float | None = None
    sparse_seconds: float | None = None
    fastest_sparse: str | None = None
    note: str = ""

    @property
    def speedup(self) -> float | None:
        """``dense_seconds / sparse_seconds`` of the fastest sparse form, where both were measured."""
        if self.dense_seconds is None or not self.sparse_seconds:
            return None
        return self.dense_seconds / self.sparse_seconds


@dataclass(frozen=True)
class SparseInferenceReport:
    """The per-layer choices and the end-to-end latency of a model converted by :func:`to_sparse_inference`;
    ``str(report)`` is a table.

    Attributes:
        layers: one :class:`LayerChoice` per eligible weight matrix, in model order.
        dense_seconds: median latency of the dense model (eval mode) on ``example_inputs``.
        sparse_seconds: the same for the converted model (measured interleaved with the dense one).
        dense_bytes: bytes of the dense model's tensors (parameters and buffers, shared storage once).
        sparse_bytes: the same for the converted model.
        threads: ``torch.get_num_threads()`` during the measurements.
        min_speedup: the margin a sparse form had to beat the dense layer by.
        repeats: timed runs per layer and form, and end to end.
    """

    layers: tuple[LayerChoice, ...]
    dense_seconds: float
    sparse_seconds: float
    dense_bytes: int
    sparse_bytes: int
    threads: int
    min_speedup: float
    repeats: int = field(default=7)

    @property
    def speedup(self) -> float:
        """End to end: ``dense_seconds / sparse_seconds``."""
        return self.dense_seconds / self.sparse_seconds if self.sparse_seconds else float("inf")

    @property
    def sparse_layers(self) -> tuple[LayerChoice, ...]:
        """The layers replaced by a sparse form."""
        return tuple(layer for layer in self.layers if layer.form != "dense")

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and strings for JSON."""
        out = {k: v for k, v in asdict(self).items() if k != "layers"}
        out["speedup"] = self.speedup
        out["layers"] = [
            {**asdict(layer), "shape": list(layer.shape), "speedup": layer.speedup} for layer in self.layers
        ]
        return out

    def __str__(self) -> str:
        def ms(seconds: float | None) -> str:
            return "" if seconds is None else f"{seconds * 1e3:.3f}"

        rows = [("layer", "kind", "shape", "sparsity", "form", "dense ms", "sparse ms", "speed-up", "note")]
        for c in self.layers:
            speedup = "" if c.speedup is None else f"{c.speedup:.2f}x {c.fastest_sparse}"
            shape = f"{c.shape[0]}x{c.shape[1]}"
            rows.append(
                (c.name, c.kind, shape, f"{c.sparsity:.4f}", c.form, ms(c.dense_seconds), ms(c.sparse_seconds))
                + (speedup, c.note)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        left = {0, 1, 4, 8}
        lines = [
            "  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows
        ]
        lines.insert(1, "-" * max(len(line) for line in lines))
        lines.append(
            f"{len(self.sparse_layers)} of {len(self.layers)} matrices sparse (min_speedup {self.min_speedup:g}, "
            f"{self.threads} threads, layers: fastest of {self.repeats} runs); end to end on example_inputs "
            f"(median): dense "
            f"{ms(self.dense_seconds)} ms, converted {ms(self.sparse_seconds)} ms, {self.speedup:.2f}x; tensors "
            f"{self.dense_bytes / 2**20:.1f} MiB -> {self.sparse_bytes / 2**20:.1f} MiB "
            f"({self.sparse_bytes / max(self.dense_bytes, 1):.2f}x)"
        )
        return "\n".join(lines)


@dataclass
class _Matrix:
    """One weight matrix to decide: how to build its sparse module and how to run the captured work on a module."""

    name: str
    kind: str
    weight: Tensor  # (out, in)
    bias: Tensor | None
    dense: nn.Module
    build: Callable[[Tensor, Tensor | None, Form], nn.Module]
    runs: list[Callable[[nn.Module], Any]]
    row_block: int | None = None  # BSR blocks must divide it (a packed projection is sliced at its multiples)


def _dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are ``weight`` and ``bias`` themselves (no copy)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return layer


def _is_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.groups == 1
    )


def _is_hf_conv1d(module: nn.Module) -> bool:
    entry = matrix_layer(module, "weight")
    return entry is not None and entry.label == "Conv1D" and entry.layout == "in_out" and module.weight.dim() == 2


def _eligible(model: nn.Module) -> dict[nn.Module, tuple[str, str]]:
    """``{module: (name, kind)}`` of the layers that may be converted, in model order."""
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    found: dict[nn.Module, tuple[str, str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            found[module] = (name, "MultiheadAttention")
        elif id(module) in inside_attention:
            continue  # attention's out_proj is decided with its attention layer, which reads its weight
        elif isinstance(module, nn.Linear):
            found[module] = (name, "Linear")
        elif _is_hf_conv1d(module):
            found[module] = (name, "Conv1D")
        elif _is_pointwise(module):
            found[module] = (name, "Conv2d 1x1")
    return found


def _detached(value: Any, memo: dict[int, Tensor]) -> Any:
    """A copy of a tensor argument (one copy per tensor: an attention layer's ``query is key`` stays true)."""
    if not isinstance(value, Tensor):
        return value
    if id(value) not in memo:
        memo[id(value)] = value.detach().clone()
    return memo[id(value)]


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _capture(model: nn.Module, layers: dict[nn.Module, Any], example_inputs: Any) -> dict[nn.Module, list]:
    """The ``(args, kwargs)`` of the first calls of each layer in one forward pass on ``example_inputs`` (with
    torch's fused attention paths off, so that every attention layer's own ``forward`` runs)."""
    calls: dict[nn.Module, list] = {m: [] for m in layers}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(calls[module]) < _MAX_CALLS:
            memo: dict[int, Tensor] = {}
            copied = tuple(_detached(a, memo) for a in args), {k: _detached(v, memo) for k, v in kwargs.items()}
            calls[module].append(copied)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            _call(model, example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for handle in handles:
            handle.remove()
    return calls


def _linear_matrices(name: str, module: nn.Module, kind: str, calls: list) -> list[_Matrix]:
    inputs = [args[0] if args else kwargs.get("input", kwargs.get("x")) for args, kwargs in calls]
    runs = [lambda m, x=x: m(x) for x in inputs if isinstance(x, Tensor) and not x.is_nested]
    if kind == "Conv2d 1x1":
        weight, build = module.weight[:, :, 0, 0], SparsePointwiseConv2d
    else:
        weight, build = to_out_in(module.weight, "in_out" if kind == "Conv1D" else "out_in"), SparseLinear
    return [_Matrix(name, kind, weight, module.bias, module, build, runs)]


def _attention_matrices(name: str, module: nn.MultiheadAttention, calls: list) -> list[_Matrix]:
    e, prefix = module.embed_dim, f"{name}." if name else ""
    qkv, out_inputs, g = [], [], torch.Generator(module.out_proj.weight.device).manual_seed(0)
    for args, kwargs in calls:
        named = dict(zip(("query", "key", "value"), args)) | kwargs
        q, k, v = (named.get(n) for n in ("query", "key", "value"))
        if all(isinstance(x, Tensor) and not x.is_nested for x in (q, k, v)):
            qkv.append(seq_first(q, k, v, module.batch_first))
            out_inputs.append(torch.randn(q.numel() // q.shape[-1], e, generator=g, device=q.device).to(q.dtype))
    kind = "MultiheadAttention"
    bias = module.in_proj_bias
    if module._qkv_same_embed_dim:

        def packed(x: tuple[Tensor, Tensor, Tensor]) -> Callable[[nn.Module], Any]:
            return lambda m: project_in({"in_proj": m}, *x, e)

        dense = _dense_linear(module.in_proj_weight, bias)
        runs = [packed(x) for x in qkv]
        matrices = [_Matrix(prefix + "in_proj", kind, module.in_proj_weight, bias, dense, SparseLinear, runs, e)]
    else:
        biases = (None, None, None) if bias is None else bias.chunk(3)
        matrices = []
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            weight = getattr(module, f"{part}_weight")
            runs = [lambda m, x=x[i]: m(x) for x in qkv]
            dense = _dense_linear(weight, biases[i])
            matrices.append(_Matrix(prefix + part, kind, weight, biases[i], dense, SparseLinear, runs))
    out = module.out_proj
    runs = [lambda m, x=x: m(x) for x in out_inputs]
    matrices.append(_Matrix(prefix + "out_proj", kind, out.weight, out.bias, out, SparseLinear, runs))
    return matrices


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _medians(fns: Sequence[Callable[[], Any]], repeats: int, device: torch.device) -> list[float]:
    """Median wall times of ``fns``, run interleaved (order reversed every other round) after a warm-up."""
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(_WARMUP + repeats):
        order = range(len(fns)) if round_ % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            _sync(device)
            start = time.perf_counter()
            fns[i]()
            _sync(device)
            if round_ >= _WARMUP:
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    return []


def _same(sparse: Any, dense: Any) -> bool:
    """Equal within float summation tolerance (relative to the largest output entry)."""
    pairs = list(zip(_tensors(sparse), _tensors(dense)))
    return bool(pairs) and all(
        s.shape == d.shape
        and torch.allclose(s.float(), d.float(), rtol=1e-3, atol=1e-4 * float(d.abs().nan_to_num().max()) + 1e-6)
        for s, d in pairs
    )


def _forms_for(matrix: _Matrix, forms: Sequence[Form]) -> list[Form]:
    """``forms`` less the block sizes that do not divide the matrix or whose blocks store too many zeros."""
    out, (rows, cols) = [], matrix.weight.shape
    nonzero = matrix.weight.detach() != 0
    nnz = int(nonzero.sum())
    for form in forms:
        b = BLOCKS[form]
        if b is not None:
            if rows % b or cols % b or (matrix.row_block or rows) % b:
                continue
            blocks = int(nonzero.view(rows // b, b, cols // b, b).any(dim=3).any(dim=1).sum())
            if blocks * b * b > _MAX_BLOCK_FILL * max(nnz, 1):
                continue
        out.append(form)
    return out


@dataclass
class _Trial:
    """A matrix with its sparse modules that ran and gave the dense layer's results, and their timings."""

    matrix: _Matrix
    choice: LayerChoice
    candidates: dict[str, nn.Module]
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def run(self, form: str) -> None:
        module = self.matrix.dense if form == "dense" else self.candidates[form]
        for run in self.matrix.runs:
            run(module)


def _prepare(matrix: _Matrix, forms: Sequence[Form], min_sparsity: float) -> _Trial:
    """The matrix's sparsity and the sparse forms that may replace it (built, and checked on the captured inputs)."""
    w = matrix.weight.detach()
    sparsity = float((w == 0).sum()) / max(w.numel(), 1)
    trial = _Trial(matrix, LayerChoice(matrix.name, matrix.kind, (w.shape[0], w.shape[1]), sparsity, "dense"), {})
    if sparsity < min_sparsity or sparsity == 0:
        trial.choice = _with(trial.choice, note=f"sparsity below min_sparsity {min_sparsity:g}")
        return trial
    if not matrix.runs:
        trial.choice = _with(trial.choice, note="not run by example_inputs")
        return trial
    reference = [run(matrix.dense) for run in matrix.runs]
    failures = []
    for form in _forms_for(matrix, forms):
        try:
            module = matrix.build(w, matrix.bias, form).eval()
            if not all(_same(run(module), ref) for run, ref in zip(matrix.runs, reference)):
                failures.append(f"{form}: results differ from the dense layer's")
                continue
        except (RuntimeError, NotImplementedError, TypeError) as err:
            failures.append(f"{form}: {str(err).splitlines()[0][:90]}")
            continue
        trial.candidates[form] = module
    if not trial.candidates:
        trial.choice = _with(trial.choice, note="no sparse form ran: " + ("; ".join(failures) or "none fits"))
    return trial


def _time_in_order(trials: Sequence[_Trial], repeats: int, device: torch.device) -> None:
    """Each trial's dense and sparse modules timed on its captured inputs, all layers in model order for one form
    after the other (so that each layer meets the caches as in a forward pass of a model in that form), forms
    interleaved in every round, the order reversed every other round, after a warm-up; all times in ``seconds``."""
    timed = [t for t in trials if t.candidates]
    forms = ["dense", *dict.fromkeys(f for t in timed for f in t.candidates)]
    for t in timed:
        t.seconds = {f: [] for f in ("dense", *t.candidates)}
    for round_ in range(_WARMUP + repeats):
        for form in forms if round_ % 2 == 0 else reversed(forms):
            for t in timed:
                if form not in t.seconds:
                    continue
                _sync(device)
                start = time.perf_counter()
                t.run(form)
                _sync(device)
                if round_ >= _WARMUP:
                    t.seconds[form].append(time.perf_counter() - start)


def _choose(trial: _Trial, min_speedup: float) -> nn.Module | None:
    """Set ``trial.choice`` from its timings; the sparse module chosen, or ``None`` for dense."""
    if not trial.candidates:
        return None
    fastest = {f: min(v) for f, v in trial.seconds.items()}
    dense = fastest.pop("dense")
    form = min(fastest, key=fastest.__getitem__)
    choice = _with(trial.choice, dense_seconds=dense, sparse_seconds=fastest[form], fastest_sparse=form)
    if dense >= min_speedup * fastest[form]:
        trial.choice = _with(choice, form=form)
        return trial.candidates[form]
    trial.choice = _with(choice, note=f"{dense / fastest[form]:.2f}x < min_speedup {min_speedup:g}")
    return None


def _with(choice: LayerChoice, **changes: Any) -> LayerChoice:
    return LayerChoice(**{**asdict(choice), **changes})


def _tensor_bytes(model: nn.Module) -> int:
    storages = {}
    for t in (*model.parameters(), *model.buffers()):
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), t.device)] = storage.nbytes()
    return sum(storages.values())


class _Swap:
    """Puts the dense or the converted modules in place in the copy, and turns off the fused paths of
    ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` (which read dense weights) around converted ones."""

    def __init__(self, root: nn.Module, replaced: dict[nn.Module, nn.Module], names: dict[nn.Module, list[str]]):
        self.root, self.places, self.flags = root, [], []
        for dense, sparse in replaced.items():
            for name in names[dense]:
                parent, _, child = name.rpartition(".")
                self.places.append((root.get_submodule(parent), child, dense, sparse))
        paths = [name for dense in replaced for name in names[dense]]
        for name, module in root.named_modules():
            inside = any(p.startswith(f"{name}.") for p in paths) if name else bool(paths)
            if inside and isinstance(module, nn.TransformerEncoderLayer):
                self.flags.append((module, "activation_relu_or_gelu", module.activation_relu_or_gelu, 0))
            elif inside and isinstance(module, nn.TransformerEncoder):
                self.flags.append((module, "use_nested_tensor", getattr(module, "use_nested_tensor", False), False))

    def install(self, sparse: bool) -> None:
        for parent, child, dense, converted in self.places:
            setattr(parent, child, converted if sparse else dense)
        for module, attribute, dense_value, sparse_value in self.flags:
            setattr(module, attribute, sparse_value if sparse else dense_value)


def to_sparse_inference(
    model: nn.Module,
    example_inputs: Any,
    *,
    min_speedup: float = 1.1,
    min_sparsity: float = 0.5,
    forms: Sequence[Form] = DEFAULT_FORMS,
    repeats: int = 7,
    verbose: bool = False,
) -> nn.Module:
    """A new module for inference in which each eligible layer is sparse where measured faster (module docstring).

    ``model`` is left untouched: the result is a deep copy, in eval mode and with ``requires_grad=False``, in
    which the chosen layers are replaced by :class:`~lightning_prune._sparse_layers.SparseLinear`,
    ``SparsePointwiseConv2d`` or ``SparseMultiheadAttention``. One forward pass on ``example_inputs`` (with hooks)
    finds the inputs of every layer; each layer's dense and sparse forms are then timed on them with the current
    ``torch.get_num_threads()``, and the converted and dense models end to end. Outputs equal the dense model's
    within float32 summation tolerance. Save the result with ``torch.save(converted, path)`` and load it with
    ``torch.load(path, weights_only=False)``.

    Args:
        model: the pruned model (any mode; a copy is put in eval mode, the argument is not).
        example_inputs: one forward pass's inputs, shaped as in serving (batch size, sequence length, a key-value
            cache): a tensor, a tuple of positional inputs or a dict of keyword inputs.
        min_speedup: a layer is made sparse where its fastest sparse form takes at most ``1 / min_speedup`` of
            the dense time; ``0`` makes every layer sparse that passes ``min_sparsity`` and has a sparse kernel
            (no timing decides; for tests).
        min_sparsity: layers with a smaller fraction of zeros are left dense without being timed (a layer with
            no zeros always is).
        forms: the sparse forms to try, among ``"csr"``, ``"bsr4"``, ``"bsr8"``, ``"bsr16"``, ``"bsr32"``.
        repeats: timed runs per layer and form (the fastest counts) and end to end (the median), after two
            warm-up runs.
        verbose: print the :class:`SparseInferenceReport`.

    Returns:
        The converted module; :func:`inference_report` gives its report.

    Raises:
        ValueError: for a bad argument.
    """
    min_speedup = check_number("min_speedup", min_speedup, low=0.0)
    min_sparsity = check_fraction("min_sparsity", min_sparsity, closed=True)
    repeats = check_int("repeats", repeats, minimum=1)
    if isinstance(forms, str) or not forms:
        raise ValueError(f"`forms` must be a non-empty list of {list(allowed(Form))}, got {forms!r}.")
    forms = tuple(check_choice("forms", f, allowed(Form)) for f in forms)
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    if example_inputs is None:
        raise ValueError("`example_inputs` is required: the inputs of one forward pass, shaped as in serving.")
    dense_bytes = _tensor_bytes(model)
    root = copy.deepcopy(model).eval().requires_grad_(False)
    layers = _eligible(root)
    calls = _capture(root, layers, example_inputs)
    choices: list[LayerChoice] = []
    replaced: dict[nn.Module, nn.Module] = {}
    with torch.no_grad():
        matrices = {
            module: _attention_matrices(name, module, calls[module])
            if kind == "MultiheadAttention"
            else _linear_matrices(name, module, kind, calls[module])
            for module, (name, kind) in layers.items()
        }
        trials = {module: [_prepare(m, forms, min_sparsity) for m in ms] for module, ms in matrices.items()}
        device = next((t.device for t in root.parameters()), torch.device("cpu"))
        _time_in_order([t for ts in trials.values() for t in ts], repeats, device)
        for module, module_trials in trials.items():
            chosen = [_choose(t, min_speedup) for t in module_trials]
            choices += [t.choice for t in module_trials]
            if all(sparse is None for sparse in chosen):
                continue
            if layers[module][1] == "MultiheadAttention":
                parts = {t.matrix.name.rpartition(".")[2]: c or t.matrix.dense for t, c in zip(module_trials, chosen)}
                replaced[module] = SparseMultiheadAttention(module, parts).eval()
            else:
                replaced[module] = chosen[0]
        del trials
        names: dict[nn.Module, list[str]] = {m: [] for m in replaced}
        for name, module in root.named_modules(remove_duplicate=False):
            if module in names:
                names[module].append(name)
        if "" in names.get(root, []):  # the model is itself one layer
            converted = replaced[root]
            roots = [root, converted]
            swap = None
        else:
            swap = _Swap(root, replaced, names)
            converted, roots = root, [root, root]

        def forward(sparse: bool) -> Callable[[], Any]:
            def run() -> Any:
                if swap is not None:
                    swap.install(sparse)
                return _call(roots[sparse], example_inputs)

            return run

        dense_t, sparse_t = _medians([forward(False), forward(True)], repeats, device)
        if swap is not None:
            swap.install(True)
    converted.requires_grad_(False)
    report = SparseInferenceReport(
        tuple(choices),
        dense_t,
        sparse_t,
        dense_bytes,
        _tensor_bytes(converted),
        torch.get_num_threads(),
        min_speedup,
        repeats,
    )
    setattr(converted, _REPORT_ATTRIBUTE, report)
    if verbose:
        print(report)
    return converted


def inference_report(model: nn.Module) -> SparseInferenceReport:
    """The :class:`SparseInferenceReport` of a model that :func:`to_sparse_inference` returned (kept through
    ``torch.save``/``torch.load``).

    Raises:
        ValueError: when ``model`` was not made by :func:`to_sparse_inference`.
    """
    report = getattr(model, _REPORT_ATTRIBUTE, None)
    if not isinstance(report, SparseInferenceReport):
        raise ValueError(f"{type(model).__name__} was not made by to_sparse_inference: it has no inference report.")
    return report
