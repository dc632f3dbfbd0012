"""Save, load and pack quantized models: the one place that decides between transformers and timm.

* :func:`model_library` / :func:`config_library`: which library a model or a saved ``config.json`` belongs to;
* :func:`save_quantized` / :func:`save_packed`: the training form or the packed form, in the model's own layout
  (transformers' ``save_pretrained`` layout, or timm's Hub layout for timm-native models);
* :func:`load_quantized`: a saved quantized folder back as a model, whatever its layout and form;
* :func:`load_pretrained` / :func:`load_teacher`: a full-precision checkpoint by path or Hub id, loaded by its
  library (or the way its student was built).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import torch
from torch import nn

from .config import QuantConfig
from .injection import get_quant_config
from .model_io import unwrap
from .serialization.files import atomic_save_directory
from .serialization.packed import as_fp_dtype

__all__ = [
    "model_library",
    "config_library",
    "save_quantized",
    "save_packed",
    "load_quantized",
    "load_pretrained",
    "load_teacher",
]

FpDtype = Union[None, str, torch.dtype]


def model_library(model: nn.Module) -> str:
    """``"transformers"`` (a ``PreTrainedModel``, the timm wrapper included), ``"timm"`` (a timm-native
    model: it has a ``pretrained_cfg``) or ``"torch"`` (any other ``nn.Module``)."""
    from transformers import PreTrainedModel

    model = unwrap(model)
    if isinstance(model, PreTrainedModel):
        return "transformers"
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        return "timm"
    return "torch"


def config_library(config: Dict[str, Any]) -> str:
    """``"timm"`` for a timm Hub ``config.json`` (an ``architecture``, no ``model_type``), else ``"transformers"``."""
    return "timm" if "model_type" not in config and bool(config.get("architecture")) else "transformers"


@contextlib.contextmanager
def _quantizer_view(model: nn.Module, packed: bool, fp_dtype: Optional[torch.dtype]) -> Iterator[None]:
    """While open, ``model.save_pretrained`` writes the form asked for through our quantizer's
    ``get_state_dict_and_metadata`` hook (NaN / inf refused, the quantization recorded in the safetensors
    metadata): the model carries a pre-quantized :class:`SQAKDHfQuantizer` and ``config.quantization_config``
    says ``packed`` or not. transformers still writes config.json, drops tied weights and maps key names.
    (``save_pretrained(state_dict=...)`` alone cannot do this: a model's quantizer hook overrides the
    state dict passed, and only that hook can add safetensors metadata.) Both are restored on exit.
    The training form of a model that already carries an sqakd quantizer is written by that quantizer."""
    from .integrations.hf_quantizer import SQAKDHfQuantizer

    if not packed and isinstance(getattr(model, "hf_quantizer", None), SQAKDHfQuantizer):
        yield
        return
    packed_config = QuantConfig.from_dict({**get_quant_config(model).to_dict(), "packed": packed})
    quantizer = SQAKDHfQuantizer(packed_config, pre_quantized=True)
    quantizer.fp_dtype = fp_dtype
    missing = object()
    saved_quantizer = model.__dict__.get("hf_quantizer", missing)
    saved_config = model.config.__dict__.get("quantization_config", missing)
    model.hf_quantizer, model.config.quantization_config = quantizer, packed_config
    try:
        yield
    finally:
        for owner, name, value in ((model, "hf_quantizer", saved_quantizer),
                                   (model.config, "quantization_config", saved_config)):
            if value is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def save_quantized(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    *,
    packed: bool = False,
    fp_dtype: FpDtype = torch.float16,
    processor: Any = None,
) -> Path:
    """Write a quantized model to ``save_directory`` atomically; returns the directory.

    ``packed=False``: the training form (FP master weights + every quantizer tensor, to resume or
    reload exactly); ``packed=True``: the packed low-bit form (see :mod:`sqakd_hf.serialization.packed`;
    ``fp_dtype`` is the dtype of the FP output head). transformers models (the timm wrapper included)
    use ``save_pretrained``'s layout with ``quantization_config`` in ``config.json``; timm-native models
    use timm's Hub layout (see :func:`sqakd_hf.save_pretrained_timm`). ``processor`` (a tokenizer or image
    processor), if given, is saved next to the weights.

    Either form records its quantization in the safetensors metadata (loading checks config.json against
    it); a model holding NaN / infinite weights, biases or quantizer tensors is refused with a
    ``ValueError`` naming them, and nothing is written.
    """
    model = unwrap(model)
    library = model_library(model)
    if library == "torch":
        raise ValueError(
            f"{type(model).__name__} is neither a transformers model nor a timm model; for a plain nn.Module use "
            "sqakd_hf.pack_model(model) and write the tensors with safetensors.torch.save_file"
        )
    fp_dtype = as_fp_dtype(fp_dtype)
    if library == "timm":
        from .serialization.timm_layout import save_pretrained_timm

        out = save_pretrained_timm(model, save_directory, packed=packed, fp_dtype=fp_dtype)
    else:
        with atomic_save_directory(save_directory) as staging:
            with _quantizer_view(model, packed, fp_dtype):
                model.save_pretrained(staging)
        out = Path(save_directory)
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(str(out))
    return out


def save_packed(model: nn.Module, save_directory: Union[str, os.PathLike], *, fp_dtype: FpDtype = torch.float16) -> Path:
    """Write the packed form of ``model`` (``config.json`` + ``model.safetensors``) to ``save_directory``.

    transformers models (including the timm wrapper) are written the way ``save_pretrained``
    writes them, with ``quantization_config.packed = true``; timm-native models in timm's Hub
    layout. The write is atomic. Returns the directory.
    """
    return save_quantized(model, save_directory, packed=True, fp_dtype=fp_dtype)


def load_quantized(folder: Union[str, os.PathLike]) -> nn.Module:
    """Load a saved quantized checkpoint folder (transformers or timm layout, training or packed form)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if not cfg.get("quantization_config"):
        raise ValueError(f"{folder} holds no quantized model (config.json has no quantization_config)")
    if config_library(cfg) == "timm":
        from .serialization.timm_layout import from_pretrained_timm

        return from_pretrained_timm(folder)
    import transformers

    from .integrations import hf_quantizer  # noqa: F401  (registers quant_method "sqakd")

    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"{folder}/config.json names no transformers architecture ('architectures': {archs})")
    return cls.from_pretrained(folder)


