"""Sparse inference: latency of models converted by ``to_sparse_inference`` against the same dense models, on the CPU.

Models (random weights from ``--seed``, pruned once by magnitude per tensor with
``prune_once(model, s, scope=--scope)``, whose default selection is every ``Linear``, ``Conv*d``, Hugging Face
``Conv1D`` and attention in-projection weight, embeddings and an output head tied to them left out):

* ``mlp``: 4 x ``Linear(4096, 4096)`` with ReLU between, at each of ``--mlp-sparsities`` and batch sizes
  ``--mlp-batches`` (one input vector per batch row);
* ``vit``: torchvision's ViT-B/16 (224 px, batch 1, 12 x 768; its classifier, which torchvision starts at zero,
  given random weights), at ``--vit-sparsities``;
* ``gpt2``: Hugging Face's ``GPT2LMHeadModel(GPT2Config())`` (12 x 768, 50257-token vocabulary), at
  ``--gpt2-sparsities``: a one-token forward with a key-value cache of ``--context`` tokens (the cache is cropped
  back after every call, so every call sees the same shapes), and a greedy generation of ``--new-tokens`` tokens
  after a ``--prompt``-token prompt (converted on the one-token step, the shape that generation repeats). Rows
  ``blocks``: the default selection (the output head, tied to the token embedding, stays dense); rows
  ``blocks+head``: the head pruned too (and with it the embedding it is tied to);
* ``resnet``: torchvision's ResNet-18 (224 px, batch 1), at ``--resnet-sparsities``: its only eligible layer is
  the classifier (the 1x1 convolutions are strided), so it shows what the fallback costs.

For each model, sparsity and thread count (``--threads``, set with ``torch.set_num_threads``) the model is
converted with ``to_sparse_inference(model, example, min_speedup=--min-speedup, repeats=--convert-repeats)``
(per-layer choice by measurement), then the dense and the converted model are timed in this one process,
interleaved (dense, converted, then converted, dense, ...), after two warm-up rounds: the table shows the medians of
``--repeats`` rounds and their ratio. Each row checks the converted model's outputs against the dense ones (largest
difference over the largest dense output; for generation, whether the tokens are the same). Bytes: ``torch.save``
of the dense and the converted model (for GPT-2 the language model alone).

Usage (from the repository root)::

    python benchmarks/sparse_inference.py                    # the full run, 1 and 2 threads (20-30 min)
    python benchmarks/sparse_inference.py --smoke            # every row on tiny sizes, all sparse (seconds); no file

Writes ``<out-dir>/<name>.md`` (the command, the machine, the load average before and after, the tables and the
goals checked against them; a hand-written section from ``## Procedure and notes`` on is kept), also printed.
``--smoke`` writes it only where ``--out-dir`` is given (never ``benchmarks/results/`` by default).
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.common import RESULTS, finish, machine  # noqa: E402
from lightning_prune import prune_once, to_sparse_inference  # noqa: E402
from lightning_prune.inference import SparseLinear, inference_report  # noqa: E402

SECTIONS = ("layers", "mlp", "vit", "gpt2", "resnet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--threads", type=int, nargs="+", help="torch CPU thread counts, one pass each (default: 1 2; smoke: 1)"
    )
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--seed", type=int, default=0, help="seeds the random weights and inputs")
    p.add_argument("--scope", choices=("local", "global"), default="local", help="prune_once's scope")
    p.add_argument("--repeats", type=int, default=11, help="timed rounds per row (the table shows medians)")
    p.add_argument("--convert-repeats", type=int, default=7, help="to_sparse_inference's repeats")
    p.add_argument("--min-speedup", type=float, default=1.1, help="to_sparse_inference's min_speedup")
    p.add_argument("--layer-sparsities", type=float, nargs="+", default=[0.7, 0.9, 0.95, 0.98])
    p.add_argument("--layer-batches", type=int, nargs="+", default=[1, 8, 64, 197])
    p.add_argument("--mlp-sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9, 0.95, 0.98])
    p.add_argument("--mlp-batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--vit-sparsities", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--gpt2-sparsities", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--resnet-sparsities", type=float, nargs="+", default=[0.9])
    p.add_argument("--context", type=int, default=128, help="GPT-2: tokens in the key-value cache of the one-token row")
    p.add_argument("--prompt", type=int, default=32, help="GPT-2: prompt tokens of the generation row")
    p.add_argument("--new-tokens", type=int, default=32, help="GPT-2: tokens generated (greedy)")
    p.add_argument("--smoke", action="store_true", help="tiny models, 1 round, min_speedup 0: checks every row runs")
    p.add_argument(
        "--out-dir", default=None, help="'' writes no file (none given: benchmarks/results/; with --smoke: no file)"
    )
    p.add_argument("--name", default="sparse_inference", help="file name stem of the results")
    args = p.parse_args(argv)
    args.threads = args.threads or ([1] if args.smoke else [1, 2])
    if args.out_dir is None:
        args.out_dir = "" if args.smoke else str(RESULTS)
    if args.smoke:  # every layer that can be sparse is (min_speedup 0), so that every row checks the sparse path
        args.repeats, args.convert_repeats, args.min_speedup = 1, 1, 0.0
        args.context, args.prompt, args.new_tokens = 8, 4, 4
    return args


def interleaved(fns: Sequence[Callable[[], Any]], repeats: int, warmup: int = 2) -> list[list[float]]:
    """Wall seconds of each of ``fns`` in ``repeats`` rounds, run one after the other in each round (order reversed
    every other round), after ``warmup`` rounds."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for i in range(len(fns)) if round_ % 2 == 0 else reversed(range(len(fns))):
                start = time.perf_counter()
                fns[i]()
                if round_ >= warmup:
                    times[i].append(time.perf_counter() - start)
    return times


