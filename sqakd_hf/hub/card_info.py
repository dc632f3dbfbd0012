"""What a model card says about a quantized model, and writing it as ``README.md``.

* :func:`model_card_info` collects it from a quantized model (transformers or timm);
* :func:`write_model_card` renders ``README.md`` into a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch import nn

from ..checkpoint import model_library
from ..injection import get_quant_config, quant_layers
from ..modules import WRAPPERS, QuantLayer
from .card import ModelCardInfo, render_model_card

__all__ = ["model_card_info", "write_model_card", "Metrics"]

Metrics = Dict[str, Dict[str, float]]


#: (auto class, mapping of model types to class names in transformers.models.auto.modeling_auto, pipeline tag)
_AUTO_CLASSES = (
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering"),
    ("AutoModel", "MODEL_MAPPING_NAMES", "feature-extraction"),
)


def _auto_class(model: nn.Module) -> tuple:
    """``(class to load with, pipeline tag)`` for a transformers model."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for auto, mapping, tag in _AUTO_CLASSES:
        for value in getattr(modeling_auto, mapping, {}).values():
            if name == value or (isinstance(value, (tuple, list)) and name in value):
                return auto, tag
    return name, None


def _fp_modules(model: nn.Module) -> List[str]:
    report = getattr(model, "sqakd_report", None)
    if report is not None:
        return [e.name for e in report.kept_fp]
    linear_like = tuple(WRAPPERS)
    fp = [n for n, m in model.named_modules() if isinstance(m, linear_like) and not isinstance(m, QuantLayer)]
    fp += [n for n, m in quant_layers(model) if m.weight_quantizer.bits >= 32 and m.input_quantizer.bits >= 32]
    return fp


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fp_bytes(model: nn.Module) -> int:
    """Size of the full-precision model: every tensor except quantizer state."""
    return _nbytes(v for k, v in model.state_dict().items() if "_quantizer." not in k)


def _teacher_name(teacher: Any, model: nn.Module) -> Optional[str]:
    if isinstance(teacher, (str, os.PathLike)):
        return str(teacher)
    if isinstance(teacher, nn.Module):
        config = getattr(teacher, "config", None)
        return getattr(config, "_name_or_path", None) or getattr(teacher, "name_or_path", None) or None
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    if config is not None and (quantizer is None or not quantizer.pre_quantized):
        return getattr(config, "_name_or_path", None) or None  # the FP checkpoint the student was built from
    return None


def _teacher_bytes(teacher: Any) -> Optional[int]:
    if isinstance(teacher, nn.Module):
        return _nbytes(teacher.state_dict().values())
    if isinstance(teacher, (str, os.PathLike)) and Path(teacher).is_dir():
        files = list(Path(teacher).glob("*.safetensors"))
        return sum(f.stat().st_size for f in files) or None
    return None


def model_card_info(
    model: nn.Module,
    *,
    teacher: Any = None,
    metrics: Optional[Metrics] = None,
    repo_id: Optional[str] = None,
    training: Optional[Dict[str, Any]] = None,
    checkpoint_bytes: Optional[int] = None,
    teacher_bytes: Optional[int] = None,
    packed: bool = True,
    datasets: Optional[List[str]] = None,
    license: Optional[str] = None,
    tags: Optional[List[str]] = None,
) -> ModelCardInfo:
    """What the model card says about ``model`` (an SQAKD-quantized transformers or timm model).

    ``teacher``: the teacher's Hub id / local path, or the teacher model (its ``name_or_path`` and
    size are used); by default the checkpoint the student was quantized from, if known.
    ``metrics``: ``{"teacher": {...}, "student": {...}}``. ``teacher_bytes`` defaults to the
    teacher's size, else the student's full-precision size (same architecture).
    """
    config = get_quant_config(model)
    if model_library(model) == "transformers":
        model_class, pipeline_tag = _auto_class(model)
        library = "transformers"
    else:
        model_class = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        library, pipeline_tag = "timm", "image-classification"
    if teacher_bytes is None:
        teacher_bytes = _teacher_bytes(teacher) or _fp_bytes(model)
    return ModelCardInfo(
        base_model=_teacher_name(teacher, model),
        method=config.method,
        weight_bits=config.weight_bits,
        act_bits=config.act_bits,
        fp_modules=_fp_modules(model),
        model_class=model_class,
        library=library,
        repo_id=repo_id,
        metrics=dict(metrics or {}),
        checkpoint_bytes=checkpoint_bytes,
        teacher_bytes=teacher_bytes,
        packed=packed,
        training=dict(training or {}),
        tags=list(tags or []),
        datasets=list(datasets or []),
        license=license,
        pipeline_tag=pipeline_tag,
    )


def write_model_card(model: nn.Module, save_directory: Union[str, os.PathLike], **info_kwargs: Any) -> Path:
    """Render the model card of ``model`` into ``save_directory/README.md``; returns its path.

    Keyword arguments go to :func:`model_card_info`. ``checkpoint_bytes`` and ``packed`` default
    to what ``save_directory`` holds (its ``model.safetensors`` and ``config.json``).
    """
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    weights = sorted(folder.glob("*.safetensors"))
    if info_kwargs.get("checkpoint_bytes") is None and weights:
        info_kwargs["checkpoint_bytes"] = sum(f.stat().st_size for f in weights)
    if "packed" not in info_kwargs:
        info_kwargs["packed"] = bool(_saved_quant_config(folder).get("packed", False))
    card = render_model_card(model_card_info(model, **info_kwargs))
    path = folder / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(str(card), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _saved_quant_config(folder: Path) -> Dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return {}
    return json.loads(cfg.read_text()).get("quantization_config") or {}
