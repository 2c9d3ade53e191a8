"""Cost of one pruning step on a large model: lightning_prune's exact selection versus torch.nn.utils.prune.

The model is ``--layers`` ``nn.Linear(--width, --width)`` layers built with a fixed seed (default 24 x
2048 x 2048 = 100.7 M weights, 384 MiB). Steps compared, each on the unpruned model:

* global: ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=s)`` versus
  ``lightning_prune.prune_step("l1_unstructured", select_parameters(model), Global(s), store)``, the
  step that ``PruningScheduleCallback(scope="global")`` takes (default ``mask_mode="inplace"``: plain parameters
  zeroed in place, ``uint8`` masks kept aside in a :class:`~lightning_prune.store.MaskStore`);
* local: ``prune.l1_unstructured(layer, "weight", amount=s)`` for every layer versus the same step with
  ``scope="local"``;
* ``mask_mode="hook"`` (ours only): the same steps, then the store's masks put on the model in torch's form
  (``lightning_prune.reparam.install``: a float32 mask and a ``weight`` copy per tensor), as the callback
  does in that mode; its incremental step first takes them off (``reparam.remove``);
* incremental (ours only): from ``s`` to ``--next-sparsity`` with the masks of the first step in place, as
  a schedule's later steps run.

Time: every step runs once per round, in alternation, for ``--rounds`` rounds in this one process (so
that load from other processes hits all alike); the table shows the median over rounds. ``--threads``
sets torch's CPU threads for every step alike: on a machine that other jobs oversubscribe, one thread
avoids OpenMP barriers waiting for a descheduled second thread, which costs many-pass methods (ours)
far more than torch's one-sort global step.

Peak memory: each step runs once more in a fresh subprocess (one at a time). The subprocess builds the
model, does the untimed setup (the first step, for incremental ones), runs ``gc.collect()`` and glibc's
``malloc_trim(0)`` (so that freed memory the allocator still holds cannot hide the step's own
allocations), then reads its resident set size and resets the kernel's high-water mark
(``echo 5 > /proc/self/clear_refs``); after the step alone it reads ``VmHWM`` again. Peak extra memory
= ``VmHWM`` after the step - ``VmRSS`` before it: what the step made resident at its worst moment,
including what it keeps (masks and torch's ``weight`` attribute, 2 x the model's size for any method
that uses torch's reparametrization). Unless ``--default-malloc``, the subprocess first sets glibc's
``M_MMAP_THRESHOLD`` to 1 MiB, so that every large tensor is its own mapping, returned to the system when
freed: the resident set then follows the memory the step holds, not the holes that glibc's heap keeps
resident between long-lived blocks (which otherwise add a few hundred MiB, differently from run to run
and method to method). Linux (glibc) only.

Checks (in the timing process): the number of pruned entries equals the exact target count, and our
masks equal torch's at every entry whose magnitude differs from the step's threshold (the largest pruned
magnitude); entries tied at the threshold may be chosen differently, as torch's ``topk`` breaks ties in
no documented order. The ``hook`` steps must give exactly the masks of the others. Any failed check
makes the script exit with status 1.

Usage (from the repository root)::

    python benchmarks/prune_step.py                   # the full-size run (needs about 6 GB free)
    python benchmarks/prune_step.py --layers 4 --width 512 --rounds 2
    python benchmarks/prune_step.py --smoke           # every step and check on 2 x Linear(64, 64), 1 round

``--smoke`` measures the peak memory of two steps only (:data:`SMOKE_MEMORY`: torch's global step and our
global incremental ``hook`` step), to keep to two subprocesses. The script prints its table and writes no file.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.utils.prune as prune  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import machine, mark_peak, read_status  # noqa: E402
from lightning_prune import prune_step, reparam  # noqa: E402
from lightning_prune.counting import count_for  # noqa: E402
from lightning_prune.methods import resolve_method  # noqa: E402
from lightning_prune.selection import select_parameters  # noqa: E402
from lightning_prune.step import due_for  # noqa: E402
from lightning_prune.store import MaskStore, StoreMasking  # noqa: E402

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
STEPS = (
    "torch_global",
    "ours_global",
    "ours_global_hook",
    "torch_local",
    "ours_local",
    "ours_local_hook",
    "ours_global_incr",
    "ours_global_hook_incr",
    "ours_local_incr",
    "ours_local_hook_incr",
)
SMOKE_MEMORY = ("torch_global", "ours_global_hook_incr")
LABELS = {
    "torch_global": "global, torch `global_unstructured`",
    "ours_global": "global, lightning_prune",
    "ours_global_hook": 'global, lightning_prune, `mask_mode="hook"`',
    "torch_local": "local, torch `l1_unstructured` per layer",
    "ours_local": "local, lightning_prune",
    "ours_local_hook": 'local, lightning_prune, `mask_mode="hook"`',
    "ours_global_incr": "global, lightning_prune, incremental",
    "ours_global_hook_incr": "global, lightning_prune, `hook`, incremental",
    "ours_local_incr": "local, lightning_prune, incremental",
    "ours_local_hook_incr": "local, lightning_prune, `hook`, incremental",
}


def build_model(layers: int, width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def layers_of(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def make_step(name: str, sparsity: float, seed: int, store: MaskStore | None) -> Callable[[nn.Module], None]:
    """The step ``name`` at cumulative ``sparsity`` on an unpruned (or, for ours, already pruned) model; ours
    keep their masks in ``store``, beside plain parameters (and, for the ``hook`` steps, on the model in torch's
    form after the step)."""
    method = resolve_method("l1_unstructured")
    if name == "torch_global":
        return lambda model: prune.global_unstructured(
            [(m, "weight") for m in layers_of(model)], pruning_method=prune.L1Unstructured, amount=sparsity
        )
    if name == "torch_local":

        def torch_local(model: nn.Module) -> None:
            for m in layers_of(model):
                prune.l1_unstructured(m, "weight", amount=sparsity)

        return torch_local
    assert store is not None
    # as the callback's step: the mask mode's way around it (torch's form off and on again in `hook`), one step
    masking = reparam.TorchFormMasking() if "_hook" in name else StoreMasking()
    scope = "global" if name.startswith("ours_global") else "local"

    def ours(model: nn.Module) -> None:
        masking.before_prune(store)
        targets = select_parameters(model)
        prune_step(method, targets, due_for(resolve_method(method), targets, sparsity, scope), store, seed=seed)
        masking.after_prune(store)

    return ours


def setup_and_step(
    name: str, args: argparse.Namespace
) -> tuple[Callable[[nn.Module], None] | None, Callable, MaskStore | None]:
    """``(untimed setup or None, timed step, our steps' masks)`` for step ``name``."""
    store = MaskStore() if name.startswith("ours") else None
    if name.endswith("_incr"):
        first = make_step(name[: -len("_incr")], args.sparsity, args.seed, store)
        return first, make_step(name, args.next_sparsity, args.seed + 1, store), store
    return None, make_step(name, args.sparsity, args.seed, store), store


def reset(model: nn.Module, snapshot: Sequence[torch.Tensor]) -> None:
    """Back to the unpruned model with its original weights."""
    reparam.make_permanent(model)  # torch's form, where a step put it, off (the parameters' order restored)
    for m, w in zip(layers_of(model), snapshot):
        with torch.no_grad():
            m.weight.copy_(w)
    gc.collect()


def masks_of(model: nn.Module, store: MaskStore | None) -> list[torch.Tensor]:
    if store is not None:
        return [m.to(torch.bool) for _, m in store.items()]
    return [m.weight_mask.detach().to(torch.bool) for m in layers_of(model)]


def check_against(
    model: nn.Module, ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor], per_layer: bool, sparsity: float
) -> tuple[bool, str]:
    """Same pruned count (the exact target) and same masks wherever magnitudes are not tied at the threshold."""
    weights = [m.weight_orig.detach() if hasattr(m, "weight_orig") else m.weight.detach() for m in layers_of(model)]

    def threshold(group: Sequence[int]) -> float:  # largest pruned magnitude in the group of layers
        return max(float((weights[i].abs() * (~ours[i])).amax()) for i in group)

    groups = [[i] for i in range(len(weights))] if per_layer else [list(range(len(weights)))]
    counts_ok, tied, differ, differ_untied = True, 0, 0, 0
    for group in groups:
        t = threshold(group)
        n_total = sum(weights[i].numel() for i in group)
        want = count_for(sparsity, n_total)  # a group is one layer (local) or all layers (global)
        n_ours = sum(int((~ours[i]).sum()) for i in group)
        n_theirs = sum(int((~theirs[i]).sum()) for i in group)
        counts_ok &= n_ours == want and n_theirs == want
        for i in group:
            at_t = weights[i].abs() == t
            diff = ours[i] != theirs[i]
            tied += int(at_t.sum())
            differ += int(diff.sum())
            differ_untied += int((diff & ~at_t).sum())
    text = (
        f"pruned count = target for both: {counts_ok}; entries at the threshold magnitude: {tied:,}; "
        f"entries that differ: {differ:,}, of which not at the threshold: {differ_untied:,}"
    )
    return counts_ok and differ_untied == 0, text


