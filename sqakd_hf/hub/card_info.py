"""What a model card says about a quantized model, and writing it as ``README.md``.

* :func:`model_card_info` collects it from a quantized model (transformers or timm);
* :func:`write_model_card` renders ``README.md`` into a folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch import nn

from ..checkpoint import model_library
from ..injection import get_quant_config, quant_layers
from ..modules import WRAPPERS, QuantLayer
from ..serialization.files import read_checkpoint_header
from .card import ModelCardInfo, render_model_card

__all__ = ["model_card_info", "write_model_card", "checkpoint_contents", "Metrics"]

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


#: bytes per element of each safetensors dtype
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
#: at most this many full-precision groups are listed; the rest are summed into one row
MAX_FP_GROUPS = 8


def _group_of(owner: str) -> str:
    """``bert.encoder.layer.3.output.LayerNorm`` -> ``bert.encoder.layer.*.output.LayerNorm``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", owner)


def checkpoint_contents(folder: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """What the ``*.safetensors`` files of ``folder`` hold, from their headers (no tensor is loaded):
    ``{"total_bytes", "quantized_bytes", "fp_groups": [{"group", "bytes", "share", "dtypes"}]}``.

    A tensor is quantized when it is the packed weight (codes, scales, zero points) of a layer the packed file
    records as quantized (linear, conv, embedding: whatever was quantized), or a quantizer's state; in the
    training form, the weight of a layer of ``model`` with fewer than 32 weight bits. Every other tensor is kept in full precision; those are grouped by module, layer
    indices collapsed (``encoder.layer.*.output.LayerNorm``), biases of quantized layers in one group. The
    ``MAX_FP_GROUPS - 1`` largest groups are listed, largest first, the rest summed.
    """
    files = sorted(Path(folder).glob("*.safetensors"))
    header = read_checkpoint_header(files)
    packed = bool(header.packed_layers)
    if packed:
        quantized = set(header.packed_layers)
        quantized_leaf = lambda leaf: leaf.startswith("weight_")  # noqa: E731  codes, scales, zero points
    else:
        quantized = {n for n, m in quant_layers(model)} if model is not None else set()
        quantized = {n for n in quantized if _weight_bits(model, n) < 32}
        # master weights (training form); codes, scales and input steps (compressed-tensors)
        quantized_leaf = lambda leaf: leaf == "weight" or leaf.startswith(("weight_", "input_"))  # noqa: E731
    total = q_bytes = 0
    groups: Dict[str, Dict[str, Any]] = {}
    for key, shape in header.shapes.items():
        dtype = header.dtypes[key]
        size = math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)
        if size == 0:
            continue  # an empty placeholder holds no bytes
        total += size
        owner, _, leaf = key.rpartition(".")
        if "_quantizer." in key or (owner in quantized and quantized_leaf(leaf)):
            q_bytes += size
            continue
        name = "biases of quantized layers" if owner in quantized else _group_of(owner or leaf)
        group = groups.setdefault(name, {"group": name, "bytes": 0, "dtypes": set(), "tensors": 0})
        group["bytes"] += size
        group["dtypes"].add(dtype)
        group["tensors"] += 1
    ordered = sorted(groups.values(), key=lambda g: (-g["bytes"], g["group"]))
    if len(ordered) > MAX_FP_GROUPS:
        rest = ordered[MAX_FP_GROUPS - 1:]
        ordered = ordered[: MAX_FP_GROUPS - 1] + [{
            "group": f"{len(rest)} other groups", "bytes": sum(g["bytes"] for g in rest),
            "dtypes": set().union(*(g["dtypes"] for g in rest)), "tensors": sum(g["tensors"] for g in rest)}]
    for g in ordered:
        g["share"] = g["bytes"] / total if total else 0.0
        g["dtypes"] = sorted(g["dtypes"])
    return {"total_bytes": total, "quantized_bytes": q_bytes, "fp_groups": ordered}


def _weight_bits(model: nn.Module, name: str) -> int:
    return int(model.get_submodule(name).weight_quantizer.bits)


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
    **facts: Any,
) -> ModelCardInfo:
    """What the model card says about ``model`` (an SQAKD-quantized transformers or timm model).

    ``teacher``: the teacher's Hub id / local path, or the teacher model (its ``name_or_path`` and
    size are used); by default the checkpoint the student was quantized from, if known.
    ``metrics``: ``{"teacher": {...}, "student": {...}}``. ``teacher_bytes`` defaults to the
    teacher's size, else the student's full-precision size (same architecture). ``facts``: further
    :class:`ModelCardInfo` fields (``base_model``: the name to show, e.g. a local teacher's folder name, while
    ``teacher`` is measured; ``mode``, ``labels_used``, ``evaluation``, ``base_model_on_hub``, ``fp_groups``,
    ``quantized_share``, ``teacher_bytes_source``, ``form``: the uploaded form, "compressed-tensors" or "onnx").
    """
    config = get_quant_config(model)
    if model_library(model) == "transformers":
        model_class, pipeline_tag = _auto_class(model)
        library = "transformers"
    else:
        model_class = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        library, pipeline_tag = "timm", "image-classification"
    if teacher_bytes is None:
        teacher_bytes = _teacher_bytes(teacher)
        facts.setdefault("teacher_bytes_source", "the teacher's safetensors files" if teacher_bytes else
                         "the student's tensors at full precision")
        teacher_bytes = teacher_bytes or _fp_bytes(model)
    base_model = facts.pop("base_model", None) or _teacher_name(teacher, model)
    return ModelCardInfo(
        base_model=base_model,
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
        **facts,
    )


def write_model_card(model: nn.Module, save_directory: Union[str, os.PathLike], **info_kwargs: Any) -> Path:
    """Render the model card of ``model`` into ``save_directory/README.md``; returns its path.

    Keyword arguments go to :func:`model_card_info`. ``checkpoint_bytes``, ``packed`` and ``form`` default
    to what ``save_directory`` holds (its ``*.safetensors`` files, else its ``*.onnx`` graph, and ``config.json``).
    """
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    weights = sorted(folder.glob("*.safetensors"))
    files = weights or sorted(folder.glob("*.onnx"))  # an ONNX upload: the graph file is the checkpoint
    if info_kwargs.get("checkpoint_bytes") is None and files:
        info_kwargs["checkpoint_bytes"] = sum(f.stat().st_size for f in files)
    if "form" not in info_kwargs and _saved_quant_config(folder).get("quant_method") == "compressed-tensors":
        info_kwargs["form"] = "compressed-tensors"
    if "packed" not in info_kwargs:
        info_kwargs["packed"] = bool(_saved_quant_config(folder).get("packed", False))
    if weights and "fp_groups" not in info_kwargs:
        contents = checkpoint_contents(folder, model)
        info_kwargs["fp_groups"] = contents["fp_groups"]
        if contents["total_bytes"]:
            info_kwargs["quantized_share"] = contents["quantized_bytes"] / contents["total_bytes"]
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
