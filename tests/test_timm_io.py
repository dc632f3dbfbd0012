"""timm-native save/load (no transformers classes), and interop with transformers' timm wrapper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

from sqakd_hf import (
    QuantConfig,
    calibrate,
    from_pretrained_timm,
    quant_layers,
    quantize_model,
    named_quantizers,
    save_packed,
    save_pretrained_timm,
)
from sqakd_hf.errors import SQAKDCheckpointError
from sqakd_hf.serialization.packed import PackedWeightQuantizer
from test_export import EXACT_RTOL, FP16_HEAD_RTOL, _rel_err

CONFIG = QuantConfig(method="ewgs", weight_bits=3, act_bits=3)


def _student(seed: int = 0, config: QuantConfig = CONFIG) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = quantize_model(timm.create_model("test_resnet", num_classes=7).eval(), config)
    return calibrate(model, [torch.randn(4, 3, 32, 32)])


def _run(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_training_form_round_trip(tmp_path: Path) -> None:
    student = _student()
    save_pretrained_timm(student, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == 7 and "pretrained_cfg" in cfg
    assert cfg["quantization_config"]["method"] == "ewgs" and cfg["quantization_config"]["packed"] is False
    loaded = from_pretrained_timm(tmp_path / "q")
    assert type(loaded) is type(student) and not loaded.training
    assert torch.equal(_run(loaded, X), _run(student, X))
    assert student.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), loaded.state_dict().values()))
    for (_, a), (_, b) in zip(named_quantizers(student), named_quantizers(loaded)):
        assert (a.signed, a.initialized) == (b.signed, b.initialized)


def test_packed_round_trip_and_transformers_reads_the_same_folder(tmp_path: Path) -> None:
    student = _student()
    ref = _run(student, X)
    save_pretrained_timm(student, tmp_path / "p", packed=True, fp_dtype=None)
    save_packed(student, tmp_path / "p16")  # timm model -> timm layout, FP head as float16
    loaded = from_pretrained_timm(tmp_path / "p")
    assert all(isinstance(m.weight_quantizer, PackedWeightQuantizer) for _, m in quant_layers(loaded))
    assert _rel_err(_run(loaded, X), ref) <= EXACT_RTOL
    assert _rel_err(_run(from_pretrained_timm(tmp_path / "p16"), X), ref) <= FP16_HEAD_RTOL

    # transformers loads both timm-layout folders as TimmWrapperForImageClassification
    save_pretrained_timm(student, tmp_path / "q")
    wrapped, info = AutoModelForImageClassification.from_pretrained(tmp_path / "q", output_loading_info=True)
    assert isinstance(wrapped, TimmWrapperForImageClassification) and not any(info.values()), info
    assert torch.equal(_run(wrapped, X), ref)
    wrapped, info = AutoModelForImageClassification.from_pretrained(tmp_path / "p", output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(_run(wrapped, X), _run(loaded, X))


def test_reads_folders_written_by_transformers(tmp_path: Path) -> None:
    """Keys without ``timm_model.`` (wrapper loaded by from_pretrained) and with it (wrapper built directly)."""
    torch.manual_seed(0)
    wrapper = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=7)).eval()
    wrapper.save_pretrained(tmp_path / "teacher")
    student = AutoModelForImageClassification.from_pretrained(tmp_path / "teacher", quantization_config=CONFIG)
    calibrate(student, [{"pixel_values": torch.randn(4, 3, 32, 32)}])
    ref = _run(student, X)
    student.save_pretrained(tmp_path / "hf_train")
    save_packed(student, tmp_path / "hf_packed", fp_dtype=None)
    assert torch.equal(_run(from_pretrained_timm(tmp_path / "hf_train"), X), ref)
    assert _rel_err(_run(from_pretrained_timm(tmp_path / "hf_packed"), X), ref) <= EXACT_RTOL

    direct = quantize_model(TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet",
                                                                                num_labels=7)).eval(), CONFIG)
    calibrate(direct, [{"pixel_values": torch.randn(4, 3, 32, 32)}])
    direct.save_pretrained(tmp_path / "prefixed")
    assert torch.equal(_run(from_pretrained_timm(tmp_path / "prefixed"), X), _run(direct, X))


def test_full_precision_timm_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet", num_classes=7).eval()
    from timm.models._hub import save_for_hf

    save_for_hf(teacher, str(tmp_path / "fp"), safe_serialization=True)
    with pytest.raises(ValueError, match="full-precision checkpoint .* pass quantization_config"):
        from_pretrained_timm(tmp_path / "fp")
    student = from_pretrained_timm(tmp_path / "fp", quantization_config=CONFIG)
    teacher_state = teacher.state_dict()
    for name, layer in quant_layers(student):
        assert torch.equal(layer.weight, teacher_state[f"{name}.weight"]) and layer.weight_quantizer.initialized
        assert not layer.input_quantizer.initialized  # activations need calibration data
    calibrate(student, [torch.randn(4, 3, 32, 32)])
    assert torch.isfinite(_run(student, X)).all()


def test_errors(tmp_path: Path) -> None:
    student = _student()
    save_pretrained_timm(student, tmp_path / "q")
    with pytest.raises(ValueError, match=r"weight_bits: .* has 3, you passed 4"):
        from_pretrained_timm(tmp_path / "q", quantization_config=QuantConfig(method="ewgs", weight_bits=4, act_bits=3))
    from_pretrained_timm(tmp_path / "q", quantization_config=CONFIG)  # agreeing config is fine

    weights = tmp_path / "q" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SQAKDCheckpointError, match=rf"{weights}: it is corrupted or truncated"):
        from_pretrained_timm(tmp_path / "q")

    save_pretrained_timm(student, tmp_path / "p", packed=True)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    cfg["quantization_config"]["weight_bits"] = 4
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SQAKDCheckpointError, match="packed with 3-bit codes but the config asks for 4 bits"):
        from_pretrained_timm(tmp_path / "p")

    other = tmp_path / "other"
    save_pretrained_timm(student, other)
    save_file({"unexpected": torch.zeros(1)}, str(other / "model.safetensors"))
    with pytest.raises(SQAKDCheckpointError, match="does not match the model built from its config.json"):
        from_pretrained_timm(other)
    with pytest.raises(FileNotFoundError):
        from_pretrained_timm(tmp_path / "does" / "not" / "exist")
