"""Allocation of one global target across tensors (issue 29): exact counts, ERK against a hand oracle, OWL
monotone in the outlier ratio, and the callback and prune_once reaching the per-tensor counts."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from lightning_prune import PruningScheduleCallback, Wanda, prune_once, select_parameters
from lightning_prune.allocation import (
    erk_counts,
    erk_densities,
    exact_counts,
    owl_counts,
    owl_densities,
    total_count,
    uniform_counts,
)
from lightning_prune.methods import resolve_method
from lightning_prune.methods.allocated import AllocatedMethod, outlier_ratio, with_allocation
from lightning_prune.schedules import Polynomial
from tests.helpers import TinyNet, expected_zeros, fit, random_loader, zeros

LENET = [(6, 1, 3, 3), (16, 6, 3, 3), (120, 400), (84, 120), (10, 84)]
TINY = [(4, 1, 3, 3), (8, 4, 3, 3), (24, 32), (16, 24), (3, 16)]


def _size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.98, 0.99, 0.999])
@pytest.mark.parametrize("shapes", [LENET, TINY, [(7,), (13, 5), (1, 1)]])
def test_allocation_counts_sum_to_the_exact_global_count(shapes: list, sparsity: float) -> None:
    sizes = [_size(s) for s in shapes]
    goal = expected_zeros(sparsity, sum(sizes))
    for counts in (
        uniform_counts(sizes, sparsity),
        erk_counts(shapes, sparsity),
        owl_counts(sizes, [0.01 * (i + 1) for i in range(len(sizes))], sparsity),
    ):
        assert sum(counts) == goal == total_count(sparsity, sizes)
        assert all(0 <= c <= n for c, n in zip(counts, sizes))


def test_erk_densities_match_a_hand_oracle() -> None:
    # (100, 100): raw 200/10000 = 0.02; (10, 100): raw 110/1000 = 0.11; kept 0.1 * 11000 = 1100
    eps = Fraction(1100) / (Fraction(2, 100) * 10000 + Fraction(11, 100) * 1000)
    d = erk_densities([(100, 100), (10, 100)], 0.9)
    assert d == pytest.approx([float(eps * Fraction(2, 100)), float(eps * Fraction(11, 100))], rel=1e-12)


def test_erk_keeps_a_tensor_dense_and_redistributes() -> None:
    # (2, 2): raw 1.0, whose eps * raw passes 1 at 50%: dense; the other takes the rest
    shapes = [(2, 2), (100, 100)]
    d = erk_densities(shapes, 0.5)
    assert d[0] == 1.0
    assert d[1] == pytest.approx((0.5 * 10004 - 4) / 10000, rel=1e-12)
    assert sum(dd * _size(s) for dd, s in zip(d, shapes)) == pytest.approx(0.5 * 10004)


def test_erk_counts_follow_the_densities() -> None:
    counts = erk_counts(LENET, 0.99)
    wanted = [_size(s) * (1 - d) for s, d in zip(LENET, erk_densities(LENET, 0.99))]
    assert all(abs(c - w) < 1.0 for c, w in zip(counts, wanted))
    assert counts[0] / 54 < 0.99 < counts[2] / 48000  # the first conv denser, the large fc sparser than 99%


def test_owl_is_monotone_in_the_outlier_ratio() -> None:
    sizes = [1000, 500, 2000, 1000, 700]
    ratios = [0.03, 0.001, 0.02, 0.05, 0.01]
    d = owl_densities(sizes, ratios, 0.7, lam=0.08)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [d[i] for i in order] == sorted(d)  # more outliers: denser
    assert max(d) - min(d) == pytest.approx(0.16)  # the spread is 2 * lambda
    assert sum(n * x for n, x in zip(sizes, d)) == pytest.approx(0.3 * sum(sizes))
    counts = owl_counts(sizes, ratios, 0.7)
    shares = [c / n for c, n in zip(counts, sizes)]
    assert [shares[i] for i in order] == sorted(shares, reverse=True)


def test_owl_equal_ratios_give_uniform_targets() -> None:
    assert owl_densities([10, 20], [0.02, 0.02], 0.6) == pytest.approx([0.4, 0.4])


def test_exact_counts_respect_the_bounds() -> None:
    counts = exact_counts([10.0, 10.0, 10.0], 30, upper=[20, 5, 20], lower=[0, 0, 12])
    assert sum(counts) == 30 and counts[1] <= 5 and counts[2] >= 12
    with pytest.raises(ValueError, match="cannot be shared out"):
        exact_counts([1.0], 5, upper=[3])


def test_allocations_never_go_below_what_is_pruned() -> None:
    sizes = [100, 100]
    counts = uniform_counts(sizes, 0.5, pruned=[80, 0])
    assert counts == [80, 20]


def test_outlier_ratio_counts_scores_above_m_times_the_mean() -> None:
    scores = torch.ones(100)
    scores[:3] = 50.0  # mean 2.47: 3 entries above 5 * mean = 12.35
    assert outlier_ratio(scores, 5.0) == (3, 100)


@pytest.mark.parametrize(
    ("method", "allocation", "match"),
    [
        ("l1_unstructured", "fancy", "`allocation` must be one of"),
        ("ln_structured", "erk", "unstructured method"),
        ("l1_unstructured", "owl", "needs `method=Wanda"),
    ],
)
def test_allocation_refuses_bad_configurations(method: str, allocation: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        with_allocation(resolve_method(method), allocation)  # type: ignore[arg-type]


def test_callback_refuses_allocation_in_local_scope() -> None:
    with pytest.raises(ValueError, match="needs scope='global'"):
        PruningScheduleCallback(0.5, allocation="erk")


@pytest.mark.parametrize("allocation", ["uniform", "erk"])
def test_callback_reaches_the_allocated_counts(allocation: str) -> None:
    callback = PruningScheduleCallback(
        0.9, scope="global", allocation=allocation, schedule=Polynomial(0, 2, every_n_steps=2), verbose=False
    )
    module, _, _ = fit(callback, max_epochs=3)
    names = [t.name for t in callback.targets]
    shapes = [tuple(t.tensor.shape) for t in callback.targets]
    sizes = [_size(s) for s in shapes]
    want = uniform_counts(sizes, 0.9) if allocation == "uniform" else erk_counts(shapes, 0.9)
    got = [zeros(module.get_parameter(n)) for n in names]
    assert got == want
    assert sum(got) == expected_zeros(0.9, sum(sizes))
    assert isinstance(callback.method, AllocatedMethod)
    assert callback.method.last_counts == dict(zip(names, want))


def test_callback_prints_the_allocation(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    callback = PruningScheduleCallback(0.9, scope="global", allocation="erk")
    with caplog.at_level("INFO"):
        fit(callback, max_epochs=1)
    text = caplog.text + capsys.readouterr().out
    assert "allocation erk of 0.9: model.conv1.weight" in text


def _wanda_outlier_ratios(net: nn.Module, batches: list, factor: float = 5.0) -> dict[str, float]:
    """The oracle: |W| * sqrt(mean x^2) per input feature (channel for convolutions), from hooks of its own."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        x = x.movedim(1, -1).reshape(-1, x.shape[1]) if isinstance(module, nn.Conv2d) else x.reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + x.double().square().sum(0)
        rows[name] = rows.get(name, 0) + x.shape[0]

    layers = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: hook(n, m, a)) for n, m in layers.items()]
    for (x,) in batches:
        net(x)
    for h in handles:
        h.remove()
    ratios = {}
    for name, m in layers.items():
        scale = (sums[name] / rows[name]).sqrt().float()
        w = m.weight.detach().abs()
        scores = w * (scale.view(1, -1, 1, 1) if w.dim() == 4 else scale.view(1, -1))
        ratios[f"{name}.weight"] = float((scores > factor * scores.mean()).double().mean())
    return ratios


