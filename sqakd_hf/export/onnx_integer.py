"""Graph edits that let onnxruntime run a deployment-aware student (``QuantConfig(deploy="onnx")``) as a fully integer
graph: after its graph optimizer every quantized Conv is a ``QLinearConv`` and every residual Add a ``QLinearAdd``,
computing with exactly our learned scales.

The QDQ file that :func:`~sqakd_hf.export.onnx.export_onnx` traces already carries the right QuantizeLinear /
DequantizeLinear pairs (the deploy-mode student quantizes every tensor the integer graph quantizes); these edits,
each keeping the function exactly, make onnxruntime's QDQ fusions apply:

* ``Cast`` nodes to the type a tensor already has (the tracer writes them around each Q/DQ pair) are dropped;
* a zero ``Pad`` with constant amounts in front of a Conv (TF 'same' padding of timm's ``tf_*`` models, made static
  at export by :mod:`.same_padding`) is folded into the conv's ``pads``: the conv becomes a QLinearConv;
* a ``Clip`` in front of a QuantizeLinear whose range it does not narrow (an 8-bit grid's clip equals the container's
  saturation) is dropped;
* activations move from the ``int8`` container to ``uint8`` (zero point + 128: the same grid; x86 integer kernels
  are u8 x s8);
* ``MaxPool -> QuantizeLinear`` gets the same Q/DQ pair in front of the pool (rounding onto a grid is monotonic,
  so the pool of quantized values is the quantized pool): the conv before it becomes a QLinearConv;
* a ``Clip`` that does narrow the grid (ReLU6 before a grid reaching past 6) moves behind the QuantizeLinear, onto the
  integer codes (monotonic rounding commutes with clamping): the conv before it becomes a QLinearConv.

For every export (deployment-aware or not), :func:`one_qdq_per_matmul` gives each MatMul its own activation Q/DQ
pair (BERT's q/k/v projections read one quantized tensor) and lifts a quantized Linear traced as ``Gemm`` to
``DQ -> MatMul``, so that onnxruntime runs every quantized Linear as ``MatMulIntegerToFloat``.

onnxruntime itself quantizes a float conv bias to ``int32`` at ``s_x * s_w`` when it fuses the conv (the bias then
moves by at most half of ``s_x * s_w``, far below an output step).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ..deploy_mode import int32_fit_weight_step

__all__ = ["to_integer_graph", "one_qdq_per_matmul", "fit_biases_in_int32", "cpu_has_vnni", "optimized_op_counts"]

logger = logging.getLogger(__name__)


def cpu_has_vnni() -> bool:
    """Whether this CPU has an int8 dot-product instruction (x86 AVX512-VNNI / AVX-VNNI); onnxruntime's u8 x s8
    kernels on an x86 CPU without one add pairs of products in int16 with saturation, so 8-bit weight codes can
    overflow there (``deploy="onnx"`` trains 7-bit weight codes for that reason). Non-x86 CPUs count as VNNI."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", flags))


def _value(graph, name: str):
    """The numpy value of an initializer or Constant output ``name`` (None if it is computed)."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "Identity" and node.output[0] == name:
            return _value(graph, node.input[0])
    return None


def _consumers(graph) -> Dict[str, List]:
    users: Dict[str, List] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _producers(graph) -> Dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def _computed_constant(model, name: str):
    """The numpy value of tensor ``name`` when every tensor it is computed from is a constant (the tracer writes the
    constant pads of ``F.pad`` as a chain of Concat / Reshape / Slice / Transpose on Constants), evaluated with the
    ONNX reference runtime; None if it depends on a graph input."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    value = _value(graph, name)
    if value is not None:
        return value
    inits = {i.name: i for i in graph.initializer}
    producers = _producers(graph)
    needed, used_inits, stack, seen = set(), [], [name], set()
    while stack:
        tensor = stack.pop()
        if not tensor or tensor in seen:
            continue
        seen.add(tensor)
        if tensor in inits:
            used_inits.append(inits[tensor])
            continue
        node = producers.get(tensor)
        if node is None:  # a graph input
            return None
        needed.add(id(node))
        stack.extend(node.input)
    nodes = [n for n in graph.node if id(n) in needed]  # graph order is topological
    sub = helper.make_graph(nodes, "constant", [], [helper.make_empty_tensor_value_info(name)], used_inits)
    return ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})[0]


