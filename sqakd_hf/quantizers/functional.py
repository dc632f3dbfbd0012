"""Autograd primitives shared by every quantizer (the "clip, then round" form of SQAKD, Zhao & Zhao 2024).

Two functions carry the whole "normalise/clip, then round" form:

* :func:`round_delta` rounds a latent tensor that is already expressed in grid
  units; its backward is the shared rule ``g * (1 + delta * sign(g) * (x - round(x)))``
  (``delta = 0`` is the straight-through estimator, ``delta > 0`` is EWGS).
* :func:`fake_quantize` is the fused hot path for affine grids
  ``out = zero + scale * clamp(round((x - zero) / scale), qmin, qmax)``. It saves
  only its input (usually already kept alive by the previous op) and recomputes
  the rest in backward, so it adds no activation-sized tensor to the graph.
  Gradients follow the chain rule of that formula with the delta rule on the
  rounding; ``scale_grad="pact"`` replaces the step gradient by PACT's rule
  (only clipped elements contribute).

Neither function syncs with the host.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpu_fused


def _round_or_sign(xn: Tensor, binary: bool) -> Tensor:
    """Round to the integer grid, or to {-1, +1} for binary (1-bit signed) grids."""
    if binary:
        return torch.where(xn >= 0, 1.0, -1.0).to(xn.dtype)
    return torch.round(xn)


def _delta_factor(grad: Tensor, diff: Tensor, delta: Tensor) -> Tensor:
    """The shared backward factor ``1 + delta * sign(g) * (x_n - x_q)``."""
    return torch.addcmul(torch.ones_like(diff), delta * torch.sign(grad), diff)


class _RoundDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, delta: Optional[Tensor], binary: bool) -> Tensor:
        out = _round_or_sign(x, binary)
        if delta is not None:
            ctx.save_for_backward(x - out, delta)
        ctx.use_delta = delta is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.use_delta:
            return grad, None, None
        diff, delta = ctx.saved_tensors
        return grad * _delta_factor(grad, diff, delta), None, None


def round_delta(x: Tensor, delta: Optional[Tensor] = None, binary: bool = False) -> Tensor:
    """Round ``x`` (grid units) with the delta backward rule; STE when ``delta`` is None."""
    return _RoundDelta.apply(x, delta, binary)


def _fast_path(x: Tensor, scale: Tensor, zero: Optional[Tensor], delta: Optional[Tensor], binary: bool) -> bool:
    """Per-tensor, integer-zero, STE case: the common activation case, served by fused kernels."""
    full = x.dtype in (torch.float32, torch.float64) or x.is_cuda  # CPU half-precision dots lose precision
    per_channel_ok = scale.numel() == 1 or sum(d != 1 for d in scale.shape) == 1
    return zero is None and delta is None and not binary and per_channel_ok and full


def _step_grad_sum(grad: Tensor, out: Tensor, grad_x: Tensor, other: Tensor, scale: Tensor) -> Tensor:
    """``(grad * out - grad_x * other).sum_to_size(scale.shape)``: per tensor as two BLAS dots (no temporary); per
    channel with one temporary (``mul`` then an in-place ``addcmul_``) and one reduction, fewer passes and
    allocations than two row-wise dots, and no cancellation between two large sums."""
    if scale.numel() == 1:
        return (torch.dot(grad.reshape(-1), out.reshape(-1)) - torch.dot(grad_x.reshape(-1), other.reshape(-1))
                ).reshape(scale.shape)
    return torch.mul(grad, out).addcmul_(grad_x, other, value=-1).sum_to_size(scale.shape)


def _fake_quant_fast(x: Tensor, scale: Tensor, qmin: float, qmax: float) -> Tensor:
    """``round(clamp(x * (1 / s), qmin, qmax)) * s`` with one allocation, then in-place passes (fresh
    allocations dominate CPU time here)."""
    return torch.mul(x, scale.reciprocal()).clamp_(qmin, qmax).round_().mul_(scale)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax, delta, binary, pact):
        ctx.qrange = (qmin, qmax)
        ctx.binary = binary
        ctx.pact = pact
        ctx.fast = _fast_path(x, scale, zero, delta, binary)
        ctx.fused = False
        if ctx.fast:
            rows = cpu_fused.rows_view(x, scale)
            out = None
            if rows is not None and x.numel() >= cpu_fused.MIN_FORWARD_ELEMENTS:
                out = cpu_fused.forward(rows[0], rows[1], qmin, qmax)  # one fused C++ loop
                out = None if out is None else out.reshape(x.shape)
            if out is None:
                out = _fake_quant_fast(x, scale, qmin, qmax)
            if rows is not None:  # the fused backward recomputes the output from x instead of reading it
                ctx.fused = True
                ctx.save_for_backward(x, scale)
            else:
                ctx.save_for_backward(x, scale, out)
            return out
        xn = x - zero if zero is not None else x
        xn = xn / scale
        q = _round_or_sign(xn, binary).clamp_(qmin, qmax)
        out = q.mul_(scale)
        if zero is not None:
            out = out.add_(zero)
        ctx.save_for_backward(x, scale, zero, delta)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.fast:
            return _FakeQuantize._fast_backward(ctx, grad)
        x, scale, zero, delta = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        xn = x - zero if zero is not None else x
        xn = xn / scale
        inside = (xn >= qmin) & (xn <= qmax)
        q = _round_or_sign(xn, ctx.binary).clamp_(qmin, qmax)
        # d out / d x_n (divided by scale): the rounding's backward, zero outside the clip range
        if delta is not None:
            dround = _delta_factor(grad, xn - q, delta).mul_(inside)
        else:
            dround = inside.to(grad.dtype)
        grad_x = grad * dround if need_x else None
        grad_s = grad_z = None
        if need_s:
            if ctx.pact:
                # PACT: the clip bound moves the output only where x was clipped
                term = torch.where(inside, 0.0, q)
            else:
                # chain rule of zero + s * R(clamp((x - zero) / s)): q - R'(.) * x_n, q outside
                term = q - dround * xn
            grad_s = (grad * term).sum_to_size(scale.shape)
        if need_z and zero is not None:
            grad_z = (grad * (1.0 - dround)).sum_to_size(zero.shape)
        return grad_x, grad_s, grad_z, None, None, None, None, None

    @staticmethod
    def _fast_backward(ctx, grad):
        """Same formulas as the general path with few allocations: with out = s * q,
        sum g (q - x_n [inside]) = (g . out - g[inside] . x) / s and, for PACT,
        sum g q [outside] = (g . out - g[inside] . out) / s."""
        qmin, qmax = ctx.qrange
        if ctx.fused:
            x, scale = ctx.saved_tensors
            x2, s2 = cpu_fused.as_rows(x, scale)
            res = cpu_fused.backward(x2, grad.reshape(x2.shape), s2, qmin, qmax, ctx.pact)
            if res is not None:
                grad_s = res[1].reshape(scale.shape) if ctx.needs_input_grad[1] else None
                return res[0].reshape(x.shape), grad_s, None, None, None, None, None, None
            out = _fake_quant_fast(x, scale, qmin, qmax)
        else:
            x, scale, out = ctx.saved_tensors
        # clamp(x, s qmin, s qmax) as two passes with one broadcast bound each: faster on CPU than one with two
        grad_x = torch.clamp_min(x, scale * qmin).clamp_max_(scale * qmax)
        grad_x = grad_x.eq_(x).mul_(grad)  # eq_ writes 1.0 inside the clip range, 0.0 outside
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = _step_grad_sum(grad, out, grad_x, out if ctx.pact else x, scale) / scale
        return grad_x, grad_s, None, None, None, None, None, None


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    qmin: float,
    qmax: float,
    *,
    zero: Optional[Tensor] = None,
    delta: Optional[Tensor] = None,
    binary: bool = False,
    scale_grad: str = "chain",
) -> Tensor:
    """Fake-quantize ``x`` onto ``zero + scale * {qmin, ..., qmax}``.

    ``scale`` and ``zero`` broadcast against ``x`` (per-tensor or per-channel);
    their gradients are reduced to their own shapes. ``binary`` uses the grid
    {-1, +1} (sign) instead of rounding. ``scale_grad`` is ``"chain"`` (LSQ,
    EWGS: exact chain rule with the rounding's backward) or ``"pact"``.
    """
    return _FakeQuantize.apply(x, scale, zero, float(qmin), float(qmax), delta, binary, scale_grad == "pact")


def safe_divisor(scale: Tensor) -> Tensor:
    """``scale`` with zeros replaced by 1, to divide by: a grid of step 0 (an all-zero weight channel, e.g. a conv
    whose folded BatchNorm has gamma 0) maps every value to the zero point's code and back to exactly 0, not 0/0."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def grad_scale(t: Tensor, factor: float) -> Tensor:
    """Identity in forward (bit-exact: ``t + (u - u)``, not ``(t - u) + u``, which can move ``t`` by one ulp and
    the grid of the packed export with it); multiplies the gradient reaching ``t`` by ``factor`` (LSQ's g)."""
    scaled = t * factor
    return t.detach() + (scaled - scaled.detach())
