"""DoReFa (Zhou et al., 2016): tanh-normalised weights, activations clipped to [0, 1]."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .base import ActStats, Quantizer
from .functional import round_delta


class DoReFaQuantizer(Quantizer):
    """No learnable parameters.

    Weights: ``w_n = tanh(w) / (2 max|tanh(w)|) + 1/2``, ``w_q = 2 quantize_b(w_n) - 1``,
    times a fixed per-layer magnitude (``max|w|``, or ``mean|w|`` at 1 bit) recorded
    at initialisation so that a pretrained layer keeps its scale.
    Activations: ``clip(x, 0, 1)`` then ``quantize_b`` (``clip(x, -1, 1)`` on a
    signed grid). No tanh on activations. Per-token activations: each token row is divided by its
    ``max|x_t|`` first, so the fixed [0, 1] clip covers every token's range (dynamic, nothing learned).
    """

    method = "dorefa"
    fixed_act_range = True

    def __init__(self, bits: int, role: str = "weight", param_shape: Tuple[int, ...] = (), **kw) -> None:
        super().__init__(bits, role, param_shape, **kw)
        if role == "weight":
            self.register_buffer("magnitude", torch.ones(self.tensor_shape))
        else:
            self.register_buffer("act_scale", torch.tensor(1.0 / self.levels))
            self.register_buffer("act_zero", torch.tensor(-1.0))

    @torch.no_grad()
    def init_from_weight(self, w: Tensor) -> None:
        a = w.detach().float().abs()
        dims, keep = self._reduce_dims(w), bool(self.param_shape)
        mag = a.mean(dim=dims, keepdim=keep) if self.bits == 1 else a.amax(dim=dims, keepdim=keep)
        self.magnitude.copy_(self._per_param(mag))
        self.mark_initialized()

    def _init_act(self, stats: ActStats) -> None:
        # unsigned: [0, 1] in `levels` steps; signed: [-1, 1], so twice the step
        self.act_scale.fill_((2.0 if self.signed else 1.0) / self.levels)

    def quantize(self, x: Tensor) -> Tensor:
        if self.role == "act":
            zero = self.act_zero if self.signed else None
            return self.fake_quantize_act(x, self.act_scale, 0, self.levels, zero=zero, delta=self.delta)
        t = torch.tanh(x)
        # an all-zero (dead) channel has max|tanh w| = 0: any positive floor keeps 0 / 0 out (its codes are the middle)
        m = t.abs().amax(dim=self._reduce_dims(x), keepdim=bool(self.param_shape)).clamp_min(torch.finfo(t.dtype).tiny)
        wn = t / (2 * m) + 0.5
        # magnitude * (2 code / L - 1), written as the exported grid scale * (code - zero) so that the packed
        # form dequantizes to the same floats
        scale, zero, _, _ = self.grid(x)
        return scale * (round_delta(wn * self.levels, self.delta) - zero)

    def grid(self, w: Tensor):
        # value = magnitude * (2 code / L - 1) = (2 magnitude / L) * (code - L / 2)
        scale = 2 * self.magnitude / self.levels
        return scale, torch.full_like(scale, self.levels / 2), 0, self.levels
