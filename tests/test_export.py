"""Packed form: round trips per family, file contents, size goals, atomic writes, clear errors."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sqakd_hf import QuantConfig, calibrate, from_pretrained_timm, pack_model, quant_layers, quantize_model, save_packed
from sqakd_hf.errors import SQAKDCheckpointError
from sqakd_hf.serialization.packed import PackedWeightQuantizer
from test_hf_quantizer import FAMILIES, METHOD_OF, load_student, logits, save_teacher

#: packed with fp_dtype=None: weights differ from the fake-quant weights by float rounding of
#: scale * (code - zero) only (about 1 ulp); logits within this fraction of max|logit|
EXACT_RTOL = 1e-5
#: default packing (FP output head stored as float16): logits within this fraction of max|logit|
FP16_HEAD_RTOL = 2e-3


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _keys(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()} | {"__metadata__": f.metadata()}


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory) -> dict:
    """A BERT teacher, its calibrated W4A4 student, and that student saved packed (fp32 kept)."""
    root = tmp_path_factory.mktemp("bert")
    family = FAMILIES["bert"]
    save_teacher(family, root / "teacher")
    student = load_student(family, root / "teacher", QuantConfig(method="lsq", weight_bits=4, act_bits=4))
    student.save_pretrained(root / "student")
    save_packed(student, root / "packed", fp_dtype=None)
    return {"root": root, "student": student, "family": family}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_packed_round_trip(name: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    save_teacher(family, tmp_path / "teacher")
    # init="paper": packing mechanics only. Packed weights differ from the fake-quant ones by ~1 ulp, so an
    # activation within float rounding of a grid boundary may round the other way after reloading; the finer
    # MSE-initialised steps put one such activation in this tiny random Llama's down_proj (0.2% of max|logit|)
    student = load_student(family, tmp_path / "teacher",
                           QuantConfig(method=METHOD_OF[name], weight_bits=3, act_bits=4, init="paper"))
    batch = family.batch()
    ref = logits(student, batch)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    save_packed(student, tmp_path / "exact", fp_dtype=None)
    save_packed(student, tmp_path / "packed")  # default: FP output head as float16
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the model is unchanged

    # file contents: codes + grids for quantized layers, no FP master weights / weight-quantizer state
    n_layers = sum(1 for _, m in quant_layers(student) if m.weight_quantizer.bits <= 8)
    entries = _keys(tmp_path / "exact" / "model.safetensors")
    meta = entries.pop("__metadata__")
    assert meta["sqakd_format"] == "packed" and len(json.loads(meta["sqakd_layers"])) == n_layers
    packed = [k for k in entries if k.endswith(".weight_packed")]
    assert len(packed) == n_layers and all(entries[k] == "U8" for k in packed)
    for k in packed:
        base = k[: -len("_packed")]
        assert f"{base}_scale" in entries and f"{base}_zero_point" in entries and entries[base] == "U8"  # empty guard
    assert not any("weight_quantizer." in k for k in entries)
    assert sum("input_quantizer." in k for k in entries) == sum("input_quantizer." in k for k in student.state_dict())
    cfg = json.loads((tmp_path / "exact" / "config.json").read_text())["quantization_config"]
    assert cfg["packed"] is True and cfg["method"] == METHOD_OF[name] and cfg["weight_bits"] == 3

    loaded, info = family.auto.from_pretrained(tmp_path / "exact", output_loading_info=True)
    assert not any(info.values()), info
    assert _rel_err(logits(loaded, batch), ref) <= EXACT_RTOL
    want = dict(quant_layers(student))
    for layer_name, layer in quant_layers(loaded):
        assert isinstance(layer.weight_quantizer, PackedWeightQuantizer)
        qw = want[layer_name].quantized_weight().detach()
        torch.testing.assert_close(layer.weight, qw, rtol=1e-6, atol=1e-9)
        assert torch.equal(layer.quantized_weight(), layer.weight)  # already on its grid
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(
        [(k, v) for k, v in student.state_dict().items() if "input_quantizer." in k],
        [(k, v) for k, v in loaded.state_dict().items() if "input_quantizer." in k]))

    default = family.auto.from_pretrained(tmp_path / "packed")
    out = logits(default, batch)
    assert _rel_err(out, ref) <= FP16_HEAD_RTOL and torch.equal(out.argmax(-1), ref.argmax(-1))

    # a packed model saves packed again (save_pretrained), with the same codes
    loaded.save_pretrained(tmp_path / "again")
    a, b = load_file(tmp_path / "exact" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k.endswith("_packed"))
    assert torch.equal(logits(family.auto.from_pretrained(tmp_path / "again"), batch), logits(loaded, batch))


def test_pack_model_api(bert_dirs) -> None:
    state, config = pack_model(bert_dirs["student"])
    assert config.packed and not bert_dirs["student"].sqakd_config.packed
    assert any(k.endswith(".weight_packed") for k in state) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["classifier.weight"].dtype == torch.float16  # FP output head, float16 by default
    state32, _ = pack_model(bert_dirs["student"], fp_dtype=None)
    assert state32["classifier.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="fp_dtype"):
        pack_model(bert_dirs["student"], fp_dtype="int8")
    fresh = quantize_model(FAMILIES["bert"].build(), QuantConfig())
    with pytest.raises(ValueError, match="calibrate"):
        pack_model(fresh)


def test_tied_quantized_layer_is_stored_unpacked(tmp_path: Path) -> None:
    family = FAMILIES["gpt2"]
    save_teacher(family, tmp_path / "teacher")
    student = load_student(family, tmp_path / "teacher", QuantConfig(weight_bits=4, act_bits=4,
                                                                     modules_to_not_convert=[]))
    assert student.lm_head.weight is student.transformer.wte.weight  # quantized lm_head tied to the embedding
    save_packed(student, tmp_path / "packed", fp_dtype=None)
    loaded, info = family.auto.from_pretrained(tmp_path / "packed", output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(logits(loaded, family.batch()), logits(student, family.batch()))


@pytest.mark.parametrize("bits, goal", [(4, 0.16), (2, 0.10)])
def test_resnet18_packed_size(bits: int, goal: float, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=1000).eval()
    save_file(teacher.state_dict(), str(tmp_path / "fp32.safetensors"))
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(method="lsq", weight_bits=bits, act_bits=bits))
    assert {e.name for e in student.sqakd_report.kept_fp} == {"conv1", "fc"}
    x = torch.randn(2, 3, 64, 64)
    calibrate(student, [x])
    save_packed(student, tmp_path / "packed")
    ratio = (tmp_path / "packed" / "model.safetensors").stat().st_size / (tmp_path / "fp32.safetensors").stat().st_size
    print(f"resnet18 W{bits}A{bits} packed / FP32 = {ratio:.4f} (goal <= {goal})")
    assert ratio <= goal
    loaded = from_pretrained_timm(tmp_path / "packed")
    with torch.no_grad():
        assert _rel_err(loaded(x), student(x)) <= FP16_HEAD_RTOL


# ---- errors -------------------------------------------------------------------------------------
def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite(path: Path, edit) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    edit(state, meta)
    save_file(state, str(path), metadata=meta)


def test_packed_bits_or_shapes_that_contradict_the_config(bert_dirs, tmp_path: Path) -> None:
    family, packed = bert_dirs["family"], bert_dirs["root"] / "packed"
    layer = "bert.encoder.layer.0.attention.self.query"

    bad_bits = _copy_dir(packed, tmp_path / "bits")
    cfg = json.loads((bad_bits / "config.json").read_text())
    cfg["quantization_config"]["weight_bits"] = 2
    (bad_bits / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SQAKDCheckpointError, match=r"packed with 4-bit codes but the config asks for 2 bits"):
        family.auto.from_pretrained(bad_bits)

    def truncate_codes(state, meta):
        state[f"{layer}.weight_packed"] = state[f"{layer}.weight_packed"][:-3].clone()
        meta.pop("sqakd_layers")
    short = _copy_dir(packed, tmp_path / "short")
    _rewrite(short / "model.safetensors", truncate_codes)
    with pytest.raises(SQAKDCheckpointError, match=rf"{layer}: 509 bytes of packed codes, but 4-bit codes of its "
                                                   r"weight of shape \(32, 32\) need 512 bytes"):
        family.auto.from_pretrained(short)

    def wrong_scales(state, meta):
        state[f"{layer}.weight_scale"] = torch.ones(5)
    scales = _copy_dir(packed, tmp_path / "scales")
    _rewrite(scales / "model.safetensors", wrong_scales)
    with pytest.raises(SQAKDCheckpointError, match=r"weight_scale has 5 values, expected 1 or 32"):
        family.auto.from_pretrained(scales)

    unpacked_cfg = _copy_dir(packed, tmp_path / "flag")
    cfg = json.loads((unpacked_cfg / "config.json").read_text())
    cfg["quantization_config"]["packed"] = False
    (unpacked_cfg / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SQAKDCheckpointError, match="holds packed weights but its quantization_config says packed=f"):
        family.auto.from_pretrained(unpacked_cfg)


@pytest.mark.parametrize("form", ["teacher", "student", "packed"])
def test_truncated_checkpoint_names_the_file(bert_dirs, form: str, tmp_path: Path) -> None:
    broken = _copy_dir(bert_dirs["root"] / form, tmp_path / form)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    kwargs = {"quantization_config": QuantConfig()} if form == "teacher" else {}
    with pytest.raises(SQAKDCheckpointError, match=rf"{weights}: it is corrupted or truncated .*force_download=True"):
        bert_dirs["family"].auto.from_pretrained(broken, **kwargs)


# ---- atomic writes ------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_failed_save_leaves_existing_checkpoint_untouched(bert_dirs, tmp_path: Path, monkeypatch) -> None:
    target = _copy_dir(bert_dirs["root"] / "packed", tmp_path / "out")
    before = _snapshot(target)
    student = bert_dirs["student"]

    def crash(self, directory, **kwargs):
        Path(directory, "model.safetensors").write_bytes(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(type(student), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_packed(student, target)
    with pytest.raises(OSError, match="disk full"):
        save_packed(student, tmp_path / "new")
    monkeypatch.undo()
    assert _snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder left, no half-made new checkpoint


def test_save_over_training_checkpoint_replaces_weights(bert_dirs, tmp_path: Path) -> None:
    student, family = bert_dirs["student"], bert_dirs["family"]
    target = tmp_path / "out"
    student.save_pretrained(target, max_shard_size="20KB")  # sharded training form
    (target / "notes.txt").write_text("keep me")
    assert (target / "model.safetensors.index.json").exists()
    save_packed(student, target, fp_dtype=None)
    names = sorted(os.listdir(target))
    assert names == ["config.json", "model.safetensors", "notes.txt"], names
    batch = family.batch()
    assert _rel_err(logits(family.auto.from_pretrained(target), batch), logits(student, batch)) <= EXACT_RTOL


def test_incomplete_packed_checkpoint(bert_dirs, tmp_path: Path) -> None:
    """A layer's grid missing, or a whole packed layer missing while the metadata lists it: clear errors
    before anything is loaded."""
    family, packed = bert_dirs["family"], bert_dirs["root"] / "packed"
    layer = "bert.encoder.layer.0.attention.self.query"

    def drop_zero_point(state, meta):
        del state[f"{layer}.weight_zero_point"]
    no_zero = _copy_dir(packed, tmp_path / "zero")
    _rewrite(no_zero / "model.safetensors", drop_zero_point)
    with pytest.raises(SQAKDCheckpointError, match=rf"is incomplete: layer {layer}: missing \['{layer}.weight_zero_p"):
        family.auto.from_pretrained(no_zero)

    def drop_layer(state, meta):
        for suffix in ("packed", "scale", "zero_point"):
            del state[f"{layer}.weight_{suffix}"]
    no_layer = _copy_dir(packed, tmp_path / "layer")
    _rewrite(no_layer / "model.safetensors", drop_layer)
    with pytest.raises(SQAKDCheckpointError, match=r"metadata lists 13 packed layers but it holds packed tensors for 12"):
        family.auto.from_pretrained(no_layer)
