"""Model card and Hub upload for quantized students.

* :func:`model_card_info` collects what the card says from a quantized model;
* :func:`write_model_card` renders ``README.md`` into a folder;
* :func:`push_to_hub` uploads the **packed** model plus ``README.md`` (teacher as ``base_model``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from .export import get_quant_config, save_packed
from .injection import quant_layers
from .model_card import ModelCardInfo, render_model_card
from .modules import WRAPPERS, QuantLayer

logger = logging.getLogger(__name__)

__all__ = ["model_card_info", "write_model_card", "push_to_hub", "load_quantized", "PushToHubError"]

Metrics = Dict[str, Dict[str, float]]
ModelOrPath = Union[nn.Module, str, os.PathLike]

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


class PushToHubError(RuntimeError):
    """Uploading to the Hub failed; the message says which step failed, where the files are, how to retry.
    ``folder`` is the kept staging folder (packed model + README.md), ready for a retry."""

    def __init__(self, message: str, folder: Optional[Path] = None) -> None:
        super().__init__(message)
        self.folder = folder


def _is_transformers(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


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
    if _is_transformers(model):
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


def load_quantized(folder: Union[str, os.PathLike]) -> nn.Module:
    """Load a saved quantized checkpoint folder (transformers or timm layout, training or packed form)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if not cfg.get("quantization_config"):
        raise ValueError(f"{folder} holds no quantized model (config.json has no quantization_config)")
    if "model_type" not in cfg and cfg.get("architecture"):
        from .timm_io import from_pretrained_timm

        return from_pretrained_timm(folder)
    import transformers

    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"{folder}/config.json names no transformers architecture ('architectures': {archs})")
    from . import hf_quantizer  # noqa: F401  (registers "sqakd")

    return cls.from_pretrained(folder)


def push_to_hub(
    model_or_dir: ModelOrPath,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    create_pr: bool = False,
    revision: Optional[str] = None,
    teacher: Any = None,
    metrics: Optional[Metrics] = None,
    training: Optional[Dict[str, Any]] = None,
    fp_dtype: Union[None, str, torch.dtype] = torch.float16,
    **card_kwargs: Any,
):
    """Upload the packed form of a quantized model and its model card to the Hub repo ``repo_id``.

    ``model_or_dir`` is a quantized model or a folder holding one (training or packed form; the
    folder is never modified). The repo is created if needed (``exist_ok``; a bare name goes to the
    token's namespace), then the packed checkpoint and ``README.md`` (teacher as ``base_model``,
    ``metrics``, ``training`` hyper-parameters; ``card_kwargs`` go to :func:`model_card_info`) are
    staged in a temporary folder and uploaded in one commit. Returns ``huggingface_hub.CommitInfo``.
    On failure raises :class:`PushToHubError` naming the failed step and, once staged, the kept
    folder to retry from.
    """
    from huggingface_hub import HfApi

    from_dir = isinstance(model_or_dir, (str, os.PathLike))
    model = load_quantized(model_or_dir) if from_dir else model_or_dir
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    except Exception as err:  # network, HTTP and auth errors all end here
        raise PushToHubError(
            f"push_to_hub failed to create the repository {repo_id!r} on {api.endpoint}: {type(err).__name__}: "
            f"{err}. Nothing was written; fix the cause (token, permissions, network) and call push_to_hub again."
        ) from err

    # a folder's own model card is kept unless new card contents are given (e.g. retrying a failed push)
    old_card = Path(model_or_dir) / "README.md" if from_dir else None
    keep_card = (old_card is not None and old_card.is_file() and "SQAKD" in old_card.read_text(errors="ignore")
                 and not (teacher or metrics or training or card_kwargs))
    staging = Path(tempfile.mkdtemp(prefix="sqakd-push-")) / repo_id.replace("/", "--")
    try:
        save_packed(model, staging, fp_dtype=fp_dtype)
        if keep_card:
            shutil.copyfile(old_card, staging / "README.md")
        else:
            write_model_card(model, staging, teacher=teacher, metrics=metrics, training=training, repo_id=repo_id,
                             packed=True, **card_kwargs)
    except BaseException:
        shutil.rmtree(staging.parent, ignore_errors=True)
        raise
    try:
        info = api.upload_folder(
            folder_path=str(staging), repo_id=repo_id, repo_type="model",
            commit_message=commit_message or f"Upload SQAKD {get_quant_config(model).short_name} model (packed)",
            create_pr=create_pr, revision=revision,
        )
    except Exception as err:
        raise PushToHubError(
            f"push_to_hub failed to upload the files for {repo_id!r} on {api.endpoint}: {type(err).__name__}: {err}. "
            f"The packed model and README.md are kept in {staging}; fix the cause (token, permissions, network) and "
            f"retry with sqakd_hf.push_to_hub({str(staging)!r}, {repo_id!r}) or "
            f"huggingface_hub.upload_folder(folder_path={str(staging)!r}, repo_id={repo_id!r}).",
            folder=staging,
        ) from err
    shutil.rmtree(staging.parent, ignore_errors=True)
    logger.info("sqakd: pushed to %s", getattr(info, "commit_url", repo_id))
    return info
