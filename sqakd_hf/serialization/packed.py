"""Packed low-bit checkpoints: integer weight codes bit-packed into bytes, plus scales.

File layout (``model.safetensors``): every quantized layer ``<name>`` stores

* ``<name>.weight_packed``: ``uint8`` codes from :func:`sqakd_hf.serialization.packing.pack_codes`
  (row-major order of the weight, first code in the low bits);
* ``<name>.weight_scale`` / ``<name>.weight_zero_point``: the grid, one value per
  output channel (or one per tensor), with ``weight = scale * (code - zero_point)``.

The FP master weight and the weight quantizer's own parameters are dropped; everything
else (full-precision layers, biases, norms, activation quantizers) is kept. The weight of the
full-precision output layer (classifier / LM head, unless tied) is stored in ``fp_dtype``
(float16 by default, float32 if a value would overflow): nothing downstream of it is quantized,
so this only perturbs the logits (about 1e-4 relative); ``fp_dtype=None`` keeps it exact. The
safetensors metadata records the format, each packed layer's bits and shape, and what was cast.

Loading dequantizes the codes into the layer's ``weight`` once and replaces its weight
quantizer by a :class:`PackedWeightQuantizer` that holds the stored grid; the loaded
weight lies exactly on that grid, so the model computes the same function as the
fake-quant model it was packed from (up to float rounding of ``scale * (code - zero)``).
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import SQAKDCheckpointError
from ..injection import get_quant_config, quant_layers
from ..quantizers import Quantizer
from ..quantizers.functional import round_delta
from .files import LAYERS_KEY, CheckpointHeader
from .packing import pack_codes, packed_num_bytes, unpack_codes

logger = logging.getLogger(__name__)

__all__ = [
    "PackedWeightQuantizer",
    "packed_state_dict",
    "pack_model",
    "as_fp_dtype",
    "prepare_packed_layers",
    "finish_packed_load",
    "load_packed_state_dict",
    "check_not_packed",
]

FORMAT_KEY, FORMAT_PACKED = "sqakd_format", "packed"
FP_DTYPE_KEY = "sqakd_fp_dtype"
PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point")
_FP16_MAX = torch.finfo(torch.float16).max
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---- the quantizer of a loaded packed layer ------------------------------------------------------
class PackedWeightQuantizer(Quantizer):
    """Fixed grid ``scale * (code - zero_point)`` with codes ``0 .. 2**bits - 1`` read from a packed
    checkpoint. Forward rounds onto that grid (straight-through backward); a weight already on the
    grid passes unchanged, bit for bit. Nothing is learned."""

    method = "packed"

    def __init__(self, bits: int, param_shape: Tuple[int, ...] = (), channel_axis: int = 0) -> None:
        super().__init__(bits, "weight", param_shape, channel_axis)
        # flags are constant (signed weight, initialised): keep them out of checkpoints
        self._non_persistent_buffers_set.update({"signed_flag", "initialized_flag"})
        self.register_buffer("scale", None)  # set by set_grid once the checkpoint is read
        self.register_buffer("zero_point", None)

    def set_grid(self, scale: Tensor, zero_point: Tensor) -> None:
        self.scale, self.zero_point = scale, zero_point
        self.set_signed(True)
        self.mark_initialized()

    def init_from_weight(self, w: Tensor) -> None:
        pass

    def _init_act(self, stats) -> None:  # pragma: no cover - weights only
        raise TypeError("PackedWeightQuantizer quantizes weights only")

    def quantize(self, w: Tensor) -> Tensor:
        codes = round_delta(w / self.scale + self.zero_point).clamp(0, self.levels)
        return self.scale * (codes - self.zero_point)

    def grid(self, w: Tensor):
        return self.scale, self.zero_point, 0, self.levels


# ---- packing --------------------------------------------------------------------------------------
def _tied_modules(model: nn.Module) -> set:
    """Names of modules whose ``weight`` is also another module's parameter (tied weights)."""
    owners: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {n.rpartition(".")[0] for names in owners.values() if len(names) > 1 for n in names if n.endswith("weight")}


