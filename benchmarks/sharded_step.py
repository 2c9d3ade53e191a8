"""The global pruning step on a model sharded by FSDP2 over 2 processes, against one process holding it all.

The model is ``--layers`` ``nn.Linear(--width, --width)`` layers (default 24 x 2048 x 2048 = 100.7 M weights,
384 MiB of float32), built with a fixed seed. The step is the one ``PruningScheduleCallback(scope="global")``
takes (``lightning_prune.prune_step``): ``l1_unstructured`` in global scope to ``--sparsity``, the masks set in a
:class:`~lightning_prune.store.MaskStore` and applied (weights zeroed in place, ``uint8`` masks kept).

* ``single``: one process, plain parameters;
* ``sharded``: ``--processes`` processes (gloo), each layer and the model ``fully_shard``-ed over a 1-D mesh,
  the store summing histograms and counts across processes
  (:func:`lightning_prune.distributed.collective_for` does the same through Lightning's strategy).

Each process runs with ``--threads`` CPU threads (default 1). Time: the step from the unpruned weights, ``--rounds``
times (the weights and a fresh store are restored before each); a round of the sharded step lasts as long as
its slowest process; the table shows medians. Peak extra memory (Linux): as in ``benchmarks/prune_step.py``,
glibc's mmap threshold is 1 MiB, then ``gc.collect()``, ``malloc_trim(0)``, the resident set is read and the
kernel's high-water mark reset before the first round's step; ``VmHWM`` after it, minus that resident set, is
what the step made resident at its worst, the kept ``uint8`` masks included. It is compared with the process's
local shard (the weights it holds) and with the whole model.

Check: the sharded masks equal the single process's, tensor by tensor (CRC-32 of the bit-packed whole masks and
the counts); a mismatch exits with status 1.

Usage (from the repository root)::

    python benchmarks/sharded_step.py                     # the full-size run (about 3 GB of memory)
    python benchmarks/sharded_step.py --layers 4 --width 256 --rounds 2
    python benchmarks/sharded_step.py --smoke           # both runs and the check on 2 x Linear(64, 64), 1 round

The script prints its table and writes no file.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import queue as queues
import socket
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.common import machine, mark_peak, read_status  # noqa: E402
from benchmarks.prune_step import _M_MMAP_THRESHOLD, build_model  # noqa: E402
from lightning_prune import Global, prune_step  # noqa: E402
from lightning_prune.collective import Collective  # noqa: E402
from lightning_prune.selection import select_parameters  # noqa: E402
from lightning_prune.shards import local_view  # noqa: E402
from lightning_prune.store import MaskStore  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny model (2 x 64 x 64), 1 round, --processes processes")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.width, args.rounds = 2, 64, 1
    return args


def run_step(model: torch.nn.Module, args: argparse.Namespace, group: Collective | None) -> MaskStore:
    targets = select_parameters(model)
    store = MaskStore(group)
    prune_step("l1_unstructured", targets, Global(args.sparsity), store)
    return store


def measured(model: torch.nn.Module, args: argparse.Namespace, group: Collective | None) -> dict[str, Any]:
    """Time ``--rounds`` steps from the same weights; peak extra memory of the first."""
    libc = ctypes.CDLL("libc.so.6")
    params = [p for p in model.parameters()]
    saved = [local_view(p).detach().clone() for p in params]
    shard_bytes = sum(s.numel() * s.element_size() for s in saved)
    times, peak, store = [], 0, None
    for r in range(args.rounds):
        with torch.no_grad():
            for p, s in zip(params, saved):
                local_view(p).copy_(s)
        store = None
        gc.collect()
        libc.malloc_trim(0)
        if group is not None:
            group.reduce(torch.zeros(1))  # start together
        if r == 0:
            before = mark_peak()
        start = time.perf_counter()
        store = run_step(model, args, group)
        seconds = time.perf_counter() - start
        if r == 0:
            peak = read_status()["VmHWM"] - before
        if group is not None:  # a round lasts as long as its slowest process
            seconds = max(group.gather([int(seconds * 1e9)])[:, 0].tolist()) / 1e9
        times.append(seconds)
    assert store is not None
    state = store.state_dict()
    fingerprint = {n: (zlib.crc32(v["bits"].numpy().tobytes()), v["shape"]) for n, v in state.items()}
    return {"times": times, "peak": peak, "shard_bytes": shard_bytes, "fingerprint": fingerprint}


def worker(rank: int, args: argparse.Namespace, port: int, queue: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(args.threads)
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.processes)
    try:
        mesh = init_device_mesh("cpu", (args.processes,))
        model = build_model(args.layers, args.width, args.seed)
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

        def reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t

        result = measured(model, args, Collective(reduce, rank, args.processes))
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


def collect(procs: list[Any], queue: Any) -> dict[int, Any] | None:
    """Each process's result from ``queue``; ``None`` (the others stopped) as soon as one exits without its result."""
    results: dict[int, Any] = {}
    while len(results) < len(procs):
        try:
            rank, result = queue.get(timeout=1.0)
            results[rank] = result
        except queues.Empty:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                for proc in procs:
                    proc.terminate()
                return None
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    mib = 1 << 20
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    model = build_model(args.layers, args.width, args.seed)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    single = measured(model, args, None)
    del model
    gc.collect()
    print(f"single process: median {statistics.median(single['times']):.3f} s", flush=True)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, args, port, queue)) for r in range(args.processes)]
    for proc in procs:
        proc.start()
    results = collect(procs, queue)
    for proc in procs:
        proc.join()
    if results is None:
        codes = [proc.exitcode for proc in procs]
        print(f"error: a process of the sharded run failed (exit codes {codes})", file=sys.stderr)
        return 1
    same = all(results[r]["fingerprint"] == single["fingerprint"] for r in results)

    print(
        f"\n{args.layers} x Linear({args.width}, {args.width}) ({full_bytes / 4 / 1e6:.1f} M parameters, "
        f"{full_bytes / mib:.0f} MiB), global L1 step to sparsity {args.sparsity}, {args.threads} thread(s) per "
        f"process, {args.rounds} rounds; masks equal to one process's: {same}\n"
    )
    print("| run | median step | speed-up | peak extra memory | / local shard | / whole model |")
    print("|---|---:|---:|---:|---:|---:|")
    t1 = statistics.median(single["times"])
    print(
        f"| 1 process | {t1:.3f} s | 1.00x | {single['peak'] / mib:.0f} MiB | "
        f"{single['peak'] / single['shard_bytes']:.3f} | {single['peak'] / full_bytes:.3f} |"
    )
    for r in sorted(results):
        res = results[r]
        tr = statistics.median(res["times"])
        print(
            f"| {args.processes} processes, rank {r} ({res['shard_bytes'] / mib:.0f} MiB shard) | {tr:.3f} s | "
            f"{t1 / tr:.2f}x | {res['peak'] / mib:.0f} MiB | {res['peak'] / res['shard_bytes']:.3f} | "
            f"{res['peak'] / full_bytes:.3f} |"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
