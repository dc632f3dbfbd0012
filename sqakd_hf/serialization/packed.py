"""Packed low-bit checkpoints: integer weight codes bit-packed into bytes, plus scales.

File layout (``model.safetensors``): every quantized layer ``<name>`` (Linear, conv, Conv1D, and embedding
tables quantized per row with ``embedding_bits``) stores

* ``<name>.weight_packed``: ``uint8`` codes from :func:`sqakd_hf.serialization.packing.pack_codes`
  (row-major order of the weight, first code in the low bits);
* ``<name>.weight_scale`` / ``<name>.weight_zero_point``: the grid, one value per
  output channel (or one per tensor), with ``weight = scale * (code - zero_point)``.

* ``<name>.weight`` (transformers layout): an empty ``uint8`` tensor, a guard. transformers loading the file without
  ``import sqakd_hf`` (quant_method "sqakd" unknown to it) then stops with a size mismatch for that weight instead
  of initialising it at random; with ``sqakd_hf`` the guard is read into an empty placeholder and dropped.

The FP master weight and the weight quantizer's own parameters are dropped; everything
else (full-precision layers, biases, norms, activation quantizers) is kept. The weight of the
full-precision output layer (classifier / LM head, unless tied) is stored in ``fp_dtype``
(float16 by default, float32 if a value would overflow): nothing downstream of it is quantized,
so this only perturbs the logits (about 1e-4 relative); ``fp_dtype=None`` keeps it exact. The
safetensors metadata records the format, each packed layer's bits and shape, what was cast, and the
quantization (:mod:`sqakd_hf.serialization.manifest`). A model holding NaN / inf is not packed, and a
loaded grid holding NaN / inf is refused.

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
from ..quantizers.functional import round_delta, safe_divisor
from .files import LAYERS_KEY, CheckpointHeader
from .manifest import check_finite, check_metadata, local_name, non_finite, quant_metadata
from .packing import pack_codes, packed_num_bytes, unpack_codes

logger = logging.getLogger(__name__)

__all__ = [
    "PackedWeightQuantizer",
    "packed_state_dict",
    "pack_model",
    "as_fp_dtype",
    "prepare_packed_layers",
    "finish_packed_load",
    "check_packed_sizes",
    "load_packed_state_dict",
    "check_not_packed",
    "add_weight_guards",
]

FORMAT_KEY, FORMAT_PACKED = "sqakd_format", "packed"
FP_DTYPE_KEY = "sqakd_fp_dtype"
#: safetensors metadata key: the packed layers' ``weight`` guards are in the file (see :func:`add_weight_guards`)
GUARDS_KEY = "sqakd_weight_guards"
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
        """Use the grid ``scale * (code - zero_point)``; one value per tensor or per output channel."""
        self.scale, self.zero_point = scale, zero_point
        self.param_shape = tuple(scale.shape)
        self.set_signed(True)
        self.mark_initialized()

    def init_from_weight(self, w: Tensor) -> None:
        pass

    def _init_act(self, stats) -> None:  # pragma: no cover - weights only
        raise TypeError("PackedWeightQuantizer quantizes weights only")

    def quantize(self, w: Tensor) -> Tensor:
        codes = round_delta(w / safe_divisor(self.scale) + self.zero_point).clamp(0, self.levels)
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
    check_finite(state, f"the packed form of {type(model).__name__}")
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
        **quant_metadata(model, packed=True),
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


def add_weight_guards(state: Dict[str, Tensor], metadata: Dict[str, str]) -> None:
    """Add the empty ``<name>.weight`` guard of every packed layer listed in ``metadata`` (see the module docstring)
    and record in ``metadata`` that the file has them."""
    for name in json.loads(metadata.get(LAYERS_KEY) or "{}"):
        state[f"{name}.weight"] = torch.zeros(0, dtype=torch.uint8)
    metadata[GUARDS_KEY] = "1"


def _weight_shape(layer: nn.Module) -> Tuple[int, ...]:
    """A packed layer's weight shape (its ``weight`` is a placeholder until :func:`finish_packed_load`)."""
    return tuple(getattr(layer, "packed_weight_shape", layer.weight.shape))


