"""Cross-layer equalization (``QuantConfig(equalize=True)``) and bias correction (``bias_correction=True``):
the equalized full-precision real EfficientNet-Lite0 computes the teacher's function, ranges end up equal, the
per-channel clip replaces ReLU6 and reloads; bias correction removes the mean output shift it measures."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sqakd_hf import QuantConfig, calibrate, load_quantized, quantize_model, save_quantized
from sqakd_hf.equalization import ChannelClip, equalizable_pairs, equalize_model
from sqakd_hf.folding import fold_batchnorm

from effnet_fixtures import effnet_safetensors, effnet_teacher, photo_crops  # noqa: F401  (pytest fixtures)

pytest.importorskip("timm")


def test_equalization_keeps_the_function_of_real_efficientnet_lite0(effnet_teacher):
    x = photo_crops(2, seed=3, size=128)
    model = copy.deepcopy(effnet_teacher)
    fold_batchnorm(model)
    pairs = equalize_model(model)
    assert len(pairs) == 34  # stem -> dw, and pw -> dw -> pw(l) through every block (residual outputs excluded)
    assert "blocks.1.0.conv_pw -> blocks.1.0.conv_dw" in pairs and "blocks.1.0.conv_dw -> blocks.1.0.conv_pwl" in pairs
    assert isinstance(model.blocks[1][0].bn1.act, ChannelClip) and not any(isinstance(m, nn.ReLU6) for m in
                                                                           _between(model))
    with torch.no_grad():
        ref, got = effnet_teacher(x), model(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    # equal ranges: the depthwise conv's output channels and the projection's input channels
    dw, pwl = model.blocks[1][0].conv_dw.weight, model.blocks[1][0].conv_pwl.weight
    r1, r2 = dw.abs().flatten(1).amax(1), pwl.abs().transpose(0, 1).flatten(1).amax(1)
    assert torch.allclose(r1, r2, rtol=0.05)


def _between(model: nn.Module):
    names = {n for _, between, _ in equalizable_pairs(model) for n in between}
    return [model.get_submodule(n) for n in names]


def test_a_relu6_clip_is_kept_per_channel():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([10.0, 0.1, 1.0, 5.0]).view(-1, 1, 1, 1))
    x = 5 * torch.randn(2, 3, 5, 5)
    ref = model(x)
    assert equalize_model(model) == ["0 -> 2"]
    assert isinstance(model[1], ChannelClip) and not torch.allclose(model[1].upper, torch.full((4,), 6.0))
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_no_pairs_is_a_noop():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    state = copy.deepcopy(model.state_dict())
    assert equalize_model(model) == []  # a BatchNorm in between: fold it first
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_fields_validate_and_round_trip():
    with pytest.raises(ValueError, match="equalize must be True or False"):
        QuantConfig(equalize=1)
    for bad in (1, "convs"):
        with pytest.raises(ValueError, match="bias_correction must be True, False or 'auto'"):
            QuantConfig(bias_correction=bad)
    assert QuantConfig().bias_correction == "auto"
    for value in (True, False, "auto"):
        cfg = QuantConfig(fold_bn=True, equalize=True, bias_correction=value)
        assert QuantConfig(**cfg.to_dict()).to_dict() == cfg.to_dict()
        assert QuantConfig.from_dict(cfg.to_dict()).bias_correction == value
    old = QuantConfig.from_dict({"method": "lsq"})  # written before the field existed: calibrated without it
    assert not old.equalize and old.bias_correction is False


@pytest.mark.parametrize("packed", [False, True])
def test_equalized_bias_corrected_lite0_reloads_identically(effnet_teacher, tmp_path, packed):
    cfg = QuantConfig(weight_bits=4, act_bits=8, fold_bn=True, equalize=True, bias_correction=True)
    x = photo_crops(4, seed=3, size=96)
    student = quantize_model(copy.deepcopy(effnet_teacher), cfg)
    assert len(student.sqakd_report.equalized) == 34
    before = {n: m.bias.clone() for n, m in student.named_modules() if isinstance(m, nn.Conv2d)}
    calibrate(student, [x[:2], x[2:]]).eval()
    assert len(student.sqakd_bias_corrected) == 48  # every quantized conv (the stem and the head stay FP)
    assert any(not torch.equal(before[n], student.get_submodule(n).bias) for n in student.sqakd_bias_corrected)
    save_quantized(student, tmp_path / "s", packed=packed, fp_dtype=torch.float32)
    again = load_quantized(tmp_path / "s").eval()
    assert isinstance(again.blocks[1][0].bn1.act, ChannelClip)
    with torch.no_grad():
        assert torch.equal(again(x), student(x))


@pytest.mark.parametrize("gptq", [False, True])  # after GPTQ the shift is measured against the FP weights
def test_bias_correction_removes_the_mean_shift_it_measures(gptq):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(16, 3, 8, 8) + 0.5  # inputs with a mean: weight rounding errors shift the outputs' means
    batches = [x[:8], x[8:]]

    def mean_shift(bias_correction: bool) -> float:
        cfg = QuantConfig(weight_bits=2, act_bits=8, act_granularity="per_tensor", modules_to_not_convert=[],
                          bias_correction=bias_correction, gptq=gptq)
        student = calibrate(quantize_model(copy.deepcopy(model), cfg), batches).eval()
        with torch.no_grad():
            return (model(x) - student(x)).mean((0, 2, 3)).abs().max().item()

    assert mean_shift(True) < 0.2 * mean_shift(False)


@pytest.mark.parametrize("setting", [True, "auto"])
def test_a_conv_without_bias_is_corrected_through_the_batchnorm_after_it(setting):
    """conv (no bias) -> BatchNorm: the shift goes into the norm's running mean; "auto" leaves linears alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Flatten(1), nn.Linear(4 * 8 * 8, 5))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(16, 3, 8, 8) + 0.5
    batches = [x[:8], x[8:]]

    def student_of(bias_correction):
        cfg = QuantConfig(weight_bits=2, act_bits=8, act_granularity="per_tensor", modules_to_not_convert=[],
                          bias_correction=bias_correction)
        return calibrate(quantize_model(copy.deepcopy(model), cfg), batches).eval()

    def shift(student) -> float:  # mean shift of the second norm's output, per channel
        with torch.no_grad():
            return (model[:5](x) - student[:5](x)).mean((0, 2, 3)).abs().max().item()

    off, on = student_of(False), student_of(setting)
    assert sorted(on.sqakd_bias_corrected) == (["0", "3", "6"] if setting is True else ["0", "3"])
    assert shift(on) < 0.2 * shift(off)
    assert on[0].bias is None and on[3].bias is None  # no new parameter: the checkpoint keeps its keys
    assert not torch.equal(on[1].running_mean, off[1].running_mean)
    assert torch.equal(on[6].bias, off[6].bias) is (setting == "auto")


