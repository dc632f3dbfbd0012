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


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_weight_channels_pack_and_reload_finite(method, tmp_path):
    """A conv whose weights are all zero (a folded BatchNorm with gamma 0, as timm's ``zero_init_last`` leaves
    residual blocks) or with one dead output channel has a grid step of 0 there: codes, the packed form and its
    reload stay finite and give the training form's outputs."""
    import timm

    from sqakd_hf import QuantConfig, calibrate, load_quantized, quantize_model, save_packed

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)][2:4]
    with torch.no_grad():
        model.get_submodule(names[0]).weight.zero_()
        model.get_submodule(names[1]).weight[1].zero_()
    student = quantize_model(model, QuantConfig(method=method, weight_bits=4, act_bits=8))
    x = torch.randn(4, 3, 32, 32)
    calibrate(student, [x])
    for name in names:
        layer = student.get_submodule(name)
        scale, zero, _, _ = layer.weight_quantizer.grid(layer.weight.detach())
        codes = layer.weight_quantizer.codes(layer.weight.detach()).float()
        assert torch.equal(scale * (codes - zero), layer.quantized_weight().detach())  # 0 where the step is 0
    save_packed(student, tmp_path / "packed")
    reloaded = load_quantized(tmp_path / "packed").eval()
    with torch.no_grad():
        expected, got = student(x), reloaded(x)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()  # the FP16 head and biases of the packed form
