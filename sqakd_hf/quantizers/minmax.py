"""Min-max / absmax baseline: non-learned ranges, straight-through rounding."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .base import ActStats, Quantizer
from .functional import fake_quantize
from .ranges import mse_weight_clip


class MinMaxQuantizer(Quantizer):
    """Weights: step = ``r * absmax / Qp``, recomputed from the current weight every forward
    (``mean|w|`` for 1-bit sign). The clip ratio ``r`` (one per output channel, a buffer, never
    learned) is 1 under ``init="paper"`` (plain absmax) and under ``init="mse"`` the fraction of
    ``absmax`` whose grid has the least squared error on the calibrated weight (an MSE observer): at
    4 bits one outlier weight per channel otherwise leaves most weights on 2-3 levels.
    Activations: a fixed step from the calibration sample: under ``init="paper"`` its range (``max / (2^b - 1)``
    unsigned, ``absmax / Qp`` signed), under ``init="mse"`` the clip of least squared error on its histogram (an
    MSE observer); per token it is each token's own ``max|x_t| / Qp`` (dynamic absmax). Nothing is learned."""

    method = "minmax"

    def __init__(self, bits: int, role: str = "weight", param_shape: Tuple[int, ...] = (), **kw) -> None:
        super().__init__(bits, role, param_shape, **kw)
        if role == "act":
            self.register_buffer("scale", torch.tensor(1.0))
        else:  # 1 = plain absmax (also what checkpoints written before the ratio existed mean)
            self.register_buffer("clip_ratio", torch.ones(self.tensor_shape))

    def _absmax_step(self, w: Tensor) -> Tensor:
        a = w.detach().abs()
        dims, keep = self._reduce_dims(w), bool(self.param_shape)
        if self.binary:
            return a.mean(dim=dims, keepdim=keep)
        return a.amax(dim=dims, keepdim=keep) / self.qmax

    def _weight_step(self, w: Tensor) -> Tensor:
        step = self._absmax_step(w)
        if not self.binary:
            step = step * (self.clip_ratio.reshape(step.shape) if self.param_shape else self.clip_ratio.reshape(()))
        return step.clamp_min(1e-8)

    @torch.no_grad()
    def init_from_weight(self, w: Tensor) -> None:
        """``init="mse"``: the per-channel clip ratio of least squared error; ``"paper"``: ratio 1 (absmax)."""
        self.clip_ratio.fill_(1.0)
        if self.init_mode == "mse" and not self.binary:
            w32 = w.detach().float()
            dims = self._reduce_dims(w32)

            def at(c: Tensor) -> Tensor:
                step = (c / self.qmax).clamp_min(1e-8)
                return (w32 / step).round().clamp(self.qmin, self.qmax) * step

            clip = mse_weight_clip(w32, dims, at)
            absmax = w32.abs().amax(dim=dims, keepdim=True)
            ratio = torch.where(absmax > 0, clip / absmax.clamp_min(1e-30), torch.ones_like(absmax))
            self.clip_ratio.copy_(self._per_param(ratio.clamp(0.0, 1.0)))
        self.mark_initialized()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the clip ratio existed used plain absmax weights (ratio 1)
        if self.role == "weight" and prefix + "clip_ratio" not in state_dict and prefix + "initialized_flag" in state_dict:
            state_dict[prefix + "clip_ratio"] = torch.ones_like(self.clip_ratio)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_act(self, stats: ActStats) -> None:
        if self.init_mode == "mse" and not self.binary:  # the MSE observer, as for the weights
            top = stats.mse_clip(self.qmax, -self.qmin)
        else:
            top = torch.maximum(stats.max.abs(), stats.min.abs()) if self.signed else stats.max
        self.scale.copy_((top / self.qmax).clamp_min(1e-8).reshape(self.scale.shape))

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
