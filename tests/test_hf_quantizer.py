"""transformers integration: FP checkpoint -> student, save_pretrained / from_pretrained round trips,
Trainer acceptance, config conflicts. Tiny configs, random weights, CPU, offline."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.utils import logging as hf_logging

import sqakd_hf
from sqakd_hf import QuantConfig, SQAKDHfQuantizer, calibrate, quant_layers, named_quantizers
from sqakd_hf.modules import QuantConv1D

hf_logging.disable_progress_bar()


@dataclass
class Family:
    """A tiny model of one architecture family, the Auto class that loads it, and an input batch."""

    name: str
    build: Callable[[], torch.nn.Module]
    auto: type
    batch: Callable[[], Dict[str, torch.Tensor]]


def _bert():
    return BertForSequenceClassification(BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _vit():
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=64, num_labels=5))


def _timm_wrapper():
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=7))


def _tokens(vocab: int, with_mask: bool = False):
    def make():
        g = torch.Generator().manual_seed(1)
        batch = {"input_ids": torch.randint(0, vocab, (4, 12), generator=g)}
        if with_mask:
            batch["attention_mask"] = torch.ones(4, 12, dtype=torch.long)
        return batch
    return make


def _pixels():
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


FAMILIES = {
    "bert": Family("bert", _bert, AutoModelForSequenceClassification, _tokens(120, with_mask=True)),
    "gpt2": Family("gpt2", _gpt2, AutoModelForCausalLM, _tokens(100)),
    "llama": Family("llama", _llama, AutoModelForCausalLM, _tokens(100)),
    "vit": Family("vit", _vit, AutoModelForImageClassification, _pixels),
    "timm": Family("timm", _timm_wrapper, AutoModelForImageClassification, _pixels),
}
METHOD_OF = {"bert": "lsq", "gpt2": "pact", "llama": "ewgs", "vit": "dorefa", "timm": "lsq"}


def save_teacher(family: Family, directory: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = family.build().eval()
    teacher.save_pretrained(directory)
    return teacher


def load_student(family: Family, teacher_dir: Path, config: QuantConfig):
    """FP checkpoint -> quantized student, calibrated on one batch."""
    student, info = family.auto.from_pretrained(teacher_dir, quantization_config=config, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys, no errors
    calibrate(student, [family.batch()])
    return student


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def quantizer_state(model) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "_quantizer." in k}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_student_from_fp_checkpoint_and_training_form_round_trip(name: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    teacher = save_teacher(family, tmp_path / "teacher")
    config = QuantConfig(method=METHOD_OF[name], weight_bits=4, act_bits=4)
    student, info = family.auto.from_pretrained(tmp_path / "teacher", quantization_config=config,
                                                output_loading_info=True)
    assert not any(info.values()), info
    assert isinstance(student.hf_quantizer, SQAKDHfQuantizer) and not student.hf_quantizer.pre_quantized
    layers = dict(quant_layers(student))
    assert layers and student.sqakd_report.kept_fp  # first layer / head kept FP by default
    if name == "gpt2":
        assert all(isinstance(m, QuantConv1D) for m in layers.values())
    # FP weights loaded unchanged, weight quantizers initialised from them (not left uninitialised / random)
    teacher_state = teacher.state_dict()
    for layer_name, layer in layers.items():
        assert torch.equal(layer.weight, teacher_state[f"{layer_name}.weight"])
        wq = layer.weight_quantizer
        assert wq.initialized and all(torch.isfinite(p).all() for p in wq.parameters())
    # activation quantizers need data
    acts = [q for _, q in named_quantizers(student) if q.role == "act" and q.bits < 32]
    assert acts and not any(q.initialized for q in acts)
    with pytest.raises(RuntimeError, match="calibrate"):
        logits(student, family.batch())

    calibrate(student, [family.batch()])
    batch = family.batch()
    ref = logits(student, batch)
    student.save_pretrained(tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "sqakd" and saved["method"] == config.method and saved["packed"] is False
    with safe_open(str(tmp_path / "student" / "model.safetensors"), "pt") as f:
        n_saved = sum("_quantizer." in k for k in f.keys())
    assert n_saved == len(quantizer_state(student))  # every quantizer parameter and buffer is in the file

    loaded, info = family.auto.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.hf_quantizer.pre_quantized
    assert torch.equal(logits(loaded, batch), ref)  # bit-identical, no calibration
    want = quantizer_state(student)
    got = quantizer_state(loaded)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    for (n1, q1), (n2, q2) in zip(named_quantizers(student), named_quantizers(loaded)):
        assert (n1, q1.signed, q1.initialized) == (n2, q2.signed, q2.initialized)


def test_quantize_model_on_a_transformers_model_saves_and_loads(tmp_path: Path) -> None:
    """A student built with quantize_model (not from_pretrained) round-trips through save/from_pretrained."""
    family = FAMILIES["llama"]
    torch.manual_seed(0)
    student = sqakd_hf.quantize_model(family.build().eval(), QuantConfig(method="minmax", weight_bits=2, act_bits=8))
    calibrate(student, [family.batch()])
    student.save_pretrained(tmp_path / "student")
    loaded, info = family.auto.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(logits(loaded, family.batch()), logits(student, family.batch()))


def test_trainer_accepts_students(tmp_path: Path) -> None:
    """transformers' Trainer runs a step on a student built from FP and on a reloaded quantized checkpoint."""
    from datasets import Dataset

    family = FAMILIES["bert"]
    save_teacher(family, tmp_path / "teacher")
    student = load_student(family, tmp_path / "teacher", QuantConfig(method="lsq", weight_bits=4, act_bits=4))
    student.save_pretrained(tmp_path / "student")
    reloaded = family.auto.from_pretrained(tmp_path / "student")
    assert reloaded.hf_quantizer.is_trainable and reloaded.hf_quantizer.is_qat_trainable
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 120, (8, 12), generator=g).tolist(),
                              "labels": torch.randint(0, 3, (8,), generator=g).tolist()})
    for i, model in enumerate([student, reloaded]):
        before = {k: v.clone() for k, v in quantizer_state(model).items() if v.is_floating_point()}
        args = TrainingArguments(output_dir=str(tmp_path / f"run{i}"), max_steps=1, per_device_train_batch_size=8,
                                 learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                 disable_tqdm=True)
        result = Trainer(model=model, args=args, train_dataset=data).train()
        assert torch.isfinite(torch.tensor(result.training_loss))
        after = quantizer_state(model)
        assert any(not torch.equal(before[k], after[k]) for k in before)  # quantizer parameters were trained


