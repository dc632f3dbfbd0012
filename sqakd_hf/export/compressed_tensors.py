"""compressed-tensors export: a quantized transformers student that loads with plain transformers.

The folder holds ``config.json`` with a ``quant_method: "compressed-tensors"`` quantization config,
``model.safetensors`` and the tokenizer / processor files, so that
``AutoModelFor*.from_pretrained(folder)`` loads it in a process that never imports ``sqakd_hf``
(transformers' own compressed-tensors integration; ``pip install compressed-tensors``), and engines
that read the format (vLLM) can serve it.

Each quantized ``nn.Linear`` is written with our learned grid, exactly (:mod:`.grids`):

* weights: ``pack-quantized`` (``weight_packed`` int32 ``[out, ceil(in * b / 32)]``, ``weight_scale``
  ``[out, 1]`` per channel or ``[1]`` per tensor, ``weight_shape``), or ``int-quantized`` (``weight``
  int8 + ``weight_scale``) for 8-bit weights with quantized activations (W8A8);
* input activations: static per-tensor ``input_scale`` (and ``input_zero_point`` for unsigned grids,
  written as ``symmetric: false``), or dynamic per token (``strategy: token, dynamic: true``, symmetric) for a
  student trained with ``act_granularity="per_token_absmax"``, which computes the runtime's own step
  ``max|x_t| / ((2^b - 1) / 2)`` (a 2-D input such as BERT's pooler gets one step for the whole batch, in the
  student as in compressed-tensors).

Quantized embedding tables (``embedding_bits``, weight-only, one step per row) are written ``int-quantized``: ``weight``
int8 codes + ``weight_scale`` ``[rows, 1]`` (a quarter of the float32 bytes), which compressed-tensors 0.20 with
transformers 5.24 decompresses exactly at load (``pack-quantized`` tables fail there: the packed ``nn.Embedding``
has no ``weight`` to initialise). vLLM quantizes ``Linear`` layers only: export students meant for vLLM without
``embedding_bits``.

Layers with the same grid layout share one config group whose ``targets`` name them exactly; every
other ``nn.Linear`` is listed in ``ignore``. Grids that have no exact integer form are refused with
:class:`~sqakd_hf.errors.InputError`, never approximated.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..checkpoint import load_quantized, model_library
from ..errors import InputError
from ..injection import quant_layers
from ..model_io import unwrap
from ..modules import QuantEmbedding, QuantLinear
from ..serialization.files import atomic_save_directory
from .grids import ActGrid, TokenGrid, WeightCodes, act_grid, weight_codes
from .processor_files import copy_processor_files, source_folder

__all__ = ["export_compressed_tensors", "compressed_tensors_config", "compressed_state_dict"]

PACK_QUANTIZED, INT_QUANTIZED = "pack-quantized", "int-quantized"


@dataclass(frozen=True)
class _Layer:
    name: str
    weights: WeightCodes
    inputs: Optional[Union[ActGrid, TokenGrid]]
    table: bool = False  #: an embedding table (always int-quantized)

    @property
    def format(self) -> str:
        return INT_QUANTIZED if self.table or (self.weights.bits == 8 and self.inputs is not None) else PACK_QUANTIZED

    @property
    def dynamic(self) -> bool:
        return isinstance(self.inputs, TokenGrid)

    @property
    def group_key(self) -> Tuple:
        act = None if self.inputs is None else (self.inputs.bits, self.inputs.symmetric, self.dynamic)
        return self.format, self.weights.bits, self.weights.per_channel, act, self.table


def _require_compressed_tensors() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise InputError("the compressed-tensors export needs the compressed-tensors package: "
                         "pip install compressed-tensors") from None


def _plan(model: nn.Module) -> List[_Layer]:
    """The exported grid of every quantized layer; layers the format cannot hold are refused."""
    plan = []
    for name, layer in quant_layers(model):
        if isinstance(layer, QuantEmbedding):
            if layer.weight_quantizer.bits < 32:
                plan.append(_Layer(name, weight_codes(name, layer), None, table=True))
            continue
        if not isinstance(layer, QuantLinear):
            raise InputError(f"cannot export layer {name} to compressed-tensors: it is a {type(layer).__name__}, and "
                             "the format quantizes nn.Linear layers only; export the packed form "
                             "(sqakd_hf.save_packed) instead")
        inputs = act_grid(name, layer.input_quantizer, dynamic=True)
        if layer.weight_quantizer.bits >= 32:
            if inputs is None:
                continue
            raise InputError(f"cannot export layer {name} to compressed-tensors: its activations are quantized but its "
                             "weights are full precision; quantize its weights too (layer_bits) or keep both full "
                             "precision")
        plan.append(_Layer(name, weight_codes(name, layer), inputs))
    if not plan:
        raise InputError(f"{type(model).__name__} has no quantized layer to export")
    return plan


def _target(model: nn.Module, name: str) -> str:
    """``name`` as a compressed-tensors target: exact, or inside the base model a regular expression that also
    matches it without the base-model prefix (so loading the base model class quantizes the same layers)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and name.startswith(prefix + "."):
        return f"re:^(?:{re.escape(prefix)}\\.)?{re.escape(name[len(prefix) + 1:])}$"
    return name


def _args(bits: int, strategy: str, symmetric: bool = True, dynamic: bool = False) -> Dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy, "dynamic": dynamic}


