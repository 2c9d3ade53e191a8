"""The LeNet/MNIST example (examples/lenet_mnist.py) end to end, and its model and data (examples/mnist.py), on a tiny
MNIST-format dataset written here (never the real one)."""

import argparse
import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import expected_zeros, write_tiny_mnist

from examples.lenet_mnist import build_callback, build_parser, main
from examples.mnist import LeNet, LitLeNet, MNISTDataModule, run_settings, show_progress
from lightning_prune import load_sparse, sparsity_report
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "lenet_mnist.py"


def test_example_quick_run_writes_summary_and_a_strictly_reloadable_model(tmp_path, capsys):
    data_dir = write_tiny_mnist(tmp_path / "data", n_train=240, n_test=60)
    out = tmp_path / "out"
    argv = ["--data-dir", str(data_dir), "--no-download", "--quick", "--epochs", "2", "--sparsity", "0.8"]
    assert main([*argv, "--output", str(out)]) == 0

    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_acc", "sparsity", "sparsity_per_tensor", "params_total", "params_nonzero", "epochs", "seconds"):
        assert key in summary
    assert summary["epochs"] == 2
    assert summary["images"] == {"train": 200, "val": 40, "test": 60}
    assert summary["params_total"] == 60074 and summary["weights_total"] == 59838
    layers = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
    assert sorted(summary["sparsity_per_tensor"]) == layers

    model = LeNet().eval()
    model.load_state_dict(torch.load(out / "lenet_pruned.pt"), strict=True)  # plain, unpruned keys
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert summary["params_total"] - summary["params_nonzero"] == zeros
    weight_zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))
    assert weight_zeros == expected_zeros(0.8, 59838)  # global: the exact count
    assert summary["sparsity"] == weight_zeros / 59838
    # the test accuracy, computed here on the test images, is the summary's and well above chance (0.1)
    raw = data_dir / "MNIST" / "raw"
    images = torch.frombuffer(bytearray((raw / "t10k-images-idx3-ubyte").read_bytes()[16:]), dtype=torch.uint8)
    labels = torch.frombuffer(bytearray((raw / "t10k-labels-idx1-ubyte").read_bytes()[8:]), dtype=torch.uint8)
    x = images.reshape(-1, 1, 28, 28).float().div(255.0).sub(0.1307).div(0.3081)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == labels.long()).float().mean())
    assert summary["test_acc"] == pytest.approx(accuracy, abs=1e-6)
    assert accuracy > 0.2
    # MACs per image, counted here: each weight once per output position (conv1 26x26, conv2 11x11, fc once)
    positions = {"conv1.weight": 26 * 26, "conv2.weight": 11 * 11}
    weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    assert summary["macs_dense"] == sum(positions.get(n, 1) * w.numel() for n, w in weights.items())
    assert summary["macs_nonzero"] == sum(positions.get(n, 1) * int((w != 0).sum()) for n, w in weights.items())
    # the sparse safetensors file holds the same weights, bit for bit, in far fewer bytes
    sparse = load_sparse(out / "lenet_pruned.safetensors")
    assert all(torch.equal(sparse[k], v) for k, v in model.state_dict().items())
    assert summary["file_bytes_dense"] == (out / "lenet_pruned.pt").stat().st_size
    assert summary["file_bytes_sparse"] == (out / "lenet_pruned.safetensors").stat().st_size
    assert summary["file_bytes_sparse"] < 0.5 * summary["file_bytes_dense"]
    assert summary["macs_nonzero"] < summary["macs_dense"]
    assert (out / "last.ckpt").exists()
    metrics = (out / "metrics.csv").read_text()
    assert "test_acc" in metrics and "pruning/sparsity" in metrics
    # printed: the library's report of the saved model, then what the report does not hold
    printed = capsys.readouterr().out
    assert str(sparsity_report(model, example_inputs=torch.zeros(1, 1, 28, 28))) in printed
    assert f"test accuracy: {accuracy:.2%} on 60 images" in printed
    assert f"{out / 'lenet_pruned.safetensors'} {summary['file_bytes_sparse']:,} bytes" in printed


def test_example_missing_data_exits_with_a_message_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "nowhere"), "--no-download", "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--data-dir" in result.stderr
    assert str(Path("MNIST") / "raw") in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()  # stopped before training


