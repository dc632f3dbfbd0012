"""Fused CPU kernels of the fake-quant fast path (``torch.compile``: inductor's C++ backend), eager fallback.

The eager fast path of :func:`~.functional.fake_quantize` makes about 20 memory passes per element (4 in-place
passes forward, the clip mask, the gradient and two dot products backward). On large CPU tensors (weights,
activations of big batches) it is memory-bound, and one fused loop each way makes 5:

* forward, per row ``c`` of ``x`` viewed as ``(C, N)``: ``out = round(clamp(x * (1 / s_c), qmin, qmax)) * s_c``,
  the same float operations as the eager path (bit-identical values);
* backward: ``grad_x = g * [s_c qmin <= x <= s_c qmax]`` and the step gradient
  ``sum_n (g * out - grad_x * other) / s_c`` (``other = x``: the chain rule of LSQ, ``other = out``: PACT's rule),
  recomputing ``out`` instead of saving it (less memory than the eager path).

Used only on CPU tensors of at least :data:`MIN_ELEMENTS` elements (below, the call overhead of a compiled function
outweighs the saved passes), outside an enclosing ``torch.compile`` (which fuses the eager formulas itself), and only
where enabled (:func:`enabled`: ``SQAKD_CPU_FUSED=1``, :func:`set_enabled` or :func:`use`). When inductor cannot compile (no
C++ compiler), the first failure logs one warning and the eager path is used from then on.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: smallest tensor with one step per row (weights per channel, token rows) whose backward runs fused (one CPU
#: thread, measured: below ~2^18 elements the ~0.1 ms call overhead of a compiled function outweighs the saved passes)
MIN_ELEMENTS = 1 << 18
#: the same for one step per tensor (the eager backward's BLAS dot is fast: break-even near 2^20)
MIN_TENSOR_ELEMENTS = 1 << 20
#: smallest tensor whose forward runs fused too (the eager forward is 4 in-place passes: break-even near 2^19)
MIN_FORWARD_ELEMENTS = 1 << 19

_state = {"enabled": None, "broken": False, "fwd": None, "bwd": None}


def enabled() -> bool:
    """Whether the fused CPU kernels are on: :func:`set_enabled`, else the ``SQAKD_CPU_FUSED`` environment variable
    (``1`` / ``0``; default off: the first call of each kernel compiles for seconds)."""
    if _state["enabled"] is None:
        _state["enabled"] = os.environ.get("SQAKD_CPU_FUSED", "0").strip().lower() in ("1", "true", "yes", "on")
    return bool(_state["enabled"]) and not _state["broken"]


def set_enabled(on: Optional[bool]) -> None:
    """Turn the fused CPU kernels on or off for this process (``None``: back to the environment variable)."""
    _state["enabled"] = on
    _state["broken"] = False


@contextmanager
def use(on: bool) -> Iterator[None]:
    """``with use(True):`` the fused CPU kernels on inside the block (e.g. around ``trainer.train()``), restored after."""
    before = _state["enabled"]
    _state["enabled"] = on
    try:
        yield
    finally:
        _state["enabled"] = before


def _forward(x: Tensor, scale: Tensor, inv: Tensor, qmin: float, qmax: float) -> Tensor:
    return torch.round(torch.clamp(x * inv, qmin, qmax)) * scale


def _backward(x: Tensor, grad: Tensor, scale: Tensor, inv: Tensor, qmin: float, qmax: float,
              pact: bool) -> Tuple[Tensor, Tensor]:
    inside = ((x >= scale * qmin) & (x <= scale * qmax)).to(grad.dtype)
    grad_x = grad * inside  # 0 * NaN stays NaN, as in the eager path
    out = torch.round(torch.clamp(x * inv, qmin, qmax)) * scale
    other = out if pact else x
    return grad_x, (grad * out - grad_x * other).sum(dim=1, keepdim=True) / scale


def _compiled(name: str):
    fn = _state[name]
    if fn is None:
        fn = torch.compile(_forward if name == "fwd" else _backward, dynamic=True, fullgraph=True)
        _state[name] = fn
    return fn


def rows_view(x: Tensor, scale: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """``(x as (C, N), scale as (C, 1))`` when the fused kernels can serve this call (CPU, large, contiguous, one
    step per tensor or per leading-axis channel, not inside a compiled region), else None."""
    smallest = MIN_TENSOR_ELEMENTS if scale.numel() == 1 else MIN_ELEMENTS
    if (x.device.type != "cpu" or x.numel() < smallest or not x.is_contiguous() or not enabled()
            or torch.compiler.is_compiling()):
        return None
    return as_rows(x, scale)


def as_rows(x: Tensor, scale: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """``(x as (C, N), scale as (C, 1))`` for one step per tensor or per leading-axis channel, else None. Detached
    (the autograd function computes the gradients itself): plain tensors, not views, so the compiled kernels guard
    on their own shapes only (a view's base shape would add recompilations)."""
    if scale.numel() == 1:
        return x.reshape(1, -1).detach(), scale.reshape(1, 1).detach()
    if scale.dim() == x.dim() and scale.shape[0] == scale.numel() == x.shape[0]:  # (C, 1, ..., 1): leading axis
        return x.reshape(scale.shape[0], -1).detach(), scale.reshape(-1, 1).detach()
    return None


def _run(name: str, *args):
    if _state["broken"]:  # failed once (e.g. a backward still pending from before the failure): eager, no new warning
        return None
    try:
        return _compiled(name)(*args)
    except Exception as err:  # inductor unavailable (no C++ compiler, unsupported platform): eager from now on
        _state["broken"] = True
        logger.warning("sqakd_hf: fused CPU fake-quant kernels unavailable (%s: %s); using the eager path",
                       type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None


def forward(x2: Tensor, s2: Tensor, qmin: float, qmax: float) -> Optional[Tensor]:
    """Fused forward on ``(C, N)`` rows with steps ``(C, 1)``; None when the kernels failed (use eager)."""
    return _run("fwd", x2, s2, s2.reciprocal(), qmin, qmax)


def backward(x2: Tensor, g2: Tensor, s2: Tensor, qmin: float, qmax: float,
             pact: bool) -> Optional[Tuple[Tensor, Tensor]]:
    """Fused backward: ``(grad_x (C, N), grad_scale (C, 1))``; None when the kernels failed (use eager)."""
    return _run("bwd", x2, g2.contiguous().detach(), s2, s2.reciprocal(), qmin, qmax, pact)
