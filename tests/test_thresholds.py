"""The exact k-smallest selection (radix select) against torch's pruning functions and a sorting reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from helpers import decide_and_apply, expected_zeros, l1_reference, smallest_reference
from torch import nn

from lightning_prune import MaskStore
from lightning_prune.methods import resolve_method
from lightning_prune.methods.thresholds import iter_smallest, iter_smallest_each, score_keys, select_smallest
from lightning_prune.selection import select_parameters

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def model_of(dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Conv1d(4, 5, 3), nn.Linear(20, 7)).to(device, dtype)


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]


def untied(weights: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Entries whose float32 magnitude differs from the threshold (the largest pruned float32 magnitude)."""
    mag = weights.detach().to(torch.float32).abs()
    return mag != mag[pruned].max()


def prune_with(method: str, model: nn.Module, sparsity: float, scope: str, seed: int, store: MaskStore) -> MaskStore:
    """One pruning step as the callback takes it: the method decides, the store narrows and applies."""
    return decide_and_apply(resolve_method(method), select_parameters(model), sparsity, scope, seed, store)


def masks_in(store: MaskStore) -> list[torch.Tensor]:
    return [mask.clone() for _, mask in store.items()]


def assert_same_as_torch(ours: list[torch.Tensor], theirs: list[nn.Module], per_layer: bool) -> None:
    """Our masks (from the store) against torch's, wherever a magnitude is not tied at the threshold."""
    groups = [[i] for i in range(len(ours))] if per_layer else [list(range(len(ours)))]
    for group in groups:
        n_ours = sum(int((ours[i] == 0).sum()) for i in group)
        n_theirs = sum(int((theirs[i].weight_mask == 0).sum()) for i in group)
        assert n_ours == n_theirs
        pruned = torch.cat([(ours[i] == 0).reshape(-1) for i in group])
        weights = torch.cat([theirs[i].weight_orig.reshape(-1) for i in group])  # the weights before pruning
        free = untied(weights, pruned)
        mask_ours = torch.cat([ours[i].reshape(-1) for i in group]).float()
        mask_theirs = torch.cat([theirs[i].weight_mask.reshape(-1) for i in group]).float()
        assert torch.equal(mask_ours[free], mask_theirs[free])
        assert free.any()  # the comparison is not vacuous


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_prune_global_matches_global_unstructured(dtype: torch.dtype, sparsity: float) -> None:
    ours, theirs = model_of(dtype), model_of(dtype)
    store = prune_with("l1_unstructured", ours, sparsity, "global", 0, MaskStore())
    prune.global_unstructured([(m, "weight") for m in layers(theirs)], prune.L1Unstructured, amount=sparsity)
    assert_same_as_torch(masks_in(store), layers(theirs), per_layer=False)
    for m, mask in zip(layers(ours), masks_in(store)):
        assert mask.dtype == torch.uint8 and m.weight.dtype == dtype
        assert bool((m.weight[mask == 0] == 0).all())  # zeroed in place, a plain parameter
    assert not any(k.endswith(("_orig", "_mask")) for k in ours.state_dict())


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_local_matches_l1_unstructured(dtype: torch.dtype) -> None:
    ours, theirs = model_of(dtype, seed=1), model_of(dtype, seed=1)
    store = prune_with("l1_unstructured", ours, 0.6, "local", 0, MaskStore())
    for m in layers(theirs):
        prune.l1_unstructured(m, "weight", amount=0.6)
    assert_same_as_torch(masks_in(store), layers(theirs), per_layer=True)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_prune_incremental_matches_one_shot_torch(scope: str) -> None:
    ours, theirs = model_of(torch.float32, seed=2), model_of(torch.float32, seed=2)
    weights = [m.weight.detach().clone() for m in layers(ours)]
    store, before = MaskStore(), []
    for s in (0.5, 0.8):
        prune_with("l1_unstructured", ours, s, scope, 0, store)
        masks = masks_in(store)
        for old, new in zip(before, masks):
            assert bool((new <= old).all())  # pruned entries stay pruned
        before = masks
    if scope == "global":
        prune.global_unstructured([(m, "weight") for m in layers(theirs)], prune.L1Unstructured, amount=0.8)
    else:
        for m in layers(theirs):
            prune.l1_unstructured(m, "weight", amount=0.8)
    assert_same_as_torch(before, layers(theirs), per_layer=scope == "local")
    reference = l1_reference(weights, [None] * len(weights), 0.8, scope)  # sorting, exact counts
    assert all(torch.equal(m.float(), r) for m, r in zip(before, reference))