def test_the_correction_through_a_batchnorm_is_the_least_squares_affine_fit():
    """conv (no bias) -> BatchNorm: the corrected norm maps the quantized conv output ``y_q`` to ``a y_q + d``
    normalised with the teacher's affine, the per-channel least-squares fit of the FP output on the calibration data:
    the residual has zero mean and is uncorrelated with ``y_q``, and its error is below the mean-only correction's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(32, 3, 8, 8) + 0.5
    cfg = QuantConfig(weight_bits=2, act_bits=3, act_granularity="per_tensor", modules_to_not_convert=[],
                      bias_correction=True)
    student = calibrate(quantize_model(copy.deepcopy(model), cfg), [x[:16], x[16:]]).eval()
    assert student.sqakd_bias_corrected == ["0"]
    with torch.no_grad():
        ref, y_q, out = model(x), student[0](x), student(x)
    residual = (ref - out).transpose(0, 1).flatten(1).double()
    centred = y_q.transpose(0, 1).flatten(1).double()
    centred = centred - centred.mean(1, keepdim=True)
    scale = ref.transpose(0, 1).flatten(1).double().std(1)
    assert (residual.mean(1).abs() <= 1e-4 * scale).all()
    assert ((residual * centred).mean(1).abs() <= 1e-4 * scale * centred.std(1)).all()
    assert not torch.allclose(student[1].running_var, model[1].running_var)  # the slope is not 1
    mean_only = residual + out.transpose(0, 1).flatten(1).double()  # ref, then the mean-only corrected output:
    shifted = student[1].weight.double()[:, None] * (y_q.transpose(0, 1).flatten(1).double() - y_q.transpose(0, 1)
              .flatten(1).double().mean(1, keepdim=True)) / (model[1].running_var.double()[:, None] + 1e-5).sqrt()
    shifted = shifted + mean_only.mean(1, keepdim=True)
    assert residual.square().sum() < (mean_only - shifted).square().sum()


@pytest.mark.parametrize("make_model, method", [
    (lambda: nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), "lsq"),  # no convs
    (lambda: nn.Sequential(nn.Conv2d(6, 6, 1), nn.ReLU(), nn.Conv2d(6, 3, 1)), "dorefa"),  # inputs clipped to [0, 1]
], ids=["linears", "dorefa-convs"])
def test_auto_bias_correction_skips_what_it_does_not_correct(make_model, method):
    torch.manual_seed(0)  # the weights are drawn here, not at collection (where they depend on the files collected)
    model = make_model()
    x = torch.randn(4, 6) if isinstance(model[0], nn.Linear) else torch.randn(4, 6, 3, 3)
    cfg = QuantConfig(method=method, weight_bits=4, act_bits=8, modules_to_not_convert=[])
    student = calibrate(quantize_model(copy.deepcopy(model), cfg), iter([x]))  # one-shot: read once, nothing to correct
    assert not hasattr(student, "sqakd_bias_corrected")
    explicit = calibrate(quantize_model(copy.deepcopy(model), QuantConfig(**{**cfg.to_dict(), "bias_correction": True})),
                         [x])
    assert explicit.sqakd_bias_corrected == ["0", "2"]  # True corrects them all


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """Spatially correlated inputs (blurred noise), where rounding errors of a kernel's taps add up."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, 20, 20, generator=g)
    return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2) * 3 + 0.5


