"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", Sec. 4.2, with the expectation taken over calibration data instead of BatchNorm statistics).

Quantizing a layer's weight and input shifts the mean of its output: ``E[W_q Q(x)] != E[W x]``. For every
quantized layer with a bias, over the calibration batches, the per-output-channel mean of the full-precision
output ``W x + b`` minus that of the quantized output ``W_q Q(x) + b`` (both from the same input ``x``, the one
the quantized network gives the layer) is added to the bias, so the next layer sees the mean the teacher's did.
A conv without a bias whose output only a BatchNorm reads is corrected through that norm instead: adding ``d``
before ``gamma (x - mean) / sigma + beta`` is the same as subtracting ``d`` from its running mean.

The correction assumes the shift is about the same for every sample. That holds for convolutions (one mean per
channel over many positions), not for transformer linears whose errors sit on a few tokens with massive
activations (all-MiniLM-L6-v2, static per-tensor W8A8: min cosine 0.986 without, 0.480 with the correction on
every linear), nor for inputs clipped to a fixed range (DoReFa's [0, 1]; random-init resnet18 W8A8 relative logit
error 0.041 without, 0.098 with the correction), hence :func:`auto_corrects` (the ``"auto"`` setting of
``QuantConfig.bias_correction``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .folding import CONVS, conv_bn_pairs
from .injection import quant_layers
from .modules import QuantEmbedding, QuantLayer
from .process_group import all_reduce_
from .quantizers import bypassing

logger = logging.getLogger(__name__)

__all__ = ["auto_corrects", "correct_biases", "eval_pass"]


def auto_corrects(layer: nn.Module) -> bool:
    """Whether ``bias_correction="auto"`` corrects ``layer``: a convolution whose input range was calibrated."""
    return isinstance(layer, CONVS) and not type(layer.input_quantizer).fixed_act_range


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


def _norms_after_biasless_convs(model: nn.Module, layers: List[Tuple[str, nn.Module]]) -> Dict[str, _BatchNorm]:
    """``{conv name: the BatchNorm that alone reads its output}`` for the quantized convs in ``layers`` without a
    bias (the model is traced only when there are such convs and a BatchNorm)."""
    biasless = {n for n, m in layers if isinstance(m, CONVS) and m.bias is None}
    if not biasless or not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return {}
    pairs = conv_bn_pairs(model, leaf=lambda m: isinstance(m, QuantLayer))
    return {conv: model.get_submodule(norm) for conv, norm in pairs if conv in biasless}


@torch.no_grad()
def correct_biases(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
                   reference: Optional[Dict[str, Tensor]] = None, auto: bool = False) -> List[str]:
    """Add the mean output shift of every calibrated quantized layer with a bias to that bias, or subtract it
    from the running mean of the BatchNorm after a conv without one (in place), measured in one pass of
    ``forward(model, batch)`` over ``batches``; returns the corrected layers' names. ``auto``: only the layers
    :func:`auto_corrects` accepts. ``reference``: full-precision weights by layer name, for layers whose master
    weight was already replaced by grid values (GPTQ); otherwise the master weight is the reference. Statistics
    are all-reduced under ``torch.distributed``."""
    reference = reference or {}
    layers = [(n, m) for n, m in quant_layers(model)
              if not isinstance(m, QuantEmbedding) and (not auto or auto_corrects(m))
              and (m.weight_quantizer.bits < 32 or m.input_quantizer.bits < 32)]
    norm_after = _norms_after_biasless_convs(model, layers)
    layers = [(n, m) for n, m in layers if m.bias is not None or n in norm_after]
    if not layers:
        return []
    sums: Dict[str, Tensor] = {}
    counts: Dict[str, int] = {}

    def hook(name: str):
        def after(layer: nn.Module, args: Tuple[Any, ...], out: Tensor) -> None:
            master = layer.weight.data
            if name in reference:
                layer.weight.data = reference[name]
            try:
                with bypassing((layer.weight_quantizer, layer.input_quantizer)):
                    fp = layer.forward(*args)  # the same input, full precision (forward: no hooks)
            finally:
                layer.weight.data = master
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
    all_reduce_(flat)
    sizes = [sums[n].numel() for n in names]
    parts = flat.split(sizes + [len(names)])
    layer_of = dict(layers)
    for name, total, count in zip(names, parts[:-1], parts[-1].tolist()):
        shift, bias = total / count, layer_of[name].bias
        if bias is not None:
            bias.add_(shift.to(bias.dtype))
        else:
            mean = norm_after[name].running_mean
            mean.sub_(shift.to(mean.dtype))
    logger.info("sqakd: bias correction applied to %d layers", len(names))
    return names