def ratios(times: list[list[float]]) -> dict[str, float]:
    """The dense and converted medians (ms) and the speed-ups of the medians and of the fastest runs."""
    (dense, sparse), (fast_dense, fast_sparse) = ([f(t) for t in times] for f in (statistics.median, min))
    return {
        "dense_ms": dense * 1e3,
        "sparse_ms": sparse * 1e3,
        "speedup": dense / sparse,
        "speedup_best": fast_dense / fast_sparse,
    }


def saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return len(buffer.getvalue())


def relative_error(sparse: Tensor, dense: Tensor) -> float:
    return float((sparse - dense).abs().max() / dense.abs().max().clamp_min(1e-30))


def measure(dense: nn.Module, converted: nn.Module, x: Tensor, repeats: int) -> dict[str, float]:
    """Medians of interleaved rounds after one warm-up, and the largest relative difference of the outputs."""
    times = interleaved([lambda: dense(x), lambda: converted(x)], repeats, warmup=1)
    with torch.no_grad():
        error = relative_error(converted(x), dense(x))
    d, s = (statistics.median(t) for t in times)
    return {"dense_ms": d * 1e3, "sparse_ms": s * 1e3, "speedup": d / s, "error": error}


def call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


def convert_and_time(
    args: argparse.Namespace, dense: nn.Module, example: Any, *, label: str, sparsity: float, shape: str, threads: int
) -> tuple[dict[str, Any], nn.Module]:
    """One row: ``dense`` converted on ``example``, both timed interleaved on it, outputs compared."""
    start = time.perf_counter()
    fast = to_sparse_inference(dense, example, min_speedup=args.min_speedup, repeats=args.convert_repeats)
    convert_s = time.perf_counter() - start
    report = inference_report(fast)
    times = interleaved([lambda: call(dense, example), lambda: call(fast, example)], args.repeats)
    with torch.no_grad():
        error = relative_error(first_tensor(call(fast, example)), first_tensor(call(dense, example)))
    forms = sorted({c.form for c in report.sparse_layers})
    row = {
        "model": label,
        "sparsity": sparsity,
        "shape": shape,
        "threads": threads,
        **ratios(times),
        "layers": f"{len(report.sparse_layers)}/{len(report.layers)}",
        "forms": "/".join(forms) or "-",
        "check": f"{error:.1e}",
        "convert_s": convert_s,
    }
    return row, fast


def with_bytes(row: dict[str, Any], dense: nn.Module, fast: nn.Module) -> dict[str, Any]:
    dense_b, sparse_b = saved_bytes(dense), saved_bytes(fast)
    return {**row, "dense_mib": dense_b / 2**20, "sparse_mib": sparse_b / 2**20, "bytes_ratio": sparse_b / dense_b}


