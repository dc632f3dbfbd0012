"""The teacher's CPU layout: a timm CNN teacher runs in channels_last (faster oneDNN convolutions), same outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, calibrate, quantize_model

timm = pytest.importorskip("timm")


def _trainer(teacher: nn.Module, student: nn.Module, tmp_path) -> SQAKDTrainer:
    args = SQAKDTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no")
    return SQAKDTrainer(model=student, teacher_model=teacher, args=args)


def test_timm_cnn_teacher_runs_channels_last_on_cpu_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    fp = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = fp(x)
    student = calibrate(quantize_model(copy.deepcopy(fp).train(), QuantConfig(method="lsq", weight_bits=4,
                                                                               act_bits=4)), [x])
    trainer = _trainer(fp, student, tmp_path)
    assert trainer.teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    got = trainer.teacher_outputs({"x": x})
    got = got if isinstance(got, torch.Tensor) else got["logits"]
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_plain_torch_cnn_teacher_keeps_its_layout(tmp_path):
    """Code outside timm may .view() a conv output, which channels_last would break: left as it is."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            h = self.conv(self.stem(x))
            return self.fc(h.view(h.shape[0], -1))

    fp = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    student = calibrate(quantize_model(copy.deepcopy(fp).train(), QuantConfig(method="lsq", weight_bits=4,
                                                                               act_bits=4)), [x])
    trainer = _trainer(fp, student, tmp_path)
    assert trainer.teacher.conv.weight.is_contiguous()
    assert trainer.teacher_outputs({"x": x}).shape == (2, 5)
