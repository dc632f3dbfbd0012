"""torch_compile=True end to end: a quantized student and its teacher compiled by the Trainer (inductor, CPU)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.state import AcceleratorState

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_teacher_cache import mlp_teacher  # noqa: E402,F401  (the fixture: a digits MLP trained with labels)


def _run(teacher, ds, out, method, **kw):
    # accelerate keeps the first Accelerator's dynamo setting for the whole process: start from a fresh state
    AcceleratorState._reset_state(True)
    student = quantize_model(copy.deepcopy(teacher).train().requires_grad_(True),
                             QuantConfig(method=method, weight_bits=4, act_bits=4, modules_to_not_convert=[]))
    args = SQAKDTrainingArguments(output_dir=str(out), report_to="none", use_cpu=True, save_strategy="no",
                                  disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=16,
                                  max_steps=3, calibration_batches=1, train_sampling_strategy="sequential",
                                  learning_rate=1e-3, lr_scheduler_type="constant", **kw)
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, train_dataset=ds, args=args)
    trainer.train()
    compiled = isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled == bool(kw.get("torch_compile")), (type(trainer.model_wrapped), trainer.accelerator.state.dynamo_plugin.backend, type(trainer.teacher), type(trainer.model))
    assert isinstance(trainer.teacher, torch._dynamo.eval_frame.OptimizedModule) == compiled
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("method", ["lsq", "ewgs"])
def test_torch_compile_trains_like_eager(mlp_teacher, digits, tmp_path, method):
    teacher = mlp_teacher
    ds = datasets.Dataset.from_dict({"pixel_values": digits[0][:64].numpy()}).with_format("torch")
    torch._dynamo.reset()
    compiled, losses = _run(teacher, ds, tmp_path / "c", method, torch_compile=True)
    _, eager = _run(teacher, ds, tmp_path / "e", method)
    assert len(losses) == 3 and losses == pytest.approx(eager, rel=1e-3)
    # the quantized student's forward is one graph (no graph breaks in the quantizers)
    student = compiled.model
    explained = torch._dynamo.explain(student)(ds[:16]["pixel_values"])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_torch_compile_with_teacher_cache(mlp_teacher, digits, tmp_path):
    teacher = mlp_teacher
    ds = datasets.Dataset.from_dict({"pixel_values": digits[0][:64].numpy()}).with_format("torch")
    torch._dynamo.reset()
    _, losses = _run(teacher, ds, tmp_path / "c", "lsq", torch_compile=True, cache_teacher_outputs=True)
    _, eager = _run(teacher, ds, tmp_path / "e", "lsq")
    assert losses == pytest.approx(eager, rel=1e-3)
