"""BatchNorm folding (``QuantConfig(fold_bn=True)``, :func:`sqakd_hf.folding.fold_batchnorm`): the eval-mode
function is kept on a timm ResNet, a transformers ResNet and the real EfficientNet-Lite0; a folded student saved
in the training and the packed form reloads to identical outputs (timm layout and transformers'
``from_pretrained``, also from a full-precision folder); a model without BatchNorm is unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sqakd_hf import QuantConfig, calibrate, load_quantized, quantize_model, save_quantized
from sqakd_hf.folding import FoldedNorm, fold_batchnorm

from effnet_fixtures import effnet_safetensors, effnet_teacher  # noqa: F401  (pytest fixtures)

timm = pytest.importorskip("timm")


def _with_real_looking_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.05)
            m.weight.data.copy_(1 + 0.5 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=g))
    return model.eval()


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _hf_resnet(num_labels: int = 5):
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(hidden_sizes=[8, 16, 24, 32], embedding_size=8, depths=[1, 1, 1, 1], num_labels=num_labels)
    return _with_real_looking_stats(ResNetForImageClassification(cfg))


def test_fold_keeps_the_function_of_a_timm_resnet_and_a_transformers_resnet():
    x = torch.randn(2, 3, 64, 64)
    for model, out in ((_with_real_looking_stats(timm.create_model("resnet18", num_classes=10)), lambda y: y),
                       (_hf_resnet(), lambda y: y.logits)):
        n_bn = _bn_count(model)
        folded = copy.deepcopy(model)
        names = fold_batchnorm(folded)
        assert len(names) == n_bn > 0 and _bn_count(folded) == 0
        assert all(isinstance(folded.get_submodule(n), FoldedNorm) for n in names)
        with torch.no_grad():
            ref, got = out(model(x)), out(folded(x))
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), type(model).__name__


def test_fold_keeps_the_function_of_real_efficientnet_lite0(effnet_teacher):
    x = torch.randn(2, 3, 96, 96)
    folded = copy.deepcopy(effnet_teacher)
    names = fold_batchnorm(folded)
    assert len(names) == 49 and _bn_count(folded) == 0  # every BatchNormAct2d, ReLU6 kept
    assert isinstance(folded.blocks[1][0].bn1.act, nn.ReLU6)
    with torch.no_grad():
        ref, got = effnet_teacher(x), folded(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_no_batchnorm_is_a_noop():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    state = copy.deepcopy(model.state_dict())
    assert fold_batchnorm(model) == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    student = quantize_model(model, QuantConfig(fold_bn=True, modules_to_not_convert=[]))
    assert student.sqakd_report.folded == []


def test_a_conv_output_read_twice_is_not_folded():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert fold_batchnorm(Two()) == []


def test_fold_bn_field_validates_and_round_trips():
    with pytest.raises(ValueError, match="fold_bn must be True or False"):
        QuantConfig(fold_bn="yes")
    assert QuantConfig(**QuantConfig(fold_bn=True).to_dict()).fold_bn is True
    assert QuantConfig.from_dict({"method": "lsq"}).fold_bn is False  # an older record was not folded


@pytest.mark.parametrize("packed", [False, True])
def test_folded_timm_student_reloads_identically(tmp_path, packed):
    teacher = _with_real_looking_stats(timm.create_model("resnet18", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=4, act_bits=8, fold_bn=True))
    assert len(student.sqakd_report.folded) == 20
    calibrate(student, [x]).eval()
    save_quantized(student, tmp_path / "s", packed=packed, fp_dtype=torch.float32)
    again = load_quantized(tmp_path / "s").eval()
    assert _bn_count(again) == 0
    with torch.no_grad():
        assert torch.equal(again(x), student(x))


@pytest.mark.parametrize("packed", [False, True])
def test_folded_transformers_student_from_pretrained_and_reload(tmp_path, packed):
    from transformers import ResNetForImageClassification

    teacher = _hf_resnet()
    teacher.save_pretrained(tmp_path / "fp")
    cfg = QuantConfig(weight_bits=4, act_bits=8, fold_bn=True)
    student = ResNetForImageClassification.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    direct = quantize_model(copy.deepcopy(teacher), cfg)
    assert len(student.sqakd_report.folded) == 16 and _bn_count(student) == 0
    for name, p in direct.named_parameters():  # folded after loading, exactly as quantize_model folds
        if "quantizer" not in name:
            assert torch.equal(student.get_parameter(name), p), name
    x = torch.randn(2, 3, 64, 64)
    calibrate(student, [x]).eval()
    save_quantized(student, tmp_path / "s", packed=packed, fp_dtype=torch.float32)
    again = load_quantized(tmp_path / "s").eval()
    assert again.config.quantization_config.fold_bn is True and _bn_count(again) == 0
    with torch.no_grad():
        assert torch.equal(again(x).logits, student(x).logits)
