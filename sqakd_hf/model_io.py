"""Calling a model on a batch and reading its output, for any model: transformers
(keyword inputs, ``ModelOutput``), timm-native (``forward(x)``, a tensor) or plain torch.

Nothing here knows about quantization; everything above (calibration, training, evaluation,
the benchmark) calls models through these helpers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "LABEL_KEYS",
    "POSITIONAL_KEYS",
    "unwrap",
    "to_device",
    "split_labels",
    "forward_params",
    "call_model",
    "call_input",
    "output_tensor",
    "padding_mask",
]

#: batch keys that are targets, never model inputs
LABEL_KEYS = ("labels", "label", "label_ids")
#: batch keys fed positionally to models whose forward takes one tensor (timm-native modules)
POSITIONAL_KEYS = ("pixel_values", "x", "input", "inputs", "input_ids")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / DeepSpeed / ``torch.compile`` wrappers
    (``accelerate.utils.extract_model_from_parallel``, as the Trainer's ``accelerator.unwrap_model``)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def split_labels(batch: Mapping) -> Tuple[Dict[str, Any], Optional[Tensor]]:
    """``(model inputs, labels or None)`` of a batch dict."""
    labels = next((batch[k] for k in LABEL_KEYS if batch.get(k) is not None), None)
    return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, labels


def forward_params(model: nn.Module) -> Optional[set]:
    """Names the model's forward accepts as keywords; None when it takes ``**kwargs``."""
    params = inspect.signature(unwrap(model).forward).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _positional_key(model: nn.Module, inputs: Mapping) -> str:
    key = next((k for k in POSITIONAL_KEYS if k in inputs), None)
    if key is None and len(inputs) == 1:
        key = next(iter(inputs))
    if key is None:
        raise ValueError(
            f"{type(unwrap(model)).__name__}.forward accepts none of the batch keys {sorted(inputs)} and there is no "
            f"single input tensor to pass positionally (expected one of {', '.join(POSITIONAL_KEYS)})"
        )
    return key


def call_input(model: nn.Module, inputs: Mapping) -> Any:
    """What to call ``model`` with: the keyword dict when its forward accepts every key (HF models),
    else the one positional input tensor (timm-native ``forward(x)``)."""
    accepted = forward_params(model)
    if accepted is None or all(k in accepted for k in inputs):
        return dict(inputs)
    return inputs[_positional_key(model, inputs)]


def call_model(model: nn.Module, inputs: Mapping, **extra: Any) -> Any:
    """Run ``model`` on a batch dict (labels must already be split off): as keywords when its
    forward accepts the keys, else positionally on the one input tensor. ``extra`` keywords are
    passed only to models that accept them."""
    accepted = forward_params(model)
    if accepted is None or all(k in accepted for k in inputs):
        kwargs = dict(inputs)
        for k, v in extra.items():
            if accepted is None or k in accepted:
                kwargs[k] = v
        return model(**kwargs)
    return model(inputs[_positional_key(model, inputs)])


def output_tensor(outputs: Any, target: str = "logits", who: str = "model") -> Tensor:
    """The tensor to distill or score: logits (``target="logits"``) or the last hidden state."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        present = ", ".join(k for k in outputs if outputs[k] is not None)
        if target == "logits":
            if outputs.get("logits") is not None:
                return outputs["logits"]
            raise ValueError(
                f"the {who}'s output has no `logits` (it has: {present}); for models without logits (e.g. embedding "
                "models) use distill_target='hidden_states'"
            )
        if outputs.get("last_hidden_state") is not None:
            return outputs["last_hidden_state"]
        if outputs.get("hidden_states") is not None:
            return outputs["hidden_states"][-1]
        raise ValueError(f"the {who}'s output has neither `last_hidden_state` nor `hidden_states` (it has: {present})")
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise ValueError(f"cannot find a tensor in the {who}'s output of type {type(outputs).__name__}")


def padding_mask(model_inputs: Mapping, per_position: Tensor) -> Optional[Tensor]:
    """For sequence outputs, the attention mask as weights of the positions that count (padding does
    not); None for per-sample outputs."""
    mask = model_inputs.get("attention_mask")
    if per_position.dim() >= 2 and isinstance(mask, Tensor) and mask.shape == per_position.shape:
        return mask.to(per_position.dtype)
    return None


def first_float_tensor(output: Any) -> Optional[Tensor]:
    """A model's main output: the tensor itself, or the first floating tensor of a ModelOutput / dict / tuple
    (``logits``, ``last_hidden_state``...); None when there is none."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        found = first_float_tensor(value)
        if found is not None:
            return found
    return None
