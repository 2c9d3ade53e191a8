"""Sparse weight files: size and save/load time of ``save_sparse``/``load_sparse`` beside ``torch.save``/``load``.

Two state dicts, each pruned by magnitude per tensor to each ``--sparsities`` value (the weights only; biases
stay dense):

* ``linear``: one ``nn.Linear(1000, 1000)`` (1.0 M weights);
* ``stack``: ``--layers`` ``nn.Linear(--width, --width)`` layers (default 6 x 4096 x 4096 = 100.7 M weights,
  384 MiB in float32), built from a fixed seed with ``torch.randn``; several ``--width`` values measure one stack
  each (``--width 2048 2896 4096``: 25.2, 50.3 and 100.7 M weights).

The pruned entries are set to ``+0.0`` (``masked_fill_``). Rows marked ``w*mask`` prune by multiplication instead,
as torch's pruning and lightning_prune's callback do, which leaves ``-0.0`` wherever the pruned weight was negative
(about half the zeros): ``save_sparse`` keeps those bit for bit with a second bitmask, and the ``signed_zeros=False``
rows drop their sign.

Size: the file's bytes over those of ``torch.save(state_dict)`` of the same (dense-stored) state dict.

Time: the median over ``--repeats`` rounds of the wall time, and in brackets of the process's CPU time (user +
system, all threads; on a machine that other jobs share, wall times swing with their load, CPU times much less).
In each round the two saves, then the two loads run one after the other on the same state dict (their order flips
from round to round, so that load from other processes hits both alike), into and from files in one temporary
folder. Saves are timed until the file is on disk: ``save_sparse`` writes a temporary file beside the target,
syncs it to disk (``fsync``) and renames it into place (so that a failed save never leaves a broken file), and
``torch.save`` is followed by an ``fsync`` of its file inside the timed span, so that both are durable saves and no
timed operation competes with the kernel writing back the other file. Every ``load_sparse`` result is checked bit for
bit against the state dict (with ``torch.equal`` for ``signed_zeros=False``); a mismatch makes the script exit
with status 1.

Usage (from the repository root)::

    python benchmarks/sparse_files.py --threads 2            # the full-size run (about 2 GB of memory)
    python benchmarks/sparse_files.py --layers 2 --width 1024 --repeats 1
    python benchmarks/sparse_files.py --width 2048 2896 4096 --sparsities 0.95 --signed-zero-sparsities 0.95
    python benchmarks/sparse_files.py --smoke      # every kind of row on tiny tensors (Linear(100, 100), 2 x 64 x 64)

The script prints its table; the files are written in a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from lightning_prune.files.sparse_files import load_sparse, save_sparse  # noqa: E402

OPERATIONS = ("torch.save", "save_sparse", "torch.load", "load_sparse")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.95, 0.98])
    p.add_argument("--signed-zero-sparsities", type=float, nargs="*", default=[0.95, 0.98], help="w*mask rows")
    p.add_argument("--layers", type=int, default=6, help="Linear layers of the large model")
    p.add_argument(
        "--width", type=int, nargs="+", default=[4096], help="their in and out features (one stack per value)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timing rounds (the table shows the median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (save_sparse/load_sparse use as many)")
    p.add_argument("--smoke", action="store_true", help="every kind of row on tiny tensors, 1 round")
    args = p.parse_args(argv)
    args.linear = 100 if args.smoke else 1000  # the one-layer model's in and out features
    if args.smoke:
        args.sparsities, args.signed_zero_sparsities = [0.0, 0.9], [0.9]
        args.layers, args.width, args.repeats = 2, [64], 1
    return args


def build(shapes: list[tuple[int, int]], seed: int = 0) -> dict[str, Tensor]:
    """A dense state dict of Linear layers (weights ~ N(0, 1), biases ~ N(0, 1)) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (out_features, in_features) in enumerate(shapes):
        state[f"{i}.weight"] = torch.randn(out_features, in_features, generator=g)
        state[f"{i}.bias"] = torch.randn(out_features, generator=g)
    return state


def prune(dense: dict[str, Tensor], sparsity: float, *, multiply: bool) -> dict[str, Tensor]:
    """A copy of ``dense`` with the ``sparsity`` smallest-magnitude entries of each weight zeroed."""
    state = {}
    for key, t in dense.items():
        t = t.clone()
        k = int(sparsity * t.numel())
        if key.endswith("weight") and k:
            threshold = t.abs().view(-1).kthvalue(k).values
            if multiply:
                t.mul_(t.abs() > threshold)
            else:
                t.masked_fill_(t.abs() <= threshold, 0.0)
        state[key] = t
    return state


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], Any]) -> tuple[tuple[float, float], Any]:
    """``fn()``'s wall time and the CPU time (user + system, all threads) of this process during it, and its result."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return (time.perf_counter() - wall, cpu_seconds() - cpu), result


def sync(path: Path) -> None:
    """Write ``path``'s dirty pages to disk (``fsync``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bit_identical(loaded: dict[str, Tensor], state: dict[str, Tensor]) -> bool:
    return list(loaded) == list(state) and all(
        torch.equal(loaded[k].view(torch.int32), state[k].view(torch.int32)) for k in state
    )