def pruned(model: nn.Module, sparsity: float, args: argparse.Namespace, **kwargs: Any) -> nn.Module:
    if sparsity > 0:
        prune_once(model, sparsity, scope=args.scope, **kwargs)
    return model.eval()


# ---------------------------------------------------------------------------------------------- models


LAYER_SHAPES = ((768, 768), (3072, 768), (768, 3072), (4096, 4096))  # (out, in)


def layer_table(args: argparse.Namespace) -> list[str]:
    """Speed-up of one ``Linear`` layer in CSR (``SparseLinear``) over the dense layer, by size, sparsity, batch and
    threads: the same layer run again and again (its weights stay in the caches, which favours the dense layer for
    the smaller sizes; in a model, the other layers evict them)."""
    shapes = ((64, 64), (128, 256)) if args.smoke else LAYER_SHAPES
    batches = args.layer_batches
    lines = [
        "| layer (out x in) | sparsity | threads | "
        + " | ".join(f"batch {b}" for b in batches)
        + " | dense ms, batch 1 |",
        "|---|---:|---:|" + "---:|" * (len(batches) + 1),
    ]
    print("\n".join(lines), flush=True)
    for out_features, in_features in shapes:
        for sparsity in args.layer_sparsities:
            torch.manual_seed(args.seed)
            dense = nn.Linear(in_features, out_features).eval()
            prune_once(dense, sparsity)
            sparse = SparseLinear(dense.weight, dense.bias, "csr").eval()
            for threads in args.threads:
                torch.set_num_threads(threads)
                speedups, first = [], 0.0
                for batch in batches:
                    x = torch.randn(batch, in_features)
                    dense_s, sparse_s = (
                        statistics.median(t) for t in interleaved([partial(dense, x), partial(sparse, x)], args.repeats)
                    )
                    speedups.append(dense_s / sparse_s)
                    first = first or dense_s * 1e3
                cells = " | ".join(f"{r:.2f}x" for r in speedups)
                lines.append(f"| {out_features} x {in_features} | {sparsity:g} | {threads} | {cells} | {first:.3f} |")
                print(lines[-1], flush=True)
    return lines


def mlp_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    width = 256 if args.smoke else 4096
    rows = []
    for sparsity in args.mlp_sparsities:
        torch.manual_seed(args.seed)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < 3 else [])
        model = pruned(nn.Sequential(*layers), sparsity, args)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.mlp_batches:
                x = torch.randn(batch, width, generator=torch.Generator().manual_seed(args.seed))
                label = f"MLP 4 x {width}"
                row, fast = convert_and_time(
                    args, model, x, label=label, sparsity=sparsity, shape=f"batch {batch}", threads=threads
                )
                rows.append(with_bytes(row, model, fast))
                print(format_row(rows[-1]), flush=True)
                del fast
    return rows


def vit_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from torchvision.models import VisionTransformer, vit_b_16

    rows = []
    for sparsity in args.vit_sparsities:
        torch.manual_seed(args.seed)
        if args.smoke:
            model = VisionTransformer(
                image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128
            )
        else:
            model = vit_b_16()
        nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero: outputs to compare
        model = pruned(model, sparsity, args)
        size = model.image_size
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
        for threads in args.threads:
            torch.set_num_threads(threads)
            label = "ViT (smoke)" if args.smoke else "ViT-B/16"
            row, fast = convert_and_time(
                args, model, x, label=label, sparsity=sparsity, shape=f"1 x {size} px", threads=threads
            )
            rows.append(with_bytes(row, model, fast))
            print(format_row(rows[-1]), flush=True)
            del fast
    return rows


class OneToken(nn.Module):
    """One decoding step of a causal language model on a key-value cache that is cropped back after each call, so
    that every call sees the same shapes (the cache is part of the module and copied with it). The language model is
    its ``model``, as in ``benchmarks/lm.py``'s LightningModule, so that a speed plan's names are the same there."""

    def __init__(self, lm: nn.Module, cache: Any) -> None:
        super().__init__()
        self.model, self.cache = lm, cache
        self.length = cache.get_seq_length()

    def forward(self, input_ids: Tensor) -> Tensor:
        logits = self.model(input_ids=input_ids, cache=self.cache, use_cache=True).logits
        self.cache.crop(self.length - self.cache.get_seq_length())
        return logits


