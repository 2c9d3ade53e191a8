"""Every benchmark script's ``--smoke`` run, as a user runs it: ``python benchmarks/<script>.py --smoke ...`` in a
subprocess from the repository root, on tiny inputs written here (MNIST-format files, a little Python-like text),
never the real data. Each run must exit 0, print or write the figures it is about, and leave
``benchmarks/results/`` alone (issue 23)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import write_tiny_mnist

pytestmark = pytest.mark.slow  # one interpreter (or more) per script, each importing torch and Lightning

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TIMEOUT_S = 300  # each run takes 10-30 s on an idle 2-CPU machine; this one is often shared


@dataclass(frozen=True)
class Inputs:
    """What a smoke run reads and where it writes."""

    data: Path  # holds MNIST/raw/
    train: Path  # text files for the language model
    valid: Path
    out: Path  # --out-dir


@dataclass(frozen=True)
class Run:
    """A smoke run's output."""

    stdout: str
    out: Path

    def csv(self, name: str) -> list[dict[str, str]]:
        with (self.out / name).open() as f:
            return list(csv.DictReader(f))

    def text(self, name: str) -> str:
        return (self.out / name).read_text()

    def table_rows(self, first_cell: str) -> list[list[str]]:
        """The cells of the printed Markdown table rows whose first cell starts with ``first_cell``."""
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in self.stdout.splitlines()]
        return [r for r in rows if r[0].startswith(first_cell)]


def python_like_text(lines: int) -> str:
    """Source-like text (definitions, arithmetic, branches), a few KB: the language model's byte data."""
    out = []
    for i in range(lines):
        out.append(
            f"def step_{i}(value, scale={i % 7}):\n"
            f"    total = value * scale + {i}\n"
            f"    if total > {i % 5}:\n"
            f"        return total  # keep\n"
            f"    return -total\n\n"
        )
    return "".join(out)


