"""The CPU fast paths of the fake-quant hot path against their plain reference formulas (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from sqakd_hf.quantizers.base import token_absmax
from sqakd_hf.quantizers.functional import _step_grad_sum


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
def test_step_grad_sum_equals_the_reduced_products(shape, scale_shape, transpose):
    torch.manual_seed(1)
    g, out, gx, other = (torch.randn(shape[::-1] if transpose else shape, dtype=torch.float64) for _ in range(4))
    if transpose:
        g, out, gx, other = g.t(), out.t(), gx.t(), other.t()
    scale = torch.ones(scale_shape, dtype=torch.float64)
    got = _step_grad_sum(g, out, gx, other, scale)
    assert got.shape == scale.shape
    ref = (g * out).sum_to_size(scale.shape) - (gx * other).sum_to_size(scale.shape)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ fused CPU kernels (torch.compile, opt-in)
@pytest.fixture
def fused(monkeypatch):
    """The fused CPU kernels switched on for small test tensors (thresholds lowered), off again afterwards."""
    from sqakd_hf.quantizers import cpu_fused

    monkeypatch.setattr(cpu_fused, "MIN_ELEMENTS", 64)
    monkeypatch.setattr(cpu_fused, "MIN_TENSOR_ELEMENTS", 64)
    monkeypatch.setattr(cpu_fused, "MIN_FORWARD_ELEMENTS", 64)
    cpu_fused.set_enabled(True)
    yield cpu_fused
    cpu_fused.set_enabled(None)


@pytest.mark.parametrize("scale_shape", [(1,), (12, 1, 1, 1)], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("scale_grad", ["chain", "pact"])
def test_fused_cpu_kernels_match_eager_and_the_reference_formula(fused, scale_shape, scale_grad):
    from sqakd_hf.quantizers.functional import fake_quantize

    torch.manual_seed(2)
    x0 = torch.randn(12, 5, 3, 3) * 2
    g = torch.randn_like(x0)
    s0 = torch.rand(scale_shape) * 0.3 + 0.1
    runs = {}
    for on in (True, False):
        fused.set_enabled(on)
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        y = fake_quantize(x, s, -4, 3, scale_grad=scale_grad)
        y.backward(g)
        runs[on] = (y.detach(), x.grad, s.grad)
    (yf, gxf, gsf), (ye, gxe, gse) = runs[True], runs[False]
    assert torch.equal(yf, ye)  # the same float operations: bit-identical values
    assert torch.equal(gxf, gxe)
    assert torch.allclose(gsf, gse, rtol=1e-5, atol=1e-6)
    # against the plain formula: values, input gradient (STE, zero where clipped), step gradient
    x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    c = torch.clamp(x / s, -4, 3)
    out = ((torch.round(c) - c).detach() + c) * s  # straight-through rounding
    assert torch.allclose(yf, out.detach(), atol=1e-6)
    out.backward(g)
    assert torch.allclose(gxf, x.grad, atol=1e-6)
    if scale_grad == "chain":  # LSQ: d out / d s = round(x/s) - x/s inside, the clip bound outside
        assert torch.allclose(gsf, s.grad, rtol=1e-4, atol=1e-5)
    else:  # PACT: sum of g * q over the clipped elements only
        xn = (x0 / s0).detach()
        q = torch.clamp(torch.round(xn), -4, 3)
        clipped = (xn < -4) | (xn > 3)
        ref = (g * q * clipped).sum_to_size(s0.shape)
        assert torch.allclose(gsf, ref, rtol=1e-4, atol=1e-5)


def test_fused_cpu_kernels_serve_an_lsq_weight_quantizer(fused):
    from sqakd_hf.quantizers import build_quantizer

    torch.manual_seed(3)
    w0 = torch.randn(16, 8, 3, 3)
    q = build_quantizer("lsq", 4, "weight", (16, 1, 1, 1))
    q.init_from_weight(w0)
    g = torch.randn_like(w0)
    runs = []
    for on in (True, False):
        fused.set_enabled(on)
        q.scale.grad = None
        w = w0.clone().requires_grad_()
        y = q(w)
        y.backward(g)
        runs.append((y.detach(), w.grad, q.scale.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.allclose(runs[0][2], runs[1][2], rtol=1e-5, atol=1e-7)


def test_fused_cpu_kernels_fall_back_to_eager_when_compiling_fails(fused, monkeypatch, caplog):
    from sqakd_hf.quantizers.functional import fake_quantize

    def broken(name):
        raise RuntimeError("no C++ compiler\ndetails")

    monkeypatch.setattr(fused, "_compiled", broken)
    x = torch.randn(8, 16, requires_grad=True)
    s = torch.full((8, 1), 0.2, requires_grad=True)
    with caplog.at_level("WARNING"):
        y = fake_quantize(x, s, -8, 7)
    assert "fused CPU fake-quant kernels unavailable (RuntimeError: no C++ compiler)" in caplog.text
    assert not fused.enabled()  # eager from then on
    y.sum().backward()
    fused.set_enabled(False)
    x2, s2 = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    y2 = fake_quantize(x2, s2, -8, 7)
    y2.sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad) and torch.allclose(s.grad, s2.grad)


def test_fused_cpu_kernels_are_off_by_default_and_skip_small_or_unsupported_tensors(monkeypatch):
    from sqakd_hf.quantizers import cpu_fused

    monkeypatch.delenv("SQAKD_CPU_FUSED", raising=False)
    cpu_fused.set_enabled(None)
    assert not cpu_fused.enabled()
    monkeypatch.setenv("SQAKD_CPU_FUSED", "1")
    cpu_fused.set_enabled(None)
    try:
        assert cpu_fused.enabled()
        big = torch.zeros(cpu_fused.MIN_TENSOR_ELEMENTS, 2)
        rows = torch.zeros(cpu_fused.MIN_ELEMENTS // 2, 2)
        assert cpu_fused.rows_view(big, torch.ones(1)) is not None
        assert cpu_fused.rows_view(rows, torch.ones(len(rows), 1)) is not None
        assert cpu_fused.rows_view(rows, torch.ones(1)) is None  # per tensor: eager up to MIN_TENSOR_ELEMENTS
        assert cpu_fused.rows_view(torch.zeros(4, 4), torch.ones(4, 1)) is None  # small: eager
        assert cpu_fused.rows_view(big.t(), torch.ones(1)) is None  # not contiguous
        assert cpu_fused.rows_view(big, torch.ones(1, 2)) is None  # channel on the last axis
        assert cpu_fused.rows_view(rows, torch.ones(len(rows))) is None  # a 1-D scale broadcasts on dim -1
    finally:
        cpu_fused.set_enabled(None)