def measure_memory(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Run in a fresh process: peak extra resident memory of the step alone (see the module docstring)."""
    libc = ctypes.CDLL("libc.so.6")
    if not args.default_malloc:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)  # every block >= 1 MiB is its own mmap, unmapped when freed
    model = build_model(args.layers, args.width, args.seed)
    setup, step, _ = setup_and_step(name, args)
    if setup is not None:
        setup(model)
    gc.collect()
    libc.malloc_trim(0)
    before = mark_peak()
    start = time.perf_counter()
    step(model)
    seconds = time.perf_counter() - start
    status = read_status()
    return {"peak_extra": status["VmHWM"] - before, "kept": status["VmRSS"] - before, "seconds": seconds}


def memory_in_subprocess(name: str, argv: Sequence[str]) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--measure-memory", name]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--sparsity", type=float, default=0.6, help="target of the first step")
    p.add_argument("--next-sparsity", type=float, default=0.8, help="target of the incremental step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for every step (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--default-malloc", action="store_true", help="measure memory with glibc's default (dynamic) mmap threshold"
    )
    p.add_argument("--smoke", action="store_true", help="a tiny model (2 x 64 x 64), 1 round, 2 memory subprocesses")
    p.add_argument("--measure-memory", choices=STEPS, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.smoke:  # also in the memory subprocesses, which get the same arguments
        args.layers, args.width, args.rounds = 2, 64, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(json.dumps(measure_memory(args.measure_memory, args)))
        return 0

    n_weights = args.layers * args.width * args.width
    print(f"# Pruning step: {args.layers} x Linear({args.width}, {args.width}), {n_weights / 1e6:.1f} M weights")
    print(f"machine: {machine(platform.processor() or platform.machine())}\n")
    model = build_model(args.layers, args.width, args.seed)
    snapshot = [m.weight.detach().clone() for m in layers_of(model)]
    times: dict[str, list[float]] = {name: [] for name in STEPS}
    checks_ok = True
    for r in range(args.rounds):
        order = STEPS if r % 2 == 0 else tuple(reversed(STEPS))
        masks: dict[str, list[torch.Tensor]] = {}
        for name in order:
            setup, step, store = setup_and_step(name, args)
            reset(model, snapshot)
            if setup is not None:
                setup(model)
            start = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - start)
            if r == 0:
                masks[name] = masks_of(model, store)
            if r == 0 and name.endswith("_incr"):
                pruned = sum(int((~m).sum()) for m in masks[name])
                per_layer = name.startswith("ours_local")
                want = (
                    args.layers * count_for(args.next_sparsity, args.width**2)
                    if per_layer
                    else count_for(args.next_sparsity, n_weights)
                )
                checks_ok &= pruned == want
                print(f"check {name}: pruned {pruned:,}, target {want:,}: {pruned == want}")
        if r == 0:
            for scope in ("global", "local"):
                reset(model, snapshot)
                ok, text = check_against(
                    model, masks[f"ours_{scope}"], masks[f"torch_{scope}"], scope == "local", args.sparsity
                )
                checks_ok &= ok
                print(f"check {scope} masks against torch: {text}")
            for name in (n for n in STEPS if "_hook" in n):  # the same selection, also put on the model
                same = all(torch.equal(a, b) for a, b in zip(masks[name], masks[name.replace("_hook", "")]))
                checks_ok &= same
                print(f"check {name}: the same masks as without hook: {same}")
            del masks
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in STEPS), flush=True)

    memory: dict[str, dict[str, float]] = {}
    if not args.no_memory:
        del model, snapshot
        gc.collect()
        base_argv = [a for a in argv if a != "--no-memory"]
        for name in SMOKE_MEMORY if args.smoke else STEPS:
            memory[name] = memory_in_subprocess(name, base_argv)
            print(f"memory {name}: peak extra {mib(memory[name]['peak_extra'])}", flush=True)

    med = {name: statistics.median(v) for name, v in times.items()}
    print(
        f"\n{args.layers} x Linear({args.width}, {args.width}) ({n_weights / 1e6:.1f} M weights, "
        f"{mib(4 * n_weights)}); sparsity {args.sparsity} (incremental: {args.sparsity} -> {args.next_sparsity}); "
        f"median of {args.rounds} rounds\n"
    )
    print("| step | median time | speed-up vs torch | peak extra memory | ratio to torch | kept after the step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in STEPS:
        ref = "torch_global" if "global" in name else "torch_local"
        speed = "" if name == ref else f"{med[ref] / med[name]:.1f}x"
        mem, mem_ratio, kept = "not measured", "", ""
        if name in memory:
            mem, kept = mib(memory[name]["peak_extra"]), mib(memory[name]["kept"])
            if name != ref and memory.get(ref, {}).get("peak_extra"):  # a tiny step may add no resident page
                mem_ratio = f"{memory[name]['peak_extra'] / memory[ref]['peak_extra']:.2f}x"
        print(f"| {LABELS[name]} | {med[name]:.2f} s | {speed} | {mem} | {mem_ratio} | {kept} |")
    print(f"\nall checks passed: {checks_ok}")
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
