"""No NaN or inf from any quantizer on awkward real-world tensors: all-zero and dead channels, constant
tensors, tiny ranges, huge outliers; forward values and every gradient stay finite, after initialisation
from that same tensor, for every method, bit-width, role and granularity (float32 and bfloat16)."""

from __future__ import annotations

import pytest
import torch

from sqakd_hf.quantizers import METHODS, build_quantizer


def _weights():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * 0.05
    dead = w.clone()
    dead[2] = 0.0  # a pruned / dead output channel
    outlier = w.clone()
    outlier[0, 0, 0, 0] = 1e4
    return {
        "zeros": torch.zeros(8, 4, 3, 3),
        "constant": torch.full((8, 4, 3, 3), 0.3),
        "dead_channel": dead,
        "tiny_range": w * 1e-20,
        "huge_outlier": outlier,
    }


def _activations():
    torch.manual_seed(1)
    x = torch.randn(4, 8, 6, 6)
    outlier = x.relu().clone()
    outlier[0, 0, 0, 0] = 1e5
    return {
        "zeros": torch.zeros(4, 8, 6, 6),
        "constant": torch.full((4, 8, 6, 6), 2.0),
        "relu_dead": torch.zeros(4, 8, 6, 6).relu(),
        "tiny_range": x * 1e-20,
        "huge_outlier": outlier,
        "negative_only": -x.abs() - 1,
    }


def _check_finite(q, x):
    x = x.clone().requires_grad_(True)
    y = q(x)
    assert torch.isfinite(y).all(), "forward"
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all(), "input gradient"
    for name, p in q.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"gradient of {name}"
        assert torch.isfinite(p).all(), f"parameter {name}"


@pytest.mark.parametrize("init", ["mse", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_weight_quantizers_stay_finite(method, bits, granularity, dtype, init):
    for case, w in _weights().items():
        shape = (8, 1, 1, 1) if granularity == "per_channel" else ()
        q = build_quantizer(method, bits, "weight", shape, 0, 1e-3, init).to(dtype)
        w = w.to(dtype)
        q.init_from_weight(w)
        try:
            _check_finite(q, w)
            scale, zero, _, _ = q.grid(w.detach())
            assert torch.isfinite(scale).all() and torch.isfinite(zero).all(), "grid"
            assert torch.isfinite(q.codes(w.detach()).float()).all()
        except AssertionError as err:
            raise AssertionError(f"{method} W{bits} {granularity} {dtype} init={init} on {case}: {err}") from None


@pytest.mark.parametrize("init", ["mse", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_activation_quantizers_stay_finite(method, bits, dtype, init):
    for case, x in _activations().items():
        q = build_quantizer(method, bits, "act", (), 0, 1e-3, init).to(dtype)
        x = x.to(dtype)
        q.observe(x)
        q.init_from_stats(q.pop_stats())
        try:
            _check_finite(q, x)
            _check_finite(q, torch.randn_like(x))  # data unlike the calibration sample
        except AssertionError as err:
            raise AssertionError(f"{method} A{bits} {dtype} init={init} on {case}: {err}") from None
