"""A quantized layer's learned grid as the integer grids deploy formats store, exactly or not at all.

Deploy formats (compressed-tensors, ONNX QDQ) describe a quantized tensor as signed integers ``q`` in a
``b``-bit container ``[-2**(b-1), 2**(b-1) - 1]`` with ``value = scale * (q - zero_point)`` and an
*integer* zero point. Our grids are ``value = scale * (code - zero)`` with codes ``0 .. 2**b - 1``:

* weights with an integer ``zero`` (LSQ, min-max) map to ``q = code - zero`` at the same width;
* weights with a half-integer ``zero`` (DoReFa, EWGS and 1-bit sign grids: ``zero = (2**b - 1) / 2``)
  map exactly to odd codes ``q = 2 code - 2 zero`` with half the scale, one bit wider;
* activations ``out = z + s * clamp(round((x - z) / s), qmin, qmax)`` map to a static per-tensor grid
  when ``-z / s`` is an integer (unsigned grids get the zero point ``-2**(b-1)``); a runtime quantizer
  rounds onto its own grid, so a fractional offset (EWGS's learned lower bound, DoReFa's signed
  ``[-1, 1]``) or the 1-bit sign grid cannot be re-encoded and is refused;
* dynamic per-token activations map to a runtime's dynamic token grid (:class:`TokenGrid`) only when the
  student computes that grid itself (``act_granularity="per_token_absmax"``: step ``max|x_t| / ((2^b - 1) / 2)``);
  a learned per-token clip ratio (``"per_token"``) has no counterpart in any runtime and is refused.

Every mapping is checked numerically against the quantizer's own forward before it is used: a grid
that does not reproduce the fake-quant values is an error (:class:`~sqakd_hf.errors.InputError`), never
an approximation.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..quantizers import (DoReFaQuantizer, EWGSQuantizer, LSQQuantizer, MinMaxQuantizer, PACTQuantizer, Quantizer,
                          RuntimeTokenQuantizer)
from ..quantizers.base import FullPrecision

__all__ = ["WeightCodes", "ActGrid", "TokenGrid", "weight_codes", "act_grid", "container_bits"]

#: a re-encoded grid must reproduce the fake-quant values to this fraction of its step
_STEP_TOLERANCE = 1e-3
#: largest container a deploy format stores codes in
MAX_BITS = 8


@dataclass(frozen=True)
class WeightCodes:
    """A weight as signed integer codes: ``weight = scale * codes``."""

    codes: Tensor  #: int8, the weight's shape, in ``[-2**(bits-1), 2**(bits-1) - 1]``
    scale: Tensor  #: per output channel (broadcastable to the weight, e.g. ``(out, 1)``) or per tensor (``(1,)``)
    bits: int  #: container width (the grid's own bits, or one more for a half-integer zero point)

    @property
    def per_channel(self) -> bool:
        return self.scale.numel() > 1


@dataclass(frozen=True)
class ActGrid:
    """A static per-tensor activation grid: ``q = clamp(round(x / scale) + zero_point)``, ``value = scale * (q -
    zero_point)`` with ``q`` in ``[-2**(bits-1), 2**(bits-1) - 1]``."""

    scale: Tensor  #: shape ``(1,)``
    zero_point: int
    bits: int

    @property
    def symmetric(self) -> bool:
        return self.zero_point == 0


@dataclass(frozen=True)
class TokenGrid:
    """Dynamic symmetric per-token activations: each token's step is ``max|x_t| / ((2^b - 1) / 2)``, computed by the
    runtime (``q`` in ``[-2**(bits-1), 2**(bits-1) - 1]``, zero point 0); see
    :func:`sqakd_hf.quantizers.dynamic.token_steps`."""

    bits: int
    symmetric: bool = True


def container_bits(lo: float, hi: float) -> int:
    """Smallest ``b`` with ``-2**(b-1) <= lo`` and ``hi <= 2**(b-1) - 1``."""
    bits = 1
    while lo < -(2 ** (bits - 1)) or hi > 2 ** (bits - 1) - 1:
        bits += 1
    return bits


def _refuse(name: str, problem: str, fix: str) -> InputError:
    return InputError(f"cannot export layer {name} exactly: {problem}; {fix}")


@torch.no_grad()
def weight_codes(name: str, layer: nn.Module) -> WeightCodes:
    """The signed integer codes and scale of ``layer``'s fake-quant weight (see the module docstring)."""
    wq: Quantizer = layer.weight_quantizer
    if not wq.initialized:
        raise InputError(f"cannot export layer {name}: its weight quantizer is not initialised; run "
                         "sqakd_hf.calibrate(model, batches) (or train with SQAKDTrainer) first")
    w = layer.weight.detach()
    scale, zero, _, _ = wq.grid(w)
    scale, zero = scale.detach(), zero.detach().to(torch.float64)
    factor = 1 if bool((zero == zero.round()).all()) else 2
    if not bool(((factor * zero) == (factor * zero).round()).all()):
        raise _refuse(name, "its grid's zero point is neither an integer nor a half-integer",
                      "export the packed form instead (sqakd_hf.save_packed)")
    shift = (factor * zero).round()
    lo, hi = float(-shift.max()), float(factor * wq.levels - shift.min())
    bits = container_bits(lo, hi)
    if bits > MAX_BITS:
        raise _refuse(name, f"its {wq.bits}-bit grid has a half-integer zero point, which needs {bits}-bit codes "
                      f"(deploy formats store at most {MAX_BITS})",
                      "quantize its weights with method='lsq' or 'minmax', or at most 7 bits")
    codes = (factor * wq.codes(w).to(torch.float64) - shift).to(torch.int8)
    out_scale = (scale / factor).to(w.dtype)
    out_scale = out_scale.reshape(wq.param_shape) if out_scale.numel() > 1 else out_scale.reshape(1)
    expected = wq(w).detach()
    if not bool(((out_scale * codes.to(w.dtype) - expected).abs() <= _STEP_TOLERANCE * out_scale.abs()).all()):
        raise _refuse(name, f"its {type(wq).__name__} grid does not reproduce the fake-quant weight",
                      "export the packed form instead (sqakd_hf.save_packed)")
    return WeightCodes(codes.contiguous(), out_scale.contiguous(), bits)