def test_select_smallest_matches_reference_with_ties_signs_and_masks() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        scores, masks = [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            shape = tuple(int(v) for v in torch.randint(1, 6, (2,), generator=g))
            kind = trial % 4
            if kind == 0:
                s = torch.randn(shape, generator=g)  # both signs: the general path
            elif kind == 1:
                s = torch.randint(-2, 3, shape, generator=g).float()  # many ties, -0.0 and +0.0 via products
                s = s * torch.sign(torch.randn(shape, generator=g))
            elif kind == 2:
                s = torch.randint(0, 3, shape, generator=g).float()  # non-negative ties: the fast path
            else:
                s = torch.randn(shape, generator=g).abs()
            mask = None if trial % 3 == 0 else (torch.rand(shape, generator=g) > 0.4).float()
            scores.append(s.to(DTYPES[trial % 4]))
            masks.append(mask)
        live = sum(s.numel() if m is None else int(m.sum()) for s, m in zip(scores, masks))
        for k in sorted({0, live, int(torch.randint(0, live + 1, (1,), generator=g))}):
            got = select_smallest([lambda s=s: s for s in scores], masks, k)
            for a, b in zip(got, smallest_reference(scores, masks, k)):
                assert torch.equal(a.float(), b), (trial, k)


def test_select_smallest_breaks_ties_in_tensor_then_flat_order() -> None:
    a, b = torch.ones(2, 3), torch.ones(4)
    m1, m2 = select_smallest([a.clone, b.clone], [None, None], k=7)
    assert m1.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert m2.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_select_smallest_ignores_pruned_entries_whatever_their_scores() -> None:
    scores = torch.tensor([float("inf"), -float("inf"), -5.0, 0.0, 1.0, 2.0])
    mask = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    (new,) = select_smallest([scores.clone], [mask], k=2)
    assert new.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    (pos,) = select_smallest([lambda: torch.tensor([1e38, 3.0, 0.5, 7.0])], [torch.tensor([0.0, 1, 1, 1])], k=1)
    assert pos.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_select_smallest_k_zero_and_all() -> None:
    s = torch.randn(3, 4)
    mask = (torch.rand(3, 4) > 0.5).float()
    (none_pruned,) = select_smallest([s.clone], [None], k=0)
    assert torch.equal(none_pruned, torch.ones(3, 4))
    (same,) = select_smallest([s.clone], [mask], k=0)
    assert torch.equal(same, mask) and same is not mask
    (everything,) = select_smallest([s.clone], [mask], k=int(mask.sum()))
    assert not everything.any()


@pytest.mark.parametrize(
    ("scores", "mask", "k", "match"),
    [
        (torch.ones(4), None, 5, r"`k` must be in \[0, 4\]"),
        (torch.ones(4), torch.tensor([1.0, 0, 0, 1]), 3, r"`k` must be in \[0, 2\]"),
        (torch.ones(4), None, -1, "`k` must be >= 0"),
        (torch.tensor([1.0, float("nan")]), None, 1, "NaN"),
        (torch.tensor([-1.0, float("nan")]), None, 1, "NaN"),
        (torch.ones(4, dtype=torch.int32), None, 1, "floating"),
    ],
)
def test_select_smallest_rejects_bad_input(scores: torch.Tensor, mask: torch.Tensor | None, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        select_smallest([scores.clone], [mask], k)


def test_select_smallest_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="one mask per score tensor"):
        select_smallest([torch.ones(2).clone], [None, None], 1)


def test_iter_smallest_computes_scores_again_and_yields_lazily() -> None:
    calls = [0, 0]

    def scores(i: int, value: torch.Tensor):
        def fn() -> torch.Tensor:
            calls[i] += 1
            return value

        return fn

    it = iter_smallest([scores(0, torch.arange(5.0)), scores(1, torch.arange(5.0))], [None, None], k=3)
    first = next(it)
    assert calls == [3, 2]  # two histogram passes over both, then only the first tensor's mask is built
    second = next(it)
    assert calls == [3, 3]
    assert first.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0] and second.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_score_keys_sort_as_the_floats() -> None:
    values = torch.tensor(
        [-float("inf"), -3e38, -1.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1.0, 3e38, float("inf")], dtype=torch.float32
    )
    keys = score_keys(values)
    assert keys.dtype == torch.int32
    assert bool((keys[1:] >= keys[:-1]).all())
    assert int(keys[4]) == int(keys[5])  # -0.0 == +0.0
    assert bool((keys[1:4] < keys[2:5]).all()) and bool((keys[5:-1] < keys[6:]).all())


