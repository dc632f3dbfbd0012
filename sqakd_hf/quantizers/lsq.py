"""LSQ (Esser et al., 2020): a learned step size per tensor or per output channel."""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from .base import ActStats, Quantizer
from .functional import fake_quantize, grad_scale
from .ranges import mse_weight_clip

_EPS = 1e-8


class LSQQuantizer(Quantizer):
    """``x_q = clamp(round(x / s), qmin, qmax) * s`` with a learnable step ``s``.

    The step's gradient is the chain rule of that formula (``round(x/s) - x/s``
    inside the range, the clip bound outside) times ``g = 1 / sqrt(N * Qp)``,
    with N the elements per step, not counting the batch. Per-token activations: ``s`` is the step in units
    of each token's ``max|x_t|`` (``s * Qp`` is a learned clip ratio).
    """

    method = "lsq"

    def __init__(self, bits: int, role: str = "weight", param_shape: Tuple[int, ...] = (), **kw) -> None:
        super().__init__(bits, role, param_shape, **kw)
        self.scale = nn.Parameter(torch.ones(self.tensor_shape))

    def _step_from_mean_abs(self, mean_abs: Tensor) -> Tensor:
        if self.binary:  # the L2-optimal scale of sign(w)
            return mean_abs
        return 2.0 * mean_abs / math.sqrt(self.qmax)

    @torch.no_grad()
    def init_from_weight(self, w: Tensor) -> None:
        """``init="paper"``: ``s = 2 mean|w| / sqrt(Qp)``; ``"mse"``: the step of the error-minimising clip.
        1-bit: ``s = mean|w|`` (the L2-optimal scale of ``sign(w)``) either way."""
        dims = self._reduce_dims(w)
        if self.init_mode == "mse" and not self.binary:
            w32 = w.detach().float()
            clip = mse_weight_clip(w32, dims, lambda c: self._fake_quant_at(w32, c / self.qmax))
            step = clip / self.qmax
        else:
            step = self._step_from_mean_abs(w.detach().float().abs().mean(dim=dims, keepdim=True))
        self.scale.copy_(self._per_param(step).clamp_min(_EPS))
        self.mark_initialized()

    def _fake_quant_at(self, w: Tensor, step: Tensor) -> Tensor:
        step = step.clamp_min(_EPS)
        return (w / step).round().clamp(self.qmin, self.qmax) * step

    def _init_act(self, stats: ActStats) -> None:
        if self.init_mode == "mse" and not self.binary:
            step = stats.mse_clip(self.qmax, -self.qmin) / self.qmax
        else:
            step = self._step_from_mean_abs(stats.mean_abs)
        self.scale.copy_(step.clamp_min(_EPS).reshape(self.scale.shape))

    def quantize(self, x: Tensor) -> Tensor:
        g = 1.0 / math.sqrt(self.features_per_sample(x) * self.qmax)
        s = grad_scale(self.scale, g).clamp_min(_EPS)
        fq = self.fake_quantize_act if self.role == "act" else fake_quantize
        return fq(x, s, self.qmin, self.qmax, delta=self.delta, binary=self.binary)

    def grid(self, w: Tensor):
        s = self.scale.detach()
        if self.binary:  # value = s * (2 * code - 1)
            return 2 * s, torch.full_like(s, 0.5), 0, 1
        return s, torch.full_like(s, -self.qmin), self.qmin, self.qmax
