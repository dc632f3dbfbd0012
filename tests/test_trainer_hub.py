"""SQAKDTrainer's own saving and sharing: model card, push_to_hub (packed form), timm-native save."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from hub_fixtures import local_hub  # noqa: F401  (pytest fixture)
from hub_server import LocalHub
from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, from_pretrained_timm, quantize_model
from test_hf_quantizer import FAMILIES, save_teacher


def _args(out: Path, **kw) -> SQAKDTrainingArguments:
    return SQAKDTrainingArguments(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, learning_rate=1e-3, **kw
    )


def test_trainer_push_to_hub_uploads_packed_model_and_card(local_hub: LocalHub, tmp_path: Path) -> None:
    family = FAMILIES["bert"]
    teacher_id = "testuser/bert-tiny-teacher"
    save_teacher(family, tmp_path / "teacher").push_to_hub(teacher_id)  # the checkpoint a user starts from
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_id)
    student = AutoModelForSequenceClassification.from_pretrained(
        teacher_id, quantization_config=QuantConfig(method="lsq", weight_bits=4, act_bits=4)
    )
    torch.manual_seed(0)
    ids = torch.randint(0, teacher.config.vocab_size, (16, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    repo = "testuser/bert-tiny-sqakd"
    trainer = SQAKDTrainer(model=student, teacher_model=teacher_id, train_dataset=data,
                           eval_dataset=data, args=_args(tmp_path / "out", hub_model_id=repo))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.push_to_hub()

    files = local_hub.repos[repo]
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == teacher_id and meta["base_model_relation"] == "quantized"
    assert "sqakd" in meta["tags"] and "4-bit" in meta["tags"]
    assert "import sqakd_hf" in card and f"{metrics['eval_teacher_agreement']:.4f}" in card
    assert f"| epochs | {round(trainer.state.epoch, 3)} |" in card  # the epochs trained, not num_train_epochs
    assert '"packed": true' in files["config.json"].decode()
    assert (tmp_path / "out" / "README.md").read_text() .startswith("---")  # card also written locally
    # what landed on the Hub loads back (packed form) and predicts like the trained student
    reloaded = AutoModelForSequenceClassification.from_pretrained(repo)
    student = trainer.model.eval()
    with torch.no_grad():
        a = student(input_ids=ids[:4]).logits
        b = reloaded(input_ids=ids[:4]).logits
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert ((a - b).norm() / a.norm()) < 2e-3  # fp16 head in the packed form


def test_trainer_saves_timm_native_students_in_timm_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet", num_classes=5).eval()
    student = timm.create_model("test_resnet", num_classes=5)
    student.load_state_dict(teacher.state_dict())
    quantize_model(student, QuantConfig(method="pact", weight_bits=4, act_bits=4))
    data = Dataset.from_dict({"pixel_values": torch.randn(16, 3, 32, 32).tolist()}).with_format("torch")
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, train_dataset=data, args=_args(tmp_path / "out"))
    trainer.train()
    trainer.save_model()
    loaded = from_pretrained_timm(tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    student.eval()
    with torch.no_grad():
        assert torch.equal(student(x), loaded.eval()(x))


def test_trainer_push_to_hub_in_deploy_formats(local_hub: LocalHub, tmp_path: Path) -> None:
    """format= passes through: the compressed-tensors folder (with the trainer's tokenizer) loads with plain
    transformers, the ONNX graph runs in onnxruntime, each reproducing the trained student."""
    import numpy as np
    import pytest

    pytest.importorskip("compressed_tensors")
    ort = pytest.importorskip("onnxruntime")
    from huggingface_hub import hf_hub_download
    from transformers import AutoTokenizer

    from cli_fixtures import save_bert_teacher

    teacher_dir = save_bert_teacher(tmp_path / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    student = AutoModelForSequenceClassification.from_pretrained(
        teacher_dir, quantization_config=QuantConfig(method="lsq", weight_bits=4, act_bits=8,
                                                     act_granularity="per_tensor"))
    sentences = ["the movie was great and fun", "awful boring plot", "a plain day", "fun"] * 4
    encoded = tokenizer(sentences, padding="max_length", max_length=12)
    data = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    trainer = SQAKDTrainer(model=student, teacher_model=str(teacher_dir), train_dataset=data,
                           processing_class=tokenizer, args=_args(tmp_path / "out", hub_model_id="testuser/ct"))
    trainer.train()
    batch = tokenizer(sentences[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = trainer.model.eval()(**batch).logits

    trainer.push_to_hub(format="compressed-tensors")
    files = local_hub.repos["testuser/ct"]
    assert "tokenizer_config.json" in files and "pip install transformers compressed-tensors" in files["README.md"].decode()
    loaded = AutoModelForSequenceClassification.from_pretrained("testuser/ct")
    assert type(loaded.hf_quantizer).__name__ == "CompressedTensorsHfQuantizer"
    with torch.no_grad():
        out = loaded.eval()(**batch).logits
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5

    trainer.args.hub_model_id = "testuser/onnx"
    trainer.push_to_hub(format="onnx")
    assert "InferenceSession" in local_hub.repos["testuser/onnx"]["README.md"].decode()
    session = ort.InferenceSession(hf_hub_download("testuser/onnx", "model.onnx"))
    feeds = tokenizer(sentences[:3], return_tensors="np", padding=True)
    out = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    assert float(np.abs(out - ref.numpy()).max() / ref.abs().max()) <= 1e-4
