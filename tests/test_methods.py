"""Methods given by the user (a ``PruningMethod`` subclass, an importance function) through the callback, and the
one contract every method follows (scopes checked in one place, ``uint8``/``bool`` masks)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyModule, expected_zeros, make_trainer, random_loader, weights, zeros

from lightning_prune import AtEpochs, NewMask, NMPruning, PruningMethod, PruningScheduleCallback, Wanda
from lightning_prune.methods import check_scope, resolve_method


class FirstEntries(PruningMethod):
    """A user method: prune the first entries (flat order) of each tensor, exactly to the target."""

    name = "first"
    scopes = ("local",)  # declared once: no global_masks to stub

    def local_masks(
        self, targets: Sequence[Any], sparsities: Sequence[float | None], seed: int, masks: Any
    ) -> Iterator[NewMask]:
        for t, s in zip(targets, sparsities):
            mask = torch.ones(t.tensor.shape, dtype=torch.uint8)
            mask.view(-1)[: expected_zeros(s, t.tensor.numel())] = 0
            yield NewMask(t, mask)


def test_a_user_pruning_method_subclass_drives_the_callback() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    callback = PruningScheduleCallback(0.5, method=FirstEntries(), schedule=AtEpochs([0, 1]), verbose=False)
    make_trainer([callback], max_epochs=2).fit(module, random_loader())
    for name, w in weights(module).items():
        flat = w.detach().reshape(-1)
        k = expected_zeros(0.5, flat.numel())
        assert zeros(flat[:k]) == k and zeros(flat[k:]) == 0, name


def test_importance_with_ln_structured_ranks_channels_by_the_importance() -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    order = torch.arange(24, dtype=torch.float32)

    def by_row_index(w: torch.Tensor) -> torch.Tensor:  # rows with a low index are the least important
        return order[: w.shape[0]].view(-1, *[1] * (w.dim() - 1)).expand_as(w).clone() + 1

    callback = PruningScheduleCallback(
        0.5, parameters=["model.fc1.weight"], method="ln_structured", importance=by_row_index, verbose=False
    )
    make_trainer([callback], max_epochs=1).fit(module, random_loader())
    rows = module.model.fc1.weight.detach().abs().sum(dim=1)
    assert (rows[:12] == 0).all() and (rows[12:] != 0).all()


@pytest.mark.parametrize(
    ("method", "scope", "match"),
    [
        (FirstEntries(), "global", r"`method=first` works in `scope='local'` only, got scope='global'"),
        (resolve_method("ln_structured"), "global", r"is structured and works in `scope='local'` only"),
        (NMPruning(2, 4), "global", r"keeps n of every m weights within each tensor"),
        (Wanda(group="global"), "local", r"needs the callback's scope='global'.*use Wanda\(group='row'\)"),
        (resolve_method("l1_unstructured"), "both", r"`scope` must be one of \['local', 'global'\], got 'both'"),
    ],
)
def test_check_scope_refuses_a_scope_the_method_does_not_declare(method: Any, scope: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_scope(method, scope)
    with pytest.raises(ValueError, match=match):
        PruningScheduleCallback(0.5 if method.takes_sparsity else None, method=method, scope=scope)


def test_builtin_methods_decide_uint8_masks() -> None:
    from lightning_prune import MaskStore, select_parameters

    module = TinyModule()
    targets = select_parameters(module)
    for name in ("l1_unstructured", "random_unstructured", "ln_structured", "random_structured"):
        decided = list(resolve_method(name).local_masks(targets, [0.5] * len(targets), 0, MaskStore()))
        assert decided and all(new.mask.dtype == torch.uint8 for new in decided), name
