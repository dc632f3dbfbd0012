"""Find, check and load the teacher, the student and their preprocessing for a recipe.

:func:`inspect_teacher` reads only the teacher's config (no weights) and decides the library
(timm or transformers), the task and the input modality, so a recipe whose data does not
fit the model fails before anything heavy is loaded. :func:`load_fp_teacher`
then loads the FP teacher and :func:`load_student` its quantized copy (the student).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from torch import nn

from ..checkpoint import config_library, load_pretrained
from ..config import QuantConfig
from ..errors import DataError, InputError
from ..injection import quantize_model
from .arguments import TASKS, ModelArguments
from .data import is_local_path

logger = logging.getLogger(__name__)

__all__ = [
    "TeacherInfo",
    "inspect_teacher",
    "inspect_checkpoint",
    "load_fp_teacher",
    "load_student",
    "load_processor",
    "task_from_architecture",
]

#: architecture-name suffix -> task
_ARCH_TASKS = (
    ("ForImageClassification", "image-classification"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
)


@dataclass
class TeacherInfo:
    """What the teacher's config says, before any weights are loaded."""

    name: str
    library: str
    task: str
    modality: str
    config: Dict[str, Any] = field(default_factory=dict)
    local_dir: Optional[Path] = None
    id2label: Optional[Dict[int, str]] = None

    @property
    def auto_class(self) -> str:
        return TASKS[self.task][0]


def task_from_architecture(architecture: Optional[str]) -> Optional[str]:
    """``BertForSequenceClassification`` -> ``text-classification`` (None when unknown)."""
    for suffix, task in _ARCH_TASKS:
        if architecture and architecture.endswith(suffix):
            return task
    return None


def _read_local_config(path: Path, what: str) -> Dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{what} folder {path} has no config.json: it is not a transformers or timm checkpoint; "
                         "give the folder written by save_pretrained (transformers) or timm's save_for_hf / "
                         "push_to_hub layout, or a Hub id")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{cfg_file} is not valid JSON: {err}") from None


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return " (HF_HUB_OFFLINE is set: Hub models must already be in the local cache)" if offline else ""


def _hub_config(name: str, args: ModelArguments, timm_style: bool) -> Dict[str, Any]:
    """The teacher's config.json from the Hub (or the local cache)."""
    repo = name.removeprefix("hf-hub:")
    try:
        if timm_style:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo, "config.json", revision=args.revision, cache_dir=args.cache_dir)
            return json.loads(Path(path).read_text())
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(repo, revision=args.revision, cache_dir=args.cache_dir).to_dict()
    except (OSError, ValueError) as err:
        raise InputError(f"cannot get the config of teacher {name!r}{_offline_hint()}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None


def _modality_of(cfg: Dict[str, Any], library: str) -> str:
    if library == "timm" or cfg.get("model_type") == "timm_wrapper":
        return "image"
    if "num_channels" in cfg or "image_size" in cfg or "patch_size" in cfg:
        return "image"
    return "text"


def inspect_checkpoint(name: str, args: Optional[ModelArguments] = None, what: str = "teacher") -> TeacherInfo:
    """Library, task and modality of a checkpoint (local folder or Hub id) from its config alone.

    Raises :class:`InputError` for a missing local folder, a config that is not a model's, a
    task that contradicts the checkpoint's head, or a Hub id that cannot be reached.
    """
    args = args or ModelArguments(teacher=name)
    library = args.library
    local_dir: Optional[Path] = None
    if is_local_path(name) and not name.startswith("hf-hub:"):
        local_dir = Path(name).expanduser()
        if not local_dir.exists():
            raise InputError(f"{what} {name!r}: no such folder (give a local checkpoint folder or a Hub id)")
        if not local_dir.is_dir():
            raise InputError(f"{what} {name!r} is a file; give the checkpoint folder that holds config.json")
        cfg = _read_local_config(local_dir, what)
        if library == "auto":
            library = config_library(cfg)
    else:
        timm_style = name.startswith(("hf-hub:", "timm/"))
        if library == "auto":
            library = "timm" if timm_style else "transformers"
        cfg = _hub_config(name, args, timm_style=library == "timm")
    if library == "timm" and not cfg.get("architecture"):
        raise InputError(f"{what} {name!r} is not a timm checkpoint (its config.json has no 'architecture'); "
                         "use library: transformers")
    modality = _modality_of(cfg, library)
    if library == "timm":
        detected = "image-classification"
        names = cfg.get("label_names") or cfg.get("pretrained_cfg", {}).get("label_names")
        id2label = {i: str(n) for i, n in enumerate(names)} if names else None
    else:
        archs = cfg.get("architectures") or []
        detected = task_from_architecture(archs[0] if archs else None)
        id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()} or None
    task = args.task
    if task == "auto":
        task = detected or "feature-extraction"
    elif detected is not None and task != detected:
        raise InputError(
            f"task {task!r} does not match the {what} {name!r}: it is a {cfg.get('architectures', [cfg.get('architecture')])[0]}"
            f" ({detected}); its {task} head would be randomly initialised. Use task: {detected} (or task: auto)."
        )
    needed = TASKS[task][1]
    if task != "feature-extraction" and needed != modality:
        raise InputError(f"task {task!r} needs an {needed} model, but the {what} {name!r} is a {modality} model")
    if library == "timm" and task != "image-classification":
        raise InputError(f"timm teachers are image classifiers; task {task!r} is not supported with library: timm")
    return TeacherInfo(name, library, task, modality, cfg, local_dir, id2label)