def test_contradicting_quantization_config_is_an_error(tmp_path: Path) -> None:
    family = FAMILIES["bert"]
    save_teacher(family, tmp_path / "teacher")
    config = QuantConfig(method="lsq", weight_bits=4, act_bits=4)
    load_student(family, tmp_path / "teacher", config).save_pretrained(tmp_path / "student")
    expected = r"method: the checkpoint has 'lsq', you passed 'pact'; weight_bits: the checkpoint has 4, you passed 2"
    with pytest.raises(ValueError, match=expected):
        family.auto.from_pretrained(tmp_path / "student",
                                    quantization_config=QuantConfig(method="pact", weight_bits=2, act_bits=4))
    with warnings.catch_warnings():  # the same config again is accepted quietly
        warnings.simplefilter("error")
        family.auto.from_pretrained(tmp_path / "student", quantization_config=QuantConfig(**config.to_dict()))


def test_config_json_round_trips_and_registration() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoHfQuantizer

    assert AUTO_QUANTIZER_MAPPING["sqakd"] is SQAKDHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["sqakd"] is QuantConfig
    cfg = QuantConfig(method="ewgs", weight_bits=2, act_bits=3, layer_bits={"fc": 8}, modules_to_not_convert=["head"])
    again = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()
    quantizer = AutoHfQuantizer.from_config(cfg.to_dict(), pre_quantized=False)
    assert isinstance(quantizer, SQAKDHfQuantizer) and quantizer.is_serializable()
    assert sqakd_hf.integrations.hf_quantizer.SQAKDHfQuantizer is SQAKDHfQuantizer


def test_integration_uses_public_hooks_only() -> None:
    """No transformers internals in the integration; the one wrapped classmethod is documented there."""
    import inspect

    from sqakd_hf.integrations import hf_quantizer

    source = inspect.getsource(hf_quantizer)
    for name in ("_sqakd_original_merge", "conversion_mapping", "core_model_loading",
                 "_keys_to_ignore_on_load_missing", "AUTO_QUANTIZATION_CONFIG_MAPPING[",
                 "AUTO_QUANTIZER_MAPPING["):
        assert name not in source, name
    assert "Missing public hook" in inspect.getdoc(hf_quantizer._install_conflict_check)


def test_registering_twice_changes_nothing() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoHfQuantizer

    from sqakd_hf.integrations import hf_quantizer

    merge = AutoHfQuantizer.__dict__["merge_quantization_configs"]
    configs, quantizers = dict(AUTO_QUANTIZATION_CONFIG_MAPPING), dict(AUTO_QUANTIZER_MAPPING)
    hf_quantizer.register()
    hf_quantizer.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING == configs and AUTO_QUANTIZER_MAPPING == quantizers
    assert AUTO_QUANTIZER_MAPPING["sqakd"] is SQAKDHfQuantizer and AUTO_QUANTIZATION_CONFIG_MAPPING["sqakd"] is QuantConfig
    assert AutoHfQuantizer.__dict__["merge_quantization_configs"] is merge  # wrapped once, not again


def test_other_quant_methods_merge_as_transformers_does() -> None:
    """The conflict check handles sqakd checkpoints only: other methods get transformers' own merge
    (keep the checkpoint's config, warn about the passed one)."""
    from transformers import QuantoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    merge = AutoHfQuantizer.merge_quantization_configs
    assert merge.__func__.__wrapped__.__module__ == "transformers.quantizers.auto"
    with pytest.warns(UserWarning, match="The `quantization_config` from the model will be used"):
        out = merge(QuantoConfig(weights="int4").to_dict(), QuantoConfig(weights="int8"))
    assert isinstance(out, QuantoConfig) and out.weights == "int4"
    with pytest.raises(ValueError, match="you passed a QuantoConfig; drop the quantization_config argument"):
        merge(QuantConfig().to_dict(), QuantoConfig())
