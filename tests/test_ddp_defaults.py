"""DDP's ``find_unused_parameters`` is chosen from what the student actually uses: False when every trainable
parameter gets a gradient (no per-step graph search, no warning), True when some do not (e.g. a pooler when the
last hidden state is distilled). Real tiny BERT and timm students; the quantizers need no calibration. SQAKDTrainer
applies it before DDP wraps the student (2-process runs in tests/test_trainer_ddp.py and tests/test_cli.py print no
warning)."""

from __future__ import annotations

import pytest
import torch

from cli_fixtures import save_bert_teacher, save_timm_teacher, tiny_bert_tokenizer
from sqakd_hf import QuantConfig, quantize_model
from sqakd_hf.training.ddp import unused_parameters


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_bert_teacher(tmp_path_factory.mktemp("bert") / "t")


def _text_batch():
    return dict(tiny_bert_tokenizer()(["the movie was great", "awful plot"], padding=True, return_tensors="pt"))


def test_classifier_uses_every_parameter(bert_dir):
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(bert_dir, quantization_config=QuantConfig(
        method="lsq", weight_bits=4, act_bits=4))
    student.requires_grad_(True).train()
    assert unused_parameters(student, {**_text_batch(), "labels": torch.tensor([1, 0])}) == []
    # the probe leaves the student as it was: quantizers active, not calibrated by it, train mode kept
    assert student.training and not any(q.bypass for q in student.modules() if hasattr(q, "bypass"))


def test_hidden_state_target_leaves_the_pooler_unused(bert_dir):
    from transformers import AutoModel

    student = AutoModel.from_pretrained(bert_dir, quantization_config=QuantConfig(method="lsq", weight_bits=4,
                                                                                 act_bits=4))
    student.requires_grad_(True)
    unused = unused_parameters(student, _text_batch(), "hidden_states")
    assert unused and all(name.startswith("pooler.") for name in unused)
    quantizer_params = [n for n, _ in student.named_parameters() if n.startswith("pooler.") and "_quantizer." in n]
    assert "pooler.dense.weight" in unused and set(quantizer_params) <= set(unused)
    assert unused_parameters(student, _text_batch(), "hidden_states") == unused  # deterministic
    student.pooler.dense.weight.requires_grad_(False)  # frozen parameters are not DDP's concern
    assert "pooler.dense.weight" not in unused_parameters(student, _text_batch(), "hidden_states")


def test_timm_student_uses_every_parameter(tmp_path):
    import timm

    from sqakd_hf.app.data import image_collator

    path = save_timm_teacher(tmp_path / "timm")
    student = quantize_model(timm.create_model(f"local-dir:{path}", pretrained=True), QuantConfig(weight_bits=2,
                                                                                                act_bits=2))
    data = [{"pixel_values": torch.randn(3, 32, 32)} for _ in range(3)]
    assert unused_parameters(student, image_collator(data[:2])) == []
