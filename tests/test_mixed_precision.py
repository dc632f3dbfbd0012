"""Mixed precision chosen by measurement: ``layer_sensitivity`` (each layer's weights quantized alone, the output's
relative error) and ``choose_layer_bits`` (the most sensitive layers at 8 bits under a budget), on the trained
digits teacher. The real-weights check (EfficientNet-Lite0) is in ``test_real_weights.py``."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from sqakd_hf import QuantConfig, calibrate, choose_layer_bits, layer_sensitivity, quant_layers, quantize_model


def _batches(digits):
    x = digits[0]
    return [x[:64], x[64:128]]


def test_sensitivity_is_each_layers_weight_rounding_alone(digits, digits_teacher):
    batches = _batches(digits)
    before = {k: v.clone() for k, v in digits_teacher.state_dict().items()}
    cfg2 = QuantConfig(weight_bits=2, act_bits=8)
    sens2 = layer_sensitivity(digits_teacher, cfg2, batches, progress=False)
    sens8 = layer_sensitivity(digits_teacher, QuantConfig(weight_bits=8, act_bits=8), batches, progress=False)

    # the teacher is neither quantized nor changed
    assert not list(quant_layers(digits_teacher))
    assert all(torch.equal(v, digits_teacher.state_dict()[k]) for k, v in before.items())
    student = calibrate(quantize_model(copy.deepcopy(digits_teacher), cfg2), batches).eval()
    assert list(sens2) == [n for n, _ in quant_layers(student)]
    assert all(0 < sens8[n] < sens2[n] for n in sens2), (sens8, sens2)

    # independently: put one layer's rounded weights into a copy of the teacher, everything else as it was
    name = max(sens2, key=sens2.get)
    layer = student.get_submodule(name)
    manual = copy.deepcopy(digits_teacher)
    with torch.no_grad():
        manual.get_submodule(name).weight.copy_(layer.weight_quantizer(layer.weight))
        ref = torch.cat([digits_teacher(b) for b in batches])
        out = torch.cat([manual(b) for b in batches])
    assert (out - ref).norm().item() / ref.norm().item() == pytest.approx(sens2[name], rel=1e-4)


def test_sensitivity_does_not_report_its_private_copy_as_a_quantized_model(digits, digits_teacher, caplog):
    """The copy's "quantized N layers" / "calibrated" INFO lines are left out (they would read as the user's model);
    the loggers' levels are restored, so the real quantization still reports."""
    import logging

    names = ("sqakd_hf.injection", "sqakd_hf.calibration")
    levels = [logging.getLogger(n).level for n in names]
    with caplog.at_level(logging.INFO):
        layer_sensitivity(digits_teacher, QuantConfig(weight_bits=4, act_bits=8), _batches(digits), progress=False)
        assert not [r for r in caplog.records if r.name in names and r.levelno == logging.INFO]
        assert [logging.getLogger(n).level for n in names] == levels
        calibrate(quantize_model(copy.deepcopy(digits_teacher), QuantConfig(weight_bits=4, act_bits=8)),
                  _batches(digits))
    assert set(names) <= {r.name for r in caplog.records if "sqakd: " in r.getMessage()}


def test_choose_layer_bits_takes_the_most_sensitive_layers_that_fit(digits_teacher):
    student = quantize_model(copy.deepcopy(digits_teacher), QuantConfig(weight_bits=2, act_bits=4))
    sizes = {n: m.weight.numel() for n, m in quant_layers(student)}
    names = sorted(sizes, key=sizes.get)  # small to large
    big, small = names[-1], names[0]
    # the largest layer is the most sensitive but over the budget: skipped; the next ones are taken while they fit
    sens = {n: float(i) for i, n in enumerate(names)}
    sens[big] = 100.0
    budget = (sizes[small] + sizes[names[-2]]) / sum(sizes.values()) + 1e-9
    layer_bits = choose_layer_bits(digits_teacher, sens, budget)
    (pattern, bits), = layer_bits.items()
    assert bits == {"weight_bits": 8}
    chosen = [n for n in sizes if re.search(pattern, n)]
    assert big not in chosen and names[-2] in chosen
    assert sum(sizes[n] for n in chosen) <= budget * sum(sizes.values())

    mixed = quantize_model(copy.deepcopy(digits_teacher), QuantConfig(weight_bits=2, act_bits=4, layer_bits=layer_bits))
    for n, m in quant_layers(mixed):
        assert m.weight_quantizer.bits == (8 if n in chosen else 2), n
        assert m.input_quantizer.bits == 4, n  # activations keep the config's bits

    assert choose_layer_bits(digits_teacher, {big: 1.0}, sizes[big] / sum(sizes.values()) / 2) == {}


def test_mixed_precision_errors_name_the_problem(digits, digits_teacher):
    sens = {"features.0.0": 0.5}
    for budget in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="budget is a fraction"):
            choose_layer_bits(digits_teacher, sens, budget)
    for bits in (0, 9, True, 4.0):
        with pytest.raises(ValueError, match="bits must be an integer from 1 to 8"):
            choose_layer_bits(digits_teacher, sens, 0.5, bits=bits)
    with pytest.raises(ValueError, match="not a weighted layer of this model"):
        choose_layer_bits(digits_teacher, {"features.9": 1.0}, 0.5)
    with pytest.raises(ValueError, match="at least one batch"):
        layer_sensitivity(digits_teacher, QuantConfig(), [], progress=False)