@pytest.fixture
def inputs(tmp_path: Path) -> Inputs:
    data = write_tiny_mnist(tmp_path / "data")  # 60 training and 20 test images
    text = python_like_text(60)
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text(text[: 3 * len(text) // 4])
    valid.write_text(text[3 * len(text) // 4 :])
    return Inputs(data, train, valid, tmp_path / "out")


def mnist(i: Inputs) -> list[str]:
    return ["--data-dir", str(i.data), "--out-dir", str(i.out)]


# ---------------------------------------------------------------------------------------------- checks


def check_accuracy_vs_sparsity(run: Run) -> None:
    rows = run.csv("accuracy_vs_sparsity.csv")
    methods = {(r["method"], float(r["target"])) for r in rows}
    assert methods == {("dense", 0.0), ("callback", 0.5), ("modelpruning", 0.5), ("modelpruning-nolth", 0.5)}
    for row in rows:
        assert float(row["sparsity"]) == pytest.approx(float(row["target"]), abs=1e-4), row
        # the size figures of the report: all 60,074 parameters of LeNet (biases too) over the nonzero ones
        assert float(row["compression_ratio"]) == pytest.approx(60074 / int(row["params_nonzero"]), abs=1e-3), row
        if row["method"] == "dense":
            assert float(row["compression_ratio"]) == 1.0 and float(row["theoretical_speedup"]) == 1.0
        else:
            assert float(row["compression_ratio"]) > 1.9 and float(row["theoretical_speedup"]) > 1.0, row
    assert "| callback | 0.5 | 0.5000 |" in run.text("accuracy_vs_sparsity.md")
    assert (run.out / "accuracy_vs_sparsity.png").stat().st_size > 0


def check_checkpoint_size(run: Run) -> None:
    ratios = {r[0]: float(r[2]) for r in run.table_rows("") if r[0] in ("dense", "inplace", "hook", "0.1 format")}
    assert ratios["dense"] == 1.0
    # bit-packed masks in the callback's state cost little; 0.1's float32 masks in the state_dict cost their size
    assert 1.0 < ratios["inplace"] < ratios["0.1 format"] and 1.0 < ratios["hook"] < ratios["0.1 format"]
    assert run.table_rows("`torch.save(state_dict)`, pruned")


def check_nm_accuracy(run: Run) -> None:
    rows = {r["method"]: r for r in run.csv("nm_accuracy.csv")}
    assert set(rows) == {"dense", "nm-2:4", "l1-0.5"}
    assert float(rows["dense"]["sparsity"]) == 0.0
    assert float(rows["nm-2:4"]["sparsity"]) == 0.5 and rows["nm-2:4"]["nm_satisfied"] == "True"
    assert float(rows["l1-0.5"]["sparsity"]) == 0.5
    assert "| nm-2:4 | 0.5000 | yes |" in run.text("nm_accuracy.md")


def check_prune_step(run: Run) -> None:
    assert "all checks passed: True" in run.stdout
    rows = run.table_rows("global,") + run.table_rows("local,")
    assert len(rows) == 10  # every step: torch's and ours, global and local, hook and incremental
    assert all(r[1].endswith(" s") for r in rows)
    measured = [r for r in rows if r[3].endswith("MiB")]
    assert [r[0] for r in measured] == [
        "global, torch `global_unstructured`",
        "global, lightning_prune, `hook`, incremental",
    ]


def check_sensitivity(run: Run) -> None:
    rows = run.csv("sensitivity.csv")
    assert [r["kind"] for r in rows] == ["dense", "global", "uniform", "sensitivity"]
    for row in rows[1:]:
        assert float(row["sparsity"]) == pytest.approx(0.5, abs=1e-3), row
    suggested = json.loads((run.out / "sensitivity_seed0" / "sensitivity_suggested.json").read_text())
    assert len(suggested["0.5"]) == 5  # a sparsity for each of LeNet's five weights
    assert (run.out / "sensitivity_seed0" / "sensitivity.png").stat().st_size > 0
    assert "| 0.5 | sensitivity | 0.5000 |" in run.text("sensitivity.md")


def check_sharded_step(run: Run) -> None:
    assert "masks equal to one process's: True" in run.stdout
    assert run.table_rows("1 process")
    assert len(run.table_rows("2 processes, rank")) == 2


def check_sparse_files(run: Run) -> None:
    rows = run.table_rows("linear 100x100") + run.table_rows("stack 2x64x64")
    assert len(rows) == 8  # 2 models x (0, 0.9, 0.9 w*mask, 0.9 w*mask without signed zeros)
    assert all(r[-1] == "yes" for r in rows)  # loaded bit for bit
    for r in rows:
        assert float(r[2]) == pytest.approx(float(r[1].split()[0]), abs=1e-3)  # zeros measured = asked
        assert (float(r[5]) < 0.3) == (r[1] != "0"), r  # the sparse file is small only with zeros


def check_structured(run: Run) -> None:
    rows = {r["scope"]: r for r in run.csv("structured.csv")}
    assert set(rows) == {"dense", "local", "global"}
    assert int(rows["dense"]["neurons_kept"]) == 226
    for scope in ("local", "global"):
        assert int(rows[scope]["neurons_kept"]) == 113  # half of conv1, conv2, fc1, fc2's 226 removed
        assert float(rows[scope]["max_abs_diff"]) < 1e-4  # the compact model computes what the masked one did
        assert int(rows[scope]["params"]) < int(rows["dense"]["params"])
    text = run.text("structured.md")
    assert "| neurons, local | 50% (113/226) |" in text
    assert "Per-operation CPU time" in text and "| TorchScript trace + freeze |" in text


def check_train_overhead(run: Run) -> None:
    assert "all checks passed: True" in run.stdout
    rows = [(r[0], r[1]) for r in run.table_rows("") if r[0] in ("lenet", "mlp", "encoder")]
    assert rows == [
        ("lenet", "dense"), ("lenet", "hook"), ("lenet", "inplace"),
        ("mlp", "dense"), ("mlp", "hook"), ("mlp", "inplace"),
        ("encoder", "dense"), ("encoder", "inplace"),
    ]  # fmt: skip


def check_vit(run: Run) -> None:
    rows = run.csv("vit.csv")
    from benchmarks.vit import METHODS

    assert {r["method"] for r in rows} == set(METHODS)
    for row in rows:
        if row["method"] == "modelpruning":  # leaves out_proj dense: 12 of the 16 matrices at 0.5
            assert 0.4 < float(row["sparsity"]) < 0.5, row
        elif row["method"] != "dense":
            assert float(row["sparsity"]) == pytest.approx(0.5, abs=1e-4), row
    assert "| global L1, our schedule | 0.5 | 0.5000 |" in run.text("vit.md")
    assert "| one-shot SparseGPT (per row), no fine-tuning | 0.5 | 0.5000 |" in run.text("vit.md")
    assert (run.out / "vit.png").stat().st_size > 0


def check_lm(run: Run) -> None:
    rows = run.csv("lm.csv")
    from benchmarks.lm import METHODS

    assert {r["method"] for r in rows} == set(METHODS)
    for row in rows:
        assert 0 < float(row["bpb"]) < 9, row  # bits per byte: 8 for a uniform guess over bytes
        if row["method"] in ("magnitude-local", "magnitude-global", "nm-magnitude", "gradual-l1-global"):
            assert float(row["sparsity"]) == pytest.approx(float(row["target"]), abs=1e-4), row
    text = run.text("lm.md")
    assert "| one shot, 2:4 by Wanda's scores | 0.5 | 0.5000 |" in text
    assert "| one shot, 2:4 by SparseGPT | 0.5 | 0.5000 |" in text and "| sparsegpt | wanda-row |" in text
    sparsegpt = [r for r in rows if r["method"] == "sparsegpt"]
    assert sparsegpt and all(float(r["sparsity"]) == pytest.approx(float(r["target"]), abs=2e-3) for r in sparsegpt)
    assert "Generation of 4 bytes" in text and "| threads | dense (s) |" in text  # --latency
    spread = [line for line in text.splitlines() if line.startswith("| h.")]  # the activation table, a row a matrix
    assert len(spread) == 8 and all(float(line.split("|")[2]) >= 1.0 for line in spread), spread


def check_oneshot_cost(run: Run) -> None:
    text = run.text("oneshot_cost.md")
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r[1].strip() for r in rows] == ["magnitude", "wanda", "sparsegpt", "sparsegpt-2:4"]
    assert all(float(r[2]) >= 0 and float(r[3]) > 0 for r in rows), rows  # seconds, peak extra MiB


def check_sparse_inference(run: Run) -> None:
    text = run.text("sparse_inference.md")
    assert "## Models" in text and "TOKENS DIFFER" not in text
    models = ("MLP 4 x 256", "ViT (smoke)", "GPT-2 2 x 64, blocks", "GPT-2 2 x 64, blocks+head", "ResNet-18")
    rows = [r for r in run.table_rows("") if r[0] in models]
    assert {r[0] for r in rows} == set(models)
    for row in rows:  # the converted model computes what the dense one did: its largest difference, or its tokens
        assert row[-1] == "same tokens" if row[2].startswith("generate") else float(row[-1]) < 1e-3, row
    assert "same tokens" in text


def check_speed_target(run: Run) -> None:
    text = run.text("speed_target.md")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    converted = [r for r in rows if r[0][0].isdigit()]  # converted at batch 1, 4, 1 with 4, each run at 1 and 4
    assert [(r[0], r[5]) for r in converted] == [
        ("1", "1"), ("1", "4"), ("4", "1"), ("4", "4"), ("1 + 4", "1"), ("1 + 4", "4")
    ]  # fmt: skip
    planned = {r[0]: r for r in rows if r[0].startswith(("plan_speedup", "uniform"))}
    assert set(planned) == {"plan_speedup 1.2x", "uniform global 0.9"}
    for row in converted + list(planned.values()):  # the converted model computes what the dense one did
        assert float(row[-1]) < 1e-3, row
    assert 0 < float(planned["uniform global 0.9"][-2]) < 1  # the importance removed


def check_speed_target_gpt2(run: Run) -> None:
    text = run.text("speed_target_gpt2.md")
    assert "gpt2, tiny (smoke)" in text and "## Converted at one batch size, run at another\n\n(not run)" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    planned = {r[0]: r for r in rows if r[0].startswith(("plan_speedup", "uniform"))}
    assert set(planned) == {"plan_speedup 1.2x", "uniform global 0.9"}
    assert all(float(r[-1]) < 1e-3 for r in planned.values())  # the converted step decodes as the dense one did
    assert 0 < float(planned["uniform global 0.9"][-2]) < 1


def _trained_rows(run: Run, name: str) -> dict[str, list[str]]:
    text = run.text(name)
    assert "## After training: the plan against uniform pruning at equal measured speed" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    trained = {r[0]: r for r in rows if r[0].startswith(("plan_speedup", "uniform"))}
    assert set(trained) == {"plan_speedup 1.2x", "uniform global 0.5", "uniform global 0.9"}
    assert [float(trained[f"uniform global {s}"][3]) for s in ("0.5", "0.9")] == [0.5, 0.9]  # the zeros reached
    assert all(float(r[-1]) < 1e-3 for r in trained.values())  # the converted model computes the dense one's
    return trained


def check_speed_target_lm(run: Run) -> None:
    assert all(0 < float(r[7]) < 9 for r in _trained_rows(run, "speed_target_lm.md").values())  # bits per byte


def check_speed_target_mlp(run: Run) -> None:
    assert all(0 <= float(r[7]) <= 100 for r in _trained_rows(run, "speed_target_mlp.md").values())  # accuracy


def check_import_time(run: Run) -> None:
    assert re.search(r"import lightning_prune after torch and pytorch_lightning: median \d+\.\d+ s", run.stdout)
    assert re.search(r"heavy packages among them \(.*\): none", run.stdout)


def check_recovery(run: Run) -> None:
    rows = run.csv("recovery.csv")
    recipes = ["0.3", "distill", "rewarm", "erk", "distill+rewarm", "all"]
    for workload, dense in (("lenet", "dense"), ("gpt", "dense-continued"), ("vit", "dense")):
        mine = [r for r in rows if r["workload"] == workload]
        assert sorted(r["recipe"] for r in mine) == sorted([dense, *recipes])
        for r in mine:
            want = 0.0 if r["recipe"] == dense else 0.9
            assert abs(float(r["sparsity"]) - want) < 0.01, r
            assert float(r["value"]) > 0
    text = run.text("recovery.md")
    assert "| workload | target | recipe | dense | pruned | gap | seeds |" in text
    lenet, gpt, vit = run.table_rows("lenet"), run.table_rows("gpt"), run.table_rows("vit")
    assert [r[2] for r in lenet] == recipes and [r[2] for r in gpt] == recipes and [r[2] for r in vit] == recipes
    assert all(re.fullmatch(r"[+-]\d+\.\d\d", r[5]) and r[6] == "1" for r in lenet + vit)
    assert all(re.fullmatch(r"[+-]\d+\.\d%", r[5]) and " ± " in r[3] and " ± " in r[4] for r in gpt)
    assert re.search(r"\d+\.\d ms per step without, \d+\.\d ms with \(\d+\.\d\dx\)", text)


# ---------------------------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Smoke:
    script: str
    argv: Callable[[Inputs], list[str]]
    check: Callable[[Run], None]


SMOKES = [
    Smoke("accuracy_vs_sparsity", mnist, check_accuracy_vs_sparsity),
    Smoke("checkpoint_size", lambda i: [], check_checkpoint_size),
    Smoke("nm_accuracy", mnist, check_nm_accuracy),
    Smoke("prune_step", lambda i: [], check_prune_step),
    Smoke("sensitivity", mnist, check_sensitivity),
    Smoke("sharded_step", lambda i: [], check_sharded_step),
    Smoke("sparse_files", lambda i: [], check_sparse_files),
    Smoke("structured", mnist, check_structured),
    Smoke("train_overhead", lambda i: [], check_train_overhead),
    Smoke("vit", lambda i: [*mnist(i), "--threads", "1"], check_vit),
    Smoke(
        "lm",
        lambda i: [
            *("--train-file", str(i.train), "--valid-file", str(i.valid), "--out-dir", str(i.out)),
            *("--cache-dir", str(i.out / "cache"), "--threads", "1", "--latency"),
        ],
        check_lm,
    ),
    Smoke("sparse_inference", lambda i: ["--out-dir", str(i.out)], check_sparse_inference),
    Smoke("speed_target", lambda i: ["--out-dir", str(i.out)], check_speed_target),
    Smoke(
        "speed_target",
        lambda i: ["--out-dir", str(i.out), "--model", "gpt2", "--sections", "plan", "--name", "speed_target_gpt2"],
        check_speed_target_gpt2,
    ),
    Smoke(
        "speed_target",
        lambda i: [
            *("--out-dir", str(i.out), "--model", "lm", "--sections", "train", "--name", "speed_target_lm"),
            *("--cache-dir", str(i.out / "trained")),
            *("--lm-args", "--train-file", str(i.train), "--valid-file", str(i.valid), "--cache-dir", str(i.out)),
        ],
        check_speed_target_lm,
    ),
    Smoke(
        "speed_target",
        lambda i: [
            *("--out-dir", str(i.out), "--model", "mlp", "--sections", "train", "--name", "speed_target_mlp"),
            *("--data-dir", str(i.data), "--cache-dir", str(i.out)),
        ],
        check_speed_target_mlp,
    ),
    Smoke("oneshot_cost", lambda i: ["--out-dir", str(i.out)], check_oneshot_cost),
    Smoke(
        "recovery",
        lambda i: [
            *mnist(i),
            *("--workloads", "lenet", "gpt", "vit", "--cache-dir", str(i.out / "cache"), "--vit-args", "--threads 1"),
            "--cost",
            *("--lm-args", "--train-file", str(i.train), "--valid-file", str(i.valid), "--threads", "1"),
        ],
        check_recovery,
    ),
    Smoke("import_time", lambda i: [], check_import_time),
]


def results_files(script: str) -> dict[Path, int]:
    """The committed results a run of ``script`` would write by default, and when each was last written."""
    return {p: p.stat().st_mtime_ns for p in RESULTS.rglob(f"{script}*") if p.is_file()}


@pytest.mark.parametrize(
    "smoke", SMOKES, ids=[s.script + s.check.__name__.partition(s.script)[2].replace("_", "-") for s in SMOKES]
)
def test_benchmark_smoke_run_prints_its_figures(smoke: Smoke, inputs: Inputs) -> None:
    committed = results_files(smoke.script)
    command = [sys.executable, str(Path("benchmarks") / f"{smoke.script}.py"), "--smoke", *smoke.argv(inputs)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    seconds = time.perf_counter() - start
    print(f"{smoke.script} --smoke: {seconds:.1f} s")
    output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output}"
    smoke.check(Run(done.stdout, inputs.out))
    assert results_files(smoke.script) == committed  # nothing written over (or added to) benchmarks/results/
