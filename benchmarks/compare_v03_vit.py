"""The ViT-S/16 of ``speed_target.py`` (random weights, ``prune_once(model, sparsity)``) converted by whichever
``lightning_prune`` is on the path at one batch size, then run at others (medians of interleaved rounds): the same
script compares versions, e.g. ``PYTHONPATH=<a 0.3 checkout> python benchmarks/compare_v03_vit.py`` for 0.3 and
``python benchmarks/compare_v03_vit.py`` for this one. Prints its figures; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import lightning_prune
from lightning_prune import prune_once, to_sparse_inference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="a timm model name (random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--convert-at", type=int, default=1, help="the batch size of the conversion's example inputs")
    p.add_argument("--run-at", type=int, nargs="+", default=[1, 64])
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    prune_once(model, args.sparsity)
    start = time.perf_counter()
    fast = to_sparse_inference(model, torch.randn(args.convert_at, 3, 224, 224))
    print(f"lightning_prune {lightning_prune.__version__}: conversion {time.perf_counter() - start:.1f} s")
    sparse_layers = sorted(n for n, m in fast.named_modules() if type(m).__name__.startswith("Sparse"))
    print(f"sparse layers: {len(sparse_layers)}: {', '.join(sparse_layers)}")
    for run in args.run_at:
        x = torch.randn(run, 3, 224, 224)
        times: list[list[float]] = [[], []]
        with torch.no_grad():
            model(x)
            fast(x)
            for _ in range(args.repeats):
                for i, m in enumerate((model, fast)):
                    t = time.perf_counter()
                    m(x)
                    times[i].append(time.perf_counter() - t)
        dense, sparse = statistics.median(times[0]), statistics.median(times[1])
        print(f"run at {run}: dense {dense * 1e3:.1f} ms, converted {sparse * 1e3:.1f} ms, {dense / sparse:.2f}x")


if __name__ == "__main__":
    main()
