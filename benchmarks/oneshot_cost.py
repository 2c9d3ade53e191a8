"""What one-shot pruning costs: seconds and peak extra memory of ``prune_once`` with magnitude, Wanda and SparseGPT.

The model is a Hugging Face ``GPT2LMHeadModel`` built from a config (random weights: the cost does not depend on
what the weights are), ``--layers`` blocks of width ``--width``; every matrix weight of the blocks is pruned to
``--sparsity`` (the default selection; 12 x width^2 weights a block). Calibration: ``--batches`` batches of
``--batch-size`` random token windows of ``--context`` tokens, the same for Wanda and SparseGPT.

Each method runs once, in a fresh subprocess, one at a time, measured as ``benchmarks/prune_step.py`` measures a
step: the subprocess sets glibc's ``M_MMAP_THRESHOLD`` to 1 MiB, builds the model and the batches, collects
garbage and trims the heap, reads its resident set size and resets the kernel's high-water mark, then runs
``prune_once`` (calibration included) alone; peak extra memory = ``VmHWM`` after - ``VmRSS`` before. The table
also scales both to 100 M pruned weights (seconds in proportion to the weights; SparseGPT's memory grows with
the square of a layer's input width, not with the weights, so that column is a figure for this width only).
Linux (glibc) only.

Usage (from the repository root)::

    python benchmarks/oneshot_cost.py                      # width 768, 2 blocks (14.2 M pruned weights)
    python benchmarks/oneshot_cost.py --smoke              # a tiny model, every method

Writes ``<out-dir>/oneshot_cost.md`` (``--smoke``: a temporary folder) and prints the table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import OUT_DIR_HELP, machine, mark_peak, read_status, resolve_out_dir, write_results  # noqa: E402
from lightning_prune import SparseGPT, Wanda, prune_once, select_parameters  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt-2:4")
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=args.context, n_embd=args.width, n_layer=args.layers, n_head=args.heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (args.batch_size, args.context), generator=g) for _ in range(args.batches)]
    return model, batches


def prune(method: str, model: torch.nn.Module, batches: list[torch.Tensor], args: argparse.Namespace) -> None:
    if method == "magnitude":
        prune_once(model, args.sparsity)
    elif method == "wanda":
        prune_once(model, args.sparsity, method=Wanda(len(batches)), dataloader=batches)
    elif method == "sparsegpt":
        prune_once(model, args.sparsity, method=SparseGPT(len(batches)), dataloader=batches)
    else:
        prune_once(model, 0.0, method=SparseGPT(len(batches), nm=(2, 4)), dataloader=batches)


def measure(method: str, args: argparse.Namespace) -> dict[str, float]:
    """In a fresh process: seconds and peak extra resident memory of ``prune_once`` alone."""
    torch.set_num_threads(args.threads)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)  # every block >= 1 MiB is its own mmap, unmapped when freed
    model, batches = build(args)
    weights = sum(t.tensor.numel() for t in select_parameters(model))
    gc.collect()
    libc.malloc_trim(0)
    before = mark_peak()
    start = time.perf_counter()
    with torch.no_grad() if method == "magnitude" else torch.enable_grad():
        prune(method, model, batches, args)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_extra": read_status()["VmHWM"] - before, "weights": weights}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out-dir", default=None, help=OUT_DIR_HELP)
    p.add_argument("--smoke", action="store_true", help="a tiny model")
    p.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)  # internal: one method in this process
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.layers, args.width, args.heads, args.context, args.batches, args.batch_size = 1, 64, 2, 32, 2, 2
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return 0
    resolve_out_dir(args, "oneshot_cost")
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--measure", method]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
        rows.append({"method": method, **json.loads(done.stdout.strip().splitlines()[-1])})
    scale = 1e8 / rows[0]["weights"]
    lines = [
        "| method | seconds | peak extra memory (MiB) | seconds per 100 M weights | MiB per 100 M weights |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        mib = r["peak_extra"] / 2**20
        lines.append(
            f"| {r['method']} | {r['seconds']:.1f} | {mib:.0f} | {r['seconds'] * scale:.0f} | {mib * scale:.0f} |"
        )
    text = (
        f"# One-shot pruning: what each method costs\n\nGPT-2 from a config: {args.layers} blocks of width "
        f"{args.width} ({rows[0]['weights'] / 1e6:.1f} M pruned weights), sparsity {args.sparsity} (2:4 for "
        f"sparsegpt-2:4), calibration {args.batches} batches of {args.batch_size} x {args.context} tokens, "
        f"{args.threads} thread(s).\n\nCommand: `python benchmarks/oneshot_cost.py {' '.join(argv)}`\n\n"
        f"Machine: {machine()}\n\n" + "\n".join(lines) + "\n"
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / "oneshot_cost.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
