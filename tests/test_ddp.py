"""Several processes (issue 4): 2 CPU processes over gloo, under ``ddp`` and ``ddp_spawn``.

Each run is a subprocess (``tests/ddp_script.py``) with a hard timeout, so a hung process group fails the
test instead of hanging it. Every rank seeds its global RNG differently before training.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ddp_script
import pytest
import torch
from helpers import TinyModule

from lightning_prune import PruningScheduleCallback
from lightning_prune.distributed import check_strategy

HERE = Path(__file__).parent
TIMEOUT_S = 240


def _launch(strategy: str, out: Path, modes: list[str]) -> dict[str, list[dict[str, Any]]]:
    command = [sys.executable, str(HERE / "ddp_script.py"), strategy, str(out), "--modes", ",".join(modes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the script and the ranks it started
        output, _ = process.communicate()
        pytest.fail(f"{strategy} run did not finish in {TIMEOUT_S}s:\n{output.decode()[-3000:]}")
    assert process.returncode == 0, output.decode()[-3000:]
    return {mode: [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in (0, 1)] for mode in modes}


def _assert_same_on_both_ranks(rank0: dict[str, Any], rank1: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["zeros"].keys() == rank1["zeros"].keys()
    assert len(rank0["zeros"]) == 3 + 12  # 3 epoch starts, 12 batch starts: every step is compared
    for where, tensors in rank0["zeros"].items():
        assert len(tensors) == 10  # every weight and bias of TinyNet, each under one of the callbacks
        for tensor, zeros in tensors.items():
            if tensor not in skip:
                assert torch.equal(zeros, rank1["zeros"][where][tensor]), (where, tensor)
    final = rank0["zeros"]["step11"]
    assert all(int(z.sum()) > 0 for z in final.values())  # every tensor was pruned
    assert rank0["messages"] > 0 and rank1["messages"] == 0  # printed on rank zero only


@pytest.mark.slow
def test_ddp_every_rank_holds_identical_masks_after_every_step(tmp_path: Path) -> None:
    """Every method (l1, random, ln/random structured, a custom one), local and global, epoch and step
    schedules: bit-identical masks on both ranks at every epoch and batch start. With the broadcast off,
    the built-in methods still agree (identically seeded generators); only the custom method whose scores
    depend on each rank's own RNG does not, which is what the broadcast from rank 0 is there for."""
    results = _launch("ddp", tmp_path, ["broadcast", "no-broadcast"])
    rank0, rank1 = results["broadcast"]
    _assert_same_on_both_ranks(rank0, rank1)
    assert rank0["logged"] == rank1["logged"]
    assert {f"pruning/{i}/sparsity" for i in range(len(ddp_script.CALLBACKS))} <= rank0["logged"].keys()

    ddp_script.fit("auto", tmp_path, "single", devices=1)  # the logged figures are what one process logs
    assert torch.load(tmp_path / "single_rank0.pt", weights_only=False)["logged"] == rank0["logged"]

    alone0, alone1 = results["no-broadcast"]
    _assert_same_on_both_ranks(alone0, alone1, skip=(ddp_script.RANK_DEPENDENT,))
    final0, final1 = alone0["zeros"]["step11"], alone1["zeros"]["step11"]
    assert not torch.equal(final0[ddp_script.RANK_DEPENDENT], final1[ddp_script.RANK_DEPENDENT])


@pytest.mark.slow
def test_ddp_spawn_every_rank_holds_identical_masks(tmp_path: Path) -> None:
    rank0, rank1 = _launch("ddp_spawn", tmp_path, ["broadcast"])["broadcast"]
    _assert_same_on_both_ranks(rank0, rank1)
    assert rank0["logged"] == rank1["logged"]


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured", "ln_structured", "random_structured"])
def test_callback_pickles_for_ddp_spawn(method: str) -> None:
    """``ddp_spawn`` pickles the callbacks into the new processes (a closure in a method broke this)."""
    callback = PruningScheduleCallback(0.5, method=method, rewind="init")
    copy = pickle.loads(pickle.dumps(callback))
    assert (copy.method.name, copy.rewind) == (callback.method.name, callback.rewind)
    assert copy.state_key == callback.state_key


@pytest.mark.parametrize("strategy_name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_callback_refuses_sharded_strategy_before_training(strategy_name: str) -> None:
    """Lightning runs FSDP on CUDA only, so this drives ``setup`` with the strategy object itself. (FSDP2, through
    ``ModelParallelStrategy``, keeps each rank's shards of the masks: tests/test_fsdp.py.)"""
    import pytorch_lightning.strategies as strategies

    cls = getattr(strategies, strategy_name)
    strategy = cls.__new__(cls)  # no process group or accelerator needed to recognise it
    module = TinyModule()
    keys = list(module.state_dict())
    callback = PruningScheduleCallback(0.5)
    trainer = SimpleNamespace(strategy=strategy, callbacks=[callback], max_epochs=1)
    with pytest.raises(ValueError, match=f"does not support `strategy={strategy_name}`.*'ddp'"):
        callback.setup(trainer, module, "fit")
    assert list(module.state_dict()) == keys  # untouched


@pytest.mark.cuda
def test_callback_refuses_fsdp_on_cuda_before_first_batch() -> None:
    import pytorch_lightning as pl
    from helpers import random_loader

    module = TinyModule()
    trainer = pl.Trainer(
        accelerator="cuda", devices=1, strategy="fsdp", max_epochs=1, logger=False, enable_checkpointing=False,
        callbacks=[PruningScheduleCallback(0.5)],
    )  # fmt: skip
    with pytest.raises(ValueError, match="does not support `strategy=FSDPStrategy`"):
        trainer.fit(module, random_loader())
    assert trainer.global_step == 0


def test_check_strategy_refuses_sharded_strategies_of_both_packages() -> None:
    import lightning.pytorch.strategies as lps
    import pytorch_lightning.strategies as pls

    for package in (pls, lps):
        check_strategy(package.DDPStrategy())
        for name in ("DeepSpeedStrategy", "FSDPStrategy"):
            cls = getattr(package, name)
            strategy = cls.__new__(cls)  # no process group or DeepSpeed needed to be refused
            with pytest.raises(ValueError, match=f"does not support `strategy={name}`"):
                check_strategy(strategy)
