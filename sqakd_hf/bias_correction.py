"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", Sec. 4.2, with the expectation taken over calibration data instead of BatchNorm statistics).

Quantizing a layer's weight and input shifts the mean of its output: ``E[W_q Q(x)] != E[W x]``. For every
quantized layer with a bias, over the calibration batches, the per-output-channel mean of the full-precision
output ``W x + b`` minus that of the quantized output ``W_q Q(x) + b`` (both from the same input ``x``, the one
the quantized network gives the layer) is added to the bias, so the next layer sees the mean the teacher's did.
A conv without a bias whose output only a BatchNorm reads is corrected through that norm instead, and there the
correction is affine: per channel, the least-squares fit ``y ~ a y_q + d`` of the full-precision output ``y`` on the
quantized one ``y_q`` (``a = cov(y, y_q) / var(y_q)``, ``d = E[y] - a E[y_q]``; ``a = 1`` is plain bias correction).
Feeding ``a y_q + d`` to ``gamma (x - mean) / sigma + beta`` is the same as running mean ``(mean - d) / a`` and
running variance ``(var + eps) / a^2 - eps``, so only the norm's statistics change. ``a < 1`` shrinks channels whose
quantization noise is large against their signal (rounded nearly constant inputs summed by a depthwise filter);
on EfficientNet-Lite W8A8 (lsq defaults, 416 crops) it raised top-1 agreement with FP from 90.6 / 88.5 / 89.7% to
92.8 / 89.7 / 90.9% (Lite0 / Lite1 / Lite2) over the mean-only correction.

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


def _affine_into_norm(norm: _BatchNorm, mean_q: Tensor, mean_fp: Tensor, sq_q: Tensor, q_fp: Tensor) -> None:
    """Fold the per-channel least-squares fit ``y ~ a y_q + d`` (from the moments ``E[y_q]``, ``E[y]``, ``E[y_q^2]``,
    ``E[y_q y]``) into ``norm``'s running statistics. ``a`` is kept in [0.5, 2] (1 where ``y_q`` is constant) and
    below ``sqrt((var + eps) / eps)`` so the new variance stays >= 0."""
    var_q = sq_q - mean_q * mean_q
    slope = torch.where(var_q > 1e-12 * (1 + sq_q), (q_fp - mean_q * mean_fp) / var_q.clamp_min(1e-30),
                        torch.ones_like(var_q))
    var = norm.running_var.double()
    slope = torch.minimum(slope.nan_to_num(1.0).clamp(0.5, 2.0), ((var + norm.eps) / norm.eps).sqrt())
    shift = mean_fp - slope * mean_q
    mean = norm.running_mean
    mean.copy_(((mean.double() - shift) / slope).to(mean.dtype))
    norm.running_var.copy_(((var + norm.eps) / slope.square() - norm.eps).clamp_min(0).to(norm.running_var.dtype))


@torch.no_grad()
def correct_biases(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
                   reference: Optional[Dict[str, Tensor]] = None, auto: bool = False) -> List[str]:
    """Add the mean output shift of every calibrated quantized layer with a bias to that bias, or fold the affine
    fit of the output into the statistics of the BatchNorm after a conv without one (in place), measured in one pass of
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
            if name in norm_after:  # moments for the affine fit: sum y_q, y, y_q^2, y_q y per channel
                q, f = out.detach().transpose(0, 1).flatten(1).double(), fp.detach().transpose(0, 1).flatten(1).double()
                part, n = torch.cat([q.sum(1), f.sum(1), (q * q).sum(1), (q * f).sum(1)]), q.shape[1]
            else:
                part, n = _channel_sum(fp - out, layer.features_last)
            sums[name] = sums[name] + part if name in sums else part
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
        if name in norm_after:
            _affine_into_norm(norm_after[name], *(total / count).view(4, -1))
        else:
            bias = layer_of[name].bias
            bias.add_((total / count).to(bias.dtype))
    logger.info("sqakd: bias correction applied to %d layers", len(names))
    return names
