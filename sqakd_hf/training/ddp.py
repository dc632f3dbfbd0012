"""DDP's ``find_unused_parameters`` decided from the parameters the student's objective actually reaches."""

from __future__ import annotations

from typing import Any, List

import torch

from ..injection import named_quantizers, quant_layers
from ..model_io import call_model, output_tensor, split_labels
from ..quantizers import bypassing

__all__ = ["unused_parameters"]


def unused_parameters(model: Any, batch: Any, distill_target: str = "logits") -> List[str]:
    """Names of the trainable parameters of a (quantized) ``model`` that the training objective does not reach
    on ``batch`` (e.g. a pooler when the last hidden state is distilled).

    One forward pass in eval mode with every quantizer bypassed (so no calibration is needed), then a walk of
    the autograd graph from the distilled output to the parameters it reaches (no backward pass, no gradient
    memory). A quantizer's parameters count as used when its layer's weight is (it quantizes that layer's
    weight or input whenever the layer runs).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), bypassing(q for _, q in named_quantizers(model)):
            inputs, _ = split_labels(batch)
            extra = {"output_hidden_states": True} if distill_target == "hidden_states" else {}
            out = output_tensor(call_model(model, inputs, **extra), distill_target)
    finally:
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
