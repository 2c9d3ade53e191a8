"""Exact selection over shards: processes simulated by threads that sum through a barrier give, together, the
masks of one process holding the whole tensors, ties included."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from helpers import smallest_reference

from lightning_prune.collective import Collective
from lightning_prune.methods.thresholds import iter_smallest, iter_smallest_each


class ThreadGroup:
    """``world`` threads summing tensors through a barrier (a stand-in for ``all_reduce``)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[Any] = [None] * world

    def member(self, rank: int) -> Collective:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            t.copy_(total)
            return t

        return Collective(reduce=reduce, rank=rank, world_size=self.world)


def shard_rows(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    return list(torch.chunk(t, world, dim=0)) + [t[:0]] * (world - len(torch.chunk(t, world, dim=0)))


def run_sharded(tensors: list[torch.Tensor], masks: list[torch.Tensor | None], k: Any, world: int, each: bool):
    group = ThreadGroup(world)
    out: list[list[torch.Tensor]] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            shards = [shard_rows(t, world)[rank] for t in tensors]
            scores = [(lambda s=s: s) for s in shards]
            local = [None if m is None else shard_rows(m, world)[rank].clone() for m in masks]
            fn = iter_smallest_each if each else iter_smallest
            out[rank] = list(fn(scores, local, k, group=group.member(rank)))
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [
        torch.cat([out[r][i].reshape(-1, *tensors[i].shape[1:]) for r in range(world)]) for i in range(len(tensors))
    ]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("premasked", [False, True])
def test_sharded_global_selection_equals_one_process(world: int, ties: bool, premasked: bool) -> None:
    g = torch.Generator().manual_seed(world * 10 + ties)
    shapes = [(7, 5), (2, 3), (9, 4)]  # the second has fewer rows than processes at world 3
    tensors = [torch.randint(0, 4, s, generator=g).float() if ties else torch.rand(s, generator=g) for s in shapes]
    masks = [None] * 3
    if premasked:
        masks = [(torch.rand(s, generator=g) > 0.3).float() for s in shapes]
        tensors = [t * m for t, m in zip(tensors, masks)]
    live = sum(int(m.sum()) if m is not None else m_t.numel() for m, m_t in zip(masks, tensors))
    k = live // 2
    expected = smallest_reference(tensors, masks, k)  # by sorting, ties in tensor then flat-index order
    got = run_sharded(tensors, masks, k, world, each=False)
    for e, s in zip(expected, got):
        assert torch.equal(e, s)
    assert sum(int((s == 0).sum()) for s in got) == sum(m.numel() - int(m.sum()) for m in masks if m is not None) + k


def test_sharded_local_selection_equals_one_process() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randint(0, 3, (6, 4), generator=g).float(), torch.randint(0, 3, (5, 2), generator=g).float()]
    ks = [10, 3]
    expected = [smallest_reference([t], [None], k)[0] for t, k in zip(tensors, ks)]  # each alone, by sorting
    got = run_sharded(tensors, [None, None], ks, 2, each=True)
    for e, s in zip(expected, got):
        assert torch.equal(e, s)