def load_pretrained(
    name: Union[str, os.PathLike], library: str, model_class: Union[str, type, None] = None, **hub_kwargs: Any
) -> nn.Module:
    """A full-precision checkpoint (local folder or Hub id) loaded the way its library loads it: timm
    (``timm.create_model`` of the folder / ``hf-hub:`` id) or transformers (``model_class``, a class or
    the name of a transformers class, default ``AutoModel``; ``hub_kwargs`` such as revision / cache_dir
    go to ``from_pretrained``)."""
    name = os.fspath(name)
    if library == "timm":
        import timm

        if os.path.isdir(name):
            source = f"local-dir:{name}"
        else:
            source = name if name.startswith("hf-hub:") else f"hf-hub:{name}"
        return timm.create_model(source, pretrained=True)
    if library != "transformers":
        raise ValueError(f"library must be 'timm' or 'transformers'; got {library!r}")
    import transformers

    cls = getattr(transformers, model_class) if isinstance(model_class, str) else (model_class or transformers.AutoModel)
    return cls.from_pretrained(name, **{k: v for k, v in hub_kwargs.items() if v is not None})


def load_teacher(teacher: Union[nn.Module, str, os.PathLike], student: Optional[nn.Module] = None) -> nn.Module:
    """An ``nn.Module`` teacher as is; a path / Hub id loaded with the student's class
    (transformers), ``timm.create_model`` (timm-native student) or ``AutoModel``."""
    if isinstance(teacher, nn.Module):
        return teacher
    if not isinstance(teacher, (str, os.PathLike)):
        raise TypeError(f"teacher_model must be an nn.Module, a local path or a Hub id; got {type(teacher).__name__}")
    library = model_library(student) if student is not None else "transformers"
    if library == "timm":
        return load_pretrained(teacher, "timm")
    model_class = type(unwrap(student)) if library == "transformers" and student is not None else None
    return load_pretrained(teacher, "transformers", model_class)