def generation(
    model: nn.Module, prompt: Tensor, kwargs: dict[str, Any], outputs: dict[str, Tensor], key: str
) -> Callable[[], None]:
    """A greedy ``model.generate`` call that keeps its tokens in ``outputs[key]``."""

    def run() -> None:
        outputs[key] = model.generate(prompt, **kwargs)

    return run


def gpt2_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=64) if args.smoke else GPT2Config()
    head = ["*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight", "lm_head.weight"]
    rows = []
    for sparsity in args.gpt2_sparsities:
        for selection, parameters in (("blocks", None), ("blocks+head", head)):
            torch.manual_seed(args.seed)
            lm = pruned(GPT2LMHeadModel(config), sparsity, args, parameters=parameters)
            g = torch.Generator().manual_seed(args.seed)
            context = torch.randint(0, config.vocab_size, (1, args.context), generator=g)
            prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=g)
            token = torch.randint(0, config.vocab_size, (1, 1), generator=g)
            with torch.no_grad():
                out = lm(context, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            step = OneToken(lm, cache)
            label = f"GPT-2 {config.n_layer} x {config.n_embd}, {selection}"
            for threads in args.threads:
                torch.set_num_threads(threads)
                row, fast = convert_and_time(
                    args,
                    step,
                    token,
                    label=label,
                    sparsity=sparsity,
                    shape=f"1 token, {args.context} cached",
                    threads=threads,
                )
                rows.append(with_bytes(row, lm, fast.model))
                print(format_row(rows[-1]), flush=True)
                generate = {
                    "max_new_tokens": args.new_tokens,
                    "min_new_tokens": args.new_tokens,
                    "do_sample": False,
                    "attention_mask": torch.ones_like(prompt),
                    "pad_token_id": config.eos_token_id,
                }
                outputs: dict[str, Tensor] = {}
                runs = [
                    generation(lm, prompt, generate, outputs, "dense"),
                    generation(fast.model, prompt, generate, outputs, "sparse"),
                ]
                times = interleaved(runs, max(1, args.repeats // 2))
                same = torch.equal(outputs["dense"], outputs["sparse"])
                rows.append(
                    {
                        **rows[-1],
                        "shape": f"generate {args.new_tokens} after {args.prompt}",
                        **ratios(times),
                        "check": "same tokens" if same else "TOKENS DIFFER",
                    }
                )
                print(format_row(rows[-1]), flush=True)
                del fast
    return rows


def resnet_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from torchvision.models import resnet18

    rows = []
    size = 32 if args.smoke else 224
    for sparsity in args.resnet_sparsities:
        torch.manual_seed(args.seed)
        model = pruned(resnet18(), sparsity, args)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
        for threads in args.threads:
            torch.set_num_threads(threads)
            row, fast = convert_and_time(
                args, model, x, label="ResNet-18", sparsity=sparsity, shape=f"1 x {size} px", threads=threads
            )
            rows.append(with_bytes(row, model, fast))
            print(format_row(rows[-1]), flush=True)
            del fast
    return rows


# ---------------------------------------------------------------------------------------------- output

HEADER = (
    "| model | sparsity | input | threads | dense ms | converted ms | speed-up | best-of | sparse layers | forms | "
    "dense MiB | converted MiB | bytes | check |\n"
    "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"
)


def format_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['model']} | {r['sparsity']:g} | {r['shape']} | {r['threads']} | {r['dense_ms']:.3f} | "
        f"{r['sparse_ms']:.3f} | {r['speedup']:.2f}x | {r['speedup_best']:.2f}x | {r['layers']} | {r['forms']} | "
        f"{r['dense_mib']:.1f} | {r['sparse_mib']:.1f} | {r['bytes_ratio']:.3f}x | {r['check']} |"
    )


def goals(rows: list[dict[str, Any]], smoke: bool) -> list[str]:
    """The issue's goals (2 threads), each checked against the rows measured."""

    def find(model: str, sparsity: float, shape: str) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in rows
                if r["model"].startswith(model) and r["sparsity"] == sparsity and r["shape"] == shape
                if r["threads"] == 2
            ),
            None,
        )

    def line(goal: str, found: list[dict[str, Any] | None], test: Callable[[dict[str, Any]], bool], what: str) -> str:
        if smoke or any(r is None for r in found) or not found:
            return f"| {goal} | not measured | - |"
        figures = ", ".join(what.format(**r) for r in found if r is not None)
        return f"| {goal} | {figures} | {'yes' if all(test(r) for r in found if r is not None) else 'NO'} |"

    mlp = [find("MLP", 0.95, f"batch {b}") for b in (1, 8)]
    vit = [find("ViT-B/16", 0.95, "1 x 224 px")]
    one_token = [r for r in rows if r["model"].startswith("GPT-2") and r["sparsity"] == 0.9 and "token" in r["shape"]]
    one_token = [r for r in one_token if r["threads"] == 2]
    worst = min(rows, key=lambda r: r["speedup"]) if rows else None
    at95 = [r for r in rows if r["sparsity"] == 0.95 and not r["model"].startswith("GPT-2")]
    lines = [
        "| goal (2 threads) | measured | met |",
        "|---|---|---|",
        line("MLP at 95%: >= 6x at batch 1 and 8", mlp, lambda r: r["speedup"] >= 6, "{shape}: {speedup:.2f}x"),
        line("ViT-B/16 at 95%, batch 1: >= 1.8x end to end", vit, lambda r: r["speedup"] >= 1.8, "{speedup:.2f}x"),
        line(
            "GPT-2-shaped at 90%, one token: >= 3x",
            one_token or [None],
            lambda r: r["speedup"] >= 3,
            "{model}: {speedup:.2f}x",
        ),
        line(
            "never below 0.95x dense (every row, both thread counts)",
            [worst],
            lambda r: r["speedup"] >= 0.95,
            "lowest: {model} {sparsity:g} {shape}, {threads} threads: {speedup:.2f}x",
        ),
        line(
            "converted <= 0.15x dense bytes at 95% (MLP, ViT)",
            at95 or [None],
            lambda r: r["bytes_ratio"] <= 0.15,
            "{model} {bytes_ratio:.3f}x",
        ),
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    command = "python benchmarks/sparse_inference.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_before = os.getloadavg()
    start = time.perf_counter()
    title = "# Sparse inference: to_sparse_inference against dense, CPU" + (
        " (smoke: tiny models)" if args.smoke else ""
    )
    print(title, flush=True)
    rows: list[dict[str, Any]] = []
    layers = layer_table(args) if "layers" in args.sections else []
    print(HEADER, flush=True)
    builders = {"mlp": mlp_rows, "vit": vit_rows, "gpt2": gpt2_rows, "resnet": resnet_rows}
    for section in args.sections:
        rows += builders[section](args) if section in builders else []
    load_after = os.getloadavg()
    wall = time.perf_counter() - start
    failed = [
        r for r in rows if r["check"] == "TOKENS DIFFER" or (r["check"][0].isdigit() and float(r["check"]) > 1e-3)
    ]
    text = "\n".join(
        [
            title,
            "",
            f"Command (repository root): `{command.strip()}`",
            "",
            f"Machine: {machine()}; threads per row in the table.",
            f"Load average (1, 5, 15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}; after: "
            f"{' '.join(f'{x:.2f}' for x in load_after)}; wall time {wall:.0f} s.",
            "",
            f"Pruning: `prune_once(model, s, scope={args.scope!r})` on random weights (seed {args.seed}); conversion: "
            f"`to_sparse_inference(model, example, min_speedup={args.min_speedup:g}, repeats={args.convert_repeats})`; "
            f"times: medians of {args.repeats} interleaved rounds after 2 warm-up rounds (generation: "
            f"{max(1, args.repeats // 2)}); `speed-up`: of the medians; `best-of`: of the fastest runs (what a machine "
            "without other jobs approaches); `sparse layers`: matrices in a sparse form / eligible matrices; `bytes`: "
            "`torch.save` size, converted over dense; `check`: largest |converted - dense| over the largest |dense| "
            "output (generation: whether the tokens are the same).",
            "",
            "## One layer",
            "",
            *(layers or ["(not run)"]),
            "",
            "## Models",
            "",
            HEADER,
            *(format_row(r) for r in rows),
            "",
            "## Goals",
            "",
            *goals(rows, args.smoke),
            "",
        ]
    )
    print("\n" + "\n".join(goals(rows, args.smoke)))
    finish(args.out_dir, args.name, text, wall, load_before[0], load_after[0])
    if failed:
        print(f"error: converted outputs differ from the dense ones in {len(failed)} rows", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
