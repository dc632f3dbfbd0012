"""ONNX QDQ export: graphs whose QuantizeLinear / DequantizeLinear carry our learned scales, run in onnxruntime and
compared with the fake-quant student (a real digits CNN on held-out real digits; a tiny BERT classifier)."""

from __future__ import annotations

import copy
import json
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
    # a few images differ by about one activation step: onnxruntime computes the BatchNorm the exporter folds into
    # the conv with other float rounding, so values at a rounding boundary can land on the next code (W8A8: 0.4% of
    # images with the mean-only bias correction, 1.8% with the affine one; max 1.1e-3 of max|logit|)
    assert float(np.median(err)) <= 1e-5 and float((err > 1e-4).mean()) <= 0.03, (np.median(err), err.max())
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
    with pytest.raises(InputError, match="learned clip ratio.*act_granularity='per_token_absmax'"):
        export_onnx(student, tmp_path / "out.onnx", family.batch())
    assert not any(tmp_path.glob("*.onnx*")) and not any(tmp_path.glob(".out.onnx*"))


def _session(path: Path, **options) -> "ort.InferenceSession":
    """onnxruntime session with the session config the exporter recorded in the file's metadata."""
    so = ort.SessionOptions()
    for key, value in json.loads(onnx.load(str(path)).metadata_props[0].value).items():
        so.add_session_config_entry(key, value)
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method, table_bits", [("lsq", 8), ("ewgs", 6)])  # EWGS's 8-bit grid needs 9-bit codes
@pytest.mark.filterwarnings("error::RuntimeWarning")  # an all-zero table row (step 0) must not cast NaN codes
def test_dynamic_token_activations_and_int8_tables(method: str, table_bits: int, tmp_path: Path):
    """act_granularity='per_token_absmax' exports as the student's exact float ops (no integer graph) and 8-bit
    embedding tables as int8 codes + per-row DequantizeLinear before the Gather: onnxruntime reproduces the student
    (padded batch, other batch / sequence sizes) with the session config recorded in the file (without it,
    onnxruntime's MatMulNBits re-quantizes the float inputs to int8: measured 4e-3 of max|logit| on a random BERT)."""
    family = FAMILIES["bert"]
    save_teacher(family, tmp_path / "teacher")
    config = QuantConfig(method=method, weight_bits=4, act_bits=8, act_granularity="per_token_absmax",
                         embedding_bits=table_bits)
    student = load_student(family, tmp_path / "teacher", config).eval()
    batch = family.batch()
    ref = logits(student, batch)
    with qdq_mode(student):
        assert torch.equal(logits(student, batch), ref)
    export_onnx(student, tmp_path / "tok.onnx", {k: v[:1] for k, v in batch.items()})
    longer = {k: torch.cat([v, v[:, :5]], dim=1)[:3] for k, v in batch.items()}
    levels = ort.GraphOptimizationLevel
    for inputs in (batch, longer):
        expected = logits(student, inputs).numpy()
        for level in (levels.ORT_DISABLE_ALL, levels.ORT_ENABLE_ALL):
            out = _session(tmp_path / "tok.onnx", graph_optimization_level=level).run(
                None, {k: v.numpy() for k, v in inputs.items()})[0]
            assert float(np.abs(out - expected).max() / np.abs(expected).max()) <= 1e-5, level
    ops = _ops(tmp_path / "tok.onnx")
    n_linear = sum(1 for _, layer in quant_layers(student) if isinstance(layer, torch.nn.Linear))
    # one ReduceMax / Round per distinct quantized input (q/k/v read one tensor: 4 per BERT layer, and the pooler's),
    # no activation Q/DQ pair
    distinct = 4 * student.config.num_hidden_layers + 1
    assert ops.get("Round", 0) == ops.get("ReduceMax", 0) == distinct < n_linear and "QuantizeLinear" not in ops
    graph = onnx.load(str(tmp_path / "tok.onnx")).graph
    tables = {n: m.weight.shape for n, m in student.named_modules() if isinstance(m, torch.nn.Embedding)}
    floats = [tuple(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    codes = [tuple(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert all(tuple(shape) in codes and tuple(shape) not in floats for shape in tables.values()), (tables, floats)
    producer = {out: n for n in graph.node for out in n.output}

    def source(name: str) -> str:  # through Identity / Cast
        node = producer.get(name)
        return source(node.input[0]) if node is not None and node.op_type in ("Identity", "Cast") else name

    from_dq = [n for n in graph.node if n.op_type == "Gather" and source(n.input[0]) in producer
               and producer[source(n.input[0])].op_type == "DequantizeLinear"]
    assert len(from_dq) == len(tables)


def test_every_quantized_linear_is_an_integer_matmul(tmp_path: Path):
    """In onnxruntime's optimized graph of a W8A8 BERT export, every quantized Linear runs as MatMulIntegerToFloat:
    the q/k/v projections (one quantized input read by three MatMuls) and the pooler (a 2-D Linear, traced as Gemm)
    included, with no DequantizeLinear left; the outputs still match the student."""
    from sqakd_hf.export.onnx_integer import optimized_op_counts

    family = FAMILIES["bert"]
    save_teacher(family, tmp_path / "teacher")
    student = load_student(family, tmp_path / "teacher", QuantConfig(method="lsq", weight_bits=7, act_bits=8,
                                                                    **STATIC)).eval()
    batch = family.batch()
    export_onnx(student, tmp_path / "bert.onnx", batch)
    ops = optimized_op_counts(tmp_path / "bert.onnx", tmp_path / "bert.optimized.onnx")
    n_linear = sum(1 for _, layer in quant_layers(student) if isinstance(layer, torch.nn.Linear))
    assert n_linear >= 4 * student.config.num_hidden_layers + 1
    assert ops.get("MatMulIntegerToFloat", 0) == n_linear, ops
    assert "DequantizeLinear" not in ops and "MatMulNBits" not in ops, ops
    ref = logits(student, batch).numpy()
    out = _session(tmp_path / "bert.onnx").run(None, {k: v.numpy() for k, v in batch.items()})[0]
    assert float(np.abs(out - ref).max() / np.abs(ref).max()) <= 1e-2


def test_static_same_padding_matches_timm_and_stays_dynamic_at_two_sizes():
    """The constant TF 'same' amounts equal timm's own for every size, stride and kernel; a full-precision timm
    Conv2dSame (left out of quantization) pads statically with the same output, and a conv called at two input sizes
    keeps its dynamic padding."""
    pytest.importorskip("timm")
    from timm.layers import Conv2dSame
    from timm.layers.padding import get_same_padding

    from sqakd_hf.export.same_padding import same_padding, static_same_padding

    for size in range(5, 40):
        for kernel, stride, dilation in ((3, 1, 1), (3, 2, 1), (5, 2, 1), (3, 2, 2), (1, 2, 1)):
            before, after = same_padding(size, kernel, stride, dilation)
            assert before + after == get_same_padding(size, kernel, stride, dilation) and 0 <= after - before <= 1
    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv2dSame(3, 8, 3, stride=2), torch.nn.ReLU(), Conv2dSame(8, 8, 5, stride=2))
    x = torch.randn(2, 3, 30, 31)
    ref = model(x)
    with static_same_padding(model, lambda: model(x[:1])) as made_static:
        assert made_static == 2 and "forward" in vars(model[0])
        assert torch.equal(model(x), ref)
    assert "forward" not in vars(model[0])  # restored
    shared = torch.nn.Sequential(model[2], torch.nn.MaxPool2d(2))

    def twice() -> None:
        shared(torch.randn(1, 8, 16, 16))
        shared[0](torch.randn(1, 8, 9, 9))

    with static_same_padding(shared, twice) as made_static:
        assert made_static == 0
