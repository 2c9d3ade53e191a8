"""Speed targets and any batch size: ``plan_speedup`` against uniform pruning, and a ViT converted at one batch
size and served at another, on the CPU.

Two sections, on timm's ``--model`` (default ``vit_small_patch16_224``, random weights from ``--seed``, 224 px):

* ``convert``: the model pruned once by magnitude to ``--sparsity`` (``prune_once``, every matrix weight), then
  converted by ``to_sparse_inference`` at each batch size of ``--batches`` (the conversion's wall time), and at the
  first with the others as ``other_inputs`` (row ``1 + 64``), and each converted model timed against the dense one
  at each batch size of ``--batches`` (medians of ``--repeats`` interleaved rounds after one warm-up): converted at
  64 and run at 64, converted at 1 and run at 64, ...;
* ``plan``: for each of ``--targets``, ``plan_speedup(model, batch of --plan-batch, target)`` on the dense model,
  the model pruned once to the plan's per-layer targets (``prune_once(model, plan.sparsity)``; one shot, no
  training), converted, and its speed-up measured; against it, uniform pruning (``prune_once(model, s,
  scope="global")``) at each of ``--uniform-sparsities``, converted and measured: the importance removed (the sum
  of the pruned entries' magnitudes over the sum of all eligible entries') at equal measured speed says which
  pruning costs less. Accuracy after training is not measured here (random weights).

With ``--model gpt2`` (``--sections plan``): GPT-2 (124 M parameters, random weights) decoding one token after
``--context`` cached ones, the plan and uniform pruning measured on that step (batch 1).

With ``--model lm`` or ``--model mlp`` (``--sections train``): accuracy after training, the plan against uniform
pruning at equal measured speed-up (:mod:`benchmarks.trained_speed`): ``benchmarks/lm.py``'s byte-level GPT
decoding one byte, or an MLP on MNIST served one image at a time.

Usage (from the repository root)::

    python benchmarks/speed_target.py --threads 2                # both sections on ViT-S/16
    python benchmarks/speed_target.py --model gpt2 --sections plan   # decoding one token of GPT-2
    python benchmarks/speed_target.py --model mlp --sections train --data-dir ../shared/data --threads 1
    python benchmarks/speed_target.py --model lm --sections train --threads 1 --lm-args --dense-steps 2400
    python benchmarks/speed_target.py --smoke                    # a tiny ViT, 1 round (seconds); no file

Writes ``<out-dir>/<name>.md`` (the command, the machine, the load average before and after, the tables), also
printed; ``--smoke`` writes it only where ``--out-dir`` is given.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.common import RESULTS, finish, machine, quiet_lightning  # noqa: E402
from benchmarks.sparse_inference import OneToken, measure  # noqa: E402
from benchmarks.trained_speed import add_arguments, train_rows  # noqa: E402
from lightning_prune import inference_report, prune_once, select_parameters, to_sparse_inference  # noqa: E402
from lightning_prune.inference import plan_speedup  # noqa: E402

SECTIONS = ("convert", "plan", "train")
TRAINED = ("lm", "mlp")  # the models of the train section
HEADINGS = {
    "convert": "Converted at one batch size, run at another",
    "plan": "Pruning to a speed-up against uniform pruning",
    "train": "After training: the plan against uniform pruning at equal measured speed",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model", default="vit_small_patch16_224", help="timm model name, gpt2 (one decoded token); trained: lm, mlp"
    )
    p.add_argument("--context", type=int, default=128, help="gpt2, lm: the tokens in the key-value cache")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=["convert", "plan"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seeds the random weights and inputs")
    p.add_argument("--sparsity", type=float, default=0.95, help="convert: prune_once's target")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="convert: batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per row (medians)")
    p.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0], help="plan: speed-ups asked for")
    p.add_argument("--plan-batch", type=int, default=1, help="plan: the example's batch size")
    p.add_argument("--uniform-sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--smoke", action="store_true", help="a tiny ViT (32 px, 2 x 64), 1 round: checks every row runs")
    p.add_argument(
        "--out-dir", default=None, help="'' writes no file (none given: benchmarks/results/; with --smoke: no file)"
    )
    p.add_argument("--name", default="speed_target", help="file name stem of the results")
    add_arguments(p)  # the train section's
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = "" if args.smoke else str(RESULTS)
    if args.smoke:
        args.repeats, args.batches, args.targets, args.uniform_sparsities = 1, [1, 4], [1.2], [0.9]
        args.threads = 1
        if args.model in TRAINED:
            args.uniform_sparsities = [0.5, 0.9]
    if ("train" in args.sections) != (args.model in TRAINED) or len(args.sections) > 1 and args.model in TRAINED:
        raise SystemExit("--sections train is the one section of --model lm and --model mlp")
    return args


def build(args: argparse.Namespace) -> tuple[nn.Module, Callable[[int], Tensor]]:
    """The model in eval mode and ``inputs(batch)``, its example inputs at a batch size."""
    torch.manual_seed(args.seed)
    if args.model == "gpt2":
        return decoder(args)
    if args.smoke:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
        size = 32
    else:
        import timm

        model, size = timm.create_model(args.model, pretrained=False), 224
    return model.eval(), lambda batch: torch.randn(batch, 3, size, size)


def decoder(args: argparse.Namespace) -> tuple[nn.Module, Callable[[int], Tensor]]:
    """GPT-2 (124 M, random weights; ``--smoke``: 2 x 64) decoding one token after ``--context`` cached ones:
    :class:`~benchmarks.sparse_inference.OneToken` crops the cache back after each call."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    small = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=args.context + 8)
    config = GPT2Config(**small) if args.smoke else GPT2Config()
    lm = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        out = lm(torch.randint(0, config.vocab_size, (1, args.context), generator=g), use_cache=True)
    step = OneToken(lm, getattr(out, "cache", None) or out.past_key_values)

    def token(batch: int) -> Tensor:
        if batch != 1:
            raise SystemExit("--model gpt2 decodes one sequence: batch 1 only (--plan-batch 1, --sections plan)")
        return torch.randint(0, config.vocab_size, (1, 1), generator=g)

    return step, token


