"""FSDP2 through Lightning's ``ModelParallelStrategy``: 2 CPU processes over gloo, each run a subprocess
(``tests/fsdp_script.py``) with a hard timeout, compared with the same fit in one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fsdp_script import mlp
from helpers import expected_zeros

HERE = Path(__file__).parent
TIMEOUT_S = 240
pytestmark = pytest.mark.slow


def launch(case: str, out: Path, *args: str, tag: str = "", devices: int = 2) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "fsdp_script.py"), case, str(out), "--devices", str(devices), "--tag", tag]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{case} did not finish in {TIMEOUT_S}s:\n{output.decode()[-3000:]}")
    assert process.returncode == 0, output.decode()[-3000:]
    results = [torch.load(out / f"{case}{tag}_rank{r}.pt", weights_only=False) for r in range(devices)]
    return {"ranks": results, "output": output.decode()}


@pytest.mark.parametrize("case", ["experts-local", "experts-random"])
def test_sharded_experts_prune_each_expert_as_one_process(tmp_path: Path, case: str) -> None:
    sharded = launch(case, tmp_path)["ranks"]
    single = launch(case, tmp_path, tag="single", devices=1)["ranks"][0]
    assert sharded[0]["error"] is None
    experts = single["masks"]["model.2.proj"]
    assert experts.shape == (4, 10, 12)
    for e in range(4):  # each expert's matrix to its own target, exactly
        assert int((experts[e] == 0).sum()) == expected_zeros(0.5, 120), e
    for name, mask in single["masks"].items():
        assert torch.equal(sharded[0]["masks"][name], mask), name
        assert torch.equal(sharded[1]["masks"][name], mask), name
        assert torch.equal(sharded[0]["weights"][name] == 0, mask == 0), name


@pytest.mark.parametrize("case", ["global-oneshot", "random-oneshot", "importance-oneshot"])
def test_sharded_step_draws_the_masks_of_one_process_entry_for_entry(tmp_path: Path, case: str) -> None:
    sharded = launch(case, tmp_path)["ranks"]
    single = launch(case, tmp_path, tag="single", devices=1)["ranks"][0]
    assert sharded[0]["error"] is None
    reference = mlp()
    for name, mask in single["masks"].items():
        assert torch.equal(sharded[0]["masks"][name], mask), name
        assert torch.equal(sharded[1]["masks"][name], mask), name
        # the weights every process holds at the end have zeros exactly where the masks prune
        assert torch.equal(sharded[0]["weights"][name] == 0, mask == 0), name
    total = sum(m.numel() for m in single["masks"].values())
    zeros = sum(int((m == 0).sum()) for m in single["masks"].values())
    if case == "importance-oneshot":  # local scope: each tensor to 0.5
        for name, mask in single["masks"].items():
            assert int((mask == 0).sum()) == expected_zeros(0.5, mask.numel()), name
    else:
        assert zeros == expected_zeros(0.6 if case == "global-oneshot" else 0.5, total)
    assert sharded[0]["metrics"] == sharded[1]["metrics"] == single["metrics"]
    assert len(single["masks"]) == len([m for m in reference if isinstance(m, torch.nn.Linear)])


@pytest.mark.parametrize("distributed", [1, 0])
def test_sharded_checkpoints_resume_bit_identically(tmp_path: Path, distributed: int) -> None:
    flag = ["--distributed-ckpt", str(distributed)]
    full = launch("global-ramp", tmp_path, "--epochs", "4", *flag, tag="full")["ranks"][0]
    launch("global-ramp", tmp_path, "--epochs", "2", *flag, tag="part")
    ckpt = tmp_path / "ckptpart" / "last.ckpt"
    assert ckpt.is_dir() == bool(distributed)
    resumed = launch("global-ramp", tmp_path, "--epochs", "4", *flag, "--ckpt", str(ckpt), tag="res")["ranks"][0]
    assert full["steps"] == resumed["steps"] == 6
    for name in full["weights"]:
        assert torch.equal(full["weights"][name], resumed["weights"][name]), name
    for name in full["masks"]:
        assert torch.equal(full["masks"][name], resumed["masks"][name]), name
    total = sum(m.numel() for m in full["masks"].values())
    assert sum(int((m == 0).sum()) for m in full["masks"].values()) == expected_zeros(0.8, total)
    if not distributed:  # the full checkpoint loads strictly into the plain, unsharded model
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        net = mlp()
        net.load_state_dict({k[len("model.") :]: v for k, v in state.items()}, strict=True)
        masks = torch.load(ckpt, weights_only=False)["callbacks"]
        assert any("masks" in v for v in masks.values())


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("neurons", r"`method=neurons\(l2\)` needs whole tensors"),
        ("hook", r"`mask_mode='hook'`.*cannot wrap sharded DTensor"),
        ("rewind", r"`rewind` would keep each process's shard"),
        ("tensor-parallel", r"`tensor_parallel_size=1` \(FSDP2\) only, got tensor_parallel_size=2"),
    ],
)
def test_what_shards_cannot_do_is_refused_before_training_with_the_model_untouched(
    tmp_path: Path, case: str, match: str
) -> None:
    import re

    for rank in launch(case, tmp_path)["ranks"]:
        assert rank["error"] is not None and re.search(match, rank["error"]), rank["error"]
        assert rank["untouched"]
