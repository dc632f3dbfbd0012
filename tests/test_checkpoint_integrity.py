"""Checkpoints verify what they claim: config.json against the safetensors metadata and the tensors present,
NaN refused on save and in packed grids, timm model_args filtered, stale staging folders removed.

Real tiny models, real files in tmp_path, edited the way a user would (json edit of config.json,
safetensors rewrite without a tensor or with a NaN)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from sqakd_hf import QuantConfig, calibrate, from_pretrained_timm, quant_layers, quantize_model, save_packed
from sqakd_hf.checkpoint import save_quantized
from sqakd_hf.errors import SQAKDCheckpointError
from sqakd_hf.serialization import files
from sqakd_hf.serialization.manifest import QUANT_KEY, non_finite
from sqakd_hf.serialization.timm_layout import SAFE_MODEL_ARGS, save_pretrained_timm
from test_export import _copy_dir, _rewrite
from test_hf_quantizer import FAMILIES, load_student, logits, save_teacher

LAYER = "bert.encoder.layer.0.attention.self.query"
MIXED = "bert.encoder.layer.1.output.dense"
CONFIG = QuantConfig(method="lsq", weight_bits=4, act_bits=4, layer_bits={r"layer\.1\.output\.dense": 8})


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict:
    """A calibrated mixed-precision BERT student saved in the training form and the packed form."""
    root = tmp_path_factory.mktemp("integrity")
    family = FAMILIES["bert"]
    save_teacher(family, root / "teacher")
    student = load_student(family, root / "teacher", CONFIG)
    student.save_pretrained(root / "train")
    save_packed(student, root / "packed", fp_dtype=None)
    return {"root": root, "student": student, "family": family}


def _timm_student(config: QuantConfig = QuantConfig(method="ewgs", weight_bits=3, act_bits=3)) -> torch.nn.Module:
    torch.manual_seed(0)
    model = quantize_model(timm.create_model("test_resnet", num_classes=7).eval(), config)
    return calibrate(model, [torch.randn(4, 3, 32, 32)])


def _edit_config(folder: Path, **fields) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _drop(*keys: str):
    def edit(state, meta):
        for k in keys:
            del state[k]
    return edit


def _strip_record(state, meta) -> None:
    meta.pop(QUANT_KEY)


# ---- the record -------------------------------------------------------------------------------
def test_both_forms_record_their_quantization(bert) -> None:
    root = bert["root"]
    n = len(dict(quant_layers(bert["student"])))
    for form, packed in (("train", False), ("packed", True)):
        record = json.loads(_metadata(root / form / "model.safetensors")[QUANT_KEY])
        assert {k: record[k] for k in ("method", "weight_bits", "act_bits", "weight_granularity", "packed")} == {
            "method": "lsq", "weight_bits": 4, "act_bits": 4, "weight_granularity": "per_channel", "packed": packed}
        assert len(record["layers"]) == n and LAYER in record["layers"]
        assert record["layer_bits"] == {MIXED: {"weight_bits": 8, "act_bits": 8}}  # only layers that differ
    save_pretrained_timm(_timm_student(), root / "timm")
    record = json.loads(_metadata(root / "timm" / "model.safetensors")[QUANT_KEY])
    assert record["method"] == "ewgs" and record["weight_bits"] == 3 and record["layers"]


# ---- config.json edited ---------------------------------------------------------------------------
@pytest.mark.parametrize("form, field, value, message", [
    ("train", "weight_bits", 2, r"quantization_config.weight_bits is 2 but the weights were saved with weight_bits=4"),
    ("train", "method", "pact", r"quantization_config.method is \"pact\" but the weights were saved with "
                                r"method=\"lsq\""),
    ("packed", "act_bits", 2, r"quantization_config.act_bits is 2 but the weights were saved with act_bits=4"),
    ("packed", "method", "ewgs", r"quantization_config.method is \"ewgs\""),
    ("train", "packed", True, r"quantization_config.packed is true but the weights were saved with packed=false"),
    ("train", "act_granularity", "per_tensor", r"quantization_config.act_granularity is \"per_tensor\" but the weights "
                                               r"were saved with act_granularity=\"per_token\""),
    ("packed", "act_granularity", "per_tensor", r"quantization_config.act_granularity is \"per_tensor\""),
])
def test_edited_config_is_refused_by_transformers(bert, form, field, value, message, tmp_path: Path) -> None:
    folder = _edit_config(_copy_dir(bert["root"] / form, tmp_path / form), **{field: value})
    with pytest.raises(SQAKDCheckpointError, match=message + r".*Fix: set quantization_config\." + field):
        bert["family"].auto.from_pretrained(folder)


def test_edited_layer_choice_is_refused(bert, tmp_path: Path) -> None:
    layer_bits = _edit_config(_copy_dir(bert["root"] / "train", tmp_path / "bits"), layer_bits={})
    with pytest.raises(SQAKDCheckpointError, match=rf"layer {MIXED} gets weight_bits=4 from config.json but was "
                                                   r"saved with weight_bits=8"):
        bert["family"].auto.from_pretrained(layer_bits)
    fp = _edit_config(_copy_dir(bert["root"] / "packed", tmp_path / "fp"),
                      modules_to_not_convert=["pooler", "classifier", r"layer\.0\.attention\.self\.query"])
    with pytest.raises(SQAKDCheckpointError, match="holds packed weights for|were quantized when saved"):
        bert["family"].auto.from_pretrained(fp)


@pytest.mark.parametrize("form", ["train", "packed"])
def test_edited_timm_config_is_refused(form: str, tmp_path: Path) -> None:
    from transformers import AutoModelForImageClassification

    folder = tmp_path / form
    save_pretrained_timm(_timm_student(), folder, packed=form == "packed")
    _edit_config(folder, act_bits=2) if form == "packed" else _edit_config(folder, weight_bits=2)
    field = "act_bits" if form == "packed" else "weight_bits"
    with pytest.raises(SQAKDCheckpointError, match=rf"quantization_config.{field} is 2 but the weights were saved "
                                                   rf"with {field}=3"):
        from_pretrained_timm(folder)
    with pytest.raises(SQAKDCheckpointError, match=rf"quantization_config.{field} is 2"):
        AutoModelForImageClassification.from_pretrained(folder)


# ---- tensors removed ------------------------------------------------------------------------------
@pytest.mark.parametrize("form, key", [
    ("train", f"{LAYER}.weight"),
    ("train", f"{LAYER}.weight_quantizer.scale"),
    ("train", f"{LAYER}.input_quantizer.scale"),
    ("packed", f"{LAYER}.input_quantizer.initialized_flag"),
])
def test_missing_tensor_is_refused_by_transformers(bert, form: str, key: str, tmp_path: Path) -> None:
    folder = _copy_dir(bert["root"] / form, tmp_path / form)
    _rewrite(folder / "model.safetensors", _drop(key))
    with pytest.raises(SQAKDCheckpointError, match=rf"is incomplete: quantized layer {LAYER} has no \['{key}'\] in its "
                                                   r"weight files; .*randomly initialised"):
        bert["family"].auto.from_pretrained(folder)


def test_missing_packed_codes_are_refused(bert, tmp_path: Path) -> None:
    folder = _copy_dir(bert["root"] / "packed", tmp_path / "codes")
    _rewrite(folder / "model.safetensors", _drop(f"{LAYER}.weight_packed"))
    with pytest.raises(SQAKDCheckpointError, match=rf"incomplete: layer {LAYER}: missing \['{LAYER}.weight_packed'\]"):
        bert["family"].auto.from_pretrained(folder)


def test_missing_tensor_under_renamed_keys(tmp_path: Path) -> None:
    """ViT: transformers renames the file's keys when loading; a layer's weight removed is still found."""
    family = FAMILIES["vit"]
    save_teacher(family, tmp_path / "teacher")
    student = load_student(family, tmp_path / "teacher", QuantConfig(method="dorefa", weight_bits=4, act_bits=4))
    student.save_pretrained(tmp_path / "train")
    key = "vit.encoder.layer.0.attention.attention.query.weight"
    with safe_open(str(tmp_path / "train" / "model.safetensors"), "pt") as f:
        assert key in f.keys()
    _rewrite(tmp_path / "train" / "model.safetensors", _drop(key))
    with pytest.raises(SQAKDCheckpointError, match=rf"incomplete: quantized layer {key[:-7]} \(as the file names "
                                                   rf"it\) has no \['{key}'\]"):
        family.auto.from_pretrained(tmp_path / "train")


def test_legacy_checkpoint_without_record(bert, tmp_path: Path, caplog) -> None:
    """Checkpoints saved before the record existed still load (no cross-check), the tensors still checked."""
    family, batch = bert["family"], bert["family"].batch()
    for form in ("train", "packed"):
        folder = _copy_dir(bert["root"] / form, tmp_path / form)
        _rewrite(folder / "model.safetensors", _strip_record)
        with caplog.at_level(logging.INFO, logger="sqakd_hf.serialization.manifest"):
            loaded, info = family.auto.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values()), info
        assert "records no quantization metadata" in caplog.text
        torch.testing.assert_close(logits(loaded, batch), logits(bert["student"], batch), rtol=1e-4, atol=1e-5)
    method = _edit_config(tmp_path / "train", method="pact")  # legacy + method edited: its tensors do not fit
    with pytest.raises(SQAKDCheckpointError, match=r"has no \[.*_quantizer.*If config.json was edited"):
        family.auto.from_pretrained(method)

    save_pretrained_timm(_timm_student(), tmp_path / "timm")
    _rewrite(tmp_path / "timm" / "model.safetensors", _strip_record)
    assert from_pretrained_timm(tmp_path / "timm") is not None


# ---- checkpoints written before per-tensor quantizer tensors became 1-element 1-D ----------------------
def _scalars_0d(state, meta) -> None:
    """The file as older versions wrote it: per-tensor quantizer parameters 0-dim."""
    n = 0
    for k, v in list(state.items()):
        if "_quantizer." in k and tuple(v.shape) == (1,):
            state[k], n = v.reshape(()), n + 1
    assert n  # the edit reached something


def _no_scalar_parameters(model: torch.nn.Module) -> None:
    assert [n for n, p in model.named_parameters() if p.dim() == 0] == []
    assert all(q.scale.shape == (1,) for _, layer in quant_layers(model) for q in [layer.input_quantizer]
               if hasattr(q, "scale") and isinstance(q.scale, torch.nn.Parameter))


def test_checkpoint_with_0dim_quantizer_tensors_loads(bert, tmp_path: Path) -> None:
    """Training and packed forms holding 0-dim per-tensor quantizer tensors load through transformers to the same
    function, with nothing missing or mismatched, the parameters back at shape (1,)."""
    family, batch = bert["family"], bert["family"].batch()
    for form in ("train", "packed"):
        folder = _copy_dir(bert["root"] / form, tmp_path / form)
        _rewrite(folder / "model.safetensors", _scalars_0d)
        loaded, info = family.auto.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values()), info
        _no_scalar_parameters(loaded)
        assert loaded.get_submodule(LAYER).input_quantizer.scale.requires_grad
        torch.testing.assert_close(logits(loaded, batch), logits(bert["student"], batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lsq", "pact", "ewgs", "dorefa"])  # minmax: no per-tensor tensor learned or stored
def test_state_dict_with_0dim_quantizer_tensors_loads(method: str, tmp_path: Path) -> None:
    """Per-tensor weights and activations: load_state_dict (strict) and the timm layout take 0-dim tensors."""
    config = QuantConfig(method=method, weight_bits=3, act_bits=4, weight_granularity="per_tensor",
                         act_granularity="per_tensor")
    student, x = _timm_student(config), torch.randn(2, 3, 32, 32)
    old = {k: v.reshape(()) if "_quantizer." in k and tuple(v.shape) == (1,) else v
           for k, v in student.state_dict().items()}
    fresh = quantize_model(timm.create_model("test_resnet", num_classes=7).eval(), config)
    fresh.load_state_dict(old, strict=True)
    _no_scalar_parameters(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), student(x), rtol=0, atol=0)
    save_pretrained_timm(student, tmp_path / "timm")
    _rewrite(tmp_path / "timm" / "model.safetensors", _scalars_0d)
    loaded = from_pretrained_timm(tmp_path / "timm")
    _no_scalar_parameters(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x), rtol=0, atol=0)


def test_record_without_act_granularity_loads(bert, tmp_path: Path) -> None:
    """A record written before act_granularity was recorded is not checked on it."""
    def drop_field(state, meta) -> None:
        record = json.loads(meta[QUANT_KEY])
        del record["act_granularity"]
        meta[QUANT_KEY] = json.dumps(record)

    folder = _copy_dir(bert["root"] / "train", tmp_path / "train")
    _rewrite(folder / "model.safetensors", drop_field)
    loaded = bert["family"].auto.from_pretrained(folder)
    batch = bert["family"].batch()
    torch.testing.assert_close(logits(loaded, batch), logits(bert["student"], batch), rtol=1e-4, atol=1e-5)


# ---- finiteness -------------------------------------------------------------------------------------
def _poison(path: Path, key: str) -> None:
    def edit(state, meta):
        t = state[key].clone()
        t.view(-1)[0] = float("nan")
        state[key] = t
    _rewrite(path, edit)


def test_nan_packed_grid_is_refused(bert, tmp_path: Path) -> None:
    folder = _copy_dir(bert["root"] / "packed", tmp_path / "nan")
    _poison(folder / "model.safetensors", f"{LAYER}.weight_scale")
    with pytest.raises(SQAKDCheckpointError, match=rf"is damaged: layer {LAYER}: weight_scale holds NaN or infinite"):
        bert["family"].auto.from_pretrained(folder)

    save_pretrained_timm(_timm_student(), tmp_path / "timm", packed=True)
    layer = next(n for n, _ in quant_layers(_timm_student()))
    _poison(tmp_path / "timm" / "model.safetensors", f"{layer}.weight_zero_point")
    with pytest.raises(SQAKDCheckpointError, match=rf"layer {layer}: weight_zero_point holds NaN or infinite"):
        from_pretrained_timm(tmp_path / "timm")


@pytest.mark.parametrize("what", ["weight", "bias", "quantizer"])
def test_non_finite_model_is_not_saved(bert, what: str, tmp_path: Path) -> None:
    student = bert["student"]
    layer = student.get_submodule(LAYER)
    tensor = {"weight": layer.weight, "bias": layer.bias, "quantizer": layer.input_quantizer.scale}[what]
    name = {"weight": f"{LAYER}.weight", "bias": f"{LAYER}.bias", "quantizer": f"{LAYER}.input_quantizer.scale"}[what]
    saved = tensor.detach().clone()
    with torch.no_grad():
        tensor.view(-1)[0] = float("inf") if what == "bias" else float("nan")
    try:
        for save in (lambda d: save_packed(student, d), lambda d: save_quantized(student, d),
                     lambda d: student.save_pretrained(d)):
            with pytest.raises(ValueError, match=rf"refusing to save .*hold NaN or infinite values: \['{name}'\]"):
                save(tmp_path / "out")
            assert not (tmp_path / "out" / "model.safetensors").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name != "out"] == []  # no staging folder left
    finally:
        with torch.no_grad():
            tensor.copy_(saved)

    model = _timm_student()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\['fc.weight'\]"):
        save_pretrained_timm(model, tmp_path / "timm")
    assert not (tmp_path / "timm").exists()


def test_non_finite_finds_every_bad_tensor() -> None:
    tensors = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")], dtype=torch.float16),
               "c": torch.full((2, 2), float("-inf"), dtype=torch.bfloat16), "d": torch.zeros(0),
               "e": torch.ones(2, dtype=torch.int64), "f": torch.full((5,), 6e4, dtype=torch.float16)}
    assert non_finite(tensors) == ["b", "c"]


# ---- timm model_args -----------------------------------------------------------------------------
def test_timm_model_args_are_filtered(tmp_path: Path, caplog, monkeypatch) -> None:
    folder = tmp_path / "q"
    save_pretrained_timm(_timm_student(), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"] = {"drop_rate": 0.25, "checkpoint_path": "/etc/passwd",
                         "pretrained_cfg_overlay": {"file": "/etc/passwd"}, "pretrained": True,
                         "global_pool": {"not": "plain"}}
    cfg["pretrained_cfg"]["file"] = "/etc/passwd"
    (folder / "config.json").write_text(json.dumps(cfg))
    seen = {}
    create = timm.create_model

    def spy(name, **kwargs):
        seen.update(kwargs)
        return create(name, **kwargs)
    monkeypatch.setattr(timm, "create_model", spy)
    with caplog.at_level(logging.WARNING, logger="sqakd_hf.serialization.timm_layout"):
        model = from_pretrained_timm(folder)
    assert seen["drop_rate"] == 0.25 and seen["pretrained"] is False
    assert not {"checkpoint_path", "pretrained_cfg_overlay", "global_pool"} & (set(seen) - {"pretrained_cfg_overlay"})
    assert "file" not in (seen["pretrained_cfg_overlay"] or {}) and model.pretrained_cfg.get("file") in (None, "")
    assert "['checkpoint_path', 'global_pool', 'pretrained', 'pretrained_cfg_overlay']" in caplog.text
    assert "drop_rate" in SAFE_MODEL_ARGS and "checkpoint_path" not in SAFE_MODEL_ARGS


# ---- stale staging folders -----------------------------------------------------------------------
def test_stale_staging_folders_are_removed(bert, tmp_path: Path) -> None:
    target = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = files._host_tag()

    def staging(owner: str) -> Path:
        path = tmp_path / f".out.sqakd-tmp-{owner}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
        return path

    killed = staging(f"{dead.pid}-{host}-abc")
    running = staging(f"{os.getppid()}-{host}-def")  # a live process: a save in progress
    ours = staging(f"{os.getpid()}-{host}-ghi")  # this process (another thread's save)
    old_legacy, new_legacy = staging("x1y2z3"), staging("q9w8e7")
    long_ago = time.time() - 2 * files.STALE_STAGING_AGE_S
    os.utime(old_legacy, (long_ago, long_ago))
    other = tmp_path / ".other.sqakd-tmp-1-00000000-x"  # another target's folder
    other.mkdir()
    save_packed(bert["student"], target)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out", running.name, ours.name, new_legacy.name, other.name}, left
    assert not killed.exists() and not old_legacy.exists()