def _pads_into_convs(model) -> int:
    """``Pad(x, constant pads, value 0) -> Conv`` (TF 'same' padding of timm's ``Conv2dSame``, made static at export)
    becomes the Conv alone with the pads added to its ``pads`` attribute: the same function, and onnxruntime fuses
    ``DequantizeLinear -> Conv -> QuantizeLinear`` into a QLinearConv (which pads with the input's zero point, the
    code of 0.0). Returns the number of Pads folded."""
    import numpy as np
    from onnx import helper

    graph = model.graph
    users = _consumers(graph)
    folded = []
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        readers = users.get(pad.output[0], [])
        if attrs.get("mode", b"constant") not in (b"constant", "constant") or len(readers) != 1:
            continue
        conv = readers[0]
        conv_attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if conv.op_type != "Conv" or conv.input[0] != pad.output[0] or \
                conv_attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        if len(pad.input) > 3 and pad.input[3]:  # an ``axes`` input (opset 18): not written by our exporter
            continue
        fill = _value(graph, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        pads = _computed_constant(model, pad.input[1])
        if fill is None or np.any(fill != 0) or pads is None or pads.ndim != 1 or np.any(pads < 0):
            continue
        rank = pads.size // 2
        begin, end = pads[:rank].tolist(), pads[rank:].tolist()
        if rank < 3 or any(begin[:2]) or any(end[:2]):  # batch and channel axes unpadded
            continue
        old = list(conv_attrs.get("pads", [0] * (2 * (rank - 2))))
        merged = [a + b for a, b in zip(old, begin[2:] + end[2:])]
        for a in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", merged))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    return len(folded)


def fit_biases_in_int32(model) -> int:
    """Raise the weight step of every conv output channel whose bias would not fit in int32 at ``s_in * s_w``.

    An integer runtime adds a conv's bias as the int32 code ``round(b / (s_in * s_w))`` (onnxruntime quantizes a float
    bias so when it fuses ``DQ -> Conv -> Q`` into a QLinearConv). A channel whose folded weights are nearly zero (a
    BatchNorm gamma near 0: "dead" channels, common in trained EfficientNets) gets a tiny per-channel step ``s_w``, and
    its bias code overflows: onnxruntime saturates it to ``-2**31``, and adding the zero-point correction wraps it
    around, so the channel outputs a wrong constant. Each such channel's step becomes
    ``|b| / (s_in * BIAS_CODE_LIMIT)`` and its codes are re-rounded on that step (they only shrink); the weights move
    by at most half the new step, so the output moves by at most ``K * max|x| * |b| / (2 * s_in * 2**30)``, far
    below an output step for the tiny weights this applies to. A bias computed from constants (the tracer keeps the
    rounding of :func:`~sqakd_hf.deploy_mode.integer_bias` as nodes) becomes an initializer first. Convs whose input,
    weight or bias is not a constant Q/DQ form are left alone. Returns the number of channels changed; edits ``model``
    in place."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = _producers(graph)
    inits = {i.name: i for i in graph.initializer}
    changed = 0
    for conv in [n for n in graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2]]:
        act, wdq = producers.get(conv.input[0]), producers.get(conv.input[1])
        if act is None or wdq is None or act.op_type != "DequantizeLinear" or wdq.op_type != "DequantizeLinear" or \
                wdq.input[0] not in inits or len(wdq.input) < 3:
            continue
        s_in, s_w, bias = _value(graph, act.input[1]), _value(graph, wdq.input[1]), _value(graph, conv.input[2])
        if bias is None and conv.input[2] in producers:
            bias = _computed_constant(model, conv.input[2])
            if bias is not None:
                name = f"{conv.name or conv.output[0]}_bias"
                graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), name))
                conv.input[2] = name
        w_zero = _value(graph, wdq.input[2])
        if s_in is None or s_in.size != 1 or s_w is None or bias is None or bias.ndim != 1 or w_zero is None or \
                np.any(w_zero != 0):
            continue
        codes = numpy_helper.to_array(inits[wdq.input[0]])
        if codes.shape[0] != bias.size or s_w.size not in (1, bias.size):
            continue
        scale = np.broadcast_to(s_w.astype(np.float64).reshape(-1), bias.shape)
        fitted = int32_fit_weight_step(torch.from_numpy(scale.copy()), float(s_in.reshape(())),
                                       torch.from_numpy(bias.astype(np.float64))).numpy()
        low = fitted != scale
        if not low.any():
            continue
        new_scale = fitted.astype(np.float32)
        ratio = (scale / new_scale.astype(np.float64)).reshape([-1] + [1] * (codes.ndim - 1))
        new_codes = np.rint(codes.astype(np.float64) * ratio).astype(codes.dtype)
        tag = f"{conv.name or conv.output[0]}_int32_bias"
        names = [f"{tag}_weight_codes", f"{tag}_weight_scale", f"{tag}_weight_zero_point"]
        zero = np.zeros(bias.size, dtype=codes.dtype)  # symmetric weight grids: zero point 0 per channel
        graph.initializer.extend(numpy_helper.from_array(v, n) for v, n in zip((new_codes, new_scale, zero), names))
        wdq.input[:] = names
        for a in [a for a in wdq.attribute if a.name == "axis"]:
            wdq.attribute.remove(a)
        wdq.attribute.append(helper.make_attribute("axis", 0))
        changed += int(low.sum())
    return changed


def _to_uint8(graph) -> int:
    """Activation QuantizeLinear (input computed, int8 zero point) and its DequantizeLinear consumers to uint8."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name for i in graph.initializer}
    users = _consumers(graph)
    moved = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        zero = _value(graph, node.input[2])
        if zero is None or zero.dtype != np.int8:
            continue
        dqs = users.get(node.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        name = f"{node.output[0]}_zero_point_u8"
        graph.initializer.append(numpy_helper.from_array((zero.astype(np.int16) + 128).astype(np.uint8), name))
        for n in [node, *dqs]:
            n.input[2] = name
        moved += 1
    return moved


def _drop_redundant_clips(graph) -> int:
    """Remove every Clip whose only consumer is a QuantizeLinear that saturates at (or inside) the Clip's range (e.g.
    a ReLU6 before a grid that ends below 6, and the b-bit clip of an 8-bit grid), until none is left."""
    total = 0
    while True:
        removed = _drop_clips_once(graph)
        total += removed
        if not removed:
            return total


def _clip_into_q(graph, node, users: Dict[str, List]) -> Optional[tuple]:
    """``(quantize node, lo, hi, scale, zero point)`` when ``node`` is a Clip with constant bounds whose only reader
    is a per-tensor QuantizeLinear with a constant grid, else None."""
    out_users = users.get(node.output[0], []) if node.op_type == "Clip" else []
    if len(node.input) < 3 or len(out_users) != 1 or out_users[0].op_type != "QuantizeLinear":
        return None
    q = out_users[0]
    lo, hi = _value(graph, node.input[1]), _value(graph, node.input[2])
    scale, zero = _value(graph, q.input[1]), _value(graph, q.input[2])
    if lo is None or hi is None or scale is None or zero is None or scale.size != 1:
        return None
    return q, float(lo), float(hi), float(scale.reshape(())), zero


def _drop_clips_once(graph) -> int:
    import numpy as np

    users = _consumers(graph)
    removed = []
    for node in graph.node:
        found = _clip_into_q(graph, node, users)
        if found is None:
            continue
        q, lo, hi, s, zero = found
        info, z = np.iinfo(zero.dtype), float(zero.reshape(()))
        q_lo, q_hi = s * (info.min - z), s * (info.max - z)
        tol = 1e-3 * s
        if lo <= q_lo + tol and hi >= q_hi - tol:
            q.input[0] = node.input[0]
            removed.append(node)
    for node in removed:
        graph.node.remove(node)
    return len(removed)


def _clips_on_codes(graph) -> int:
    """``Clip(lo, hi) -> QuantizeLinear`` (a ReLU6 before a grid reaching past 6) becomes ``QuantizeLinear -> Clip``
    on the integer codes at ``Q(lo), Q(hi)``: exact (rounding onto a saturating grid is monotonic, so it commutes with
    clamping), and the conv before it becomes a QLinearConv."""
    import numpy as np
    from onnx import helper, numpy_helper

    users = _consumers(graph)
    moved = 0
    for node in list(graph.node):
        found = _clip_into_q(graph, node, users)
        if found is None:
            continue
        q, lo, hi, s, zero = found
        info, z = np.iinfo(zero.dtype), int(zero.reshape(()))
        bounds = [np.array(min(max(int(np.rint(v / s)) + z, info.min), info.max), dtype=zero.dtype) for v in (lo, hi)]
        names = [f"{q.output[0]}_clip_low", f"{q.output[0]}_clip_high"]
        graph.initializer.extend(numpy_helper.from_array(b, n) for b, n in zip(bounds, names))
        clipped = f"{q.output[0]}_clipped"
        for reader in users.get(q.output[0], []):
            reader.input[:] = [clipped if i == q.output[0] else i for i in reader.input]
        q.input[0] = node.input[0]
        graph.node.insert(list(graph.node).index(q) + 1,
                          helper.make_node("Clip", [q.output[0], *names], [clipped], name=f"{node.name}_on_codes"))
        graph.node.remove(node)
        moved += 1
    return moved


def _drop_noop_casts(model) -> int:
    """Remove every Cast to the type its input already has (the tracer writes them around each Q/DQ pair)."""
    import onnx

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    removed = []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to is not None and types.get(node.input[0]) == to:
            _rewire(graph, node.output[0], node.input[0])
            removed.append(node)
    for node in removed:
        graph.node.remove(node)
    return len(removed)


def _rewire(graph, old: str, new: str) -> None:
    """Every reader of tensor ``old`` reads ``new`` instead (graph outputs keep their names)."""
    outputs = {o.name for o in graph.output}
    if old in outputs:  # keep the graph output's name: rename the producer of ``new`` is not safe, use Identity
        from onnx import helper

        graph.node.append(helper.make_node("Identity", [new], [old]))
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _quantize_before_maxpool(graph) -> int:
    """For ``MaxPool -> QuantizeLinear``, add the same Q/DQ pair in front of the MaxPool: exact (rounding onto a grid
    is monotonic, so the max of quantized values is the quantized max), and it lets the conv before the pool become a
    QLinearConv and the pool run on integers."""
    from onnx import helper, numpy_helper

    producers = _producers(graph)
    added = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        pool = producers.get(node.input[0])
        if pool is None or pool.op_type != "MaxPool" or len(pool.output) != 1:
            continue
        src = pool.input[0]
        grid = [f"{src}_pre_pool_scale", f"{src}_pre_pool_zero_point"]  # initializers: defined before any node
        graph.initializer.extend(numpy_helper.from_array(_value(graph, name), new)
                                 for name, new in zip(node.input[1:3], grid))
        q = helper.make_node("QuantizeLinear", [src, *grid], [f"{src}_pre_pool_q"], name=f"{pool.name}_pre_q")
        dq = helper.make_node("DequantizeLinear", [q.output[0], *grid], [f"{src}_pre_pool_dq"],
                              name=f"{pool.name}_pre_dq")
        index = list(graph.node).index(pool)
        graph.node.insert(index, dq)
        graph.node.insert(index, q)
        pool.input[0] = dq.output[0]
        added += 1
    return added


def _split_shared_dq(graph, q, dq, readers: List, inits: Dict[str, object]) -> int:
    """Give every MatMul / Gemm in ``readers`` (all reading ``dq``) but the first its own copy of the ``q -> dq`` pair,
    with its own copies of the scale and zero point; returns the number of copies."""
    from onnx import helper, numpy_helper

    matmuls = [r for r in readers if r.op_type in ("MatMul", "Gemm")]
    if len(readers) < 2 or not matmuls:
        return 0
    own = matmuls[1:] if len(matmuls) == len(readers) else matmuls  # the original pair keeps one reader
    index = list(graph.node).index(dq) + 1
    for k, reader in enumerate(own, 1):
        tag = f"{q.output[0]}_reader{k}"
        grid = [f"{tag}_scale", f"{tag}_zero_point"]  # own initializers: CSE would merge copies sharing them
        graph.initializer.extend(numpy_helper.from_array(inits[name], new) for name, new in zip(q.input[1:3], grid))
        attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute}
        copy_q = helper.make_node("QuantizeLinear", [q.input[0], *grid], [f"{tag}_q"], name=f"{q.name}_reader{k}",
                                  **attrs)
        copy_dq = helper.make_node("DequantizeLinear", [copy_q.output[0], *grid], [f"{tag}_dq"],
                                   name=f"{dq.name}_reader{k}", **attrs)
        reader.input[:] = [copy_dq.output[0] if name == dq.output[0] else name for name in reader.input]
        graph.node.insert(index, copy_dq)
        graph.node.insert(index, copy_q)
    return len(own)


def _gemm_to_matmul(graph) -> int:
    """``Gemm(DQ(Q(a)), DQ(codes), C)`` with ``transB=1`` (a quantized Linear on a 2-D input, e.g. BERT's pooler),
    which onnxruntime leaves float, becomes ``Squeeze(MatMul(DQ(Q(Unsqueeze(a))), DQ(codes.T)) + C)``: the
    per-output-channel axis moves from 0 to 1 with the transpose, and the activation is lifted to 3-D before its
    QuantizeLinear (onnxruntime fuses a 2-D ``MatMul + Add`` back into a float Gemm before its QDQ fusions). The same
    function, in the ``DQ -> MatMul`` form that onnxruntime runs as ``MatMulIntegerToFloat``."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    users, producers = _consumers(graph), _producers(graph)
    changed = 0
    for gemm in [n for n in graph.node if n.op_type == "Gemm"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if (attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transA", 0), attrs.get("transB", 0)) != \
                (1.0, 1.0, 0, 1):
            continue
        dq = producers.get(gemm.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        codes = inits[dq.input[0]]
        if len(codes.dims) != 2 or len(users.get(dq.input[0], [])) != 1 or len(users.get(dq.output[0], [])) != 1:
            continue
        # a 3-D MatMul ([1, batch, in]): onnxruntime would fuse a 2-D MatMul + Add back into a float Gemm first
        act_dq, act_q = producers.get(gemm.input[0]), None
        if act_dq is not None and act_dq.op_type == "DequantizeLinear" and len(users.get(act_dq.input[0], [])) == 1:
            act_q = producers.get(act_dq.input[0])
        if act_q is None or act_q.op_type != "QuantizeLinear" or len(users.get(act_q.output[0], [])) != 1:
            continue
        axes = f"{gemm.name}_axis0"
        codes.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(codes).T.copy(), codes.name))
        axis = next((a for a in dq.attribute if a.name == "axis"), None)
        if axis is not None:
            axis.i = 1 - (axis.i % 2)
        graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), axes))
        lifted = f"{act_q.input[0]}_{gemm.name}_3d"
        unsqueeze = helper.make_node("Unsqueeze", [act_q.input[0], axes], [lifted], name=f"{gemm.name}_to_3d")
        graph.node.insert(list(graph.node).index(act_q), unsqueeze)
        act_q.input[0] = lifted
        index = list(graph.node).index(gemm)
        product = f"{gemm.output[0]}_3d"
        nodes = [helper.make_node("MatMul", gemm.input[:2], [product], name=f"{gemm.name}_matmul")]
        if len(gemm.input) > 2 and gemm.input[2]:
            nodes.append(helper.make_node("Add", [product, gemm.input[2]], [f"{product}_bias"], name=f"{gemm.name}_bias"))
        nodes.append(helper.make_node("Squeeze", [nodes[-1].output[0], axes], [gemm.output[0]], name=f"{gemm.name}_to_2d"))
        graph.node.remove(gemm)
        for offset, node in enumerate(nodes):
            graph.node.insert(index + offset, node)
        changed += 1
    return changed


def one_qdq_per_matmul(model) -> int:
    """Every activation ``QuantizeLinear -> DequantizeLinear`` pair read by several MatMuls (BERT's q/k/v projections
    read one quantized tensor) becomes one pair per MatMul, each with its own copy of the same scale and zero point:
    the same function. onnxruntime fuses ``DQ -> MatMul`` into ``MatMulIntegerToFloat`` only for a DequantizeLinear
    with a single reader, and its common-subexpression elimination merges copies that share their scale tensors, so
    a shared pair leaves those matmuls float. No-op Casts are dropped first (the tracer writes one behind each
    DequantizeLinear, hiding its readers) and Linear layers traced as ``Gemm`` become ``MatMul + Add``
    (:func:`_gemm_to_matmul`). Returns the number of pairs added; edits ``model`` in place."""
    _drop_noop_casts(model)
    graph = model.graph
    _gemm_to_matmul(graph)
    users = _consumers(graph)
    values = {}
    added = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) == 3]:
        dqs = users.get(q.output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        for name in q.input[1:3]:
            values[name] = _value(graph, name)
        if any(values[name] is None for name in q.input[1:3]):
            continue
        added += _split_shared_dq(graph, q, dqs[0], users.get(dqs[0].output[0], []), values)
    return added


def _widest_weight_code(graph) -> int:
    """Largest ``|code|`` of the int8 weights feeding DequantizeLinear (0 if none)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) > 1}
    widest = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            codes = numpy_helper.to_array(inits[node.input[0]]).astype(np.int16)
            widest = max(widest, int(np.abs(codes).max(initial=0)))
    return widest


