"""What :func:`~lightning_prune.to_sparse_inference` decided and measured: :class:`LayerChoice` per weight matrix,
:class:`SparseInferenceReport` for the model, :func:`inference_report` to read it back from a converted model.

Example::

    >>> choice = LayerChoice("fc", "Linear", (64, 32), 0.9, "csr", 2e-5, 1e-5, "csr", max_rows=512)
    >>> choice.speedup, choice.sparse_rows
    (2.0, '0-512')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from lightning_prune._utils.table import format_table

__all__ = ["REPORT_ATTRIBUTE", "LayerChoice", "SparseInferenceReport", "inference_report"]

REPORT_ATTRIBUTE = "_lightning_prune_inference_report"


@dataclass(frozen=True)
class LayerChoice:
    """What :func:`~lightning_prune.to_sparse_inference` decided for one weight matrix.

    Attributes:
        name: the layer's qualified name; an attention layer's projections are ``<name>.in_proj`` (or
            ``.q_proj``/``.k_proj``/``.v_proj``) and ``<name>.out_proj``; a fused expert tensor
            ``<name>.<parameter>``.
        kind: ``"Linear"``, ``"Conv1D"``, ``"Conv2d 1x1"``, ``"MultiheadAttention"``, a registered layer's class
            name, or ``"experts"`` (a Mixture-of-Experts layer's fused ``(experts, out, in)`` tensor).
        shape: the matrix's ``(out, in)`` (one expert's, for fused experts).
        sparsity: its fraction of zeros.
        form: ``"dense"`` or the sparse form in place: ``"csr"``, ``"bsr<b>"``.
        dense_seconds: the dense layer's time on the example's row counts (``None`` where not measured).
        sparse_seconds: the same for the fastest sparse form (``None`` where none was measured).
        fastest_sparse: that form, also where the layer stayed dense.
        note: why the layer stayed dense (or was backed off), or ``""``.
        min_rows: the fewest input vectors the sparse form serves (fewer: the dense copy).
        max_rows: the most input vectors it serves (more: the dense copy); ``None``: no bound.
        rows: the row counts the example gave the layer (one per captured call).
        ladder: ``(rows, dense seconds, sparse seconds)`` of the chosen form at each row count measured.
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
    min_rows: int = 0
    max_rows: int | None = None
    rows: tuple[int, ...] = ()
    ladder: tuple[tuple[int, float, float], ...] = ()

    @property
    def speedup(self) -> float | None:
        """``dense_seconds / sparse_seconds`` of the fastest sparse form, where both were measured."""
        if self.dense_seconds is None or not self.sparse_seconds:
            return None
        return self.dense_seconds / self.sparse_seconds

    @property
    def sparse_rows(self) -> str:
        """The row counts served by the sparse form: ``"any"``, ``"0-512"``, ``"8-any"``; ``""`` when dense."""
        if self.form == "dense":
            return ""
        if self.min_rows == 0 and self.max_rows is None:
            return "any"
        return f"{self.min_rows}-{'any' if self.max_rows is None else self.max_rows}"

    def with_(self, **changes: Any) -> LayerChoice:
        """A copy with ``changes``."""
        return replace(self, **changes)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.3f}"


@dataclass(frozen=True)
class SparseInferenceReport:
    """The per-layer choices and the end-to-end latency of a model converted by
    :func:`~lightning_prune.to_sparse_inference`; ``str(report)`` is a table.

    Attributes:
        layers: one :class:`LayerChoice` per eligible weight matrix (and fused expert tensor), in model order.
        dense_seconds: latency of the dense model (eval mode) on ``example_inputs``: the fastest of its runs.
        sparse_seconds: the same for the model returned (the dense figure when every layer is dense): what the
            user gets.
        dense_bytes: bytes of the dense model's tensors (parameters and buffers, shared storage once).
        sparse_bytes: the same for the converted model (dense copies included).
        threads: ``torch.get_num_threads()`` during the measurements.
        min_speedup: the margin a sparse form had to beat the dense layer by, and the converted model the dense
            one end to end.
        repeats: the most timed runs per layer and form, and end to end.
        fallback_bytes: bytes of the dense copies kept for row counts outside a layer's sparse range.
        seconds: how long the conversion took.
        backed_off: the layers made dense again because the converted model was slower end to end.
        note: why every layer is dense, or ``""``.
        other_inputs: ``(dense seconds, converted seconds)`` end to end on each of ``other_inputs``.
    """

    layers: tuple[LayerChoice, ...]
    dense_seconds: float
    sparse_seconds: float
    dense_bytes: int
    sparse_bytes: int
    threads: int
    min_speedup: float
    repeats: int = field(default=7)
    fallback_bytes: int = 0
    seconds: float = 0.0
    backed_off: tuple[str, ...] = ()
    note: str = ""
    other_inputs: tuple[tuple[float, float], ...] = ()

    @property
    def speedup(self) -> float:
        """End to end: ``dense_seconds / sparse_seconds``."""
        return self.dense_seconds / self.sparse_seconds if self.sparse_seconds else float("inf")

    @property
    def other_speedups(self) -> tuple[float, ...]:
        """End to end on each of ``other_inputs``: dense seconds over converted seconds."""
        return tuple(d / s if s else float("inf") for d, s in self.other_inputs)

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
        rows: list[tuple[str, ...]] = [
            ("layer", "kind", "shape", "sparsity", "form", "sparse rows", "dense ms", "sparse ms", "speed-up")
        ]
        for c in self.layers:
            speedup = "" if c.speedup is None else f"{c.speedup:.2f}x {c.fastest_sparse}"
            shape = f"{c.shape[0]}x{c.shape[1]}"
            rows.append((c.name, c.kind, shape, f"{c.sparsity:.4f}", c.form, c.sparse_rows))
            rows[-1] += (_ms(c.dense_seconds), _ms(c.sparse_seconds), speedup)
        lines = format_table(rows)
        lines += [f"{c.name}: {c.note}" for c in self.layers if c.note]
        mib = 2**20
        lines.append(
            f"{len(self.sparse_layers)} of {len(self.layers)} matrices sparse (min_speedup {self.min_speedup:g}, "
            f"{self.threads} threads, layers: fastest of up to {self.repeats} runs); end to end on example_inputs: "
            f"dense {_ms(self.dense_seconds)} ms, converted {_ms(self.sparse_seconds)} ms, {self.speedup:.2f}x"
            + (f" ({len(self.backed_off)} layers backed off)" if self.backed_off else "")
        )
        if self.other_inputs:
            lines.append("end to end on other_inputs: " + ", ".join(f"{v:.2f}x" for v in self.other_speedups))
        lines.append(
            f"tensors {self.dense_bytes / mib:.1f} MiB -> {self.sparse_bytes / mib:.1f} MiB "
            f"({self.sparse_bytes / max(self.dense_bytes, 1):.2f}x; dense copies for other row counts "
            f"{self.fallback_bytes / mib:.1f} MiB); converted in {self.seconds:.1f} s"
        )
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def inference_report(model: nn.Module) -> SparseInferenceReport:
    """The :class:`SparseInferenceReport` of a model that :func:`~lightning_prune.to_sparse_inference` returned
    (kept through ``torch.save``/``torch.load``).

    Raises:
        ValueError: when ``model`` was not made by :func:`~lightning_prune.to_sparse_inference`.
    """
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if not isinstance(report, SparseInferenceReport):
        raise ValueError(f"{type(model).__name__} was not made by to_sparse_inference: it has no inference report.")
    return report
