"""Min-max / absmax baseline: non-learned ranges, straight-through rounding."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .base import ActStats, Quantizer
from .functional import fake_quantize


class MinMaxQuantizer(Quantizer):
    """Weights: step = absmax / Qp, recomputed from the current weight every forward
    (``mean|w|`` for 1-bit sign). Activations: a fixed step from the calibration range
    (``max / (2^b - 1)`` unsigned, ``absmax / Qp`` signed); per token that is each token's own
    ``max|x_t| / Qp`` (dynamic absmax). Nothing is learned."""

    method = "minmax"

    def __init__(self, bits: int, role: str = "weight", param_shape: Tuple[int, ...] = (), **kw) -> None:
        super().__init__(bits, role, param_shape, **kw)
        if role == "act":
            self.register_buffer("scale", torch.tensor(1.0))

    def _weight_step(self, w: Tensor) -> Tensor:
        a = w.detach().abs()
        dims, keep = self._reduce_dims(w), bool(self.param_shape)
        if self.binary:
            return a.mean(dim=dims, keepdim=keep).clamp_min(1e-8)
        return (a.amax(dim=dims, keepdim=keep) / self.qmax).clamp_min(1e-8)

    def init_from_weight(self, w: Tensor) -> None:
        self.mark_initialized()

    def _init_act(self, stats: ActStats) -> None:
        top = torch.maximum(stats.max.abs(), stats.min.abs()) if self.signed else stats.max
        self.scale.copy_((top / self.qmax).clamp_min(1e-8))

    def quantize(self, x: Tensor) -> Tensor:
        if self.role == "act":
            return self.fake_quantize_act(x, self.scale, self.qmin, self.qmax, delta=self.delta, binary=self.binary)
        return fake_quantize(x, self._weight_step(x), self.qmin, self.qmax, delta=self.delta, binary=self.binary)

    def grid(self, w: Tensor):
        s = self._weight_step(w)
        s = s.reshape(self.param_shape) if self.param_shape else s
        if self.binary:
            return 2 * s, torch.full_like(s, 0.5), 0, 1
        return s, torch.full_like(s, -self.qmin), self.qmin, self.qmax
