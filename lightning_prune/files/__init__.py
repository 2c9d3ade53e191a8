"""Masks and pruned models on disk: one pack of (bitmask, values) (:mod:`~lightning_prune.files.packing`) serves the
callback's state, sparse safetensors files (:mod:`~lightning_prune.files.sparse_files`: ``save_sparse``,
``load_sparse``) and Lightning checkpoints (:mod:`~lightning_prune.files.checkpoint`: ``SparseCheckpointIO``);
every write is atomic (:mod:`~lightning_prune.files.atomic`)."""
