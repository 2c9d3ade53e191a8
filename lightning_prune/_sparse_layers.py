"""A permanent alias of :mod:`lightning_prune.inference.layers`, where the sparse layers now live.

Models converted by :func:`~lightning_prune.to_sparse_inference` of version 0.3 and saved with ``torch.save`` hold
the class paths ``lightning_prune._sparse_layers.SparseLinear`` (and ``SparsePointwiseConv2d``,
``SparseMultiheadAttention``); this module keeps them loading. New code imports from
:mod:`lightning_prune.inference`.
"""

from lightning_prune.inference.layers import (
    BLOCKS,
    Form,
    SparseLinear,
    SparseMultiheadAttention,
    SparsePointwiseConv2d,
    compress,
    project_in,
    seq_first,
)

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
