"""A pruned model for CPU inference, sparse where sparse kernels are measured faster: :func:`to_sparse_inference`;
and a speed-up asked for before training, resolved into per-layer sparsities: :func:`plan_speedup`.

The training form and the inference form are separate: the callback trains a plain model, and
:func:`to_sparse_inference` builds a new module from it for serving, in which each eligible layer holds its weight
as a sparse matrix **only where that is measured faster** than the dense layer, on the row counts that
``example_inputs`` give that layer, with the current torch thread count, by ``min_speedup`` or more; every other
layer stays as it was. Eligible layers (read from the table of :mod:`lightning_prune.layers`):

* ``nn.Linear`` (any leading dimensions), Hugging Face's ``Conv1D`` (weight stored ``(in, out)``) and layers
  declared with :func:`~lightning_prune.register_matrix_layer` that multiply their input's last dimension;
* ``nn.MultiheadAttention``'s input projections (packed ``in_proj``, or ``q_proj``/``k_proj``/``v_proj`` when
  ``kdim``/``vdim`` differ) and ``out_proj``, each chosen on its own; the layer keeps all its arguments and masks;
* 1x1 ``nn.Conv2d`` with stride 1, no padding and one group.

A Mixture-of-Experts layer's fused expert tensors stay dense (no measured kernel), and the report says so. For
2:4 patterns (:class:`~lightning_prune.NMPruning`) on NVIDIA GPUs, :func:`to_semi_structured` hands ``nn.Linear``
weights to torch's semi-structured kernels instead.

Three phases: **capture** (one forward pass with hooks records each layer's inputs), **decide** (per matrix, the
candidate forms, CSR and BSR, are checked on those inputs, screened by a cost model, timed against the dense layer
at the example's row counts and then on a ladder of row counts, so that each sparse layer serves the row counts
where it pays and hands the others to a dense copy), **install** (the converted model is timed against the dense
one end to end; where it is slower than ``min_speedup``, layers are made dense again, the least gain first, until
it pays or all are dense). ``other_inputs`` gives more shapes to serve: every layer is decided on all their row
counts, and the converted model must keep :data:`NOT_SLOWER` of the dense speed on each. Timing goes through a
:class:`Timer` (default :class:`WallClock`: adaptive repeats under a budget, a clearly slower form dropped
early); pass your own to decide without the machine's speed. The choices, the timings and the end-to-end latency
are in a :class:`SparseInferenceReport`, which :func:`inference_report` returns from the converted model (it is
also printed with ``verbose=True``).

Example::

    >>> import torch
    >>> from torch import nn
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

from lightning_prune.inference.convert import DEFAULT_FORMS, NOT_SLOWER, to_sparse_inference
from lightning_prune.inference.layers import SparseLinear, SparseMultiheadAttention, SparsePointwiseConv2d
from lightning_prune.inference.plan import PlannedLayer, SpeedPlan, plan_speedup
from lightning_prune.inference.report import LayerChoice, SparseInferenceReport, inference_report
from lightning_prune.inference.semi_structured import to_semi_structured
from lightning_prune.inference.timing import Timer, Timing, WallClock

__all__ = [
    "DEFAULT_FORMS",
    "NOT_SLOWER",
    "LayerChoice",
    "PlannedLayer",
    "SpeedPlan",
    "SparseInferenceReport",
    "SparseLinear",
    "SparseMultiheadAttention",
    "SparsePointwiseConv2d",
    "Timer",
    "Timing",
    "WallClock",
    "inference_report",
    "plan_speedup",
    "to_semi_structured",
    "to_sparse_inference",
]