def _drop_unused(graph) -> None:
    """Nodes whose outputs nothing reads (the constant chains behind folded pads, Constants left by the edits) and
    initializers nothing reads."""
    while True:
        users = _consumers(graph)
        outputs = {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in users or o in outputs for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    users = _consumers(graph)
    for init in [i for i in graph.initializer if i.name not in users]:
        graph.initializer.remove(init)


def to_integer_graph(path: Union[str, os.PathLike]) -> Dict[str, int]:
    """Apply the module's graph edits to the QDQ ONNX file at ``path`` in place; returns how many tensors each edit
    changed (``casts_dropped``, ``pads_into_convs``, ``biases_fitted`` (channels), ``clips_dropped``,
    ``uint8_activations``, ``pools_quantized``, ``clips_on_codes``).
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    counts = {"casts_dropped": _drop_noop_casts(model), "pads_into_convs": _pads_into_convs(model),
              "biases_fitted": fit_biases_in_int32(model),
              "clips_dropped": _drop_redundant_clips(graph),
              "uint8_activations": _to_uint8(graph), "pools_quantized": _quantize_before_maxpool(graph),
              "clips_on_codes": _clips_on_codes(graph)}
    _drop_unused(graph)
    if not cpu_has_vnni() and _widest_weight_code(graph) > 64:
        logger.warning("sqakd: the ONNX graph holds 8-bit weight codes, which onnxruntime's u8 x s8 kernels can "
                       "saturate on this CPU (x86 without VNNI): its outputs may differ from the student's. Train with "
                       "QuantConfig(deploy='onnx') (7-bit weight codes) to run it here")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return counts


def optimized_op_counts(path: Union[str, os.PathLike], optimized_path: Optional[Union[str, os.PathLike]] = None,
                        threads: int = 1) -> Dict[str, int]:
    """Node types of the graph onnxruntime runs for the ONNX file at ``path`` (all graph optimizations, CPU): the
    optimized model is saved with ``SessionOptions.optimized_model_filepath`` (to ``optimized_path``, default next to
    ``path``) and its nodes counted."""
    import onnx
    import onnxruntime as ort

    target = Path(optimized_path) if optimized_path is not None else Path(path).with_suffix(".optimized.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(target)
    options.intra_op_num_threads = threads
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(target)).graph.node]
    return {op: ops.count(op) for op in sorted(set(ops))}
