"""PACT (Choi et al., 2018): a learnable clipping level alpha for activations.

PACT's weights are quantized as in DoReFa (see :mod:`.dorefa`) with ``init="paper"``; with the default
``init="mse"`` the registry builds a learned-step :class:`~.lsq.LSQQuantizer` for them instead (see
:func:`~sqakd_hf.quantizers.build_quantizer`).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from .base import ActStats, Quantizer

DEFAULT_ALPHA = 6.0


class PACTQuantizer(Quantizer):
    """``y = clip(x, 0, alpha)`` quantized uniformly on ``[0, alpha]`` (``[-alpha, alpha]`` if signed).

    Backward: STE for x inside the clip range; ``d alpha = g`` where ``x >= alpha``
    (``-g`` where ``x <= -alpha`` on a signed grid), zero elsewhere. Per-token activations: ``alpha`` is a
    learned clip ratio of each token's ``max|x_t|``.
    """

    method = "pact"

    def __init__(self, bits: int, role: str = "act", param_shape: Tuple[int, ...] = (), **kw) -> None:
        if role != "act":
            raise ValueError("PACT quantizes activations; PACT weights use DoReFaQuantizer (init='paper') or LSQQuantizer")
        super().__init__(bits, role, param_shape, **kw)
        self.alpha = nn.Parameter(torch.full(self.tensor_shape, DEFAULT_ALPHA))

    def init_from_weight(self, w: Tensor) -> None:
        raise TypeError("PACTQuantizer quantizes activations only")

    def _init_act(self, stats: ActStats) -> None:
        """``init="paper"``: alpha from a high percentile of |x| (6 when that is 0); ``"mse"``: the
        error-minimising clip."""
        alpha = stats.mse_clip(self.qmax, -self.qmin) if self.init_mode == "mse" else stats.percentile_abs
        alpha = torch.where(alpha > 0, alpha, torch.full_like(alpha, DEFAULT_ALPHA))
        self.alpha.copy_(alpha.reshape(self.alpha.shape))

    def quantize(self, x: Tensor) -> Tensor:
        s = self.alpha.abs().clamp_min(1e-8) / self.qmax
        return self.fake_quantize_act(x, s, self.qmin, self.qmax, delta=self.delta, binary=self.binary,
                                      scale_grad="pact")
