"""One process or several (``accelerate launch`` / ``torchrun``): rank checks, process-group setup, barriers.
(DDP's ``find_unused_parameters`` is chosen by :class:`~sqakd_hf.training.trainer.SQAKDTrainer`.)"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["is_main_process", "say", "setup_distributed", "barrier"]


def is_main_process() -> bool:
    """Rank 0 (or no launcher), from the launcher's environment; works before torch is initialised."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def say(message: str) -> None:
    """Print on the main process only."""
    if is_main_process():
        print(message, flush=True)


def setup_distributed(training: Any) -> None:
    """Initialise the process group of a launched run from its ``TrainingArguments`` (DDP on CPU uses
    gloo); raise :class:`~sqakd_hf.errors.RecipeError` if launched but not set up for it."""
    import torch
    from transformers.training_args import ParallelMode

    from ..errors import RecipeError

    if not torch.cuda.is_available():
        training.dataloader_pin_memory = False
    _ = training.device  # initialises the process group under a launcher
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and training.parallel_mode != ParallelMode.DISTRIBUTED:
        raise RecipeError(
            f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but the training arguments are not set up for "
            "distributed training; on a machine without GPUs set use_cpu: true and ddp_backend: gloo "
            "(sqakd-hf train does this unless the recipe sets them)"
        )
    if training.world_size > 1:
        print(f"sqakd-hf: process {training.process_index}/{training.world_size} on {training.device}", flush=True)


def barrier() -> None:
    """Wait for every process (no-op for a single process)."""
    import torch.distributed as dist

    from ..process_group import world_size

    if world_size() > 1:
        dist.barrier()
