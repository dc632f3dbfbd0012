"""GPTQ weight rounding (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), for the per-channel grids calibration has set.

Rounding each weight to its nearest grid point ignores how the input correlates the errors: a depthwise 3x3
kernel applied to a smooth image sums nine nearly equal inputs, so nine small independent rounding errors add
up. GPTQ quantizes one input column at a time and moves the not-yet-quantized columns to compensate, minimising
``||W X - W_q X||^2`` over the calibration inputs ``X`` of the layer (the quantized student's own inputs): with
``H = X X^T + damp * mean(diag H) * I`` and ``U`` the upper Cholesky factor of ``H^-1``, for column ``j``:
``q_j = Q(w_j)``, ``W[:, j:] -= ((w_j - q_j) / U_jj) U_j,j:``. Depthwise convs have one ``H`` per channel
(kernel-patch covariance), dense convs and linears one per layer.

The layer's master weight is then set to the chosen grid values, which the weight quantizer maps to
themselves (checked per layer: a quantizer whose forward is not the identity on its grid values, e.g.
minmax, whose step follows ``max|w|``, is left as it is).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bias_correction import eval_pass
from .injection import quant_layers
from .modules import QuantConv2d, QuantLinear
from .process_group import all_reduce_
from .quantizers.functional import safe_divisor

logger = logging.getLogger(__name__)

__all__ = ["gptq_round"]

#: dampening of ``H`` relative to its mean diagonal (as in the paper)
DAMP = 0.01


def _kind(layer: nn.Module) -> Optional[str]:
    if isinstance(layer, QuantLinear):
        return "dense"
    if isinstance(layer, QuantConv2d) and layer.padding_mode == "zeros":
        if layer.groups == 1:
            return "dense"
        if layer.groups == layer.in_channels == layer.out_channels:
            return "depthwise"
    return None


def _patches(layer: nn.Module, x: Tensor) -> Tensor:
    """The inputs each output position of ``layer`` reads: ``(rows, K)`` for a linear, ``(B, C*k*k, L)`` for a
    conv (its own padding, timm's dynamic 'same' padding included)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    padding = layer.padding
    if type(layer).__name__ == "QuantConv2dSame":
        from timm.layers.padding import pad_same

        x, padding = pad_same(x, layer.weight.shape[-2:], layer.stride, layer.dilation), 0
    return F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)


def _hessian_update(layer: nn.Module, kind: str, x: Tensor) -> Tensor:
    """``sum X X^T`` of this batch: ``(1, K, K)`` (dense) or ``(C, k*k, k*k)`` (depthwise), summed in float32
    (one batch), returned in float64 (accumulated over batches)."""
    p = _patches(layer, x).float()
    if isinstance(layer, nn.Linear):
        return (p.T @ p).double()[None]
    b, ck, l = p.shape
    groups = layer.in_channels if kind == "depthwise" else 1
    p = p.reshape(b, groups, ck // groups, l).permute(1, 2, 0, 3).reshape(groups, ck // groups, b * l)
    return torch.bmm(p, p.transpose(1, 2)).double()


def _grouped(weight: Tensor, kind: str) -> Tensor:
    """``(G, N, K)``: one group per Hessian."""
    w = weight.detach().double().flatten(1)
    return w[:, None, :] if kind == "depthwise" else w[None]


@torch.no_grad()
def _round_layer(layer: nn.Module, kind: str, hessian: Tensor) -> bool:
    """Replace ``layer.weight`` by its GPTQ-rounded grid values; False (weight unchanged) if the quantizer's
    forward does not keep its own grid values."""
    wq = layer.weight_quantizer
    scale, zero, _, _ = (t.detach().double() if isinstance(t, Tensor) else t for t in wq.grid(layer.weight))
    levels = wq.levels  # value = scale * (code - zero), code in 0 .. levels
    w = _grouped(layer.weight, kind)
    g, n, k = w.shape
    scale = scale.reshape(-1).expand(g * n).reshape(g, n) if scale.numel() in (1, g * n) else None
    zero = zero.reshape(-1).expand(g * n).reshape(g, n) if zero.numel() in (1, g * n) else None
    if scale is None or zero is None:
        return False
    divisor = safe_divisor(scale)
    h = hessian.clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)  # a view: writes go to h
    dead = diag <= 0  # inputs that are always zero: their weights do not matter
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    damp = DAMP * torch.diagonal(h, dim1=1, dim2=2).mean(1)
    h += damp[:, None, None] * torch.eye(k, dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h)
    if bool(info.any()):
        return False
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    q = torch.empty_like(w)
    for j in range(k):
        col = w[:, :, j]
        qj = (torch.clamp(torch.round(col / divisor + zero), 0, levels) - zero) * scale
        q[:, :, j] = qj
        err = (col - qj) / u[:, j, j][:, None]
        w[:, :, j:] -= err[:, :, None] * u[:, None, j, j:]
    new = q.reshape(layer.weight.shape).to(layer.weight.dtype)
    if not bool(torch.isfinite(new).all()):  # a zero step (e.g. a dead channel's): nearest rounding stays
        return False
    if not torch.allclose(wq(new), new, rtol=1e-5, atol=1e-6 * float(new.abs().max().clamp_min(1e-30))):
        return False
    layer.weight.copy_(new)
    return True


@torch.no_grad()
def gptq_round(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]) -> List[str]:
    """GPTQ-round the weights of every calibrated quantized Conv2d (dense or depthwise) and Linear of ``model``
    below 32 weight bits, from the inputs one pass of ``forward(model, batch)`` gives them (after their input
    quantizer); returns the rounded layers' names. Hessians are all-reduced under ``torch.distributed``."""
    layers = [(n, m, _kind(m)) for n, m in quant_layers(model) if m.weight_quantizer.bits < 32 and _kind(m)]
    if not layers:
        return []
    sums: Dict[str, Tensor] = {}

    def hook(name: str, kind: str):
        def pre(layer: nn.Module, args: Tuple[Any, ...]) -> None:
            x = layer.input_quantizer(args[0])
            update = _hessian_update(layer, kind, x)
            sums[name] = sums[name] + update if name in sums else update

        return pre

    handles = [m.register_forward_pre_hook(hook(n, kind)) for n, m, kind in layers]
    eval_pass(model, batches, forward, handles)
    rounded = []
    for name, layer, kind in layers:
        if name not in sums:
            continue
        hessian = all_reduce_(sums[name])
        if _round_layer(layer, kind, hessian):
            rounded.append(name)
    skipped = len(sums) - len(rounded)
    logger.info("sqakd: GPTQ-rounded %d layers%s", len(rounded),
                f" ({skipped} kept: their quantizer does not keep its own grid values)" if skipped else "")
    return rounded
