"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", Sec. 4.2, with the expectation taken over calibration data instead of BatchNorm statistics).

Quantizing a layer's weight and input shifts the mean of its output: ``E[W_q Q(x)] != E[W x]``. For every
quantized layer with a bias, over the calibration batches, the per-output-channel mean of the full-precision
output ``W x + b`` minus that of the quantized output ``W_q Q(x) + b`` (both from the same input ``x``, the one
the quantized network gives the layer) is added to the bias, so the next layer sees the mean the teacher's did.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .injection import quant_layers
from .modules import QuantEmbedding

logger = logging.getLogger(__name__)

__all__ = ["correct_biases", "eval_pass"]


def eval_pass(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
              handles: List[Any]) -> None:
    """Run ``forward(model, batch)`` over ``batches`` in eval mode (the mode is restored), then remove the hook
    ``handles`` (also on error)."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _channel_sum(y: Tensor, features_last: bool) -> Tuple[Tensor, int]:
    """Per-channel sum of ``y`` (channels last, or dim 1 for convs) in float64, and the count per channel."""
    dim = y.dim() - 1 if features_last else 1
    dims = tuple(d for d in range(y.dim()) if d != dim)
    return y.double().sum(dims), y.numel() // y.shape[dim]


@torch.no_grad()
def correct_biases(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
                   reference: Optional[Dict[str, Tensor]] = None) -> List[str]:
    """Add the mean output shift of every calibrated quantized layer with a bias to that bias (in place),
    measured in one pass of ``forward(model, batch)`` over ``batches``; returns the corrected layers' names.
    ``reference``: full-precision weights by layer name, for layers whose master weight was already replaced
    by grid values (GPTQ); otherwise the master weight is the reference. Statistics are all-reduced under
    ``torch.distributed``."""
    reference = reference or {}
    layers = [(n, m) for n, m in quant_layers(model)
              if getattr(m, "bias", None) is not None and not isinstance(m, QuantEmbedding)
              and (m.weight_quantizer.bits < 32 or m.input_quantizer.bits < 32)]
    if not layers:
        return []
    sums: Dict[str, Tensor] = {}
    counts: Dict[str, int] = {}

    def hook(name: str):
        def after(layer: nn.Module, args: Tuple[Any, ...], out: Tensor) -> None:
            quantizers = (layer.weight_quantizer, layer.input_quantizer)
            bypass = [q.bypass for q in quantizers]
            for q in quantizers:
                q.bypass = True
            master = layer.weight.data
            if name in reference:
                layer.weight.data = reference[name]
            try:
                fp = layer.forward(*args)  # the same input, full precision (forward: no hooks)
            finally:
                layer.weight.data = master
                for q, flag in zip(quantizers, bypass):
                    q.bypass = flag
            diff, n = _channel_sum(fp - out, layer.features_last)
            sums[name] = sums[name] + diff if name in sums else diff
            counts[name] = counts.get(name, 0) + n

        return after

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    eval_pass(model, batches, forward, handles)
    names = [n for n, _ in layers if n in sums]
    if not names:
        return []
    flat = torch.cat([sums[n] for n in names] + [torch.tensor([float(counts[n]) for n in names], dtype=torch.float64,
                                                                device=sums[names[0]].device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    sizes = [sums[n].numel() for n in names]
    parts = flat.split(sizes + [len(names)])
    layer_of = dict(layers)
    for name, total, count in zip(names, parts[:-1], parts[-1].tolist()):
        bias = layer_of[name].bias
        bias.add_((total / count).to(bias.dtype))
    logger.info("sqakd: bias correction applied to %d layers", len(names))
    return names