def compressed_tensors_config(model: nn.Module, plan: Optional[List[_Layer]] = None) -> Dict[str, Any]:
    """The ``quantization_config`` (compressed-tensors) of ``model``'s export, validated by compressed-tensors."""
    _require_compressed_tensors()
    from compressed_tensors.quantization import QuantizationConfig

    plan = _plan(model) if plan is None else plan
    groups: Dict[Tuple, Dict[str, Any]] = {}
    for layer in plan:
        key = layer.group_key
        if key not in groups:
            scheme: Dict[str, Any] = {
                "targets": [],
                "weights": _args(layer.weights.bits, "channel" if layer.weights.per_channel else "tensor"),
                "format": layer.format,
            }
            if layer.inputs is not None:
                scheme["input_activations"] = _args(layer.inputs.bits, "token" if layer.dynamic else "tensor",
                                                    layer.inputs.symmetric, layer.dynamic)
            groups[key] = scheme
        groups[key]["targets"].append(_target(model, layer.name))
    quantized = {layer.name for layer in plan}
    ignore = [_target(model, name) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name not in quantized]
    formats = {scheme["format"] for scheme in groups.values()}
    config = QuantizationConfig.model_validate({
        "config_groups": {f"group_{i}": scheme for i, scheme in enumerate(groups.values())},
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "ignore": ignore,
    })
    return config.model_dump()


def compressed_state_dict(model: nn.Module, plan: Optional[List[_Layer]] = None) -> Dict[str, Tensor]:
    """``model``'s state dict in the compressed-tensors layout (keys named as in ``model``)."""
    _require_compressed_tensors()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    plan = _plan(model) if plan is None else plan
    state = {k: v for k, v in model.state_dict().items() if ".weight_quantizer." not in k and ".input_quantizer." not in k}
    for layer in plan:
        weight = state.pop(f"{layer.name}.weight")
        codes = layer.weights.codes.cpu()
        if layer.format == PACK_QUANTIZED:
            state[f"{layer.name}.weight_packed"] = pack_to_int32(codes, layer.weights.bits)
            state[f"{layer.name}.weight_shape"] = torch.tensor(tuple(codes.shape), dtype=torch.int64)
        else:
            state[f"{layer.name}.weight"] = codes
        state[f"{layer.name}.weight_scale"] = layer.weights.scale.to(weight.dtype).cpu()
        if isinstance(layer.inputs, ActGrid):
            state[f"{layer.name}.input_scale"] = layer.inputs.scale.to(weight.dtype).cpu()
            if not layer.inputs.symmetric:
                state[f"{layer.name}.input_zero_point"] = torch.tensor([layer.inputs.zero_point], dtype=torch.int8)
    return {k: v.contiguous() for k, v in state.items()}


@contextlib.contextmanager
def _saving_as(model: nn.Module, quantization_config: Dict[str, Any], state: Dict[str, Tensor]) -> Iterator[None]:
    """While open, ``model.save_pretrained`` writes ``state`` and ``quantization_config`` (transformers still writes
    config.json, drops tied weights and maps key names). The model's own quantizer and config are restored on exit."""
    from transformers import CompressedTensorsConfig
    from transformers.quantizers.base import HfQuantizer

    class _Writer(HfQuantizer):
        requires_calibration = False

        def is_serializable(self, safe_serialization: Optional[bool] = None) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        def get_state_dict_and_metadata(self, _model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
            return dict(state), {}

    ct_config = CompressedTensorsConfig.from_dict(quantization_config)
    missing = object()
    saved = [(model, "hf_quantizer", model.__dict__.get("hf_quantizer", missing)),
             (model.config, "quantization_config", model.config.__dict__.get("quantization_config", missing))]
    model.hf_quantizer, model.config.quantization_config = _Writer(ct_config), ct_config
    try:
        yield
    finally:
        for owner, attr, value in saved:
            if value is missing:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)


def export_compressed_tensors(
    model: Union[nn.Module, str, os.PathLike], save_directory: Union[str, os.PathLike], *, processor: Any = None
) -> Path:
    """Write a quantized transformers student (or a saved quantized folder) as compressed-tensors; returns the folder.

    The folder loads with ``AutoModelFor*.from_pretrained(save_directory)`` without ``import sqakd_hf``
    (``pip install compressed-tensors``) and computes the fake-quant student's function (logits equal up to float
    rounding). ``processor`` (tokenizer / image processor) is saved next to the weights; without one, the
    tokenizer and processor files of the folder the model was loaded from are copied. The write is atomic.

    Raises :class:`~sqakd_hf.errors.InputError` for models the format cannot hold exactly: non-transformers
    models, quantized Conv2d / Conv1D layers, half-integer-zero weight grids wider than 7 bits, activation grids
    without an integer zero point (EWGS, DoReFa signed) or 1-bit sign activations, and per-token activations with a
    learned clip ratio (``act_granularity="per_token"``; ``"per_token_absmax"`` exports as dynamic token activations).
    """
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = Path(model)
        model = load_quantized(source)
    model = unwrap(model)
    if model_library(model) != "transformers":
        raise InputError(f"the compressed-tensors export is for transformers models; {type(model).__name__} is not "
                         "one: export the packed form (sqakd_hf.save_packed) instead")
    plan = _plan(model)
    quantization_config = compressed_tensors_config(model, plan)
    state = compressed_state_dict(model, plan)
    with atomic_save_directory(save_directory) as staging:
        with _saving_as(model, quantization_config, state):
            model.save_pretrained(staging)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(str(staging))
        copy_processor_files(source or source_folder(model), staging)
    return Path(save_directory)
