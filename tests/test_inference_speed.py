"""``to_sparse_inference``'s decisions with injected timings (no test depends on the machine's speed): the row
counts a sparse layer serves, the dense copy kept only where used, the end-to-end check that backs layers off (the
least gain first) or returns the dense model with the reason, and the cost model that screens forms untimed."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch
from test_inference import prune_randomly_, run
from torch import nn

from lightning_prune import inference_report, to_sparse_inference
from lightning_prune.inference import SparseLinear, Timing


class Modelled:
    """Injected timings. A dense layer costs its entries times its rows; a sparse form ``per_value`` times its
    stored values times its rows, times ``1 + rows / knee`` (so it stops paying at many rows). The whole model:
    ``base`` less ``saving`` per sparse layer, plus ``penalty[name]`` for a sparse layer that is slower in the
    model than alone (``other_penalty[name]`` on ``other_inputs`` only). Nothing is run."""

    def __init__(
        self,
        per_value: float = 3.0,
        knee: float = 64.0,
        base: float = 1.0,
        saving: float = 0.1,
        penalty: Mapping[str, float] | None = None,
        other_penalty: Mapping[str, float] | None = None,
    ) -> None:
        self.per_value, self.knee, self.base, self.saving = per_value, knee, base, saving
        self.penalty: Mapping[str, float] = penalty or {}
        self.other_penalty: Mapping[str, float] = other_penalty or {}
        self.asked: list[Timing] = []

    def __call__(self, runs: Mapping[Timing, Callable[[], object]]) -> dict[Timing, float]:
        self.asked += list(runs)
        return {t: self.seconds(t) for t in runs}

    def seconds(self, t: Timing) -> float:
        if t.layer == "":
            if t.form == "dense":
                return self.base
            late = sum(self.other_penalty.get(n, 0.0) for n in t.sparse) if t.example else 0.0
            return self.base - self.saving * len(t.sparse) + sum(self.penalty.get(n, 0.0) for n in t.sparse) + late
        if t.form == "dense":
            return 1e-6 * t.nonzeros * t.rows
        return 1e-6 * self.per_value * t.nonzeros * t.rows * (1 + t.rows / self.knee)


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 16)).eval()
    prune_randomly_(net[0].weight, 0.9)
    prune_randomly_(net[2].weight, 0.9, seed=1)
    return net


def test_a_sparse_layer_serves_the_rows_where_it_pays_and_a_dense_copy_the_others() -> None:
    net = two_layers()
    timer = Modelled()  # 90%: 0.3 * (1 + rows / 64) of the dense time: pays up to 64 rows (0.6x), not at 512 (2.7x)
    fast = to_sparse_inference(net, torch.randn(8, 64), timer=timer)
    layer = inference_report(fast).layers[0]
    assert (layer.form, layer.min_rows, layer.max_rows, layer.sparse_rows) == ("csr", 0, 64, "0-64")
    assert [r for r, _, _ in layer.ladder] == [1, 8, 64, 512]  # the example's 8 rows, up to where it stops paying
    assert isinstance(fast[0], SparseLinear) and fast[0].fallback is not None
    assert torch.equal(fast[0].fallback, net[0].weight)
    assert [fast[0].sparse_for(n) for n in (1, 64, 65, 3000)] == [True, True, False, False]
    for rows in (1, 8, 64, 65, 3000):  # the sparse and the dense path give the dense layer's outputs
        x = torch.randn(rows, 64)
        torch.testing.assert_close(run(fast, x), run(net, x), rtol=1e-5, atol=1e-5)
    report = inference_report(fast)
    assert report.fallback_bytes == (256 * 64 + 16 * 256) * 4 and not report.backed_off
    assert "dense copies for other row counts 0.1 MiB" in str(report)


def test_a_layer_that_pays_at_every_row_count_keeps_no_dense_copy() -> None:
    net = two_layers()
    fast = to_sparse_inference(net, torch.randn(8, 64), timer=Modelled(knee=1e9))
    assert fast[0].fallback is None and fast[2].fallback is None
    assert inference_report(fast).layers[0].sparse_rows == "any"
    assert inference_report(fast).fallback_bytes == 0
    assert inference_report(fast).sparse_bytes < 0.3 * inference_report(fast).dense_bytes


def test_converted_at_one_row_the_model_takes_the_dense_path_at_many() -> None:
    net = two_layers()
    fast = to_sparse_inference(
        net, torch.randn(1, 64), timer=Modelled(knee=16, base=0.05, saving=0.01)
    )  # pays to 8 rows
    assert inference_report(fast).layers[0].max_rows == 8
    x = torch.randn(64, 64)
    assert not fast[0].sparse_for(64) and not fast[2].sparse_for(64)
    torch.testing.assert_close(run(fast, x), run(net, x), rtol=1e-5, atol=1e-5)


def test_example_rows_beyond_the_cap_are_timed_at_the_cap() -> None:
    net = two_layers()
    timer = Modelled(knee=1e9)
    to_sparse_inference(net, torch.randn(5000, 64), timer=timer)
    assert max(t.rows for t in timer.asked) == 2048
    assert {t.rows for t in timer.asked if t.layer == "0"} == {1, 8, 64, 512, 2048}  # the ladder below, down to 1


def test_the_least_gain_is_backed_off_until_the_model_pays_end_to_end() -> None:
    net = two_layers()  # layer "2" (16 x 256) gains less than layer "0" (256 x 64) per row
    timer = Modelled(knee=1e9, penalty={"2": 0.5})  # both: 1 - 0.2 + 0.5 = 1.3 s; without "2": 0.9 s
    fast = to_sparse_inference(net, torch.randn(8, 64), timer=timer)
    report = inference_report(fast)
    assert report.backed_off == ("2",)
    assert isinstance(fast[0], SparseLinear) and type(fast[2]) is nn.Linear
    assert [(c.name, c.form) for c in report.layers] == [("0", "csr"), ("2", "dense")]
    assert report.layers[1].note.startswith("backed off")
    assert report.sparse_seconds == pytest.approx(0.9) and report.speedup == pytest.approx(1 / 0.9)
    assert report.note == ""


def test_a_model_slower_end_to_end_comes_back_dense_with_the_reason() -> None:
    net = two_layers()
    timer = Modelled(knee=1e9, penalty={"0": 0.5, "2": 0.5})
    fast = to_sparse_inference(net, torch.randn(8, 64), timer=timer)
    report = inference_report(fast)
    assert [type(m) for m in fast] == [nn.Linear, nn.ReLU, nn.Linear]
    assert set(report.backed_off) == {"0", "2"} and report.sparse_layers == ()
    assert report.speedup == 1.0  # what the user gets: the dense model
    assert report.note.startswith("every layer dense: the converted model was 0.56x")
    assert report.note in str(report)


def test_min_speedup_zero_backs_nothing_off_and_serves_every_row_count() -> None:
    net = two_layers()
    fast = to_sparse_inference(net, torch.randn(8, 64), min_speedup=0, timer=Modelled(penalty={"0": 5.0}))
    report = inference_report(fast)
    assert report.backed_off == () and [c.sparse_rows for c in report.layers] == ["any", "any"]
    assert report.speedup < 1


def test_the_cost_model_screens_out_forms_that_cannot_pay() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64)).eval()
    prune_randomly_(net[0].weight, 0.6)  # CSR: 0.4 x 3 = 1.2 dense entries per entry: cannot pay
    timer = Modelled()
    fast = to_sparse_inference(net, torch.randn(8, 64), timer=timer)
    assert inference_report(fast).layers[0].note.startswith("no sparse form can pay")
    assert not [t for t in timer.asked if t.layer]  # not timed
    forced = to_sparse_inference(net, torch.randn(8, 64), min_speedup=0, timer=timer)
    assert isinstance(forced[0], SparseLinear)  # min_speedup=0: the cost model does not decide


def test_back_off_is_timed_at_most_four_times_then_everything_is_dense() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(32, 32) for _ in range(20)]).eval()
    for i, layer in enumerate(net):
        prune_randomly_(layer.weight, 0.9, seed=i)
    timer = Modelled(knee=1e9, penalty={str(i): 0.5 for i in range(20)})
    fast = to_sparse_inference(net, torch.randn(4, 32), timer=timer)
    sizes = [len(t.sparse) for t in timer.asked if t.layer == "" and t.form == "sparse"]
    assert sizes == [20, 19, 17, 13, 5]  # 1, 2, 4, 8 layers backed off, each step timed; then the other 5
    assert inference_report(fast).sparse_layers == () and len(inference_report(fast).backed_off) == 20


def test_gains_too_small_for_the_margin_go_dense_without_timing_the_converted_model() -> None:
    net = two_layers()
    timer = Modelled(knee=1e9, base=100.0)  # the layers' gains (0.1 s) are nothing beside 100 s
    fast = to_sparse_inference(net, torch.randn(8, 64), timer=timer)
    report = inference_report(fast)
    assert report.sparse_layers == () and set(report.backed_off) == {"0", "2"}
    assert report.note.startswith("every layer dense: the layers' measured gains (")
    assert not [t for t in timer.asked if t.layer == "" and t.form == "sparse"]


def test_without_dense_copies_the_sparse_form_serves_every_row_count_untimed_beyond_the_example() -> None:
    net = two_layers()
    timer = Modelled()  # pays up to 64 rows only
    fast = to_sparse_inference(net, torch.randn(8, 64), timer=timer, dense_copy=False)
    assert fast[0].fallback is None and inference_report(fast).layers[0].sparse_rows == "any"
    assert {t.rows for t in timer.asked if t.layer} == {8}  # no ladder
    assert inference_report(fast).fallback_bytes == 0


def test_other_inputs_are_decided_on_their_rows_and_each_shape_gets_the_faster_path() -> None:
    net = two_layers()  # Modelled(): at 90% a sparse layer pays up to 64 rows and is 2.7x slower at 512
    alone = inference_report(to_sparse_inference(net, torch.randn(512, 64), timer=Modelled()))
    assert [c.form for c in alone.layers] == ["dense", "dense"]  # converted on 512 rows alone: nothing pays
    timer = Modelled(base=0.05, saving=0.01)  # the model: 50 ms dense, 30 ms with both layers sparse
    fast = to_sparse_inference(net, torch.randn(1, 64), other_inputs=[torch.randn(512, 64)], timer=timer)
    report = inference_report(fast)
    layer = report.layers[0]
    assert layer.rows == (1, 512) and (layer.form, layer.sparse_rows) == ("csr", "0-64")
    assert [r for r, _, _ in layer.ladder] == [1, 8, 64, 512]  # walked up from 1 row, where it pays most
    nnz, numel = int((net[0].weight != 0).sum()), net[0].weight.numel()
    served = 1e-6 * 3 * nnz * 1 * (1 + 1 / 64) + 1e-6 * numel * 512  # 1 row sparse, 512 rows on the dense copy
    assert layer.sparse_seconds == pytest.approx(served) and layer.dense_seconds == pytest.approx(1e-6 * numel * 513)
    assert fast[0].sparse_for(1) and not fast[0].sparse_for(512)
    assert len(report.other_inputs) == 1 and report.other_speedups == (pytest.approx(0.05 / 0.03),)
    assert "end to end on other_inputs: 1.67x" in str(report)
    for rows in (1, 512):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(run(fast, x), run(net, x), rtol=1e-5, atol=1e-5)


def test_a_layer_slower_on_other_inputs_end_to_end_is_backed_off() -> None:
    net = two_layers()  # layer "2" gains least; sparse, it costs 0.5 s more on other_inputs only
    timer = Modelled(knee=1e9, other_penalty={"2": 0.5})
    fast = to_sparse_inference(net, torch.randn(8, 64), other_inputs=[torch.randn(64, 64)], timer=timer)
    report = inference_report(fast)
    assert report.backed_off == ("2",) and [c.form for c in report.layers] == ["csr", "dense"]
    assert report.speedup == pytest.approx(1 / 0.9) and report.other_speedups == (pytest.approx(1 / 0.9),)
    worse = Modelled(knee=1e9, other_penalty={"0": 0.5, "2": 0.5})
    dense = inference_report(
        to_sparse_inference(net, torch.randn(8, 64), other_inputs=[torch.randn(64, 64)], timer=worse)
    )
    assert dense.sparse_layers == () and dense.other_speedups == (1.0,)
    assert dense.note.startswith("every layer dense: the converted model was 1.25x on example_inputs, 0.56x on ")
    assert "other_inputs[0] end to end, below min_speedup 1.1 or 0.97x" in dense.note


def test_other_inputs_are_refused_unless_a_list_of_inputs() -> None:
    with pytest.raises(ValueError, match="`other_inputs` must be a list"):
        to_sparse_inference(two_layers(), torch.randn(1, 64), other_inputs=torch.randn(8, 64), timer=Modelled())
    with pytest.raises(ValueError, match="`other_inputs` must be a list"):
        to_sparse_inference(two_layers(), torch.randn(1, 64), other_inputs=[None], timer=Modelled())


def test_other_inputs_on_the_wall_clock_with_min_speedup_zero_convert_every_layer_for_every_shape() -> None:
    net = two_layers()  # min_speedup=0: nothing decided by the machine's speed
    fast = to_sparse_inference(net, torch.randn(1, 64), other_inputs=[torch.randn(4, 8, 64)], min_speedup=0)
    report = inference_report(fast)
    assert [(c.form, c.rows, c.sparse_rows) for c in report.layers] == [("csr", (1, 32), "any")] * 2
    assert len(report.other_inputs) == 1 and all(d > 0 and s > 0 for d, s in report.other_inputs)
    for x in (torch.randn(1, 64), torch.randn(4, 8, 64)):
        torch.testing.assert_close(run(fast, x), run(net, x), rtol=1e-5, atol=1e-5)