# ---- loading packed layers ------------------------------------------------------------------------
_MISMATCH_FIX = ("The file was not written by sqakd_hf.save_packed for this config; re-export it from the "
                 "training checkpoint.")
_INCOMPLETE_FIX = ("The file is damaged or was not written by sqakd_hf.save_packed; re-export it from the training "
                   "checkpoint (or re-download it).")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _grid_shape(layer: nn.Module, config: QuantConfig) -> Tuple[int, ...]:
    """Shape of a packed layer's ``weight_scale`` / ``weight_zero_point``, as :func:`packed_state_dict` writes it."""
    shape = tuple(layer.weight_quantizer.param_shape)  # per channel / per row, or () per tensor
    return shape if _numel(shape) > 1 else ()


def _check_file(header: CheckpointHeader, where: str) -> List[str]:
    """The checkpoint's packed layers (its own names), each with codes, scale and zero point, codes uint8."""
    bases = sorted({k.rpartition(".")[0] for k in header.shapes if k.rpartition(".")[2] in PACKED_SUFFIXES})
    for base in bases:
        missing = [f"{base}.{s}" for s in PACKED_SUFFIXES if f"{base}.{s}" not in header.shapes]
        if missing:
            problem = f"layer {base}: missing {missing}"
        elif header.dtypes.get(f"{base}.weight_packed", "U8") != "U8":
            problem = f"layer {base}: weight_packed must be uint8, got {header.dtypes[f'{base}.weight_packed']}"
        else:
            continue
        raise SQAKDCheckpointError(f"packed checkpoint {where} is incomplete: {problem}. {_INCOMPLETE_FIX}")
    return bases


def prepare_packed_layers(
    model: nn.Module, header: CheckpointHeader, *, device: Union[str, torch.device] = "meta", prefix: str = ""
) -> List[str]:
    """Turn the quantized layers that the checkpoint stores packed into packed-layer skeletons.

    Which layers are packed, and their bits and weight shapes, come from the checkpoint's metadata
    (layer names as the saving model called them, possibly differing from ``model``'s by the base-model
    ``prefix``), or from its ``*.weight_packed`` names when it has none. Each packed layer gets
    ``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` buffers shaped from its weight shape,
    bits and the config's granularity, and a stateless :class:`PackedWeightQuantizer`; its ``weight``
    becomes a placeholder (empty, to receive the file's guard, where the file has one; else non-persistent, so no
    loader expects it in the checkpoint), made a parameter again by :func:`finish_packed_load`, which also checks the sizes of the loaded tensors. An
    incomplete file, or bits / shapes / layers that contradict the model built from the config, raise
    :class:`SQAKDCheckpointError`. Returns the packed layers' names in ``model``.
    """
    config = get_quant_config(model)
    layers = dict(quant_layers(model))
    where = ", ".join(sorted(set(header.files.values()))) or "<checkpoint>"
    bases = _check_file(header, where)
    recorded = header.packed_layers if LAYERS_KEY in header.metadata else {b: None for b in bases}
    if len(recorded) != len(bases):
        raise SQAKDCheckpointError(
            f"packed checkpoint {where} is incomplete: its metadata lists {len(recorded)} packed layers but it "
            f"holds packed tensors for {len(bases)}. {_INCOMPLETE_FIX}"
        )
    names = {n: local_name(n, layers, prefix) for n in recorded}
    guarded = header.metadata.get(GUARDS_KEY) == "1"
    extra = sorted(n for n, local in names.items() if local is None)
    if extra:
        raise SQAKDCheckpointError(
            f"packed checkpoint {where} holds packed weights for {extra}, which the model built from its "
            "quantization_config does not quantize: modules_to_not_convert / layer_bits differ, the architecture "
            "differs, or the file names the layers otherwise (e.g. saved under another transformers version that "
            "named this architecture's modules differently: re-export it from the training checkpoint)"
        )
    for saved_name, name in names.items():
        layer, info = layers[name], recorded[saved_name] or {}
        weight = layer.weight
        bits, shape = layer.weight_quantizer.bits, tuple(weight.shape)
        if int(info.get("bits", bits)) != bits:
            problem = f"layer {name} was packed with {info['bits']}-bit codes but the config asks for {bits} bits"
        elif tuple(info.get("shape", shape)) != shape:
            problem = f"layer {name} was packed from a weight of shape {tuple(info['shape'])}, the model's is {shape}"
        else:
            problem = ""
        if problem:
            raise SQAKDCheckpointError(
                f"packed checkpoint {where} does not match its quantization_config: {problem}. {_MISMATCH_FIX}"
            )
        grid = _grid_shape(layer, config)
        layer.register_buffer("weight_packed", torch.empty(packed_num_bytes(_numel(shape), bits), dtype=torch.uint8,
                                                           device=device))
        layer.register_buffer("weight_scale", torch.empty(grid, dtype=weight.dtype, device=device))
        layer.register_buffer("weight_zero_point", torch.empty(grid, dtype=weight.dtype, device=device))
        del layer.weight
        layer.packed_weight_shape, layer.packed_weight_dtype = shape, weight.dtype
        if guarded:  # the file's empty guard loads into an empty placeholder
            layer.register_buffer("weight", torch.empty(0, dtype=torch.uint8, device=device))
        else:
            layer.register_buffer("weight", torch.empty(shape, dtype=weight.dtype, device=device), persistent=False)
        layer.weight_quantizer = PackedWeightQuantizer(bits, grid, layer.channel_axis).to(device)
    return sorted(names.values())