def _output_head(model: nn.Module) -> Optional[str]:
    """Name of the output layer (classifier head / LM head): nothing downstream of it is quantized."""
    names = {id(m): n for n, m in model.named_modules()}
    for owner, getter in ((model, "get_output_embeddings"), (model, "get_classifier"),
                          (getattr(model, "timm_model", None), "get_classifier")):
        fn = getattr(owner, getter, None) if owner is not None else None
        try:
            head = fn() if fn is not None else None
        except (NotImplementedError, AttributeError, TypeError):
            head = None
        if isinstance(head, nn.Module) and id(head) in names and isinstance(getattr(head, "weight", None), Tensor):
            return names[id(head)]
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return linear[-1] if linear else None


@torch.no_grad()
def packed_state_dict(
    model: nn.Module, fp_dtype: Optional[torch.dtype] = torch.float16
) -> Tuple[Dict[str, Tensor], QuantConfig, Dict[str, str]]:
    """``(state dict, config with packed=True, safetensors metadata)`` of the packed form, in the model's
    own key names. Quantized layers with 1..8-bit weights are packed, except tied ones (stored as is)."""
    config = get_quant_config(model)
    state = dict(model.state_dict())
    shared = _tied_modules(model)
    layers: Dict[str, dict] = {}
    for name, layer in quant_layers(model):
        wq = layer.weight_quantizer
        if not 1 <= wq.bits <= 8:
            continue
        if name in shared:
            logger.info("sqakd: %s shares its weight with another layer (tied); stored unpacked", name)
            continue
        if not wq.initialized:
            raise ValueError(
                f"cannot pack {name}: its weight quantizer is not initialised; run sqakd_hf.calibrate(model, batches) "
                "(or train with SQAKDTrainer) before exporting"
            )
        w = layer.weight.detach()
        scale, zero, _, _ = wq.grid(w)
        codes = wq.codes(w)
        shape = tuple(wq.param_shape) if scale.numel() > 1 else ()
        for key in [k for k in state if k == f"{name}.weight" or k.startswith(f"{name}.weight_quantizer.")]:
            del state[key]
        state[f"{name}.weight_packed"] = pack_codes(codes, wq.bits)
        state[f"{name}.weight_scale"] = scale.detach().reshape(shape).clone()
        state[f"{name}.weight_zero_point"] = zero.detach().to(scale.dtype).reshape(shape).clone()
        layers[name] = {"bits": wq.bits, "shape": list(w.shape)}
    head = _output_head(model)
    head_key = f"{head}.weight" if head is not None and head not in layers else None
    downcast = None
    if fp_dtype is not None and head_key is not None and head not in shared:
        t = state.get(head_key)
        fits = fp_dtype != torch.float16 or (t is not None and bool(t.abs().max() <= _FP16_MAX))
        if t is not None and t.dtype == torch.float32 and fits:
            state[head_key] = t.to(fp_dtype)
            downcast = head_key
    metadata = {
        "format": "pt",
        FORMAT_KEY: FORMAT_PACKED,
        LAYERS_KEY: json.dumps(layers, sort_keys=True),
        FP_DTYPE_KEY: json.dumps({downcast: str(fp_dtype).replace("torch.", "")} if downcast else {}),
    }
    packed_config = copy.deepcopy(config)
    packed_config.packed = True
    return {k: v.contiguous() for k, v in state.items()}, packed_config, metadata


