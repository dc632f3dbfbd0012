"""One process or several (``accelerate launch`` / ``torchrun``): rank checks, process-group setup, barriers, and
DDP's ``find_unused_parameters`` chosen from the parameters the student actually uses."""

from __future__ import annotations

import os
from typing import Any, List

__all__ = ["is_main_process", "say", "setup_distributed", "barrier", "unused_parameters",
           "choose_find_unused_parameters"]


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

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def unused_parameters(model: Any, batch: Any, distill_target: str = "logits") -> List[str]:
    """Names of the trainable parameters of a (quantized) ``model`` that the training objective does not reach
    on ``batch`` (e.g. a pooler when the last hidden state is distilled).

    One forward pass in eval mode with every quantizer bypassed (so no calibration is needed), then a walk of
    the autograd graph from the distilled output to the parameters it reaches (no backward pass, no gradient
    memory). A quantizer's parameters count as used when its layer's weight is (it quantizes that layer's
    weight or input whenever the layer runs).
    """
    import torch

    from ..injection import named_quantizers, quant_layers
    from ..model_io import call_model, output_tensor, split_labels

    quantizers = [q for _, q in named_quantizers(model)]
    bypassed = [q.bypass for q in quantizers]
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.bypass = True
    try:
        with torch.enable_grad():
            inputs, _ = split_labels(batch)
            extra = {"output_hidden_states": True} if distill_target == "hidden_states" else {}
            out = output_tensor(call_model(model, inputs, **extra), distill_target)
    finally:
        for q, flag in zip(quantizers, bypassed):
            q.bypass = flag
        model.train(was_training)
    reached = set()
    stack = [out.grad_fn] if out.grad_fn is not None else []
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor (parameter)
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    layer_of = {id(q): layer for _, layer in quant_layers(model)
                for q in (layer.weight_quantizer, layer.input_quantizer)}
    unused = []
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            layer = layer_of.get(id(module))
            used = id(layer.weight) in reached if layer is not None else id(p) in reached
            if not used:
                unused.append(f"{name}.{pname}" if name else pname)
    return unused


def choose_find_unused_parameters(training: Any, model: Any, dataset: Any, collator: Any) -> None:
    """Under DDP, set ``training.ddp_find_unused_parameters`` from what the student actually uses (unless the
    recipe set it): False when every trainable parameter gets a gradient, so DDP neither searches the graph
    every step nor warns about ``find_unused_parameters=True``; True (with a note) otherwise."""
    import itertools

    from ..model_io import unwrap

    if training.world_size <= 1 or training.ddp_find_unused_parameters is not None:
        return
    try:  # one example shows the graph's structure
        examples = [dataset[i] for i in range(min(1, len(dataset)))]
    except TypeError:  # a streamed dataset
        examples = list(itertools.islice(iter(dataset), 1))
    unused = unused_parameters(unwrap(model), collator(examples), training.distill_target)
    training.ddp_find_unused_parameters = bool(unused)
    if unused:
        say(f"sqakd-hf: {len(unused)} trainable parameter(s) get no gradient (e.g. {unused[0]}): DDP runs with "
            "find_unused_parameters=True")