def _size_problem(name: str, layer: nn.Module, shapes: Mapping[str, Tuple[int, ...]]) -> str:
    """What is wrong with the sizes of a packed layer's tensors (``shapes`` by suffix), or ``""``."""
    bits, shape = layer.weight_quantizer.bits, _weight_shape(layer)
    got, need = _numel(shapes["weight_packed"]), packed_num_bytes(_numel(shape), bits)
    if got != need:
        fits = [b for b in range(1, 9) if packed_num_bytes(_numel(shape), b) == got]
        hint = f" (that size fits {fits[0]}-bit codes)" if fits else ""
        return (f"layer {name}: {got} bytes of packed codes, but {bits}-bit codes of its weight of shape {shape} "
                f"need {need} bytes{hint}")
    channels = shape[layer.channel_axis % len(shape)]
    for suffix in ("weight_scale", "weight_zero_point"):
        n = _numel(shapes[suffix])
        if n not in (1, channels):
            return f"layer {name}: {suffix} has {n} values, expected 1 or {channels} (one per output channel)"
    return ""


def _packed_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in quant_layers(model) if "weight_packed" in m._buffers]


def check_packed_sizes(model: nn.Module, shapes: Mapping[str, Tuple[int, ...]], where: str) -> None:
    """Raise :class:`SQAKDCheckpointError` if the packed tensors (``shapes`` by the model's key names) do
    not fit the packed layers that :func:`prepare_packed_layers` made."""
    for name, layer in _packed_layers(model):
        missing = [f"{name}.{s}" for s in PACKED_SUFFIXES if f"{name}.{s}" not in shapes]
        problem = f"layer {name}: missing {missing}" if missing else _size_problem(
            name, layer, {s: shapes[f"{name}.{s}"] for s in PACKED_SUFFIXES})
        if problem:
            raise SQAKDCheckpointError(
                f"packed checkpoint {where} does not match its quantization_config: {problem}. {_MISMATCH_FIX}"
            )