def as_fp_dtype(fp_dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """Validate ``fp_dtype`` (``"float16"``, ``"bfloat16"``, ``"float32"``, a torch dtype, or None)."""
    if isinstance(fp_dtype, str):
        if fp_dtype not in _DTYPES:
            raise ValueError(f"fp_dtype must be one of {', '.join(_DTYPES)} or None; got {fp_dtype!r}")
        fp_dtype = _DTYPES[fp_dtype]
    if fp_dtype is not None and fp_dtype not in _DTYPES.values():
        raise ValueError(f"fp_dtype must be one of {', '.join(_DTYPES)} or None; got {fp_dtype!r}")
    return fp_dtype


def pack_model(
    model: nn.Module, *, fp_dtype: Union[None, str, torch.dtype] = torch.float16
) -> Tuple[Dict[str, Tensor], QuantConfig]:
    """Packed state dict of a quantized model and its config (``packed=True``); the model is unchanged.

    Keys keep the model's own names (``timm_model.`` included for transformers' timm wrapper);
    :func:`save_packed` writes the on-disk names. Raises ``ValueError`` if a weight quantizer
    is not initialised.
    """
    state, config, _ = packed_state_dict(model, as_fp_dtype(fp_dtype))
    return state, config


# ---- loading packed layers ------------------------------------------------------------------------
def prepare_packed_layers(
    model: nn.Module, header: CheckpointHeader, *, device: Union[str, torch.device] = "meta"
) -> List[str]:
    """Turn the quantized layers that the checkpoint stores packed into packed-layer skeletons.

    Each gets ``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` buffers shaped as in the
    checkpoint and a :class:`PackedWeightQuantizer`; its ``weight`` is filled by
    :func:`finish_packed_load`. Shapes and bit-widths are checked against the model built from
    the config; any mismatch raises :class:`SQAKDCheckpointError`. ``header`` must use the model's
    own parameter names. Returns the layer names.
    """
    layers = dict(quant_layers(model))
    recorded = header.packed_layers
    where = sorted(set(header.files.values())) or ["<checkpoint>"]
    packed_in_file = {k[: -len(".weight_packed")] for k in header.shapes if k.endswith(".weight_packed")}
    names: List[str] = []
    seen: set = set()
    for name, layer in layers.items():
        if f"{name}.weight_packed" not in header.shapes:
            continue
        base = name
        seen.add(base)
        wq = layer.weight_quantizer
        bits, shape = wq.bits, tuple(layer.weight.shape)
        problem = _packed_problem(name, base, bits, shape, layer.channel_axis, header, recorded.get(base))
        if problem:
            raise SQAKDCheckpointError(
                f"packed checkpoint {', '.join(where)} does not match its quantization_config: {problem}. "
                "The file was not written by sqakd_hf.save_packed for this config; re-export it from the "
                "training checkpoint."
            )
        for suffix in PACKED_SUFFIXES:
            k = f"{base}.{suffix}"
            dtype = torch.uint8 if suffix == "weight_packed" else layer.weight.dtype
            layer.register_buffer(suffix, torch.empty(header.shapes[k], dtype=dtype, device=device))
        param_shape = type(layer).quantizer_param_shape(layer.weight.shape)
        n_scale = 1
        for s in header.shapes[f"{base}.weight_scale"]:
            n_scale *= s
        layer.weight_quantizer = PackedWeightQuantizer(bits, param_shape if n_scale > 1 else (), layer.channel_axis)
        names.append(name)
    extra = sorted(packed_in_file - seen)
    if extra:
        raise SQAKDCheckpointError(
            f"packed checkpoint {', '.join(where)} holds packed weights for {extra}, which its quantization_config "
            "does not quantize (modules_to_not_convert / layer_bits differ, or the architecture differs)"
        )
    return names


def _packed_problem(name, base, bits, shape, axis, header: CheckpointHeader, recorded: Optional[dict]) -> str:
    shapes = header.shapes
    missing = [f"{base}.{s}" for s in PACKED_SUFFIXES if f"{base}.{s}" not in shapes]
    if missing:
        return f"layer {name}: missing {missing}"
    if recorded is not None:
        if int(recorded.get("bits", bits)) != bits:
            return f"layer {name} was packed with {recorded['bits']}-bit codes but the config asks for {bits} bits"
        if tuple(recorded.get("shape", shape)) != shape:
            return f"layer {name} was packed from a weight of shape {tuple(recorded['shape'])}, the model's is {shape}"
    if header.dtypes.get(f"{base}.weight_packed") != "U8":
        return f"layer {name}: weight_packed must be uint8, got {header.dtypes.get(f'{base}.weight_packed')}"
    numel = 1
    for s in shape:
        numel *= s
    got = 1
    for s in shapes[f"{base}.weight_packed"]:
        got *= s
    need = packed_num_bytes(numel, bits)
    if got != need:
        fits = [b for b in range(1, 9) if packed_num_bytes(numel, b) == got]
        hint = f" (that size fits {fits[0]}-bit codes)" if fits else ""
        return (f"layer {name}: {got} bytes of packed codes, but {bits}-bit codes of its weight of shape {shape} "
                f"need {need} bytes{hint}")
    channels = shape[axis % len(shape)]
    for suffix in ("weight_scale", "weight_zero_point"):
        n = 1
        for s in shapes[f"{base}.{suffix}"]:
            n *= s
        if n not in (1, channels):
            return f"layer {name}: {suffix} has {n} values, expected 1 or {channels} (one per output channel)"
    return ""


@torch.no_grad()
def finish_packed_load(model: nn.Module) -> List[str]:
    """After the packed buffers were loaded: dequantize the codes into each packed layer's ``weight``,
    hand the grid to its :class:`PackedWeightQuantizer` and drop the buffers. Returns the layer names."""
    done = []
    for name, layer in quant_layers(model):
        packed = layer._buffers.get("weight_packed")
        if packed is None:
            continue
        wq = layer.weight_quantizer
        shape = wq.param_shape if wq.param_shape else ()
        scale = layer._buffers.pop("weight_scale").reshape(shape)
        zero = layer._buffers.pop("weight_zero_point").to(scale.dtype).reshape(shape)
        del layer._buffers["weight_packed"]
        codes = unpack_codes(packed, wq.bits, tuple(layer.weight.shape)).to(device=scale.device, dtype=scale.dtype)
        weight = scale * (codes - zero)
        layer.weight.data = weight.to(device=layer.weight.device, dtype=layer.weight.dtype)
        wq.set_grid(scale.to(layer.weight.device), zero.to(layer.weight.device))
        done.append(name)
    return done


def load_packed_state_dict(model: nn.Module, state: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]] = None,
                           *, source: str = "<state dict>") -> nn.Module:
    """Load a packed state dict into a freshly quantized (not yet loaded) ``nn.Module``, strictly.

    Raises :class:`SQAKDCheckpointError` on shape/bit mismatches, missing or unexpected keys.
    """
    header = CheckpointHeader(
        shapes={k: tuple(v.shape) for k, v in state.items()},
        dtypes={k: _ST_DTYPES.get(v.dtype, str(v.dtype)) for k, v in state.items()},
        metadata=dict(metadata or {}),
        files={k: source for k in state},
    )
    device = next(model.parameters()).device
    packed = prepare_packed_layers(model, header, device=device)
    result = model.load_state_dict(dict(state), strict=False)
    allowed = {f"{n}.weight" for n in packed}
    missing = [k for k in result.missing_keys if k not in allowed]
    if missing or result.unexpected_keys:
        raise SQAKDCheckpointError(
            f"checkpoint {source} does not match the model built from its config: missing keys {missing[:10]}, "
            f"unexpected keys {list(result.unexpected_keys)[:10]}"
        )
    finish_packed_load(model)
    return model


_ST_DTYPES = {torch.uint8: "U8", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def check_not_packed(keys, source: str) -> None:
    """A training-form config (``packed=false``) over packed weights: the config.json does not belong to them."""
    if any(k.endswith(".weight_packed") for k in keys):
        raise SQAKDCheckpointError(
            f"{source} holds packed weights but its quantization_config says packed=false; the config.json does not "
            "belong to these weights"
        )
