"""``sqakd_hf.process_group``: merging a statistic over the processes of a real gloo group."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sqakd_hf.process_group import all_reduce_, world_size


def test_single_process_is_a_no_op():
    t = torch.tensor([1.0, -2.0])
    assert world_size() == 1
    assert all_reduce_(t, "max") is t
    assert t.tolist() == [1.0, -2.0]


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="op must be one of sum, min, max; got 'mean'"):
        all_reduce_(torch.zeros(1), "mean")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        own = torch.tensor([1.0 + rank, 10.0 * (rank + 1)])  # rank 0: [1, 10], rank 1: [2, 20]
        merged = {op: all_reduce_(own.clone(), op).tolist() for op in ("sum", "min", "max")}
        torch.save({"world": world_size(), **merged}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_merge_with_each_op(tmp_path):
    out = str(tmp_path / "merged")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got == {"world": 2, "sum": [3.0, 30.0], "min": [1.0, 10.0], "max": [2.0, 20.0]}
