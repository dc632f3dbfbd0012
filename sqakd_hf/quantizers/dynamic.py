"""Dynamic per-token activations on the runtime's own grid (nothing learned): what compressed-tensors and vLLM
compute for ``input_activations: {strategy: token, dynamic: true, symmetric: true}``."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from .base import Quantizer
from .functional import round_delta


def token_steps(x: Tensor, bits: int) -> Tensor:
    """The runtime's symmetric dynamic step of every token of ``x``: ``max|x_t| / ((2^b - 1) / 2)``, a step of 0
    replaced by the dtype's epsilon (compressed-tensors 0.20 ``calculate_qparams``, integer type, symmetric).

    A token is one index of the first two dimensions (``x[b, t]``), reduced over the others; a 1-D or 2-D input
    (e.g. BERT's pooler input ``[batch, hidden]``) gets one step for the whole tensor, as the runtime computes."""
    dims = tuple(range(2, x.dim())) if x.dim() > 2 else tuple(range(x.dim()))
    absmax = torch.amax(x.detach().abs(), dim=dims, keepdim=True)
    step = absmax / ((2**bits - 1) / 2)
    return torch.where(step == 0, torch.finfo(step.dtype).eps, step)


class RuntimeTokenQuantizer(Quantizer):
    """``out = s_t * clamp(round(x / s_t), -2^(b-1), 2^(b-1) - 1)`` with ``s_t`` from :func:`token_steps`: the same
    float operations as the runtime (division, round half to even, clamp, multiply), so an exported student
    computes exactly what the runtime computes. No parameter: the clip ratio is the runtime's, not learned.
    The rounding's backward is the straight-through estimator (or EWGS's ``delta`` rule), zero where clipped."""

    method = "absmax"

    def __init__(self, bits: int, role: str = "act", param_shape=(), delta: Optional[float] = None, **_: object) -> None:
        if role != "act" or param_shape:
            raise ValueError("RuntimeTokenQuantizer quantizes activations, with no per-channel parameters")
        if bits < 2:
            raise ValueError("act_granularity='per_token_absmax' needs act_bits >= 2 (a 1-bit runtime grid is {-1, 0})")
        super().__init__(bits, "act", (), delta=delta, per_token=True)
        self.set_signed(True)
        self.mark_initialized()

    def init_from_stats(self, stats: Dict[str, Tensor]) -> None:
        """Nothing to initialise: the grid is symmetric and signed whatever the calibration data."""
        self.set_signed(True)
        self.mark_initialized()

    def quantize(self, x: Tensor) -> Tensor:
        step = token_steps(x, self.bits)
        q = round_delta(x / step, self.delta).clamp(self.qmin, self.qmax)
        return q * step