def test_select_smallest_leaves_inputs_untouched() -> None:
    s = torch.rand(10)
    mask = (torch.rand(10) > 0.3).float()
    s0, m0 = s.clone(), mask.clone()
    select_smallest([lambda: s], [mask], k=2)
    assert torch.equal(s, s0) and torch.equal(mask, m0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_smallest_cuda_matches_cpu(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(50, 40, generator=g).to(dtype), torch.randn(30, generator=g).abs().to(dtype)]
    masks = [(torch.rand(50, 40, generator=g) > 0.3).to(dtype), None]
    cpu = select_smallest([s.clone for s in scores], masks, k=900)
    gpu = select_smallest([s.cuda for s in scores], [m.cuda() if m is not None else None for m in masks], k=900)
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and torch.equal(a, b.cpu())


@pytest.mark.cuda
def test_prune_global_cuda_matches_global_unstructured() -> None:
    ours, theirs = model_of(torch.float32, device="cuda"), model_of(torch.float32, device="cuda")
    store = prune_with("l1_unstructured", ours, 0.7, "global", 0, MaskStore())
    prune.global_unstructured([(m, "weight") for m in layers(theirs)], prune.L1Unstructured, amount=0.7)
    assert all(mask.is_cuda for mask in masks_in(store))
    assert_same_as_torch(masks_in(store), layers(theirs), per_layer=False)


def test_prune_global_random_is_exact_and_deterministic() -> None:
    a = model_of(torch.float32, seed=4)
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    masks = []
    for caller_seed, model in ((1, a), (2, b)):
        torch.manual_seed(caller_seed)  # the caller's global RNG, right before the pruning: it does not matter
        masks.append(masks_in(prune_with("random_unstructured", model, 0.45, "global", 7, MaskStore())))
    total = sum(m.weight.numel() for m in layers(a))
    assert sum(int((m == 0).sum()) for m in masks[0]) == expected_zeros(0.45, total)
    assert all(torch.equal(x, y) for x, y in zip(*masks))
    other = masks_in(prune_with("random_unstructured", c, 0.45, "global", 8, MaskStore()))
    assert not all(torch.equal(x, y) for x, y in zip(masks[0], other))  # the callback's seed does


def test_select_smallest_mixes_fast_and_general_tensors() -> None:
    # a non-negative tensor (fast path, pruned entries at key 0) whose entries are all pruned, next to a
    # tensor of negative scores (general path): the threshold is negative, the pruned entries stay pruned
    scores = [torch.tensor([1.0]), torch.tensor([3.0, 1.0]), torch.tensor([-1.0, -2.0])]
    masks = [torch.ones(1), torch.zeros(2), None]
    got = select_smallest([s.clone for s in scores], masks, k=2)
    assert [m.tolist() for m in got] == [[1.0], [0.0, 0.0], [0.0, 0.0]]
    assert all(torch.equal(a.float(), b) for a, b in zip(got, smallest_reference(scores, masks, 2)))


def test_iter_smallest_with_known_pruned_counts_gives_the_same_masks() -> None:
    g = torch.Generator().manual_seed(5)
    scores = [torch.rand(8, 8, generator=g), torch.rand(20, generator=g)]
    masks = [(torch.rand(8, 8, generator=g) > 0.5).float(), None]
    pruned = [int((masks[0] == 0).sum()), 0]
    a = list(iter_smallest([s.clone for s in scores], masks, 10))
    b = list(iter_smallest([s.clone for s in scores], masks, 10, pruned))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_iter_smallest_each_selects_per_tensor() -> None:
    g = torch.Generator().manual_seed(6)
    ties = torch.randint(0, 3, (9,), generator=g).float()
    scores = [torch.randn(6, 5, generator=g), torch.rand(40, generator=g), ties]
    masks = [None, (torch.rand(40, generator=g) > 0.5).float(), None]
    live = [30, int(masks[1].sum()), 9]
    ks = [0, live[1], 4]
    got = list(iter_smallest_each([s.clone for s in scores], masks, ks))
    for s, m, k, mask in zip(scores, masks, ks, got):
        assert torch.equal(mask.float(), smallest_reference([s], [m], k)[0])
    with pytest.raises(ValueError, match="one mask and one k per score tensor"):
        list(iter_smallest_each([scores[0].clone], [None], [1, 2]))


def _zeroed_case(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Magnitudes with ties and live zeros, already +0.0 wherever the mask prunes (as ``inplace`` mode keeps
    the weights), over a masked tensor, an unmasked one and a fully live masked one."""
    g = torch.Generator().manual_seed(seed)
    scores = [
        torch.randint(0, 6, (7, 9), generator=g).float(),
        torch.rand(30, generator=g),
        torch.rand(11, generator=g),
    ]
    masks = [(torch.rand(7, 9, generator=g) > 0.4).float(), None, torch.ones(11)]
    for s, m in zip(scores, masks):
        if m is not None:
            s.mul_(m)
    return scores, masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8, torch.bool])
@pytest.mark.parametrize("zero_where_pruned", [False, True])
def test_iter_smallest_inplace_narrows_the_given_masks(dtype: torch.dtype, zero_where_pruned: bool) -> None:
    for seed in range(4):
        scores, masks = _zeroed_case(seed)
        live = sum(int(m.sum()) if m is not None else m_s.numel() for m, m_s in zip(masks, scores))
        for k in (0, 1, 17, live // 2, live):
            want = smallest_reference(scores, masks, k)
            given = [None if m is None else m.to(dtype, copy=True) for m in masks]
            got = list(
                iter_smallest([s.clone for s in scores], given, k, inplace=True, zero_where_pruned=zero_where_pruned)
            )
            for g_mask, m, w in zip(got, given, want):
                if m is not None:
                    assert g_mask is m and g_mask.dtype == dtype  # the given tensor, narrowed in place
                assert torch.equal(g_mask.float(), w), (seed, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_iter_smallest_each_inplace_with_zeroed_scores(dtype: torch.dtype) -> None:
    scores, masks = _zeroed_case(11)
    ks = [5, 12, 0]
    want = [smallest_reference([s], [m], k)[0] for s, m, k in zip(scores, masks, ks)]
    given = [None if m is None else m.to(dtype, copy=True) for m in masks]
    got = list(iter_smallest_each([s.clone for s in scores], given, ks, inplace=True, zero_where_pruned=True))
    assert all(torch.equal(g.float(), w) for g, w in zip(got, want))
    assert got[0] is given[0] and got[2] is given[2]


@pytest.mark.parametrize("mask_dtype", [None, torch.uint8, torch.float32])
@pytest.mark.parametrize("signed", [False, True])
def test_iter_smallest_each_small_tensors_sorted_match_the_histogram_passes(mask_dtype, signed) -> None:
    """Tensors up to 65,536 entries are selected by one sort: the same masks, ties included, as the histograms."""
    from lightning_prune.methods import thresholds

    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        n = int(torch.randint(1, 2000, (1,), generator=g))
        scores = torch.randint(-5 if signed else 0, 6, (n,), generator=g).float() / 4  # many ties
        mask = None if mask_dtype is None else (torch.rand(n, generator=g) > 0.3).to(mask_dtype)
        live = n if mask is None else int((mask != 0).sum())
        if live == 0:
            continue
        k = int(torch.randint(1, live + 1, (1,), generator=g))
        score = scores.clone
        (sorted_mask,) = iter_smallest_each([score], [None if mask is None else mask.clone()], [k])
        passes = thresholds._iter_smallest([score], [mask], k, None, thresholds._Scratch(), False, False)
        assert torch.equal(sorted_mask.float(), next(passes).float())
