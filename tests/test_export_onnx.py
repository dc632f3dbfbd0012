"""ONNX QDQ export: graphs whose QuantizeLinear / DequantizeLinear carry our learned scales, run in onnxruntime and
compared with the fake-quant student (a real digits CNN on held-out real digits; a tiny BERT classifier)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from sqakd_hf import QuantConfig, calibrate, export_onnx, quant_layers, quantize_model  # noqa: E402
from sqakd_hf.errors import InputError  # noqa: E402
from sqakd_hf.export.onnx import qdq_mode  # noqa: E402
from test_hf_quantizer import FAMILIES, load_student, logits, save_teacher  # noqa: E402

STATIC = {"act_granularity": "per_tensor"}


def _run(path: Path, inputs: dict) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def _ops(path: Path) -> dict:
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    return {op: ops.count(op) for op in set(ops)}


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (2, 8)])
def test_digits_cnn_agrees_in_onnxruntime(digits, digits_teacher, bits, tmp_path: Path):
    """Conv student (per-channel weights, unsigned activations after ReLU) on the 450 held-out real digits:
    top-1 agreement with the fake-quant student >= 99.5% (measured 100%), logits within 1e-4 of max|logit|."""
    x_tr, _, x_te, _ = digits
    student = quantize_model(copy.deepcopy(digits_teacher), QuantConfig(method="lsq", weight_bits=bits[0],
                                                                        act_bits=bits[1], **STATIC))
    calibrate(student, [x_tr[:256]])
    student.eval()
    with torch.no_grad():
        ref = student(x_te)
    export_onnx(student, tmp_path / "digits.onnx", x_tr[:2])
    out = _run(tmp_path / "digits.onnx", {"input": x_te})
    agreement = float((out.argmax(1) == ref.argmax(1).numpy()).mean())
    assert agreement >= 0.995, agreement
    err = np.abs(out - ref.numpy()).max(1) / float(ref.abs().max())  # per image
    assert float(np.median(err)) <= 1e-5 and float((err > 1e-4).mean()) <= 0.01, (np.median(err), err.max())
    ops = _ops(tmp_path / "digits.onnx")
    n_layers = len(list(quant_layers(student)))
    assert ops.get("DequantizeLinear", 0) >= 2 * n_layers and ops.get("Clip", 0) >= n_layers
    # weights are stored as int8 codes feeding DequantizeLinear (a quarter of the float bytes), not quantized at run time
    assert ops.get("QuantizeLinear", 0) == n_layers  # the activations' only
    graph = onnx.load(str(tmp_path / "digits.onnx")).graph
    codes = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(codes) == n_layers
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), student.state_dict().values()))


def test_bert_classifier_in_onnxruntime(tmp_path: Path):
    """Token inputs with dynamic batch and sequence; W4A8 with one layer's inputs on the unsigned grid."""
    family = FAMILIES["bert"]
    save_teacher(family, tmp_path / "teacher")
    student = load_student(family, tmp_path / "teacher", QuantConfig(method="lsq", weight_bits=4, act_bits=8,
                                                                    **STATIC)).eval()
    next(layer for _, layer in quant_layers(student)).input_quantizer.set_signed(False)
    batch = family.batch()
    ref = logits(student, batch)
    with qdq_mode(student):  # the swapped-in Q/DQ modules compute the student's function
        assert torch.equal(logits(student, batch), ref)
    assert torch.equal(logits(student, batch), ref)  # and the quantizers are back
    export_onnx(student, tmp_path / "bert.onnx", batch)
    out = _run(tmp_path / "bert.onnx", batch)
    assert float(np.abs(out - ref.numpy()).max() / ref.abs().max()) <= 1e-4
    longer = {k: torch.cat([v, v[:, :5]], dim=1)[:2] for k, v in batch.items()}  # other batch and sequence sizes
    out = _run(tmp_path / "bert.onnx", longer)
    ref = logits(student, longer)
    assert float(np.abs(out - ref.numpy()).max() / ref.abs().max()) <= 1e-4


def test_base_encoder_and_tokenizer_key_order(tmp_path: Path):
    """A bare encoder (``AutoModel``: its forward sets ``use_cache`` itself) exports, and inputs given in a
    tokenizer's key order (``input_ids, token_type_ids, attention_mask``, not forward's) keep their names."""
    from transformers import AutoModel

    family = FAMILIES["bert"]
    save_teacher(family, tmp_path / "teacher")
    student = AutoModel.from_pretrained(tmp_path / "teacher", quantization_config=QuantConfig(
        method="lsq", weight_bits=8, act_bits=8, **STATIC)).eval()
    ids = family.batch()["input_ids"]
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][0, -3:] = 0  # padding: a swapped mask / type-id input would change the output
    calibrate(student, [batch])
    export_onnx(student, tmp_path / "encoder.onnx", batch, output_names=["last_hidden_state"])
    with torch.no_grad():
        ref = student(**batch).last_hidden_state
    out = _run(tmp_path / "encoder.onnx", batch)
    # ORT's fused LayerNorm/GELU differ from torch by ~1e-4 of max|h| even in full precision (measured: mean 2.6e-5,
    # max 1.3e-4 with FP activations), and such differences can move an 8-bit activation code; a swapped
    # mask / type-id input would be off by O(1)
    assert float(np.abs(out - ref.numpy()).max() / ref.abs().max()) <= 1e-2
    assert float(np.abs(out - ref.numpy()).mean() / ref.abs().max()) <= 5e-4


def test_inexact_grids_are_refused(tmp_path: Path):
    family = FAMILIES["bert"]
    save_teacher(family, tmp_path / "teacher")
    student = load_student(family, tmp_path / "teacher", QuantConfig(method="lsq", weight_bits=4, act_bits=8))
    with pytest.raises(InputError, match="per token"):
        export_onnx(student, tmp_path / "out.onnx", family.batch())
    assert not any(tmp_path.glob("*.onnx*")) and not any(tmp_path.glob(".out.onnx*"))