def test_example_data_module_splits_with_a_fixed_seed(tmp_path):
    data_dir = write_tiny_mnist(tmp_path / "data", n_train=300, n_test=60)
    a = MNISTDataModule(str(data_dir), batch_size=16, seed=0, quick=True, download=False)
    b = MNISTDataModule(str(data_dir), batch_size=16, seed=5, quick=True, download=False)
    a.setup("fit")
    b.setup("fit")
    assert a.split_sizes() == {"train": 250, "val": 50, "test": 60}
    val_a, val_b = a.val_dataloader().dataset.tensors[0], b.val_dataloader().dataset.tensors[0]
    assert torch.equal(val_a, val_b)  # the hold-out does not depend on the training seed
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize(
    ("flags", "schedule"),
    [
        ([], Polynomial(start_epoch=1, end_epoch=4, every_n_steps=50)),
        (["--schedule", "one-shot", "--start-epoch", "2"], OneShot(epoch=2)),
        (["--schedule", "at-epochs", "--at-epochs", "1", "3"], AtEpochs([1, 3])),
        (
            ["--schedule", "polynomial", "--start-epoch", "0", "--end-epoch", "4", "--every-n-steps", "0"],
            Polynomial(0, 4),
        ),
    ],
)
def test_example_build_callback_maps_cli_flags(flags, schedule):
    callback = build_callback(build_parser().parse_args(flags))
    assert repr(callback.schedule) == repr(schedule)
    assert callback.scope == "global" and callback.sparsity == 0.95


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--sparsity", "1.5"], r"`sparsity` must be in \[0, 1\), got 1.5"),
        (["--scope", "global", "--method", "ln_structured"], r"structured and works in `scope='local'` only"),
        (["--start-epoch", "3", "--end-epoch", "2"], r"`start_epoch` must be before `end_epoch`"),
        (["--epochs", "0"], r"--epochs must be at least 1, got 0"),
        (["--scope", "both"], r"invalid choice: 'both'"),
        (["--lr", "0"], r"`lr` must be a positive number, got 0"),
        (["--batch-size", "0"], r"`batch_size` must be a positive integer, got 0"),
    ],
)
def test_example_cli_rejects_bad_flags_with_a_message(flags, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LitLeNet(lr=0), r"`lr` must be a positive number, got 0"),
        (lambda: LitLeNet(optimizer="rmsprop"), r"`optimizer` must be one of \['adam', 'sgd'\], got 'rmsprop'"),
        (lambda: LitLeNet(lr_schedule="step"), r"`lr_schedule` must be one of \['constant', 'cosine'\], got 'step'"),
        (lambda: MNISTDataModule(batch_size=0), r"`batch_size` must be a positive integer, got 0"),
        (lambda: MNISTDataModule(val_size=-1), r"`val_size` must be a positive integer, got -1"),
    ],
)
def test_example_modules_reject_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_example_parser_lists_the_documented_flags():
    text = build_parser().format_help()
    for flag in ("--data-dir", "--epochs", "--sparsity", "--scope", "--method", "--schedule", "--start-epoch"):
        assert flag in text
    for flag in ("--end-epoch", "--every-n-steps", "--seed", "--batch-size", "--lr", "--output", "--quick"):
        assert flag in text
    assert isinstance(build_parser().parse_args([]), argparse.Namespace)


def test_example_shows_progress_on_a_terminal_only(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert show_progress(quiet=False)
    assert not show_progress(quiet=True)
    monkeypatch.setenv("CI", "true")
    assert not show_progress(quiet=False)
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert not show_progress(quiet=False)


def test_example_run_settings_restore_loggers_warnings_and_threads():
    names = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric")
    levels = [logging.getLogger(name).level for name in names]
    filters, threads = list(warnings.filters), torch.get_num_threads()
    with run_settings(threads=1):
        assert [logging.getLogger(name).level for name in names] == [logging.WARNING] * 3
        assert torch.get_num_threads() == 1
        ignored = {f[1].pattern for f in warnings.filters[:3] if f[0] == "ignore"}
        assert ignored == {".*does not have many workers.*", ".*is smaller than the logging interval.*", ".*LeafSpec.*"}
    assert [logging.getLogger(name).level for name in names] == levels
    assert warnings.filters == filters and torch.get_num_threads() == threads
    with run_settings(verbose=True):
        assert [logging.getLogger(name).level for name in names] == levels and warnings.filters == filters