@torch.no_grad()
def finish_packed_load(model: nn.Module, where: str = "<checkpoint>") -> List[str]:
    """After the packed buffers were loaded: check their sizes (:func:`check_packed_sizes`), dequantize the
    codes into each packed layer's ``weight`` (a parameter again), hand the grid to its
    :class:`PackedWeightQuantizer` and drop the buffers. Returns the layer names."""
    layers = _packed_layers(model)
    check_packed_sizes(model, {f"{n}.{s}": tuple(m._buffers[s].shape) for n, m in layers for s in PACKED_SUFFIXES},
                       where)
    bad = non_finite({f"{n}.{s}": m._buffers[s] for n, m in layers for s in PACKED_SUFFIXES[1:]})
    if bad:
        layer, _, suffix = bad[0].rpartition(".")
        raise SQAKDCheckpointError(
            f"packed checkpoint {where} is damaged: layer {layer}: {suffix} holds NaN or infinite values"
            f"{f' (so do {bad[1:4]})' if len(bad) > 1 else ''}; its weights cannot be dequantized. {_INCOMPLETE_FIX}"
        )
    for name, layer in layers:
        wq = layer.weight_quantizer
        placeholder, shape = layer.weight, _weight_shape(layer)
        grid = tuple(type(layer).quantizer_param_shape(shape))
        codes = layer._buffers.pop("weight_packed")
        scale = layer._buffers.pop("weight_scale")
        grid = grid if scale.numel() > 1 else ()
        scale = scale.reshape(grid)
        zero = layer._buffers.pop("weight_zero_point").to(scale.dtype).reshape(grid)
        codes = unpack_codes(codes, wq.bits, shape).to(device=scale.device, dtype=scale.dtype)
        weight = (scale * (codes - zero)).to(device=placeholder.device, dtype=layer.packed_weight_dtype)
        del layer.weight, layer.packed_weight_shape, layer.packed_weight_dtype
        layer.weight = nn.Parameter(weight)
        wq.set_grid(scale.to(placeholder.device), zero.to(placeholder.device))
    return [n for n, _ in layers]


def load_packed_state_dict(model: nn.Module, state: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]] = None,
                           *, source: str = "<state dict>", prefix: str = "") -> nn.Module:
    """Load a packed state dict (keys named as in ``model``) into a freshly quantized, not yet loaded
    ``nn.Module``, strictly. ``prefix``: see :func:`prepare_packed_layers`.

    Raises :class:`SQAKDCheckpointError` on shape/bit mismatches, missing or unexpected keys.
    """
    header = CheckpointHeader(
        shapes={k: tuple(v.shape) for k, v in state.items()},
        dtypes={k: _ST_DTYPES.get(v.dtype, str(v.dtype)) for k, v in state.items()},
        metadata=dict(metadata or {}),
        files={k: source for k in state},
    )
    device = next(model.parameters()).device
    prepare_packed_layers(model, header, device=device, prefix=prefix)
    check_metadata(model, header, source, prefix=prefix)
    check_packed_sizes(model, header.shapes, source)
    packed_keys = set()
    for name, layer in _packed_layers(model):  # set as stored: a grid may hold one value or one per channel
        for suffix in PACKED_SUFFIXES:
            key = f"{name}.{suffix}"
            setattr(layer, suffix, state[key].to(device=device, dtype=layer._buffers[suffix].dtype))
            packed_keys.add(key)
    result = model.load_state_dict({k: v for k, v in state.items() if k not in packed_keys}, strict=False)
    missing = [k for k in result.missing_keys if k not in packed_keys]
    if missing or result.unexpected_keys:
        raise SQAKDCheckpointError(
            f"checkpoint {source} does not match the model built from its config: missing keys {missing[:10]}, "
            f"unexpected keys {list(result.unexpected_keys)[:10]}"
        )
    finish_packed_load(model, source)
    return model


_ST_DTYPES = {torch.uint8: "U8", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def check_not_packed(keys, source: str) -> None:
    """A training-form config (``packed=false``) over packed weights: the config.json does not belong to them."""
    if any(k.endswith(".weight_packed") for k in keys):
        raise SQAKDCheckpointError(
            f"{source} holds packed weights but its quantization_config says packed=false; the config.json does not "
            "belong to these weights"
        )
