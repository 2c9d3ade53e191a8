"""Moving to this package from torch's pruning form: version 0.1 checkpoints, models pruned with
``torch.nn.utils.prune``, and ``mask_mode="hook"`` runs that kept their masks on the model.

Torch's form keeps ``<name>_orig``, a ``<name>_mask`` buffer and a forward pre-hook on the module; this package
keeps plain parameters and masks aside. The functions here convert the first into the second; they are thin
public names over :mod:`lightning_prune.reparam`, the one module that knows torch's form.

* :func:`upgrade_state_dict`: a ``state_dict`` in torch's form (a 0.1 checkpoint) with the model's own keys;
* :func:`convert_on_load`: every ``load_state_dict`` of a module accepts such a ``state_dict``;
* :func:`make_permanent`: take torch's form off a model (``prune.remove`` of every masked tensor).

Example::

    >>> import torch.nn as nn, torch.nn.utils.prune as prune
    >>> old = nn.Linear(4, 3)
    >>> _ = prune.l1_unstructured(old, "weight", amount=6)
    >>> plain, masks = upgrade_state_dict(old.state_dict())
    >>> nn.Linear(4, 3).load_state_dict(plain, strict=True)
    <All keys matched successfully>
    >>> make_permanent(old), sorted(old.state_dict())
    (['weight'], ['bias', 'weight'])
"""

from __future__ import annotations

from lightning_prune.reparam import convert_on_load, make_permanent, upgrade_state_dict

__all__ = ["convert_on_load", "make_permanent", "upgrade_state_dict"]
