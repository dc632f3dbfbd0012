"""``SQAKDTrainingArguments.fused_quantizers`` switches the fused CPU fake-quant kernels for the run only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, calibrate, quantize_model
from sqakd_hf.quantizers import cpu_fused


class _Seen(TrainerCallback):
    def __init__(self) -> None:
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(cpu_fused.enabled())


def _train(tmp_path, fused):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    xs = torch.randn(16, 8)
    student = calibrate(quantize_model(copy.deepcopy(fp).train(), QuantConfig(method="lsq", weight_bits=4,
                                                                               act_bits=4)), [xs[:8]])
    args = SQAKDTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
                                  max_steps=2, per_device_train_batch_size=8, fused_quantizers=fused)
    seen = _Seen()
    SQAKDTrainer(model=student, teacher_model=fp, args=args, train_dataset=[{"x": x} for x in xs],
                 callbacks=[seen]).train()
    return seen.seen


@pytest.mark.parametrize("fused", [True, False])
def test_fused_quantizers_holds_during_training_and_is_restored(tmp_path, fused):
    cpu_fused.set_enabled(not fused)
    try:
        assert _train(tmp_path, fused) == [fused, fused]
        assert cpu_fused.enabled() is (not fused)
    finally:
        cpu_fused.set_enabled(None)


def test_unset_fused_quantizers_leaves_the_process_setting(tmp_path):
    cpu_fused.set_enabled(True)
    try:
        assert _train(tmp_path, None) == [True, True]
    finally:
        cpu_fused.set_enabled(None)
