"""The CPU fast paths of the fake-quant hot path against their plain reference formulas (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from sqakd_hf.quantizers.base import token_absmax
from sqakd_hf.quantizers.functional import _dot_per_scale


def test_token_absmax_equals_the_inf_norm_of_every_row():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 11) * torch.logspace(-3, 3, 11)
    x[0, 2] = 0.0  # an all-zero row: floored at the smallest normal float
    x[1, 3] = -torch.arange(11.0)  # the largest magnitude is a negative value
    ref = torch.linalg.vector_norm(x.reshape(-1, 11), ord=math.inf, dim=1, keepdim=True)
    got = token_absmax(x)
    assert got.shape == (21, 1)
    assert torch.equal(got, ref.clamp_min(torch.finfo(x.dtype).tiny))
    assert got[2].item() == torch.finfo(x.dtype).tiny and got[10].item() == 10.0
    assert torch.isnan(token_absmax(torch.tensor([[1.0, float("nan")]]))).all()  # NaN stays visible


@pytest.mark.parametrize("shape, scale_shape, transpose", [
    ((5, 4, 3, 3), (1,), False),          # per tensor
    ((5, 4, 3, 3), (5, 1, 1, 1), False),  # per output channel (conv weight)
    ((6, 8), (6, 1), False),              # per token row / linear weight
    ((8, 6), (1, 6), False),              # channel on the last axis (GPT-2 Conv1D weight)
    ((6, 8), (6, 1), True),               # non-contiguous input
    ((2, 3, 5), (1, 1, 5), False),        # per-channel activation, features last
])
def test_dot_per_scale_equals_the_reduced_product(shape, scale_shape, transpose):
    torch.manual_seed(1)
    a = torch.randn(shape[::-1] if transpose else shape, dtype=torch.float64)
    b = torch.randn_like(a)
    if transpose:
        a, b = a.t(), b.t()
    scale = torch.ones(scale_shape, dtype=torch.float64)
    got = _dot_per_scale(a, b, scale)
    assert got.shape == scale.shape
    assert torch.allclose(got, (a * b).sum_to_size(scale.shape), rtol=1e-12, atol=1e-12)