def measure(state: dict[str, Tensor], folder: Path, repeats: int, **save_kwargs: Any) -> dict[str, Any]:
    dense_path, sparse_path = folder / "dense.pt", folder / "sparse.safetensors"
    times: dict[str, list[tuple[float, float]]] = {
        "torch.save": [],
        "save_sparse": [],
        "torch.load": [],
        "load_sparse": [],
    }
    ok = True
    for round_ in range(repeats):
        # the order flips every round; each save ends with its file on disk
        for name in ("torch.save", "save_sparse")[:: 1 if round_ % 2 == 0 else -1]:
            if name == "torch.save":
                times[name].append(timed(lambda: (torch.save(state, dense_path), sync(dense_path)))[0])
            else:  # save_sparse syncs its file itself
                seconds, info = timed(lambda: save_sparse(state, sparse_path, **save_kwargs))
                times[name].append(seconds)
        for name in ("torch.load", "load_sparse")[:: 1 if round_ % 2 == 0 else -1]:
            gc.collect()
            if name == "torch.load":
                times[name].append(timed(lambda: torch.load(dense_path))[0])
                continue
            seconds, loaded = timed(lambda: load_sparse(sparse_path))
            times[name].append(seconds)
            if save_kwargs.get("signed_zeros", True):
                ok &= bit_identical(loaded, state)
            else:
                ok &= all(torch.equal(loaded[k], state[k]) for k in state)
            del loaded
    formats = sorted(set(info.formats.values()))
    return {
        "dense_bytes": dense_path.stat().st_size,
        "sparse_bytes": info.file_bytes,
        "formats": "/".join(formats),
        "ok": ok,
        **{name: tuple(statistics.median(v) for v in zip(*values)) for name, values in times.items()},
    }


def row(model: str, label: str, zeros: float, r: dict[str, Any]) -> str:
    ratio = r["sparse_bytes"] / r["dense_bytes"]
    return (
        f"| {model} | {label} | {zeros:.3f} | {r['dense_bytes'] / 2**20:,.1f} | {r['sparse_bytes'] / 2**20:,.2f} | "
        f"{ratio:.4f} | {r['formats']} | "
        + " | ".join(
            f"{r[name][0]:.3f} ({r[name][1]:.3f})"
            for name in ("torch.save", "save_sparse", "torch.load", "load_sparse")
        )
        + f" | {'yes' if r['ok'] else 'NO'} |"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {f"linear {args.linear}x{args.linear}": [(args.linear, args.linear)]}
    models.update({f"stack {args.layers}x{w}x{w}": [(w, w)] * args.layers for w in args.width})
    print(f"# Sparse files: save_sparse/load_sparse versus torch.save/torch.load, {args.repeats} rounds (median)")
    print(f"machine: {machine()}\n")
    print(
        "| model | pruning | zeros | torch.save MiB | sparse MiB | size ratio | formats | torch.save s (cpu) "
        "| save_sparse s (cpu) | torch.load s (cpu) | load_sparse s (cpu) | bit-identical |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
    all_ok = True
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model, shapes in models.items():
            dense = build(shapes)
            weights = sum(t.numel() for k, t in dense.items() if k.endswith("weight"))
            runs: list[tuple[str, float, bool, dict[str, Any]]] = [(f"{s:g}", s, False, {}) for s in args.sparsities]
            for s in args.signed_zero_sparsities:
                runs.append((f"{s:g} w*mask", s, True, {}))
                runs.append((f"{s:g} w*mask, signed_zeros=False", s, True, {"signed_zeros": False}))
            for label, sparsity, multiply, kwargs in runs:
                state = prune(dense, sparsity, multiply=multiply)
                zeros = sum(int((t == 0).sum()) for k, t in state.items() if k.endswith("weight")) / weights
                result = measure(state, Path(tmp), args.repeats, **kwargs)
                all_ok &= result["ok"]
                print(row(model, label, zeros, result), flush=True)
                del state
                gc.collect()
            del dense
            gc.collect()
    print(f"\nwall time {time.perf_counter() - start:.0f}s")
    if not all_ok:
        print("error: a load_sparse result differs from the saved state dict", file=sys.stderr)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
