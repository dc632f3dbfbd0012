"""The running ``torch.distributed`` group, as every calibration-time technique and the trainer see it.

Each statistic measured on a process's own share of the data (calibration ranges, Hessians, bias errors,
sensitivities, finite-value records) is merged with :func:`all_reduce_` so that every process ends with the same
numbers and therefore builds the same model. Without a group of more than one process both functions are no-ops.
"""

from __future__ import annotations

import torch

__all__ = ["world_size", "all_reduce_"]

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def world_size() -> int:
    """Processes in the running ``torch.distributed`` group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Merge ``tensor`` in place over the processes of a running group (``op``: ``"sum"``, ``"min"`` or
    ``"max"``); unchanged for a single process. Returns ``tensor``."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {', '.join(_OPS)}; got {op!r}")
    if world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
    return tensor
