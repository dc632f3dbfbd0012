"""sqakd-hf: label-free quantization-aware training by self-supervised distillation (SQAKD)
for timm and transformers checkpoints.

Importing the package registers ``quant_method: "sqakd"`` with transformers (before any
``from_pretrained`` can need it) and makes the public API below available; heavy dependencies
(torch, transformers, timm) load only when a name that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict

from . import _registration

from .version import __version__  # noqa: F401  (sqakd_hf.__version__)

#: public name -> module that defines it
_EXPORTS: Dict[str, str] = {
    # core
    "QuantConfig": ".config",
    "quantize_model": ".injection",
    "QuantizationReport": ".injection",
    "is_quantized": ".injection",
    "quant_layers": ".injection",
    "named_quantizers": ".injection",
    "quantizer_parameters": ".injection",
    "get_quant_config": ".injection",
    "calibrate": ".calibration",
    "refresh_quantizer_state": ".calibration",
    "layer_sensitivity": ".mixed_precision",
    "choose_layer_bits": ".mixed_precision",
    "QuantLayer": ".modules",
    "QuantLinear": ".modules",
    "QuantConv2d": ".modules",
    "QuantConv1D": ".modules",
    "Quantizer": ".quantizers",
    "build_quantizer": ".quantizers",
    "METHODS": ".quantizers",
    # errors
    "InputError": ".errors",
    "SQAKDCheckpointError": ".errors",
    "PushToHubError": ".errors",
    "NonFiniteError": ".errors",
    # checkpoints
    "pack_model": ".serialization.packed",
    "save_packed": ".checkpoint",
    "save_quantized": ".checkpoint",
    "load_quantized": ".checkpoint",
    "load_teacher": ".checkpoint",
    "from_pretrained_timm": ".serialization.timm_layout",
    "save_pretrained_timm": ".serialization.timm_layout",
    "SQAKDHfQuantizer": ".integrations.hf_quantizer",
    "export_compressed_tensors": ".export.compressed_tensors",
    "export_onnx": ".export.onnx",
    # training
    "SQAKDTrainer": ".training.trainer",
    "SQAKDTrainingArguments": ".training.args",
    "kd_kl_loss": ".training.losses",
    "kd_kl_per_position": ".training.losses",
    "hidden_state_loss": ".training.losses",
    "evaluate_models": ".training.metrics",
    # sharing
    "model_card_info": ".hub.card_info",
    "write_model_card": ".hub.card_info",
    "push_to_hub": ".hub.push",
    # data
    "load_digits_splits": ".app.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sqakd_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))


_registration.install()