def _affine(aq: Quantizer) -> Optional[Tuple[Tensor, Tensor, int, int]]:
    """``(scale, offset z, qmin, qmax)`` of an activation quantizer's forward
    ``z + scale * clamp(round((x - z) / scale), qmin, qmax)``; None for an unknown quantizer."""
    zero = torch.zeros(())
    if isinstance(aq, LSQQuantizer):
        return aq.scale.detach().clamp_min(1e-8), zero, aq.qmin, aq.qmax
    if isinstance(aq, PACTQuantizer):
        return aq.alpha.detach().abs().clamp_min(1e-8) / aq.qmax, zero, aq.qmin, aq.qmax
    if isinstance(aq, MinMaxQuantizer):
        return aq.scale.detach(), zero, aq.qmin, aq.qmax
    if isinstance(aq, DoReFaQuantizer):
        return aq.act_scale.detach(), (aq.act_zero.detach() if aq.signed else zero), 0, aq.levels
    if isinstance(aq, EWGSQuantizer):
        return (aq.upper - aq.lower).detach().clamp_min(1e-8) / aq.levels, aq.lower.detach(), 0, aq.levels
    return None


@torch.no_grad()
def act_grid(name: str, aq: Quantizer, *, dynamic: bool = False) -> Optional[Union[ActGrid, TokenGrid]]:
    """The grid of an input-activation quantizer: a static per-tensor :class:`ActGrid`, or (only when the caller's
    format has one, ``dynamic=True``) a dynamic per-token :class:`TokenGrid`; None when it keeps full precision."""
    if isinstance(aq, FullPrecision) or aq.bits >= 32:
        return None
    if isinstance(aq, RuntimeTokenQuantizer):
        if dynamic:
            return TokenGrid(aq.bits)
        raise _refuse(name, "its activations are quantized dynamically per token (act_granularity="
                      "'per_token_absmax'), and this export needs static per-tensor steps",
                      "train the student with QuantConfig(act_granularity='per_tensor'), or use an export that "
                      "takes dynamic per-token activations (compressed-tensors, ONNX QDQ)")
    if not aq.initialized:
        raise InputError(f"cannot export layer {name}: its input quantizer is not calibrated; run "
                         "sqakd_hf.calibrate(model, batches) (or train with SQAKDTrainer) first")
    if getattr(aq, "per_token", False):
        raise _refuse(name, "its activations are quantized per token with a learned clip ratio (step s * max|x_t|); "
                      "a runtime's dynamic per-token grid has a fixed step (compressed-tensors and vLLM: "
                      "max|x_t| / ((2^b - 1) / 2)), so the learned ratio cannot be written",
                      "train the student with QuantConfig(act_granularity='per_token_absmax') (the runtime's own "
                      "dynamic per-token grid, exported exactly) or act_granularity='per_tensor' (static steps), or "
                      "keep the packed form (sqakd_hf.save_packed)")
    if aq.binary:
        raise _refuse(name, "its 1-bit signed activations use the sign grid {-1, +1}, which a runtime quantizer "
                      "cannot express", "use act_bits >= 2")
    affine = _affine(aq)
    if affine is None:
        raise _refuse(name, f"its input quantizer {type(aq).__name__} has no known static grid",
                      "export the packed form instead (sqakd_hf.save_packed)")
    scale, offset, qmin, qmax = affine
    if scale.numel() != 1 or offset.numel() != 1:
        raise _refuse(name, "its input quantizer has more than one step (only static per-tensor activations map "
                      "to a static grid)", "export the packed form instead (sqakd_hf.save_packed)")
    s, z = float(scale), float(offset)
    m = -z / s
    if abs(m - round(m)) > _STEP_TOLERANCE:
        raise _refuse(name, f"its {type(aq).__name__} activation grid starts at {z:.6g}, {m:.4f} steps from zero "
                      "(a runtime quantizer needs an integer zero point)",
                      "use method='lsq', 'pact' or 'minmax' for activations, or keep them full precision (act_bits=32)")
    half = 2 ** (aq.bits - 1)
    if qmax - qmin != 2 * half - 1:
        raise _refuse(name, f"its activation grid [{qmin}, {qmax}] is not a {aq.bits}-bit grid",
                      "export the packed form instead (sqakd_hf.save_packed)")
    grid = ActGrid(scale.reshape(1).to(torch.float32).clone(), int(round(m)) + (-half - qmin), aq.bits)
    _check_act(name, aq, grid, s, z, qmin, qmax)
    return grid


def _check_act(name: str, aq: Quantizer, grid: ActGrid, s: float, z: float, qmin: int, qmax: int) -> None:
    """The grid reproduces the quantizer's forward on a probe spanning its range and beyond."""
    n = 8 * (qmax - qmin + 6)
    probe = z + s * (torch.linspace(qmin - 3, qmax + 3, n, dtype=torch.float64) + 1 / math.pi)
    like = next((t for t in itertools.chain(aq.parameters(), aq.buffers()) if t.is_floating_point()), grid.scale)
    probe = probe.to(device=like.device, dtype=like.dtype).reshape(1, -1)
    ours = aq(probe).to(torch.float64)
    step = grid.scale.to(device=like.device, dtype=torch.float64)
    q = torch.clamp(torch.round(probe.to(torch.float64) / step + grid.zero_point), -2 ** (grid.bits - 1),
                    2 ** (grid.bits - 1) - 1)
    theirs = (q - grid.zero_point) * step
    if not bool(((ours - theirs).abs() <= _STEP_TOLERANCE * s).all()):
        raise _refuse(name, f"its {type(aq).__name__} activations do not follow a static per-tensor grid",
                      "export the packed form instead (sqakd_hf.save_packed)")
