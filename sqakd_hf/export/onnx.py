"""ONNX QDQ export: the fake-quant student as an ONNX graph with QuantizeLinear / DequantizeLinear pairs carrying
exactly our learned scales, for onnxruntime and other ONNX engines.

While exporting, every quantized layer's quantizers are swapped for their integer grids (:mod:`.grids`):

* the weight is traced as the constant ``scale * codes`` behind a per-channel (or per-tensor) ``int8`` Q/DQ pair,
  then stored as its ``int8`` codes feeding DequantizeLinear (b-bit codes travel exactly in the 8-bit container;
  a quarter of the float bytes);
* the input activation is clipped to its b-bit grid, then quantized by a per-tensor ``int8`` Q/DQ pair with the
  grid's scale and integer zero point (unsigned grids: ``-2**(b-1)``);
* dynamic per-token activations (``act_granularity="per_token_absmax"``) have no Q/DQ form (QuantizeLinear takes a
  constant per-tensor or per-axis scale) and no integer kernel in onnxruntime: they are written as the exact float
  operations the student computes (``ReduceMax(Abs(x))``, ``Div``, ``Round``, ``Clip``, ``Mul``), so the graph
  computes the student's function but its matmuls stay float;
* a quantized embedding table (``embedding_bits``) is stored as its ``int8`` codes feeding DequantizeLinear
  (per row, axis 0) before the Gather: a quarter of the float table's bytes.

The graph is traced by ``torch.onnx.export(..., dynamo=False)`` from ``torch.fake_quantize_per_*_affine``; the
model is restored afterwards. TF 'same' padding convs (timm's ``tf_*`` models) pad by the constant amounts of the
example input's height and width (:mod:`.same_padding`): the graph's height and width are fixed anyway. Grids
without an exact integer form (and per-token activations with a learned clip ratio) are refused with
:class:`~sqakd_hf.errors.InputError`, as for compressed-tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..deploy_mode import tensor_quantizers
from ..injection import quant_layers
from ..model_io import unwrap
from ..modules import QuantEmbedding
from ..quantizers.dynamic import token_steps
from .grids import ActGrid, TokenGrid, WeightCodes, act_grid, weight_codes
from .onnx_integer import (_drop_unused, cpu_has_vnni, fit_biases_in_int32, one_qdq_per_matmul,
                           to_integer_graph)
from .same_padding import static_same_padding

logger = logging.getLogger(__name__)

__all__ = ["export_onnx", "QDQWeight", "QDQInput", "QDQTable", "TokenInput", "EXACT_SESSION_CONFIG", "SESSION_CONFIG_KEY"]

#: ONNX opset: per-channel QuantizeLinear / DequantizeLinear need 13
OPSET = 17
#: onnxruntime session config under which a graph whose quantized weights meet float inputs (dynamic per-token or
#: full-precision activations) computes the student's function: by default onnxruntime fuses DequantizeLinear ->
#: MatMul into MatMulNBits, whose CPU kernel re-quantizes those inputs to int8 blocks (accuracy level 4); level 1
#: keeps them float. Recorded in the file's metadata under :data:`SESSION_CONFIG_KEY` (a JSON object).
EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
SESSION_CONFIG_KEY = "onnxruntime_session_config"
_INT8 = (-128, 127)


class QDQWeight(nn.Module):
    """A weight on its integer grid, as ``DequantizeLinear(QuantizeLinear(scale * codes))`` in int8."""

    def __init__(self, codes: WeightCodes, channel_axis: int) -> None:
        super().__init__()
        self.register_buffer("grid_weight", codes.scale * codes.codes.to(codes.scale.dtype))
        self.register_buffer("scale", codes.scale.reshape(-1).float())
        self.register_buffer("zero_point", torch.zeros(codes.scale.numel(), dtype=torch.int32))
        self.axis = channel_axis % codes.codes.dim()
        self.widest_code = int(codes.codes.abs().max())
        self.per_channel = codes.per_channel

    def forward(self, _weight: Tensor) -> Tensor:
        if self.per_channel:
            out = torch.fake_quantize_per_channel_affine(self.grid_weight.float(), self.scale, self.zero_point,
                                                         self.axis, *_INT8)
        else:
            out = torch.fake_quantize_per_tensor_affine(self.grid_weight.float(), self.scale, self.zero_point, *_INT8)
        return out.to(self.grid_weight.dtype)


class QDQTable(QDQWeight):
    """An embedding table on its per-row integer grid: the looked-up rows are gathered from
    ``DequantizeLinear(QuantizeLinear(scale * codes))`` (the table's codes are then stored as int8)."""

    #: QuantEmbedding looks rows up in the whole quantized table while its quantizer observes (one Gather after
    #: DequantizeLinear, the same values as quantizing only the looked-up rows); a traced graph needs exactly that
    observing = True


class TokenInput(nn.Module):
    """Dynamic symmetric per-token activations in the float operations the student computes (see
    :func:`sqakd_hf.quantizers.dynamic.token_steps`): no Q/DQ pair, the same values."""

    def __init__(self, grid: TokenGrid) -> None:
        super().__init__()
        self.bits, self.low, self.high = grid.bits, -(2 ** (grid.bits - 1)), 2 ** (grid.bits - 1) - 1

    def forward(self, x: Tensor) -> Tensor:
        step = token_steps(x, self.bits)
        return torch.clamp(torch.round(x / step), self.low, self.high) * step


class QDQInput(nn.Module):
    """An input activation clipped to its b-bit grid, then ``DequantizeLinear(QuantizeLinear(x))`` in int8."""

    def __init__(self, grid: ActGrid) -> None:
        super().__init__()
        half = 2 ** (grid.bits - 1)
        step = float(grid.scale)
        self.scale, self.zero_point = step, int(grid.zero_point)
        self.low, self.high = step * (-half - grid.zero_point), step * (half - 1 - grid.zero_point)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.clamp(x, self.low, self.high)
        return torch.fake_quantize_per_tensor_affine(x.float(), self.scale, self.zero_point, *_INT8).to(x.dtype)


class _Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


def _qdq_modules(model: nn.Module) -> List[Tuple[nn.Module, nn.Module, nn.Module]]:
    """``(layer, weight module, input module)`` for every quantized layer; inexact grids are refused."""
    swaps = []
    for name, layer in quant_layers(model):
        grid = act_grid(name, layer.input_quantizer, dynamic=True)
        inputs: nn.Module = (_Identity() if grid is None else
                             TokenInput(grid) if isinstance(grid, TokenGrid) else QDQInput(grid))
        if layer.weight_quantizer.bits >= 32:
            weight: nn.Module = _Identity()
        else:
            table = isinstance(layer, QuantEmbedding)
            weight = (QDQTable if table else QDQWeight)(weight_codes(name, layer), layer.channel_axis)
        swaps.append((layer, weight, inputs))
    if not swaps:
        raise InputError(f"{type(model).__name__} has no quantized layer to export")
    return swaps


@contextlib.contextmanager
def qdq_mode(model: nn.Module) -> Iterator[nn.Module]:
    """While open, ``model``'s quantized layers compute with :class:`QDQWeight` / :class:`QDQInput` (the function the
    ONNX graph holds); the original quantizers are restored on exit."""
    swaps = _qdq_modules(model)
    saved = [(layer, layer.weight_quantizer, layer.input_quantizer) for layer, _, _ in swaps]
    # deploy mode (sqakd_hf.deploy_mode): the residual blocks' own quantizers, as Q/DQ pairs too
    blocks = [(owner, attr, q, _Identity() if grid is None else QDQInput(grid))
              for name, owner, attr, q in tensor_quantizers(model) for grid in [act_grid(name, q)]]
    try:
        for layer, weight, inputs in swaps:
            layer.weight_quantizer, layer.input_quantizer = weight.to(layer.weight.device), inputs
        for owner, attr, _, qdq in blocks:
            setattr(owner, attr, qdq)
        yield model
    finally:
        for layer, weight, inputs in saved:
            layer.weight_quantizer, layer.input_quantizer = weight, inputs
        for owner, attr, q, _ in blocks:
            setattr(owner, attr, q)


def _constant(graph: Any, name: str) -> Optional[Any]:
    """The numpy value of ``name`` if it is an initializer or a Constant node's output (through Identity nodes, which
    the exporter writes for deduplicated initializers), else None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.output and node.output[0] == name:
            if node.op_type == "Constant":
                return numpy_helper.to_array(node.attribute[0].t)
            if node.op_type == "Identity":
                return _constant(graph, node.input[0])
            return None
    return None


def _store_weight_codes(path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Rewrite the ONNX file at ``path`` so that every weight is stored as its int8 codes feeding DequantizeLinear,
    instead of float ``scale * codes`` feeding QuantizeLinear: the same function (the codes are exact), a quarter of
    the bytes for the quantized weights; a conv channel whose bias code would overflow int32 gets a larger weight step
    (:func:`.onnx_integer.fit_biases_in_int32`). ``metadata`` entries are added to the file's metadata. An activation
    Q/DQ pair read by several MatMuls becomes one pair per MatMul (:func:`.onnx_integer.one_qdq_per_matmul`), so that
    onnxruntime runs each of them as an integer matmul."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    users: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    replaced = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
        scale, zero = _constant(graph, node.input[1]), _constant(graph, node.input[2])
        if scale is None or zero is None or zero.dtype != np.int8:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.size > 1:
            shape[axis % weight.ndim] = scale.size
        zeros = zero.astype(np.float64).reshape(shape)
        with np.errstate(divide="ignore", invalid="ignore"):  # a row with step 0 (an all-zero row) dequantizes to 0
            codes = np.rint(weight / scale.astype(np.float64).reshape(shape)) + zeros
        codes = np.where(np.isfinite(codes), codes, np.broadcast_to(zeros, codes.shape))
        graph.initializer.append(numpy_helper.from_array(np.clip(codes, -128, 127).astype(np.int8), node.output[0]))
        replaced.append(node)
        users[node.input[0]] -= 1
    for node in replaced:
        graph.node.remove(node)
    for name, count in users.items():
        if count == 0 and name in inits:
            graph.initializer.remove(inits[name])
    fit_biases_in_int32(model)
    _drop_unused(graph)
    one_qdq_per_matmul(model)
    if metadata:
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **metadata})
    onnx.save(model, str(path))


def _widest_integer_matmul_code(model: nn.Module) -> int:
    """Largest ``|weight code|`` of a layer (in :func:`qdq_mode`) whose input has a static Q/DQ pair: onnxruntime runs
    those as u8 x s8 integer matmuls, whose AVX2 kernels without VNNI saturate pairwise sums above 32767."""
    widest = 0
    for _, layer in quant_layers(model):
        if isinstance(layer.weight_quantizer, QDQWeight) and isinstance(layer.input_quantizer, QDQInput):
            widest = max(widest, layer.weight_quantizer.widest_code)
    return widest


class _KeywordInputs(nn.Module):
    """``model(**dict(zip(names, tensors)))`` called with positional tensors, so that the traced graph's inputs are
    exactly ``names`` in that order (tracing keyword inputs directly reorders them, or collides with arguments such
    as ``use_cache`` that a transformers ``forward`` sets itself)."""

    def __init__(self, model: nn.Module, names: List[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *tensors: Tensor):
        return self.model(**dict(zip(self.names, tensors)))


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    example_inputs: Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]],
    *,
    output_names: Optional[List[str]] = None,
    dynamic_batch: bool = True,
) -> Path:
    """Write the quantized ``model`` as an ONNX QDQ graph to ``path`` (atomically); returns the path.

    ``example_inputs``: a tensor, a tuple of positional tensors (timm-style ``forward(x)``), or a mapping of keyword
    tensors (transformers: ``input_ids``, ``attention_mask``, ``pixel_values``...); their names become the graph's
    inputs, with the batch dimension (and the sequence dimension of 2-D token inputs) dynamic when
    ``dynamic_batch``; other dimensions (an image's height and width) are fixed to the example's, and timm's TF
    'same' padding convs pad by that size's constant amounts. Outputs are named ``output_names`` (default
    ``logits``). Raises :class:`~sqakd_hf.errors.InputError` for grids without an exact integer form (see
    :mod:`.grids`).

    Run the file with :data:`EXACT_SESSION_CONFIG` (also in its metadata) when quantized weights meet float inputs
    (``act_granularity="per_token_absmax"``, or weight-only layers): ``options.add_session_config_entry(
    "session.qdq_matmulnbits_accuracy_level", "1")``.
    """
    model = unwrap(model)
    if isinstance(example_inputs, Mapping):
        names, values = list(example_inputs), list(example_inputs.values())
        traced: nn.Module = _KeywordInputs(model, names)
    else:
        values = [example_inputs] if isinstance(example_inputs, Tensor) else list(example_inputs)
        names, traced = [f"input_{i}" if i else "input" for i in range(len(values))], model
    output_names = output_names or ["logits"]
    dynamic: Dict[str, Dict[int, str]] = {}
    if dynamic_batch:
        for name, value in zip(names, values):
            axes = {0: "batch"}
            if value.dim() == 2 and not value.is_floating_point():
                axes[1] = "sequence"
            dynamic[name] = axes
        dynamic.update({name: {0: "batch"} for name in output_names})
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.sqakd-tmp-{os.getpid()}")
    was_training = model.training
    config = getattr(model, "config", None)
    return_dict = getattr(config, "return_dict", None)
    try:
        model.eval()
        if return_dict is not None:
            config.return_dict = False  # a tuple output traces cleanly
        with qdq_mode(model), torch.no_grad():
            deploy = getattr(getattr(model, "sqakd_config", None), "deploy", None) is not None
            if not deploy and _widest_integer_matmul_code(model) > 64 and not cpu_has_vnni():
                logger.warning("sqakd: 8-bit weight codes meet statically quantized inputs; onnxruntime's u8 x s8 "
                               "kernels can saturate on this CPU (x86 without VNNI), so its outputs may differ from the "
                               "student's (real MiniLM W8A8: 99.0% top-1 agreement, 99.8% with graph optimizations "
                               "off). Use weight_bits <= 7 for such CPUs.")
            with static_same_padding(model, lambda: traced(*values)):  # fixed height and width: constant pads
                torch.onnx.export(traced, tuple(values), str(staging), input_names=names, output_names=output_names,
                                  dynamic_axes=dynamic or None, opset_version=OPSET, dynamo=False)
        _store_weight_codes(staging, {SESSION_CONFIG_KEY: json.dumps(EXACT_SESSION_CONFIG)})
        if getattr(getattr(model, "sqakd_config", None), "deploy", None) is not None:
            to_integer_graph(staging)  # deployment-aware student: a fully integer graph in onnxruntime
        os.replace(staging, target)
    finally:
        model.train(was_training)
        if return_dict is not None:
            config.return_dict = return_dict
        if staging.exists():
            staging.unlink()
    return target
