"""What a quantized checkpoint says it holds, and the checks that hold it to that.

Every checkpoint we write (training form and packed form, transformers and timm layout) carries
one safetensors metadata entry, :data:`QUANT_KEY`: JSON of the quant method, weight / activation
bits, weight and activation granularity, form (packed or not), the quantized layers, and the bits of the layers
whose bits differ from the global ones (``layer_bits``). Loading cross-checks ``config.json``'s
``quantization_config`` against it (:func:`check_metadata`) and checks that every quantized layer's
tensors are in the files (:func:`check_tensors_present`), so an edited ``config.json`` or a damaged
file fails with :class:`~sqakd_hf.errors.SQAKDCheckpointError` instead of loading as another model.
Checkpoints written before the entry existed skip the cross-check.

:func:`non_finite` / :func:`check_finite` find NaN / infinite tensors with one fused reduction.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import SQAKDCheckpointError
from ..injection import get_quant_config, quant_layers
from .files import CheckpointHeader

logger = logging.getLogger(__name__)

__all__ = [
    "QUANT_KEY",
    "quant_metadata",
    "local_name",
    "check_metadata",
    "check_tensors_present",
    "legacy_scalar_keys",
    "non_finite",
    "check_finite",
]

#: safetensors metadata key: JSON description of the quantization the tensors were saved with
QUANT_KEY = "sqakd_quant"
#: QuantConfig fields recorded in :data:`QUANT_KEY` and compared on load
#: (a record without a field, written before it was recorded, is not checked on that field)
RECORDED_FIELDS = ("method", "weight_bits", "act_bits", "weight_granularity", "act_granularity", "packed")
_RESAVE = ("re-save the checkpoint from the model it belongs to (sqakd_hf.save_quantized / save_packed), or "
           "re-download it (from_pretrained(..., force_download=True))")


# ---- writing --------------------------------------------------------------------------------------
def _layer_bits(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    return {name: (int(layer.weight_quantizer.bits), int(layer.input_quantizer.bits))
            for name, layer in quant_layers(model)}


def quant_metadata(model: nn.Module, *, packed: Optional[bool] = None) -> Dict[str, str]:
    """``{QUANT_KEY: json}`` describing ``model``'s quantization (layer names as ``model`` names them).
    ``packed``: the form being written (default: the model's config)."""
    config = get_quant_config(model)
    record: Dict[str, Any] = {f: getattr(config, f) for f in RECORDED_FIELDS}
    if packed is not None:
        record["packed"] = bool(packed)
    layers = _layer_bits(model)
    record["layers"] = sorted(layers)
    default = (config.weight_bits, config.act_bits)
    record["layer_bits"] = {n: {"weight_bits": w, "act_bits": a} for n, (w, a) in sorted(layers.items())
                            if (w, a) != default}
    return {QUANT_KEY: json.dumps(record, sort_keys=True)}


# ---- names ----------------------------------------------------------------------------------------
def local_name(name: str, names: Mapping[str, Any], prefix: str) -> Optional[str]:
    """``name`` (from a checkpoint) as a key of ``names``: as is, or with the base-model ``prefix`` removed
    or added (a head model's file read by its base model, transformers' timm wrapper and timm's own
    layout, and the reverse). None if neither is a key."""
    if name in names:
        return name
    if prefix:
        dotted = prefix + "."
        other = name[len(dotted):] if name.startswith(dotted) else dotted + name
        if other in names:
            return other
    return None


# ---- loading: config.json against the metadata ----------------------------------------------------
def _mismatch(where: str, problem: str, fix: str) -> SQAKDCheckpointError:
    return SQAKDCheckpointError(
        f"checkpoint {where} does not match its config.json: {problem}. Loading it would silently compute a "
        f"different model. Fix: {fix}, or {_RESAVE}."
    )


def _read_record(header: CheckpointHeader, where: str) -> Optional[Dict[str, Any]]:
    raw = header.metadata.get(QUANT_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        if not isinstance(record, dict) or not isinstance(record.get("layers"), list):
            raise ValueError("not a JSON object with a 'layers' list")
    except ValueError as err:
        raise SQAKDCheckpointError(
            f"checkpoint {where}: the safetensors metadata entry {QUANT_KEY!r} is unreadable ({err}); the file was "
            f"edited or damaged. Fix: {_RESAVE}."
        ) from None
    return record


def check_metadata(model: nn.Module, header: CheckpointHeader, where: str, *, prefix: str = "") -> None:
    """Cross-check the quantized skeleton ``model`` (built from ``config.json``) against the quantization
    recorded in the checkpoint's metadata: global fields, which layers are quantized, and each layer's
    bits. Raises :class:`SQAKDCheckpointError` naming the field or layer; a checkpoint without the
    record (written before it existed) is not checked."""
    record = _read_record(header, where)
    if record is None:
        if not header.shapes:  # nothing read from files (e.g. a state dict passed in memory)
            return
        logger.info("sqakd: %s records no quantization metadata (saved by an older sqakd_hf); config.json is not "
                    "cross-checked against the weights", where)
        return
    config = get_quant_config(model)
    for field in RECORDED_FIELDS:
        if field in record and record[field] != getattr(config, field):
            saved, now = record[field], getattr(config, field)
            raise _mismatch(where, f"quantization_config.{field} is {json.dumps(now)} but the weights were saved "
                                   f"with {field}={json.dumps(saved)}",
                            f"set quantization_config.{field} back to {json.dumps(saved)} in config.json")
    ours = _layer_bits(model)
    modules = dict(model.named_modules())
    default = (record.get("weight_bits"), record.get("act_bits"))
    overrides = record.get("layer_bits") or {}
    recorded: Dict[str, Tuple[Any, Any]] = {}
    for saved_name in record["layers"]:
        name = local_name(saved_name, modules, prefix)
        if name is None:  # a layer this model class does not have (e.g. a head read by its base model)
            continue
        bits = overrides.get(saved_name) or {}
        recorded[name] = (bits.get("weight_bits", default[0]), bits.get("act_bits", default[1]))
    fix_layers = ("restore quantization_config's modules_to_not_convert / layer_bits in config.json to the values "
                  "the checkpoint was saved with")
    kept_fp = sorted(n for n in recorded if n not in ours)
    if kept_fp:
        raise _mismatch(where, f"layer(s) {kept_fp[:5]} were quantized when saved but the model built from "
                               "config.json keeps them full precision", fix_layers)
    extra = sorted(n for n in ours if n not in recorded)
    if extra:
        raise _mismatch(where, f"layer(s) {extra[:5]} are quantized by the model built from config.json but were "
                               "full precision when saved", fix_layers)
    for name, (w, a) in sorted(recorded.items()):
        have = ours[name]
        for side, saved, now in (("weight_bits", w, have[0]), ("act_bits", a, have[1])):
            if saved != now:
                raise _mismatch(where, f"layer {name} gets {side}={now} from config.json but was saved with "
                                       f"{side}={saved}", f"restore quantization_config's {side} / layer_bits in "
                                                          f"config.json (this layer was saved with {side}={saved})")


# ---- loading: the tensors each quantized layer needs ----------------------------------------------
def _tied_targets(model: nn.Module) -> set:
    """Keys transformers does not store because they are tied to another parameter."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, Mapping) else set()


_LAYER_TENSOR = re.compile(r"^(?P<base>.+)\.(?P<suffix>(?:weight_quantizer|input_quantizer)\.[^.]+|weight_packed|"
                           r"weight_scale|weight_zero_point|weight|bias)$")
_QUANT_SUFFIX = re.compile(r"^(?:weight_quantizer\.|input_quantizer\.|weight_packed$)")


def _incomplete(where: str, layer: str, missing: Sequence[str]) -> SQAKDCheckpointError:
    hint = ""
    if any("_quantizer." in k for k in missing):
        hint = (" If config.json was edited, its quantization_config (method / weight_granularity / "
                "modules_to_not_convert / layer_bits) no longer matches these weights: restore it.")
    return SQAKDCheckpointError(
        f"checkpoint {where} is incomplete: quantized layer {layer} has no {list(missing)[:6]} in its weight files; "
        f"loading would leave {'them' if len(missing) > 1 else 'it'} randomly initialised.{hint} Fix: {_RESAVE}."
    )


def check_tensors_present(model: nn.Module, header: CheckpointHeader, where: str, *, prefix: str = "",
                          skip_shapes: Sequence[str] = ()) -> None:
    """Every persistent tensor of every quantized layer of the skeleton ``model`` (weight or packed codes,
    bias, quantizer tensors) must be in the checkpoint, at the skeleton's shape (keys whose last part is in
    ``skip_shapes`` are checked later, by size). Raises :class:`SQAKDCheckpointError` naming the layer
    and the missing tensors: otherwise the loader would initialise them at random.

    Layers found under the model's names (or with the base-model ``prefix``) are checked key by key. Layers
    the file names otherwise (transformers renames some architectures' keys when loading) are checked as a
    whole: the file's remaining quantized layers must hold the same sets of tensors."""
    if not header.shapes:
        return
    tied = _tied_targets(model)
    used: set = set()
    unnamed: Dict[str, frozenset] = {}
    for name, layer in quant_layers(model):
        expected = {key: tuple(t.shape) for key, t in layer.state_dict(keep_vars=True).items()
                    if f"{name}.{key}" not in tied}
        stored = {key: local_name(f"{name}.{key}", header.shapes, prefix) for key in expected}
        if all(v is None for v in stored.values()):
            unnamed[name] = frozenset(expected)
            continue
        missing = [f"{name}.{k}" for k, v in stored.items() if v is None]
        if missing:
            raise _incomplete(where, name, missing)
        for key, file_key in stored.items():
            used.add(file_key)
            if key.rpartition(".")[2] not in skip_shapes and not _fits(header.shapes[file_key], expected[key]):
                raise _mismatch(where, f"{file_key} has shape {tuple(header.shapes[file_key])} in the file but "
                                       f"{expected[key]} in the model built from config.json",
                                "restore quantization_config's weight_granularity / method in config.json")
    if unnamed:
        _check_renamed_layers(unnamed, header, used, where)


def _fits(stored: Sequence[int], expected: Tuple[int, ...]) -> bool:
    """A stored shape loads into the model's: equal, or a 0-dim per-tensor quantizer tensor written before they
    became 1-element 1-D tensors (reshaped on load)."""
    return tuple(stored) == expected or (tuple(stored) == () and expected == (1,))


def legacy_scalar_keys(model: nn.Module, header: CheckpointHeader, *, prefix: str = "") -> List[str]:
    """Model names of the quantizer tensors that are ``(1,)`` in ``model`` but 0-dim in the checkpoint (per-tensor
    parameters as checkpoints written before they became 1-element 1-D tensors hold them)."""
    out = []
    for name, layer in quant_layers(model):
        for key, t in layer.state_dict(keep_vars=True).items():
            file_key = local_name(f"{name}.{key}", header.shapes, prefix) if "quantizer." in key else None
            if file_key is not None and tuple(t.shape) == (1,) and tuple(header.shapes[file_key]) == ():
                out.append(f"{name}.{key}")
    return out


def _check_renamed_layers(unnamed: Dict[str, frozenset], header: CheckpointHeader, used: set, where: str) -> None:
    """The model's quantized layers not found by name against the file's quantized layers not used yet:
    the same number of layers, each file layer holding one model layer's set of tensors."""
    bases: Dict[str, set] = {}
    for key in header.shapes:
        m = _LAYER_TENSOR.match(key)
        if m and key not in used:
            bases.setdefault(m["base"], set()).add(m["suffix"])
    files = {b: frozenset(sig) for b, sig in bases.items() if any(_QUANT_SUFFIX.match(s) for s in sig)}
    pool = sorted(unnamed.values(), key=len, reverse=True)
    leftover: Dict[str, frozenset] = {}
    for base, sig in sorted(files.items()):
        if sig in pool:
            pool.remove(sig)
        else:
            leftover[base] = sig
    if not pool and not leftover:
        return
    for base, sig in leftover.items():  # a file layer lacking tensors of an expected layer
        closest = next((want for want in pool if sig < want), None)
        if closest is not None:
            raise _incomplete(where, f"{base} (as the file names it)", [f"{base}.{k}" for k in sorted(closest - sig)])
    if leftover:
        base, sig = next(iter(leftover.items()))
        want = min(pool, key=lambda w: len(w ^ sig)) if pool else frozenset()
        raise _incomplete(where, f"{base} (as the file names it)", [f"{base}.{k}" for k in sorted(want - sig)] or
                          [f"{base}.<tensors of a quantized layer; it holds {sorted(sig - want)}>"])
    names = sorted(n for n, sig in unnamed.items())
    raise SQAKDCheckpointError(
        f"checkpoint {where} is incomplete: it holds tensors for {len(files)} quantized layers under names that "
        f"differ from the model's, but the model built from config.json has {len(unnamed)} such layers "
        f"({names[:5]}{' ...' if len(names) > 5 else ''}); the missing ones would be initialised at random. "
        f"If config.json was edited (modules_to_not_convert / layer_bits), restore it. Fix: {_RESAVE}."
    )


# ---- finiteness -----------------------------------------------------------------------------------
def non_finite(tensors: Mapping[str, Tensor]) -> List[str]:
    """Names of the floating-point tensors holding a NaN or an infinity.

    One reduction per tensor, read with one host sync per device: the L1 norm accumulated in float32 (a NaN
    or an inf makes it non-finite); flagged tensors are confirmed with ``isfinite``, so that a finite sum
    that overflowed is not reported."""
    groups: Dict[torch.device, List[Tuple[str, Tensor]]] = {}
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.is_floating_point() and t.numel() and t.device.type != "meta":
            groups.setdefault(t.device, []).append((name, t.detach()))
    bad: List[str] = []
    for items in groups.values():
        ts = [t for _, t in items]
        norms = torch.stack([torch.linalg.vector_norm(t, 1, dtype=torch.float32) for t in ts])
        flagged = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
        bad += [items[i][0] for i in flagged if not bool(torch.isfinite(items[i][1]).all())]
    return bad


def check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """Raise ``ValueError`` naming the tensors of ``tensors`` (a state dict) that hold NaN or inf."""
    bad = non_finite(tensors)
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(
            f"refusing to save {what}: {len(bad)} tensor(s) hold NaN or infinite values: {bad[:5]}{more}. The "
            "model has diverged; nothing was written. Fix: resume from an earlier checkpoint (lower the learning "
            "rate or clip gradients), or re-initialise the named quantizers with sqakd_hf.calibrate."
        )
