"""The ViT-S/16 of ``speed_target.py`` (random weights, seed 0, ``prune_once(model, 0.95)``) converted at batch 1 by
whichever ``lightning_prune`` is on the path, run at batch 1 and 64 (2 threads, medians of 3 interleaved rounds):
the same script compares versions. ``PYTHONPATH=<a 0.3 checkout> python benchmarks/compare_v03_vit.py`` for 0.3."""

import statistics
import time
import warnings

warnings.filterwarnings("ignore")
import timm
import torch

import lightning_prune
from lightning_prune import prune_once, to_sparse_inference

torch.set_num_threads(2)
torch.manual_seed(0)
model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
prune_once(model, 0.95)
start = time.perf_counter()
fast = to_sparse_inference(model, torch.randn(1, 3, 224, 224))
print(lightning_prune.__version__, f"conversion {time.perf_counter() - start:.1f} s")
for run in (1, 64):
    x = torch.randn(run, 3, 224, 224)
    ts = [[], []]
    with torch.no_grad():
        model(x)
        fast(x)
        for _ in range(3):
            for i, m in enumerate((model, fast)):
                t = time.perf_counter()
                m(x)
                ts[i].append(time.perf_counter() - t)
    d, s = statistics.median(ts[0]), statistics.median(ts[1])
    print(f"run at {run}: dense {d * 1e3:.1f} ms, converted {s * 1e3:.1f} ms, {d / s:.2f}x")