@pytest.mark.parametrize("method, rounds", [("lsq", True), ("pact", True), ("dorefa", True), ("minmax", False)])
def test_gptq_rounding_beats_nearest_on_correlated_inputs(method, rounds):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                          nn.Conv2d(16, 4, 3, padding=1)).eval()
    calib, test = _smooth_images(32, 1), _smooth_images(16, 2)

    def error(gptq: bool) -> float:
        cfg = QuantConfig(method=method, weight_bits=4, act_bits=32, modules_to_not_convert=[], gptq=gptq,
                          bias_correction=False)  # GPTQ alone
        student = calibrate(quantize_model(copy.deepcopy(model), cfg), [calib[:16], calib[16:]]).eval()
        if gptq:
            assert (student.sqakd_gptq_rounded == ["0", "2", "4"]) == rounds
            for _, layer in student.named_modules():  # the master weights are the grid values themselves
                if rounds and hasattr(layer, "weight_quantizer"):
                    assert torch.allclose(layer.weight_quantizer(layer.weight), layer.weight)
        with torch.no_grad():
            return ((student(test) - model(test)).norm() / model(test).norm()).item()

    nearest, gptq = error(False), error(True)
    if rounds:
        assert gptq < 0.8 * nearest, (gptq, nearest)
    else:  # minmax steps follow max|w|: it does not keep its grid values, weights kept
        assert gptq == pytest.approx(nearest)
