"""Range search: the clipping value that minimises the quantization error (mean squared error).

* Weights: an exact search per output channel over candidate clips ``c = f * max|w|``
  (``f`` in ``FRACTIONS``), scoring each with the method's own quantize-at-``c`` function.
* Activations: calibration batches are summarised by log-spaced histograms of the positive values
  and of the magnitudes of the negative values (sums, so they merge across batches and ranks like
  every other statistic); the error of a candidate clip is computed from the histogram: values
  beyond the clip cost ``(|x| - c)^2``, values that round to zero cost ``x^2``, the rest
  ``step^2 / 12``.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
from torch import Tensor

#: candidate clips as fractions of the largest magnitude (weights): a coarse grid, then a finer one around
#: each channel's best coarse candidate
COARSE = torch.linspace(0.05, 1.0, 20).tolist()
FINE = torch.linspace(-1.0, 1.0, 11).tolist()
#: log10-magnitude range and resolution of the activation histograms
LOG_MIN, LOG_MAX, BINS = -12.0, 12.0, 2400
_WIDTH = (LOG_MAX - LOG_MIN) / BINS
#: candidates per activation search (the upper bin edges of the populated range)
_ACT_CANDIDATES = 512


@torch.no_grad()
def histogram_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(hist_pos, hist_neg)``: counts of positive values and of negative values' magnitudes in
    log-spaced bins; zeros fall in neither (they quantize exactly)."""
    flat = x.detach().float().reshape(-1)
    logs = flat.abs().clamp_min(10**LOG_MIN).log10()
    pos = torch.histc(logs[flat > 0], bins=BINS, min=LOG_MIN, max=LOG_MAX)
    neg = torch.histc(logs[flat < 0], bins=BINS, min=LOG_MIN, max=LOG_MAX)
    return pos, neg


def _bin_values(device: torch.device) -> Tensor:
    """Representative magnitude of each bin (its geometric centre)."""
    centres = LOG_MIN + _WIDTH * (torch.arange(BINS, device=device, dtype=torch.float64) + 0.5)
    return torch.pow(10.0, centres)


def _side_error(counts: Tensor, values: Tensor, clip: Tensor, step: Tensor) -> Tensor:
    """Squared error of one sign's values for every candidate (``clip``, ``step``: shape [K])."""
    v = values[None, :]
    c, s = clip[:, None], step[:, None]
    err = torch.where(v > c, (v - c).square(), torch.where(v < s / 2, v.square(), s.square() / 12))
    return (err * counts[None, :]).sum(1)


@torch.no_grad()
def mse_activation_clip(hist_pos: Tensor, hist_neg: Tensor, pos_levels: int, neg_levels: int) -> Tensor:
    """The clip ``c`` minimising the histogram's squared error on a grid of step ``c / pos_levels``
    that reaches ``c`` above zero and ``neg_levels * step`` below (``neg_levels = 0``: unsigned).
    Returns a 0-d float32 tensor (0 when the histograms are empty)."""
    pos, neg = hist_pos.double(), hist_neg.double()
    values = _bin_values(pos.device)
    populated = torch.nonzero((pos + neg) > 0)
    if populated.numel() == 0:
        return torch.zeros((), device=hist_pos.device)
    top = int(populated.max())
    low = max(0, top - _ACT_CANDIDATES + 1)
    clip = torch.pow(10.0, LOG_MIN + _WIDTH * (torch.arange(low, top + 1, device=pos.device, dtype=torch.float64) + 1))
    step = clip / max(pos_levels, 1)
    err = _side_error(pos, values, clip, step)
    if neg_levels > 0:
        err = err + _side_error(neg, values, step * neg_levels, step)
    else:
        err = err + (neg * values.square()).sum()  # an unsigned grid clips every negative value to zero
    return clip[int(torch.argmin(err))].float()


@torch.no_grad()
def mse_weight_clip(w: Tensor, dims: Tuple[int, ...], quantize_at: Callable[[Tensor], Tensor]) -> Tensor:
    """Per output channel (reduced over ``dims``, kept as size-1 dims) the clip ``c = f * max|w|`` whose
    quantized weight ``quantize_at(c)`` is closest to ``w`` in squared error. ``quantize_at`` takes ``c``
    broadcastable to ``w`` and returns the fake-quantized weight."""
    w = w.detach().float()
    absmax = w.abs().amax(dim=dims, keepdim=True)
    best_err = torch.full_like(absmax, math.inf)
    best = absmax.clone()

    def consider(c: Tensor) -> None:
        nonlocal best, best_err
        err = (quantize_at(c) - w).square_().sum(dim=dims, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, c, best)

    for f in COARSE:
        consider(absmax * f)
    spacing = absmax * (COARSE[1] - COARSE[0])
    centre = best.clone()
    for f in FINE:
        if f != 0.0:
            consider((centre + spacing * f).clamp(min=absmax * 0.01, max=absmax))
    return best
