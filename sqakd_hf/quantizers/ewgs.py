"""EWGS (Lee et al., 2021): a learnable interval [l, u] and element-wise gradient scaling."""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from .base import ActStats, Quantizer
from .functional import round_delta
from .ranges import mse_weight_clip

DEFAULT_DELTA = 1e-3
_HALF_NORMAL_STD = math.sqrt(1 - 2 / math.pi)


class EWGSQuantizer(Quantizer):
    """Normalise into [0, 1] with a learnable interval, round, map back.

    Weights: ``w_n = clip((w - l) / (u - l), 0, 1)``, ``w_q = s * (2 round((2^b - 1) w_n) / (2^b - 1) - 1)``
    with a learnable output scale ``s``. Activations:
    ``a_q = l + (u - l) * round((2^b - 1) a_n) / (2^b - 1)``.
    Backward through the rounding: ``g * (1 + delta * sign(g) * (x_n - x_q))`` with
    ``x_n`` on the [0, 1] scale as in the paper (``delta`` is a buffer the trainer
    may update on a schedule). Per-token activations: ``[l, u]`` is a learned interval in units of each
    token's ``max|x_t|``.
    """

    method = "ewgs"

    def __init__(
        self, bits: int, role: str = "weight", param_shape: Tuple[int, ...] = (), delta: float | None = None, **kw
    ) -> None:
        super().__init__(bits, role, param_shape, delta=DEFAULT_DELTA if delta is None else delta, **kw)
        self.lower = nn.Parameter(torch.full(self.tensor_shape, -1.0))
        self.upper = nn.Parameter(torch.full(self.tensor_shape, 1.0))
        if role == "weight":
            self.out_scale = nn.Parameter(torch.ones(self.tensor_shape))

    def _grid_delta(self) -> Tensor:
        """The paper's delta (latent on [0, 1]) expressed for a latent in grid units."""
        return self.delta / self.levels

    @torch.no_grad()
    def init_from_weight(self, w: Tensor) -> None:
        """``init="paper"``: interval and output scale ``3 std(w)``; ``"mse"``: the error-minimising clip
        ``c`` for both (at 1 bit that is close to ``mean|w|``, the L2-optimal scale of ``sign(w)``)."""
        w = w.detach().float()
        dims = self._reduce_dims(w)
        if self.init_mode == "mse":
            c = mse_weight_clip(w, dims, lambda c: self._weight_at(w, -c, c, c))
        else:
            c = 3 * w.std(dim=dims, keepdim=True) if w.numel() > 1 else w.abs()
        c = self._per_param(c)
        self.lower.copy_(-c)
        self.upper.copy_(c)
        self.out_scale.copy_(c)
        self.mark_initialized()

    def _weight_at(self, w: Tensor, lower: Tensor, upper: Tensor, out_scale: Tensor) -> Tensor:
        wn = ((w - lower) / (upper - lower).clamp_min(1e-8)).clamp(0, 1)
        return out_scale * (2 * torch.round(wn * self.levels) / self.levels - 1)

    def _init_act(self, stats: ActStats) -> None:
        if self.init_mode == "mse":
            half = self.levels / 2
            lo_bound = torch.clamp(stats.min, max=0.0)
            if self.signed:
                c = stats.mse_clip(half, half)
                lo, hi = torch.maximum(-c, lo_bound), c
            else:
                lo, hi = stats.min, stats.min + stats.mse_clip(self.levels, 0)
        elif self.signed:
            lo = torch.maximum(stats.min, stats.mean - 3 * stats.std)
            hi = torch.minimum(stats.max, stats.mean + 3 * stats.std)
        else:
            lo = stats.min
            hi = torch.minimum(stats.max, 3 * stats.std / _HALF_NORMAL_STD)
        hi = torch.maximum(hi, lo + 1e-4)
        self.lower.copy_(lo.reshape(self.lower.shape))
        self.upper.copy_(hi.reshape(self.upper.shape))

    def quantize(self, x: Tensor) -> Tensor:
        width = (self.upper - self.lower).clamp_min(1e-8)
        if self.role == "act":
            return self.fake_quantize_act(x, width / self.levels, 0, self.levels, zero=self.lower,
                                          delta=self._grid_delta())
        wn = ((x - self.lower) / width).clamp(0, 1)
        # out_scale * (2 code / L - 1) as the exported grid scale * (code - zero): the packed form dequantizes
        # to the same floats
        return (2 * self.out_scale / self.levels) * (round_delta(wn * self.levels, self._grid_delta()) - self.levels / 2)

    def grid(self, w: Tensor):
        scale = 2 * self.out_scale.detach() / self.levels
        return scale, torch.full_like(scale, self.levels / 2), 0, self.levels