def test_prune_once_with_owl_follows_the_outlier_ratios() -> None:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():  # fc1's second input feature an outlier channel
        net.fc1.weight[:, 1] *= 40.0
    loader = [(x,) for x, _ in random_loader()]
    ratios = _wanda_outlier_ratios(net, loader[:2])
    method = Wanda(calibration_batches=2, group="tensor")
    prune_once(net, 0.8, method=method, scope="global", allocation="owl", dataloader=loader)
    targets = select_parameters(net)
    sizes = [t.tensor.numel() for t in targets]
    got = [zeros(t.tensor) for t in targets]
    assert sum(got) == expected_zeros(0.8, sum(sizes))
    names = [t.name for t in targets]
    shares = {n: g / k for n, g, k in zip(names, got, sizes)}
    size = dict(zip(names, sizes))
    pairs = [(a, b) for a in names for b in names if ratios[a] < ratios[b]]
    assert len(pairs) >= 4  # the ratios differ: the check below means something
    for a, b in pairs:  # more outliers: a lower share of zeros (to one entry's rounding)
        assert shares[a] >= shares[b] - 1 / size[a] - 1 / size[b], (a, b)
    want = owl_counts(sizes, [ratios[n] for n in names], 0.8)
    assert all(abs(g - w) <= 1 for g, w in zip(got, want))


def test_prune_once_uniform_gives_each_tensor_the_target() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    prune_once(net, 0.5, scope="global", allocation="uniform")
    assert [zeros(net[0].weight), zeros(net[2].weight)] == [50, 50]