def convert_rows(args: argparse.Namespace) -> list[str]:
    model, inputs = build(args)
    prune_once(model, args.sparsity)
    lines = [
        "| converted at batch | conversion (s) | sparse layers | dense copies (MiB) | end to end at conversion | "
        "run at batch | dense (ms) | converted (ms) | speed-up | check |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first, rest = args.batches[0], args.batches[1:]
    for at, others in [*((b, []) for b in args.batches), *([(first, rest)] if rest else [])]:
        start = time.perf_counter()
        fast = to_sparse_inference(model, inputs(at), other_inputs=[inputs(b) for b in others])
        seconds, report = time.perf_counter() - start, inference_report(fast)
        print(report, flush=True)
        label = " + ".join(map(str, [at, *others]))
        for run in args.batches:
            r = measure(model, fast, inputs(run), args.repeats)
            lines.append(
                f"| {label} | {seconds:.1f} | {len(report.sparse_layers)}/{len(report.layers)} | "
                f"{report.fallback_bytes / 2**20:.1f} | {report.speedup:.2f}x | {run} | {r['dense_ms']:.1f} | "
                f"{r['sparse_ms']:.1f} | {r['speedup']:.2f}x | {r['error']:.1e} |"
            )
            print(lines[-1], flush=True)
    return lines


def removed(dense: nn.Module, pruned: nn.Module) -> float:
    """The magnitude the pruning removed, over the magnitude of every matrix weight of the default selection."""
    weights = {t.name: t.tensor.detach() for t in select_parameters(dense)}
    after = dict(pruned.named_parameters())
    lost = sum(float(w[after[n].detach() == 0].abs().sum()) for n, w in weights.items())
    return lost / sum(float(w.abs().sum()) for w in weights.values())


def pruned_row(label: str, dense: nn.Module, sparsity: Any, x: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    model = copy.deepcopy(dense)
    prune_once(model, sparsity, scope="local" if isinstance(sparsity, dict) else "global")
    fast = to_sparse_inference(model, x)
    r = measure(model, fast, x, args.repeats)
    return {"label": label, "removed": removed(dense, model), **r, "report": inference_report(fast)}


def plan_rows(args: argparse.Namespace) -> list[str]:
    dense, inputs = build(args)
    x = inputs(args.plan_batch)
    lines = [
        "| pruning | target | plan: expected | planning (s) | sparse layers | conversion: end to end | "
        "measured speed-up | within 10% | importance removed | check |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    rows, plans = [], []
    for target in args.targets:
        start = time.perf_counter()
        plan = plan_speedup(dense, x, target)
        planning = time.perf_counter() - start
        print(plan, flush=True)
        plans += ["", f"The plan for {target:g}x:", "", "```", *str(plan).splitlines(), "```"]
        row = pruned_row(f"plan_speedup {target:g}x", dense, plan.sparsity, x, args)
        row.update(target=target, expected=plan.expected_speedup, planning=planning)
        rows.append(row)
    for s in args.uniform_sparsities:
        rows.append({**pruned_row(f"uniform global {s:g}", dense, s, x, args), "target": None})
    for r in rows:
        target, expected = r.get("target"), r.get("expected")
        met = "" if target is None else ("yes" if r["speedup"] >= 0.9 * target else "no")
        planning = "" if target is None else f"{r['planning']:.1f}"
        lines.append(
            f"| {r['label']} | {'' if target is None else f'{target:g}x'} | "
            f"{'' if expected is None else f'{expected:.2f}x'} | "
            f"{planning} | {len(r['report'].sparse_layers)}/{len(r['report'].layers)} | {r['report'].speedup:.2f}x | "
            f"{r['speedup']:.2f}x | {met} | "
            f"{r['removed']:.4f} | {r['error']:.1e} |"
        )
        print(lines[-1], flush=True)
    return lines + plans


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_lightning(args.threads)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    command = "python benchmarks/speed_target.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_before, start = os.getloadavg(), time.perf_counter()
    model = args.model if args.model in ("gpt2", *TRAINED) else "a ViT"
    title = f"# Speed targets and any batch size: {f'{model}, tiny (smoke)' if args.smoke else args.model}, CPU"
    print(title, flush=True)
    sections = {"convert": convert_rows, "plan": plan_rows, "train": train_rows}
    tables = {name: sections[name](args) for name in args.sections}
    load_after, wall = os.getloadavg(), time.perf_counter() - start
    text = "\n".join(
        [
            title,
            "",
            f"Command (repository root): `{command.strip()}`",
            "",
            f"Machine: {machine()}.",
            f"Load average (1, 5, 15 min) before: {' '.join(f'{v:.2f}' for v in load_before)}; after: "
            f"{' '.join(f'{v:.2f}' for v in load_after)}; wall time {wall:.0f} s.",
            "",
            f"{'Trained' if args.model in TRAINED else 'Random'} weights (seed {args.seed}); times: medians of "
            f"{args.repeats} interleaved rounds after a warm-up; `check`: largest |converted - dense| over the largest "
            "|dense| output.",
            "",
            *(
                section
                for name in SECTIONS
                if name in tables or args.model not in TRAINED
                for section in (f"## {HEADINGS[name]}", "", *tables.get(name, ["(not run)"]), "")
            ),
        ]
    )
    finish(args.out_dir, args.name, text, wall, load_before[0], load_after[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
