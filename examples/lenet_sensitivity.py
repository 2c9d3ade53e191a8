"""Sensitivity analysis of a trained LeNet: the tables, the plot and a per-layer suggestion, written to a folder.

Used by ``examples/lenet_mnist.py --sensitivity`` and by ``benchmarks/sensitivity.py``.

Example::

    >>> from examples.lenet_mnist import LitLeNet
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> import torch
    >>> loader = DataLoader(TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))), batch_size=4)
    >>> import tempfile
    >>> result = analyze_lenet(LitLeNet(), loader, 0.9, tempfile.mkdtemp(), sparsities=(0.5, 0.95))
    >>> sorted(result["suggested"])
    ['model.conv1.weight', 'model.conv2.weight', 'model.fc1.weight', 'model.fc2.weight', 'model.fc3.weight']
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune import plot_sensitivity, sensitivity_analysis, suggest_sparsity

__all__ = ["SPARSITIES", "analyze_lenet"]

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)


def analyze_lenet(
    module: nn.Module,
    dataloader: Any,
    overall_sparsity: float,
    out_dir: str | Path,
    sparsities: Sequence[float] = SPARSITIES,
) -> dict[str, Any]:
    """Run the analysis twice on ``dataloader`` (cross-entropy loss, and accuracy), write
    ``sensitivity_loss.csv``, ``sensitivity_accuracy.csv``, ``sensitivity.png`` (accuracy curves) and
    ``sensitivity_suggested.json`` (per-layer targets for ``overall_sparsity``, from the loss curves: loss
    is smooth where accuracy is flat) to ``out_dir``; return the suggestion, the tables and the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loss = sensitivity_analysis(module, dataloader, F.cross_entropy, sparsities=sparsities, higher_is_better=False)
    accuracy_metric = MulticlassAccuracy(num_classes=10, average="micro")
    accuracy = sensitivity_analysis(module, dataloader, accuracy_metric, sparsities=sparsities)
    loss = replace(loss, metric_name="validation loss")
    accuracy = replace(accuracy, metric_name="validation accuracy")
    suggested = suggest_sparsity(loss, overall_sparsity)
    paths = {
        "loss_table": out / "sensitivity_loss.csv",
        "accuracy_table": out / "sensitivity_accuracy.csv",
        "plot": out / "sensitivity.png",
        "suggested": out / "sensitivity_suggested.json",
    }
    loss.to_csv(paths["loss_table"])
    accuracy.to_csv(paths["accuracy_table"])
    plot_sensitivity(accuracy, paths["plot"], title="LeNet/MNIST: validation accuracy, one tensor pruned (L1)")
    paths["suggested"].write_text(json.dumps({"overall_sparsity": overall_sparsity, "sparsity": suggested}, indent=2))
    return {"suggested": suggested, "loss": loss, "accuracy": accuracy, "files": {k: str(v) for k, v in paths.items()}}