def inspect_teacher(args: ModelArguments) -> TeacherInfo:
    """:func:`inspect_checkpoint` for the recipe's teacher; refuses an already quantized teacher."""
    if not args.teacher:
        raise InputError("no teacher configured: set teacher (a Hub id or a local checkpoint folder)")
    info = inspect_checkpoint(args.teacher, args)
    if info.config.get("quantization_config"):
        raise InputError(f"teacher {args.teacher!r} is already quantized (its config.json has a quantization_config); "
                         "the teacher must be the full-precision checkpoint")
    return info


def load_fp_teacher(info: TeacherInfo, args: Optional[ModelArguments] = None) -> nn.Module:
    """The full-precision teacher (eval mode)."""
    args = args or ModelArguments(teacher=info.name)
    source = info.local_dir if info.library == "timm" and info.local_dir is not None else info.name
    try:
        model = load_pretrained(source, info.library, info.auto_class, revision=args.revision,
                                cache_dir=args.cache_dir)
    except (OSError, RuntimeError) as err:
        raise InputError(f"cannot load teacher {info.name!r}{_offline_hint()}: {type(err).__name__}: {err}") from None
    return model.eval()


def load_student(info: TeacherInfo, quant_config: QuantConfig, teacher: nn.Module,
                 args: Optional[ModelArguments] = None) -> nn.Module:
    """The quantized copy of ``teacher`` (the FP model :func:`load_fp_teacher` loaded for ``info``), trainable.

    transformers: ``AutoModelFor<task>.from_pretrained(teacher, quantization_config=...)``;
    timm: ``quantize_model`` on a copy of ``teacher``. Activation quantizers still need
    calibration (``SQAKDTrainer`` does it on the first batches).
    """
    args = args or ModelArguments(teacher=info.name)
    if info.library == "timm":
        student = quantize_model(copy.deepcopy(teacher), quant_config)
    else:
        student = load_pretrained(info.name, "transformers", info.auto_class, quantization_config=quant_config,
                                  revision=args.revision, cache_dir=args.cache_dir)
    student.requires_grad_(True)  # a copy of a frozen teacher would otherwise train only its quantizers
    student.train()
    return student


def load_processor(source: str, info: TeacherInfo, fallback: Optional[str] = None) -> Any:
    """The tokenizer (text) or image processor (transformers image models) of ``source`` (or ``fallback``);
    ``None`` for timm models, whose preprocessing comes from the model's data config."""
    if info.library == "timm":
        return None
    from transformers import AutoImageProcessor, AutoTokenizer

    loader = AutoImageProcessor if info.modality == "image" else AutoTokenizer
    errors = []
    for src in [s for s in (source, fallback) if s]:
        try:
            return loader.from_pretrained(src)
        except (OSError, ValueError, KeyError) as err:
            errors.append(f"{src}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    what = "image processor (preprocessor_config.json)" if info.modality == "image" else "tokenizer"
    raise DataError(f"no {what} found for {source!r}{_offline_hint()}; save one with the checkpoint. "
                    + " | ".join(errors))
